"""What each `objective.mode` does, in one table. The recipe checks, the training loop and the loss read it.

| mode  | completions of a step                                   | loss                 | references needed     | passes per rollout |
|-------|---------------------------------------------------------|----------------------|-----------------------|--------------------|
| sft   | the dataset's references                                | cross-entropy        | always                | 1                  |
| seqkd | teacher samples                                         | cross-entropy        | no                    | 1                  |
| kd    | the dataset's references                                | divergence           | always                | 1                  |
| gkd   | student samples with probability lmbda, else references | divergence           | when lmbda < 1 and    | 1                  |
|       | (teacher samples with seq_kd): the lambda coin          |                      | not seq_kd            |                    |
| pg    | student samples (teacher-mixed with rollout.alpha)      | MiniLLM policy grad. | when lm_coef > 0      | ppo_epochs         |
| hidden| the dataset's references                                | none: the hidden-    | always                | 1                  |
|       |                                                         | state loss alone     |                       |                    |
| distillm2 | student samples and the teacher's text of the same  | skew forward KL on   | no                    | 1                  |
|       | prompts, every step (DistiLLM-2)                        | the teacher's, skew  |                       |                    |
|       |                                                         | reverse KL on the    |                       |                    |
|       |                                                         | student's            |                       |                    |

The lambda coin is a function of (seed, step) only: the same on every process and after a resume.
Penalties and the hidden-state loss are added to every mode's loss (objectives/loss.py).
`forward_plan` says which forward passes a step needs: the teacher runs only when the loss reads it,
and with the memory-bounded head (the default wherever the models allow it) every loss works from the
last hidden states and the two lm_heads, never materialising the (B, T, V) logits: the divergences
directly, the cross-entropy, the PG loss and the penalties through the per-token terms each mode's `terms`
names (objectives/token_terms.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from onpolicy_kd.batch import Source
from onpolicy_kd.objectives.loss import (
    LossFn, cross_entropy_loss, cross_entropy_terms, distillm2_loss, divergence_loss, no_loss, no_terms,
    policy_gradient_step_loss, policy_gradient_terms,
)

if TYPE_CHECKING:  # the recipe sections, for type hints only (the recipe package imports this table)
    from onpolicy_kd.batch import Completions
    from onpolicy_kd.objectives.token_terms import Term
    from onpolicy_kd.recipe import Recipe
    from onpolicy_kd.recipe.schema import ObjectiveConfig


@dataclass(frozen=True)
class Mode:
    completions: Callable[["ObjectiveConfig", bool], Source]  # (objective, lambda coin says on-policy) -> source
    loss: LossFn
    terms: Callable[["Recipe", "Completions"], dict[str, "Term"]]  # the per-token terms of the student's
    #                                                                distribution its loss reads
    samples_student: bool  # its completions can be student samples (so rollout.alpha applies)
    reads_teacher: bool  # its loss reads the teacher's distribution
    divergence: bool  # its loss is the divergence of objective.divergence (its keys apply)
    references: Callable[["ObjectiveConfig"], str | None]  # why it needs reference completions, or None
    passes: Callable[["ObjectiveConfig"], int]  # optimizer steps per rollout
    reads_student: bool = True  # its loss reads the student's next-token distribution (hidden: only hidden states,
    #                             so penalties do not apply and the head gets no gradient)
    with_teacher_text: bool = False  # each step also trains on the teacher's text of the same prompts (distillm2)


def _gkd_completions(obj: "ObjectiveConfig", on_policy: bool) -> Source:
    if on_policy:
        return "student"
    return "teacher" if obj.seq_kd else "references"


def _gkd_references(obj: "ObjectiveConfig") -> str | None:
    if obj.lmbda < 1 and not obj.seq_kd:
        return f"objective.lmbda={obj.lmbda} < 1 uses references on off-policy steps (or set objective.seq_kd=true)"
    return None


def _one_pass(obj: "ObjectiveConfig") -> int:
    return 1


MODES: dict[str, Mode] = {
    "pg": Mode(
        completions=lambda obj, coin: "student", loss=policy_gradient_step_loss, terms=policy_gradient_terms,
        samples_student=True, reads_teacher=True, divergence=False, passes=lambda obj: obj.ppo_epochs,
        references=lambda obj: f"objective.lm_coef={obj.lm_coef} trains on references" if obj.lm_coef > 0 else None,
    ),
    "gkd": Mode(
        completions=_gkd_completions, loss=divergence_loss, terms=no_terms, samples_student=True, reads_teacher=True,
        divergence=True, passes=_one_pass, references=_gkd_references,
    ),
    "kd": Mode(
        completions=lambda obj, coin: "references", loss=divergence_loss, terms=no_terms, samples_student=False,
        reads_teacher=True, divergence=True, passes=_one_pass,
        references=lambda obj: "objective.mode=kd trains on reference completions",
    ),
    "seqkd": Mode(
        completions=lambda obj, coin: "teacher", loss=cross_entropy_loss, terms=cross_entropy_terms,
        samples_student=False, reads_teacher=False, divergence=False, passes=_one_pass, references=lambda obj: None,
    ),
    "sft": Mode(
        completions=lambda obj, coin: "references", loss=cross_entropy_loss, terms=cross_entropy_terms,
        samples_student=False, reads_teacher=False, divergence=False, passes=_one_pass,
        references=lambda obj: "objective.mode=sft trains on reference completions",
    ),
    # DistiLLM-2: skew forward KL on the teacher's text + skew reverse KL on the student's samples, every step
    "distillm2": Mode(
        completions=lambda obj, coin: "student", loss=distillm2_loss, terms=no_terms, samples_student=True,
        reads_teacher=True, divergence=False, passes=_one_pass, references=lambda obj: None, with_teacher_text=True,
    ),
    # block-by-block distillation: match the teacher's hidden states (hidden.weight > 0), no logit loss
    "hidden": Mode(
        completions=lambda obj, coin: "references", loss=no_loss, terms=no_terms, samples_student=False,
        reads_teacher=False, divergence=False, passes=_one_pass, reads_student=False,
        references=lambda obj: "objective.mode=hidden trains on reference completions",
    ),
}


def samples_student(obj: "ObjectiveConfig") -> bool:
    """Whether any step of this objective samples from the student: pg always, gkd unless lmbda = 0 throughout."""
    mode = MODES[obj.mode]
    return mode.samples_student and (mode.completions is not _gkd_completions or obj.lmbda > 0
                                     or obj.lmbda_schedule == "adaptive")


def trains_on_teacher_text(obj: "ObjectiveConfig") -> bool:
    """Whether some step of this objective trains on the teacher's text (teacher_text.* decode it): seqkd always,
    gkd with seq_kd on the steps the lambda coin gives to the teacher (lmbda < 1)."""
    return obj.mode in ("seqkd", "distillm2") or (obj.mode == "gkd" and obj.seq_kd and obj.lmbda < 1)


def reads_only_cached_teacher(recipe: "Recipe") -> bool:
    """Whether every step trains on cached teacher text with its top-k (teacher_text.topk and no student samples),
    so the loss reads the teacher's distribution from the cache alone."""
    return bool(recipe.teacher_text.topk) and not samples_student(recipe.objective)


