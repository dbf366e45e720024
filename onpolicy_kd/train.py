"""Entry point: `accelerate launch -m onpolicy_kd.train RECIPE.yaml [section.key=value ...] [--dry-run]`.

Also `python -m onpolicy_kd.train ...` and `onpolicy-kd train ...`. A user mistake (bad recipe,
missing model or data, mismatched vocabularies) prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rich.syntax import Syntax

from onpolicy_kd.batches import PromptSampler, has_references, prompt_batch, reference_rollout
from onpolicy_kd.checkpoint import export_final, load_checkpoint, model_card, resolve_resume, save_checkpoint
from onpolicy_kd.config import Recipe, load_recipe, recipe_to_yaml
from onpolicy_kd.console import console, is_main_process, print_error, summary_table
from onpolicy_kd.data import length_stats, load_prompt_data
from onpolicy_kd.distributed import for_generation, global_sum, make_accelerator, prepare_teacher, zero_stage
from onpolicy_kd.errors import DataError, UserError
from onpolicy_kd.evaluation import heldout_metrics, sample_rows
from onpolicy_kd.hidden import STITCHING, attach_stitching
from onpolicy_kd.losses import select_backend
from onpolicy_kd.models import Models, count_parameters, load_models, logits_are_linear
from onpolicy_kd.monitor import Monitor
from onpolicy_kd.objectives import micro_batch_loss
from onpolicy_kd.optim import build_optimizer, build_scheduler
from onpolicy_kd.penalties import sequences_with_pairs
from onpolicy_kd.rollout import Rollout, rollout


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="onpolicy-kd train",
        description="On-policy knowledge distillation of a causal LM, driven by a YAML recipe.",
        epilog="Overrides: section.key=value, e.g. train.max_steps=10 objective.divergence=jsd objective.beta=0.5",
    )
    parser.add_argument("recipe", help="the YAML recipe, e.g. recipes/smollm2_news.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (win over the file and environment)")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="validate, load models and data, print the resolved recipe and a summary, then exit",
    )
    return parser.parse_args(argv)


def _model_row(source: str, model: object, tokenizer: object) -> dict[str, object]:
    config = model.config  # type: ignore[attr-defined]
    return {
        "source": source if len(source) < 40 else "..." + source[-37:],
        "architecture": type(model).__name__,
        "parameters": count_parameters(model),  # type: ignore[arg-type]
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab (tokenizer / rows)": f"{len(tokenizer)} / {model.get_input_embeddings().num_embeddings}",  # type: ignore
        "dtype": str(model.dtype).removeprefix("torch."),  # type: ignore[attr-defined]
    }


def dry_run(recipe: Recipe, recipe_path: str) -> int:
    started = time.perf_counter()
    models: Models = load_models(recipe, recipe_path)
    data = load_prompt_data(recipe.data, models.tokenizer, seed=recipe.train.seed)
    if not is_main_process():
        return 0
    console.rule(f"resolved recipe: {recipe_path}")
    console.print(Syntax(recipe_to_yaml(recipe), "yaml", theme="ansi_dark", background_color="default"))
    student_source = (
        f"teacher layers {recipe.student.keep_layers or f'every {recipe.student.layer_stride}'}"
        if recipe.student.init == "teacher_layers" else f"{recipe.student.init}: {recipe.student.name_or_path or 'teacher config'}"
    )
    console.print(summary_table(
        [("teacher", _model_row(recipe.teacher.name_or_path, models.teacher, models.tokenizer)),
         ("student", _model_row(student_source, models.student, models.tokenizer))],
        title="models",
    ))
    rows = []
    for name, split in (("train", data.train), ("eval", data.eval)):
        stats = length_stats(split)
        rows.append((name, {
            "rows": stats["rows"], "prompt tokens min/mean/max": f"{stats['min']} / {stats['mean']} / {stats['max']}",
            "truncated": stats["truncated"], "with reference": sum(1 for r in split["reference"] if r),
            "cache": "hit" if data.cache_hits[name] else "written",
        }))
    if recipe.hidden.weight:  # attached after the model table, which counts the student's own parameters
        stitching = attach_stitching(models.student, models.teacher, recipe.hidden)
        console.print(f"hidden-state distillation ({recipe.hidden.loss}, weight {recipe.hidden.weight}): "
                      f"[student, teacher] layer pairs {[list(p) for p in stitching.pairs]}, "
                      f"{count_parameters(stitching):,} stitching parameters")
    console.print(summary_table(rows, title=f"data: {recipe.data.path} (format {data.task.name}, columns {data.task.columns})"))
    console.rule("first eval prompt, as the student sees it")
    console.print(data.eval[0]["prompt"], markup=False)
    console.print(f"[green]dry run OK[/] in {time.perf_counter() - started:.1f} s: recipe valid, models and data load")
    return 0


def needs_references(recipe: Recipe) -> str | None:
    """Why this recipe needs reference completions in the data (None if it does not)."""
    obj = recipe.objective
    if obj.mode in ("sft", "kd"):
        return f"objective.mode={obj.mode} trains on reference completions"
    if obj.mode == "gkd" and obj.lmbda < 1 and not obj.seq_kd:
        return f"objective.lmbda={obj.lmbda} < 1 uses references on off-policy steps (or set objective.seq_kd=true)"
    if obj.mode == "pg" and obj.lm_coef > 0:
        return f"objective.lm_coef={obj.lm_coef} trains on references"
    return None


def step_mode(recipe: Recipe, step: int) -> str:
    """What the completions of this step are: 'student' samples, 'teacher' samples or 'references'.

    The GKD lambda coin is a function of (seed, step): the same on every process and after a resume.
    """
    mode, obj = recipe.objective.mode, recipe.objective
    if mode in ("sft", "kd"):
        return "references"
    if mode == "seqkd":
        return "teacher"
    if mode == "gkd" and random.Random(f"{recipe.train.seed}-{step}").random() >= obj.lmbda:
        return "teacher" if obj.seq_kd else "references"
    return "student"


def make_batch(recipe: Recipe, source: str, rows: list[int], ctx: "RunContext", generator: torch.Generator,
               times: dict[str, float]) -> Rollout:
    """Completions for one micro-batch: references, or sampled (student / teacher-mixed / teacher)."""
    if source == "references":
        return reference_rollout(ctx.data.train, rows, ctx.tokenizer.pad_token_id, ctx.accelerator.device)
    ids, mask = prompt_batch(ctx.data.train, rows, ctx.tokenizer.pad_token_id, ctx.accelerator.device)
    r = recipe.rollout
    alpha = 1.0 if source == "teacher" else r.alpha
    started = time.perf_counter()
    with for_generation(ctx.student, ctx.accelerator) as student:
        batch = rollout(student, ctx.teacher if alpha > 0 else None, ids, mask, tokenizer=ctx.tokenizer,
                        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                        alpha=alpha, do_sample=r.do_sample, stop_strings=r.stop_strings, generator=generator,
                        vocab_size=ctx.vocab)
    times["time/rollout_s"] += time.perf_counter() - started
    # no separate teacher scoring pass: the loss runs the teacher over the completions anyway (the pg rewards
    # and the divergences come from that forward)
    return batch


@dataclass
class RunContext:
    accelerator: Accelerator
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    data: object
    vocab: int
    backend: str
    embeddings: torch.Tensor  # the student's input embeddings (the diversity penalty reads them)


class StopRequested:
    """SIGINT / SIGTERM ask the loop to save a checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        self.signal = signum


