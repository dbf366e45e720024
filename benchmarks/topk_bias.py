"""How far the divergence from a top-k teacher cache (teacher_text.topk) is from the divergence over the whole
vocabulary, on held-out positions.

On the news task's 60 held-out articles, the teacher's greedy summaries are read by the teacher and by a student
(teacher-forced); at every position of those summaries this computes the divergence between the two next-token
distributions over the whole vocabulary and over the teacher's top-k tokens plus one bucket for the rest (what
training from the cache computes, objectives/divergences.py: topk_divergence), for k = 20, 50, 100. Bucketing
can only lower a KL: the bias is that gap. Students: the recipe's untrained copy of the teacher, and with
--student a trained one (a run's final/ folder).

    python benchmarks/topk_bias.py [--student outputs/smollm2_news/final]

Writes benchmarks/results/topk_bias.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from onpolicy_kd.batch import Completions, left_pad, right_pad  # noqa: E402
from onpolicy_kd.data.loading import load_prompt_data  # noqa: E402
from onpolicy_kd.evaluation.teacher_answers import recipe_teacher_answers  # noqa: E402
from onpolicy_kd.models.forward import forward_completions  # noqa: E402
from onpolicy_kd.models.loading import load_models  # noqa: E402
from onpolicy_kd.objectives.divergences import TeacherTopK, per_token_divergence, topk_buckets, DIVERGENCES  # noqa: E402
from onpolicy_kd.recipe import load_recipe  # noqa: E402

RECIPE = ROOT / "recipes" / "smollm2_news.yaml"
KS = (20, 50, 100)
KINDS = ("forward_kl", "reverse_kl")


@torch.no_grad()
def position_values(teacher, student, tokenizer, prompts, answers, vocab: int) -> dict[str, torch.Tensor]:
    """Per held-out position: the full divergences, the top-k ones and the teacher's tail mass, as flat tensors."""
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(prompts), 10):
        rows = range(start, min(start + 10, len(prompts)))
        p_ids, p_mask = left_pad([prompts[r]["prompt_ids"] for r in rows], tokenizer.pad_token_id)
        c_ids, c_mask = right_pad([answers[r].ids for r in rows], tokenizer.pad_token_id)
        batch = Completions(p_ids, p_mask, c_ids, c_mask, source="teacher", texts=[""] * len(rows))
        t_logits = forward_completions(teacher, batch, vocab=vocab).logits[c_mask].double()
        s_logits = forward_completions(student, batch, vocab=vocab).logits[c_mask].double()
        t_logprobs, s_logprobs = torch.log_softmax(t_logits, -1), torch.log_softmax(s_logits, -1)
        for kind in KINDS:
            out.setdefault(f"{kind}/full", []).append(per_token_divergence(s_logits, t_logits, kind=kind))
        for k in KS:
            top, ids = t_logprobs.topk(k, -1)
            tail = t_logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)
            buckets = topk_buckets(s_logprobs, TeacherTopK(ids, top, tail))
            out.setdefault(f"tail/{k}", []).append(tail.exp())
            for kind in KINDS:
                out.setdefault(f"{kind}/{k}", []).append(DIVERGENCES[kind](*buckets, 0.5, 0.1))
    return {key: torch.cat(values) for key, values in out.items()}


def mean_se(x: torch.Tensor) -> str:
    return f"{float(x.mean()):.3f} ± {float(x.std() / len(x) ** 0.5):.3f}"


def table(name: str, values: dict[str, torch.Tensor]) -> list[str]:
    lines = [f"### {name} ({len(values['forward_kl/full'])} positions)", "",
             "| k | teacher's mass outside its top-k | " + " | ".join(
                 f"{kind}: top-k | {kind}: full | bias (top-k − full) | relative" for kind in KINDS) + " |",
             "|---|---|" + "---|---|---|---|" * len(KINDS)]
    for k in KS:
        cells = []
        for kind in KINDS:
            full, top = values[f"{kind}/full"], values[f"{kind}/{k}"]
            cells += [mean_se(top), mean_se(full), mean_se(top - full),
                      f"{float((top - full).mean() / full.mean()) * 100:+.1f}%"]
        lines.append(f"| {k} | {mean_se(values[f'tail/{k}'])} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", help="a trained student's folder (a run's final/), besides the untrained copy")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    recipe = load_recipe(RECIPE)
    models = load_models(recipe, str(RECIPE))
    data = load_prompt_data(recipe.data, models.tokenizer, seed=recipe.train.seed)
    answers = recipe_teacher_answers(recipe, models.teacher, models.tokenizer, data.eval)
    vocab = len(models.tokenizer)
    students = [("the untrained copy (student.init: teacher_layers)", models.student)]
    if args.student:
        from transformers import AutoModelForCausalLM

        students.append((f"a trained student ({args.student})", AutoModelForCausalLM.from_pretrained(args.student)))
    lines = ["# Top-k teacher cache: the bucketed divergence against the full one (benchmarks/topk_bias.py)", "",
             f"News task, {len(data.eval)} held-out articles, at every position of the teacher's greedy summary "
             f"(teacher-forced); mean ± standard error over positions. 'top-k': the divergence over the teacher's k "
             f"tokens and one bucket for the rest of the {vocab:,}-token vocabulary, as `teacher_text.topk` trains "
             f"on; 'full': over the whole vocabulary. Command: `python benchmarks/topk_bias.py"
             f"{' --student ' + args.student if args.student else ''}`, {time.strftime('%Y-%m-%d')}, torch "
             f"{torch.__version__}, 2-core CPU.", ""]
    for name, student in students:
        student.eval()
        lines += table(name, position_values(models.teacher, student, models.tokenizer, data.eval,
                                             answers.greedy, vocab))
    lines.append(f"({time.perf_counter() - started:.0f} s)")
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "topk_bias.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
