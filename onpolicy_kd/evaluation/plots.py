"""Training curves as PNG files (matplotlib, headless), drawn from a run's metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from onpolicy_kd.console import console
from onpolicy_kd.metrics_log import read_metrics

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

# panel title -> metric keys drawn in it (only the keys a run logged are drawn; empty panels are dropped);
# a key ending in "*" stands for every logged key with that prefix
PANELS = {
    "loss terms": ("train/loss", "train/ce", "train/forward_kl", "train/jsd", "train/tv", "train/skew_forward_kl",
                   "train/skew_reverse_kl", "pg/loss", "pg/single_step_kl", "pg/lm_loss", "train/hidden_mse",
                   "train/hidden_cosine", "train/logit_mse"),
    "hidden-state loss per layer pair (student -> teacher)": ("hidden/*",),
    "reverse KL to the teacher (nats/token)": ("train/reverse_kl", "eval/reverse_kl"),
    "greedy held-out text (collapse shows here)": ("eval/greedy/distinct1", "eval/greedy/repetition",
                                                   "eval/greedy/rougeL_teacher"),
    "held-out ROUGE-L vs the human references": ("eval/greedy/rougeL_ref", "eval/sampled/rougeL_ref",
                                                 "eval/teacher/greedy/rougeL_ref"),
    "held-out exact-match accuracy": ("eval/greedy/accuracy", "eval/sampled/accuracy", "eval/teacher/greedy/accuracy"),
    "reward and return (pg)": ("pg/reward", "pg/return"),
    "penalties": ("penalty/frequency", "penalty/diversity", "penalty/entropy"),
    "student entropy (nats/token)": ("train/entropy",),
    "completion length (tokens)": ("rollout/mean_len", "data/mean_len", "eval/sampled/length"),
    "learning rate": ("optim/lr",),
    "gradient norm": ("optim/grad_norm",),
}


def _layer_order(key: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in key.replace("_", " ").split())


def curve_panels(rows: list[dict]) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """(title, {metric: [(step, value), ...]}) for every panel with something logged."""
    logged = sorted({k for r in rows for k in r}, key=_layer_order)
    panels = []
    for title, keys in PANELS.items():
        keys = [k for pattern in keys for k in
                ([k for k in logged if k.startswith(pattern[:-1])] if pattern.endswith("*") else [pattern])]
        series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if series:
            panels.append((title, series))
    return panels


def stage_starts(rows: list[dict]) -> list[tuple[int, str]]:
    """(first step, name) of each stage of a staged run (none for a single-stage run)."""
    starts, seen = [], set()
    for row in rows:
        if "stage" in row and row["stage"] not in seen:
            seen.add(row["stage"])
            starts.append((row["step"], row["stage"]))
    return starts


def training_curves(metrics_file: Path, out_file: Path) -> Path:
    rows, unreadable = read_metrics(metrics_file)
    if unreadable:
        console.print(f"[yellow]note:[/] {metrics_file}: skipped {len(unreadable)} unreadable line(s) "
                      f"{unreadable[:5]} (a run killed mid-write leaves a torn last line)")
    panels = curve_panels(rows)
    if not panels:
        raise ValueError(f"{metrics_file} has no metrics to plot")
    cols = 2
    fig, axes = plt.subplots((len(panels) + 1) // cols, cols, figsize=(11, 3 * ((len(panels) + 1) // cols)), squeeze=False)
    boundaries = stage_starts(rows)
    for ax, (title, series) in zip(axes.flat, panels):
        for step, name in boundaries:
            ax.axvline(step, color="grey", alpha=0.4, linestyle="--")
            ax.annotate(name, (step, 1), xycoords=("data", "axes fraction"), fontsize=6, color="grey", va="top")
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 12 else None, markersize=3, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_file, dpi=110)
    plt.close(fig)
    return out_file
