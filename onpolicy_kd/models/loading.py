"""Teacher and student models and their tokenizer.

- A model comes from a Hub name, a local folder (`save_pretrained` output) or a `.gguf` file
  (dequantised to dense weights by transformers). When the Hub is unreachable only local caches
  are tried, and a miss says how to point the recipe at local files.
- Student initialisation: pretrained weights, random init from a config, or a copy of a subset of
  the teacher's decoder layers (`layer_stride: 3` keeps layers 0, 3, 6, ...).
- The teacher is frozen and in eval mode. `trust_remote_code` stays off unless the recipe sets it.
- Teacher and student must map every token to the same id: the losses compare next-token
  distributions position by position over the shared vocabulary. Extra embedding rows (padding, as
  in Qwen's 151,936 tokens vs 152,064 rows) are fine; the losses use the first `len(tokenizer)`.
- The tokenizer pads on the left for generation; a tokenizer without a pad token (GPT-2) pads with
  EOS, so masks must come from lengths and attention, never from comparing ids to the pad id.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PretrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

from onpolicy_kd.recipe import Recipe, StudentConfig, TeacherConfig
from onpolicy_kd.recipe.schema import LoraSettings
from onpolicy_kd.errors import ConfigError, ModelLoadError, VocabularyMismatchError
from onpolicy_kd.hub import expand_path, hub_reachable, looks_like_local_path
from onpolicy_kd.models.distillation_file import load_distillation
from onpolicy_kd.models.bitnet import reload_exported as reload_exported_bitnet, to_bitnet
from onpolicy_kd.models.module_lm import ModuleLM, reload_exported as reload_exported_module
from onpolicy_kd.models.quantization import bitsandbytes_config, choose_backend as choose_quantization_backend
from onpolicy_kd.models.quantization import DEFAULT_GROUP_SIZE, quantize_weight_only
from onpolicy_kd.models.seq2seq import check_keys as check_seq2seq_keys, check_same_kind, head_is_plain, is_encoder_decoder
from onpolicy_kd.objectives.hidden import STITCHING

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass
class Models:
    teacher: PreTrainedModel | None  # None: let go by a stage whose steps did not run it (reloadable only)
    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase  # shared: the vocabularies were checked to be identical
    teacher_reloadable: bool = False  # a staged run loaded the teacher from its recipe: a stage whose steps do not
    #                                   run it may let it go (training/loop.py), a later stage loads it again
    student_tokenizer: PreTrainedTokenizerBase | None = None  # objective.cross_tokenizer: the student's own (else
    #                                                           `tokenizer` is both models')


@dataclass(frozen=True)
class Source:
    """Where to load from: a Hub id or local folder, plus the GGUF file name inside it, if any."""

    location: str
    gguf_file: str | None
    local: bool


def resolve_source(name_or_path: str, key: str) -> Source:
    path = Path(expand_path(name_or_path))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{key}: GGUF file not found: {path}")
        return Source(str(path.parent), path.name, local=True)
    if looks_like_local_path(name_or_path):
        if not path.exists():
            hint = ""
            if ".cache/onpolicy_kd" in str(path) or "onpolicy_kd" in str(path):
                hint = "\n  the offline assets are not installed yet: run `python -m onpolicy_kd.assets` (or scripts/setup.sh)"
            raise ModelLoadError(f"{key}: local path does not exist: {path}{hint}")
        return Source(str(path), None, local=True)
    return Source(name_or_path, None, local=False)


def _unreachable_message(what: str, name: str, key: str, recipe_path: str | None) -> str:
    where = f" in {recipe_path}" if recipe_path else ""
    return (
        f"cannot load the {key.split('.')[0]} {what} '{name}' ({key}{where}): it is not a local path, not in the local "
        f"Hugging Face cache, and the Hub is unreachable from this machine.\n"
        f"  Point the recipe at a local copy, saved where the Hub is reachable with\n"
        f"    AutoModelForCausalLM.from_pretrained('{name}').save_pretrained('/models/{name.split('/')[-1]}')  "
        f"(and the same for AutoTokenizer), or `hf download {name} --local-dir /models/{name.split('/')[-1]}`,\n"
        f"  then set {key}: /models/{name.split('/')[-1]} in the recipe or pass {key}=/models/{name.split('/')[-1]} "
        f"on the command line. A .gguf file path works too."
    )


def _load_kwargs(source: Source, revision: str | None, trust_remote_code: bool, key: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if revision and source.local:
        raise ModelLoadError(f"{key.split('.')[0]}.revision={revision!r} selects a version of a Hub model, but {key} is "
                             f"a local path ({source.location}); remove the revision")
    if revision:
        kwargs["revision"] = revision
    if not source.local and not hub_reachable():
        kwargs["local_files_only"] = True  # the HF cache may still have it; no minute of retries
    return kwargs


def _from_pretrained(loader: Any, source: Source, what: str, key: str, recipe_path: str | None, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(source.location, **kwargs)
    except SafetensorError as err:  # a truncated or corrupt weights file
        raise ModelLoadError(f"cannot read the {what}'s weights ({key}): {', '.join(_unreadable(source.location))} "
                             f"is truncated or corrupt ({err}); copy or convert the model again") from None
    except (OSError, ValueError) as err:
        if kwargs.get("local_files_only") and not source.local:
            raise ModelLoadError(_unreachable_message(what, source.location, key, recipe_path)) from None
        raise ModelLoadError(f"cannot load the {what} from {source.location!r} ({key}): {err}") from None


def _unreadable(location: str) -> list[str]:
    """The .safetensors files in a model folder whose header cannot be read (or the folder, when none is found)."""
    bad = []
    for file in sorted(Path(location).glob("*.safetensors")):
        try:
            safe_open(str(file), "pt").keys()
        except (SafetensorError, OSError):
            bad.append(str(file))
    return bad or [location]


def load_tokenizer(
    name_or_path: str, key: str, *, revision: str | None = None, trust_remote_code: bool = False,
    recipe_path: str | None = None,
) -> PreTrainedTokenizerBase:
    source = resolve_source(name_or_path, key)
    kwargs = _load_kwargs(source, revision, trust_remote_code, key)
    tokenizer = _from_pretrained(AutoTokenizer, source, "tokenizer", key, recipe_path, **kwargs)
    prepare_tokenizer_for_generation(tokenizer)
    return tokenizer


def prepare_tokenizer_for_generation(tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding (new tokens follow the prompt directly) and a pad token (EOS if there is none)."""
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; completions could never end")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def load_config(name_or_path: str, key: str, *, revision: str | None = None, trust_remote_code: bool = False,
                recipe_path: str | None = None) -> PretrainedConfig:
    """A model's config alone: seconds where the weights can take a minute, for checks made before loading them."""
    source = resolve_source(name_or_path, key)
    kwargs = _load_kwargs(source, revision, trust_remote_code, key)
    return _from_pretrained(AutoConfig, source, "model", key, recipe_path, **kwargs)


