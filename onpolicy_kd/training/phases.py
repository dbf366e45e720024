"""The phases of one training step, each one call from `train()` (training/loop.py):

    draw_completions  -> one `Completions` batch per micro-batch (references, student or teacher samples)
    teacher_outputs   -> the frozen teacher's forward over each batch, once per rollout (PPO epochs reuse it)
    step_context      -> the step's global normalisers (token and sequence counts) and the PG baseline
    backward_micro_batch -> the student's forward, the loss, `accelerator.backward`
    optimizer_step    -> gradient clipping, the optimizer and schedule step (skipped on a non-finite loss)

Skipping a step with a non-finite loss changes nothing: no parameter, optimizer state or schedule moves, on any
process. A rank whose loss is not finite still runs a backward, of a stand-in loss (collectives in the gradient
hooks must meet the other ranks'), and then every rank skips together. Under DDP the stand-in is zero and
`optimizer_step` does not step. Under DeepSpeed ZeRO the engine steps inside `accelerator.backward`, so the
stand-in is NaN instead: the gradients reduced over the ranks become NaN, DeepSpeed's ZeRO optimizer finds an
invalid gradient norm and discards the step and the gradients (as it does for an fp16 overflow), and
`optimizer_step` checks that it did (`engine.was_step_applied()`).

Seeds: a generation batch's sampling generator is seeded from (train.seed, step, batch index, process), so
a resumed run draws exactly what the interrupted one would have.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from onpolicy_kd.batch import Completions, Source, concatenate
from onpolicy_kd.data.sampler import prompt_batch, reference_batch, stored_batch
from onpolicy_kd.models.distributed import autocast_dtype, for_generation, global_sum, global_sums, steps_inside_backward
from onpolicy_kd.models.forward import embedding_matrix, student_forward, teacher_forward
from onpolicy_kd.objectives.loss import (
    ModelOutputs, StepContext, batch_returns, penalises_truncation, per_token_mean, step_loss,
)
from onpolicy_kd.objectives.penalties import sequences_with_pairs
from onpolicy_kd.rollout import rollout
from onpolicy_kd.rollout.replay import replay_coin

if TYPE_CHECKING:
    from onpolicy_kd.training.loop import Run


class PhaseTimer:
    """Wall-clock seconds per phase of one step (`with timer("rollout"): ...`), as `time/<phase>_s` metrics."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}  # only the phases the step ran (an off-policy step decodes nothing)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def metrics(self) -> dict[str, float]:
        return {f"time/{phase}_s": seconds for phase, seconds in self.seconds.items()}


class MetricSums:
    """Per-token metrics of the micro-batches, each weighted by the token counts of the micro-batches that report
    it (distillm2's two kinds of batch report different divergences), averaged over all processes."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, int] = {}

    def add(self, metrics: dict[str, float], tokens: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * tokens
            self.weights[key] = self.weights.get(key, 0) + tokens

    def global_means(self, accelerator) -> dict[str, float]:
        """One reduction for every key's sum and weight (every rank has the same keys)."""
        keys = sorted(self.sums)
        totals = global_sums(accelerator, [self.sums[k] for k in keys] + [self.weights[k] for k in keys])
        return {key: value / max(weight, 1) for key, value, weight in zip(keys, totals, totals[len(keys):])}


