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


def head_counts(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of the model's attention (fewer key/value heads with grouped-query
    attention)."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim


def relation_setup(hidden, student: nn.Module, teacher: nn.Module) -> tuple[list[tuple[int, int]], int]:
    """The [student, teacher] decoder-layer pairs and the relation heads R of `hidden` (the recipe's HiddenConfig,
    loss attention_relation), checked against both models: every paired layer has findable projections and R
    divides every projection width."""
    pairs = layer_pairs(hidden.layers, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    for s, t in pairs:
        projections(student, s), projections(teacher, t)  # (raise when a layout is unknown)
    counts = {name: head_counts(model) for name, model in (("student", student), ("teacher", teacher))}
    widths = {f"{name} {kind}": n * dim for name, (q, kv, dim) in counts.items()
              for kind, n in (("query", q), ("key/value", kv))}
    heads = hidden.relation_heads or math.gcd(*(n for q, kv, _ in counts.values() for n in (q, kv)))
    uneven = [f"{name} {width}" for name, width in widths.items() if width % heads]
    if uneven:
        raise ConfigError(f"hidden.relation_heads={heads} does not divide the projection widths "
                          f"{', '.join(uneven)} (all widths: {widths}); choose a common divisor of them")
    return pairs, heads


@contextlib.contextmanager
def captured_projections(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, list[Tensor | None]]]:
    """{layer: [Q, K, V]} filled by the forward run inside the block, each (B, T_in, W) over the forward's input
    positions. A recomputation (gradient checkpointing) would call the hooks again: the first outputs are kept."""
    slots: dict[int, list[Tensor | None]] = {layer: [None, None, None] for layer in layers}
    handles = []

    def keep(layer: int, kind: int | None):  # kind: 0 query, 1 key, 2 value; None: all three (fused)
        def hook(module, args, output) -> None:  # noqa: ANN001
            outputs = output.chunk(3, dim=-1) if kind is None else [output]
            for k, tensor in zip([0, 1, 2] if kind is None else [kind], outputs):
                if slots[layer][k] is None:
                    slots[layer][k] = tensor
        return hook

    try:
        for layer in layers:
            modules = projections(model, layer)
            for kind, module in enumerate(modules):
                handles.append(module.register_forward_hook(keep(layer, kind if len(modules) == 3 else None)))
        yield slots
    finally:
        for handle in handles:
            handle.remove()
