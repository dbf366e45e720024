"""Held-out evaluation during training.

`eval/reverse_kl` is the mean per-token KL(student || teacher) over the full vocabulary (temperature 1)
on the student's own sampled completions of the held-out prompts. Sampling uses a generator seeded
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
from onpolicy_kd.losses import per_token_divergence
from onpolicy_kd.rollout import rollout


@torch.no_grad()
def heldout_metrics(recipe: Recipe, accelerator, student, teacher, tokenizer, dataset: Dataset, vocab: int) -> dict[str, float]:
    cfg = recipe.eval
    n = min(cfg.max_samples, len(dataset))
    kl_sum, tokens, lengths = 0.0, 0, []
    for i, start in enumerate(range(0, n, cfg.batch_size)):
        rows = list(range(start, min(start + cfg.batch_size, n)))
        ids, mask = prompt_batch(dataset, rows, tokenizer.pad_token_id, accelerator.device)
        generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + i)
        with for_generation(student, accelerator) as model:
            batch = rollout(model, None, ids, mask, tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens,
                            temperature=recipe.rollout.temperature, generator=generator)
            student_logits, _ = forward_completions(model, batch)
        teacher_logits, _ = forward_completions(teacher, batch)
        kl = per_token_divergence(student_logits[..., :vocab], teacher_logits[..., :vocab], kind="reverse_kl")
        kl_sum += float(kl[batch.completion_mask].sum())
        tokens += int(batch.completion_mask.sum())
        lengths += batch.lengths.tolist()
    result = {"eval/reverse_kl": kl_sum / max(tokens, 1), "eval/mean_len": sum(lengths) / max(len(lengths), 1)}
    if cfg.full:  # the evaluation command's metrics too, on the same prompts (every rank, in lockstep)
        from onpolicy_kd.evaluate import evaluate_student

        with for_generation(student, accelerator) as model:
            full = evaluate_student(recipe, model, teacher, tokenizer, dataset, "student")
        result |= {f"eval/{key}": value for key, value in full.summary.items()}
    return result


@torch.no_grad()
def sample_rows(recipe: Recipe, accelerator, student, teacher, tokenizer, dataset: Dataset) -> list[tuple[str, str, str]]:
    """(prompt, student's greedy completion, teacher's greedy completion) for the first few held-out prompts."""
    rows = list(range(min(recipe.logging.num_samples, len(dataset))))
    ids, mask = prompt_batch(dataset, rows, tokenizer.pad_token_id, accelerator.device)
    kwargs = dict(tokenizer=tokenizer, max_new_tokens=recipe.eval.max_new_tokens, do_sample=False)
    with for_generation(student, accelerator) as model:
        student_out = rollout(model, teacher, ids, mask, alpha=0.0, **kwargs)
        teacher_out = rollout(model, teacher, ids, mask, alpha=1.0, **kwargs)
    return [(dataset[i]["prompt"], s, t) for i, s, t in zip(rows, student_out.texts, teacher_out.texts)]