def draw_completions(run: "Run", source: Source, metrics: dict[str, float], timer: PhaseTimer) -> list[Completions]:
    """This step's completions, one batch per micro-batch: the dataset's references, or samples from the student
    (teacher-mixed with rollout.alpha) or from the teacher, generated `rollout.batch_size` prompts at a time, or
    student samples an earlier step drew, from the replay buffer (replay.*; what it did goes into `metrics`).
    Decoding is timed as the `rollout` phase."""
    recipe, acc, pad, step = run.recipe, run.accelerator, run.tokenizer.pad_token_id, run.state.step
    if source == "student" and run.replay is not None:
        reused = reused_completions(run)
        metrics |= {"replay/reused": float(reused is not None), "replay/stored": float(len(run.replay))}
        if reused is not None:
            metrics["replay/age"] = sum(step - s.born for s in reused) / len(reused)
            batches = [stored_batch(run.data.train, reused[i : i + recipe.train.batch_size], pad, acc.device,
                                    temperature=recipe.rollout.temperature, alpha=recipe.rollout.alpha)
                       for i in range(0, len(reused), recipe.train.batch_size)]
            handle_truncated(run, batches, metrics)
            return batches
    rows = [run.sampler.next_batch() for _ in range(recipe.train.grad_accum)]
    batches = completions_of(run, source, rows, timer)
    if source == "student" and run.replay is not None:  # stored whole; a reuse handles cut ones like a fresh step
        for batch in batches:
            run.replay.add(batch.rows, [ids[mask].tolist() for ids, mask in zip(batch.completion_ids,
                                                                                batch.completion_mask)], batch.texts,
                           batch.truncated.tolist(), step)
    if source == "student":
        handle_truncated(run, batches, metrics)
    if run.mode.with_teacher_text:  # distillm2: the teacher's text of the same prompts, in the same step
        batches += completions_of(run, "teacher", rows, timer)
    if run.cross is not None:  # two tokenizers: the student trains on its tokens, the teacher reads its own
        batches = [run.cross.pair(batch, run.data.train) for batch in batches]
    return batches


def completions_of(run: "Run", source: Source, rows: list[list[int]], timer: PhaseTimer) -> list[Completions]:
    """The completions of `source` for each micro-batch's prompt rows."""
    recipe, acc, pad = run.recipe, run.accelerator, run.tokenizer.pad_token_id
    r, step = recipe.rollout, run.state.step
    if source == "references" or (source == "teacher" and recipe.teacher_text.cache):
        return [reference_batch(run.data.train, micro, pad, acc.device, source=source, seed=recipe.train.seed,
                                step=step, topk=run.teacher_topk) for micro in rows]
    flat = [row for micro in rows for row in micro]
    size = r.batch_size or recipe.train.batch_size
    alpha = 1.0 if source == "teacher" else r.alpha
    # the teacher's text decodes by teacher_text.*, the student's samples by rollout.*
    decode = recipe.teacher_text_decoding() if source == "teacher" else recipe.rollout_decoding()
    # the student's samples across two tokenizers: its own tokens of the prompts, its tokenizer, its vocabulary
    own = run.cross is not None and source == "student"
    tokenizer, vocab = (run.cross.student_tokenizer, run.cross.student_vocab) if own else (run.tokenizer, run.vocab)
    generated = []
    with timer("rollout"), for_generation(run.student, acc) as student:
        for index, start in enumerate(range(0, len(flat), size)):
            chunk = flat[start : start + size]
            prompt_ids, prompt_mask = prompt_batch(run.data.train, chunk, tokenizer.pad_token_id, acc.device,
                                                   column="student_prompt_ids" if own else "prompt_ids")
            generator = torch.Generator(device=acc.device).manual_seed(
                recipe.train.seed * 1_000_003 + step * 1009 + index * 31 + acc.process_index)
            generated.append(rollout(
                student, run.teacher if alpha > 0 else None, prompt_ids, prompt_mask, tokenizer=tokenizer,
                alpha=alpha, generator=generator, vocab_size=vocab, source=source, **decode, rows=chunk,
                keep_prompt_graph=run.plan.reuse_prompt, autocast=autocast_dtype(acc)))
    if size != recipe.train.batch_size:  # re-split the generation batches into training micro-batches
        everything, n = concatenate(generated, tokenizer.pad_token_id), recipe.train.batch_size
        generated = [everything.select(range(i * n, (i + 1) * n)) for i in range(len(rows))]
    if recipe.objective.lm_coef:  # pg's language-modelling term reads the same prompts' references
        for batch in generated:
            batch.references = reference_batch(run.data.train, batch.rows, pad, acc.device)
    return generated


