"""The recipe schema: one typed section per concern, strictly checked (unknown keys, wrong types and
out-of-range values are errors), and the checks between keys.

Every key changes what a run does, or is an error: a key that only matters in some modes or settings
(say `objective.beta` outside the JSD, `optim.momentum` outside SGD) is rejected when it is set where it
has no effect, with a message saying where it applies. What each mode reads comes from the mode table
(onpolicy_kd/objectives/modes.py).
"""

from __future__ import annotations

import math
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from onpolicy_kd.hub import looks_like_local_path
from onpolicy_kd.objectives.divergences import BACKENDS, DIVERGENCES
from onpolicy_kd.objectives.modes import MODES, samples_student, trains_on_teacher_text
from onpolicy_kd.objectives.penalties import any_penalty

# ONPOLICY_KD_CACHE_DIR is not among them: it is the cache root (`cache_root()`), whose data/ is data.cache_dir's
# default. Copied into data.cache_dir it would put tokenised data and teacher completions beside the models (X/teacher
# instead of X/data/teacher: regenerated, never reused).
ENV_OVERRIDES: dict[str, str] = {
    "ONPOLICY_KD_OUTPUT_DIR": "train.output_dir",
    "ONPOLICY_KD_LOSS_BACKEND": "objective.backend",
    "ONPOLICY_KD_MIXED_PRECISION": "train.mixed_precision",
}


@dataclass(frozen=True)
class TrainableParts:
    """`train.trainable` read: which parts of the student train (decoder layers 1-based, as hidden.layers counts)."""

    embeddings: bool = True
    head: bool = True
    other: bool = True
    layers: frozenset[int] | None = None  # None = every decoder layer

    def trains_layer(self, number: int) -> bool:
        return self.layers is None or number in self.layers

    @property
    def names_layers(self) -> bool:
        """Whether applying this needs the decoder layers told apart from the other weights (some layers train and
        some do not, or no layer trains while the other weights do)."""
        return self.layers is not None and (bool(self.layers) or self.other)


_LAYER_RANGE = re.compile(r"^layers?\s+(\d+)(?:\s*-\s*(\d+))?$")


def parse_trainable(value: str | list[str]) -> TrainableParts:
    """`all`, or a list of parts: embeddings, head, other, 'layers A-B' / 'layer N' (1-based, inclusive)."""
    if value == "all":
        return TrainableParts()
    if not value:
        raise ValueError("train.trainable: an empty list trains nothing; name the parts that train, or all")
    flags, layers = set(), set()
    for part in value:
        text = str(part).strip()
        match = _LAYER_RANGE.match(text)
        if match:
            first, last = int(match[1]), int(match[2] or match[1])
            if first < 1 or last < first:
                raise ValueError(f"train.trainable: {text!r} is not a range of decoder layers (1-based, first <= last)")
            layers |= set(range(first, last + 1))
        elif text in ("embeddings", "head", "other"):
            flags.add(text)
        else:
            raise ValueError(f"train.trainable: unknown part {text!r}; use all, or a list of embeddings, head, other, "
                             f"'layers A-B' or 'layer N' (decoder layers, 1-based)")
    return TrainableParts("embeddings" in flags, "head" in flags, "other" in flags, frozenset(layers))


def cache_root() -> Path:
    """Where converted offline assets and tokenised datasets live (never inside the repo)."""
    return Path(os.environ.get("ONPOLICY_KD_CACHE_DIR") or "~/.cache/onpolicy_kd").expanduser()


# `${cache:models/smollm2}` in a recipe resolves to a path under cache_root().
def _cache_path(sub: str = "") -> str:
    return str(cache_root() / sub)


if not OmegaConf.has_resolver("cache"):
    OmegaConf.register_resolver("cache", _cache_path)


class Section(BaseModel):
    # strict: a string is never silently turned into a number or a bool; unknown keys are errors; .inf and .nan are
    # errors too (optim.lr=.inf would pass a dry run and fail after three NaN steps), except where a field allows .inf
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)


# Logits are divided by a temperature: below this they are multiplied by more than 20, the distributions are one-hot
# in float32 and the divergences grow as 1 / temperature (1e-8 gives a loss near 1e8), which no optimizer step survives.
MIN_TEMPERATURE = 0.05


def _sensible_temperature(value: float, key: str, greedy: str = "") -> float:
    if value < MIN_TEMPERATURE:
        raise ValueError(f"{key}={value:g} is below {MIN_TEMPERATURE}: logits divided by it are multiplied by more "
                         f"than {1 / MIN_TEMPERATURE:.0f}, so both models' distributions are one-hot and the loss "
                         f"grows as 1/temperature (1e-8 gives a loss near 1e8); {greedy}use {MIN_TEMPERATURE} or more")
    return value


Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class QuantizationConfig(Section):
    """The teacher's decoder weights in 8 or 4 bits (onpolicy_kd/models/quantization.py)."""

    bits: Literal[8, 4] = Field(description="8 or 4 bits per decoder weight")
    backend: Literal["auto", "weight_only", "bitsandbytes"] = Field(
        "auto", description="auto: bitsandbytes with CUDA and the package, else weight_only (any device)")
    group_size: int | None = Field(
        None, ge=2, multiple_of=2, description="weight_only 4-bit: inputs per scale (default 64, a divisor of most "
                                               "layer widths)")

    @model_validator(mode="after")
    def _group_size_with_4_bit_weight_only(self) -> QuantizationConfig:
        if self.group_size is not None and (self.bits != 4 or self.backend == "bitsandbytes"):
            raise ValueError("group_size applies to 4-bit weight_only quantisation only (8 bits: one scale per "
                             "output row; bitsandbytes: its own blocks); remove it")
        return self


class TeacherConfig(Section):
    name_or_path: str = Field(description="a Hub model name, a local folder, or a .gguf file")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    tokenizer: str | None = Field(None, description="tokenizer source when it differs from the model")
    dtype: Dtype = Field("float32", description="the teacher's weights' dtype when loaded")
    trust_remote_code: bool = Field(False, description="run a Hub model's own modelling code (off by default)")
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2")
    quantization: QuantizationConfig | None = Field(
        None, description="{bits: 8 | 4, backend: auto | weight_only | bitsandbytes}: less memory for the teacher")