def load_model(
    name_or_path: str, key: str, *, dtype: str = "float32", revision: str | None = None,
    trust_remote_code: bool = False, attn_implementation: str | None = None, recipe_path: str | None = None,
    quantization_config: Any = None,
) -> PreTrainedModel:
    source = resolve_source(name_or_path, key)
    if source.local and (module := reload_exported_module(source.location)) is not None:
        return module  # a student that is not a transformers model, rebuilt by the Python file that defined it
    kwargs = _load_kwargs(source, revision, trust_remote_code, key)
    kwargs["dtype"] = DTYPES[dtype]
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    config_kwargs = {k: v for k, v in kwargs.items() if k in ("trust_remote_code", "gguf_file", "revision", "local_files_only")}
    config = _from_pretrained(AutoConfig, source, "model", key, recipe_path, **config_kwargs)
    model = _from_pretrained(auto_class(config), source, "model", key, recipe_path, **kwargs)
    if source.gguf_file:
        drop_gguf_marker(model)
    if source.local:
        reload_exported_bitnet(model, source.location)  # a BitNet student's export computes as it did in training
    return model


def auto_class(config: PretrainedConfig):
    """The transformers class that builds a model of `config`: encoder-decoder (T5, BART) or decoder-only."""
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def drop_gguf_marker(model: PreTrainedModel) -> None:
    """A GGUF checkpoint is dequantised on load; without the marker the dense model can be saved."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def decoder_layers(model: nn.Module, purpose: str = "to copy a subset of them") -> tuple[str, nn.ModuleList]:
    """The decoder's layer list: `model.layers` (Llama, Qwen), `transformer.h` (GPT-2), else the one ModuleList
    with `config.num_hidden_layers` entries (a plain-module student's blocks, whatever it calls them)."""
    n_layers = model.config.num_hidden_layers
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == n_layers and STITCHING not in name]
    named = [(name, module) for name, module in lists if name.split(".")[-1] in {"layers", "h"}]
    found = named or lists
    if len(found) != 1:
        raise ModelLoadError(f"cannot find the decoder layers of {type(model).__name__} {purpose}: "
                             f"{len(found)} ModuleLists hold {n_layers} (config.num_hidden_layers) modules")
    return found[0]