def handle_truncated(run: "Run", batches: list[Completions], metrics: dict[str, float]) -> None:
    """Log the share of the step's samples cut at max_new_tokens (over all processes); with rollout.truncated=mask,
    take them out of the loss (penalise: objectives/penalties.py, truncation_loss)."""
    acc = run.accelerator
    cut, samples = global_sums(acc, [sum(int(b.truncated.sum()) for b in batches),
                                     sum(len(b.truncated) for b in batches)])
    metrics["rollout/truncated"] = cut / max(samples, 1)
    if run.recipe.rollout.truncated == "mask":
        for batch in batches:
            batch.completion_mask = batch.completion_mask & ~batch.truncated.unsqueeze(1)


def length_metrics(run: "Run", batches: list[Completions]) -> dict[str, float]:
    """The mean length in tokens of the step's completions, over all processes: `rollout/mean_len` over decoded ones
    (the student's samples, fresh or replayed, or the teacher's text decoded at this step), `data/mean_len` over
    stored text (the data's references, the cached teacher text); each only when the step has such completions."""
    groups = {"rollout/mean_len": [b for b in batches if b.truncated is not None],
              "data/mean_len": [b for b in batches if b.truncated is None]}
    totals = global_sums(run.accelerator, [n for group in groups.values() for n in
                                           (sum(b.num_tokens for b in group), sum(len(b.texts) for b in group))])
    return {key: tokens / rows for key, tokens, rows in zip(groups, totals[0::2], totals[1::2]) if rows}


def on_policy_share(batches: list[Completions]) -> float:
    """The share of the step's completions that are the student's own samples (distillm2: half)."""
    return sum(len(b.texts) for b in batches if b.source == "student") / max(sum(len(b.texts) for b in batches), 1)


def reused_completions(run: "Run") -> list | None:
    """The stored student samples this step trains on instead of drawing new ones (replay.share of the student's
    steps, when the buffer holds a step's worth), or None."""
    recipe, step = run.recipe, run.state.step
    count = recipe.train.batch_size * recipe.train.grad_accum
    if not replay_coin(recipe.train.seed, step, recipe.replay.share) or not run.replay.can_serve(count, step):
        return None
    return run.replay.take(count, step, recipe.train.seed)


def teacher_outputs(run: "Run", batch: Completions) -> ModelOutputs | None:
    """The teacher's forward over a batch's completions, as far as the loss reads it (None: it reads nothing)."""
    plan = run.plan
    if not plan.teacher:
        return None
    if batch.teacher_topk is not None:  # cached teacher text with its top-k: the cache is the teacher's distribution
        return ModelOutputs(topk=batch.teacher_topk)
    if batch.teacher_view is not None:  # two tokenizers: the teacher reads the same text in its own tokens
        return teacher_forward(run.teacher, batch.teacher_view, vocab=run.vocab, logits=True, hidden=False)
    return teacher_forward(run.teacher, batch, vocab=run.vocab, logits=plan.teacher_logits, hidden=plan.hidden_states,
                           prompt=plan.prompt, relation_layers=[t for _, t in plan.relation_pairs],
                           distribution=plan.teacher_distribution)


def student_outputs(run: "Run", batch: Completions) -> ModelOutputs:
    """The student's forward over a micro-batch's completions, with everything its loss reads."""
    plan = run.plan
    return student_forward(run.student, batch, vocab=run.cross.student_vocab if run.cross else run.vocab,
                           logits=plan.student_logits, hidden=plan.hidden_states,
                           lm_batch=batch.references, input_embeddings=bool(run.recipe.penalties.diversity),
                           prompt=plan.prompt, relation_pairs=plan.relation_pairs)