class LoraSettings(Section):
    """A LoRA student (peft): the base weights stay frozen, only the adapters train; the export merges them."""

    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is (alpha / r) B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]), or every linear layer but the head")
    keep_adapters: bool = Field(False, description="also save the adapters alone (peft format) in final/adapter/")


class StudentConfig(Section):
    init: Literal["pretrained", "config", "teacher_layers", "python"] = Field(
        "pretrained",
        description="pretrained weights, random init from a config, a copy of a subset of the teacher's layers, or "
                    "python: any torch module built by a Python file's Distillation.student() (onpolicy_kd/models/distillation_file.py)",
    )
    name_or_path: str | None = Field(
        None, description="Hub name, local folder or .gguf (init=pretrained|config); init=python: FILE.py[:ClassName]")
    revision: str | None = Field(None, description="Hub revision of student.name_or_path")
    tokenizer: str | None = Field(None, description="tokenizer source; defaults to the model's, else the teacher's")
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="model config fields to change (init=config), e.g. num_hidden_layers: 4"
    )
    layer_stride: int | None = Field(None, ge=1, description="init=teacher_layers: keep every N-th teacher layer")
    keep_layers: list[int] | None = Field(None, min_length=1, description="init=teacher_layers: explicit layer ids")
    dtype: Dtype = Field(
        "float32", description="the student's weights' dtype (train.mixed_precision sets autocast separately)")
    trust_remote_code: bool = Field(False, description="run a Hub model's own modelling code (off by default)")
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory, slower)")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of every weight (peft)")
    bitnet: bool = Field(False, description="BitNet b1.58: ternary weights, 8-bit activations in the decoder's Linears")

    @model_validator(mode="after")
    def _init_sources(self) -> "StudentConfig":
        if self.bitnet and self.lora:
            raise ValueError("student.bitnet trains the student's own weights as ternary ones, student.lora freezes "
                             "them; use one of the two")
        if self.init in ("pretrained", "python") and not self.name_or_path:
            raise ValueError(f"student.init={self.init} needs student.name_or_path"
                             + (" (FILE.py or FILE.py:ClassName)" if self.init == "python" else ""))
        if self.init == "python" and (self.bitnet or self.gradient_checkpointing or self.config_overrides or self.lora
                                      or self.attn_implementation):
            raise ValueError("student.init=python builds the student with your own code: student.bitnet, lora, "
                             "gradient_checkpointing, attn_implementation and config_overrides apply to "
                             "transformers models only")
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
    eval_split: str | None = Field(None, description="held-out split (of data.eval_path when set, where it defaults "
                                                     "to train); when both are null, eval_size rows are held out")
    eval_size: int | float = Field(0.05, gt=0, description="rows held out (int) or fraction (< 1) when eval_split is "
                                                           "null")
    eval_path: str | None = Field(
        None, description="held-out prompts from another data file or Hub dataset (same format, template and limits "
                          "as the training data), e.g. articles with human-written references; data.eval_split "
                          "chooses its rows")
    eval_columns: dict[str, str] | None = Field(
        None, description="task field -> column of the data.eval_path data, when its columns differ; default "
                          "data.columns")
    format: Literal["auto", "summarization", "instruction", "chat", "text"] = Field(
        "auto", description="auto = detected from the columns ([data.md](data.md))")
    columns: dict[str, str] = Field(
        default_factory=dict, description="task field -> dataset column, e.g. {document: article, reference: highlights}"
    )
    template: str | None = Field(None, description="prompt template with {field} slots; default per format")

    @field_validator("template")
    @classmethod
    def _template_slots(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                list(string.Formatter().parse(value))
            except ValueError as err:
                raise ValueError(f"{err} in {value!r}: slots are {{field}}; write a literal brace as {{{{ or }}}}") from None
        return value
    chat_template: bool = Field(False, description="wrap the prompt in the tokenizer's chat template")
    system_prompt: str | None = Field(None, description="a system message put before the prompt in the chat template")
    truncate_field: str | None = Field(None, description="the template field cut to fit; default per format")
    max_prompt_tokens: int = Field(
        512, ge=8, description="prompts are cut to this many tokens (only the long field: the instruction survives)")
    max_response_tokens: int = Field(256, ge=1, description="references are cut to this many tokens")
    text_prompt_tokens: int = Field(64, ge=1, description="format=text: tokens of each text used as the prompt")
    max_samples: int | None = Field(None, ge=1, description="use at most this many training rows")
    cache_dir: str | None = Field(None, description="tokenised-data cache; default $ONPOLICY_KD_CACHE_DIR/data")
    num_proc: int | None = Field(None, ge=1, description="processes for tokenising the data")

    @model_validator(mode="after")
    def _eval_size(self) -> "DataConfig":
        if isinstance(self.eval_size, float) and not self.eval_size < 1:
            raise ValueError(f"data.eval_size={self.eval_size}: a float is a fraction and must be < 1 (or give an int)")
        return self

    @property
    def held_out_split(self) -> str | None:
        """The split the held-out rows come from: data.eval_split, or all of data.eval_path's train split."""
        return self.eval_split or ("train" if self.eval_path else None)


class RolloutConfig(Section):
    max_new_tokens: int = Field(
        128, ge=1, description="tokens sampled per completion (the teacher's text too, unless "
                               "teacher_text.max_new_tokens)")
    temperature: float = Field(1.0, gt=0, description=f">= {MIN_TEMPERATURE}; divides both models' logits")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="in (0, 1]; 1 = off")
    alpha: float = Field(
        0.0, ge=0, lt=1,
        description="teacher mixing in [0, 1) of the student's samples, so only where they are drawn (mode pg or "
                    "distillm2, or gkd with lmbda > 0); pure teacher sampling is objective.mode=seqkd or "
                    "objective.seq_kd=true",
    )
    do_sample: bool = Field(True, description="false = greedy decoding")
    stop_strings: list[str] = Field(
        default_factory=list, description="a completion ends at the first of these (as at EOS)")
    truncated: Literal["keep", "mask", "penalise"] = Field(
        "keep", description="the student's samples cut at max_new_tokens (no EOS or stop string): keep = trained on "
                            "like the others; mask = left out of the loss; penalise = trained on, plus "
                            "truncation_penalty x a score-function term that lowers the probability of being cut "
                            "(every step logs the share cut, rollout/truncated)")
    truncation_penalty: float = Field(1.0, gt=0, description="truncated=penalise: the cost of a cut sample")
    batch_size: int | None = Field(
        None, ge=1, description="prompts per generation call, independent of the training micro-batch (the step's "
                                "prompts are generated in batches of this size, then split into micro-batches); "
                                "default train.batch_size")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "teacher_cache" in data:
            raise ValueError(f"rollout.teacher_cache is now teacher_text.cache (write teacher_text: {{cache: "
                             f"{str(data['teacher_cache']).lower()}}}): the teacher's text has its own decoding keys, "
                             f"teacher_text.do_sample, temperature, top_k, top_p, max_new_tokens and samples_per_prompt, "
                             f"and the rollout's keys decode the student's samples only. The teacher's text is greedy "
                             f"unless teacher_text.do_sample=true (it used to follow rollout.do_sample, true by default)")
        return data

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        return _sensible_temperature(value, "rollout.temperature", "for greedy decoding set rollout.do_sample=false, "
                                                                  "else ")

    @model_validator(mode="after")
    def _greedy(self) -> "RolloutConfig":
        if not self.do_sample and (self.top_k or self.top_p < 1):
            raise ValueError("rollout.top_k/top_p have no effect with rollout.do_sample=false (greedy); remove them")
        return self


