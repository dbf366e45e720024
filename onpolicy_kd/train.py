"""Entry point: `accelerate launch -m onpolicy_kd.train RECIPE.yaml [section.key=value ...] [--dry-run]`.

RECIPE may also be a Python file defining a `Distillation` subclass (onpolicy_kd/models/distillation_file.py): its methods give the
student (any torch module), and optionally the teacher and data; its `recipe` the rest.

Also `python -m onpolicy_kd.train ...` and `onpolicy-kd train ...`. A user mistake (bad recipe,
missing model or data, mismatched vocabularies) prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from rich.syntax import Syntax

from onpolicy_kd.models.distillation_file import is_python_spec
from onpolicy_kd.console import console, is_main_process, print_error, summary_table
from onpolicy_kd.data.loading import check_data_path, length_stats, load_prompt_data
from onpolicy_kd.data.sampler import repeated_rows, rows_with_references
from onpolicy_kd.errors import UserError
from onpolicy_kd.models.loading import Models, check_recipe_fits, count_parameters, load_models
from onpolicy_kd.models.seq2seq import is_encoder_decoder
from onpolicy_kd.models.attention import relation_setup
from onpolicy_kd.objectives.hidden import attach_stitching
from onpolicy_kd.objectives.modes import MODES
from onpolicy_kd.training.describe import describe_step
from onpolicy_kd.recipe import Recipe, load_recipe, recipe_to_yaml
from onpolicy_kd.recipe.schema import StageConfig
from onpolicy_kd.recipe.loading import recipe_and_overrides, resolve_stages
from onpolicy_kd.training.checkpoint import (
    check_apart_from_models, check_output_dir, check_writable, checkpoint_bytes, model_sources, resume_plan, world_size,
)
from onpolicy_kd.training.loop import TrainResult, budget_text, train
from onpolicy_kd.training.run_inputs import resolve_file, run_resolved
from onpolicy_kd.training.stages import check_stage_parts, resume_point, run_stages

__all__ = ["TrainResult", "dry_run", "main", "train"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="onpolicy-kd train",
        description="On-policy knowledge distillation of a causal LM, driven by a YAML recipe.",
        epilog="Overrides: section.key=value, e.g. train.max_steps=10 objective.divergence=jsd objective.beta=0.5",
    )
    parser.add_argument("recipe", help="the YAML recipe, e.g. recipes/smollm2_news.yaml, or a Distillation .py file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (win over the file and environment)")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="validate, load models and data, print the resolved recipe and a summary, then exit",
    )
    return parser.parse_intermixed_args(argv)  # flags and overrides in any order


def _layers(config) -> object:
    """Decoder layers, or an encoder-decoder model's "encoder + decoder" (num_hidden_layers counts the encoder's;
    T5 and BART name the decoder's differently)."""
    if not getattr(config, "is_encoder_decoder", False):
        return config.num_hidden_layers
    decoder = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None)
    return f"{config.num_hidden_layers} + {decoder}"


def _model_row(source: str, model: object, tokenizer: object) -> dict[str, object]:
    config = model.config  # type: ignore[attr-defined]
    return {
        "source": source if len(source) < 40 else "..." + source[-37:],
        "architecture": type(model).__name__,
        "parameters": count_parameters(model),  # type: ignore[arg-type]
        "layers": _layers(config),
        "hidden": config.hidden_size,
        "vocab (tokenizer / rows)": f"{len(tokenizer)} / {model.get_input_embeddings().num_embeddings}",  # type: ignore
        "dtype": str(model.dtype).removeprefix("torch."),  # type: ignore[attr-defined]
    }


def stage_row(stage: Recipe, spec: StageConfig) -> dict[str, object]:
    obj = stage.objective
    what = obj.mode + (f" {obj.divergence}" if obj.mode in ("kd", "gkd") else "")
    if stage.hidden.weight:
        what += f" + hidden {stage.hidden.loss} {stage.hidden.layers}"
    trains = "all" if stage.train.trainable == "all" else ", ".join(stage.train.trainable)
    return {"budget": budget_text(stage.train), "objective": what, "data": f"{Path(stage.data.path).name} ({stage.data.split})",
            "trains": trains + (" (head from the teacher's, W_t P)" if spec.head_init else ""),
            "batch": f"{stage.train.batch_size} x {stage.train.grad_accum}",
            "optim": f"{stage.optim.name} lr {stage.optim.lr:g} {stage.optim.scheduler}",
            "rollout": f"{stage.rollout.max_new_tokens} tokens, alpha {stage.rollout.alpha}"}


def check_claim(recipe: Recipe, stages: list[Recipe]) -> None:
    """What the run would refuse when it claims its output folder and reads train.resume_from, refused here too
    (without claiming anything): a run using the folder, another run's files, a model's folder, a checkpoint that
    does not fit. The number of processes is compared only under a launcher (a plain dry run cannot know it)."""
    cfg = recipe.train
    check_apart_from_models(cfg.output_dir, model_sources(recipe))
    check_output_dir(cfg.output_dir, cfg.resume_from, cfg.overwrite)
    if cfg.resume_from is not None and stages:
        resume_point(recipe, stages, check_processes=world_size() > 1)
    elif cfg.resume_from is not None:
        resume_plan(recipe, check_processes=world_size() > 1)


