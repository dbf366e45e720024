"""Benchmark: the offline default recipe as shipped, over seeds, judged on both held-out sets.

    python benchmarks/default_seeds.py --seeds 1 2                 # train + evaluate, one seed at a time
    python benchmarks/default_seeds.py --add-run outputs/smollm2_news --seed 42   # record a run made by hand
    python benchmarks/default_seeds.py --seeds 42 1 2 --set penalties.frequency=5.0   # a variant, its own row
    python benchmarks/default_seeds.py --table-only

Each seed runs the README's job unchanged except `train.seed` and the output folder
(`python -m onpolicy_kd.train recipes/smollm2_news.yaml`, its 170 steps, one process on the CPU), then the
README's two evaluations of the finished run: `python -m onpolicy_kd.evaluate RUN` (the 12 held-out training-set
articles) and the same on 12 of the 50 other Lee articles. `--add-run` records a run that already has those
two evaluations (`eval/` and `eval_lee/` in its folder) without training again.

Each seed appends one JSON record to benchmarks/results/default_seeds.jsonl; default_seeds.md is the mean and
standard deviation over the records, against the issue's targets (distinct-1 >= 0.7, repetition <= 0.2,
ROUGE-L vs the teacher >= 0.30, KL(p||q) below the untrained copy's).
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
RECIPE = ROOT / "recipes" / "smollm2_news.yaml"
RESULTS = ROOT / "benchmarks" / "results"
LEE = ["data.path=${cache:data/news/lee.jsonl}", "data.split=train", "data.eval_split=train[:12]"]
METRICS = (("reverse_kl_samples", "KL(q‖p)"), ("forward_kl_samples", "KL(p‖q)"), ("distinct1", "distinct-1"),
           ("repetition", "repetition"), ("rougeL_teacher", "ROUGE-L vs teacher"))
# the text targets; KL(p||q) must end below the untrained copy's (measured by measure_initial)
TARGETS = {"distinct1": (">=", 0.7), "repetition": ("<=", 0.2), "rougeL_teacher": (">=", 0.30)}


def python(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def evaluate(run: Path, *, initial: bool = False) -> dict:
    """The README's two evaluations of a run folder (or, with initial, of the recipe's untrained student)."""
    target = str(RECIPE) if initial else str(run)
    sets = {}
    for name, extra in (("heldout", []), ("lee", LEE)):
        out = run / f"eval_{'initial_' if initial else ''}{name}"
        if not (out / "metrics.json").is_file():
            python("-m", "onpolicy_kd.evaluate", target, *extra, "--out", str(out))
        sets[name] = json.loads((out / "metrics.json").read_text())
    return sets


def record_of(run: Path, seed: int, wall_s: float | None) -> dict:
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r for r in rows if "time/step_s" in r]
    for name, folder in (("heldout", "eval"), ("lee", "eval_lee")):  # what a run evaluated by hand already has
        if (run / folder / "metrics.json").is_file() and not (run / f"eval_{name}").exists():
            shutil.copytree(run / folder, run / f"eval_{name}")
    return {"seed": seed, "steps": len(steps), "train_s": sum(r["time/step_s"] for r in steps), "wall_s": wall_s,
            "after": evaluate(run), "date": time.strftime("%Y-%m-%d")}


def train_one(seed: int, overrides: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"default-seed{seed}-"))
    started = time.perf_counter()
    python("-m", "onpolicy_kd.train", str(RECIPE), f"train.seed={seed}", f"train.output_dir={work}",
           "logging.live=false", *overrides)
    record = record_of(work, seed, time.perf_counter() - started) | {"overrides": overrides}
    shutil.rmtree(work, ignore_errors=True)  # checkpoints and the export: ~1.5 GB
    return record


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def meets(key: str, value: float, initial: dict) -> str:
    if key == "forward_kl_samples":
        return "yes" if value < initial[key] else "no"
    if key not in TARGETS:
        return "-"
    op, bound = TARGETS[key]
    return "yes" if (value >= bound if op == ">=" else value <= bound) else "no"


def table(records: list[dict], initial: dict) -> str:
    lines = ["# The offline default over seeds (benchmarks/default_seeds.py)", "",
             "`recipes/smollm2_news.yaml` as shipped (170 steps of dense forward KL on the teacher's cached greedy "
             "summaries with a frequency penalty, the 17-layer pruned copy, the student in bfloat16 autocast), or with the overrides a row names, one process on the 2-core CPU machine, changing only "
             "`train.seed`; then `python -m onpolicy_kd.evaluate` on the 12 held-out training-set articles and on 12 "
             "of the 50 other Lee articles. KLs on sampled completions, text metrics on greedy 32-token completions. "
             "Mean ± standard deviation over the seeds; target: the issue's (mean over 3 seeds).", ""]
    variants: dict[tuple, list[dict]] = {}  # records by the overrides they ran with (none: the recipe as shipped)
    for r in records:
        variants.setdefault(tuple(r.get("overrides", [])), []).append(r)
    for name, title in (("heldout", "Held-out articles (train[280:292] of lee_background)"),
                        ("lee", "Another source: 12 of the 50 lee.jsonl articles")):
        lines += [f"## {title}", "", "| student | seeds | " + " | ".join(label for _, label in METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]
        lines.append("| untrained copy | - | " + " | ".join(f"{initial[name][k]:.3f}" for k, _ in METRICS) + " |")
        for overrides, group in variants.items():
            means = {k: statistics.fmean(r["after"][name][k] for r in group) for k, _ in METRICS}
            label = "the recipe as shipped" + "".join(f", `{o}`" for o in overrides)
            lines.append(f"| {label} | {', '.join(str(r['seed']) for r in group)} | "
                         + " | ".join(mean_sd([r["after"][name][k] for r in group]) for k, _ in METRICS) + " |")
            lines.append("| target met (mean) | | "
                         + " | ".join(meets(k, means[k], initial[name]) for k, _ in METRICS) + " |")
        lines.append("")
        for overrides, group in variants.items():
            lines += [f"Per seed{''.join(f', `{o}`' for o in overrides)}: " + "; ".join(
                f"seed {r['seed']}: " + ", ".join(f"{label} {r['after'][name][k]:.3f}" for k, label in METRICS)
                for r in group), ""]
    notes = [f"- seed {r['seed']}{''.join(f', `{o}`' for o in r.get('overrides', []))}: {r['note']}"
             for r in records if r.get("note")]
    if notes:  # what a record's reader should know (added to default_seeds.jsonl by hand, with the reason)
        lines += ["Notes on single runs:", "", *notes, ""]
    lines.append("Training time (one process on the 2 cores; runs the notes above call shared are not the recipe's):")
    lines.append("")
    for overrides, group in variants.items():
        label = "the recipe as shipped" + "".join(f", `{o}`" for o in overrides)
        train_s = [r["train_s"] for r in group]
        timed = [r["wall_s"] for r in group if r.get("wall_s")]
        lines.append(f"- {label}: {statistics.fmean(r['steps'] for r in group):.0f} steps, "
                     f"{statistics.fmean(train_s):.0f} s of training steps on average ({min(train_s):.0f}-{max(train_s):.0f})"
                     + (f"; the whole training command with its held-out evaluations {statistics.fmean(timed) / 60:.1f} min "
                        f"({min(timed) / 60:.1f}-{max(timed) / 60:.1f})" if timed else ""))
    lines += ["", f"Records: benchmarks/results/default_seeds.jsonl ({len(records)} runs, "
              f"{', '.join(sorted({r['date'] for r in records}))}). Command: "
              "`python benchmarks/default_seeds.py --seeds S ...` (`--add-run RUN --seed S` for a run made by hand)."]
    return "\n".join(lines) + "\n"


def publish(results: Path) -> None:
    records = [json.loads(line) for line in open(results / "default_seeds.jsonl")]
    initial_dir = results / "default_seeds_initial"
    initial = {name: json.loads((initial_dir / f"{name}.json").read_text()) for name in ("heldout", "lee")}
    text = table(records, initial)
    (results / "default_seeds.md").write_text(text)
    print(text)


def measure_initial(results: Path) -> None:
    """The untrained student on both sets, measured once (evaluation is seeded: the same for every seed)."""
    folder = results / "default_seeds_initial"
    if (folder / "lee.json").is_file():
        return
    work = Path(tempfile.mkdtemp(prefix="default-initial-"))
    sets = evaluate(work, initial=True)
    folder.mkdir(parents=True, exist_ok=True)
    for name, metrics in sets.items():
        (folder / f"{name}.json").write_text(json.dumps(metrics, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    parser.add_argument("--add-run", type=Path, help="a finished run folder of the recipe to record (with --seed)")
    parser.add_argument("--seed", type=int, help="the seed --add-run was trained with")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for a variant of the default (recorded with each run, a row of its own)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        measure_initial(args.results)
        new = [record_of(args.add_run.resolve(), args.seed, None) | {"overrides": args.set}] if args.add_run else []
        for record in new:
            with open(args.results / "default_seeds.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        for seed in args.seeds:
            print(f"--- seed {seed}", flush=True)
            record = train_one(seed, args.set)
            with open(args.results / "default_seeds.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            publish(args.results)
    publish(args.results)


if __name__ == "__main__":
    main()