def steps_run_teacher(recipe: "Recipe", plan: "ForwardPlan") -> bool:
    """Whether some training step runs the teacher: its forward over a step's completions (not over cached text
    whose top-k the cache holds), its decode of teacher text that is not cached, or its decode in lockstep with
    the student's (rollout.alpha > 0). A run whose steps do not (seqkd or sft on cached text, KD from a top-k cache)
    can leave the teacher out of memory while it trains (training/loop.py)."""
    obj = recipe.objective
    return ((plan.teacher and not reads_only_cached_teacher(recipe))
            or (samples_student(obj) and recipe.rollout.alpha > 0)
            or (trains_on_teacher_text(obj) and not recipe.teacher_text.cache))


def micro_batches(recipe: "Recipe") -> int:
    """Backward passes per optimizer step (what accelerate and DeepSpeed accumulate over): train.grad_accum, twice
    that when each micro-batch of prompts also brings the teacher's text of the same prompts (distillm2)."""
    return recipe.train.grad_accum * (2 if MODES[recipe.objective.mode].with_teacher_text else 1)


def lambda_coin(seed: int, step: int, lmbda: float) -> bool:
    """True when this step's completions are on-policy: probability lmbda, a function of (seed, step) only."""
    return random.Random(f"{seed}-{step}").random() < lmbda


def completion_source(recipe: "Recipe", step: int, lmbda: float | None = None) -> Source:
    """Who writes this step's completions: 'student', 'teacher' or 'references'. `lmbda`: the share of student
    samples now, when a schedule moved it from objective.lmbda (training/loop.py: TrainerState.lmbda)."""
    obj = recipe.objective
    return MODES[obj.mode].completions(obj, lambda_coin(recipe.train.seed, step, obj.lmbda if lmbda is None else lmbda))


@dataclass(frozen=True)
class ForwardPlan:
    """Which forward passes over the completions a step runs, and what they return."""

    student_logits: bool  # full (B, T, V) logits; else the last hidden state and head (memory-bounded)
    teacher: bool  # the teacher runs at all
    teacher_logits: bool
    teacher_distribution: bool  # the loss reads the teacher's next-token distribution (not only hidden states)
    hidden_states: bool  # every layer's hidden states of both models (hidden-state distillation)
    head: str  # the head implementation: torch (full logits), chunked, liger (the divergence only)
    prompt: bool = False  # also the outputs predicting the prompt's own tokens (objective.prompt_weight)
    reuse_prompt: bool = False  # rollouts keep the student's prompt keys and values with gradient for the loss
    relation_pairs: tuple[tuple[int, int], ...] = ()  # [student, teacher] layers whose attention relations are read
    relation_heads: int = 0  # ... split into this many relation heads (hidden.loss=attention_relation)

    @property
    def chunked(self) -> bool:
        return not self.student_logits


def forward_plan(recipe: "Recipe", head: str, reuse_prompt: bool = False,
                 relations: tuple[Sequence[tuple[int, int]], int] = ((), 0)) -> ForwardPlan:
    """The forward passes for this recipe, with `head` the backend chosen at set-up (torch, chunked or liger),
    `reuse_prompt` whether the loss continues from the rollout's prompt keys and values (training/loop.py) and
    `relations` the attention-relation layer pairs and heads checked against the models (models/attention.py)."""
    mode = MODES[recipe.objective.mode]
    hidden = recipe.hidden.stitched
    pairs, heads = relations
    chunked = head != "torch"
    reads_teacher = mode.reads_teacher
    if recipe.objective.mode == "pg" and not recipe.objective.single_step and recipe.rollout.alpha > 0:
        reads_teacher = False  # the rewards' log p(y_t) come from the teacher's lockstep decode
    return ForwardPlan(student_logits=not chunked, teacher=reads_teacher or hidden or bool(pairs),
                       teacher_logits=reads_teacher and not chunked, teacher_distribution=reads_teacher,
                       hidden_states=hidden, head=head,
                       prompt=recipe.objective.prompt_weight > 0, reuse_prompt=reuse_prompt,
                       relation_pairs=tuple(tuple(p) for p in pairs), relation_heads=heads)
