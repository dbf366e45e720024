"""Staged runs: the phases of one recipe (`stages:`), run in order, the student flowing from one to the next.

Each stage is the top-level recipe with the stage's own keys on top (objective, rollout, data, optim, penalties,
hidden, and train.batch_size / grad_accum / trainable), trained for its budget (`max_steps` and/or `max_time`) in `<output_dir>/stages/<k>-<name>/`
(its checkpoints and its own `final/`). The teacher is loaded once; the student a stage hands back is the
next stage's starting point, with a fresh optimizer and schedule (the stage's own). The run's
`metrics.jsonl` and console show the stage (`stage` key, steps counted over the whole run); every stage
ends with a held-out evaluation on the recipe's own held-out prompts (whatever data a stage trains on),
which is the next one's "before". At the end the last stage's student is copied to `<output_dir>/final/`,
with the recipe's task (`recipe.yaml`, what `evaluate` reads) and the whole staged recipe
(`staged_recipe.yaml`).

Block-by-block distillation (cleanGPT's schedule) is a sequence of stages: each `objective.mode: hidden` stage
trains one block of decoder layers (`train.trainable: [layers A-B]`, the rest frozen) to match a teacher layer
through its stitching projection (`hidden.layers`); the projections carry over from stage to stage (a later
stage that pairs the same layers starts from where an earlier one left them), and a final stage with
`head_init: teacher_projected` starts the student's head from the teacher's through the projection of the student's
last layer onto the teacher's last (W_s = W_t P) and trains it on logits. The run's `final/stitching.safetensors` holds every pair any stage trained.

Resuming (`train.resume_from: latest`) skips the stages that finished (their `final/` is there), loads the
student the last of them left, and resumes the current stage from its latest checkpoint (or, given a checkpoint
folder, from that one, checked against the stage's recipe first). The run claims its output folder once, for all
its stages (training/checkpoint.py `claim_run`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file

from onpolicy_kd.console import console, is_main_process
from onpolicy_kd.data.loading import check_data_path
from onpolicy_kd.errors import ConfigError, UserError
from onpolicy_kd.models.freezing import check_trainable
from onpolicy_kd.models.loading import Models, base_model, check_recipe_fits, load_models, reload_teacher
from onpolicy_kd.objectives.hidden import (
    STITCHING_FILE, layer_pairs, projected_teacher_head, read_stitching_file, stitching_file,
)
from onpolicy_kd.recipe import Recipe, recipe_to_yaml
from onpolicy_kd.recipe.loading import resolve_stages
from onpolicy_kd.recipe.schema import parse_trainable
from onpolicy_kd.training.checkpoint import STATE_FILE, claim_run, list_checkpoints, resolve_resume, resume_changes
from onpolicy_kd.training.loop import Stage, TrainResult, publish, train


def load_finished_student(student, final: Path) -> None:
    """The weights a finished stage exported (tied weights are not stored twice)."""
    state = {}
    for file in sorted(final.glob("*.safetensors")):
        if file.name != STITCHING_FILE:
            state |= load_file(str(file))
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {name for name in missing if "lm_head" in name or "embed" in name}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{final}: cannot restore the student (missing {missing}, unexpected {unexpected})")


def stitching_of(final: Path) -> dict:
    """The stitching projections a finished stage exported ({} when it trained none)."""
    return read_stitching_file(final / STITCHING_FILE) if (final / STITCHING_FILE).is_file() else {}


def last_pair(student, teacher) -> tuple[int, int]:
    """The layer pair whose projection head_init reads: the student's last (post-norm) layer and the teacher's."""
    return student.config.num_hidden_layers, teacher.config.num_hidden_layers


def check_stage_parts(recipe: Recipe, stages: list[Recipe], models: Models) -> None:
    """Before the first stage trains: every stage's train.trainable fits the student, and every head_init has a
    head to write and an earlier stage that trains the projection it reads."""
    student = base_model(models.student)
    pair = last_pair(student, models.teacher)
    matched: set[tuple[int, int]] = set()
    for k, (spec, stage) in enumerate(zip(recipe.stages, stages)):
        where = f"stage {k} ({spec.name})"
        if not stage.student.lora:
            check_trainable(student, parse_trainable(stage.train.trainable), where=f"{where}: train.trainable")
        if spec.head_init is not None and pair not in matched:
            raise ConfigError(
                f"{where}: head_init={spec.head_init} reads the projection of the student's last layer onto the "
                f"teacher's last ({list(pair)}: both after the final norm, where W_t P is the teacher's head on "
                f"projected states), and no earlier stage trains it: add {list(pair)} to an earlier stage's "
                f"hidden.layers")
        if spec.head_init is not None:
            head_to_write(student, where)
        if stage.hidden.stitched:
            matched |= set(layer_pairs(stage.hidden.layers, pair[0], pair[1]))


def head_to_write(student, where: str):
    """The student's lm_head module, when head_init may overwrite it (its own weight, not sharded)."""
    head = student.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{where}: head_init: this student has no lm_head module (get_output_embeddings() is None)")
    embeddings = student.get_input_embeddings()
    if embeddings is not None and head.weight is embeddings.weight:
        raise ConfigError(f"{where}: head_init: teacher_projected would overwrite the student's input embeddings "
                          f"too: its lm_head is tied to them. Build the student with an untied head (e.g. "
                          f"student.init: config with config_overrides: {{tie_word_embeddings: false}}), or leave "
                          f"out head_init")
    if hasattr(head.weight, "ds_id"):
        raise ConfigError(f"{where}: head_init: teacher_projected is not supported under DeepSpeed ZeRO-3 (the head is "
                          f"sharded); use DDP or ZeRO-2")
    return head


