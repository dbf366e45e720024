"""The recipe: one typed schema for a whole run (schema.py) and its layered, checked loading (loading.py)."""

from onpolicy_kd.recipe.loading import DICT_SOURCE, load_recipe, recipe_to_yaml
from onpolicy_kd.recipe.schema import (
    ENV_OVERRIDES, DataConfig, EvalConfig, HiddenConfig, LoggingConfig, ObjectiveConfig, OptimConfig,
    PenaltiesConfig, Recipe, RolloutConfig, StudentConfig, TeacherConfig, TrainConfig, cache_root,
)

__all__ = [
    "DICT_SOURCE", "ENV_OVERRIDES", "DataConfig", "EvalConfig", "HiddenConfig", "LoggingConfig", "ObjectiveConfig",
    "OptimConfig", "PenaltiesConfig", "Recipe", "RolloutConfig", "StudentConfig", "TeacherConfig", "TrainConfig",
    "cache_root", "load_recipe", "recipe_to_yaml",
]
