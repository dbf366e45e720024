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
detected as for files, `data.format` / `data.columns` still apply). The teacher must be a transformers causal
LM (`PreTrainedModel` subclasses, including architectures of your own) or an encoder-decoder one (T5, BART:
then the student is one too); the student may also be any
`torch.nn.Module` mapping `(input_ids, attention_mask)` to logits (onpolicy_kd/models/module_lm.py: decoded by
full forward passes, no KV cache). `distill_file("my_distill.py")` runs a Distillation file as
`onpolicy-kd train my_distill.py` does (onpolicy_kd/models/distillation_file.py). Everything else, checks
included, is the command line's `train()`: the same loop, metrics, checkpoints and `final/` export.
Bad input raises `onpolicy_kd.errors.UserError` (a `ConfigError` for the recipe) with the same message
the command line prints.

In one process this runs as it is; for several processes or DeepSpeed put the call in a script and
start it with `accelerate launch script.py`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from onpolicy_kd.recipe import DICT_SOURCE, Recipe, load_recipe
from onpolicy_kd.errors import DataError, ModelLoadError
from onpolicy_kd.models.loading import load_models
from onpolicy_kd.training.loop import TrainResult
from onpolicy_kd.training.run_inputs import describe, object_values, resolve_file, run_resolved


def distill(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe,
    *overrides: str,
    teacher: PreTrainedModel | None = None,
    student: PreTrainedModel | torch.nn.Module | None = None,
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
    api_values = object_values(teacher, ("pretrained", describe(student)) if student is not None else None, train_data)
    if isinstance(recipe, Recipe):
        recipe = recipe.model_dump(mode="python")
    resolved = load_recipe(recipe, overrides, api_values=api_values)
    recipe_path = str(recipe) if not isinstance(recipe, Mapping) else DICT_SOURCE
    models = load_models(resolved, recipe_path, teacher=teacher, student=student, tokenizer=tokenizer) \
        if teacher is not None or student is not None else None
    return run_resolved(resolved, recipe_path, models, train_data, eval_data)


def distill_file(path: str | os.PathLike[str], *overrides: str) -> TrainResult:
    """Run a Distillation file, as `onpolicy-kd train FILE.py [overrides]` does."""
    run = resolve_file(path, overrides)
    return run_resolved(run.recipe, run.path, run.models, run.train_data, run.eval_data)
