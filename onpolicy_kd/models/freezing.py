"""Which of the student's weights train: `train.trainable` (per stage, for block-by-block distillation).

The student's parameters fall into four parts: the input embeddings (the `nn.Embedding` tables outside the
decoder layers: tokens, and positions where the model has such a table), the decoder layers (the stack
`loading.decoder_layers` finds: `model.layers` in Llama-likes, `transformer.h` in GPT-2, the one ModuleList of
`config.num_hidden_layers` blocks in a plain-module student), the head (`get_output_embeddings()`), and the rest
(`other`: the final norm, a position table kept as a bare Parameter, ...). The hidden-state stitching projections
always train. A frozen part gets `requires_grad = False` before the optimizer is built, so the optimizer never
holds it and nothing (weight decay included) moves it. `check_trainable` makes every check without touching
the model, so a staged run can refuse a bad stage before the first one trains.
"""

from __future__ import annotations

from torch import nn

from onpolicy_kd.errors import ConfigError
from onpolicy_kd.models.loading import decoder_layers
from onpolicy_kd.objectives.hidden import STITCHING
from onpolicy_kd.recipe.schema import TrainableParts


def part_of_each_parameter(model: nn.Module, need_layers: bool) -> dict[str, str]:
    """Parameter name -> 'embeddings', 'layer N' (1-based), 'head', 'other' or 'stitching'."""
    head = model.get_output_embeddings()
    head_weights = {id(p) for p in head.parameters()} if head is not None else set()
    layer_of = {}
    if need_layers:
        _, layers = decoder_layers(model, "for train.trainable's layer ranges")
        for number, layer in enumerate(layers, start=1):
            layer_of |= {id(p): f"layer {number}" for p in layer.parameters()}
    embedding_weights = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    parts = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if STITCHING in name.split("."):
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


def check_trainable(model: nn.Module, parts: TrainableParts, where: str = "train.trainable") -> dict[str, bool]:
    """Whether each parameter (by name) trains; raises a ConfigError naming `where` for parts this student lacks."""
    count = getattr(model.config, "num_hidden_layers", 0)
    beyond = sorted(n for n in (parts.layers or ()) if n > count)
    if beyond:
        raise ConfigError(f"{where}: layers {beyond} named, and the student has decoder layers 1..{count}")
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None and parts.head != parts.other:
        raise ConfigError(f"{where}: this student has no separate head module (get_output_embeddings() is None), so "
                          f"its head weights are part of 'other': list head and other together, or neither")
    if head is not None and embeddings is not None and head.weight is embeddings.weight \
            and parts.head != parts.embeddings:
        raise ConfigError(f"{where}: this student's head is tied to its input embeddings (one weight), so list both "
                          f"head and embeddings, or neither")
    names = part_of_each_parameter(model, need_layers=parts.names_layers)
    return {name: _trains(part, parts) for name, part in names.items()}


def apply_trainable(model: nn.Module, parts: TrainableParts) -> tuple[int, int]:
    """Set requires_grad on every parameter as `parts` says; (trainable, total) parameter counts."""
    trains = check_trainable(model, parts)
    trainable = total = 0
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        param.requires_grad_(trains[name])
        size = getattr(param, "ds_numel", param.numel())  # a ZeRO-3 parameter holds only its shard
        total += size
        trainable += size if trains[name] else 0
    return trainable, total
