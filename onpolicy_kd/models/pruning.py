"""Which of the teacher's decoder layers a layer-dropped student should keep (`student.init: teacher_layers`).

Two measurements on a few training sequences, both run on the teacher alone:
- block influence (ShortGPT, Men et al. 2024): 1 - cos(h_in, h_out) of each layer, averaged over tokens; a
  layer that barely turns its input is cheap to drop. One forward pass; keeps the `keep` most influential.
- greedy removal by KL: drop one layer at a time, each time the one whose removal raises the teacher-forced
  KL(p || q) between the teacher and the shortened copy the least. `(L - keep)` rounds of one forward per
  remaining layer: slower, and it measures what distillation starts from.
The layers are swapped out of the teacher for each measurement and put back (no copy of the weights);
the KL of a layer subset is what `copy_with_layers(teacher, keep)` would give (tests/test_models.py).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from onpolicy_kd.batch import Completions, next_token_mask
from onpolicy_kd.models.loading import decoder_layers
from onpolicy_kd.objectives.divergences import per_token_divergence, reduce_tokens

Tensor = torch.Tensor


@contextlib.contextmanager
def only_layers(model: nn.Module, keep: Sequence[int]) -> Iterator[nn.Module]:
    """`model` running only its decoder layers in `keep` (in that order), restored on exit."""
    path, layers = decoder_layers(model)
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    n_layers = model.config.num_hidden_layers
    setattr(parent, name, nn.ModuleList([layers[i] for i in keep]))
    model.config.num_hidden_layers = len(keep)
    try:
        yield model
    finally:
        setattr(parent, name, layers)
        model.config.num_hidden_layers = n_layers


def _forward(model: nn.Module, batch: Completions, hidden: bool = False):
    return model(input_ids=batch.sequences, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 output_hidden_states=hidden, use_cache=False)


@torch.no_grad()
def block_influence(model: nn.Module, batch: Completions) -> list[float]:
    """1 - cos(input, output) of every decoder layer, averaged over the batch's real tokens. transformers returns
    the last layer's output after the final norm, which inflates that layer's score; it feeds the head, and
    students keep it anyway."""
    states = _forward(model, batch, hidden=True).hidden_states
    real = batch.attention_mask.bool()
    n_layers = len(states) - 1
    return [float(1 - torch.cosine_similarity(states[i][real], states[i + 1][real], dim=-1).mean())
            for i in range(n_layers)]


@torch.no_grad()
def layer_subset_kl(model: nn.Module, batch: Completions, keep: Sequence[int],
                    teacher_logits: Tensor | None = None) -> float:
    """Mean teacher-forced KL(p || q) over the batch's real tokens between `model` and its copy keeping `keep`
    (`teacher_logits`: the full model's, when the caller already has them)."""
    if teacher_logits is None:
        teacher_logits = _forward(model, batch).logits[:, :-1]
    with only_layers(model, keep):
        student_logits = _forward(model, batch).logits[:, :-1]
    per_token = per_token_divergence(student_logits, teacher_logits, kind="forward_kl")
    return float(reduce_tokens(per_token, next_token_mask(batch.attention_mask)))


@torch.no_grad()
def greedy_removal(model: nn.Module, batch: Completions, keep: int,
                   progress: Callable[[int, float, list[int]], None] | None = None) -> tuple[list[int], float]:
    """(layers to keep, their KL): remove layers one at a time, each the one whose removal raises the KL least."""
    teacher_logits = _forward(model, batch).logits[:, :-1]
    kept, kl = list(range(model.config.num_hidden_layers)), 0.0
    while len(kept) > keep:
        scores = {i: layer_subset_kl(model, batch, [j for j in kept if j != i], teacher_logits) for i in kept}
        dropped = min(scores, key=scores.get)
        kept.remove(dropped)
        kl = scores[dropped]
        if progress is not None:
            progress(dropped, kl, list(kept))
    return kept, kl


def most_influential(influence: Sequence[float], keep: int) -> list[int]:
    """The `keep` layers of highest block influence, in model order."""
    return sorted(sorted(range(len(influence)), key=lambda i: -influence[i])[:keep])