class TeacherTextConfig(Section):
    """The teacher's completions of the training prompts, which off-policy steps train on (mode seqkd; gkd with
    seq_kd, on the steps the lambda coin gives to the teacher). They are decoded by these keys, independent of the
    rollout's, so a gkd run can mix greedy (or sampled) teacher text with the student's samples at temperature 1."""

    cache: bool = Field(
        False, description="generate the teacher's text once per training prompt (samples_per_prompt of them) and "
                           "cache it under data.cache_dir/teacher, reused by later runs; false = the teacher decodes "
                           "afresh at every step that trains on its text")
    do_sample: bool = Field(False, description="false = the teacher's greedy completion; true = sampled")
    temperature: float = Field(1.0, gt=0, description=f">= {MIN_TEMPERATURE}; sampling temperature")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="in (0, 1]; 1 = off")
    max_new_tokens: int | None = Field(None, ge=1, description="default rollout.max_new_tokens")
    stop_strings: list[str] | None = Field(None, description="default rollout.stop_strings")
    samples_per_prompt: int = Field(
        1, ge=1, description="cache: sampled completions per prompt (the first seeded with train.seed, the others "
                             "with seeds far from other runs'); a step "
                             "trains on one of them per prompt, drawn from (seed, step, row)")
    topk: int | None = Field(
        None, ge=1, description="cache: also keep the teacher's k most likely next tokens and their log-probabilities "
                                "at every position of its cached text (at objective.temperature), and train on them "
                                "instead of running the teacher's forward: the divergence over those k tokens and "
                                "one bucket for the rest of the vocabulary (docs/algorithms.md); null = the teacher's "
                                "forward at every step")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        return _sensible_temperature(value, "teacher_text.temperature", "for greedy text set "
                                                                       "teacher_text.do_sample=false, else ")

    @model_validator(mode="after")
    def _sampling_keys(self) -> "TeacherTextConfig":
        if not self.do_sample and (self.top_k or self.top_p < 1 or self.temperature != 1.0):
            raise ValueError("teacher_text.temperature/top_k/top_p have no effect with teacher_text.do_sample=false "
                             "(greedy); remove them or set do_sample=true")
        if self.topk and not self.cache:
            raise ValueError(f"teacher_text.topk={self.topk} keeps the teacher's top-k in the cache of its text: set "
                             f"teacher_text.cache=true")
        if self.samples_per_prompt > 1 and not (self.do_sample and self.cache):
            raise ValueError(f"teacher_text.samples_per_prompt={self.samples_per_prompt} caches several sampled "
                             f"completions per prompt: it needs teacher_text.do_sample=true and teacher_text.cache=true "
                             f"(greedy text is one completion; without the cache each step samples afresh)")
        return self


class ReplayConfig(Section):
    """Reuse of the student's samples across steps (onpolicy_kd/rollout/replay.py), for mode gkd."""

    size: int = Field(0, ge=0, description="student samples kept for reuse; 0 = off")
    share: float = Field(0.5, ge=0, le=1, description="probability that a student-sample step trains on stored "
                                                       "samples instead of drawing new ones (when enough are stored)")
    reuse: int = Field(1, ge=1, description="times a stored sample is trained on again after the step that drew it")
    max_age: int | None = Field(None, ge=1, description="steps after which a stored sample is dropped; null = no limit")


