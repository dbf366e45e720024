"""Reports of a held-out evaluation: the results table (a column per model), the samples table (shared with
training's periodic samples), predictions and metrics files, and the model card's evaluation section."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table
from rich.text import Text

from onpolicy_kd.evaluation.heldout import Evaluated, hidden_keys

SUMMARY_KEYS = ("rouge1_ref", "rouge2_ref", "rougeL_ref", "rouge1_teacher", "rouge2_teacher", "rougeL_teacher",
                "reverse_kl_samples", "forward_kl_samples", "reverse_kl_refs", "forward_kl_refs", "ppl_student",
                "ppl_teacher", "length", "distinct1", "distinct2", "repetition")


def write_outputs(result: Evaluated, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for p in result.predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(result.summary, indent=1))


METRIC_HELP = {
    "rouge1_ref": "ROUGE-1 F vs reference", "rouge2_ref": "ROUGE-2 F vs reference", "rougeL_ref": "ROUGE-L F vs reference",
    "rouge1_teacher": "ROUGE-1 F vs teacher", "rouge2_teacher": "ROUGE-2 F vs teacher", "rougeL_teacher": "ROUGE-L F vs teacher",
    "reverse_kl_samples": "KL(q||p), own samples", "forward_kl_samples": "KL(p||q), own samples",
    "reverse_kl_refs": "KL(q||p), references", "forward_kl_refs": "KL(p||q), references",
    "ppl_student": "perplexity, student", "ppl_teacher": "perplexity, teacher", "length": "length (tokens)",
    "distinct1": "distinct-1", "distinct2": "distinct-2", "repetition": "repetition rate",
}


def results_table(results: list[Evaluated], title: str) -> Table:
    """One row per metric, one column per model (readable at any terminal width)."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for r in results:
        table.add_column(r.name, justify="right", overflow="fold")
    for key in (*SUMMARY_KEYS, *sorted({k for r in results for k in hidden_keys(r.summary)}, key=_pair_order)):
        if any(key in r.summary for r in results):
            table.add_row(metric_help(key), *(f"{r.summary[key]:.3f}" if key in r.summary else "-" for r in results))
    return table


def _pair_order(key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in key.removeprefix("hidden_mse_layer_").split("_to_"))


def metric_help(key: str) -> str:
    if key.startswith("hidden_mse_layer_"):
        s, t = _pair_order(key)
        return f"hidden MSE, layer {s} -> teacher {t}"
    return METRIC_HELP[key]


def samples_table(predictions: list[dict], title: str, count: int = 3) -> Table:
    """Prompts (their end) with the reference (when there is one), the teacher's and the student's completions."""
    columns = [c for c in ("reference", "teacher", "student") if any(p.get(c) for p in predictions[:count])]
    table = Table(title=title, show_lines=True, expand=True)
    for column in ("prompt (end)", *columns):
        table.add_column(column, overflow="fold", ratio=1)
    for p in predictions[:count]:
        table.add_row(Text("..." + p["prompt"][-160:]), *(Text(p.get(c) or "") for c in columns))
    return table


def add_to_model_card(run: Path, result: Evaluated, teacher: Evaluated) -> None:
    card = run / "final" / "README.md"
    if not card.is_file():
        return
    text = card.read_text().split("\n## Evaluation")[0].rstrip() + "\n"
    keys = [k for k in SUMMARY_KEYS if k in result.summary] + sorted(hidden_keys(result.summary), key=_pair_order)
    lines = ["", "## Evaluation (`python -m onpolicy_kd.evaluate`)", "",
             f"{len(result.predictions)} held-out prompts, greedy completions for ROUGE and lengths, sampled ones for KL.", "",
             "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in (result, teacher):
        lines.append(f"| {r.name} | " + " | ".join(f"{r.summary[k]:.3f}" if k in r.summary else "-" for k in keys) + " |")
    card.write_text(text + "\n".join(lines) + "\n")


