"""The loss of one micro-batch: the mode's loss, plus the penalties and the hidden-state loss.

A loss function gets the batch (`Completions`: ids, masks, and how they were sampled), the student's
and the teacher's outputs over its completions (`ModelOutputs`), the recipe's settings and the step's
normalisers (`StepContext`); it never runs a model. Which loss a mode uses is in objectives/modes.py.

The student's outputs are full logits, or (the memory-bounded head) its last hidden state and lm_head
weight. The losses that read only a few numbers per position of the student's distribution (cross-entropy,
PG, penalties) get them from `ModelOutputs.terms`, which `step_loss` fills in one pass of
objectives/token_terms.py from either form; the divergences take either form themselves.

Reduction: every term is summed over valid tokens and divided by a count over the whole optimizer step
(all micro-batches, all processes): `num_tokens` for token terms, `num_sequences` for the diversity
penalty, `lm_tokens` for the language-modelling term, `prompt_tokens` for the divergence on the prompts,
so a step's gradient does not depend on how its samples are split into micro-batches or processes. The PG baseline is likewise the mean return over the
whole step. Metrics are per-token means over this micro-batch's own tokens (the loop weights them by
token counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from onpolicy_kd.batch import Completions, TeacherTopK
from onpolicy_kd.objectives import cross_tokenizer as xt
from onpolicy_kd.objectives import penalties as pen
from onpolicy_kd.objectives import token_terms as tt
from onpolicy_kd.objectives.divergences import (
    chunked_topk_divergence, divergence, gather_logprobs, linear_divergence, log_probs, per_token_divergence,
    reduce_tokens, topk_divergence,
)
from onpolicy_kd.objectives.hidden import hidden_state_loss
from onpolicy_kd.objectives.relations import attention_relation_loss
from onpolicy_kd.objectives.pg import pg_returns, policy_gradient_loss

if TYPE_CHECKING:
    from onpolicy_kd.objectives.modes import Mode
    from onpolicy_kd.recipe import Recipe

Tensor = torch.Tensor


@dataclass
class ModelOutputs:
    """A model's forward pass over a batch's completions: what the losses read."""

    logits: Tensor | None = None  # (B, T, V) predicting each completion token, V the shared vocabulary; None on
    #                               the memory-bounded path
    hidden: Sequence[Tensor] | None = None  # every layer's (B, T, H) states at those positions (last = post-norm)
    head: Tensor | None = None  # the lm_head weight (V, H), for the memory-bounded divergence
    projected: Sequence[Tensor] | None = None  # student only: its paired hidden states through the stitching
    pairs: Sequence[tuple[int, int]] = ()  # student only: the (student, teacher) layer pairs of `projected` or
    #                                        `relations`
    relations: Sequence[Sequence[Tensor]] | None = None  # the paired layers' (query, key, value) projections,
    #                                                      each (B, T, W) at those positions (attention_relation)
    input_embeddings: Tensor | None = None  # student only: (V, H), for the diversity penalty
    lm: "ModelOutputs | None" = None  # student only: its outputs over `lm_batch` (pg's language-modelling term)
    lm_batch: Completions | None = None
    prompt: "ModelOutputs | None" = None  # the same at the (B, P - 1) positions predicting prompt tokens 1..P-1
    #                                       (objective.prompt_weight): logits, or the last hidden state and head
    topk: TeacherTopK | None = None  # teacher only: its distribution as the cache's top-k (teacher_text.topk), no forward
    terms: dict[str, Tensor] = field(default_factory=dict)  # per-token quantities of the model's distribution
    #                                       the losses read, (B, T): the student's filled by step_loss, the
    #                                       teacher's log p(y_t) by teacher_token_logprobs (once per rollout)


@dataclass
class StepContext:
    """Normalisers of one optimizer step (global: all micro-batches and processes) and the head backend."""

    num_tokens: float
    num_sequences: float = 0.0  # sequences with at least two valid tokens (diversity penalty)
    lm_tokens: float = 0.0  # valid reference tokens of the language-modelling term
    prompt_tokens: float = 0.0  # predicted prompt tokens (objective.prompt_weight)
    pg_baseline: float = 0.0  # the mean PG return over the step (0 when pg_baseline is none)
    num_completions: float = 0.0  # the student's sampled completions of the step (the truncation penalty)
    head: str = "torch"  # divergence implementation on the memory-bounded path: chunked or liger
    relation_heads: int = 0  # attention_relation: relation heads the projections are split into
    shared_vocabulary: tuple[Tensor, Tensor] | None = None  # objective.cross_tokenizer: (student ids, teacher ids)


LossFn = Callable[[Completions, ModelOutputs, "ModelOutputs | None", "Recipe", StepContext, dict], Tensor]


def token_scale(batch: Completions, ctx: StepContext) -> float:
    """Turns a value divided by the step's token count into this micro-batch's per-token mean."""
    return ctx.num_tokens / max(batch.num_tokens, 1)


def per_token_mean(value: Tensor, batch: Completions, ctx: StepContext) -> float:
    """A term divided by the step's token count -> this micro-batch's per-token mean."""
    return value.item() * ctx.num_tokens / max(batch.num_tokens, 1)


def cross_entropy_terms(recipe: "Recipe", batch: Completions) -> dict[str, tt.Term]:
    return {"logprob": tt.sampled_logprob(batch.completion_ids)}


def cross_entropy_loss(batch: Completions, student: ModelOutputs, teacher: ModelOutputs | None, recipe: "Recipe",
                       ctx: StepContext, metrics: dict) -> Tensor:
    """sft / seqkd: -log q(y_t) on the references or teacher samples."""
    loss = reduce_tokens(-student.terms["logprob"], batch.completion_mask, ctx.num_tokens)
    metrics["train/ce"] = per_token_mean(loss, batch, ctx)
    return loss


def no_terms(recipe: "Recipe", batch: Completions) -> dict[str, tt.Term]:
    return {}


def no_loss(batch: Completions, student: ModelOutputs, teacher: ModelOutputs | None, recipe: "Recipe",
            ctx: StepContext, metrics: dict) -> Tensor:
    """mode=hidden: no loss on the student's distribution; the hidden-state loss (added by step_loss) is all."""
    return torch.zeros((), device=batch.completion_mask.device)


