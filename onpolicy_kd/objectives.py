"""The loss of one micro-batch in each mode (../shared/ALGORITHMS.md), assembled from the pure losses.

| mode | completions | loss |
|---|---|---|
| sft, seqkd | references / teacher samples | cross-entropy of the student on them |
| kd, gkd | references, or student (teacher with seq_kd) samples | divergence(student, teacher) at every completion position |
| pg | student (alpha-mixed) samples | MiniLLM policy gradient with teacher log-prob rewards |

Penalties (frequency, diversity, entropy) are added in gkd/kd and pg modes; in pg with
`penalties.shape_reward` they also shape the reward. The hidden-state loss (`hidden.weight`,
onpolicy_kd/hidden.py) is added in every mode. Every term is divided by `num_tokens`, the
global valid-token count of the optimizer step.
"""

from __future__ import annotations

import time

import torch

from onpolicy_kd import penalties as pen
from onpolicy_kd.batches import forward_completions
from onpolicy_kd.config import Recipe
from onpolicy_kd.distributed import innermost
from onpolicy_kd.hidden import STITCHING, hidden_state_loss
from onpolicy_kd.losses import (
    divergence, gather_logprobs, linear_divergence, per_token_divergence, reduce_tokens, token_cross_entropy,
)
from onpolicy_kd.pg import policy_gradient_loss
from onpolicy_kd.rollout import Rollout

Tensor = torch.Tensor


def _penalties(recipe: Recipe, logits: Tensor, batch: Rollout, embeddings: Tensor, num_tokens,
               num_sequences) -> tuple[Tensor, dict]:
    """The penalty losses (divided by the global token / sequence counts) and their values for logging."""
    p = recipe.penalties
    total = torch.zeros((), device=logits.device)
    metrics = {}
    mask = batch.completion_mask
    if p.frequency:
        loss, value = pen.frequency_penalty(logits, batch.completion_ids, mask, p.frequency, num_tokens)
        total, metrics["penalty/frequency"] = total + loss, value.item()
    if p.diversity:
        loss, value = pen.diversity_penalty(logits, embeddings, mask, p.diversity, num_sequences)
        total, metrics["penalty/diversity"] = total + loss, value.item()
    if p.entropy:
        loss, value = pen.entropy_penalty(logits, mask, p.entropy, p.entropy_floor, num_tokens)
        total, metrics["penalty/entropy"] = total + loss, value.item()
    return total, metrics


def _reward_shaping(recipe: Recipe, logits: Tensor, batch: Rollout, embeddings: Tensor) -> Tensor | None:
    p = recipe.penalties
    if not p.shape_reward:
        return None
    cost = torch.zeros_like(batch.student_logprobs)
    mask = batch.completion_mask
    if p.frequency:
        cost = cost + pen.frequency_shaping(batch.completion_ids, mask, p.frequency)
    if p.diversity:
        cost = cost + pen.diversity_shaping(batch.completion_ids, embeddings, mask, p.diversity)
    if p.entropy:
        cost = cost + pen.entropy_shaping(logits, mask, p.entropy, p.entropy_floor)
    return cost


def uses_logit_penalties(recipe: Recipe) -> bool:
    return bool(recipe.penalties.frequency or recipe.penalties.diversity or recipe.penalties.entropy)


