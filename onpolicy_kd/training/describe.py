"""What one step of a recipe does, in words: the first lines of a run (and metrics.jsonl's description) and
`--dry-run` print it. Prose about the decisions objectives/modes.py makes, kept apart from them (the mode table
and the forward plan are the decisions; this only reads them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onpolicy_kd.objectives.modes import MODES, ForwardPlan, forward_plan, reads_only_cached_teacher, samples_student

if TYPE_CHECKING:
    from onpolicy_kd.recipe import Recipe


DIVERGENCE_NAMES = {"forward_kl": "forward KL(p‖q)", "reverse_kl": "reverse KL(q‖p)", "jsd": "generalized JSD",
                    "tv": "total variation", "skew_forward_kl": "skew forward KL", "skew_reverse_kl": "skew reverse KL",
                    "logit_mse": "centred-logit MSE"}


def describe_step(recipe: "Recipe", plan: ForwardPlan | None = None, processes: int = 1) -> str:
    """One step of this recipe in words, printed when a run starts (and written to metrics.jsonl) and by
    `--dry-run`: where the completions come from, which forward passes run, the loss and the terms added to it.
    `plan`: the run's forward plan (None before the head is chosen: the head is then not named)."""
    obj, cfg = recipe.objective, recipe.train
    plan = plan or forward_plan(recipe, head="")
    prompts = cfg.batch_size * cfg.grad_accum * processes
    teacher_text = _teacher_text_words(recipe)
    student = _student_sample_words(recipe)
    if obj.mode == "gkd":
        off_policy = teacher_text if obj.seq_kd else "the data's reference completions"
        if obj.lmbda_schedule == "adaptive":
            text = (f"the student's own {student} on a share of the steps (starting at {obj.lmbda:g}, raised by "
                    f"{obj.lmbda_step:g} after each evaluation whose held-out KL rose), else {off_policy}")
        elif obj.lmbda >= 1:
            text = f"the student's own {student}"
        elif obj.lmbda <= 0:
            text = off_policy
        else:
            text = f"with probability {obj.lmbda:g} the student's own {student}, else {off_policy}"
    elif obj.mode == "pg":
        text = f"the student's own {student}"
    elif obj.mode == "distillm2":
        text = f"the student's own {student} and {teacher_text} of the same prompts"
    elif obj.mode == "seqkd":
        text = teacher_text
    else:
        text = "the data's reference completions"
    if samples_student(obj) and recipe.replay.size:
        text += (f" (a student-sample step reuses stored samples with probability {recipe.replay.share:g}: "
                 f"replay.size {recipe.replay.size}, each reused up to {recipe.replay.reuse}x)")
    parts = [f"{prompts} prompts: {text}"]
    if plan.teacher and reads_only_cached_teacher(recipe):
        parts.append(f"the teacher's top-{recipe.teacher_text.topk} log-probabilities from the cache (no teacher "
                     f"forward)")
    elif plan.teacher and obj.cross_tokenizer:
        parts.append("the teacher's forward over the same text in its own tokens")
    elif plan.teacher:
        parts.append("the teacher's forward over them" + (
            f" (over its own text, its top-{recipe.teacher_text.topk} from the cache)" if recipe.teacher_text.topk
            else ""))
    elif obj.mode == "pg" and MODES["pg"].reads_teacher:
        parts.append("the teacher's log-probabilities from its decode in lockstep with the student's")
    parts.append(_loss_words(recipe, plan))
    passes = MODES[obj.mode].passes(obj)
    parts.append(f"{passes} optimizer steps over the rollout (PPO)" if passes > 1 else "one optimizer step")
    return "each step: " + "; ".join(parts)


def _sampling_words(section) -> str:
    """'temperature 0.7, top-p 0.9, top-k 50' of a section with sampling keys (rollout, teacher_text)."""
    return (f"temperature {section.temperature:g}" + (f", top-p {section.top_p:g}" if section.top_p < 1 else "")
            + (f", top-k {section.top_k}" if section.top_k else ""))


def _teacher_text_words(recipe: "Recipe") -> str:
    t, decode = recipe.teacher_text, recipe.teacher_text_decoding()
    how = f"sampled ({_sampling_words(t)})" if t.do_sample else "greedy"
    many = f", one of {t.samples_per_prompt} per prompt" if t.samples_per_prompt > 1 else ""
    where = "cached" if t.cache else "decoded at each step"
    return f"the teacher's {how} text ({where}{many}, at most {decode['max_new_tokens']} tokens)"


def _student_sample_words(recipe: "Recipe") -> str:
    r = recipe.rollout
    how = f"samples ({_sampling_words(r)})" if r.do_sample else "greedy completions"
    how += f" of at most {r.max_new_tokens} tokens"
    if r.alpha > 0:
        how += f", mixed token by token with the teacher's (alpha {r.alpha:g})"
    if r.truncated != "keep":
        how += (", those cut at max_new_tokens masked out" if r.truncated == "mask"
                else f", those cut at max_new_tokens penalised ({r.truncation_penalty:g})")
    return how


def _loss_words(recipe: "Recipe", plan: ForwardPlan) -> str:
    obj, pen = recipe.objective, recipe.penalties
    divergence = DIVERGENCE_NAMES[obj.divergence]
    if obj.divergence == "jsd":
        divergence += f" (beta {obj.beta:g})"
    elif obj.divergence.startswith("skew"):
        divergence += f" (skew {obj.skew:g})"
    at = f"{divergence} at every completion position"
    if obj.cross_tokenizer == "spans":
        at = (f"across the two tokenizers: {divergence} over the shared tokens where a span is one token on both "
              f"sides, the span probability's KL where they split it differently")
    elif obj.cross_tokenizer == "uld":
        at = "across the two tokenizers: ULD's sorted-probability distance, position by position"
    loss = {
        "gkd": at,
        "kd": at,
        "pg": "MiniLLM's policy gradient on the teacher's log-probabilities as rewards"
              + (" with its exact single-step reverse-KL term" if obj.single_step else ""),
        "seqkd": "cross-entropy on the teacher's tokens",
        "sft": "cross-entropy on the reference tokens",
        "distillm2": f"skew forward KL (skew {obj.skew:g}) on the teacher's text plus skew reverse KL on the student's "
                     f"samples",
        "hidden": "no next-token loss",
    }[obj.mode]
    if obj.temperature != 1 and MODES[obj.mode].divergence:
        loss += f" at temperature {obj.temperature:g}"
    added = [f"{name} penalty {weight:g}" for name, weight in
             (("frequency", pen.frequency), ("diversity", pen.diversity), ("entropy", pen.entropy)) if weight]
    if recipe.hidden.stitched:
        added.append(f"hidden-state {recipe.hidden.loss} {recipe.hidden.weight:g}")
    elif recipe.hidden.relations:  # (the pairs and heads are known once the models are: plan.relation_pairs)
        added.append(f"attention relations {recipe.hidden.weight:g}" + (
            f" (layer pairs {[list(p) for p in plan.relation_pairs]}, {plan.relation_heads} relation head{'s' * (plan.relation_heads != 1)})"
            if plan.relation_pairs else ""))
    if obj.lm_coef:
        added.append(f"language modelling on references {obj.lm_coef:g}")
    if obj.prompt_weight:
        added.append(f"the prompt's positions {obj.prompt_weight:g}")
    head = {"torch": " (full logits)", "chunked": " (memory-bounded head)", "liger": " (Liger-Kernel)"}.get(plan.head, "")
    return f"loss: {loss}" + (" + " + " + ".join(added) if added else "") + head