def _divergence_at(student: ModelOutputs, teacher: ModelOutputs, mask: Tensor, recipe: "Recipe", ctx: StepContext,
                   num_tokens: float, kind: str | None = None) -> Tensor:
    """The recipe's divergence (or `kind`) at the masked positions: from logits, or (memory-bounded) from the last
    hidden states and the two heads."""
    obj = recipe.objective
    settings = dict(kind=kind or obj.divergence, beta=obj.beta, skew=obj.skew, temperature=obj.temperature,
                    num_tokens=num_tokens)
    if teacher.topk is not None:  # the teacher as the cache keeps it: its top-k and one bucket for the rest
        if student.logits is None:
            return chunked_topk_divergence(student.hidden[-1], student.head, teacher.topk, mask,
                                           chunk_size=obj.chunk_size, **settings)
        return topk_divergence(student.logits, teacher.topk, mask, **settings)
    if student.logits is None:
        return linear_divergence(student.hidden[-1], teacher.hidden[-1], student.head, teacher.head, mask,
                                 backend=ctx.head, chunk_size=obj.chunk_size, **settings)
    return divergence(student.logits, teacher.logits, mask, **settings)


def cross_tokenizer_loss(batch: Completions, student: ModelOutputs, teacher: ModelOutputs, recipe: "Recipe",
                         ctx: StepContext, metrics: dict) -> Tensor:
    """kd / gkd across two tokenizers (objective.cross_tokenizer): per row, the student's log-probs over its tokens
    of the completion and the teacher's over its own (`batch.teacher_view`), through the span loss or ULD
    (objectives/cross_tokenizer.py); divided by the step's student tokens."""
    obj, view = recipe.objective, batch.teacher_view
    s_lengths, t_lengths = batch.completion_mask.sum(1).tolist(), view.completion_mask.sum(1).tolist()
    s_lp = [log_probs(student.logits[b, :n]) for b, n in enumerate(s_lengths)]
    t_lp = [log_probs(teacher.logits[b, :n]) for b, n in enumerate(t_lengths)]
    if obj.cross_tokenizer == "uld":
        loss = xt.uld_loss(s_lp, t_lp, num_tokens=ctx.num_tokens)
    else:
        loss, counts = xt.spans_loss(
            s_lp, t_lp, [batch.completion_ids[b, :n] for b, n in enumerate(s_lengths)],
            [view.completion_ids[b, :n] for b, n in enumerate(t_lengths)], batch.spans, ctx.shared_vocabulary,
            kind=obj.divergence, beta=obj.beta, skew=obj.skew, num_tokens=ctx.num_tokens)
        metrics.update(counts)
    metrics[f"train/cross_{obj.cross_tokenizer}"] = per_token_mean(loss, batch, ctx)
    return loss


