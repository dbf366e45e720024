"""Staged runs: the phases of one recipe (`stages:`), run in order, the student flowing from one to the next.

Each stage is the top-level recipe with the stage's own keys on top (objective, rollout, data, optim, penalties,
hidden, and train.batch_size / grad_accum), trained for its budget (`max_steps` and/or `max_time`) in `<output_dir>/stages/<k>-<name>/`
(its checkpoints and its own `final/`). The teacher is loaded once; the student a stage hands back is the
next stage's starting point, with a fresh optimizer and schedule (the stage's own). The run's
`metrics.jsonl` and console show the stage (`stage` key, steps counted over the whole run); every stage
ends with a held-out evaluation on the recipe's own held-out prompts (whatever data a stage trains on),
which is the next one's "before". At the end the last stage's student is copied to `<output_dir>/final/`,
with the recipe's task (`recipe.yaml`, what `evaluate` reads) and the whole staged recipe
(`staged_recipe.yaml`).

Resuming (`train.resume_from: latest`) skips the stages that finished (their `final/` is there), loads the
student the last of them left, and resumes the current stage from its latest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file

from onpolicy_kd.console import console, is_main_process
from onpolicy_kd.data.loading import check_data_path
from onpolicy_kd.models.loading import Models, check_lengths, load_models
from onpolicy_kd.recipe import Recipe, recipe_to_yaml
from onpolicy_kd.recipe.loading import resolve_stages
from onpolicy_kd.training.checkpoint import STATE_FILE, list_checkpoints
from onpolicy_kd.training.loop import Stage, TrainResult, claim_run, publish, train


def load_finished_student(student, final: Path) -> None:
    """The weights a finished stage exported (tied weights are not stored twice)."""
    state = {}
    for file in sorted(final.glob("*.safetensors")):
        if file.name != "stitching.safetensors":
            state |= load_file(str(file))
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {name for name in missing if "lm_head" in name or "embed" in name}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{final}: cannot restore the student (missing {missing}, unexpected {unexpected})")


def steps_taken(stage_dir: Path) -> int:
    """The steps a finished stage took (its last checkpoint, written when it finished)."""
    found = list_checkpoints(stage_dir)
    return json.loads((found[-1] / STATE_FILE).read_text())["step"] if found else 0


def run_stages(recipe: Recipe, recipe_path: str, models: Models | None = None,
               before: dict[str, float] | None = None) -> TrainResult:
    """Train every stage in order; the result is the last stage's, with `final_dir` the run's own `final/`.
    `before`: the initial student's held-out metrics, when the caller has them (else the first stage measures them)."""
    stages = resolve_stages(recipe)
    claim_run(recipe)
    for stage_recipe in stages:
        check_data_path(stage_recipe.data)  # before the models load
    models = models or load_models(recipe, recipe_path)
    for k, (spec, stage_recipe) in enumerate(zip(recipe.stages, stages)):  # all of them before the first trains
        check_lengths(stage_recipe, models, where=f"stage {k} ({spec.name})")
    resuming = recipe.train.resume_from is not None
    offset, result = 0, None
    for index, (spec, stage_recipe) in enumerate(zip(recipe.stages, stages)):
        stage_dir = Path(stage_recipe.train.output_dir)
        stage = Stage(name=spec.name, index=index, count=len(stages), step_offset=offset,
                      metrics_file=Path(recipe.train.output_dir) / "metrics.jsonl", eval_data=recipe.data)
        if resuming and (stage_dir / "final" / "recipe.yaml").is_file():
            load_finished_student(models.student, stage_dir / "final")
            console.print(f"stage {index + 1}/{len(stages)} {spec.name}: finished earlier, its student restored")
            offset += steps_taken(stage_dir)
            continue
        if resuming:
            stage_recipe = stage_recipe.model_copy(
                update={"train": stage_recipe.train.model_copy(update={"resume_from": "latest"})})
        result = train(stage_recipe, recipe_path, models, stage=stage, before=before)
        if result.stopped_by_signal is not None:
            return result
        models = Models(teacher=models.teacher, student=result.student, tokenizer=models.tokenizer)
        before, offset = result.after, offset + result.steps  # a time budget may end a stage before max_steps
    if result is None:
        raise RuntimeError("every stage had finished already: nothing to resume")
    final = Path(recipe.train.output_dir) / "final"
    if result.final_dir is not None and is_main_process():
        tmp = final.with_name(".tmp-final")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(result.final_dir, tmp)
        # recipe.yaml: the task (what `evaluate` reads: the held-out prompts, eval settings); the stages beside it
        (tmp / "recipe.yaml").write_text(recipe_to_yaml(recipe.model_copy(update={"stages": []})))
        (tmp / "staged_recipe.yaml").write_text(recipe_to_yaml(recipe))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    result.final_dir = final
    if recipe.train.push_to_hub:
        publish(recipe, final)
    return result