def start_head_from_teacher(student, teacher, stitching: dict, where: str) -> str:
    """`head_init: teacher_projected`: the student's lm_head := the teacher's lm_head through the projection of the
    student's last layer onto the teacher's, W_s = W_t P, so that W_s h_s = W_t (P h_s) ~ W_t h_t."""
    student = base_model(student)
    pair = last_pair(student, teacher)
    head, teacher_head = head_to_write(student, where), teacher.get_output_embeddings()
    with torch.no_grad():
        projected = projected_teacher_head(teacher_head.weight, stitching[pair].to(teacher_head.weight.device))
        rows = min(projected.shape[0], head.weight.shape[0])  # rows past the shared vocabulary: never read
        head.weight[:rows] = projected[:rows].to(head.weight.dtype)
        if getattr(head, "bias", None) is not None:  # the teacher's bias where it has one, else none
            head.bias.zero_()
            if getattr(teacher_head, "bias", None) is not None:
                head.bias[:rows] = teacher_head.bias[:rows]
    return f"lm_head from the teacher's through the projection of layer pair {list(pair)} (W_t P)"


def steps_taken(stage_dir: Path) -> int:
    """The steps a finished stage took (its last checkpoint, written when it finished)."""
    found = list_checkpoints(stage_dir)
    return json.loads((found[-1] / STATE_FILE).read_text())["step"] if found else 0


def resume_point(recipe: Recipe, stages: list[Recipe], check_processes: bool = True) -> tuple[int, Path | None]:
    """Where train.resume_from takes a staged run, found before any model loads: (the first stage that has not
    finished, the checkpoint it continues from; None: from its start). The checkpoint is checked against that
    stage's recipe as an unstaged run checks its own (one of another recipe is refused, naming the keys), and a
    resume that finds nothing to resume says so. `check_processes`: as in `resume_changes`."""
    unfinished = [k for k, stage in enumerate(stages)
                  if not (Path(stage.train.output_dir) / "final" / "recipe.yaml").is_file()]
    if not unfinished:
        raise UserError(f"train.resume_from={recipe.train.resume_from}: every stage in {recipe.train.output_dir} has "
                        f"finished, so there is nothing to resume (the last stage's student is in "
                        f"{stages[-1].train.output_dir}/final); to train again, drop train.resume_from and use "
                        f"train.overwrite=true or another train.output_dir")
    start = unfinished[0]
    checkpoint = resolve_resume(recipe.train.resume_from, stages[start].train.output_dir)
    if checkpoint is not None:
        resume_changes(checkpoint, stages[start], check_processes=check_processes)
    elif start == 0 and is_main_process():
        console.print(f"[yellow]warning:[/] train.resume_from=latest found no finished stage and no checkpoint under "
                      f"{Path(recipe.train.output_dir) / 'stages'}: starting a new run (to continue a run, point "
                      f"train.output_dir at its folder)")
    return start, checkpoint