def divergence_loss(batch: Completions, student: ModelOutputs, teacher: ModelOutputs | None, recipe: "Recipe",
                    ctx: StepContext, metrics: dict) -> Tensor:
    """kd / gkd: the divergence between teacher and student at every completion position."""
    if batch.teacher_view is not None:
        return cross_tokenizer_loss(batch, student, teacher, recipe, ctx, metrics)
    loss = _divergence_at(student, teacher, batch.completion_mask, recipe, ctx, ctx.num_tokens)
    metrics[f"train/{recipe.objective.divergence}"] = per_token_mean(loss, batch, ctx)
    return loss


def distillm2_loss(batch: Completions, student: ModelOutputs, teacher: ModelOutputs | None, recipe: "Recipe",
                   ctx: StepContext, metrics: dict) -> Tensor:
    """distillm2 (DistiLLM-2): the skew forward KL on the teacher's text and the skew reverse KL on the student's
    samples of the same prompts, in one step; summed over both kinds of batch and divided by all their tokens."""
    kind = "skew_forward_kl" if batch.source == "teacher" else "skew_reverse_kl"
    loss = _divergence_at(student, teacher, batch.completion_mask, recipe, ctx, ctx.num_tokens, kind=kind)
    metrics[f"train/{kind}"] = per_token_mean(loss, batch, ctx)
    return loss


def prompt_divergence_loss(batch: Completions, student: ModelOutputs, teacher: ModelOutputs, recipe: "Recipe",
                           ctx: StepContext, metrics: dict) -> Tensor:
    """objective.prompt_weight x the same divergence at the positions predicting the prompt's own tokens: dense
    distillation on the prompt text (language-model healing), which both forward passes read anyway."""
    loss = _divergence_at(student.prompt, teacher.prompt, batch.prompt_target_mask, recipe, ctx, ctx.prompt_tokens)
    metrics[f"train/prompt_{recipe.objective.divergence}"] = (
        loss.item() * ctx.prompt_tokens / max(batch.num_prompt_tokens, 1))
    return recipe.objective.prompt_weight * loss


def teacher_token_logprobs(batch: Completions, teacher: ModelOutputs | None, chunk_size: int = 1024) -> Tensor:
    """log p(y_t) at the sampling temperature: from the teacher's forward (logits, or its last hidden state and
    head chunk by chunk), else from its lockstep decode."""
    if teacher is not None and teacher.logits is not None:
        return gather_logprobs(teacher.logits, batch.completion_ids, batch.temperature).detach()
    if teacher is not None and teacher.head is not None:
        # a chunked pass over the teacher's head: made once per rollout (the step's baseline, then every PPO
        # epoch's loss read it), kept with the teacher's outputs
        if "logprob" not in teacher.terms:
            with torch.no_grad():
                teacher.terms = tt.token_terms(teacher, None, batch.completion_mask,
                                               {"logprob": tt.sampled_logprob(batch.completion_ids, batch.temperature)},
                                               chunk_size)
        return teacher.terms["logprob"]
    if batch.teacher_logprobs is None:
        raise ValueError("the PG rewards need the teacher's log-probs: run the teacher or sample with alpha > 0")
    return batch.teacher_logprobs


