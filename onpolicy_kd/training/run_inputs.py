"""What a run is given besides its recipe: model objects and in-memory rows (the Python API), or a Distillation file
(`onpolicy-kd train FILE.py`, onpolicy_kd/models/distillation_file.py) that builds them; and the one call that
runs a resolved recipe with them, shared by the API and the command line."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from datasets import Dataset
from transformers import PreTrainedModel

from onpolicy_kd.errors import DataError, ModelLoadError
from onpolicy_kd.models.distillation_file import Distillation, file_recipe, load_distillation, split_spec
from onpolicy_kd.models.loading import Models, load_models
from onpolicy_kd.recipe import Recipe, load_recipe
from onpolicy_kd.training.loop import TrainResult, train
from onpolicy_kd.training.stages import run_stages

IN_MEMORY = "<in-memory dataset>"


def describe(model: PreTrainedModel) -> str:
    """A name for the model card: where the object was loaded from, else its class."""
    config = getattr(model, "config", None)  # not a PreTrainedModel: load_models says so
    return getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "") or type(model).__name__


def as_dataset(rows: Any, argument: str) -> Dataset:
    if isinstance(rows, Dataset):
        return rows
    if isinstance(rows, Mapping):
        return Dataset.from_dict(dict(rows))
    if isinstance(rows, Sequence) and rows and all(isinstance(r, Mapping) for r in rows):
        return Dataset.from_list([dict(r) for r in rows])
    raise DataError(f"{argument} must be a datasets.Dataset, a non-empty list of row dicts or a dict of columns, "
                    f"got {type(rows).__name__}")


def object_values(teacher: PreTrainedModel | None, student: tuple[str, str] | None, train_rows: Any) -> dict[str, Any]:
    """The recipe entries that objects replace (`load_recipe(..., api_values=...)`): the teacher's source, the student's
    (init, name_or_path), and the data path of in-memory rows."""
    values: dict[str, Any] = {}
    if teacher is not None:
        values["teacher"] = {"name_or_path": describe(teacher)}
    if student is not None:
        init, name_or_path = student
        values["student"] = {"init": init, "name_or_path": name_or_path, "layer_stride": None, "keep_layers": None,
                             "config_overrides": {}}
    if train_rows is not None:
        values["data"] = {"path": IN_MEMORY, "split": "train", "eval_split": None}
    return values


def file_datasets(distillation: Distillation) -> tuple[Dataset | None, Dataset | None]:
    """The train and eval rows a Distillation file's `dataset()` gives (None where it leaves the split to the recipe)."""
    train_rows, eval_rows = distillation.dataset("train"), distillation.dataset("eval")
    return (as_dataset(train_rows, "dataset('train')") if train_rows is not None else None,
            as_dataset(eval_rows, "dataset('eval')") if eval_rows is not None else None)


@dataclass
class FileRun:
    """A Distillation file resolved: its recipe, the teacher it builds (if any) and its rows (if any)."""

    recipe: Recipe
    path: str
    models: Models | None
    train_data: Any
    eval_data: Any


def resolve_file(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> FileRun:
    """A Distillation file (onpolicy_kd/models/distillation_file.py) as a recipe: the class's `recipe` and `overrides`,
    then `overrides`; the student from its `student()`, the teacher and data from its methods where it defines them."""
    distillation, spec = load_distillation(str(path), key=str(path))
    built = distillation.teacher()
    if built is not None and not (isinstance(built, tuple) and len(built) == 2):
        raise ModelLoadError(f"{spec}: teacher() must return (model, tokenizer), or None for the recipe's teacher")
    teacher, tokenizer = built if built is not None else (None, None)
    train_rows, eval_rows = file_datasets(distillation)
    resolved = load_recipe(file_recipe(distillation, split_spec(spec)[0]), [*distillation.overrides, *overrides],
                           api_values=object_values(teacher, ("python", spec), train_rows))
    models = load_models(resolved, str(path), teacher=teacher, tokenizer=tokenizer) if teacher is not None else None
    return FileRun(resolved, str(path), models, train_rows, eval_rows)


def run_resolved(resolved: Recipe, recipe_path: str, models: Models | None, train_data: Any, eval_data: Any) -> TrainResult:
    if resolved.stages:
        if train_data is not None:
            raise DataError("train_data= with stages: give each stage's data in the recipe (stages[k].data)")
        return run_stages(resolved, recipe_path, models)
    return train(
        resolved, recipe_path, models,
        raw_train=as_dataset(train_data, "train_data=") if train_data is not None else None,
        raw_eval=as_dataset(eval_data, "eval_data=") if eval_data is not None else None,
    )


def file_rows(recipe: Recipe) -> dict[str, Dataset]:
    """The rows a Distillation file's dataset() gave a finished run (its recipe says `<in-memory dataset>`), for
    `load_prompt_data(..., **file_rows(recipe))`; nothing for a run on a data file."""
    if recipe.data.path != IN_MEMORY:
        return {}
    if recipe.student.init != "python":
        raise DataError("the run trained on rows given to the Python API (data.path: <in-memory dataset>); "
                        "evaluate it on a data file with data.path=FILE (and data.eval_split or data.eval_size)")
    train_rows, eval_rows = file_datasets(load_distillation(recipe.student.name_or_path)[0])
    return {key: rows for key, rows in (("train", train_rows), ("eval_", eval_rows)) if rows is not None}
