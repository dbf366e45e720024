"""The held-out evaluation: one batch loop, used by training (at every evaluation point) and by the
`evaluate` command.

On the first `eval.max_samples` held-out prompts, in batches of `eval.batch_size`:
- the student's own completions sampled at `rollout.temperature` with a generator seeded from
  `eval.seed` and the batch index (so successive evaluations see comparable samples, and differences
  come from the student), and on them the per-token KL(q || p) (`eval/reverse_kl`, what on-policy
  reverse-KL distillation minimises) and KL(p || q) over the full vocabulary at temperature 1;
- greedy completions of student and teacher: the student's length, distinct-1/2 and repetition rate, and
  ROUGE-1/2/L against the teacher's completion (and against the reference when the data has one). These
  show a student whose KL falls while its text collapses onto repeats. The teacher, frozen, is decoded once
  per run (`teacher_texts` hands its completions back in);
- with `references` (the `evaluate` command, or `eval.full: true` in training): KL both ways and perplexity
  of both models on the references.
Token-level means are over all tokens of the set; per-completion metrics are means over prompts. Every
process runs the same evaluation (the ranks decode in lockstep, as ZeRO-3 needs), so every rank gets the
same numbers.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from datasets import Dataset

from onpolicy_kd.data.sampler import prompt_batch, reference_batch
from onpolicy_kd.evaluation import metrics as M
from onpolicy_kd.models.distributed import for_generation
from onpolicy_kd.models.forward import forward_completions
from onpolicy_kd.recipe import EvalConfig, Recipe
from onpolicy_kd.rollout import rollout

# the per-prompt metrics averaged into the summary (perplexities are per token instead, below)
PER_PROMPT_KEYS = ("rouge1_ref", "rouge2_ref", "rougeL_ref", "rouge1_teacher", "rouge2_teacher", "rougeL_teacher",
                   "length", "distinct1", "distinct2", "repetition")


@dataclass
class Evaluated:
    name: str
    summary: dict[str, float]  # reverse_kl_samples, forward_kl_samples, sampled_length, greedy text metrics, ...
    predictions: list[dict]  # prompt, reference, teacher, student, per-prompt metrics


class _TokenSums:
    """Sums over valid tokens, for token-level means over the whole set."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, mask: torch.Tensor, **values: torch.Tensor) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value[mask].sum())
        self.sums["n"] = self.sums.get("n", 0.0) + int(mask.sum())

    def mean(self, key: str) -> float:
        return self.sums.get(key, 0.0) / max(self.sums.get("n", 0.0), 1)


def _greedy(model, ids, mask, tokenizer, max_new_tokens: int):
    return rollout(model, None, ids, mask, tokenizer=tokenizer, max_new_tokens=max_new_tokens, do_sample=False)


def _completion_metrics(tokens: list[int], text: str, teacher_text: str, reference: str) -> dict[str, float]:
    out = {"length": len(tokens), "distinct1": M.distinct_n(tokens, 1), "distinct2": M.distinct_n(tokens, 2),
           "repetition": M.repetition_rate(tokens)}
    out |= {f"{k}_teacher": v for k, v in M.rouge(text, teacher_text).items()}
    if reference:
        out |= {f"{k}_ref": v for k, v in M.rouge(text, reference).items()}
    return out