def micro_batch_loss(
    recipe: Recipe, mode: str, student: torch.nn.Module, teacher: torch.nn.Module, batch: Rollout, *,
    num_tokens: float, vocab: int, backend: str, embeddings: Tensor, lm_batch: Rollout | None = None,
    num_sequences: float | None = None, times: dict[str, float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """(loss to backpropagate, metrics). `backend` is the resolved divergence backend (torch/chunked/liger).

    The teacher's forward time is added to `times["time/teacher_s"]` when `times` is given.
    The loss is divided by `num_tokens` (global; the diversity penalty by `num_sequences`); every metric is a per-token mean over this micro-batch's
    own tokens (`scale` converts), so the loop can weight micro-batches and processes by their token counts.
    """
    obj = recipe.objective
    mask = batch.completion_mask
    scale = num_tokens / max(int(mask.sum()), 1)
    metrics: dict[str, float] = {}
    supervised = mode in ("sft", "seqkd")  # cross-entropy: the teacher only runs for hidden-state distillation
    with_hidden = recipe.hidden.weight > 0
    # the memory-bounded divergence works from the last hidden state and never materialises the logits
    linear = mode in ("kd", "gkd") and backend != "torch" and not uses_logit_penalties(recipe)
    student_logits, student_hidden = forward_completions(student, batch, logits=not linear, hidden=linear or with_hidden)
    teacher_logits = teacher_hidden = None
    if not supervised or with_hidden:
        started = time.perf_counter()
        with torch.no_grad():
            teacher_logits, teacher_hidden = forward_completions(
                teacher, batch, logits=not (linear or supervised), hidden=linear or with_hidden)
        if times is not None:
            times["time/teacher_s"] += time.perf_counter() - started

    if supervised:
        loss = token_cross_entropy(student_logits[..., :vocab], batch.completion_ids, mask, num_tokens)
        metrics["train/ce"] = loss.item() * scale
    elif linear:
        head = lambda m: m.get_output_embeddings().weight  # noqa: E731
        loss = linear_divergence(
            student_hidden[-1], teacher_hidden[-1], head(innermost(student)), head(innermost(teacher)), mask,
            kind=obj.divergence, beta=obj.beta, skew=obj.skew, temperature=obj.temperature, num_tokens=num_tokens,
            backend=backend, chunk_size=obj.chunk_size,
        )
        metrics[f"train/{obj.divergence}"] = loss.item() * scale
    else:
        loss = _logit_loss(recipe, mode, student, student_logits[..., :vocab], teacher_logits[..., :vocab], batch,
                           metrics, num_tokens=num_tokens, scale=scale, vocab=vocab, embeddings=embeddings,
                           lm_batch=lm_batch, num_sequences=num_sequences)
    if with_hidden:
        stitching = getattr(innermost(student), STITCHING)  # called as a module: ZeRO-3 gathers its weights
        kind = recipe.hidden.loss
        pairs = hidden_state_loss(stitching(student_hidden), [teacher_hidden[t] for _, t in stitching.pairs], mask,
                                  kind=kind, num_tokens=num_tokens, per_pair=True)
        loss = loss + recipe.hidden.weight * pairs.mean()
        metrics[f"train/hidden_{kind}"] = pairs.mean().item() * scale
        for (s, t), value in zip(stitching.pairs, pairs.tolist()):
            metrics[f"hidden/{kind}_layer_{s}_to_{t}"] = value * scale
    return loss, metrics


def _logit_loss(recipe: Recipe, mode: str, student: torch.nn.Module, student_logits: Tensor, teacher_logits: Tensor,
                batch: Rollout, metrics: dict[str, float], *, num_tokens: float, scale: float, vocab: int,
                embeddings: Tensor, lm_batch: Rollout | None, num_sequences: float | None) -> Tensor:
    """kd/gkd divergence or the pg loss from full logits, plus the penalties; fills `metrics`.

    `scale` turns a value divided by the global token count into this micro-batch's per-token mean.
    """
    obj = recipe.objective
    mask = batch.completion_mask
    if mode in ("kd", "gkd"):
        loss = divergence(student_logits, teacher_logits, mask, kind=obj.divergence, beta=obj.beta, skew=obj.skew,
                          temperature=obj.temperature, num_tokens=num_tokens)
        metrics[f"train/{obj.divergence}"] = loss.item() * scale
    else:  # pg
        temperature = recipe.rollout.temperature
        logprobs = gather_logprobs(student_logits, batch.completion_ids, temperature)
        # the rewards' log p(y_t): from this teacher forward, which the single-step term needs anyway (the teacher
        # is frozen, so they equal the rollout's values; with alpha = 0 the rollout never ran the teacher)
        teacher_logprobs = gather_logprobs(teacher_logits, batch.completion_ids, temperature).detach()
        single_step = (per_token_divergence(student_logits, teacher_logits, kind="reverse_kl", temperature=temperature)
                       if obj.single_step else None)
        lm_loss = None
        if lm_batch is not None and obj.lm_coef:
            lm_logits, _ = forward_completions(student, lm_batch)
            lm_loss = token_cross_entropy(lm_logits[..., :vocab], lm_batch.completion_ids, lm_batch.completion_mask)
        out = policy_gradient_loss(
            logprobs, batch.student_logprobs, teacher_logprobs, mask,
            sample_logprobs_BT=batch.sample_logprobs if recipe.rollout.alpha > 0 else None,
            single_step_kl_BT=single_step, reward_shaping_BT=_reward_shaping(recipe, student_logits, batch, embeddings),
            discount=obj.discount, length_norm=obj.length_norm, importance=obj.importance, is_clip=obj.is_clip,
            ppo_clip=obj.ppo_clip, lm_loss=lm_loss, lm_coef=obj.lm_coef, baseline=obj.pg_baseline, num_tokens=num_tokens,
        )
        loss = out.loss
        metrics.update(out.metrics)
        metrics["pg/loss"] *= scale  # the two loss terms were divided by the global count
        metrics["pg/single_step_kl"] *= scale

    extra, penalty_metrics = _penalties(recipe, student_logits, batch, embeddings, num_tokens, num_sequences)
    # frequency and entropy values were divided by the global token count; diversity's is already a local mean
    penalty_metrics = {k: v * scale if k != "penalty/diversity" else v for k, v in penalty_metrics.items()}
    metrics.update(penalty_metrics)
    with torch.no_grad():
        per_token_kl = per_token_divergence(student_logits, teacher_logits, kind="reverse_kl")
        metrics["train/reverse_kl"] = reduce_tokens(per_token_kl, mask).item()
        metrics["train/entropy"] = reduce_tokens(pen.entropy(student_logits), mask).item()
    return loss + extra
