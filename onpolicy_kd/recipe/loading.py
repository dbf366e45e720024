"""Reading a recipe: the YAML file, environment variables and command-line overrides, merged and validated.

A recipe is a YAML file (read with `yaml.safe_load` semantics), plus a few environment variables
for per-machine settings, plus `section.key=value` overrides from the command line. Precedence:
command line > environment > recipe file > schema defaults. The layers are merged by OmegaConf
(which also parses the dotted overrides and resolves `${cache:...}` paths) and validated by
pydantic, so an unknown key, a wrong type, an out-of-range value or a contradictory combination is
a `ConfigError` that names the source (file and line, command line, or environment variable), the
key, the bad value and what is allowed.

Environment variables (per-machine settings; each maps to one recipe key):

| variable | recipe key |
|---|---|
| `ONPOLICY_KD_OUTPUT_DIR` | `train.output_dir` |
| `ONPOLICY_KD_CACHE_DIR` | none: the cache root (`${cache:...}` paths; tokenised data and teacher completions in its `data/`, where `data.cache_dir` is unset) |
| `ONPOLICY_KD_LOSS_BACKEND` | `objective.backend` |
| `ONPOLICY_KD_MIXED_PRECISION` | `train.mixed_precision` |
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from onpolicy_kd.errors import ConfigError
from onpolicy_kd.recipe.schema import ENV_OVERRIDES, Recipe

DICT_SOURCE = "<recipe dict>"  # how error messages and model cards name a recipe given as a Python mapping


# ----------------------------------------------------------------------------------------------
# Loading and error reporting


class RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's rules, but numbers like `1e-4` (no dot) are floats, as YAML 1.2 and the command line read
    them; YAML 1.1 would make them strings, which the strict schema then rejects."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_key_lines(text: str, path: Path) -> dict[tuple[str, ...], int]:
    """Map each dotted key path of a YAML mapping to its 1-based line, for error messages.

    Also rejects duplicate keys, which yaml.safe_load would silently resolve by keeping the last one.
    """
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*prefix, str(key_node.value))
                if key in lines:
                    raise ConfigError(
                        f"{path}:{key_node.start_mark.line + 1}: duplicate key '{'.'.join(key)}' (first at line "
                        f"{lines[key]}); YAML would silently keep only the last one: merge them"
                    )
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _read_recipe_file(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.yaml"))
        hint = f"; it holds {', '.join(inside[:6])}" if inside else "; it holds no .yaml file"
        raise ConfigError(f"the recipe {path} is a directory, not a file{hint}\n  give the path of a YAML recipe, "
                          f"e.g. recipes/smollm2_news.yaml")
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}\n  give the path of a YAML recipe, e.g. recipes/smollm2_news.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte {err.object[err.start:err.start + 1]!r}); "
                          f"re-save the recipe as UTF-8") from None
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML\n  {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (teacher:, student:, data:, ...), got {type(data).__name__}")
    return data, _yaml_key_lines(text, path)


def _parse_dotlist(items: Sequence[str], what: str) -> dict[str, Any]:
    for item in items:
        key = item.split("=", 1)[0]
        if "=" not in item or not key or key.startswith("-"):
            raise ConfigError(f"{what} {item!r}: expected section.key=value, e.g. train.max_steps=10")
    for item in items:
        try:
            yaml.load(item.split("=", 1)[1], Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as err:
            raise ConfigError(f"{what} {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)}); "
                              f"quote it, or close its brackets") from None
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(items)))  # type: ignore[return-value]
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"{what}: cannot parse {list(items)}: {err}") from None


def _flatten_keys(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """The dotted paths of the leaves (sections keep the file's line in error messages)."""
    keys: set[tuple[str, ...]] = set()
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            keys |= _flatten_keys(value, path)
        else:
            keys.add(path)
    return keys


def _keys_under(loc: Sequence[str | int]) -> list[str]:
    """The valid keys of the section at `loc`, an error's location (list positions, e.g. the 0 of stages.0, stand for
    the list's items)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        # the section's model: the annotation itself, or inside list[X] / X | None
        candidates = (field.annotation, *typing.get_args(field.annotation))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _schema_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every valid dotted key of the schema, with its field info."""
    keys: dict[tuple[str, ...], Any] = {}
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        keys[path] = field
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _schema_keys(annotation, path)
    return keys


def _lookup(tree: Any, path: Sequence[str | int]) -> Any:
    for part in path:
        if isinstance(tree, Mapping) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and isinstance(part, int) and part < len(tree):
            tree = tree[part]
        else:
            return None
    return tree


def _format_errors(
    err: ValidationError,
    merged: Mapping[str, Any],
    where: Mapping[tuple[str, ...], str],
    recipe_path: Path,
) -> str:
    schema = _schema_keys(Recipe)
    out = [f"invalid recipe {recipe_path}"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if isinstance(p, (str, int)))
        # Pydantic puts model-level (validator) errors at the section's location; keep the path.
        key = ".".join(str(p) for p in loc) or "(recipe)"
        source = where.get(tuple(str(p) for p in loc))
        if source is None:
            # errors inside a section point at the section's own source line, when known
            for cut in range(len(loc) - 1, 0, -1):
                source = where.get(tuple(str(p) for p in loc[:cut]))
                if source:
                    break
        source = source or str(recipe_path)
        if e["type"] == "extra_forbidden":
            parent = tuple(str(p) for p in loc[:-1])
            siblings = _keys_under(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), siblings, n=1, cutoff=0.6)
            prefix = ".".join(parent) + "." if parent else ""
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {', '.join(siblings)}"
            out.append(f"  {key}: unknown key ({source})\n    {hint}")
            continue
        if e["type"] == "missing":
            out.append(f"  {key}: required key is missing ({source})")
            continue
        field = schema.get(tuple(str(p) for p in loc))
        msg = str(e["msg"]).removeprefix("Value error, ")
        if not loc or field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            # A contradiction between keys (a section's validator): the message names the keys.
            file_line = where.get(tuple(str(p) for p in loc), "") if loc else ""
            out.append(f"  {key}: contradictory settings ({file_line if ':' in file_line else recipe_path})\n    {msg}")
            continue
        value = _lookup(merged, loc)
        allowed = getattr(field, "description", None) if field is not None else None
        line = f"  {key} = {value!r} ({source})\n    {msg}" if field is not None else f"  {key} ({source})\n    {msg}"
        if allowed:
            line += f"\n    allowed: {allowed}"
        out.append(line)
    return "\n".join(out)