class ObjectiveConfig(Section):
    mode: Literal[tuple(MODES)] = Field(
        "gkd", description="where a step's completions come from and its loss "
                           "([algorithms.md](algorithms.md))")  # type: ignore[valid-type]
    divergence: Literal[tuple(DIVERGENCES)] = Field(
        "reverse_kl", description="the per-token divergence between teacher p and student q "
                                  "([algorithms.md](algorithms.md#divergences-objectivedivergence-per-position))")  # type: ignore[valid-type]
    beta: float = Field(0.5, ge=0, le=1, description="generalized JSD weight in [0, 1]: 0 = forward KL, 1 = reverse KL")
    skew: float = Field(0.1, gt=0, lt=1, description="skew KL mixing weight in (0, 1)")
    temperature: float = Field(1.0, gt=0, description=f">= {MIN_TEMPERATURE}; divides both models' logits inside "
                                                      f"the divergence")
    lmbda: float = Field(1.0, ge=0, le=1, description="gkd: probability of on-policy student samples in [0, 1]")
    lmbda_schedule: Literal["constant", "adaptive"] = Field(
        "constant", description="gkd: adaptive = lmbda is the starting share, raised by lmbda_step (up to 1) after each "
                                "held-out evaluation whose KL(student || teacher) on the student's own samples is "
                                "higher than at the evaluation before (DistiLLM's adaptive schedule)")
    lmbda_step: float = Field(0.1, gt=0, le=1, description="gkd, lmbda_schedule=adaptive: the share's increment")
    seq_kd: bool = Field(False, description="gkd: off-policy steps use teacher samples instead of references")
    cross_tokenizer: Literal["spans", "uld"] | None = Field(
        None, description="kd/gkd with a student whose tokenizer differs from the teacher's: spans = the divergence on "
                          "the tokens both vocabularies share where the two tokenizations agree, the span probability "
                          "elsewhere; uld = the sorted-probability distance position by position (docs/algorithms.md); "
                          "null = one shared vocabulary (required)")
    discount: float = Field(1.0, ge=0, le=1, description="pg: return discount gamma in [0, 1]")
    length_norm: bool = Field(True, description="pg: divide each return by its number of terms")
    single_step: bool = Field(True, description="pg: exact single-step reverse-KL term")
    importance: Literal["token", "sequence"] = Field(
        "token", description="pg with alpha > 0: per-token weights (MiniLLM, biased) or exact prefix-product weights"
    )
    is_clip: float | None = Field(None, gt=0, description="pg: cap on importance weights; null = no cap")
    pg_baseline: Literal["mean", "none"] = Field("mean", description="pg: subtract the batch's mean return (variance)")
    ppo_epochs: int = Field(1, ge=1, description="pg: optimizer steps per rollout (PPO ratio clipping when > 1)")
    ppo_clip: float = Field(0.2, gt=0, lt=1, description="pg: the PPO clip range epsilon")
    lm_coef: float = Field(0.0, ge=0, description="pg: weight of the language-modelling loss on references")
    prompt_weight: float = Field(
        0.0, ge=0, description="kd/gkd: weight of the same divergence at the prompt's own tokens (teacher-forced "
                               "distillation of the prompt text, e.g. healing a pruned student on the articles it "
                               "reads); 0 = completions only")
    backend: Literal[("auto", *BACKENDS)] = Field(  # type: ignore[valid-type]
        "auto", description="how every loss reads the student's distribution: torch = full (B, T, V) logits; "
                            "chunked = from hidden states and lm_heads, chunk_size tokens at a time (memory-bounded); "
                            "liger = a divergence through Liger-Kernel on CUDA; auto = liger on CUDA when it applies, "
                            "else chunked (full logits only where a model's head is not a plain linear map)"
    )
    chunk_size: int = Field(1024, ge=1, description="tokens per chunk on the memory-bounded head")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        return _sensible_temperature(value, "objective.temperature")


class PenaltiesConfig(Section):
    frequency: float = Field(
        0.0, ge=0, description="weight of the frequency penalty (the student's probability of tokens already in its "
                               "text); 0 = off")
    diversity: float = Field(
        0.0, ge=0, description="weight of the diversity penalty (spread of expected embeddings); 0 = off")
    entropy: float = Field(0.0, ge=0, description="weight of the entropy penalty (below entropy_floor); 0 = off")
    entropy_floor: float = Field(math.inf, ge=0, allow_inf_nan=True, description="h_min in nats; .inf = plain "
                                                                                 "entropy bonus")
    shape_reward: bool = Field(False, description="pg: also subtract the frequency penalty from the reward")


def hidden_stitches(weight: float | None, loss: str | None) -> bool:
    """Whether hidden.weight and hidden.loss put stitching projections on the student (also for a checkpoint's saved
    recipe and a stage's changed keys, which are not HiddenConfigs)."""
    return bool(weight) and loss != "attention_relation"


class HiddenConfig(Section):
    """Hidden-state distillation, an auxiliary loss added in every mode (onpolicy_kd/objectives/hidden.py), or the
    attention relations of the paired layers (onpolicy_kd/objectives/relations.py)."""

    weight: float = Field(0.0, ge=0, description="weight of the hidden-state loss; 0 = off")
    loss: Literal["mse", "cosine", "attention_relation"] = Field(
        "mse", description="mse or cosine between projected student and teacher hidden states; attention_relation: "
                           "MiniLMv2's query/key/value self-attention relations of the paired layers (no projection)")
    layers: Literal["auto"] | list[list[int]] = Field(
        "auto",
        description="'auto' (student layer i -> teacher layer i * L_teacher / L_student, nearest) or "
                    "[[student_layer, teacher_layer], ...]; 0 is the embedding output, i the output of layer i "
                    "(attention_relation: the attention of decoder layer i, so i >= 1)",
    )
    relation_heads: int | None = Field(
        None, ge=1, description="attention_relation: relation heads R, dividing both models' query and key/value "
                                "widths; null = the largest such R keeping every relation head at least 16 wide")

    @property
    def stitched(self) -> bool:
        """Whether the loss trains stitching projections on the student (mse, cosine; relations need none)."""
        return hidden_stitches(self.weight, self.loss)

    @property
    def relations(self) -> bool:
        """Whether the loss reads attention relations (hidden.loss=attention_relation, weight > 0)."""
        return bool(self.weight) and self.loss == "attention_relation"

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

    @model_validator(mode="after")
    def _relation_layers(self) -> "HiddenConfig":
        if self.loss == "attention_relation" and self.layers != "auto" and any(0 in pair for pair in self.layers):
            raise ValueError(f"hidden.layers={self.layers}: attention_relation reads the attention of decoder layers "
                             f"1..L; layer 0 (the embedding output) has none")
        return self


class OptimConfig(Section):
    name: Literal["adamw", "sgd", "adafactor"] = Field(
        "adamw", description="the optimizer (AdamW is torch's fused one)")
    lr: float = Field(1e-5, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (AdamW)")
    betas: list[float] = Field(
        default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2, description="AdamW's betas")
    eps: float = Field(1e-8, gt=0, description="AdamW's epsilon")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only")
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning-rate schedule after warm-up; a decaying one follows the larger of the step "
                                "and time budgets' fractions")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warm-up as a fraction of the step budget (needs one)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null = off")

    @model_validator(mode="after")
    def _warmup(self) -> "OptimConfig":
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set optim.warmup_steps or optim.warmup_ratio, not both")
        return self


DEFAULT_MAX_STEPS = 100  # a run's length when the recipe gives no budget
TIME_ONLY_STEP_CAP = 1_000_000  # a run with only a time budget: a step cap it will not reach


