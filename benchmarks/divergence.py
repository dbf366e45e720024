"""Benchmark: the divergence head, forward + backward, plain (full logits) vs chunked vs TRL vs Liger.

    python benchmarks/divergence.py                 # CPU: N=4096, V=49,152, hidden 576 (SmolLM2 shapes), float32
    python benchmarks/divergence.py --device cuda   # GPU: N=32,768, V=151,936, hidden 2048/4096 (Qwen3 shapes), bf16

Each variant runs in a fresh subprocess so its peak memory is its own: on CPU the peak resident set
(ru_maxrss) above the level reached once the inputs exist, on CUDA torch.cuda.max_memory_allocated
above the inputs. Time is the median of --repeat runs after one warm-up. Values are checked against
the plain path (the reference) and printed. Results are appended to benchmarks/results/divergence.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from onpolicy_kd.objectives.divergences import chunked_divergence, divergence  # noqa: E402
from results_file import publish  # noqa: E402

VARIANTS = ("plain", "chunked", "trl", "liger")
TRL_KINDS = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": None}


def make_inputs(args):
    g = torch.Generator(device=args.device).manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    kw = dict(device=args.device, dtype=dtype, generator=g)
    h_s = torch.randn(args.n, args.hidden, **kw).requires_grad_()
    h_t = torch.randn(args.n, args.teacher_hidden, **kw)
    w_s = (torch.randn(args.vocab, args.hidden, **kw) / args.hidden**0.5).requires_grad_()
    w_t = torch.randn(args.vocab, args.teacher_hidden, **kw) / args.teacher_hidden**0.5
    return h_s, h_t, w_s, w_t


def run_variant(args) -> dict:
    """One variant in this process: time and peak memory of forward + backward."""
    torch.set_num_threads(os.cpu_count() or 1)
    h_s, h_t, w_s, w_t = make_inputs(args)
    beta = 0.5 if args.kind == "jsd" else TRL_KINDS.get(args.kind, 0.5)

    if args.variant == "plain":
        def step():
            return divergence(h_s @ w_s.T, h_t @ w_t.T, kind=args.kind, beta=0.5)
    elif args.variant == "chunked":
        def step():
            return chunked_divergence(h_s, h_t, w_s, w_t, kind=args.kind, beta=0.5, chunk_size=args.chunk_size)
    elif args.variant == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        mask = torch.ones(1, args.n, dtype=torch.bool, device=args.device)

        def step():
            return _chunked_divergence_loss(h_s.unsqueeze(0), h_t.unsqueeze(0), w_s, w_t, mask, beta=beta)[0]
    else:
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=beta)

        def step():
            return liger(h_s, w_s, h_t, w_t, None)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, value = [], None
    for i in range(args.repeat + 1):
        h_s.grad = w_s.grad = None
        sync()
        start = time.perf_counter()
        loss = step()
        loss.backward()
        sync()
        if i:  # the first run is the warm-up
            times.append(time.perf_counter() - start)
        value = loss.item()
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    grad_norm = (h_s.grad.float().norm() ** 2 + w_s.grad.float().norm() ** 2).sqrt().item()
    return {"variant": args.variant, "median_s": statistics.median(times), "peak_gib": peak / 2**30, "value": value,
            "grad_norm": grad_norm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, default=None, help="tokens (default 4096 CPU, 32768 CUDA)")
    parser.add_argument("--vocab", type=int, default=None, help="default 49152 CPU, 151936 CUDA")
    parser.add_argument("--hidden", type=int, default=None, help="student hidden (576 CPU, 2048 CUDA)")
    parser.add_argument("--teacher-hidden", type=int, default=None, help="teacher hidden (576 CPU, 4096 CUDA)")
    parser.add_argument("--kinds", default="reverse_kl,jsd")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", default=None, help="comma list; default: plain,chunked,trl (+liger on CUDA)")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    parser.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "divergence.md"))
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.n = args.n or (32768 if gpu else 4096)
    args.vocab = args.vocab or (151936 if gpu else 49152)
    args.hidden = args.hidden or (2048 if gpu else 576)
    args.teacher_hidden = args.teacher_hidden or (4096 if gpu else 576)

    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    variants = args.variants.split(",") if args.variants else ["plain", "chunked", "trl"] + (["liger"] if gpu else [])
    rows = []
    for kind in args.kinds.split(","):
        for variant in variants:
            cmd = [sys.executable, __file__, "--variant", variant, "--kind", kind, "--device", args.device,
                   "--n", str(args.n), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
                   "--teacher-hidden", str(args.teacher_hidden), "--chunk-size", str(args.chunk_size),
                   "--repeat", str(args.repeat)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"kind": kind, "variant": variant, "error": last[:120]})
            else:
                rows.append({"kind": kind, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)

    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    header = (f"\n## {time.strftime('%Y-%m-%d')} {device_name}: N={args.n}, V={args.vocab}, hidden {args.hidden}/"
              f"{args.teacher_hidden}, {'bf16' if gpu else 'float32'}, chunk {args.chunk_size}, "
              f"median of {args.repeat}, torch {torch.__version__}\n\n"
              f"`python benchmarks/divergence.py --device {args.device}`\n\n"
              "| divergence | variant | fwd+bwd | peak memory | vs plain time | vs plain memory | loss | grad norm |\n"
              "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['kind']} | {row['variant']} | failed: {row['error']} | | | | | |")
            continue
        ref = next((r for r in rows if r["kind"] == row["kind"] and r["variant"] == "plain" and "error" not in r), None)
        ratio_t = f"{row['median_s'] / ref['median_s']:.2f}x" if ref else "-"
        ratio_m = f"{row['peak_gib'] / ref['peak_gib']:.3f}x" if ref and ref["peak_gib"] > 0 else "-"
        lines.append(f"| {row['kind']} | {row['variant']} | {row['median_s'] * 1000:.0f} ms | {row['peak_gib']:.2f} GiB | "
                     f"{ratio_t} | {ratio_m} | {row['value']:.6f} | {row['grad_norm']:.6f} |")
    table = header + "\n".join(lines) + "\n"
    publish(table, args.out)


if __name__ == "__main__":
    main()