def run_stages(recipe: Recipe, recipe_path: str, models: Models | None = None,
               before: dict[str, float] | None = None) -> TrainResult:
    """Train every stage in order; the result is the last stage's, with `final_dir` the run's own `final/`.
    `before`: the initial student's held-out metrics, when the caller has them (else the first stage measures them)."""
    stages = resolve_stages(recipe)
    with claim_run(recipe):  # the folder is the run's until its last stage ends
        resume = resume_point(recipe, stages) if recipe.train.resume_from is not None else None
        for stage_recipe in stages:
            check_data_path(stage_recipe.data)  # before the models load
        # loaded here: a stage whose steps do not run the teacher lets it go, a later stage loads it again
        models = models or replace(load_models(recipe, recipe_path), teacher_reloadable=True)
        for k, (spec, stage_recipe) in enumerate(zip(recipe.stages, stages)):  # all of them before the first trains
            check_recipe_fits(stage_recipe, models, where=f"stage {k} ({spec.name})")
        check_stage_parts(recipe, stages, models)
        result, stitching = train_stages(recipe, recipe_path, stages, models, before, resume)
        if result.stopped_by_signal is not None:
            return result
        result.final_dir = export_run(recipe, result, stitching)
        if recipe.train.push_to_hub:
            publish(recipe, result.final_dir)
    AcceleratorState().destroy_process_group()  # what each stage's end left alive for the next one
    return result


def train_stages(recipe: Recipe, recipe_path: str, stages: list[Recipe], models: Models,
                 before: dict[str, float] | None, resume: tuple[int, Path | None] | None) -> tuple[TrainResult, dict]:
    """The stages in order (a resumed run skips the finished ones); the last one's result (or the one a signal
    stopped) and the stitching projections the stages trained."""
    offset, result = 0, None
    stitching: dict = {}  # {(student, teacher) layer pair: projection}: what the stages so far trained, the latest
    for index, (spec, stage_recipe) in enumerate(zip(recipe.stages, stages)):
        stage_dir = Path(stage_recipe.train.output_dir)
        stage = Stage(name=spec.name, index=index, count=len(stages), step_offset=offset,
                      metrics_file=Path(recipe.train.output_dir) / "metrics.jsonl", eval_data=recipe.data,
                      stitching=stitching)
        if resume is not None and (stage_dir / "final" / "recipe.yaml").is_file():
            load_finished_student(models.student, stage_dir / "final")
            stitching |= stitching_of(stage_dir / "final")
            console.print(f"stage {index + 1}/{len(stages)} {spec.name}: finished earlier, its student restored")
            offset += steps_taken(stage_dir)
            continue
        if spec.head_init == "teacher_projected":
            models.teacher = models.teacher or reload_teacher(recipe, recipe_path)  # (an earlier stage let it go)
            console.print(f"stage {index + 1}/{len(stages)} {spec.name}: "
                          + start_head_from_teacher(models.student, models.teacher, stitching, spec.name))
            before = None  # a new head: the stage measures its own starting point
        if resume is not None:  # the stage resume_point found continues from its checkpoint; a later one has none
            start, checkpoint = resume
            resume_from = str(checkpoint) if index == start and checkpoint is not None else "latest"
            stage_recipe = stage_recipe.model_copy(
                update={"train": stage_recipe.train.model_copy(update={"resume_from": resume_from})})
        result = train(stage_recipe, recipe_path, models, stage=stage, before=before)
        if result.stopped_by_signal is not None:
            return result, stitching
        models = replace(models, student=result.student)
        before, offset = result.after, offset + result.steps  # a time budget may end a stage before max_steps
        stitching |= stitching_of(result.final_dir)
    assert result is not None  # resume_point refuses a run whose every stage has finished
    return result, stitching


def export_run(recipe: Recipe, result: TrainResult, stitching: dict) -> Path:
    """The run's own `final/`: the last stage's student, the recipe's task and the whole staged recipe beside it."""
    final = Path(recipe.train.output_dir) / "final"
    if result.final_dir is not None and is_main_process():
        tmp = final.with_name(".tmp-final")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(result.final_dir, tmp)
        # recipe.yaml: the task (what `evaluate` reads: the held-out prompts, eval settings); the stages beside it
        (tmp / "recipe.yaml").write_text(recipe_to_yaml(recipe.model_copy(update={"stages": []})))
        (tmp / "staged_recipe.yaml").write_text(recipe_to_yaml(recipe))
        if stitching:  # every pair any stage trained, as it last left it (the evaluation reports each layer)
            tensors, metadata = stitching_file(stitching)
            save_file(tensors, str(tmp / STITCHING_FILE), metadata=metadata)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final
