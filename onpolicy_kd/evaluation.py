"""Held-out evaluation during training.

`eval/reverse_kl` is the mean per-token KL(student || teacher) over the full vocabulary (temperature 1)
on the student's own sampled completions of the held-out prompts, drawn at `rollout.temperature` (the
distribution training samples from). Sampling uses a generator seeded
from `eval.seed` for each batch, so successive evaluations see comparable samples and differences
come from the student. Every process runs the same evaluation (the ranks step in lockstep, as
ZeRO-3 needs), so every rank logs the same value.
"""

from __future__ import annotations

import torch
from datasets import Dataset

from onpolicy_kd.batches import forward_completions, prompt_batch
from onpolicy_kd.config import Recipe
from onpolicy_kd.distributed import for_generation
from onpolicy_kd.metrics import token_kls
from onpolicy_kd.rollout import Rollout, rollout

Tensor = torch.Tensor


@torch.no_grad()
def sampled_kls(student, teacher, tokenizer, ids: Tensor, mask: Tensor, *, max_new_tokens: int, temperature: float,
                seed: int, vocab: int) -> tuple[Rollout, Tensor, Tensor]:
    """The student's own seeded samples, and per-token KL(p || q) and KL(q || p) on them over the full vocabulary."""
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    batch = rollout(student, None, ids, mask, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                    temperature=temperature, generator=generator)
    student_logits, _ = forward_completions(student, batch)
    teacher_logits, _ = forward_completions(teacher, batch)
    forward_kl, reverse_kl = token_kls(student_logits[..., :vocab], teacher_logits[..., :vocab])
    return batch, forward_kl, reverse_kl


@torch.no_grad()
def heldout_metrics(recipe: Recipe, accelerator, student, teacher, tokenizer, dataset: Dataset, vocab: int) -> dict[str, float]:
    cfg = recipe.eval
    if cfg.full:  # the evaluation command's metrics, which include the sampled reverse KL (every rank, in lockstep)
        from onpolicy_kd.evaluate import evaluate_student

        with for_generation(student, accelerator) as model:
            full = evaluate_student(recipe, model, teacher, tokenizer, dataset, "student")
        return {"eval/reverse_kl": full.summary["reverse_kl_samples"], "eval/mean_len": full.summary["sampled_length"],
                **{f"eval/{key}": value for key, value in full.summary.items()}}
    n = min(cfg.max_samples, len(dataset))
    kl_sum, tokens, lengths = 0.0, 0, []
    for i, start in enumerate(range(0, n, cfg.batch_size)):
        rows = list(range(start, min(start + cfg.batch_size, n)))
        ids, mask = prompt_batch(dataset, rows, tokenizer.pad_token_id, accelerator.device)
        with for_generation(student, accelerator) as model:
            batch, _, reverse_kl = sampled_kls(model, teacher, tokenizer, ids, mask, max_new_tokens=cfg.max_new_tokens,
                                               temperature=recipe.rollout.temperature, seed=cfg.seed + i, vocab=vocab)
        kl_sum += float(reverse_kl[batch.completion_mask].sum())
        tokens += int(batch.completion_mask.sum())
        lengths += batch.lengths.tolist()
    return {"eval/reverse_kl": kl_sum / max(tokens, 1), "eval/mean_len": sum(lengths) / max(len(lengths), 1)}


@torch.no_grad()
def sample_rows(recipe: Recipe, accelerator, student, teacher, tokenizer, dataset: Dataset) -> list[tuple[str, str, str]]:
    """(prompt, student's greedy completion, teacher's greedy completion) for the first few held-out prompts."""
    rows = list(range(min(recipe.logging.num_samples, len(dataset))))
    ids, mask = prompt_batch(dataset, rows, tokenizer.pad_token_id, accelerator.device)
    kwargs = dict(tokenizer=tokenizer, max_new_tokens=recipe.eval.max_new_tokens, do_sample=False)
    with for_generation(student, accelerator) as model:
        student_out = rollout(model, None, ids, mask, **kwargs)
    teacher_out = rollout(teacher, None, ids, mask, **kwargs)  # the teacher decodes alone
    return [(dataset[i]["prompt"], s, t) for i, s, t in zip(rows, student_out.texts, teacher_out.texts)]