class TrainConfig(Section):
    max_steps: int | None = Field(None, ge=1, description=f"optimizer steps (with max_time: at most this many); "
                                                          f"{DEFAULT_MAX_STEPS} when no budget is given")
    epochs: float | None = Field(
        None, gt=0, description="passes over the training prompts, instead of max_steps: an epoch is "
                                "ceil(rows / (batch_size x grad_accum x processes)) steps (fractions allowed)")
    max_time: float | None = Field(
        None, gt=0, description="a wall-clock budget in seconds of training steps (evaluation, checkpoints and "
                                "loading not counted): the run stops at whichever of the step budget (max_steps or "
                                "epochs) and max_time comes first, and the learning-rate schedule follows the larger "
                                "of the two fractions used")
    batch_size: int = Field(8, ge=1, description="prompts per process per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (gradient accumulation)")
    seed: int = Field(42, ge=0, lt=2**32, description="seeds the student's init, the prompt order and sampling")
    output_dir: str = Field(
        "outputs/run", description="the run's folder: metrics.jsonl, checkpoints/, final/ (env ONPOLICY_KD_OUTPUT_DIR)")
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps; 0 = only at the end")
    save_total_limit: int = Field(2, ge=1, description="checkpoints of this run kept")
    resume_from: str | None = Field(None, description="'latest' or a checkpoint folder")
    overwrite: bool = Field(False, description="start over in an output_dir that holds another run (its files are "
                                               "deleted first); without it such a run is refused at start-up")
    push_to_hub: bool = Field(False, description="push final/ (weights, tokenizer, model card, recipe) to the Hub "
                                                 "at the end; checked at start-up (offline: a clear error)")
    hub_model_id: str | None = Field(None, pattern=r"^[\w.-]+(/[\w.-]+)?$",
                                     description="the Hub repository to push to, e.g. me/smollm2-student")
    hub_private: bool = Field(False, description="create the Hub repository as private")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="bf16/fp16: the student's training forward and backward under autocast (float32 weights and "
                          "optimizer; the teacher stays in its dtype)")
    deterministic: bool = Field(
        False, description="deterministic algorithms: a resumed run ends with an uninterrupted run's weights")
    max_bad_steps: int = Field(5, ge=1, description="consecutive NaN/Inf losses before the run stops")
    trainable: Literal["all"] | list[str] = Field(
        "all", description="the student's parts that train (the rest is frozen): all, or a list of embeddings, "
                           "'layers A-B' / 'layer N' (decoder layers, 1-based as hidden.layers numbers them), head, "
                           "other (the final norm and anything else); stitching projections always train")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_not_false(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML (and so the command line) reads a bare `no` as false

    @field_validator("trainable")
    @classmethod
    def _trainable_parts(cls, value: Any) -> Any:
        if value != "all":
            parse_trainable(value)  # raises with the part it cannot read
        return value

    @model_validator(mode="after")
    def _one_step_budget(self) -> "TrainConfig":
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError(f"train.epochs={self.epochs:g} and train.max_steps={self.max_steps} are two step budgets "
                             f"for one run: keep one (on the command line, train.max_steps=null or train.epochs=null "
                             f"removes the file's)")
        return self

    @model_validator(mode="after")
    def _hub_repo(self) -> "TrainConfig":
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("train.push_to_hub needs train.hub_model_id (the repository, e.g. me/my-student)")
        return self

    def total_steps(self, n_rows: int, num_processes: int) -> int:
        """Optimizer steps of the run: max_steps, or epochs over `n_rows` training prompts (each step takes
        batch_size x grad_accum prompts on every process), or the time-only cap, or the default."""
        if self.epochs is not None:
            per_epoch = math.ceil(n_rows / (self.batch_size * self.grad_accum * num_processes))
            return max(1, math.ceil(self.epochs * per_epoch))
        if self.max_steps is not None:
            return self.max_steps
        return TIME_ONLY_STEP_CAP if self.max_time is not None else DEFAULT_MAX_STEPS


class EvalConfig(Section):
    eval_steps: int = Field(0, ge=0, description="evaluate every N steps; 0 = before and after training only")
    max_samples: int = Field(32, ge=1, description="held-out prompts judged at each evaluation")
    batch_size: int = Field(
        8, ge=1, description="held-out prompts per generation batch (each batch its own sampling seed)")
    max_new_tokens: int = Field(100, ge=1, description="tokens per held-out completion")
    seed: int = Field(1234, description="seeds the sampled held-out completions (of student and teacher)")
    temperature: float = Field(1.0, gt=0, description=f">= {MIN_TEMPERATURE}; the sampled held-out completions (text "
                                                      f"metrics and the KLs on the student's own samples) are drawn at it")
    samples_per_prompt: int = Field(
        3, ge=1, description="sampled completions per held-out prompt, for the student and for the teacher (each "
                             "with its own seed): the sampled text metrics are their mean, the KLs are on each "
                             "prompt's first sample, and the student is also scored against the best-matching teacher "
                             "sample")
    answer_pattern: str | None = Field(
        None, description="a regular expression with one group that finds a completion's final answer (its last "
                          "match), e.g. 'Answer: (-?[0-9]+)': exact-match accuracy against the answer in the "
                          "reference, greedy and sampled; a completion with no match counts as wrong")
    full: bool = Field(False, description="also KL and perplexity on the references at every evaluation during "
                                          "training (the evaluate command always computes them)")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        return _sensible_temperature(value, "eval.temperature", "the greedy completions are judged anyway; ")

    @field_validator("answer_pattern")
    @classmethod
    def _one_group(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                groups = re.compile(value).groups
            except re.error as err:
                raise ValueError(f"eval.answer_pattern {value!r} is not a regular expression: {err}") from None
            if groups != 1:
                raise ValueError(f"eval.answer_pattern {value!r} has {groups} groups; it needs exactly one, around the "
                                 f"answer, e.g. 'Answer: (-?[0-9]+)' (write other parentheses as (?:...))")
        return value
    collapse_distinct1: float = Field(
        0.3, ge=0, le=1, description="warn when the student's greedy held-out completions have a mean distinct-1 "
                                     "below this (the text is collapsing onto repeats)")
    stop_on_collapse: bool = Field(False, description="end the run (or the stage) at an evaluation that finds "
                                                      "collapse; the student is exported as it is")


# experiment trackers accelerate drives (`Accelerator(log_with=...)`) -> the package each needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
            "comet_ml": "comet-ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab"]


class LoggingConfig(Section):
    log_steps: int = Field(1, ge=1, description="write metrics every N steps")
    sample_steps: int = Field(0, ge=0, description="table of sample completions every N steps; 0 = off")
    num_samples: int = Field(2, ge=1, description="completions per sample table")
    report_to: list[Tracker] = Field(
        default_factory=list, description="experiment trackers, through accelerate: the metrics of every logged step "
                                          "and the resolved recipe as the run's config (metrics.jsonl is always written)")
    run_name: str | None = Field(None, description="the run's name in the trackers; default: output_dir's folder name")
    live: bool = Field(True, description="rich live display (off: plain lines, e.g. for log files)")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tensorboard" in data:
            raise ValueError("logging.tensorboard is now logging.report_to: [tensorboard] (any of "
                             f"{sorted(TRACKERS)})")
        return data

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"logging.report_to names a tracker twice: {value}")
        return value