def reward_shaping(recipe: "Recipe", batch: Completions, input_embeddings: Tensor | None) -> Tensor | None:
    """The penalties in reward form (pg with penalties.shape_reward), a cost per sampled token."""
    p = recipe.penalties
    if not p.shape_reward:
        return None
    mask = batch.completion_mask
    cost = torch.zeros_like(batch.student_logprobs)
    if p.frequency:
        cost = cost + pen.frequency_shaping(batch.completion_ids, mask, p.frequency)
    if p.diversity:
        cost = cost + pen.diversity_shaping(batch.completion_ids, input_embeddings, mask, p.diversity)
    if p.entropy:
        cost = cost + pen.entropy_shaping(batch.student_entropy, mask, p.entropy, p.entropy_floor)
    return cost


def batch_returns(batch: Completions, teacher: ModelOutputs | None, recipe: "Recipe", input_embeddings: Tensor | None):
    """The PG returns of a batch (constants): the step's baseline is their mean over all its batches."""
    obj = recipe.objective
    return pg_returns(
        batch.student_logprobs, teacher_token_logprobs(batch, teacher, obj.chunk_size), batch.completion_mask,
        sample_logprobs_BT=batch.sample_logprobs if batch.alpha > 0 else None,
        reward_shaping_BT=reward_shaping(recipe, batch, input_embeddings), single_step=obj.single_step,
        discount=obj.discount, length_norm=obj.length_norm, importance=obj.importance, is_clip=obj.is_clip,
    )


def policy_gradient_terms(recipe: "Recipe", batch: Completions) -> dict[str, tt.Term]:
    """log q(y_t) and (single_step) KL(q || p) per position, at the sampling temperature."""
    wanted = {"logprob": tt.sampled_logprob(batch.completion_ids, batch.temperature)}
    if recipe.objective.single_step:
        wanted["single_step_kl"] = tt.reverse_kl_to_teacher(batch.temperature)
    return wanted


def policy_gradient_step_loss(batch: Completions, student: ModelOutputs, teacher: ModelOutputs | None,
                              recipe: "Recipe", ctx: StepContext, metrics: dict) -> Tensor:
    """pg: MiniLLM's policy gradient with teacher log-prob rewards (objectives/pg.py)."""
    obj = recipe.objective
    out = policy_gradient_loss(
        student.terms["logprob"], batch.student_logprobs,
        teacher_token_logprobs(batch, teacher, obj.chunk_size), batch.completion_mask,
        sample_logprobs_BT=batch.sample_logprobs if batch.alpha > 0 else None,
        single_step_kl_BT=student.terms.get("single_step_kl"),
        reward_shaping_BT=reward_shaping(recipe, batch, student.input_embeddings), discount=obj.discount,
        length_norm=obj.length_norm, importance=obj.importance, is_clip=obj.is_clip, ppo_clip=obj.ppo_clip,
        baseline=ctx.pg_baseline, num_tokens=ctx.num_tokens,
    )
    metrics.update(out.metrics)
    scale = token_scale(batch, ctx)
    metrics["pg/loss"] *= scale  # the two loss terms were divided by the step's count
    metrics["pg/single_step_kl"] *= scale
    return out.loss


def penalty_terms(recipe: "Recipe", batch: Completions, input_embeddings: Tensor | None) -> dict[str, tt.Term]:
    """What the penalties in loss form (every mode; pg's `shape_reward` adds the reward form) read of the student's
    distribution."""
    p, wanted = recipe.penalties, {}
    if p.frequency:
        wanted["previous_probability"] = tt.previous_probability(batch.completion_ids, batch.completion_mask)
    if p.diversity:
        wanted["expected_embedding"] = tt.expected_embedding(input_embeddings)
    if p.entropy:
        wanted["entropy"] = tt.entropy()
    if penalises_truncation(recipe, batch):  # the same term as pg's policy log-prob: one pass computes both
        wanted["logprob"] = tt.sampled_logprob(batch.completion_ids, batch.temperature)
    return wanted


def penalises_truncation(recipe: "Recipe", batch: Completions) -> bool:
    """rollout.truncated=penalise applies to the student's sampled completions (not to teacher text or references)."""
    return recipe.rollout.truncated == "penalise" and batch.source == "student" and batch.truncated is not None


