"""Benchmark: the offline default recipe as shipped, over seeds, judged by the held-out evaluation.

    python benchmarks/default_seeds.py --seeds 42 1 2              # train + evaluate, one seed at a time
    python benchmarks/default_seeds.py --add-run outputs/smollm2_news --seed 42   # record a run made by hand
    python benchmarks/default_seeds.py --seeds 42 --set penalties.frequency=0.0   # a variant, its own row
    python benchmarks/default_seeds.py --table-only

Each seed runs the README's job unchanged except `train.seed` and the output folder
(`python -m onpolicy_kd.train recipes/smollm2_news.yaml`, one process on the CPU), then the README's evaluation
of the finished run (`python -m onpolicy_kd.evaluate RUN`: the recipe's 60 held-out articles of other outlets,
against their human-written headlines and the teacher's answers, greedy and sampled). `--add-run` records a run
that already has that evaluation (`eval/` in its folder) without training again.

Each seed appends one JSON record (with every per-prompt figure) to benchmarks/results/default_seeds.jsonl;
default_seeds.md shows the mean over seeds and prompts ± the bootstrap standard error over both
(onpolicy_kd/evaluation/uncertainty.py), the training time (seconds of steps: the evaluations are not counted)
and the whole command's wall time. The records of the 12-prompt judge before: default_seeds_lee12.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "smollm2_news.yaml"
RESULTS = ROOT / "benchmarks" / "results"
METRICS = (("greedy/rougeL_ref", "ROUGE-L vs refs, greedy"), ("sampled/rougeL_ref", "ROUGE-L vs refs, sampled"),
           ("greedy/rougeL_teacher", "ROUGE-L vs teacher, greedy"), ("reverse_kl_samples", "KL(q‖p)"),
           ("forward_kl_samples", "KL(p‖q)"), ("greedy/distinct1", "distinct-1, greedy"),
           ("greedy/repetition", "repetition, greedy"), ("sampled/repetition", "repetition, sampled"),
           ("greedy/truncated", "cut, greedy"))


def python(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def evaluation_of(folder: Path) -> dict:
    """A record's view of an `evaluate` output folder: the summary and every per-prompt figure (KLs as sums)."""
    predictions = [json.loads(line) for line in open(folder / "predictions.jsonl")]
    return {"summary": json.loads((folder / "metrics.json").read_text()),
            "per_prompt": {k: [p["metrics"][k] for p in predictions] for k in predictions[0]["metrics"]},
            "kl": {k: [p["kl_sums"][k] for p in predictions] for k in ("tokens", "reverse_kl", "forward_kl")}}


def evaluate(run: Path, *, initial: bool = False) -> dict:
    """The README's evaluation of a run folder (or, with initial, of the recipe's untrained student)."""
    out = run / ("eval_initial" if initial else "eval")
    if not (out / "metrics.json").is_file():
        python("-m", "onpolicy_kd.evaluate", str(RECIPE) if initial else str(run), "--out", str(out))
    return evaluation_of(out)


def record_of(run: Path, seed: int, wall_s: float | None) -> dict:
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r for r in rows if "time/step_s" in r]
    return {"seed": seed, "steps": len(steps), "train_s": sum(r["time/step_s"] for r in steps), "wall_s": wall_s,
            "evaluations": sum("eval/reverse_kl" in r for r in rows), "after": evaluate(run),
            "date": time.strftime("%Y-%m-%d")}


def train_one(seed: int, overrides: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"default-seed{seed}-"))
    started = time.perf_counter()
    python("-m", "onpolicy_kd.train", str(RECIPE), f"train.seed={seed}", f"train.output_dir={work}",
           "logging.live=false", *overrides)
    wall = time.perf_counter() - started
    record = record_of(work, seed, wall) | {"overrides": overrides}
    shutil.rmtree(work, ignore_errors=True)  # checkpoints and the export: ~1.5 GB
    return record


def estimate(evaluations: list[dict], key: str) -> str:
    from onpolicy_kd.evaluation.uncertainty import seed_prompt_bootstrap

    if key in ("reverse_kl_samples", "forward_kl_samples"):  # token-level: each prompt's sum over its tokens
        name, tokens = key.removesuffix("_samples"), [e["kl"]["tokens"] for e in evaluations]
        values = [[s / max(n, 1) for s, n in zip(e["kl"][name], t)] for e, t in zip(evaluations, tokens)]
        return str(seed_prompt_bootstrap(values, weights=tokens))
    return str(seed_prompt_bootstrap([e["per_prompt"][key] for e in evaluations]))