class StageConfig(Section):
    """One phase of a staged run: the keys it changes on top of the recipe, and its step budget."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="a short name (letters, digits, _ . -)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps of this stage")
    max_time: float | None = Field(None, gt=0, description="seconds of training steps of this stage (like "
                                                           "train.max_time); at least one budget")
    epochs: float | None = Field(None, gt=0, description="passes over this stage's training prompts (like "
                                                         "train.epochs), instead of max_steps")
    objective: dict[str, Any] = Field(default_factory=dict)
    rollout: dict[str, Any] = Field(default_factory=dict)
    teacher_text: dict[str, Any] = Field(default_factory=dict)
    replay: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict, description="training data of this stage; evaluation "
                                                                   "always uses the recipe's own held-out prompts")
    optim: dict[str, Any] = Field(default_factory=dict)
    penalties: dict[str, Any] = Field(default_factory=dict)
    hidden: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict, description="batch_size, grad_accum and trainable only")
    head_init: Literal["teacher_projected"] | None = Field(
        None, description="teacher_projected: before this stage, the student's lm_head becomes the teacher's lm_head "
                          "through the stitching projection an earlier stage trained from the student's last layer to "
                          "the teacher's last (W_s = W_t P), so the head starts where the hidden-state stages left "
                          "the student")

    @field_validator("train")
    @classmethod
    def _train_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        other = set(value) - {"batch_size", "grad_accum", "trainable"}
        if other:
            raise ValueError(f"a stage may set train.batch_size, train.grad_accum and train.trainable only, not "
                             f"{sorted(other)} "
                             f"(the budget is the stage's max_steps / epochs / max_time)")
        return value

    @model_validator(mode="after")
    def _budget(self) -> "StageConfig":
        if self.max_steps is None and self.max_time is None and self.epochs is None:
            raise ValueError(f"stage {self.name!r} needs a budget: max_steps or epochs, max_time (seconds), or a "
                             f"step budget and a time budget")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(f"stage {self.name!r}: max_steps and epochs are two step budgets; keep one")
        return self


class Recipe(Section):
    teacher: TeacherConfig
    student: StudentConfig
    data: DataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    teacher_text: TeacherTextConfig = Field(default_factory=TeacherTextConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    penalties: PenaltiesConfig = Field(default_factory=PenaltiesConfig)
    hidden: HiddenConfig = Field(default_factory=HiddenConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    stages: list[StageConfig] = Field(
        default_factory=list, description="phases run in order, the student flowing from one to the next; "
                                          "empty = one phase, the recipe itself")

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        mode_name = self.objective.mode
        mode = MODES[mode_name]
        if self.hidden.relations and self.student.gradient_checkpointing:
            raise ValueError("hidden.loss=attention_relation reads the query/key/value projections inside the "
                             "student's decoder layers, which gradient checkpointing runs without gradient (it "
                             "recomputes them in the backward pass): set student.gradient_checkpointing=false")
        if not samples_student(self.objective) and self.rollout.alpha > 0:
            # (gkd with lmbda 0 and the constant schedule included: every step trains on teacher text or references)
            raise ValueError(
                f"rollout.alpha={self.rollout.alpha} mixes the teacher into student rollouts, but objective.mode="
                f"{mode_name}{' with lmbda=0' if mode.samples_student else ''} samples no student rollouts; set "
                f"rollout.alpha=0 or sample the student (mode pg or distillm2, or gkd with lmbda > 0)"
            )
        if self.objective.backend == "liger" and not mode.divergence:
            raise ValueError(f"objective.backend=liger computes a divergence; mode {mode_name} has none: use "
                             f"backend=chunked (or auto)")
        if self.replay.size:
            step_rows = self.train.batch_size * self.train.grad_accum
            if self.replay.size < step_rows:
                raise ValueError(f"replay.size={self.replay.size} holds fewer samples than a step trains on "
                                 f"(train.batch_size x grad_accum = {step_rows}): no step could reuse; raise it (the "
                                 f"buffer is per process)")
            if self.replay.share == 0:
                raise ValueError("replay.share=0 never reuses a stored sample; set replay.size=0 (off) or a share > 0")
        if self.rollout.truncated == "penalise" and not self.rollout.do_sample:
            raise ValueError("rollout.truncated=penalise lowers the probability of the samples that were cut, through "
                             "their log-probabilities (a score function), which a greedy rollout (rollout.do_sample="
                             "false) does not have; use truncated=mask or sample")
        if self.objective.lmbda_schedule == "adaptive":
            if not self.eval.eval_steps:
                raise ValueError("objective.lmbda_schedule=adaptive raises the student-sample share after held-out "
                                 "evaluations that find a higher KL: set eval.eval_steps > 0 (evaluations during "
                                 "training)")
            if self.objective.lmbda == 1:
                raise ValueError("objective.lmbda_schedule=adaptive starts at objective.lmbda and raises it; at "
                                 "lmbda=1 there is nothing to raise: start lower (DistiLLM starts at 0)")
        if self.teacher_text.topk:
            self._check_topk()
        if self.objective.cross_tokenizer:
            self._check_cross_tokenizer()
        if self.objective.seq_kd and mode_name != "gkd":
            raise ValueError(f"objective.seq_kd applies to mode=gkd only (mode is {mode_name}); use mode=seqkd instead")
        if not mode.reads_student and not self.hidden.weight:
            raise ValueError(f"objective.mode={mode_name} trains on the hidden-state loss alone: set hidden.weight > 0 "
                             "(and hidden.layers, the [student, teacher] layer pairs to match)")
        if self.train.trainable != "all" and self.student.lora:
            raise ValueError("train.trainable chooses which of the student's own weights train; with student.lora "
                             "only the adapters train: use one of the two")
        self._check_head_init()
        if self.student.init == "teacher_layers" and self.student.tokenizer:
            raise ValueError("student.tokenizer is not used with student.init=teacher_layers (it is the teacher's)")
        for budget in ("max_steps", "epochs", "max_time"):
            if self.stages and getattr(self.train, budget) is not None:
                raise ValueError(f"train.{budget} is not used with stages: each stage sets its own budget "
                                 f"(max_steps or epochs, and/or max_time)")
        if self.optim.warmup_ratio and self.train.max_time is not None and self.train.max_steps is None \
                and self.train.epochs is None:
            raise ValueError(f"optim.warmup_ratio={self.optim.warmup_ratio} is a fraction of the step budget, and "
                             f"this run has only a time budget (train.max_time); use optim.warmup_steps")
        for key, applies, where in _conditional_keys(self):
            section_name, name = key.split(".")
            section = getattr(self, section_name)
            value, default = getattr(section, name), type(section).model_fields[name].get_default(call_default_factory=True)
            if value != default and not applies:  # a value other than the default where it would be ignored
                raise ValueError(f"{key}={value!r} has no effect here: it applies {where}; remove it or change the "
                                 f"setting")
        return self

    def rollout_decoding(self) -> dict[str, Any]:
        """The settings the student's samples are decoded with (rollout.*)."""
        r = self.rollout
        return {"max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_k": r.top_k, "top_p": r.top_p,
                "do_sample": r.do_sample, "stop_strings": list(r.stop_strings)}

    def teacher_text_decoding(self) -> dict[str, Any]:
        """The rollout settings the teacher's training text is decoded with (the teacher-completion cache's key)."""
        text, rollout = self.teacher_text, self.rollout
        return {"max_new_tokens": text.max_new_tokens or rollout.max_new_tokens, "temperature": text.temperature,
                "top_k": text.top_k, "top_p": text.top_p, "do_sample": text.do_sample,
                "stop_strings": list(rollout.stop_strings if text.stop_strings is None else text.stop_strings)}

    def _check_topk(self) -> None:
        """teacher_text.topk replaces the teacher's forward over its cached text: only where a loss reads the teacher's
        next-token distribution there and nothing else of that forward."""
        obj, k = self.objective, self.teacher_text.topk
        if not MODES[obj.mode].reads_teacher and trains_on_teacher_text(obj):
            raise ValueError(f"teacher_text.topk={k}: objective.mode={obj.mode} reads no teacher distribution on the "
                             f"teacher's text (it trains on its tokens): remove teacher_text.topk, or use mode=gkd with "
                             f"seq_kd=true (or distillm2)")
        if self.hidden.weight:
            raise ValueError(f"teacher_text.topk={k} trains without the teacher's forward on its text, and "
                             f"hidden.weight > 0 reads that forward's hidden states: use one of the two")
        if obj.prompt_weight:
            raise ValueError(f"teacher_text.topk={k} keeps the teacher's distribution on its completions only; "
                             f"objective.prompt_weight reads it on the prompts: use one of the two")
        if obj.mode in MODES and MODES[obj.mode].divergence and obj.divergence == "logit_mse":
            raise ValueError(f"teacher_text.topk={k}: divergence=logit_mse compares whole rows of logits, which the "
                             f"top-k cache does not keep; use forward_kl, reverse_kl, jsd, tv or a skew KL")

    def _check_cross_tokenizer(self) -> None:
        """What a run across two tokenizers cannot do: what needs one vocabulary or one sequence of positions."""
        obj, how = self.objective, f"objective.cross_tokenizer={self.objective.cross_tokenizer}"
        refused = [
            (obj.mode not in ("kd", "gkd"), f"objective.mode={obj.mode} (it applies to kd and gkd)"),
            (self.rollout.alpha > 0, "rollout.alpha > 0 (mixing the two models' next tokens needs one vocabulary)"),
            (self.hidden.weight > 0, "hidden.weight > 0 (hidden states position by position need one tokenization)"),
            (obj.prompt_weight > 0, "objective.prompt_weight (the prompt's positions differ between the tokenizations)"),
            (bool(self.teacher_text.topk), "teacher_text.topk (kept in the teacher's tokens only)"),
            (obj.temperature != 1.0, "objective.temperature other than 1"),
            (obj.divergence == "logit_mse", "divergence=logit_mse (logits of one vocabulary)"),
            (obj.backend == "liger", "objective.backend=liger (one vocabulary)"),
            (obj.lmbda_schedule == "adaptive", "objective.lmbda_schedule=adaptive (it reads the held-out KL, which "
                                               "needs one vocabulary)"),
            (self.replay.size > 0, "replay.size > 0 (not kept across tokenizers yet)"),
            (obj.seq_kd and not self.teacher_text.cache, "objective.seq_kd without teacher_text.cache (the teacher's "
                                                         "text is decoded once, in its own tokens, into the cache)"),
            (self.eval.full, "eval.full (the reference KLs and perplexities need one vocabulary)"),
            (self.student.init == "teacher_layers", "student.init=teacher_layers (a copy of the teacher has its "
                                                    "tokenizer)"),
        ]
        for bad, what in refused:
            if bad:
                raise ValueError(f"{how} does not combine with {what}")

    def _check_head_init(self) -> None:
        """A stage's head_init reads a projection an earlier stage trained (a stage with hidden.weight > 0)."""
        for k, stage in enumerate(self.stages):
            if stage.head_init is None:
                continue
            earlier = [s for s in self.stages[:k]
                       if hidden_stitches(s.hidden.get("weight", self.hidden.weight), s.hidden.get("loss", self.hidden.loss))]
            if not earlier:
                raise ValueError(f"stages[{k}] ({stage.name}): head_init={stage.head_init} starts the head from the "
                                 f"teacher's through a stitching projection, and no earlier stage trains one (set "
                                 f"hidden.weight > 0 in an earlier stage)")


