"""Benchmark: one step's loss head in pg mode and in gkd with all three penalties, full logits vs memory-bounded.

    python benchmarks/head_memory.py            # N = 4,096 tokens (8 x 512), V = 49,152, hidden 576, float32, CPU

What differs between the two heads is everything after the models' last hidden states: the (N, V) logits
and what the loss builds from them. So each variant runs the project's own `step_loss` (objectives/loss.py)
and its backward on fixed hidden states of SmolLM2's shapes (student and teacher), with the same batch
fields a sampled step has (behaviour log-probs, the PG baseline, the penalties' inputs):

- full: ModelOutputs with the student's logits h @ W^T (and the teacher's), as `objective.backend=torch` runs;
- chunked: ModelOutputs with the last hidden states and heads, as the default runs (`chunk_size` 1024).

Each variant runs in its own process; peak memory is the rise of the peak resident set (ru_maxrss) over
the level once the inputs exist; time is the median of --repeat runs after a warm-up. The loss and
gradient norm of both are printed (they agree: tests/test_step.py checks them to 1e-9 in float64).
Results are appended to benchmarks/results/head_memory.md.
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

from results_file import publish  # noqa: E402

SETTINGS = {
    "pg": {"objective": {"mode": "pg"}},  # single-step KL, mean baseline, temperature 1 (the pg defaults)
    "gkd_penalties": {"objective": {"mode": "gkd", "divergence": "jsd"},
                      "penalties": {"frequency": 0.1, "diversity": 0.05, "entropy": 0.05, "entropy_floor": 2.0}},
}


def setup(args):
    from onpolicy_kd.batch import Completions
    from onpolicy_kd.recipe import Recipe

    recipe = Recipe.model_validate({"teacher": {"name_or_path": "t"}, "student": {"init": "config", "config_overrides": {"num_hidden_layers": 1}},
                                    "data": {"path": "d.jsonl"}, **SETTINGS[args.objective]})
    g = torch.Generator().manual_seed(0)
    B, T = args.batch, args.n // args.batch
    h_s = torch.randn(B, T, args.hidden, generator=g).requires_grad_()
    w_s = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).requires_grad_()
    h_t = torch.randn(B, T, args.hidden, generator=g)
    w_t = torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5
    embeddings = torch.randn(args.vocab, args.hidden, generator=g) * 0.02
    tokens = torch.randint(0, args.vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    batch = Completions(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long), tokens, mask,
                        source="student", texts=[""] * B, student_logprobs=-torch.rand(B, T, generator=g) * 10,
                        student_entropy=torch.rand(B, T, generator=g) * 5)
    return recipe, batch, (h_s, w_s, h_t, w_t, embeddings)


def run_variant(args) -> dict:
    from onpolicy_kd.objectives.loss import ModelOutputs, StepContext, batch_returns, step_loss
    from onpolicy_kd.objectives.modes import MODES

    torch.set_num_threads(os.cpu_count() or 1)
    recipe, batch, (h_s, w_s, h_t, w_t, embeddings) = setup(args)
    mode = MODES[recipe.objective.mode]

    def outputs():
        if args.variant == "full":
            return (ModelOutputs(logits=h_s @ w_s.T, input_embeddings=embeddings),
                    ModelOutputs(logits=(h_t @ w_t.T).detach()))
        return (ModelOutputs(hidden=(h_s,), head=w_s, input_embeddings=embeddings), ModelOutputs(hidden=(h_t,), head=w_t))

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, value = [], None
    for i in range(args.repeat + 1):
        h_s.grad = w_s.grad = None
        start = time.perf_counter()
        student, teacher = outputs()
        ctx = StepContext(num_tokens=batch.num_tokens, num_sequences=batch.prompt_ids.shape[0], head=args.variant
                          if args.variant == "chunked" else "torch")
        if recipe.objective.mode == "pg":
            ctx.pg_baseline = float(batch_returns(batch, teacher, recipe, embeddings).future.sum()) / batch.num_tokens
        loss, _ = step_loss(recipe, mode, batch, student, teacher, ctx)
        loss.backward()
        if i:  # the first run is the warm-up
            times.append(time.perf_counter() - start)
        value = loss.item()
        del student, teacher, loss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    grad_norm = (h_s.grad.norm() ** 2 + w_s.grad.norm() ** 2).sqrt().item()
    return {"variant": args.variant, "median_s": statistics.median(times), "peak_gib": peak / 2**30, "value": value,
            "grad_norm": grad_norm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="tokens in the step")
    parser.add_argument("--batch", type=int, default=8, help="sequences (n / batch tokens each)")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--objectives", default="pg,gkd_penalties")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    parser.add_argument("--objective", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "head_memory.md"))
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for objective in args.objectives.split(","):
        for variant in ("full", "chunked"):
            cmd = [sys.executable, __file__, "--variant", variant, "--objective", objective, "--n", str(args.n),
                   "--batch", str(args.batch), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
                   "--repeat", str(args.repeat)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{objective}/{variant} failed:\n{proc.stderr[-3000:]}")
            rows.append({"objective": objective, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    header = (f"\n## {time.strftime('%Y-%m-%d')} CPU ({os.cpu_count()} cores): N={args.n} ({args.batch} x "
              f"{args.n // args.batch}), V={args.vocab}, hidden {args.hidden}, float32, chunk 1024, median of "
              f"{args.repeat}, torch {torch.__version__}\n\n`python benchmarks/head_memory.py`\n\n"
              "| objective | head | loss + backward | peak memory | vs full time | vs full memory | loss | grad norm |\n"
              "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for row in rows:
        ref = next(r for r in rows if r["objective"] == row["objective"] and r["variant"] == "full")
        lines.append(f"| {row['objective']} | {row['variant']} | {row['median_s'] * 1000:.0f} ms | "
                     f"{row['peak_gib']:.2f} GiB | {row['median_s'] / ref['median_s']:.2f}x | "
                     f"{row['peak_gib'] / ref['peak_gib']:.3f}x | {row['value']:.6f} | {row['grad_norm']:.6f} |")
    publish(header + "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