def step_context(run: "Run", batches: list[Completions], teachers: list[ModelOutputs | None]) -> StepContext:
    """The step's normalisers, summed over all micro-batches and processes, and the PG mean baseline."""
    acc, recipe = run.accelerator, run.recipe
    ctx = StepContext(
        num_tokens=global_sum(acc, sum(b.num_tokens for b in batches)),
        num_sequences=global_sum(acc, sum(sequences_with_pairs(b.completion_mask) for b in batches)),
        head=run.plan.head, relation_heads=run.plan.relation_heads,
        shared_vocabulary=run.cross.shared if run.cross is not None else None,
    )
    if run.plan.prompt:
        ctx.prompt_tokens = global_sum(acc, sum(b.num_prompt_tokens for b in batches))
    if recipe.rollout.truncated == "penalise":  # over the student's samples (not distillm2's teacher text)
        ctx.num_completions = global_sum(acc, sum(len(b.truncated) for b in batches if penalises_truncation(recipe, b)))
    if recipe.objective.lm_coef:
        ctx.lm_tokens = global_sum(acc, sum(b.references.num_tokens for b in batches))
    if recipe.objective.mode == "pg" and recipe.objective.pg_baseline == "mean":
        embeddings = embedding_matrix(run.student) if recipe.penalties.diversity else None
        returns = [batch_returns(b, t, recipe, embeddings) for b, t in zip(batches, teachers)]
        ctx.pg_baseline = global_sum(acc, sum(float(r.future.sum()) for r in returns)) / max(ctx.num_tokens, 1)
    return ctx


def backward_micro_batch(run: "Run", batch: Completions, teacher: ModelOutputs | None, ctx: StepContext,
                         sums: MetricSums) -> bool:
    """The student's forward, the loss and its backward for one micro-batch; True when the loss was not finite."""
    acc, plan = run.accelerator, run.plan
    with acc.accumulate(run.student):
        student = student_outputs(run, batch)
        loss, metrics = step_loss(run.recipe, run.mode, batch, student, teacher, ctx)
        bad = not torch.isfinite(loss)
        if bad:  # a stand-in loss, so that every rank's gradient hooks still fire (module docstring: skipping)
            if steps_inside_backward(acc):  # NaN through the step's own graph (ZeRO-3 gathers the weights there)
                loss = loss * float("nan")
            else:  # zero, with no path through the non-finite values (0 * inf would be NaN)
                loss = sum(p.sum() for p in run.student.parameters() if p.requires_grad) * 0.0
        # accelerate / DeepSpeed divide the loss by the micro-batches of a step and DDP averages over processes:
        # undo both, since the loss is already divided by the step's global counts
        acc.backward(loss * (acc.gradient_accumulation_steps * acc.num_processes))
    metrics["train/loss"] = per_token_mean(loss if not bad else torch.zeros(()), batch, ctx)  # skipped: counted apart
    sums.add(metrics, batch.num_tokens)
    return bad


def optimizer_step(run: "Run", bad: bool, metrics: dict[str, float]) -> bool:
    """Clip, step the optimizer and the schedule, zero the gradients; every process skips the step together when
    any had a non-finite loss. Returns whether it was skipped."""
    acc = run.accelerator
    bad = global_sum(acc, int(bad)) > 0
    if bad and steps_inside_backward(acc) and acc.sync_gradients and run.student.was_step_applied():
        raise FloatingPointError("DeepSpeed applied an optimizer step whose gradients were not finite (its ZeRO "
                                 "optimizer should have found the invalid gradient norm and skipped it)")
    if not bad and run.recipe.optim.max_grad_norm:
        norm = acc.clip_grad_norm_(run.student.parameters(), run.recipe.optim.max_grad_norm)
        if norm is not None:
            metrics["optim/grad_norm"] = float(norm)
    if not bad:
        run.optimizer.step()
    run.optimizer.zero_grad()
    if not bad:
        run.scheduler.step()
    return bad