# objective keys each loss reads (the mode table says which loss a mode uses)
_DIVERGENCE_KEYS = ("divergence", "beta", "skew", "temperature", "prompt_weight")
_PG_KEYS = ("discount", "length_norm", "single_step", "importance", "is_clip", "pg_baseline", "ppo_epochs",
            "ppo_clip", "lm_coef")


def _conditional_keys(r: Recipe) -> list[tuple[str, bool, str]]:
    """(key, whether it has an effect in this recipe, where it applies): a non-default value where it has none
    is an error (a default is fine: a saved resolved recipe lists every key)."""
    obj, mode = r.objective, r.objective.mode
    divergence_modes = [m for m, spec in MODES.items() if spec.divergence]
    keys = [(f"objective.{k}", mode in divergence_modes, f"to modes {'/'.join(divergence_modes)}")
            for k in _DIVERGENCE_KEYS if k not in ("skew", "temperature", "divergence")]
    keys += [(f"objective.{k}", mode in (*divergence_modes, "distillm2"),
              f"to modes {'/'.join(divergence_modes)}/distillm2") for k in ("temperature",)]
    keys += [(f"objective.{k}", mode == "pg", "to mode=pg") for k in _PG_KEYS]
    keys += [
        ("objective.lmbda", mode == "gkd", "to mode=gkd"),
        ("objective.lmbda_schedule", mode == "gkd", "to mode=gkd"),
        ("objective.lmbda_step", mode == "gkd" and obj.lmbda_schedule == "adaptive",
         "to mode=gkd with objective.lmbda_schedule=adaptive"),
        ("replay.size", mode == "gkd" and samples_student(obj), "to mode=gkd with student samples (lmbda > 0 or the "
                                                                "adaptive schedule); pg reads the sampler's "
                                                                "probabilities, which a stored sample no longer has"),
        *[(f"replay.{k}", r.replay.size > 0, "with replay.size > 0") for k in ("share", "reuse", "max_age")],
        ("objective.beta", obj.divergence == "jsd", "to divergence=jsd"),
        ("objective.skew", mode == "distillm2" or (mode in divergence_modes and obj.divergence.startswith("skew_")),
         "to the skew divergences and mode=distillm2"),
        ("objective.divergence", mode in divergence_modes, f"to modes {'/'.join(divergence_modes)} (distillm2's "
                                                           f"divergences are fixed: skew forward and reverse KL)"),
        ("objective.importance", r.rollout.alpha > 0, "when rollout.alpha > 0 (teacher-mixed samples)"),
        ("objective.is_clip", r.rollout.alpha > 0, "when rollout.alpha > 0 (teacher-mixed samples)"),
        ("objective.chunk_size", obj.backend != "torch" and not obj.cross_tokenizer,
         "to the memory-bounded head (backend auto, chunked, liger; not across tokenizers)"),
        ("objective.divergence", obj.cross_tokenizer != "uld", "unless objective.cross_tokenizer=uld (its own "
                                                               "distance)"),
        ("penalties.entropy_floor", r.penalties.entropy > 0, "with penalties.entropy > 0"),
        *[(f"penalties.{k}", MODES[mode].reads_student, "to modes with a loss on the student's distribution "
                                                        "(mode=hidden trains on the hidden-state loss alone)")
          for k in ("frequency", "diversity", "entropy")],
        ("penalties.shape_reward", mode == "pg" and any_penalty(r.penalties),
         "to mode=pg with a penalty weight > 0"),
        ("optim.momentum", r.optim.name == "sgd", "to optim.name=sgd"),
        ("optim.betas", r.optim.name == "adamw", "to optim.name=adamw"),
        ("optim.eps", r.optim.name == "adamw", "to optim.name=adamw"),
        ("student.config_overrides", r.student.init == "config", "to student.init=config"),
        ("student.revision", r.student.init == "pretrained" or bool(r.student.name_or_path),
         "when the student loads from student.name_or_path"),
        ("logging.num_samples", r.logging.sample_steps > 0, "with logging.sample_steps > 0"),
        ("hidden.loss", r.hidden.weight > 0, "with hidden.weight > 0"),
        ("hidden.layers", r.hidden.weight > 0, "with hidden.weight > 0"),
        ("hidden.relation_heads", r.hidden.relations, "with hidden.weight > 0 and hidden.loss=attention_relation"),
        ("data.eval_size", r.data.eval_split is None and r.data.eval_path is None,
         "when neither data.eval_split nor data.eval_path is set"),
        ("data.eval_columns", r.data.eval_path is not None, "with data.eval_path"),
        *[(f"rollout.{k}", samples_student(obj), "to modes that sample the student (pg, distillm2, gkd with lmbda "
                                                  "> 0); the "
                                                  "teacher's text decodes by teacher_text.*")
          for k in ("do_sample", "temperature", "top_k", "top_p", "truncated")],
        ("rollout.truncation_penalty", r.rollout.truncated == "penalise", "with rollout.truncated=penalise"),
        *[(f"teacher_text.{k}", trains_on_teacher_text(obj),
           "to modes that train on the teacher's text (seqkd, distillm2, or gkd with seq_kd and lmbda < 1)")
          for k in TeacherTextConfig.model_fields],
        ("data.name", not looks_like_local_path(r.data.path), "to Hub datasets (not to a local data.path)"),
        ("data.system_prompt", r.data.chat_template, "with data.chat_template=true"),
        ("logging.run_name", bool(r.logging.report_to), "with logging.report_to (a tracker)"),
        ("train.hub_model_id", r.train.push_to_hub, "with train.push_to_hub=true"),
        ("train.hub_private", r.train.push_to_hub, "with train.push_to_hub=true"),
    ]
    return keys