def optimize_step(recipe: Recipe, ctx: "RunContext", optimizer, scheduler, batches: list[Rollout],
                  lm_batches: list[Rollout | None], times: dict[str, float]) -> tuple[dict, bool]:
    """Loss, backward, clipping and optimizer step over one step's micro-batches; `ppo_epochs` passes in pg mode.

    Returns the metrics (per-token means over every micro-batch and process) and whether a non-finite loss
    made an optimizer step be skipped.
    """
    acc, obj = ctx.accelerator, recipe.objective
    # every loss term is divided by a count over the whole step (all micro-batches, all processes)
    num_tokens = global_sum(acc, sum(int(b.completion_mask.sum()) for b in batches))
    num_sequences = global_sum(acc, sum(sequences_with_pairs(b.completion_mask) for b in batches))
    # accelerate / DeepSpeed divide the loss by grad_accum and DDP averages over ranks: undo both, since the
    # loss is already divided by the global token count of the step
    scale = recipe.train.grad_accum * acc.num_processes
    loss_mode = "kd" if obj.mode == "gkd" else obj.mode  # gkd: the divergence, whatever the completions
    metrics: dict[str, float] = {}
    sums: dict[str, float] = {}
    weight, any_bad = 0, False
    for _epoch in range(obj.ppo_epochs if obj.mode == "pg" else 1):
        bad = False
        for batch, lm_batch in zip(batches, lm_batches):
            with acc.accumulate(ctx.student):
                started, teacher_before = time.perf_counter(), times["time/teacher_s"]
                loss, terms = micro_batch_loss(recipe, loss_mode, ctx.student, ctx.teacher, batch, num_tokens=num_tokens,
                                               vocab=ctx.vocab, backend=ctx.backend, embeddings=ctx.embeddings,
                                               lm_batch=lm_batch, num_sequences=num_sequences, times=times)
                if not torch.isfinite(loss):
                    bad = True  # backpropagate zeros so every rank's gradient hooks still fire
                    loss = sum(p.sum() for p in ctx.student.parameters() if p.requires_grad) * 0.0
                acc.backward(loss * scale)
                local_tokens = int(batch.completion_mask.sum())
                terms["train/loss"] = loss.item() * num_tokens / max(local_tokens, 1)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value * local_tokens
                weight += local_tokens
                # the student's forward, loss and backward: all but the teacher's forward inside micro_batch_loss
                times["time/student_s"] += time.perf_counter() - started - (times["time/teacher_s"] - teacher_before)
                if acc.sync_gradients:
                    started = time.perf_counter()
                    bad = global_sum(acc, int(bad)) > 0  # every rank skips together
                    if not bad and recipe.optim.max_grad_norm:
                        norm = acc.clip_grad_norm_(ctx.student.parameters(), recipe.optim.max_grad_norm)
                        if norm is not None:
                            metrics["optim/grad_norm"] = float(norm)
                    if not bad:
                        optimizer.step()
                    optimizer.zero_grad()
                    times["time/optimizer_s"] += time.perf_counter() - started
        if not bad:
            scheduler.step()
        any_bad |= bad
    total = global_sum(acc, weight)
    metrics |= {key: global_sum(acc, value) / max(total, 1) for key, value in sorted(sums.items())}
    return metrics, any_bad