def dry_run(recipe: Recipe, recipe_path: str, models: Models | None = None, raw_train=None, raw_eval=None) -> int:
    """`models` and `raw_train`/`raw_eval`: what a Distillation file builds itself (teacher, rows), as in training."""
    started = time.perf_counter()
    stages = resolve_stages(recipe, recipe_path) if recipe.stages else []
    check_claim(recipe, stages)
    for task in [recipe, *stages]:
        if raw_train is None or task is not recipe:
            check_data_path(task.data)  # before the models load
    models = models or load_models(recipe, recipe_path)
    data = load_prompt_data(recipe.data, models.tokenizer, seed=recipe.train.seed, train=raw_train, eval_=raw_eval,
                            encoder_decoder=is_encoder_decoder(models.teacher))
    check_writable(recipe.train.output_dir, checkpoint_bytes(models.student))
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
    if recipe.hidden.stitched:  # attached after the model table, which counts the student's own parameters
        stitching = attach_stitching(models.student, models.teacher, recipe.hidden.layers)
        console.print(f"hidden-state distillation ({recipe.hidden.loss}, weight {recipe.hidden.weight}): "
                      f"\\[student, teacher] layer pairs {[list(p) for p in stitching.pairs]}, "
                      f"{count_parameters(stitching):,} stitching parameters")
    elif recipe.hidden.relations:  # no parameters of their own
        pairs, heads = relation_setup(recipe.hidden, models.student, models.teacher)
        console.print(f"attention-relation distillation (weight {recipe.hidden.weight}): \\[student, teacher] layer "
                      f"pairs {[list(p) for p in pairs]}, {heads} relation head{'s' * (heads != 1)}")
    console.print(summary_table(rows, title=f"data: {recipe.data.path} (format {data.task.name}, columns {data.task.columns})"))
    if not recipe.stages:
        console.print(f"budget: {budget_text(recipe.train, recipe.train.total_steps(len(data.train), world_size()))}")
    for name, task in [(f"stage {spec.name}: ", stage) for spec, stage in zip(recipe.stages, stages)] or [("", recipe)]:
        # (a stage on data of its own has its rows counted when it trains)
        repeats = repeated_rows(task.train, len(data.train), world_size()) if task.data == recipe.data else None
        if repeats:
            console.print(f"[yellow]warning:[/] {name}{repeats}")
    if recipe.stages:
        for k, (spec, stage) in enumerate(zip(recipe.stages, stages)):
            check_recipe_fits(stage, models, where=f"stage {k} ({spec.name})")
        check_stage_parts(recipe, stages, models)
        console.print(summary_table([(f"{k + 1} {spec.name}", stage_row(stage, spec)) for k, (spec, stage)
                                     in enumerate(zip(recipe.stages, stages))],
                                    title="stages (run in order; evaluation on the recipe's held-out prompts)"))
    for name, task in ([(f"stage {k} ({spec.name})", stage) for k, (spec, stage) in enumerate(zip(recipe.stages, stages))]
                       if recipe.stages else [("the recipe", recipe)]):
        console.print(f"{name}: {describe_step(task, processes=world_size())}")
        reason = MODES[task.objective.mode].references(task.objective)
        if reason:  # the rows a mode that reads references will train on, counted over the whole split
            split = data.train if task.data == recipe.data else load_prompt_data(
                task.data, models.tokenizer, seed=task.train.seed, encoder_decoder=is_encoder_decoder(models.teacher)).train
            used = rows_with_references(split, f"{name}: {reason}", str(task.data.path))
            console.print(f"{name}: {task.objective.mode} trains on the {len(used)} of {len(split)} training rows "
                          f"with a reference completion")
    console.rule("first eval prompt, as the student sees it")
    console.print(data.eval[0]["prompt"], markup=False)
    console.print(f"[green]dry run OK[/] in {time.perf_counter() - started:.1f} s: recipe valid, models and data load")
    return 0


def _python_file(args: argparse.Namespace) -> int:
    run = resolve_file(args.recipe, args.overrides)
    if args.dry_run:
        return dry_run(run.recipe, run.path, run.models, run.train_data, run.eval_data)
    return _exit_code(run_resolved(run.recipe, run.path, run.models, run.train_data, run.eval_data))


def _exit_code(result: TrainResult) -> int:
    """0, or for a run stopped by a signal (a checkpoint was saved: not finished) the shell's code for it (130, 143)."""
    code = 128 + result.stopped_by_signal if result.stopped_by_signal else 0
    if result.zero_stage == 3 or result.gloo_processes:
        # A gloo worker thread can race interpreter shutdown (SIGABRT in ~2% of 2-process CPU ZeRO-3 runs, and seen
        # after a 2-process rollout; docs/distributed.md): everything is saved, so leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.recipe, args.overrides = recipe_and_overrides([args.recipe, *args.overrides])
        if is_python_spec(args.recipe):
            return _python_file(args)
        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            return dry_run(recipe, args.recipe)
        result = run_stages(recipe, args.recipe) if recipe.stages else train(recipe, args.recipe)
        return _exit_code(result)
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
    except KeyboardInterrupt:  # outside a training step (a step's Ctrl-C saves a checkpoint: training/loop.py)
        print_error(UserError("interrupted (Ctrl-C) outside a training step (loading, tokenising, generating the "
                              "teacher's completions): nothing is half-written (caches are written to a temporary "
                              "folder and renamed into place); run the command again, with train.resume_from=latest "
                              "to continue from the last checkpoint"))
        return 130


if __name__ == "__main__":
    sys.exit(main())
