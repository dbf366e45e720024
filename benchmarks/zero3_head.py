"""Benchmark: the offline default under DeepSpeed ZeRO-3 on 2 processes, full logits vs the memory-bounded head.

    python benchmarks/zero3_head.py                  # 12 steps per launch
    python benchmarks/zero3_head.py --steps 20

The offline default recipe (recipes/smollm2_news.yaml: the 17-layer student, dense forward KL on the teacher's
cached summaries with the frequency penalty; the teacher-summary cache is generated on first use) launched
with `accelerate_configs/deepspeed_zero3.yaml` on 2 processes (1 thread each, float32 on this CPU: DeepSpeed's
bf16 mode would hold the weights in bfloat16), twice:
- `objective.backend=torch`: full (B, T, V) logits, what every ZeRO-3 run did before the lm_head was gathered
  for the chunked computation;
- `objective.backend=chunked`: each process gathers the two lm_head matrices and computes the divergence and
  the penalty chunk by chunk (the `auto` choice now).
Reported per launch: median step time (the steps after the first two), the peak resident set of each process
over the whole launch (ru_maxrss, which includes loading and the held-out evaluations, so also the peak over
the training steps alone, read by a hook after every step), and the held-out KL(q||p) before -> after.
Results are appended to benchmarks/results/zero3_head.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_file import publish  # noqa: E402

RECIPE = ROOT / "recipes" / "smollm2_news.yaml"
BACKENDS = ("torch", "chunked")


def gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(out_dir: Path, argv: list[str]) -> None:
    """Under `accelerate launch`: the training command, with this rank's peak RSS read after the first held-out
    evaluation (models loaded, nothing trained) and after every optimizer step."""
    import onpolicy_kd.training.loop as loop
    from onpolicy_kd.train import main as train_main

    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "before_steps_gib": None, "step_peaks_gib": []}
    real_evaluate, real_step = loop.evaluate_at_start, loop.optimizer_step

    def write() -> None:  # after every step: a multi-process run ends with os._exit
        (out_dir / f"rank{rank}.json").write_text(json.dumps(record))

    def evaluate_at_start(run, before):
        real_evaluate(run, before)
        record["before_steps_gib"] = gib()
        write()

    def optimizer_step(run, bad, metrics):
        skipped = real_step(run, bad, metrics)
        record["step_peaks_gib"].append(gib())
        write()
        return skipped

    loop.evaluate_at_start, loop.optimizer_step = evaluate_at_start, optimizer_step
    train_main(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(backend: str, steps: int, work: Path) -> dict:
    out = work / backend
    out.mkdir(parents=True)
    overrides = [f"objective.backend={backend}", f"train.max_steps={steps}", "train.mixed_precision=no",
                 "eval.eval_steps=0", "logging.live=false", f"train.output_dir={out / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "deepspeed_zero3.yaml"), "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), __file__, "--child", str(out), str(RECIPE), *overrides]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{backend} launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    head = next((line for line in proc.stdout.splitlines() if line.startswith("lm head:")), "?")
    rows = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    steps_rows = [r for r in rows if "time/step_s" in r]
    evals = [r["eval/reverse_kl"] for r in rows if "eval/reverse_kl" in r]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    import torch

    return {"head": head, "step_s": statistics.median(r["time/step_s"] for r in steps_rows[2:] or steps_rows),
            "steps": len(steps_rows), "wall_s": wall, "kl": (evals[0], evals[-1]), "torch": torch.__version__,
            "peak_gib": [r["step_peaks_gib"][-1] for r in ranks],
            "before_steps_gib": [r["before_steps_gib"] for r in ranks]}


def report(results: dict[str, dict], steps: int) -> str:
    base = results["torch"]
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')}: recipes/smollm2_news.yaml under deepspeed_zero3.yaml, "
             f"2 processes x 1 thread, float32, {steps} steps, torch {base['torch']}\n",
             "| objective.backend | lm head (start-up line) | median step | peak RSS per process (rank 0, rank 1) | "
             "peak RSS after loading and the first evaluation | held-out KL(q‖p) before -> after |",
             "|---|---|---|---|---|---|"]
    for backend, r in results.items():
        lines.append(f"| {backend} | {r['head'].removeprefix('lm head: ')} | {r['step_s']:.2f} s "
                     f"({base['step_s'] / r['step_s']:.2f}x) | "
                     f"{', '.join(f'{g:.2f}' for g in r['peak_gib'])} GiB | "
                     f"{', '.join(f'{g:.2f}' for g in r['before_steps_gib'])} GiB | {r['kl'][0]:.3f} -> {r['kl'][1]:.3f} |")
    lines.append(f"\nCommand: `python benchmarks/zero3_head.py --steps {steps}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    if "--child" in sys.argv:
        at = sys.argv.index("--child")
        return child(Path(sys.argv[at + 1]), sys.argv[at + 2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for backend in BACKENDS:
            print(f"--- objective.backend={backend}", flush=True)
            results[backend] = launch(backend, args.steps, Path(work))
            print(json.dumps(results[backend]), flush=True)
    publish(report(results, args.steps), args.results / "zero3_head.md",
            title="# The memory-bounded head under DeepSpeed ZeRO-3 (benchmarks/zero3_head.py)\n")


if __name__ == "__main__":
    main()