def copy_with_layers(teacher: PreTrainedModel, keep: list[int], dtype: str = "float32",
                     attn_implementation: str | None = None) -> PreTrainedModel:
    """A new model with the teacher's embeddings, head and the decoder layers in `keep` (in order)."""
    n_layers = teacher.config.num_hidden_layers
    if len(set(keep)) != len(keep) or any(not 0 <= i < n_layers for i in keep):
        raise ModelLoadError(f"student.keep_layers={keep}: need distinct layer ids in [0, {n_layers - 1}]")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    student = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype] if dtype != "auto" else teacher.dtype, **extra)

    # A fresh model re-numbers its attention `layer_idx` (KV-cache slots) from 0; copy weights by name.
    prefix, _ = decoder_layers(teacher)
    teacher_state = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        source_name = name
        if name.startswith(prefix + "."):
            index, rest = name[len(prefix) + 1 :].split(".", 1)
            source_name = f"{prefix}.{keep[int(index)]}.{rest}"
        state[name] = teacher_state[source_name]
    student.load_state_dict(state, strict=True)
    return student


def check_same_vocabulary(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel | None = None,
    student: PreTrainedModel | None = None,
) -> None:
    """Stop unless both tokenizers map every token to the same id (and the models can hold them)."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differ = [
            f"{token!r}: teacher id {teacher_vocab.get(token)}, student id {student_vocab.get(token)}"
            for token in sorted(set(teacher_vocab) | set(student_vocab), key=lambda t: teacher_vocab.get(t, 1 << 30))
            if teacher_vocab.get(token) != student_vocab.get(token)
        ]
        raise VocabularyMismatchError(
            f"teacher and student tokenizers differ: {len(differ)} tokens map to different ids "
            f"(teacher {len(teacher_vocab)} tokens, student {len(student_vocab)}), e.g.\n    "
            + "\n    ".join(differ[:5])
            + "\n  Token-level distillation compares the two models' distributions id by id, so they must share a "
            "tokenizer. Pick a student from the teacher's family, or use student.init=teacher_layers or init=config; "
            "or distil across the two tokenizers with objective.cross_tokenizer: spans (or uld), docs/training.md."
        )
    if teacher_tokenizer.eos_token_id != student_tokenizer.eos_token_id:
        raise VocabularyMismatchError(
            f"teacher EOS id {teacher_tokenizer.eos_token_id} differs from student EOS id "
            f"{student_tokenizer.eos_token_id}; set the same eos_token on both tokenizers"
        )
    for role, model in (("teacher", teacher), ("student", student)):
        if model is not None and model.get_input_embeddings().num_embeddings < len(teacher_vocab):
            raise VocabularyMismatchError(
                f"the {role} has {model.get_input_embeddings().num_embeddings} embedding rows for a "
                f"{len(teacher_vocab)}-token vocabulary"
            )


def check_cross_tokenizer(teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase,
                          student: PreTrainedModel) -> None:
    """What distilling across two tokenizers needs of them (objective.cross_tokenizer): fast tokenizers (character
    offsets), an EOS and a pad token each, and a student that can hold its own vocabulary."""
    for role, tokenizer in (("teacher", teacher_tokenizer), ("student", student_tokenizer)):
        if not getattr(tokenizer, "is_fast", False):
            raise VocabularyMismatchError(f"objective.cross_tokenizer needs a fast (Rust) tokenizer for the {role}; "
                                          f"convert it with transformers (AutoTokenizer.from_pretrained(..., "
                                          f"use_fast=True)) and save it")
        if tokenizer.eos_token_id is None:
            raise VocabularyMismatchError(f"objective.cross_tokenizer: the {role} tokenizer has no EOS token")
    if student.get_input_embeddings().num_embeddings < len(student_tokenizer):
        raise VocabularyMismatchError(f"the student has {student.get_input_embeddings().num_embeddings} embedding "
                                      f"rows for its {len(student_tokenizer)}-token vocabulary")


def load_teacher(cfg: TeacherConfig, recipe_path: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen teacher; bitsandbytes quantisation happens here, at load (weight_only after the student is built:
    a student copied from the teacher's layers must copy float weights)."""
    bnb = cfg.quantization is not None and choose_quantization_backend(cfg.quantization) == "bitsandbytes"
    teacher = load_model(
        cfg.name_or_path, "teacher.name_or_path", dtype=cfg.dtype, revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation, recipe_path=recipe_path,
        quantization_config=bitsandbytes_config(cfg.quantization, DTYPES[cfg.dtype]) if bnb else None,
    )
    if bnb:
        teacher.kd_quantization = {"backend": "bitsandbytes", "bits": cfg.quantization.bits}
    tokenizer = load_tokenizer(
        cfg.tokenizer or cfg.name_or_path, "teacher.tokenizer" if cfg.tokenizer else "teacher.name_or_path",
        revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, recipe_path=recipe_path,
    )
    freeze_teacher(teacher)
    return teacher, tokenizer


