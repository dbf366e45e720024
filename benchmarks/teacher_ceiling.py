"""Calibration: how close to the teacher's greedy summary does a *good* summary come on the held-out metrics?

    python benchmarks/teacher_ceiling.py                 # temperatures 0.7 and 1.0, 3 samples per prompt

The student-quality targets compare the student's greedy completions with the teacher's greedy ones (ROUGE-L F).
A student can write a fine summary that uses other words; this measures the teacher against itself: its own
sampled completions (which are as good as the teacher, by construction) scored exactly like a student's, on
the offline default's 12 held-out articles (and on 12 of the other Lee articles, lee.jsonl), 32 new tokens.
Appends a table to benchmarks/results/pipeline.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "smollm2_news.yaml"


def scores(teacher, tokenizer, dataset, temperature: float, samples: int, max_new_tokens: int) -> dict[str, float]:
    """Mean over prompts and samples of ROUGE-L F against the teacher's greedy completion, distinct-1, repetition."""
    import torch

    from onpolicy_kd.data.sampler import prompt_batch
    from onpolicy_kd.evaluation import metrics as M
    from onpolicy_kd.rollout import rollout

    rows = list(range(len(dataset)))
    ids, mask = prompt_batch(dataset, rows, tokenizer.pad_token_id, "cpu")
    greedy = rollout(teacher, None, ids, mask, tokenizer=tokenizer, max_new_tokens=max_new_tokens, do_sample=False)
    values: dict[str, list[float]] = {"rougeL_teacher": [], "distinct1": [], "repetition": []}
    for k in range(samples):
        out = rollout(teacher, None, ids, mask, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                      temperature=temperature, generator=torch.Generator().manual_seed(k))
        for b in range(len(rows)):
            tokens = out.completion_ids[b][out.completion_mask[b]].tolist()
            values["rougeL_teacher"].append(M.rouge(out.texts[b], greedy.texts[b])["rougeL"])
            values["distinct1"].append(M.distinct_n(tokens, 1))
            values["repetition"].append(M.repetition_rate(tokens))
    return {key: statistics.fmean(v) for key, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args()

    import torch

    from onpolicy_kd.data.loading import load_prompt_data
    from onpolicy_kd.models.loading import load_models
    from onpolicy_kd.recipe import load_recipe

    torch.manual_seed(0)
    sets = {"held-out (rows 280-291)": [], "lee.jsonl (12 other articles)": [
        "data.path=${cache:data/news/lee.jsonl}", "data.split=train", "data.eval_split=train[:12]"]}
    lines = [f"\n## The teacher against its own greedy summaries ({time.strftime('%Y-%m-%d')}, "
             f"`python benchmarks/teacher_ceiling.py`)\n",
             "Its sampled completions, scored like a student's greedy ones (mean over prompts and "
             f"{args.samples} samples; 32 new tokens):\n",
             "| prompts | teacher sampled at | ROUGE-L vs teacher greedy | distinct-1 | repetition |", "|---|---|---|---|---|"]
    for name, overrides in sets.items():
        recipe = load_recipe(RECIPE, ["stages=[]", *overrides])
        models = load_models(recipe, str(RECIPE))
        data = load_prompt_data(recipe.data, models.tokenizer, seed=recipe.train.seed)
        dataset = data.eval.select(range(min(recipe.eval.max_samples, len(data.eval))))
        for temperature in args.temperatures:
            s = scores(models.teacher.eval(), models.tokenizer, dataset, temperature, args.samples,
                       recipe.eval.max_new_tokens)
            lines.append(f"| {name} | T = {temperature:g} | {s['rougeL_teacher']:.3f} | {s['distinct1']:.3f} | "
                         f"{s['repetition']:.3f} |")
            print(lines[-1], flush=True)
    with (ROOT / "benchmarks" / "results" / "pipeline.md").open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
