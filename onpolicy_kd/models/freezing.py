"""Which of the student's weights train: `train.trainable` (per stage, for block-by-block distillation).

The student's parameters fall into four parts: the input embeddings (token and position embedding tables
outside the decoder layers), the decoder layers (the one `nn.ModuleList` with `config.num_hidden_layers`
entries: `model.layers` in Llama-likes, `transformer.h` in GPT-2, whatever a plain-module student names it),
the head (`get_output_embeddings()`), and the rest (the final norm, ...). The hidden-state stitching
projections always train. A part that is frozen gets `requires_grad = False` before the optimizer is built,
so the optimizer never holds it and nothing (weight decay included) moves it.
"""

from __future__ import annotations

from torch import nn

from onpolicy_kd.errors import ConfigError
from onpolicy_kd.objectives.hidden import STITCHING
from onpolicy_kd.recipe.schema import TrainableParts


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList with exactly `config.num_hidden_layers` entries."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count
             and STITCHING not in name]
    if len(found) != 1:
        raise ConfigError(f"train.trainable names decoder layers, and this student's stack of {count} layers cannot be "
                          f"told apart ({len(found)} ModuleLists of that length): use train.trainable: all, or "
                          f"embeddings/head/other only")
    return found[0]


def part_of_each_parameter(model: nn.Module, need_layers: bool) -> dict[str, str]:
    """Parameter name -> 'embeddings', 'layer N' (1-based), 'head', 'other' or 'stitching'."""
    head = model.get_output_embeddings()
    head_weights = {id(p) for p in head.parameters()} if head is not None else set()
    layer_of = {}
    if need_layers:
        for number, layer in enumerate(decoder_layers(model), start=1):
            layer_of |= {id(p): f"layer {number}" for p in layer.parameters()}
    embedding_weights = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    parts = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.startswith(STITCHING + ".") or f".{STITCHING}." in name:
            parts[name] = "stitching"
        elif id(param) in layer_of:
            parts[name] = layer_of[id(param)]
        elif id(param) in head_weights:
            parts[name] = "head"
        elif id(param) in embedding_weights:
            parts[name] = "embeddings"
        else:
            parts[name] = "other"
    return parts


def _trains(part: str, parts: TrainableParts) -> bool:
    if part == "stitching":
        return True
    if part.startswith("layer "):
        return parts.trains_layer(int(part.split()[1]))
    return getattr(parts, part)


def apply_trainable(model: nn.Module, parts: TrainableParts) -> tuple[int, int]:
    """Set requires_grad on every parameter as `parts` says; (trainable, total) parameter counts."""
    names = part_of_each_parameter(model, need_layers=parts.layers is not None)
    count = getattr(model.config, "num_hidden_layers", 0)
    beyond = sorted(n for n in (parts.layers or ()) if n > count)
    if beyond:
        raise ConfigError(f"train.trainable names decoder layers {beyond}, and the student has layers 1..{count}")
    tied = model.get_output_embeddings() is not None and model.get_input_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied and parts.head != parts.embeddings:
        raise ConfigError("train.trainable: this student's head is tied to its input embeddings (one weight), so "
                          "list both head and embeddings, or neither")
    trainable = total = 0
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        param.requires_grad_(_trains(names[name], parts))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total
