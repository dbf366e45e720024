"""The Python API: distill with a recipe (file or dict) and, optionally, your own model objects and data.

    from onpolicy_kd import distill

    result = distill("recipes/smollm2_news.yaml", "train.max_steps=10")          # a recipe, as on the CLI
    result = distill({"objective": {"mode": "gkd"}, "train": {"max_steps": 50}},  # or a dict of sections
                     teacher=my_teacher, student=my_student, tokenizer=tokenizer,
                     train_data=[{"prompt": "...", "completion": "..."}, ...])
    result.student          # the trained model (the object you passed in, trained in place)
    result.after            # held-out metrics after training; result.before, result.final_dir, ...

Objects replace the matching recipe entries: `teacher=` replaces `teacher.name_or_path` (and then needs
`tokenizer=`), `student=` replaces the recipe's student initialisation, `train_data=` / `eval_data=`
replace `data.path` (a `datasets.Dataset`, a list of row dicts or a dict of columns; the columns are
detected as for files, `data.format` / `data.columns` still apply). Models must be transformers causal
LMs (`PreTrainedModel` subclasses, including architectures of your own). Everything else, checks
included, is the command line's `train()`: the same loop, metrics, checkpoints and `final/` export.
Bad input raises `onpolicy_kd.errors.UserError` (a `ConfigError` for the recipe) with the same message
the command line prints.

In one process this runs as it is; for several processes or DeepSpeed put the call in a script and
start it with `accelerate launch script.py`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from onpolicy_kd.recipe import DICT_SOURCE, Recipe, load_recipe
from onpolicy_kd.errors import DataError, ModelLoadError
from onpolicy_kd.models.loading import load_models
from onpolicy_kd.training.loop import TrainResult, train
from onpolicy_kd.training.stages import run_stages

IN_MEMORY = "<in-memory dataset>"


def _describe(model: PreTrainedModel) -> str:
    """A name for the model card: where the object was loaded from, else its class."""
    config = getattr(model, "config", None)  # not a PreTrainedModel: load_models says so
    return getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "") or type(model).__name__


def _as_dataset(rows: Any, argument: str) -> Dataset:
    if isinstance(rows, Dataset):
        return rows
    if isinstance(rows, Mapping):
        return Dataset.from_dict(dict(rows))
    if isinstance(rows, Sequence) and rows and all(isinstance(r, Mapping) for r in rows):
        return Dataset.from_list([dict(r) for r in rows])
    raise DataError(f"{argument}= must be a datasets.Dataset, a non-empty list of row dicts or a dict of columns, "
                    f"got {type(rows).__name__}")


def distill(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe,
    *overrides: str,
    teacher: PreTrainedModel | None = None,
    student: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    train_data: Any = None,
    eval_data: Any = None,
) -> TrainResult:
    """Train a student as the recipe says, with the given objects in place of the recipe's sources.

    `overrides` are `section.key=value` strings, as on the command line.
    """
    if tokenizer is not None and teacher is None and student is None:
        raise ModelLoadError("tokenizer= goes with teacher= or student= model objects; the recipe's models load their own")
    if eval_data is not None and train_data is None:
        raise DataError("eval_data= needs train_data= too (the recipe's data would otherwise hold out its own split)")
    api_values: dict[str, Any] = {}
    if teacher is not None:
        api_values["teacher"] = {"name_or_path": _describe(teacher)}
    if student is not None:
        api_values["student"] = {"init": "pretrained", "name_or_path": _describe(student), "layer_stride": None,
                                 "keep_layers": None, "config_overrides": {}}
    if train_data is not None:
        api_values["data"] = {"path": IN_MEMORY, "split": "train", "eval_split": None}
    if isinstance(recipe, Recipe):
        recipe = recipe.model_dump(mode="python")
    resolved = load_recipe(recipe, overrides, api_values=api_values)
    recipe_path = str(recipe) if not isinstance(recipe, Mapping) else DICT_SOURCE
    models = load_models(resolved, recipe_path, teacher=teacher, student=student, tokenizer=tokenizer) \
        if teacher is not None or student is not None else None
    if resolved.stages:
        if train_data is not None:
            raise DataError("train_data= with stages: give each stage's data in the recipe (stages[k].data)")
        return run_stages(resolved, recipe_path, models)
    return train(
        resolved, recipe_path, models,
        raw_train=_as_dataset(train_data, "train_data") if train_data is not None else None,
        raw_eval=_as_dataset(eval_data, "eval_data") if eval_data is not None else None,
    )
