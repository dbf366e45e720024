"""Benchmark: the held-out evaluation on one process and sharded over two, on the offline default's models.

    python benchmarks/eval_sharding.py                    # eval.batch_size 6 (2 batches of the 12 prompts)
    python benchmarks/eval_sharding.py --batch-size 4 --repeats 3

The evaluation a training run makes at each evaluation point (`evaluation.heldout_metrics` with `eval.full`):
the recipe's 12 held-out articles, the student's sampled completions scored by both models (KL both ways), its
greedy completions (distinct-1, repetition, ROUGE-L against the teacher's); the teacher's greedy completions
are decoded at the first evaluation and reused after, as in training, so the timed call is the second.
Student: the recipe's initial 17-layer copy of the teacher (weights do not change the cost).

Three launches, each in its own `accelerate launch` (so memory and threads are per launch):
- 1 process, 2 threads: what a one-process run does on this 2-core machine (the time to beat);
- 1 process, 1 thread: the same arithmetic as each of the two processes below (threads change the order
  of float reductions, so this is the run the sharded numbers must equal to the last digit);
- 2 processes (gloo DDP), 1 thread each: each evaluates its share of the batches, results gathered.
Results are appended to benchmarks/results/eval_sharding.md.
"""

from __future__ import annotations

import argparse
import json
import os
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
LAUNCHES = {  # name -> (accelerate config, processes, threads per process)
    "1 process, 2 threads": ("cpu.yaml", 1, 2),
    "1 process, 1 thread": ("cpu.yaml", 1, 1),
    "2 processes, 1 thread each": ("cpu_2proc.yaml", 2, 1),
}


def child(out: Path, batch_size: int, repeats: int) -> None:
    """Under `accelerate launch`: load the default's models, evaluate once (teacher decoded), then time `repeats`
    evaluations that reuse the teacher's completions."""
    import torch
    from accelerate import Accelerator

    from onpolicy_kd.data.loading import load_prompt_data
    from onpolicy_kd.evaluation.heldout import heldout_metrics
    from onpolicy_kd.evaluation.teacher_answers import recipe_teacher_answers
    from onpolicy_kd.models.loading import load_models
    from onpolicy_kd.recipe import load_recipe

    torch.set_num_threads(int(os.environ["EVAL_THREADS"]))
    recipe = load_recipe(RECIPE, ["stages=[]", "eval.full=true", f"eval.batch_size={batch_size}"])
    accelerator = Accelerator()
    models = load_models(recipe, str(RECIPE))
    data = load_prompt_data(recipe.data, models.tokenizer, seed=recipe.train.seed)
    student, teacher = models.student.eval(), models.teacher.eval()
    answers = recipe_teacher_answers(recipe, teacher, models.tokenizer, data.eval, accelerator)
    heldout_metrics(recipe, accelerator, student, teacher, models.tokenizer, data.eval, answers)  # a warm-up
    times = []
    for _ in range(repeats):
        accelerator.wait_for_everyone()
        started = time.perf_counter()
        metrics = heldout_metrics(recipe, accelerator, student, teacher, models.tokenizer, data.eval, answers)
        times.append(time.perf_counter() - started)
    if accelerator.is_main_process:
        out.write_text(json.dumps({"processes": accelerator.num_processes, "threads": torch.get_num_threads(),
                                   "times": times, "metrics": metrics, "torch": torch.__version__}))
    accelerator.wait_for_everyone()


def launch(name: str, out: Path, batch_size: int, repeats: int) -> dict:
    config, processes, threads = LAUNCHES[name]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": str(threads), "EVAL_THREADS": str(threads),
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
           "--num_processes", str(processes), __file__, "--child", str(out), "--batch-size", str(batch_size),
           "--repeats", str(repeats)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return json.loads(out.read_text())


def report(results: dict[str, dict], batch_size: int) -> str:
    base = statistics.median(results["1 process, 2 threads"]["times"])
    same = results["1 process, 1 thread"]["metrics"]
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')}: eval.batch_size {batch_size}, "
             f"{len(next(iter(results.values()))['times'])} timed evaluations per launch, torch "
             f"{next(iter(results.values()))['torch']}\n",
             "| launch | median evaluation time | vs 1 process, 2 threads | metrics equal to 1 process, 1 thread |",
             "|---|---|---|---|"]
    for name, r in results.items():
        median = statistics.median(r["times"])
        diff = max(abs(r["metrics"][k] - same[k]) for k in same)
        equal = "yes, every digit" if r["metrics"] == same else f"no: largest difference {diff:.2e}"
        lines.append(f"| {name} | {median:.1f} s | {median / base:.2f}x | {equal} |")
    metrics = results["2 processes, 1 thread each"]["metrics"]
    lines.append("\nMetrics (2 processes): " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    lines.append(f"\nCommand: `python benchmarks/eval_sharding.py --batch-size {batch_size}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.batch_size, args.repeats)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in LAUNCHES:
            print(f"--- {name}", flush=True)
            results[name] = launch(name, Path(work) / "out.json", args.batch_size, args.repeats)
    publish(report(results, args.batch_size), args.results / "eval_sharding.md",
            title="# Held-out evaluation: one process vs sharded over two (benchmarks/eval_sharding.py)\n")


if __name__ == "__main__":
    main()