def table(records: list[dict], initial: dict) -> str:
    prompts = len(initial["per_prompt"]["greedy/length"])
    lines = ["# The offline default over seeds (benchmarks/default_seeds.py)", "",
             "`recipes/smollm2_news.yaml` as shipped, or with the overrides a row names, one process on the 2-core CPU "
             f"machine, changing only `train.seed`; then `python -m onpolicy_kd.evaluate` on its {prompts} held-out "
             "articles of other outlets (human-written headlines as references). Mean over seeds and prompts ± the "
             "bootstrap standard error over both; greedy: one completion, sampled: the mean over 3 at temperature 1; "
             "KLs token-level on the first sample.", "",
             "| student | seeds | " + " | ".join(label for _, label in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    lines.append("| untrained copy | - | " + " | ".join(estimate([initial], k) for k, _ in METRICS) + " |")
    variants: dict[tuple, list[dict]] = {}  # records by the overrides they ran with (none: the recipe as shipped)
    for r in records:
        variants.setdefault(tuple(r.get("overrides", [])), []).append(r)
    for overrides, group in variants.items():
        label = "the recipe as shipped" + "".join(f", `{o}`" for o in overrides)
        lines.append(f"| {label} | {', '.join(str(r['seed']) for r in group)} | "
                     + " | ".join(estimate([r["after"] for r in group], k) for k, _ in METRICS) + " |")
    teacher = {k: f"{initial['summary'][f'teacher/{k}']:.3f}" if f"teacher/{k}" in initial["summary"] else "-"
               for k, _ in METRICS}
    lines += ["| teacher | - | " + " | ".join(teacher[k] for k, _ in METRICS) + " |", "",
              "Training time (seconds of training steps; the held-out evaluations are not counted) and the whole "
              "command's wall time:", ""]
    for overrides, group in variants.items():
        label = "the recipe as shipped" + "".join(f", `{o}`" for o in overrides)
        train_s = [r["train_s"] for r in group]
        timed = [r["wall_s"] for r in group if r.get("wall_s")]
        lines.append(f"- {label}: {statistics.fmean(r['steps'] for r in group):.0f} steps, "
                     f"{statistics.fmean(train_s):.0f} s of training steps ({min(train_s):.0f}-{max(train_s):.0f}), "
                     f"{statistics.fmean(r['evaluations'] for r in group):.0f} held-out evaluations"
                     + (f"; the whole training command {statistics.fmean(timed) / 60:.1f} min "
                        f"({min(timed) / 60:.1f}-{max(timed) / 60:.1f})" if timed else ""))
    notes = [f"- seed {r['seed']}: {r['note']}" for r in records if r.get("note")]
    if notes:  # what a record's reader should know (added to default_seeds.jsonl by hand, with the reason)
        lines += ["", "Notes on single runs:", "", *notes]
    lines += ["", f"Records: benchmarks/results/default_seeds.jsonl ({len(records)} runs, "
              f"{', '.join(sorted({r['date'] for r in records}))}). Command: "
              "`python benchmarks/default_seeds.py --seeds S ...` (`--add-run RUN --seed S` for a run made by hand)."]
    return "\n".join(lines) + "\n"


def publish(results: Path) -> None:
    records = [json.loads(line) for line in open(results / "default_seeds.jsonl")]
    initial = json.loads((results / "default_seeds_initial.json").read_text())
    text = table(records, initial)
    (results / "default_seeds.md").write_text(text)
    print(text)


def measure_initial(results: Path) -> None:
    """The untrained student, measured once (evaluation is seeded: the same for every seed)."""
    path = results / "default_seeds_initial.json"
    if path.is_file():
        return
    work = Path(tempfile.mkdtemp(prefix="default-initial-"))
    path.write_text(json.dumps(evaluate(work, initial=True)))
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    parser.add_argument("--add-run", type=Path, help="a finished run folder of the recipe to record (with --seed)")
    parser.add_argument("--seed", type=int, help="the seed --add-run was trained with")
    parser.add_argument("--wall", type=float, default=None, help="--add-run: the training command's wall seconds")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for a variant of the default (recorded with each run, a row of its own)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        measure_initial(args.results)
        runs = [lambda: record_of(args.add_run.resolve(), args.seed, args.wall) | {"overrides": args.set}] \
            if args.add_run else []
        runs += [lambda seed=seed: train_one(seed, args.set) for seed in args.seeds]
        for run in runs:  # each record kept as soon as it is made
            with open(args.results / "default_seeds.jsonl", "a") as f:
                f.write(json.dumps(run()) + "\n")
            publish(args.results)
    publish(args.results)


if __name__ == "__main__":
    main()
