"""Evaluate a distilled student against its teacher on the held-out prompts, in numbers and pictures.

    python -m onpolicy_kd.evaluate outputs/smollm2_news                  # a trained run (its final/ student)
    python -m onpolicy_kd.evaluate recipes/smollm2_news.yaml             # the recipe's initial student
    python -m onpolicy_kd.evaluate --compare outputs/a outputs/b recipes/smollm2_news.yaml   # one table
    (also `onpolicy-kd evaluate ...`; `section.key=value` overrides apply to the recipe, e.g. eval.max_samples=50)

Per held-out prompt (the first `eval.max_samples` of the recipe's eval split):
- greedy completions of student and teacher (`eval.max_new_tokens`); ROUGE-1/2/L of the student against
  the reference (when the data has one) and against the teacher's completion;
- token-level forward KL(p || q) and reverse KL(q || p) on the student's own sampled completions
  (at `rollout.temperature`, seeded by `eval.seed`, as training's `eval/reverse_kl`) and on the references; perplexity of student and teacher on
  the references;
- length, distinct-1/2 and repetition rate of the student's greedy completion.
Writes `<out>/predictions.jsonl` (prompt, reference, teacher, student, per-sample metrics),
`<out>/metrics.json`, and for a run `<run>/plots/training_curves.png` from its metrics.jsonl; adds
the evaluation to the run's model card. Token-level means are over all tokens of the set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from rich.table import Table

from onpolicy_kd import metrics as M
from onpolicy_kd.batches import forward_completions, prompt_batch, reference_rollout
from onpolicy_kd.config import Recipe, load_recipe
from onpolicy_kd.console import console, print_error
from onpolicy_kd.data import load_prompt_data
from onpolicy_kd.errors import UserError
from onpolicy_kd.evaluation import sampled_kls
from onpolicy_kd.models import load_model, load_models
from onpolicy_kd.rollout import rollout

SUMMARY_KEYS = ("rouge1_ref", "rouge2_ref", "rougeL_ref", "rouge1_teacher", "rouge2_teacher", "rougeL_teacher",
                "reverse_kl_samples", "forward_kl_samples", "reverse_kl_refs", "forward_kl_refs", "ppl_student",
                "ppl_teacher", "length", "distinct1", "distinct2", "repetition")


@dataclass
class Evaluated:
    name: str
    summary: dict[str, float]
    predictions: list[dict]


def resolve_target(target: str, overrides: Sequence[str]) -> tuple[Recipe, str, Path | None]:
    """(recipe, its path, the run folder or None) for a run folder or a recipe file."""
    path = Path(target)
    if path.is_dir():
        recipe_file = path / "final" / "recipe.yaml"
        if not recipe_file.is_file():
            raise UserError(f"{path} is not a finished run (no final/recipe.yaml); give a run's output_dir or a recipe")
        return load_recipe(recipe_file, overrides), str(recipe_file), path
    return load_recipe(path, overrides), str(path), None


@torch.no_grad()
def evaluate_student(recipe: Recipe, student, teacher, tokenizer, dataset, name: str) -> Evaluated:
    cfg, vocab = recipe.eval, len(tokenizer)
    device = next(student.parameters()).device
    n = min(cfg.max_samples, len(dataset))
    predictions: list[dict] = []
    sums = dict.fromkeys(("fkl_s", "rkl_s", "n_s", "fkl_r", "rkl_r", "nll_s", "nll_t", "n_r"), 0.0)
    sampled_lengths: list[int] = []
    for i, start in enumerate(range(0, n, cfg.batch_size)):
        rows = list(range(start, min(start + cfg.batch_size, n)))
        ids, mask = prompt_batch(dataset, rows, tokenizer.pad_token_id, device)
        common = dict(tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens)
        greedy_s = rollout(student, None, ids, mask, do_sample=False, **common)
        greedy_t = rollout(teacher, None, ids, mask, do_sample=False, **common)
        sampled, fkl, rkl = sampled_kls(student, teacher, tokenizer, ids, mask, max_new_tokens=cfg.max_new_tokens,
                                        temperature=recipe.rollout.temperature, seed=cfg.seed + i, vocab=vocab)
        valid = sampled.completion_mask
        sums["fkl_s"] += float(fkl[valid].sum())
        sums["rkl_s"] += float(rkl[valid].sum())
        sums["n_s"] += int(valid.sum())
        sampled_lengths += sampled.lengths.tolist()
        refs = [len(dataset[r]["reference_ids"]) > 0 for r in rows]
        per_ref: dict[int, dict] = {}
        if all(refs):
            ref = reference_rollout(dataset, rows, tokenizer.pad_token_id, device)
            s_logits, _ = forward_completions(student, ref)
            t_logits, _ = forward_completions(teacher, ref)
            fkl, rkl = M.token_kls(s_logits[..., :vocab], t_logits[..., :vocab])
            nll_s = M.token_nll(s_logits[..., :vocab], ref.completion_ids)
            nll_t = M.token_nll(t_logits[..., :vocab], ref.completion_ids)
            valid = ref.completion_mask
            for key, value in (("fkl_r", fkl), ("rkl_r", rkl), ("nll_s", nll_s), ("nll_t", nll_t)):
                sums[key] += float(value[valid].sum())
            sums["n_r"] += int(valid.sum())
            for b in range(len(rows)):
                per_ref[b] = {"ppl_student": float(nll_s[b][valid[b]].mean().exp()),
                              "ppl_teacher": float(nll_t[b][valid[b]].mean().exp())}
        for b, row in enumerate(rows):
            tokens = greedy_s.completion_ids[b][greedy_s.completion_mask[b]].tolist()
            record = dataset[row]
            sample = {"length": len(tokens), "distinct1": M.distinct_n(tokens, 1), "distinct2": M.distinct_n(tokens, 2),
                      "repetition": M.repetition_rate(tokens), **per_ref.get(b, {})}
            sample |= {f"{k}_teacher": v for k, v in M.rouge(greedy_s.texts[b], greedy_t.texts[b]).items()}
            if record["reference"]:
                sample |= {f"{k}_ref": v for k, v in M.rouge(greedy_s.texts[b], record["reference"]).items()}
            predictions.append({"prompt": record["prompt"], "reference": record["reference"], "teacher": greedy_t.texts[b],
                                "student": greedy_s.texts[b], "metrics": sample})
    summary = {key: statistics.fmean(p["metrics"][key] for p in predictions)
               for key in SUMMARY_KEYS if all(key in p["metrics"] for p in predictions) and not key.startswith("ppl")}
    summary |= {"reverse_kl_samples": sums["rkl_s"] / max(sums["n_s"], 1), "forward_kl_samples": sums["fkl_s"] / max(sums["n_s"], 1),
                "sampled_length": statistics.fmean(sampled_lengths)}
    if sums["n_r"]:
        summary |= {"reverse_kl_refs": sums["rkl_r"] / sums["n_r"], "forward_kl_refs": sums["fkl_r"] / sums["n_r"],
                    "ppl_student": float(torch.tensor(sums["nll_s"] / sums["n_r"]).exp()),
                    "ppl_teacher": float(torch.tensor(sums["nll_t"] / sums["n_r"]).exp())}
    return Evaluated(name, summary, predictions)


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
    for key in SUMMARY_KEYS:
        if any(key in r.summary for r in results):
            table.add_row(METRIC_HELP[key], *(f"{r.summary[key]:.3f}" if key in r.summary else "-" for r in results))
    return table


def samples_table(result: Evaluated, count: int = 3) -> Table:
    table = Table(title=f"samples ({result.name})", show_lines=True, expand=True)
    for column in ("prompt (end)", "reference", "teacher", "student"):
        table.add_column(column, overflow="fold", ratio=1)
    for p in result.predictions[:count]:
        table.add_row("..." + p["prompt"][-160:], p["reference"], p["teacher"], p["student"])
    return table


def add_to_model_card(run: Path, result: Evaluated, teacher: Evaluated) -> None:
    card = run / "final" / "README.md"
    if not card.is_file():
        return
    text = card.read_text().split("\n## Evaluation")[0].rstrip() + "\n"
    keys = [k for k in SUMMARY_KEYS if k in result.summary]
    lines = ["", "## Evaluation (`python -m onpolicy_kd.evaluate`)", "",
             f"{len(result.predictions)} held-out prompts, greedy completions for ROUGE and lengths, sampled ones for KL.", "",
             "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in (result, teacher):
        lines.append(f"| {r.name} | " + " | ".join(f"{r.summary[k]:.3f}" if k in r.summary else "-" for k in keys) + " |")
    card.write_text(text + "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onpolicy-kd evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="+", help="run folders and/or recipe files, then section.key=value overrides")
    parser.add_argument("--compare", action="store_true", help="evaluate every target on the first one's prompts")
    parser.add_argument("--out", default=None, help="where to write predictions and metrics (default: <run>/eval)")
    args = parser.parse_args(argv)
    overrides = [t for t in args.targets if "=" in t]
    targets = [t for t in args.targets if "=" not in t]
    try:
        if len(targets) > 1 and not args.compare:
            raise UserError("several targets: add --compare to evaluate them side by side")
        recipe, recipe_path, run = resolve_target(targets[0], overrides)
        models = load_models(recipe, recipe_path)  # the teacher, and the recipe's initial student
        data = load_prompt_data(recipe.data, models.tokenizer, seed=recipe.train.seed)
        results = []
        for target in targets:
            _, _, target_run = resolve_target(target, overrides)
            student = load_model(str(target_run / "final"), "student") if target_run else models.student
            name = target_run.name if target_run else f"{Path(target).stem} (initial)"
            results.append(evaluate_student(recipe, student.eval(), models.teacher, models.tokenizer, data.eval, name))
        teacher = evaluate_student(recipe, models.teacher, models.teacher, models.tokenizer, data.eval, "teacher (reference)")
        out = Path(args.out) if args.out else (run / "eval" if run else Path(recipe.train.output_dir) / "eval_initial")
        for r in results:
            write_outputs(r, out if len(results) == 1 else out / r.name.split(" ")[0])
        console.print(samples_table(results[0]))
        console.print(results_table([*results, teacher], f"held-out evaluation ({len(results[0].predictions)} prompts)"))
        if run is not None and (run / "metrics.jsonl").is_file():
            from onpolicy_kd.plots import training_curves

            console.print(f"plot: {training_curves(run / 'metrics.jsonl', run / 'plots' / 'training_curves.png')}")
            add_to_model_card(run, results[0], teacher)
        console.print(f"predictions and metrics: {out}")
        return 0
    except UserError as err:
        print_error(err)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