@dataclass
class TrainResult:
    """What a finished (or signal-stopped) run leaves: the trained student and where everything was written."""

    student: torch.nn.Module  # the trained student, unwrapped, on the training device
    tokenizer: object
    output_dir: Path
    final_dir: Path | None  # <output_dir>/final; None when a signal stopped the run (a checkpoint was saved)
    before: dict[str, float]  # held-out metrics before the first step (eval/reverse_kl, ...)
    after: dict[str, float] | None
    steps: int
    stitching: torch.nn.Module | None = None  # hidden-state projections, detached from the student
    stopped_by_signal: int | None = None
    zero_stage: int = 0


def setup(recipe: Recipe, recipe_path: str, models: Models | None = None, raw_train=None, raw_eval=None):
    """Accelerator, models (from the recipe unless given), data, optimizer, schedule and sampler, resumed if asked."""
    accelerator = make_accelerator(recipe)
    set_seed(recipe.train.seed, deterministic=recipe.train.deterministic)
    models = models or load_models(recipe, recipe_path)
    if recipe.hidden.weight:  # before the optimizer is built: the projections train with the student
        attach_stitching(models.student, models.teacher, recipe.hidden)
    data = load_prompt_data(recipe.data, models.tokenizer, seed=recipe.train.seed, train=raw_train, eval_=raw_eval)
    reason = needs_references(recipe)
    if reason and not has_references(data.train):
        raise DataError(f"{reason}, but {recipe.data.path} has none (format {data.task.name}, columns "
                        f"{data.task.columns}); map a reference column with data.columns.reference=<column>")
    cfg, obj = recipe.train, recipe.objective
    optimizer = build_optimizer(recipe.optim, models.student)
    # pg takes ppo_epochs optimizer steps per training step: the schedule spans all of them
    scheduler = build_scheduler(recipe.optim, optimizer, cfg.max_steps * (obj.ppo_epochs if obj.mode == "pg" else 1))
    student, optimizer = accelerator.prepare(models.student, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    teacher = prepare_teacher(models.teacher, accelerator)
    # the memory-bounded divergence projects hidden states with the raw lm_head weights: not under ZeRO-3 (sharded
    # weights) and not for models whose logits are more than that projection (soft-capping, scaling, a bias)
    plain = zero_stage(accelerator) != 3 and logits_are_linear(models.student) and logits_are_linear(models.teacher)
    backend = select_backend(obj.backend, accelerator.device, obj.divergence) if plain else "torch"
    ctx = RunContext(accelerator, student, teacher, models.tokenizer, data, len(models.tokenizer), backend,
                     accelerator.unwrap_model(student).get_input_embeddings().weight)
    sampler = PromptSampler(len(data.train), cfg.batch_size, accelerator.num_processes, accelerator.process_index, cfg.seed)
    state: dict = {"step": 0, "bad_steps_total": 0, "before": {}, "train_seconds": 0.0}
    resume = resolve_resume(cfg.resume_from, cfg.output_dir)
    if resume is not None:
        state = load_checkpoint(accelerator, resume)
        sampler.position = state["data_position"]
    return ctx, optimizer, scheduler, sampler, state


def train(recipe: Recipe, recipe_path: str, models: Models | None = None, raw_train=None, raw_eval=None) -> TrainResult:
    """The training loop. `models` and the raw splits come from the Python API; otherwise from the recipe."""
    ctx, optimizer, scheduler, sampler, state = setup(recipe, recipe_path, models, raw_train, raw_eval)
    accelerator, student, teacher, data = ctx.accelerator, ctx.student, ctx.teacher, ctx.data
    cfg, obj = recipe.train, recipe.objective
    if recipe.logging.tensorboard:
        accelerator.init_trackers("onpolicy_kd")
    stop = StopRequested()
    monitor = Monitor(cfg.output_dir, cfg.max_steps, state["step"], enabled=accelerator.is_main_process,
                      live=recipe.logging.live, accelerator=accelerator, tensorboard=recipe.logging.tensorboard)
    world, consecutive_bad = accelerator.num_processes, 0  # world: for rollout/mean_len

    def heldout() -> dict[str, float]:
        return heldout_metrics(recipe, accelerator, student, teacher, ctx.tokenizer, data.eval, ctx.vocab)

    def checkpoint() -> None:
        save_checkpoint(accelerator, cfg.output_dir, state["step"], {**state, "data_position": sampler.position},
                        cfg.save_total_limit)

    with monitor:
        if state["step"] == 0:
            state["before"] = heldout()
            monitor.log(0, state["before"], advance=False)
            monitor.print(f"held-out reverse KL before training: {state['before']['eval/reverse_kl']:.3f} nats/token")
        while state["step"] < cfg.max_steps:
            step, started = state["step"], time.perf_counter()
            times = dict.fromkeys(("time/rollout_s", "time/teacher_s", "time/student_s", "time/optimizer_s"), 0.0)
            # 1. completions for every micro-batch of this optimizer step
            source = step_mode(recipe, step)
            batches, lm_batches = [], []
            for micro in range(cfg.grad_accum):
                rows = sampler.next_batch()
                generator = torch.Generator(device=accelerator.device).manual_seed(
                    cfg.seed * 1_000_003 + step * 1009 + micro * 31 + accelerator.process_index)
                batches.append(make_batch(recipe, source, rows, ctx, generator, times))
                lm_batches.append(reference_rollout(data.train, rows, ctx.tokenizer.pad_token_id, accelerator.device)
                                  if obj.mode == "pg" and obj.lm_coef else None)
            # 2. loss, backward, clip, optimizer step (PPO epochs reuse the rollout)
            metrics, bad = optimize_step(recipe, ctx, optimizer, scheduler, batches, lm_batches, times)
            # 3. bookkeeping: NaN/Inf guard, metrics, eval, samples, checkpoints
            state["step"] = step + 1
            consecutive_bad = consecutive_bad + 1 if bad else 0
            state["bad_steps_total"] += int(bad)
            if bad:
                monitor.print(f"[yellow]warning:[/] non-finite loss at step {step + 1}: step skipped "
                              f"({consecutive_bad} in a row, {state['bad_steps_total']} in all)")
                if consecutive_bad >= cfg.max_bad_steps:
                    raise UserError(
                        f"the loss was NaN/Inf for {consecutive_bad} steps in a row (step {step + 1}); try a lower "
                        f"optim.lr, optim.max_grad_norm, train.mixed_precision=bf16 or no instead of fp16, a higher "
                        f"rollout.temperature, and check the data; resume from the last checkpoint after changing them")
            elapsed = time.perf_counter() - started
            state["train_seconds"] += elapsed
            generated = global_sum(accelerator, sum(int(b.completion_mask.sum()) for b in batches))
            metrics |= times | {
                "optim/lr": scheduler.get_last_lr()[0], "rollout/mean_len": generated / (len(batches) * cfg.batch_size * world),
                "perf/tokens_per_s": generated / elapsed, "time/step_s": elapsed, "train/skipped_steps": state["bad_steps_total"],
                "data/on_policy": float(source == "student"),
            }
            if state["step"] % recipe.logging.log_steps == 0 or state["step"] == cfg.max_steps:
                monitor.log(state["step"], metrics)
            if recipe.eval.eval_steps and state["step"] % recipe.eval.eval_steps == 0 and state["step"] < cfg.max_steps:
                monitor.log(state["step"], heldout(), advance=False)
            if recipe.logging.sample_steps and state["step"] % recipe.logging.sample_steps == 0:
                monitor.samples(state["step"], sample_rows(recipe, accelerator, student, teacher, ctx.tokenizer, data.eval))
            if cfg.save_steps and state["step"] % cfg.save_steps == 0 and state["step"] < cfg.max_steps:
                checkpoint()
            if stop.signal is not None:
                checkpoint()
                monitor.print(f"stopped by signal {stop.signal} at step {state['step']}: checkpoint saved; "
                              f"resume with train.resume_from=latest")
                return finish(ctx, recipe, state, None, None, stop.signal)
        after = heldout()
        monitor.log(state["step"], after, advance=False)
    checkpoint()
    card = model_card(recipe, recipe_path, state["before"], after, state["step"], state["train_seconds"])
    final = export_final(accelerator, student, ctx.tokenizer, cfg.output_dir, recipe_to_yaml(recipe), card)
    if accelerator.is_main_process:
        before_kl = state["before"].get("eval/reverse_kl", float("nan"))
        console.print(f"held-out reverse KL (student || teacher): {before_kl:.3f} -> {after['eval/reverse_kl']:.3f} "
                      f"nats/token ({100 * (after['eval/reverse_kl'] / before_kl - 1):+.0f}%) in "
                      f"{state['train_seconds']:.0f} s; student saved to {final}")
    accelerator.end_training()
    return finish(ctx, recipe, state, after, final, None)


def finish(ctx: RunContext, recipe: Recipe, state: dict, after: dict | None, final: Path | None, signum: int | None) -> TrainResult:
    """The run's result, with the stitching projections taken off the student (it is a plain model again)."""
    student = ctx.accelerator.unwrap_model(ctx.student)
    stitching = student._modules.pop(STITCHING, None)
    return TrainResult(student=student, tokenizer=ctx.tokenizer, output_dir=Path(recipe.train.output_dir),
                       final_dir=final, before=state["before"], after=after, steps=state["step"], stitching=stitching,
                       stopped_by_signal=signum, zero_stage=zero_stage(ctx.accelerator))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            return dry_run(recipe, args.recipe)
        result = train(recipe, args.recipe)
        if result.zero_stage == 3:
            # A gloo worker thread can race interpreter shutdown after ZeRO-3 runs (SIGABRT in ~2% of CPU runs,
            # ../shared/DEEPSPEED_CPU.md): everything is saved, so leave without the interpreter's teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0
    except FloatingPointError as err:
        print_error(UserError(f"{err}: the model's weights are no longer finite; lower optim.lr or "
                              f"optim.max_grad_norm, avoid fp16, and resume from the last checkpoint"))
        return 2
    except torch.OutOfMemoryError:
        print_error(UserError("out of memory: lower train.batch_size (raise train.grad_accum to keep the batch), "
                              "rollout.max_new_tokens or data.max_prompt_tokens; use objective.backend=chunked, "
                              "student.gradient_checkpointing=true, train.mixed_precision=bf16, or DeepSpeed ZeRO-3"))
        return 2
    except UserError as err:
        print_error(err)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
