"""The recipe: one typed schema for a whole distillation run, strictly checked.

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
| `ONPOLICY_KD_CACHE_DIR` | `data.cache_dir` (also the root of `${cache:...}` paths) |
| `ONPOLICY_KD_LOSS_BACKEND` | `objective.backend` |
| `ONPOLICY_KD_MIXED_PRECISION` | `train.mixed_precision` |
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from onpolicy_kd.errors import ConfigError

ENV_OVERRIDES: dict[str, str] = {
    "ONPOLICY_KD_OUTPUT_DIR": "train.output_dir",
    "ONPOLICY_KD_CACHE_DIR": "data.cache_dir",
    "ONPOLICY_KD_LOSS_BACKEND": "objective.backend",
    "ONPOLICY_KD_MIXED_PRECISION": "train.mixed_precision",
}

DICT_SOURCE = "<recipe dict>"  # how error messages and model cards name a recipe given as a Python mapping
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv", "skew_forward_kl", "skew_reverse_kl")
MODES = ("pg", "gkd", "kd", "seqkd", "sft")


def cache_root() -> Path:
    """Where converted offline assets and tokenised datasets live (never inside the repo)."""
    return Path(os.environ.get("ONPOLICY_KD_CACHE_DIR") or "~/.cache/onpolicy_kd").expanduser()


# `${cache:models/smollm2}` in a recipe resolves to a path under cache_root().
def _cache_path(sub: str = "") -> str:
    return str(cache_root() / sub)


if not OmegaConf.has_resolver("cache"):
    OmegaConf.register_resolver("cache", _cache_path)


class Section(BaseModel):
    # strict: a string is never silently turned into a number or a bool; unknown keys are errors.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class TeacherConfig(Section):
    name_or_path: str = Field(description="a Hub model name, a local folder, or a .gguf file")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    tokenizer: str | None = Field(None, description="tokenizer source when it differs from the model")
    dtype: Dtype = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2")


class StudentConfig(Section):
    init: Literal["pretrained", "config", "teacher_layers"] = Field(
        "pretrained",
        description="pretrained weights, random init from a config, or a copy of a subset of the teacher's layers",
    )
    name_or_path: str | None = Field(None, description="Hub name, local folder or .gguf (init=pretrained|config)")
    revision: str | None = None
    tokenizer: str | None = Field(None, description="tokenizer source; defaults to the model's, else the teacher's")
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="model config fields to change (init=config), e.g. num_hidden_layers: 4"
    )
    layer_stride: int | None = Field(None, ge=1, description="init=teacher_layers: keep every N-th teacher layer")
    keep_layers: list[int] | None = Field(None, min_length=1, description="init=teacher_layers: explicit layer ids")
    dtype: Dtype = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _init_sources(self) -> "StudentConfig":
        if self.init == "pretrained" and not self.name_or_path:
            raise ValueError("student.init=pretrained needs student.name_or_path")
        if self.init == "config" and not (self.name_or_path or self.config_overrides):
            raise ValueError("student.init=config needs student.name_or_path (a config source) or config_overrides")
        if self.init == "teacher_layers":
            if (self.layer_stride is None) == (self.keep_layers is None):
                raise ValueError("student.init=teacher_layers needs exactly one of layer_stride or keep_layers")
            if self.name_or_path:
                raise ValueError(
                    "student.name_or_path is not used when student.init=teacher_layers "
                    "(the student is copied from the teacher); remove one of them"
                )
        elif self.layer_stride is not None or self.keep_layers is not None:
            raise ValueError(f"student.layer_stride/keep_layers only apply to init=teacher_layers, not {self.init}")
        return self


class DataConfig(Section):
    path: str = Field(description="a Hub dataset name, a local data file (json, jsonl, csv, parquet, txt) or folder")
    name: str | None = Field(None, description="Hub dataset config, e.g. 3.0.0 for cnn_dailymail")
    split: str = Field("train", description="training split, slicing allowed: train[:280]")
    eval_split: str | None = Field(None, description="held-out split; when null, eval_size rows are held out")
    eval_size: int | float = Field(0.05, gt=0, description="rows held out (int) or fraction (< 1) when eval_split is null")
    format: Literal["auto", "summarization", "instruction", "chat", "text"] = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict, description="task field -> dataset column, e.g. {document: article, reference: highlights}"
    )
    template: str | None = Field(None, description="prompt template with {field} slots; default per format")
    chat_template: bool = Field(False, description="wrap the prompt in the tokenizer's chat template")
    system_prompt: str | None = None
    truncate_field: str | None = Field(None, description="the template field cut to fit; default per format")
    max_prompt_tokens: int = Field(512, ge=8)
    max_response_tokens: int = Field(256, ge=1)
    text_prompt_tokens: int = Field(64, ge=1, description="format=text: tokens of each text used as the prompt")
    max_samples: int | None = Field(None, ge=1, description="use at most this many training rows")
    cache_dir: str | None = Field(None, description="tokenised-data cache; default $ONPOLICY_KD_CACHE_DIR/data")
    num_proc: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _eval_size(self) -> "DataConfig":
        if isinstance(self.eval_size, float) and not self.eval_size < 1:
            raise ValueError(f"data.eval_size={self.eval_size}: a float is a fraction and must be < 1 (or give an int)")
        return self


class RolloutConfig(Section):
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0, description="> 0; divides both models' logits")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="in (0, 1]; 1 = off")
    alpha: float = Field(
        0.0, ge=0, lt=1,
        description="teacher mixing in [0, 1); pure teacher sampling is objective.mode=seqkd or objective.seq_kd=true",
    )
    do_sample: bool = Field(True, description="false = greedy decoding")
    stop_strings: list[str] = Field(default_factory=list)
    batch_size: int | None = Field(None, ge=1, description="generation batch; default train.batch_size")

    @model_validator(mode="after")
    def _greedy(self) -> "RolloutConfig":
        if not self.do_sample and (self.top_k or self.top_p < 1):
            raise ValueError("rollout.top_k/top_p have no effect with rollout.do_sample=false (greedy); remove them")
        return self


class ObjectiveConfig(Section):
    mode: Literal["pg", "gkd", "kd", "seqkd", "sft"] = "gkd"
    divergence: Literal[DIVERGENCES] = "reverse_kl"  # type: ignore[valid-type]
    beta: float = Field(0.5, ge=0, le=1, description="generalized JSD weight in [0, 1]: 0 = forward KL, 1 = reverse KL")
    skew: float = Field(0.1, gt=0, lt=1, description="skew KL mixing weight in (0, 1)")
    temperature: float = Field(1.0, gt=0, description="> 0; divides both models' logits inside the divergence")
    lmbda: float = Field(1.0, ge=0, le=1, description="gkd: probability of on-policy student samples in [0, 1]")
    seq_kd: bool = Field(False, description="gkd: off-policy steps use teacher samples instead of references")
    discount: float = Field(1.0, ge=0, le=1, description="pg: return discount gamma in [0, 1]")
    length_norm: bool = True
    single_step: bool = Field(True, description="pg: exact single-step reverse-KL term")
    importance: Literal["token", "sequence"] = Field(
        "token", description="pg with alpha > 0: per-token weights (MiniLLM, biased) or exact prefix-product weights"
    )
    is_clip: float | None = Field(None, gt=0, description="pg: cap on importance weights; null = no cap")
    pg_baseline: Literal["mean", "none"] = Field("mean", description="pg: subtract the batch's mean return (variance)")
    ppo_epochs: int = Field(1, ge=1)
    ppo_clip: float = Field(0.2, gt=0, lt=1)
    lm_coef: float = Field(0.0, ge=0, description="pg: weight of the language-modelling loss on references")
    backend: Literal["auto", "torch", "chunked", "liger"] = Field(
        "auto", description="divergence implementation; auto = liger on CUDA when it applies, else chunked torch"
    )
    chunk_size: int = Field(1024, ge=1, description="tokens per chunk in the memory-bounded divergence")


class PenaltiesConfig(Section):
    frequency: float = Field(0.0, ge=0)
    diversity: float = Field(0.0, ge=0)
    entropy: float = Field(0.0, ge=0)
    entropy_floor: float = Field(math.inf, ge=0, description="h_min in nats; .inf = plain entropy bonus")
    shape_reward: bool = Field(False, description="pg: also subtract the frequency penalty from the reward")


class HiddenConfig(Section):
    """Hidden-state distillation, an auxiliary loss added in every mode (onpolicy_kd/hidden.py)."""

    weight: float = Field(0.0, ge=0, description="weight of the hidden-state loss; 0 = off")
    loss: Literal["mse", "cosine"] = "mse"
    layers: Literal["auto"] | list[list[int]] = Field(
        "auto",
        description="'auto' (student layer i -> teacher layer i * L_teacher / L_student, nearest) or "
                    "[[student_layer, teacher_layer], ...]; 0 is the embedding output, i the output of layer i",
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_pairs(cls, value: Any) -> Any:
        # one clear message instead of pydantic's error per member of the union
        pairs_ok = isinstance(value, list) and value and all(
            isinstance(p, list) and len(p) == 2 and all(type(i) is int and i >= 0 for i in p) for p in value)
        if value != "auto" and not pairs_ok:
            raise ValueError("expected 'auto' or a non-empty list of [student_layer, teacher_layer] pairs of "
                             "non-negative ints, e.g. [[2, 6], [4, 12]]")
        return value


class OptimConfig(Section):
    name: Literal["adamw", "sgd", "adafactor"] = "adamw"
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only")
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null = off")

    @model_validator(mode="after")
    def _warmup(self) -> "OptimConfig":
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set optim.warmup_steps or optim.warmup_ratio, not both")
        return self


class TrainConfig(Section):
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1, description="prompts per process per micro-batch")
    grad_accum: int = Field(1, ge=1)
    seed: int = 42
    output_dir: str = "outputs/run"
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps; 0 = only at the end")
    save_total_limit: int = Field(2, ge=1)
    resume_from: str | None = Field(None, description="'latest' or a checkpoint folder")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    deterministic: bool = False
    max_bad_steps: int = Field(5, ge=1, description="consecutive NaN/Inf losses before the run stops")


class EvalConfig(Section):
    eval_steps: int = Field(0, ge=0, description="evaluate every N steps; 0 = before and after training only")
    max_samples: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(100, ge=1)
    seed: int = 1234
    full: bool = Field(False, description="also run the whole evaluation (ROUGE, KL on references, perplexity, "
                                          "distinct-n) at every evaluation during training")


class LoggingConfig(Section):
    log_steps: int = Field(1, ge=1)
    sample_steps: int = Field(0, ge=0, description="table of sample completions every N steps; 0 = off")
    num_samples: int = Field(2, ge=1)
    tensorboard: bool = False
    live: bool = Field(True, description="rich live display (off: plain lines, e.g. for log files)")


class Recipe(Section):
    teacher: TeacherConfig
    student: StudentConfig
    data: DataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    penalties: PenaltiesConfig = Field(default_factory=PenaltiesConfig)
    hidden: HiddenConfig = Field(default_factory=HiddenConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        mode = self.objective.mode
        if mode in ("kd", "seqkd", "sft") and self.rollout.alpha > 0:
            raise ValueError(
                f"rollout.alpha={self.rollout.alpha} mixes the teacher into student rollouts, "
                f"but objective.mode={mode} samples no student rollouts; set rollout.alpha=0 or use mode pg/gkd"
            )
        if self.objective.seq_kd and mode != "gkd":
            raise ValueError(f"objective.seq_kd applies to mode=gkd only (mode is {mode}); use mode=seqkd instead")
        if self.objective.ppo_epochs > 1 and mode != "pg":
            raise ValueError(f"objective.ppo_epochs={self.objective.ppo_epochs} applies to mode=pg only (mode is {mode})")
        if self.student.init == "teacher_layers" and self.student.tokenizer:
            raise ValueError("student.tokenizer is not used with student.init=teacher_layers (it is the teacher's)")
        return self


# ----------------------------------------------------------------------------------------------
# Loading and error reporting


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
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}\n  give the path of a YAML recipe, e.g. recipes/smollm2_news.yaml")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
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
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(items)))  # type: ignore[return-value]
    except OmegaConfBaseException as err:
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
            siblings = sorted(k[-1] for k in schema if k[:-1] == parent)
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
        if not loc or isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
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
        return Recipe.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, merged, where, path)) from None


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what --dry-run prints and the run saves)."""
    return yaml.safe_dump(recipe.model_dump(mode="python"), sort_keys=False, allow_unicode=True)
