"""Reports of a held-out evaluation: the text table (a column per model and decoding, the teacher's beside the
students'), the distribution table (KLs, perplexities, hidden-state MSEs: a column per model), the samples table
(shared with training's periodic samples), predictions and metrics files, and the model card's evaluation section.
Every per-prompt mean is printed with its standard error over the prompts (mean ± s.e.)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.table import Table
from rich.text import Text

from onpolicy_kd.evaluation.heldout import DECODINGS, TEXT_KEYS, Evaluated, hidden_keys

DISTRIBUTION_KEYS = ("reverse_kl_samples", "forward_kl_samples", "cross_loss_samples", "reverse_kl_refs",
                     "forward_kl_refs", "ppl_student", "ppl_teacher")
METRIC_HELP = {
    "rougeL_ref": "ROUGE-L F vs references", "rouge2_ref": "ROUGE-2 F vs references",
    "rougeL_teacher": "ROUGE-L F vs teacher (greedy)", "rougeL_teacher_samples": "ROUGE-L F vs teacher samples (best)",
    "accuracy": "exact-match accuracy", "length": "length (tokens)", "truncated": "cut at max_new_tokens (share)",
    "distinct1": "distinct-1", "distinct2": "distinct-2", "repetition": "repetition rate",
    "reverse_kl_samples": "KL(q||p), own samples", "forward_kl_samples": "KL(p||q), own samples",
    "cross_loss_samples": "cross-tokenizer loss, own samples",
    "reverse_kl_refs": "KL(q||p), references", "forward_kl_refs": "KL(p||q), references",
    "ppl_student": "perplexity, student", "ppl_teacher": "perplexity, teacher",
}


def write_outputs(result: Evaluated, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for p in result.predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    metrics = result.summary | {"standard_error": result.errors, "prompts": len(result.predictions)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))


def text_columns(results: list[Evaluated]) -> list[tuple[str, str, Evaluated]]:
    """(column title, summary key prefix, result): each student greedy and sampled, then the teacher's (the teacher's
    answers are the same for every student: read from the first)."""
    columns = [(f"{r.name}\n{d}", f"{d}/", r) for r in results for d in DECODINGS]
    return columns + [(f"teacher\n{d}", f"teacher/{d}/", results[0]) for d in DECODINGS]


def _cell(result: Evaluated, key: str) -> str:
    if key not in result.summary:
        return "-"
    se = result.errors.get(key, math.nan)
    return f"{result.summary[key]:.3f}" + ("" if math.isnan(se) else f" ± {se:.3f}")


def text_table(results: list[Evaluated], title: str) -> Table:
    """One row per text metric, one column per model and decoding (readable at any terminal width)."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    columns = text_columns(results)
    for name, _, _ in columns:
        table.add_column(name, justify="right", overflow="fold")
    for key in TEXT_KEYS:
        if any(prefix + key in r.summary for _, prefix, r in columns):
            table.add_row(METRIC_HELP[key], *(_cell(r, prefix + key) for _, prefix, r in columns))
    return table


def distribution_keys(results: list[Evaluated]) -> list[str]:
    hidden = sorted({k for r in results for k in hidden_keys(r.summary)}, key=_pair_order)
    return [k for k in (*DISTRIBUTION_KEYS, *hidden) if any(k in r.summary for r in results)]


def distribution_table(results: list[Evaluated], title: str) -> Table:
    """KLs (on the student's own samples, on the references), perplexities and hidden-state MSEs: a column per model."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for r in results:
        table.add_column(r.name, justify="right", overflow="fold")
    for key in distribution_keys(results):
        table.add_row(metric_help(key), *(f"{r.summary[key]:.3f}" if key in r.summary else "-" for r in results))
    return table


def _pair_order(key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in key.removeprefix("hidden_mse_layer_").split("_to_"))


def metric_help(key: str) -> str:
    if key.startswith("hidden_mse_layer_"):
        s, t = _pair_order(key)
        return f"hidden MSE, layer {s} -> teacher {t}"
    return METRIC_HELP[key.rsplit("/", 1)[-1]]


def samples_table(predictions: list[dict], title: str, count: int = 3) -> Table:
    """Prompts (their end) with the reference (when there is one), the teacher's and the student's completions
    (greedy, and the first sampled one when the evaluation drew samples)."""
    rows = [p | {"student (sampled)": (p.get("student_samples") or [""])[0]} for p in predictions[:count]]
    columns = [c for c in ("reference", "teacher", "student", "student (sampled)") if any(r.get(c) for r in rows)]
    table = Table(title=title, show_lines=True, expand=True)
    for column in ("prompt (end)", *columns):
        table.add_column(column, overflow="fold", ratio=1)
    for r in rows:
        table.add_row(Text("..." + r["prompt"][-160:]), *(Text(r.get(c) or "") for c in columns))
    return table


def add_to_model_card(run: Path, result: Evaluated) -> None:
    """The evaluation of a run's student (and its teacher's answers) as the model card's last section."""
    card = run / "final" / "README.md"
    if not card.is_file():
        return
    text = card.read_text().split("\n## Evaluation")[0].rstrip() + "\n"
    columns = text_columns([result])
    lines = ["", "## Evaluation (`python -m onpolicy_kd.evaluate`)", "",
             f"{len(result.predictions)} held-out prompts; mean ± standard error over the prompts; sampled: the mean "
             f"over each prompt's sampled completions.", "",
             "| metric | " + " | ".join(name.replace("\n", ", ") for name, _, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for key in TEXT_KEYS:
        if any(prefix + key in r.summary for _, prefix, r in columns):
            lines.append(f"| {METRIC_HELP[key]} | " + " | ".join(_cell(r, prefix + key) for _, prefix, r in columns) + " |")
    lines += ["", "| metric | student |", "|---|---|"]
    lines += [f"| {metric_help(k)} | {result.summary[k]:.3f} |" for k in distribution_keys([result])]
    card.write_text(text + "\n".join(lines) + "\n")
