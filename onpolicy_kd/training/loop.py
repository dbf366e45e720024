"""The training loop: `train()` shows one step from top to bottom; the phases are in training/phases.py.

    prompts -> completions -> teacher forward -> loss and backward (per micro-batch) -> clip and optimizer step
            -> metrics, evaluation, samples, checkpoint (after_step)

What a mode does (where completions come from, its loss, how many passes over a rollout) is read from the
mode table (objectives/modes.py); which forward passes run, and whether the divergence uses the
memory-bounded head, is decided once at set-up (`choose_head`, `forward_plan`) and printed.
"""

from __future__ import annotations

import contextlib
import functools
import signal

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from onpolicy_kd.console import console, is_main_process
from onpolicy_kd.data.loading import PromptData, check_data_path, data_cache_dir, load_prompt_data
from onpolicy_kd.data.retokenize import CrossTokenizer, cross_tokenizer, with_student_prompts
from onpolicy_kd.data.sampler import PromptSampler, repeated_rows, rows_with_references
from onpolicy_kd.errors import ConfigError, UserError
from onpolicy_kd.hub import expand_path
from onpolicy_kd.metrics_log import truncate_metrics
from onpolicy_kd.evaluation.heldout import Evaluated, greedy_samples, headline, heldout_evaluation, logged_metrics
from onpolicy_kd.evaluation.teacher_answers import TeacherAnswers, recipe_teacher_answers
from onpolicy_kd.models.distributed import describe_run, describe_text, init_trackers, make_accelerator, prepare_teacher, zero_stage
from onpolicy_kd.models.freezing import apply_trainable
from onpolicy_kd.models.module_lm import ModuleLM
from onpolicy_kd.models.loading import Models, base_model, load_models, logits_are_linear, reload_teacher, with_lora
from onpolicy_kd.models.seq2seq import is_encoder_decoder
from onpolicy_kd.objectives.divergences import LIGER_KINDS, liger_available
from onpolicy_kd.models.attention import relation_setup
from onpolicy_kd.objectives.hidden import STITCHING, attach_stitching
from onpolicy_kd.objectives.modes import (
    MODES, ForwardPlan, Mode, completion_source, forward_plan, samples_student, steps_run_teacher,
)
from onpolicy_kd.recipe import Recipe, cache_root, recipe_to_yaml
from onpolicy_kd.recipe.schema import DEFAULT_MAX_STEPS, TIME_ONLY_STEP_CAP, parse_trainable
from onpolicy_kd.rollout.replay import ReplayBuffer, replay_file
from onpolicy_kd.rollout.teacher_cache import cached_teacher_completions, cached_teacher_topk
from onpolicy_kd.training.describe import describe_step
from onpolicy_kd.training.checkpoint import (
    check_writable, checkpoint_bytes, claim_run, export_final, load_checkpoint, model_card, resume_plan,
    save_checkpoint,
)
from onpolicy_kd.training.monitor import Monitor
from onpolicy_kd.training.publish import push_folder
from onpolicy_kd.training.optim import apply_optim_settings, build_optimizer, build_scheduler
from onpolicy_kd.training.phases import (
    MetricSums, PhaseTimer, backward_micro_batch, draw_completions, length_metrics, on_policy_share, optimizer_step,
    step_context, teacher_outputs,
)


@dataclass
class TrainerState:
    """What a checkpoint stores besides the weights and optimizer (trainer_state.json)."""

    step: int = 0
    data_position: int = 0  # global prompt rows consumed (PromptSampler.position)
    bad_steps_total: int = 0
    bad_steps_in_a_row: int = 0
    train_seconds: float = 0.0
    before: dict[str, float] = field(default_factory=dict)  # held-out metrics before the first step
    lmbda: float | None = None  # gkd's share of student samples now (objective.lmbda until the adaptive schedule
    #                             raises it)
    heldout_kl: float | None = None  # the last evaluation's KL(student || teacher) (the adaptive schedule's signal)


@dataclass
class Stage:
    """Where a stage of a staged run (training/stages.py) stands: its place, and the run-wide metrics file."""

    name: str
    index: int
    count: int
    step_offset: int  # steps of the stages before it
    metrics_file: Path
    eval_data: object = None  # the run's held-out prompts (DataConfig), whatever the stage trains on
    stitching: dict = field(default_factory=dict)  # {(student, teacher) layer pair: projection} earlier stages trained