@torch.no_grad()
def evaluate(student, teacher, tokenizer, dataset: Dataset, cfg: EvalConfig, *, temperature: float, references: bool,
             name: str = "student", teacher_texts: list[str] | None = None) -> Evaluated:
    """The held-out evaluation of `student` against `teacher` (plain modules, on the same device)."""
    vocab, device = len(tokenizer), next(student.parameters()).device
    n = min(cfg.max_samples, len(dataset))
    samples, references, predictions, sampled_lengths = _TokenSums(), _TokenSums(), [], []
    for i, start in enumerate(range(0, n, cfg.batch_size)):
        rows = list(range(start, min(start + cfg.batch_size, n)))
        ids, mask = prompt_batch(dataset, rows, tokenizer.pad_token_id, device)
        generator = torch.Generator(device=device).manual_seed(cfg.seed + i)
        sampled = rollout(student, None, ids, mask, tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens,
                          temperature=temperature, generator=generator)
        forward_kl, reverse_kl = M.token_kls(forward_completions(student, sampled, vocab=vocab).logits,
                                             forward_completions(teacher, sampled, vocab=vocab).logits)
        samples.add(sampled.completion_mask, forward_kl=forward_kl, reverse_kl=reverse_kl)
        sampled_lengths += sampled.lengths.tolist()
        greedy_s = _greedy(student, ids, mask, tokenizer, cfg.max_new_tokens)
        teacher_batch = (teacher_texts[start : start + len(rows)] if teacher_texts is not None
                         else _greedy(teacher, ids, mask, tokenizer, cfg.max_new_tokens).texts)
        perplexities: dict[int, dict] = {}
        if references and all(len(dataset[r]["reference_ids"]) > 0 for r in rows):
            ref = reference_batch(dataset, rows, tokenizer.pad_token_id, device)
            s_logits = forward_completions(student, ref, vocab=vocab).logits
            t_logits = forward_completions(teacher, ref, vocab=vocab).logits
            fkl, rkl = M.token_kls(s_logits, t_logits)
            nll_s, nll_t = M.token_nll(s_logits, ref.completion_ids), M.token_nll(t_logits, ref.completion_ids)
            valid = ref.completion_mask
            references.add(valid, forward_kl=fkl, reverse_kl=rkl, nll_student=nll_s, nll_teacher=nll_t)
            perplexities = {b: {"ppl_student": float(nll_s[b][valid[b]].mean().exp()),
                                "ppl_teacher": float(nll_t[b][valid[b]].mean().exp())} for b in range(len(rows))}
        for b, row in enumerate(rows):
            record = dataset[row]
            tokens = greedy_s.completion_ids[b][greedy_s.completion_mask[b]].tolist()
            sample = _completion_metrics(tokens, greedy_s.texts[b], teacher_batch[b], record["reference"])
            predictions.append({"prompt": record["prompt"], "reference": record["reference"],
                                "teacher": teacher_batch[b], "student": greedy_s.texts[b],
                                "metrics": sample | perplexities.get(b, {})})
    summary = {"reverse_kl_samples": samples.mean("reverse_kl"), "forward_kl_samples": samples.mean("forward_kl"),
               "sampled_length": statistics.fmean(sampled_lengths)}
    summary |= {key: statistics.fmean(p["metrics"][key] for p in predictions)
                for key in PER_PROMPT_KEYS if predictions and all(key in p["metrics"] for p in predictions)}
    if references.sums.get("n"):
        summary |= {"reverse_kl_refs": references.mean("reverse_kl"), "forward_kl_refs": references.mean("forward_kl"),
                    "ppl_student": float(torch.tensor(references.mean("nll_student")).exp()),
                    "ppl_teacher": float(torch.tensor(references.mean("nll_teacher")).exp())}
    return Evaluated(name, summary, predictions)


TRAINING_KEYS = ("distinct1", "repetition", "rougeL_teacher")  # always logged: a collapsing text shows in them


def heldout_metrics(recipe: Recipe, accelerator, student, teacher, tokenizer, dataset: Dataset,
                    teacher_texts: list[str] | None = None) -> tuple[dict[str, float], list[str]]:
    """Training's evaluation point: `eval/reverse_kl`, `eval/mean_len` and the greedy text metrics (everything with
    `eval.full`); and the teacher's greedy completions, to hand back in next time."""
    with for_generation(student, accelerator) as model:
        result = evaluate(model, teacher, tokenizer, dataset, recipe.eval, temperature=recipe.rollout.temperature,
                          references=recipe.eval.full, teacher_texts=teacher_texts)
    out = {"eval/reverse_kl": result.summary["reverse_kl_samples"], "eval/mean_len": result.summary["sampled_length"]}
    keys = result.summary if recipe.eval.full else TRAINING_KEYS
    out |= {f"eval/{key}": result.summary[key] for key in keys if key in result.summary}
    return out, [p["teacher"] for p in result.predictions]


@torch.no_grad()
def greedy_samples(recipe: Recipe, accelerator, student, teacher, tokenizer, dataset: Dataset,
                   teacher_texts: list[str] | None = None) -> list[dict]:
    """The first `logging.num_samples` held-out prompts with the student's and the teacher's greedy completions
    (`teacher_texts`: the teacher's, from the last evaluation, which decoded these prompts the same way)."""
    rows = list(range(min(recipe.logging.num_samples, len(dataset))))
    ids, mask = prompt_batch(dataset, rows, tokenizer.pad_token_id, accelerator.device)
    with for_generation(student, accelerator) as model:
        student_out = _greedy(model, ids, mask, tokenizer, recipe.eval.max_new_tokens)
    if teacher_texts is None or len(teacher_texts) < len(rows):
        teacher_texts = _greedy(teacher, ids, mask, tokenizer, recipe.eval.max_new_tokens).texts  # decodes alone
    return [{"prompt": dataset[r]["prompt"], "reference": dataset[r]["reference"], "teacher": t, "student": s}
            for r, s, t in zip(rows, student_out.texts, teacher_texts)]
