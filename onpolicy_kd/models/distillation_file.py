"""Distillation defined in your own Python file: `onpolicy-kd train my_distill.py [section.key=value ...]`.

The file defines one subclass of `Distillation`; any method it leaves alone falls back to the recipe:

    from onpolicy_kd import Distillation

    class MyDistill(Distillation):
        recipe = "recipes/smollm2_news.yaml"    # the other sections: a YAML file (relative to this file) or a dict
        overrides = ["train.max_steps=50"]      # applied to it, before the command line's

        def student(self, state_dict=None):     # required: a torch.nn.Module mapping (input_ids, attention_mask)
            model = MyModel()                   # to (B, T, V) logits (onpolicy_kd/models/module_lm.py), or a
            if state_dict is not None:          # transformers model; with state_dict: the weights of a trained one
                model.load_state_dict(state_dict)
            return model

        def teacher(self):                      # optional: (model, tokenizer); default: the recipe's teacher
            ...

        def dataset(self, split):               # optional: rows for "train" / "eval" (a datasets.Dataset, a list of
            ...                                 # row dicts, a dict of columns); None: the recipe's data for that split

The run records the file in its recipe (`student.init: python`, `student.name_or_path: /abs/my_distill.py:MyDistill`),
so `onpolicy-kd evaluate <run>` and resume rebuild the student with `student(state_dict=...)` from the same file.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from onpolicy_kd.errors import ConfigError, ModelLoadError


class Distillation:
    """Subclass this in a Python file (module docstring); `onpolicy-kd train FILE.py` runs it."""

    recipe: str | Mapping[str, Any] = {}
    overrides: list[str] = []

    def student(self, state_dict: dict[str, Any] | None = None) -> nn.Module:
        raise NotImplementedError("a Distillation subclass must define student(self, state_dict=None)")

    def teacher(self) -> Any:
        return None

    def dataset(self, split: str) -> Any:
        return None


def is_python_spec(target: str) -> bool:
    """Whether a command line's recipe argument names a Distillation file (FILE.py or FILE.py:ClassName)."""
    return target.endswith(".py") or ".py:" in target


def split_spec(spec: str) -> tuple[Path, str | None]:
    """`path.py` or `path.py:ClassName` -> (absolute path, class name or None)."""
    path, name = spec.rsplit(":", 1) if ".py:" in spec else (spec, None)
    return Path(path).expanduser().resolve(), name


def load_distillation(spec: str, key: str = "student.name_or_path") -> tuple[Distillation, str]:
    """The Distillation subclass in a file, instantiated, and its full spec `/abs/path.py:ClassName`."""
    path, name = split_spec(spec)
    if not path.is_file():
        raise ModelLoadError(f"{key}: Python file not found: {path}")
    module_name = f"onpolicy_kd_user_{abs(hash(str(path)))}"
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # before running it: dataclasses and pickling look classes up there
        try:
            loader_spec.loader.exec_module(module)
        except Exception:
            del sys.modules[module_name]
            raise
    found = {k: v for k, v in vars(module).items()
             if isinstance(v, type) and issubclass(v, Distillation) and v is not Distillation and v.__module__ == module_name}
    if name is not None and name not in found:
        raise ModelLoadError(f"{key}: {path} defines no Distillation subclass named {name!r} "
                             f"(it defines {sorted(found) or 'none'})")
    if name is None and len(found) != 1:
        raise ModelLoadError(f"{key}: {path} must define exactly one subclass of onpolicy_kd.Distillation, found "
                             f"{sorted(found) or 'none'}; name one as {path}:ClassName")
    name = name or next(iter(found))
    return found[name](), f"{path}:{name}"


def file_recipe(distillation: Distillation, path: Path) -> str | dict[str, Any]:
    """The class's `recipe`: a YAML path (relative to the Python file when it is there) or a dict."""
    recipe = distillation.recipe
    if isinstance(recipe, Mapping):
        return dict(recipe)
    if not isinstance(recipe, str) or not recipe:
        raise ConfigError(f"{path}: {type(distillation).__name__}.recipe must be a recipe file path or a dict of sections")
    beside = path.parent / recipe
    return str(beside) if not Path(recipe).is_absolute() and beside.is_file() else recipe