# section.key=value: a command-line override. A path never matches (a / or a suffix comes before any =).
OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]-]*=")


def recipe_and_overrides(arguments: Sequence[str]) -> tuple[str, list[str]]:
    """The recipe path and the overrides among a command's positional arguments, in any order: a section.key=value
    argument is never the recipe (`train --dry-run objective.beta=0.2 RECIPE` works as `train RECIPE ...` does)."""
    paths = [i for i, argument in enumerate(arguments) if not OVERRIDE.match(argument) or Path(argument).is_file()]
    if not paths:
        raise ConfigError(f"no recipe given: {' '.join(arguments)} are all section.key=value overrides; give the "
                          f"recipe file too, e.g. onpolicy-kd train recipes/smollm2_news.yaml train.max_steps=10")
    return arguments[paths[0]], [argument for i, argument in enumerate(arguments) if i != paths[0]]


def load_recipe(
    source: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    *,
    api_values: Mapping[str, Any] | None = None,
) -> Recipe:
    """Read, merge and validate a recipe. Raises `ConfigError` with a message a user can act on.

    `source` is a YAML file or, from Python, a mapping of sections. `api_values` (nested sections) are what
    the Python API sets from the objects it was given; they win over every other layer.
    """
    environ = os.environ if environ is None else environ
    if isinstance(source, Mapping):
        path, file_data, file_lines = Path(DICT_SOURCE), copy.deepcopy(dict(source)), {}
    else:
        path = Path(source)
        file_data, file_lines = _read_recipe_file(path)

    env_items = [f"{key}={environ[var]}" for var, key in ENV_OVERRIDES.items() if environ.get(var)]
    env_data = _parse_dotlist(env_items, "environment variable")
    cli_data = _parse_dotlist(overrides, "command-line override")
    api_data = dict(api_values or {})

    # Remember where each key came from, for error messages (later layers win).
    where: dict[tuple[str, ...], str] = {k: f"{path}:{line}" for k, line in file_lines.items()}
    env_var_of = {tuple(key.split(".")): var for var, key in ENV_OVERRIDES.items()}
    where |= {k: f"environment variable {env_var_of.get(k, '?')}" for k in _flatten_keys(env_data)}
    where |= {k: "command line" for k in _flatten_keys(cli_data)}
    where |= {k: "set by distill() from the objects passed to it" for k in _flatten_keys(api_data)}

    try:
        merged_conf = OmegaConf.merge(OmegaConf.create(file_data), env_data, cli_data, api_data)
        merged: dict[str, Any] = OmegaConf.to_container(merged_conf, resolve=True)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: cannot merge or resolve the recipe: {err}") from None

    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, merged, where, path)) from None
    resolve_stages(recipe, path)  # a broken stage is an error now, not when the run reaches it
    return recipe