def freeze_teacher(teacher: PreTrainedModel) -> None:
    teacher.eval()
    teacher.requires_grad_(False)


def prepare_student(student: PreTrainedModel, cfg: StudentConfig) -> None:
    """Training mode, with the recipe's attention implementation, gradient checkpointing and BitNet layers (also for
    model objects given to the Python API)."""
    if isinstance(student, ModuleLM):
        unusable = [k for k in ("attn_implementation", "gradient_checkpointing", "bitnet", "lora") if getattr(cfg, k)]
        if unusable:
            raise ConfigError(f"student.{', student.'.join(unusable)}: the student is a plain torch module "
                              f"({student.config.module_class}), not a transformers model; build that into it instead")
        student.train()
        return
    if cfg.attn_implementation and student.config._attn_implementation != cfg.attn_implementation:
        student.set_attn_implementation(cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    if cfg.bitnet:
        to_bitnet(student, *decoder_layers(student))
    student.train()


def load_student(
    cfg: StudentConfig, teacher: PreTrainedModel, teacher_tokenizer: PreTrainedTokenizerBase,
    seed: int = 0, recipe_path: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    common = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, recipe_path=recipe_path)
    if cfg.init == "teacher_layers":
        if hasattr(next(teacher.parameters()), "ds_id"):  # built sharded (models.loading.whole_weights)
            raise ConfigError("student.init=teacher_layers copies the teacher's whole layers, but this DeepSpeed "
                              "ZeRO-3 launch builds models sharded (zero3_init_flag: true in the accelerate config); "
                              "set zero3_init_flag: false there (models then load whole and are sharded by prepare)")
        n_layers = teacher.config.num_hidden_layers
        keep = cfg.keep_layers or list(range(0, n_layers, cfg.layer_stride or 1))
        student = copy_with_layers(teacher, keep, cfg.dtype, cfg.attn_implementation)
        tokenizer = teacher_tokenizer
    elif cfg.init == "config":
        if cfg.name_or_path:
            source = resolve_source(cfg.name_or_path, "student.name_or_path")
            kwargs = _load_kwargs(source, cfg.revision, cfg.trust_remote_code, "student.name_or_path")
            config = _from_pretrained(AutoConfig, source, "student config", "student.name_or_path", recipe_path, **kwargs)
        else:
            config = copy.deepcopy(teacher.config)
        for field, value in cfg.config_overrides.items():
            if not hasattr(config, field):
                raise ModelLoadError(f"student.config_overrides.{field}: {type(config).__name__} has no field {field!r}")
            setattr(config, field, value)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        torch.manual_seed(seed)  # the random init is part of the run's seed
        student = auto_class(config).from_config(
            config, dtype=DTYPES[cfg.dtype] if cfg.dtype != "auto" else torch.float32,
            trust_remote_code=cfg.trust_remote_code,
            **({"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}),
        )
        tokenizer = load_tokenizer(cfg.tokenizer, "student.tokenizer", **common) if cfg.tokenizer else teacher_tokenizer
    elif cfg.init == "python":
        distillation, spec = load_distillation(cfg.name_or_path)
        torch.manual_seed(seed)  # the module's random init is part of the run's seed
        student = as_causal_lm(distillation.student(), "student()", source=spec)
        if cfg.dtype != "auto":
            student.to(DTYPES[cfg.dtype])
        tokenizer = load_tokenizer(cfg.tokenizer, "student.tokenizer", **common) if cfg.tokenizer else teacher_tokenizer
    else:
        assert cfg.name_or_path is not None  # checked by the schema
        student = load_model(
            cfg.name_or_path, "student.name_or_path", dtype=cfg.dtype,
            attn_implementation=cfg.attn_implementation, **common,
        )
        tokenizer = load_tokenizer(
            cfg.tokenizer or cfg.name_or_path, "student.tokenizer" if cfg.tokenizer else "student.name_or_path", **common
        )
    prepare_student(student, cfg)
    return student, tokenizer


def as_causal_lm(model: Any, what: str, source: str | None = None) -> PreTrainedModel:
    """A transformers model as it is; any other torch module wrapped as one (onpolicy_kd/models/module_lm.py).
    `source` (FILE.py:ClassName) lets the exported student be rebuilt by the same file."""
    if isinstance(model, PreTrainedModel):
        return model
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{what} must be a torch.nn.Module mapping (input_ids, attention_mask) to logits, or a "
                             f"transformers PreTrainedModel; got {type(model).__name__}")
    return ModuleLM(model, source=source)


def load_models(
    recipe: Recipe, recipe_path: str | None = None, *, teacher: PreTrainedModel | None = None,
    student: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
) -> Models:
    """The recipe's models, or the model objects given (the Python API), checked to share a vocabulary.

    A teacher object needs its `tokenizer`; a student object uses `tokenizer` or else the teacher's. The teacher
    must be a transformers causal LM (`PreTrainedModel`, custom architectures included) or an encoder-decoder one
    with a student of the same kind; a decoder-only student may also be
    any torch module mapping (input_ids, attention_mask) to logits.
    """
    with whole_weights():
        return _load_models(recipe, recipe_path, teacher=teacher, student=student, tokenizer=tokenizer)


@contextlib.contextmanager
def whole_weights() -> Iterator[None]:
    """Under a DeepSpeed ZeRO-3 launch, transformers builds every model inside DeepSpeed's zero.Init (each process
    holding only its shard from the start) as soon as an Accelerator exists, whatever the accelerate config's
    zero3_init_flag says. Building a student from the teacher's layers, converting layers and probing heads need
    whole weights, so with zero3_init_flag: false (the shipped configs) models load whole and `prepare` shards
    them afterwards. With zero3_init_flag: true they load sharded, as asked; a student copied from the teacher's
    layers is then refused (load_student)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    plugin = None
    if is_deepspeed_zero3_enabled():
        from accelerate.state import AcceleratorState

        plugin = AcceleratorState().deepspeed_plugin if AcceleratorState._shared_state else None
    if plugin is None or plugin.zero3_init_flag:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _load_models(recipe: Recipe, recipe_path: str | None, *, teacher: PreTrainedModel | None,
                 student: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None) -> Models:
    if teacher is not None and not isinstance(teacher, PreTrainedModel):
        raise ModelLoadError(
            f"teacher= must be a transformers PreTrainedModel (a causal LM with a KV cache, as AutoModelForCausalLM "
            f"returns, or an encoder-decoder one from AutoModelForSeq2SeqLM; custom subclasses included), got "
            f"{type(teacher).__name__}")
    if student is not None:
        student = as_causal_lm(student, "student=")
    if tokenizer is not None:
        prepare_tokenizer_for_generation(tokenizer)
    if teacher is None:
        teacher, teacher_tokenizer = load_teacher(recipe.teacher, recipe_path)
    elif tokenizer is None:
        raise ModelLoadError("a teacher model object needs its tokenizer: pass tokenizer= as well")
    else:
        teacher_tokenizer = tokenizer
        freeze_teacher(teacher)
    if is_encoder_decoder(teacher):
        check_seq2seq_keys(recipe)  # before a student is built from it
    if student is None:
        if getattr(teacher, "kd_quantization", {}).get("backend") == "bitsandbytes" and recipe.student.init == "teacher_layers":
            raise ConfigError("student.init=teacher_layers copies the teacher's layers, which bitsandbytes has already "
                              "quantised; set teacher.quantization.backend: weight_only (applied after the copy)")
        student, student_tokenizer = load_student(recipe.student, teacher, teacher_tokenizer, recipe.train.seed, recipe_path)
    else:
        student_tokenizer = tokenizer or teacher_tokenizer
        prepare_student(student, recipe.student)
    quantize_after_loading(teacher, recipe.teacher)  # weight_only, now that the student exists
    check_same_kind(teacher, student)
    if recipe.objective.cross_tokenizer:
        check_cross_tokenizer(teacher_tokenizer, student_tokenizer, student)
    else:
        check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher, student)
    models = Models(teacher=teacher, student=student, tokenizer=teacher_tokenizer,
                    student_tokenizer=student_tokenizer if recipe.objective.cross_tokenizer else None)
    check_recipe_fits(recipe, models)
    return models


def quantize_after_loading(teacher: PreTrainedModel, cfg: TeacherConfig) -> None:
    """teacher.quantization with the weight_only backend (bitsandbytes quantises at load: load_teacher)."""
    quant = cfg.quantization
    if quant is not None and not hasattr(teacher, "kd_quantization"):
        quantize_weight_only(teacher, decoder_layers(teacher)[1], quant.bits, quant.group_size or DEFAULT_GROUP_SIZE)


def reload_teacher(recipe: Recipe, recipe_path: str | None = None) -> PreTrainedModel:
    """The recipe's teacher loaded again as `load_models` left it (frozen, quantised as asked), for a run that let
    it go while its steps did not need it (training/loop.py)."""
    teacher, _ = load_teacher(recipe.teacher, recipe_path)
    quantize_after_loading(teacher, recipe.teacher)
    return teacher


def check_recipe_fits(recipe: Recipe, models: Models, where: str = "the recipe") -> None:
    """What a recipe (or a stage's) asks of the loaded models: the keys an encoder-decoder pair cannot take, and
    the longest sequence a run builds (a prompt plus the longest completion it samples, evaluates or reads; for an
    encoder-decoder pair, the longer of the two) within both models' position limits; past them a learned-position
    model fails with an IndexError mid-run."""
    seq2seq = is_encoder_decoder(models.teacher)
    if seq2seq:
        check_seq2seq_keys(recipe, where)
    completion = max(recipe.rollout.max_new_tokens, recipe.teacher_text_decoding()["max_new_tokens"],
                     recipe.eval.max_new_tokens, recipe.data.max_response_tokens)
    longest = max(recipe.data.max_prompt_tokens, completion) if seq2seq else recipe.data.max_prompt_tokens + completion
    for role, model in (("teacher", models.teacher), ("student", models.student)):
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and longest > limit:
            raise ConfigError(
                f"{where}: prompts of up to data.max_prompt_tokens={recipe.data.max_prompt_tokens} tokens plus "
                f"completions of up to {completion} (the largest of rollout.max_new_tokens="
                f"{recipe.rollout.max_new_tokens}, teacher_text.max_new_tokens="
                f"{recipe.teacher_text_decoding()['max_new_tokens']}, eval.max_new_tokens={recipe.eval.max_new_tokens}, "
                f"data.max_response_tokens={recipe.data.max_response_tokens}) make {longest} tokens, more than the "
                f"{role}'s {limit} positions (max_position_embeddings); lower those keys so they add up to at most "
                f"{limit}")


# config fields with which a model's logits are not `hidden @ lm_head.weight.T` (Gemma 2/3 soft-capping, Cohere,
# Granite, MiniCPM, Falcon-H1 scaling): the memory-bounded divergence, which projects hidden states itself, would
# compute something else than the model does
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                    "lm_head_multiplier", "scale_width")


def logits_are_linear(model: PreTrainedModel) -> bool:
    """Whether the model's logits are exactly its last hidden state times its output embedding matrix (for an
    encoder-decoder model, what its lm_head reads: a probe forward tells)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None or not hasattr(head, "weight"):
        return False
    if is_encoder_decoder(model):
        return head_is_plain(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in LOGIT_TRANSFORMS)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def with_lora(student: PreTrainedModel, cfg: LoraSettings) -> nn.Module:
    """student.lora: the student wrapped by peft with LoRA adapters (its own weights frozen, the adapters trainable)."""
    from peft import LoraConfig, get_peft_model

    task = "SEQ_2_SEQ_LM" if is_encoder_decoder(student) else "CAUSAL_LM"
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type=task,
                        target_modules=cfg.target_modules if isinstance(cfg.target_modules, str)
                        else list(cfg.target_modules))
    if getattr(student, "is_gradient_checkpointing", False):  # checkpointed blocks need inputs that want gradients
        student.enable_input_require_grads()
    try:
        return get_peft_model(student, config)
    except ValueError as err:  # e.g. target modules not found in the model
        raise ConfigError(f"student.lora: {err}") from None


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under peft's wrapper (the model itself when it has none)."""
    return model.get_base_model() if is_lora(model) else model