class StopRequested:
    """SIGINT / SIGTERM ask the loop to save a checkpoint and stop after the current step. Leaving the `with` block
    gives the signals back their earlier handlers: a Ctrl-C after the run (between two stages, in a notebook that
    called `distill`) interrupts again instead of setting the flag of a run that has ended.

    Two flags, because in a multi-process run a signal can land on one rank while it waits in the step's agreement:
    `received` is what this process was sent (set by the handler, never cleared), `signal` what every process agreed
    to stop on (set by `agree_on_stop` only), so a signal that arrives during one agreement is carried into the next
    instead of being overwritten by it."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.signal: int | None = None
        self._saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in self._saved:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        self.received = signum
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C (or SIGTERM) ends the process at once

    def __enter__(self) -> "StopRequested":
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """Everything the steps of one run work with, built once by `setup`."""

    recipe: Recipe
    recipe_path: str
    accelerator: Accelerator
    student: torch.nn.Module  # wrapped for DDP / DeepSpeed
    teacher: torch.nn.Module | None  # None: no step runs it, and it is loaded for evaluations only (`setup`)
    tokenizer: object
    data: PromptData
    vocab: int  # the shared vocabulary (the losses ignore padded embedding rows)
    optimizer: torch.optim.Optimizer
    scheduler: object
    sampler: PromptSampler
    mode: Mode
    plan: ForwardPlan
    state: TrainerState
    monitor: Monitor
    stop: StopRequested
    max_steps: int  # the step budget: train.max_steps, or train.epochs over the training prompts
    answers: TeacherAnswers  # the frozen teacher's greedy and sampled held-out answers (cached)
    replay: ReplayBuffer | None = None  # the student samples kept for reuse (replay.size > 0)
    teacher_topk: list | None = None  # teacher_text.topk: per cached teacher completion, its top-k (row-aligned)
    cross: CrossTokenizer | None = None  # objective.cross_tokenizer: the student's own tokenizer and how the two meet
    collapsed: bool = False  # an evaluation found collapse and eval.stop_on_collapse ends the run
    out_of_time: bool = False  # train.max_time is spent
    last_eval: dict[str, float] = field(default_factory=dict)
    evaluation: Evaluated | None = None  # the last held-out evaluation, with its per-prompt records

    @property
    def student_tokenizer(self):
        """The tokenizer the student writes with: its own across two tokenizers, else the shared one."""
        return self.cross.student_tokenizer if self.cross else self.tokenizer


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
    head: str = "torch"  # the divergence implementation the run used (torch, chunked, liger)
    stitching: torch.nn.Module | None = None  # hidden-state projections, detached from the student
    stopped_by_signal: int | None = None
    zero_stage: int = 0
    gloo_processes: bool = False  # several processes over gloo (CPU): the command line leaves without teardown
    evaluation: Evaluated | None = None  # the last held-out evaluation (its summary is `after`), per prompt


def train(recipe: Recipe, recipe_path: str, models: Models | None = None, raw_train=None, raw_eval=None, *,
          stage: Stage | None = None, before: dict[str, float] | None = None) -> TrainResult:
    """Train the student as the recipe says. `models` and the raw splits come from the Python API; `stage` and
    `before` (the previous stage's last evaluation) from a staged run."""
    with contextlib.ExitStack() as lifetime:
        if stage is None:  # the folder is the run's until it ends (a staged run claims it once, for all its stages)
            lifetime.enter_context(claim_run(recipe))
        checkpoint_path, changes = resume_plan(recipe, say_nothing_found=stage is None)  # before anything loads
        run = setup(recipe, recipe_path, models, raw_train, raw_eval, stage, checkpoint_path, changes)
        lifetime.enter_context(run.stop)  # until the student is exported, a signal asks for a checkpoint
        with run.monitor:
            evaluate_at_start(run, before)
            while run.state.step < run.max_steps and not (run.collapsed or run.out_of_time):
                timer, sums = PhaseTimer(), MetricSums()
                source = completion_source(recipe, run.state.step, current_lmbda(run))  # student/teacher/references
                skipped, metrics = False, {}
                batches = draw_completions(run, source, metrics, timer)  # one batch per micro-batch
                with timer("teacher") if run.plan.teacher else contextlib.nullcontext():
                    teachers = [teacher_outputs(run, batch) for batch in batches]  # once per rollout
                context = step_context(run, batches, teachers)  # global token counts, PG baseline
                for _ in range(run.mode.passes(recipe.objective)):  # pg: ppo_epochs passes over the rollout
                    bad = False
                    for batch, teacher in zip(batches, teachers):
                        with timer("student"):  # forward, loss, backward (gradients accumulate)
                            bad |= backward_micro_batch(run, batch, teacher, context, sums)
                    with timer("optimizer"):  # clip, step, schedule; skipped on a non-finite loss
                        skipped |= optimizer_step(run, bad, metrics)
                metrics |= sums.global_means(run.accelerator) | length_metrics(run, batches)
                if samples_student(recipe.objective):
                    metrics["data/on_policy"] = on_policy_share(batches)
                if after_step(run, context.num_tokens, metrics, skipped, timer):  # log, eval, checkpoint
                    return stopped_by_signal(run)
            after = run.last_eval if run.collapsed else heldout(run)
        return finish(run, after, staged=stage is not None)


def student_parts(recipe: Recipe, models: Models, stage: Stage | None) -> str:
    """The hidden-state projections attached to the student (taking over those an earlier stage trained for the
    same layer pairs) and the weights that train (`train.trainable`); what to say about them, if anything."""
    student, said = base_model(models.student), []
    if recipe.hidden.stitched:  # the projections train with the student
        stitching = attach_stitching(student, models.teacher, recipe.hidden.layers)
        carried = stitching.start_from(stage.stitching) if stage is not None else []
        if carried:
            said.append(f"stitching of layer pairs {[list(p) for p in carried]} continues from the earlier stages")
    if not recipe.student.lora:  # LoRA students train their adapters (and trainable is all)
        trainable, total = apply_trainable(student, parse_trainable(recipe.train.trainable))
        if recipe.train.trainable != "all":
            said.append(f"trainable: {', '.join(recipe.train.trainable)} ({trainable:,} of {total:,} parameters, "
                        f"stitching included); the rest is frozen")
    return "; ".join(said)


def setup(recipe: Recipe, recipe_path: str, models: Models | None = None, raw_train=None, raw_eval=None,
          stage: Stage | None = None, checkpoint_path: Path | None = None, changes: list | None = None) -> Run:
    """Accelerator, models, data, optimizer, schedule and prompt order, resumed from a checkpoint if asked
    (`checkpoint_path`, and the recipe keys changed since it was written)."""
    accelerator = make_accelerator(recipe)
    set_seed(recipe.train.seed, deterministic=recipe.train.deterministic)
    check_data_path(recipe.data)  # before the models load
    models, lent, reloadable = models_of_run(recipe, recipe_path, models, accelerator)
    parts_text = student_parts(recipe, models, stage)  # before the optimizer is built
    check_writable(recipe.train.output_dir, checkpoint_bytes(models.student))
    data = load_prompt_data(recipe.data, models.tokenizer, seed=recipe.train.seed, train=raw_train, eval_=raw_eval,
                            encoder_decoder=is_encoder_decoder(models.teacher))
    if stage is not None and stage.eval_data is not None and stage.eval_data != recipe.data:
        data = replace(data, eval=load_prompt_data(stage.eval_data, models.tokenizer, seed=recipe.train.seed,
                                                     encoder_decoder=is_encoder_decoder(models.teacher)).eval)
    teacher_topk = None
    if recipe.teacher_text.cache:
        train_split, teacher_topk = with_teacher_completions(recipe, models, data.train, accelerator)
        data = replace(data, train=train_split)
    answers = recipe_teacher_answers(recipe, models.teacher, models.tokenizer, data.eval, accelerator)  # unsharded
    mode = MODES[recipe.objective.mode]
    reason = mode.references(recipe.objective)
    if reason:
        total = len(data.train)
        data = replace(data, train=rows_with_references(data.train, reason, data_where(recipe, data)))
        if len(data.train) < total and accelerator.is_main_process:
            console.print(f"{recipe.objective.mode} trains on the {len(data.train)} of {total} training rows that have "
                          f"a reference completion")
    assert not teacher_topk or all(len(e) == len(data.train) for e in teacher_topk), "top-k rows: one per training row"
    data, cross = cross_setup(recipe, models, data, accelerator)
    cfg = recipe.train
    repeats = repeated_rows(cfg, len(data.train), accelerator.num_processes)
    if repeats and accelerator.is_main_process:
        console.print(f"[yellow]warning:[/] {repeats}")
    max_steps = cfg.total_steps(len(data.train), accelerator.num_processes)
    state = TrainerState()  # filled in place on resume: the time-budget schedule reads it
    optimizer = build_optimizer(recipe.optim, models.student)
    # pg takes ppo_epochs optimizer steps per training step: the schedule spans all of them
    scheduler = build_scheduler(recipe.optim, optimizer, max_steps * mode.passes(recipe.objective),
                                (lambda: state.train_seconds / cfg.max_time) if cfg.max_time else None)
    student, optimizer = accelerator.prepare(models.student, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    head, why = choose_head(recipe, accelerator, models)
    reuse_prompt, reuse_why = choose_prompt_reuse(recipe, accelerator, models)
    sampler = PromptSampler(len(data.train), cfg.batch_size, accelerator.num_processes, accelerator.process_index, cfg.seed)
    replay = ReplayBuffer(recipe.replay.size, recipe.replay.reuse, recipe.replay.max_age) if recipe.replay.size else None
    if cfg.resume_from is not None:
        resume(accelerator, cfg, stage, state, checkpoint_path)
        if replay is not None and checkpoint_path is not None and replay_file(checkpoint_path, accelerator.process_index).is_file():
            replay.load(replay_file(checkpoint_path, accelerator.process_index).read_text())
        sampler.position = state.data_position
        if any(key.startswith("optim.") for key, _, _ in changes or []):
            apply_optim_settings(recipe.optim, optimizer, scheduler)
    if recipe.logging.report_to:
        init_trackers(accelerator, recipe, stage.name if stage is not None else None)
    monitor = Monitor(cfg.output_dir, cfg.max_time or max_steps, state.train_seconds if cfg.max_time else state.step,
                      enabled=accelerator.is_main_process, live=recipe.logging.live, accelerator=accelerator,
                      trackers=bool(recipe.logging.report_to), stage=stage, by_time=cfg.max_time is not None)
    relations = relation_setup(recipe.hidden, models.student, models.teacher) if recipe.hidden.relations else ((), 0)
    plan = forward_plan(recipe, head, reuse_prompt, relations)
    description = describe_run(accelerator, recipe, models.student, models.teacher)
    teacher = teacher_of_steps(recipe, plan, models, accelerator, reloadable)
    release = teacher is None
    if release and lent.teacher_reloadable:  # a staged run's: the reference the stages keep goes too
        lent.teacher = None
    description["step"] = describe_step(recipe, plan, accelerator.num_processes)
    monitor.record(state.step, {"run": description})
    announce(monitor, recipe, description, stage, max_steps, changes,
             [f"lm head: {head} ({why})", *([f"student prompt: {reuse_why}"] if samples_student(recipe.objective) else []),
              *([parts_text] if parts_text else []),
              *(["teacher: out of memory while training (no step runs it); loaded again for each held-out "
                 "evaluation"] if release else [])])  # (with no rollout of the student there is no prompt to reuse)
    return Run(recipe, recipe_path, accelerator, student, teacher, models.tokenizer, data, len(models.tokenizer),
               optimizer, scheduler, sampler, mode, plan, state, monitor, StopRequested(), max_steps,
               answers, replay, teacher_topk, cross)


def cross_setup(recipe: Recipe, models: Models, data: PromptData,
                accelerator: Accelerator) -> tuple[PromptData, CrossTokenizer | None]:
    """objective.cross_tokenizer: the prompts also in the student's tokens, and what the two tokenizations share."""
    if bool(recipe.objective.cross_tokenizer) != (models.student_tokenizer is not None):
        raise ConfigError("objective.cross_tokenizer must be set exactly when the student has a tokenizer of its own "
                          "(models loaded for one recipe and trained with another: a stage of a staged run keeps "
                          "the run's objective.cross_tokenizer)")
    if models.student_tokenizer is None:
        return data, None
    tokenizer, teacher_tokenizer = models.student_tokenizer, models.tokenizer
    data = replace(data, train=with_student_prompts(data.train, tokenizer, teacher_tokenizer),
                   eval=with_student_prompts(data.eval, tokenizer, teacher_tokenizer))
    return data, cross_tokenizer(recipe.objective, tokenizer, teacher_tokenizer, accelerator.device)


def models_of_run(recipe: Recipe, recipe_path: str, models: Models | None,
                  accelerator: Accelerator) -> tuple[Models, Models, bool]:
    """The run's models, loaded here or handed over (the teacher loaded again if an earlier stage let it go), with
    LoRA adapters when the recipe asks; the Models object the teacher came in, and whether the run may let the
    teacher go: when it loaded it, or a staged run that loaded it lends it (not an object the caller handed over)."""
    reloadable = models is None or models.teacher_reloadable
    models = lent = models or load_models(recipe, recipe_path)
    if models.teacher is None:  # an earlier stage let it go
        models.teacher = reload_teacher(recipe, recipe_path)
    if recipe.student.lora:  # adapters for this run (a staged run's next stage adapts the student merged before it)
        if zero_stage(accelerator) == 3:
            raise ConfigError("student.lora does not run under DeepSpeed ZeRO-3 here (peft's adapters and the "
                              "sharded base weights are not gathered together for generation and export); use "
                              "ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml) or DDP, or train without student.lora")
        models = replace(models, student=with_lora(models.student, recipe.student.lora))
    return models, lent, reloadable


def teacher_of_steps(recipe: Recipe, plan: ForwardPlan, models: Models, accelerator: Accelerator,
                     reloadable: bool) -> torch.nn.Module | None:
    """The teacher the steps run, prepared for the accelerator; or None: no step runs it (its caches are made and
    its held-out answers cached by now), so the run lets it go and loads it again for each held-out evaluation
    (`evaluation_teacher`). Models the caller handed over stay theirs; under DeepSpeed it stays (its engine is built
    once)."""
    if (reloadable and not steps_run_teacher(recipe, plan)
            and accelerator.distributed_type != DistributedType.DEEPSPEED):
        return None
    return prepare_teacher(models.teacher, accelerator)


def announce(monitor: Monitor, recipe: Recipe, description: dict, stage: Stage | None, max_steps: int,
             changes: list | None, decisions: list[str]) -> None:
    """The run's first lines: how it runs, what a step does, the settings a resume changed, the budget and the
    decisions made at set-up."""
    cfg = recipe.train
    monitor.print(describe_text(description))
    monitor.print(description["step"])
    if changes:
        monitor.print("resumed with changed settings (applied): " + ", ".join(
            f"{key} {old!r} -> {new!r}" for key, old, new in changes))
    if stage is not None:
        monitor.print(f"[bold]stage {stage.index + 1}/{stage.count}: {stage.name}[/] ({recipe.objective.mode}, "
                      f"{budget_text(cfg, max_steps)}, data {recipe.data.path})")
    elif cfg.epochs is not None:
        monitor.print(f"budget: {budget_text(cfg, max_steps)}")
    for line in decisions:
        monitor.print(line)


def data_where(recipe: Recipe, data: PromptData) -> str:
    return f"{recipe.data.path} (format {data.task.name}, columns {data.task.columns})"


def resume(accelerator: Accelerator, cfg, stage: Stage | None, state: TrainerState, path: Path | None) -> None:
    """Load the checkpoint (None: `latest` found none yet) into `state` and the accelerator's objects, and cut the
    metrics file back to its step: the steps after it are run again, and logged once."""
    if path is not None:
        for key, value in load_checkpoint(accelerator, path).items():
            if key in TrainerState.__dataclass_fields__:
                setattr(state, key, value)
    if accelerator.is_main_process:
        metrics_file = stage.metrics_file if stage is not None else Path(cfg.output_dir) / "metrics.jsonl"
        if stage is not None:  # steps counted over the whole run; the earlier stages' records stay
            last = stage.step_offset + state.step
        else:
            last = state.step if path is not None else -1  # no checkpoint yet: the run starts over
        dropped = truncate_metrics(metrics_file, last)
        if dropped:
            console.print(f"{metrics_file}: {dropped} record(s) after step {max(last, 0)} dropped (those steps run again)")


def budget_text(cfg, steps: int | None = None) -> str:
    """'60 steps', '2 epochs (70 steps)', '300 s' or '300 s (at most 60 steps)': a run's budget, as the console
    says it (`steps`: the step budget once the data is known)."""
    if cfg.epochs is not None:
        count = f"{cfg.epochs:g} epoch{'s' if cfg.epochs != 1 else ''}" + (f" ({steps} steps)" if steps else "")
    else:
        count = f"{steps or cfg.max_steps or DEFAULT_MAX_STEPS} steps"
    if cfg.max_time is None:
        return count
    capped = cfg.epochs is not None or (steps or cfg.max_steps or TIME_ONLY_STEP_CAP) < TIME_ONLY_STEP_CAP
    return f"{cfg.max_time:g} s" + (f" (at most {count})" if capped else "")


def with_teacher_completions(recipe: Recipe, models: Models, train_split, accelerator: Accelerator):
    """(the training prompts with the teacher's cached completions as columns (generated on first use): per row, a
    list of teacher_text.samples_per_prompt token-id lists and texts (the k-th seeded by `teacher_sample_seed`);
    with teacher_text.topk, per cached completion a row-aligned dataset of the teacher's top-k at each of its
    positions (made on first use too), else None)."""
    r, text, count = recipe.rollout, recipe.teacher_text, recipe.teacher_text.samples_per_prompt
    settings = recipe.teacher_text_decoding()
    teacher = models.teacher.to(accelerator.device)
    ids, texts = [[] for _ in range(len(train_split))], [[] for _ in range(len(train_split))]
    topk = [] if text.topk else None
    batch_size = r.batch_size or recipe.train.batch_size
    for k in range(count):
        def progress(done: int, total: int, k: int = k, what: str = "teacher completions for the cache") -> None:
            if accelerator.is_main_process and (done == total or done % (10 * batch_size) == 0):
                console.print(f"{what}{f' (sample {k + 1}/{count})' if count > 1 else ''}: {done}/{total} prompts")

        with accelerator.main_process_first():  # the main process writes the cache, the others read it
            completions, hit, folder = cached_teacher_completions(
                teacher, models.tokenizer, train_split, settings, cache_dir=data_cache_dir(recipe.data),
                batch_size=batch_size, seed=teacher_sample_seed(recipe.train.seed, k),
                device=accelerator.device,
                vocab=len(models.tokenizer), progress=progress)
        if accelerator.is_main_process:
            console.print(f"teacher completions: {'read from' if hit else 'written to'} {folder}")
        for row, (row_ids, row_text) in enumerate(zip(completions["teacher_ids"], completions["teacher_text"])):
            ids[row].append(row_ids)
            texts[row].append(row_text)
        if topk is not None:
            with accelerator.main_process_first():
                found, hit = cached_teacher_topk(
                    teacher, train_split, completions["teacher_ids"], folder, k=text.topk,
                    temperature=recipe.objective.temperature, batch_size=batch_size, device=accelerator.device,
                    vocab=len(models.tokenizer), pad_id=models.tokenizer.pad_token_id,
                    progress=functools.partial(progress, what=f"the teacher's top-{text.topk} for the cache"))
            if accelerator.is_main_process:
                console.print(f"teacher top-{text.topk}: {'read from' if hit else 'written to'} "
                              f"{'the cache beside it' if folder is not None else 'memory (data.cache_dir unset)'}")
            topk.append(found.with_format("numpy"))
    return train_split.add_column("teacher_ids", ids).add_column("teacher_text", texts), topk


def teacher_sample_seed(seed: int, k: int) -> int:
    """The seed of the k-th cached teacher sample: the run's seed for the first (the cache key of a run with one
    sample), far from the seeds of other runs for the others (seed + k would hand run s + 1 the samples of run s)."""
    return seed if k == 0 else seed + 7_919 * 1_000_003 * k


def choose_head(recipe: Recipe, accelerator: Accelerator, models: Models) -> tuple[str, str]:
    """How the losses read the student's distribution, decided once: (torch | chunked | liger, why). torch: from
    full (B, T, V) logits; chunked: from the last hidden states and lm_heads, chunk by chunk; liger: the divergence
    through Liger-Kernel's fused kernel on CUDA (any other term chunked)."""
    obj = recipe.objective
    if obj.backend == "liger":  # (the recipe check already refused it in a mode without a divergence)
        if obj.divergence not in LIGER_KINDS:
            raise ConfigError(f"objective.backend=liger computes {sorted(LIGER_KINDS)}, not {obj.divergence}; "
                              f"use backend=chunked")
        if accelerator.device.type != "cuda" or not liger_available():
            raise ConfigError("objective.backend=liger needs CUDA and `pip install liger-kernel`; use backend=chunked")
    if obj.backend == "torch":
        return "torch", "objective.backend=torch: full logits"
    if obj.cross_tokenizer:
        return "torch", "objective.cross_tokenizer: full logits (the two vocabularies are compared row by row)"
    if not (logits_are_linear(models.student) and logits_are_linear(models.teacher)):
        return "torch", "a model's logits are more than hidden @ lm_head (soft-capping, scaling or a bias): full logits"
    if obj.backend == "liger" or (obj.backend == "auto" and accelerator.device.type == "cuda" and MODES[obj.mode].divergence
                                  and obj.divergence in LIGER_KINDS and liger_available()):
        return "liger", "Liger-Kernel's fused linear JSD on CUDA"
    return "chunked", f"memory-bounded: {obj.chunk_size} tokens at a time, full logits never materialised"


def choose_prompt_reuse(recipe: Recipe, accelerator: Accelerator, models: Models) -> tuple[bool, str]:
    """Whether a rollout keeps the student's prompt keys and values with gradient and the loss's forward continues
    from them (models/forward.py), so the student's prompt runs once per step instead of twice: decided once,
    with the reason. Exact only where the rollout's prefill computes what the loss's forward would, on the
    parameters the gradient is taken at, for a batch backwarded once as it was generated."""
    obj, student = recipe.objective, models.student
    if MODES[obj.mode].passes(obj) > 1:
        return False, "run twice (objective.ppo_epochs > 1: the parameters change after the first pass)"
    if recipe.rollout.batch_size not in (None, recipe.train.batch_size):
        return False, "run twice (rollout.batch_size differs from train.batch_size: completions are re-split)"
    if recipe.train.grad_accum > 1:  # every micro-batch is rolled out before the first backward
        return False, "run twice (train.grad_accum > 1 would hold every micro-batch's prompt graph at once)"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return False, "run twice (under DeepSpeed the rollout decodes with gathered or engine-held weights)"
    if obj.prompt_weight > 0:
        return False, "run twice (objective.prompt_weight reads outputs over the whole prompt)"
    if is_encoder_decoder(student) or isinstance(base_model(student), ModuleLM):
        return False, "run twice (an encoder-decoder or plain-module student)"
    if getattr(student, "is_gradient_checkpointing", False):
        return False, "run twice (student.gradient_checkpointing recomputes the forward in backward)"
    if has_dropout(student):
        return False, "run twice (the student has dropout: the rollout samples without it, the loss trains with it)"
    config = getattr(student, "config", None)
    if getattr(config, "sliding_window", None) or any("sliding" in str(t) for t in getattr(config, "layer_types", None) or []):
        return False, "run twice (sliding-window attention layers keep a cache the loss cannot continue from)"
    return True, "run once (the rollout's prefill keeps the prompt's keys and values with gradient for the loss)"


def has_dropout(model: torch.nn.Module) -> bool:
    config = vars(getattr(model, "config", None) or object())
    rates = [v for k, v in config.items() if ("dropout" in k or "pdrop" in k) and isinstance(v, (int, float))]
    return any(r > 0 for r in rates) or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


@contextlib.contextmanager
def evaluation_teacher(run: Run):
    """The teacher for a held-out evaluation: the run's, or when the run let it go (no step runs it) the recipe's
    loaded again for the evaluation and let go after it."""
    if run.teacher is not None:
        yield run.teacher
        return
    teacher = prepare_teacher(reload_teacher(run.recipe, run.recipe_path), run.accelerator)
    try:
        yield teacher
    finally:
        del teacher


def heldout(run: Run) -> dict[str, float]:
    """The held-out evaluation, logged; a collapsing text is warned about (and ends the run if the recipe says so)."""
    with evaluation_teacher(run) as teacher:
        run.evaluation = heldout_evaluation(run.recipe, run.accelerator, run.student, teacher, run.tokenizer,
                                            run.data.eval, run.answers, cross=run.cross)
    metrics = logged_metrics(run.evaluation.summary)
    adapt_lmbda(run, metrics)
    run.monitor.log(run.state.step, metrics, advance=False)
    run.last_eval = metrics
    cfg = run.recipe.eval
    if metrics["eval/greedy/distinct1"] < cfg.collapse_distinct1:
        run.collapsed = cfg.stop_on_collapse and run.state.step > 0
        run.monitor.print(
            f"[yellow]warning:[/] the student's greedy held-out completions are collapsing at step "
            f"{run.monitor.step_offset + run.state.step}: "
            f"distinct-1 {metrics['eval/greedy/distinct1']:.2f} (< eval.collapse_distinct1={cfg.collapse_distinct1}), "
            f"repetition {metrics['eval/greedy/repetition']:.2f}, ROUGE-L vs the teacher "
            f"{metrics['eval/greedy/rougeL_teacher']:.2f}" + ("; stopping (eval.stop_on_collapse)" if run.collapsed else ""))
    return metrics


def current_lmbda(run: Run) -> float | None:
    """The share of student samples the adaptive schedule has reached (kept in checkpoints); None: objective.lmbda."""
    return run.state.lmbda if run.recipe.objective.lmbda_schedule == "adaptive" else None


def adapt_lmbda(run: Run, metrics: dict[str, float]) -> None:
    """objective.lmbda_schedule=adaptive: after an evaluation during training whose held-out KL(student || teacher)
    on the student's own samples is higher than the previous evaluation's, the share of student-sample steps rises
    by objective.lmbda_step (up to 1). The evaluation before the first step only sets the starting KL."""
    obj, state = run.recipe.objective, run.state
    if obj.lmbda_schedule != "adaptive":
        return
    kl = metrics["eval/reverse_kl"]
    if state.lmbda is None:
        state.lmbda = obj.lmbda
    training_goes_on = 0 < state.step < run.max_steps and not run.out_of_time  # (not after the last step)
    if training_goes_on and state.heldout_kl is not None and kl > state.heldout_kl and state.lmbda < 1:
        raised = min(1.0, state.lmbda + obj.lmbda_step)
        run.monitor.print(f"held-out KL rose ({state.heldout_kl:.4f} -> {kl:.4f}): the share of student samples goes "
                          f"from {state.lmbda:.2f} to {raised:.2f} (objective.lmbda_schedule=adaptive)")
        state.lmbda = raised
    state.heldout_kl = kl
    metrics["data/lmbda"] = state.lmbda


def evaluate_at_start(run: Run, before: dict[str, float] | None) -> None:
    if run.state.step == 0:
        run.state.before = before if before is not None else heldout(run)
        if before is not None:  # a stage after the first: the previous stage's last evaluation is its start
            adapt_lmbda(run, dict(before))
        what, key = headline(run.state.before)
        run.monitor.print(f"{what} before training: {run.state.before[key]:.3f} nats/token")


def checkpoint(run: Run) -> Path:
    run.state.data_position = run.sampler.position
    rank_files = {replay_file(Path(), run.accelerator.process_index).name: run.replay.state()} if run.replay else {}
    return save_checkpoint(run.accelerator, run.recipe.train.output_dir, run.state.step, asdict(run.state),
                           run.recipe.train.save_total_limit, recipe_to_yaml(run.recipe), rank_files)


def after_step(run: Run, num_tokens: float, metrics: dict[str, float], skipped: bool, timer: PhaseTimer) -> bool:
    """Bookkeeping after an optimizer step: the NaN/Inf guard, metrics, evaluation, samples and checkpoints.
    Returns True when a signal asked the run to stop (a checkpoint has then been saved)."""
    recipe, state, monitor, cfg = run.recipe, run.state, run.monitor, run.recipe.train
    state.step += 1
    state.bad_steps_in_a_row = state.bad_steps_in_a_row + 1 if skipped else 0
    state.bad_steps_total += int(skipped)
    if skipped:
        monitor.print(f"[yellow]warning:[/] non-finite loss at {step_said(run)}: step skipped "
                      f"({state.bad_steps_in_a_row} in a row, {state.bad_steps_total} in all)")
        if state.bad_steps_in_a_row >= cfg.max_bad_steps:
            raise UserError(
                f"the loss was NaN/Inf for {state.bad_steps_in_a_row} steps in a row ({step_said(run)}); try a lower "
                f"optim.lr, optim.max_grad_norm, train.mixed_precision=bf16 or no instead of fp16, a higher "
                f"rollout.temperature, and check the data; resume from the last checkpoint after changing them")
    elapsed = timer.elapsed()
    state.train_seconds += elapsed
    metrics |= timer.metrics() | {
        "optim/lr": run.scheduler.get_last_lr()[0], "perf/tokens_per_s": num_tokens / elapsed, "time/step_s": elapsed,
        "train/skipped_steps": state.bad_steps_total,
    }
    if recipe.objective.lmbda_schedule == "adaptive":
        metrics["data/lmbda"] = state.lmbda
    agree_on_stop(run)
    last = state.step == run.max_steps or run.out_of_time
    if state.step % recipe.logging.log_steps == 0 or last:
        monitor.log(state.step, metrics, completed=state.train_seconds if cfg.max_time else state.step)
    if recipe.eval.eval_steps and state.step % recipe.eval.eval_steps == 0 and not last:
        heldout(run)
    if recipe.logging.sample_steps and state.step % recipe.logging.sample_steps == 0:
        monitor.samples(state.step, greedy_samples(recipe, run.accelerator, run.student, run.tokenizer, run.data.eval,
                                                   run.answers, cross=run.cross))
    if cfg.save_steps and state.step % cfg.save_steps == 0 and not last:
        checkpoint(run)
    if run.out_of_time and run.stop.signal is None:
        monitor.print(f"time budget spent: {state.train_seconds:.0f} s of training (train.max_time={cfg.max_time:g}) "
                      f"after {state.step} steps")
    if run.stop.signal is not None:
        checkpoint(run)
        monitor.print(f"stopped by signal {run.stop.signal} at {step_said(run)}: checkpoint saved; "
                      f"resume with train.resume_from=latest")
        return True
    return False


def step_said(run: Run) -> str:
    """The step as the console shows it (counted over the whole run), with a stage's own step beside it."""
    monitor, step = run.monitor, run.state.step
    if not monitor.stage:
        return f"step {step}"
    return f"step {monitor.step_offset + step} (step {step} of {monitor.label})"


def agree_on_stop(run: Run) -> None:
    """Whether to stop after this step, agreed by every process (one tiny gather per step): a signal to any one
    rank, or the time budget as any rank measures it, stops them all at the same step."""
    cfg = run.recipe.train
    flags = torch.tensor([run.stop.received or 0, int(cfg.max_time is not None and run.state.train_seconds >= cfg.max_time)],
                         device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        flags = run.accelerator.gather(flags).view(-1, 2).max(dim=0).values
    run.stop.signal = int(flags[0]) or None
    run.out_of_time = bool(flags[1])


def finish(run: Run, after: dict[str, float], staged: bool = False) -> TrainResult:
    """The last checkpoint, the exported student with its model card, and the before/after summary."""
    recipe, state, accelerator = run.recipe, run.state, run.accelerator
    checkpoint(run)
    card = model_card(recipe, run.recipe_path, state.before, after, state.step, state.train_seconds)
    final = export_final(accelerator, run.student, run.student_tokenizer,
                         recipe.train.output_dir, recipe_to_yaml(recipe), card,
                         keep_adapters=bool(recipe.student.lora and recipe.student.lora.keep_adapters))
    if accelerator.is_main_process:
        console.print(summary_line(state.before, after, state.train_seconds, final))
    if staged:  # the trackers of this stage end; the process group lives on for the next stage
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()
    if recipe.train.push_to_hub and not staged:  # a staged run pushes its own final/ once its last stage is done
        publish(recipe, final)
    return _result(run, after, final, None)


def publish(recipe: Recipe, final: Path) -> None:
    """train.push_to_hub: the exported student to the Hub, from the main process, once the run is finished."""
    if is_main_process():
        url = push_folder(Path(recipe.train.output_dir), recipe.train.hub_model_id, private=recipe.train.hub_private)
        console.print(f"pushed {final} to {url}")


def summary_line(before: dict[str, float], after: dict[str, float], seconds: float, final: Path) -> str:
    """Before -> after: the KL, and beside it what the student's greedy text looks like (and how it compares with the
    human references, when the held-out data has them)."""
    def change(key: str, digits: int = 3) -> str:
        return f"{before.get(key, float('nan')):.{digits}f} -> {after.get(key, float('nan')):.{digits}f}"

    what, key = headline(after)
    start, end = before.get(key, float("nan")), after[key]
    kl = f"{change(key)} nats/token" + (f" ({100 * (end / start - 1):+.0f}%)" if start > 0 else "")
    judged = [("distinct-1", "distinct1"), ("repetition", "repetition"), ("ROUGE-L vs teacher", "rougeL_teacher"),
              ("ROUGE-L vs references", "rougeL_ref"), ("accuracy", "accuracy")]
    text = ", ".join(f"{name} {change(f'eval/greedy/{key}', 2)}" for name, key in judged if f"eval/greedy/{key}" in after)
    return (f"{what}: {kl}; greedy text: {text}; {seconds:.0f} s of training; "
            f"student saved to {final}")


def stopped_by_signal(run: Run) -> TrainResult:
    return _result(run, None, None, run.stop.signal)


def _result(run: Run, after: dict | None, final: Path | None, signum: int | None) -> TrainResult:
    """The run's result, with the stitching projections taken off the student (it is a plain model again)."""
    student = base_model(run.accelerator.unwrap_model(run.student))  # LoRA: merged into it by export_final
    stitching = student._modules.pop(STITCHING, None)
    return TrainResult(student=student, tokenizer=run.student_tokenizer, output_dir=Path(run.recipe.train.output_dir),
                       final_dir=final, before=run.state.before, after=after, steps=run.state.step,
                       head=run.plan.head, stitching=stitching, stopped_by_signal=signum,
                       zero_stage=zero_stage(run.accelerator), evaluation=run.evaluation,
                       gloo_processes=run.accelerator.num_processes > 1 and run.accelerator.device.type == "cpu")