def penalty_loss(recipe: "Recipe", batch: Completions, student: ModelOutputs, ctx: StepContext,
                 metrics: dict) -> Tensor:
    """Frequency, diversity and entropy penalties in loss form (objectives/penalties.py)."""
    p, mask, terms = recipe.penalties, batch.completion_mask, student.terms
    total = torch.zeros((), device=mask.device)
    if p.frequency:
        loss, value = pen.frequency_loss(terms["previous_probability"], mask, p.frequency, ctx.num_tokens)
        total, metrics["penalty/frequency"] = total + loss, per_token_mean(value, batch, ctx)
    if p.diversity:  # its logged value is already this batch's own mean over sequences
        loss, value = pen.diversity_loss(terms["expected_embedding"], mask, p.diversity, ctx.num_sequences)
        total, metrics["penalty/diversity"] = total + loss, value.item()
    if p.entropy:
        loss, value = pen.entropy_loss(terms["entropy"], mask, p.entropy, p.entropy_floor, ctx.num_tokens)
        total, metrics["penalty/entropy"] = total + loss, per_token_mean(value, batch, ctx)
    if penalises_truncation(recipe, batch):
        loss = pen.truncation_loss(terms["logprob"], mask, batch.truncated, recipe.rollout.truncation_penalty,
                                   ctx.num_completions)
        total = total + loss
    return total


def step_loss(recipe: "Recipe", mode: "Mode", batch: Completions, student: ModelOutputs,
              teacher: ModelOutputs | None, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
    """(loss to backpropagate, metrics) of one micro-batch: the mode's loss plus every auxiliary term."""
    metrics: dict[str, float] = {}
    penalties = penalty_terms(recipe, batch, student.input_embeddings)
    wanted = {**mode.terms(recipe, batch), **penalties}
    if wanted:  # one pass over the student's distribution for every term (chunk by chunk on the bounded head)
        student.terms = tt.token_terms(student, teacher if "single_step_kl" in wanted else None,
                                       batch.completion_mask, wanted, recipe.objective.chunk_size)
    loss = mode.loss(batch, student, teacher, recipe, ctx, metrics)
    if recipe.objective.prompt_weight:
        loss = loss + prompt_divergence_loss(batch, student, teacher, recipe, ctx, metrics)
    if penalties:  # (the truncation penalty's log-prob term may share its key with pg's)
        loss = loss + penalty_loss(recipe, batch, student, ctx, metrics)
    if student.lm is not None and recipe.objective.lm_coef:
        lm = student.lm_batch
        logprob = tt.token_terms(student.lm, None, lm.completion_mask, cross_entropy_terms(recipe, lm),
                                 recipe.objective.chunk_size)["logprob"]
        lm_loss = reduce_tokens(-logprob, lm.completion_mask, ctx.lm_tokens)
        loss = loss + recipe.objective.lm_coef * lm_loss
        metrics["pg/lm_loss"] = lm_loss.item() * ctx.lm_tokens / max(lm.num_tokens, 1)
    if recipe.hidden.relations or student.projected is not None:
        kind = recipe.hidden.loss
        if recipe.hidden.relations:
            assert student.relations is not None, "the forward plan reads no attention relations (forward_plan)"
            pairs = attention_relation_loss(student.relations, teacher.relations, batch.completion_mask,
                                            heads=ctx.relation_heads, num_tokens=ctx.num_tokens, per_pair=True)
        else:
            pairs = hidden_state_loss(student.projected, [teacher.hidden[t] for _, t in student.pairs],
                                      batch.completion_mask, kind=kind, num_tokens=ctx.num_tokens, per_pair=True)
        loss = loss + recipe.hidden.weight * pairs.mean()
        scale = token_scale(batch, ctx)
        metrics[f"train/hidden_{kind}"] = pairs.mean().item() * scale
        for (s, t), value in zip(student.pairs, pairs.tolist()):
            metrics[f"hidden/{kind}_layer_{s}_to_{t}"] = value * scale
    if student.logits is not None and teacher is not None and teacher.logits is not None and batch.teacher_view is None:
        with torch.no_grad():  # what the student's distribution looks like, whatever the objective
            mask = batch.completion_mask
            metrics["train/reverse_kl"] = reduce_tokens(
                per_token_divergence(student.logits, teacher.logits, kind="reverse_kl"), mask).item()
            metrics["train/entropy"] = reduce_tokens(pen.entropy(student.logits), mask).item()
    return loss, metrics
