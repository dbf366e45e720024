"""The query, key and value projections of a decoder layer, read during a forward pass (attention relations).

transformers returns hidden states but not the attention's inputs, so the projections' outputs are taken with
forward hooks for the length of one forward. Two layouts are known: separate `q_proj` / `k_proj` / `v_proj`
linears in the layer's attention (Llama, Qwen, Mistral, Gemma, SmolLM and most current models), and GPT-2's one
`c_attn` whose output is [Q | K | V]. Anything else is refused by name when the run is set up, never guessed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import nn

from onpolicy_kd.errors import ConfigError
from onpolicy_kd.models.loading import decoder_layers
from onpolicy_kd.objectives.hidden import layer_pairs

Tensor = torch.Tensor

SEPARATE = ("q_proj", "k_proj", "v_proj")
KINDS = ("query", "key", "value")
FUSED = "c_attn"  # GPT-2: Conv1D to 3 * hidden, queries then keys then values


def projections(model: nn.Module, layer: int) -> tuple[nn.Module, ...]:
    """The modules whose outputs are decoder layer `layer`'s (1-based, as `hidden.layers` numbers layers) queries,
    keys and values: three linears, or one fused GPT-2 `c_attn`."""
    _, layers = decoder_layers(model, purpose="for attention relations")
    if not 1 <= layer <= len(layers):
        raise ConfigError(f"attention_relation: {type(model).__name__} has decoder layers 1..{len(layers)}, not "
                          f"{layer}; list the pairs in hidden.layers")
    block = layers[layer - 1]
    named = dict(block.named_modules())
    separate = [next((m for name, m in named.items() if name.split(".")[-1] == proj), None) for proj in SEPARATE]
    if all(m is not None for m in separate):
        return tuple(separate)
    fused = next((m for name, m in named.items() if name.split(".")[-1] == FUSED), None)
    if fused is not None:
        return (fused,)
    linears = sorted(name for name, m in named.items() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    raise ConfigError(
        f"attention_relation: cannot find the query/key/value projections of decoder layer {layer} of "
        f"{type(model).__name__} (looked for {', '.join(SEPARATE)} or a fused {FUSED}; its linear modules are "
        f"{', '.join(linears) or 'none'}); for this model use hidden.loss=mse or cosine (hidden states, "
        f"through stitching) instead")


def output_width(module: nn.Module) -> int:
    """The width of a projection's output: a Linear's (LoRA and quantised wrappers keep `out_features`) or a
    transformers Conv1D's `nf`."""
    width = getattr(module, "out_features", None) or getattr(module, "nf", None)
    if width is None:
        raise ConfigError(f"attention_relation: cannot tell the output width of {type(module).__name__}")
    return int(width)


def projection_widths(model: nn.Module, layer: int) -> tuple[int, int, int]:
    """(query, key, value) widths of decoder layer `layer`, read from its modules. A fused projection is split into
    equal thirds only where the model says it is [Q | K | V] of its hidden size each (GPT-2): another fused layout
    (multi-query GPT-BigCode's hidden + 2 x head size) is refused rather than split wrongly."""
    modules = projections(model, layer)
    if len(modules) == 3:
        return tuple(output_width(m) for m in modules)
    width, hidden = output_width(modules[0]), model.config.hidden_size
    if width != 3 * hidden:
        raise ConfigError(f"attention_relation: the fused {FUSED} of decoder layer {layer} of {type(model).__name__} "
                          f"is {width} wide, not 3 x hidden_size = {3 * hidden}: its queries, keys and values are not "
                          f"equal thirds; use hidden.loss=mse or cosine for this model")
    return hidden, hidden, hidden


MIN_RELATION_HEAD = 16  # the narrowest relation head the default R allows (MiniLMv2's are 16 to 64 wide)


def relation_setup(hidden, student: nn.Module, teacher: nn.Module) -> tuple[list[tuple[int, int]], int]:
    """The [student, teacher] decoder-layer pairs and the relation heads R of `hidden` (the recipe's HiddenConfig,
    loss attention_relation), checked against both models: every paired layer has findable projections and R
    divides every projection width. The default R is the largest that divides every width and keeps the narrowest
    projection's relation heads at least MIN_RELATION_HEAD wide (1 when a projection is narrower than that)."""
    pairs = layer_pairs(hidden.layers, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    widths = {}
    for s, t in pairs:
        for name, model, layer in (("student", student, s), ("teacher", teacher, t)):
            for kind, width in zip(KINDS, projection_widths(model, layer)):
                widths[f"{name} layer {layer} {kind}"] = width
    common = math.gcd(*widths.values())
    narrowest = min(widths.values())
    heads = hidden.relation_heads or max(
        [r for r in range(1, common + 1) if common % r == 0 and narrowest // r >= MIN_RELATION_HEAD], default=1)
    uneven = [f"{name} {width}" for name, width in widths.items() if width % heads]
    if uneven:
        raise ConfigError(f"hidden.relation_heads={heads} does not divide the projection widths "
                          f"{', '.join(uneven)}; choose a divisor of {common} (all widths: {widths})")
    return pairs, heads


@contextlib.contextmanager
def captured_projections(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, list[Tensor | None]]]:
    """{layer: [Q, K, V]} filled by the forward run inside the block, each (B, T_in, W) over the forward's input
    positions. A projection that did not run, or ran twice, is an error when the block ends (gradient checkpointing,
    which would run them again in the backward pass, is refused with this loss by the recipe)."""
    slots: dict[int, list[Tensor | None]] = {layer: [None, None, None] for layer in layers}
    handles = []

    def keep(layer: int, kind: int | None):  # kind: 0 query, 1 key, 2 value; None: all three (fused)
        def hook(module, args, output) -> None:  # noqa: ANN001
            outputs = output.chunk(3, dim=-1) if kind is None else [output]
            for k, tensor in zip([0, 1, 2] if kind is None else [kind], outputs):
                if slots[layer][k] is not None:  # a layer run twice in one forward: which call is "the" one?
                    raise ConfigError(f"attention_relation: the {KINDS[k]} projection of decoder layer {layer} ran "
                                      f"twice in one forward pass (a shared or looped layer); pair other layers")
                slots[layer][k] = tensor
        return hook

    try:
        for layer in layers:
            modules = projections(model, layer)
            for kind, module in enumerate(modules):
                handles.append(module.register_forward_hook(keep(layer, kind if len(modules) == 3 else None)))
        yield slots
        missing = [f"layer {layer} {KINDS[k]}" for layer, found in slots.items() for k in range(3) if found[k] is None]
        if missing:  # (a fused kernel or a wrapper that calls around the module's forward)
            raise ConfigError(f"attention_relation: the forward pass never ran the projection modules of "
                              f"{', '.join(missing)}; this model computes its attention around them: use "
                              f"hidden.loss=mse or cosine")
    finally:
        for handle in handles:
            handle.remove()