STAGE_SECTIONS = ("objective", "rollout", "teacher_text", "replay", "data", "optim", "penalties", "hidden", "train")


def resolve_stages(recipe: Recipe, path: str | Path = DICT_SOURCE) -> list[Recipe]:
    """Every stage as a whole recipe: the recipe's sections with the stage's keys on top, its max_steps, and its own
    output folder `<output_dir>/stages/<k>-<name>`; each checked like a recipe."""
    base = recipe.model_dump(mode="python")
    base["stages"] = []
    resolved = []
    for k, stage in enumerate(recipe.stages):
        merged = copy.deepcopy(base)
        for section in STAGE_SECTIONS:
            merged[section] = {**merged[section], **copy.deepcopy(getattr(stage, section))}
        merged["train"] |= {"max_steps": stage.max_steps, "epochs": stage.epochs, "max_time": stage.max_time,
                            "output_dir": str(Path(recipe.train.output_dir) / "stages" / f"{k + 1}-{stage.name}")}
        where = {(section, *key): f"stages[{k}] ({stage.name})" for section in STAGE_SECTIONS
                 for key in _flatten_keys(getattr(stage, section))}
        try:
            resolved.append(Recipe.model_validate(merged))
        except ValidationError as err:
            message = _format_errors(err, merged, where, Path(path))
            raise ConfigError(message.replace(f"invalid recipe {path}", f"invalid stage {k} ({stage.name}) of {path}",
                                              1)) from None
    names = [stage.name for stage in recipe.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names must differ, got {names}")
    return resolved


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what --dry-run prints and the run saves)."""
    return yaml.safe_dump(recipe.model_dump(mode="python"), sort_keys=False, allow_unicode=True)


SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p")


def load_run_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """A finished run's saved recipe (`final/recipe.yaml`, every key resolved), also one an earlier version wrote:
    keys that version had and this one moved are carried to their place first (`migrate_saved`)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not (isinstance(data, dict) and _has_old_keys(data)):
        return load_recipe(path, overrides)
    return load_recipe(migrate_saved(data), overrides)


def _has_old_keys(data: dict) -> bool:
    return any("teacher_cache" in (section.get("rollout") or {}) for section in [data, *(data.get("stages") or [])])


def migrate_saved(data: dict) -> dict:
    """A saved recipe of a version where `rollout.*` decoded the teacher's text too (`rollout.teacher_cache`): the
    teacher's decoding moves to `teacher_text.*` where the objective trained on the teacher's text, and the rollout's
    sampling keys are dropped where nothing sampled the student (as that run did)."""
    from types import SimpleNamespace

    from onpolicy_kd.objectives.modes import samples_student, trains_on_teacher_text

    data = copy.deepcopy(data)
    objective = {"mode": "gkd", "seq_kd": False, "lmbda": 1.0, "lmbda_schedule": "constant", **(data.get("objective") or {})}
    for section in [data, *(data.get("stages") or [])]:
        rollout = section.get("rollout") or {}
        if "teacher_cache" not in rollout:
            continue
        # a stage's objective keys sit on the recipe's own (the top level's are already in `objective`)
        obj = SimpleNamespace(**{**objective, **((section.get("objective") or {}) if section is not data else {})})
        text = section.setdefault("teacher_text", {})
        text["cache"] = rollout.pop("teacher_cache")
        if trains_on_teacher_text(obj):
            text |= {key: rollout[key] for key in SAMPLING_KEYS if key in rollout}
            if not text.get("do_sample", True):  # greedy: the sampling keys had no effect on the teacher's text
                for key in ("temperature", "top_k", "top_p"):
                    text.pop(key, None)
        if not samples_student(obj):
            for key in SAMPLING_KEYS:
                rollout.pop(key, None)
    return data
