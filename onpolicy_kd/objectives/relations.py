"""Self-attention relation distillation (MiniLMv2): the student's query-query, key-key and value-value relations
pulled towards the teacher's, an auxiliary loss added in every mode (`attention_relation.weight`).

(docs/algorithms.md, "Attention relations".) For one decoder layer of each model, take the outputs of its query,
key and value projections at the positions that predict completion tokens (those the divergences use), A in
{Q, K, V} of shape (T, W). Concatenate the heads (they already are, as the projections return them) and split
the width again into R *relation heads* of W / R each, A_r (T, d_r). The relation of head r is the row-wise
softmax over the positions of that window a causal model's attention may read (j <= i, not padding):

    Rel_r(A)[i, :] = softmax_j( A_r[i] . A_r[j] / sqrt(d_r) )

and the loss of a layer pair is the teacher-to-student KL of the relations, averaged over the 3 kinds and R
heads, summed over valid rows and divided by the global valid-token count (as the other token losses are):

    (1 / 3R) sum_{A in Q,K,V} sum_r sum_i KL( Rel_r(A_teacher)[i] || Rel_r(A_student)[i] )

Two departures from MiniLMv2, both deliberate: the relations span the completion window, not the prompt (the
loss continues from the rollout's prompt keys and values without running the prompt's queries again, and the
window is what the other losses read; its first row reads one position, so its KL is 0), and the three kinds
are averaged where MiniLMv2 sums them (so `hidden.weight` is a third of the paper's weight).

The relations are (T, T) whatever the widths, so a student with fewer heads or a narrower model needs no
projection: R must divide every width (both models' query and key/value widths; with grouped-query attention the
key/value width is smaller). Queries and keys are taken before the rotary embedding (the projections' outputs),
the same for both models. The teacher side carries no gradient; float32 math for half-precision models.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Tensor = torch.Tensor

KINDS = ("query", "key", "value")


def relation_log_probs(states: Tensor, mask: Tensor, heads: int) -> Tensor:
    """log Rel_r(A)[i, j] of (B, T, W) projection outputs: (B, R, T, T), 0 where key j is not readable from row i
    (j > i, or padding) so that masked entries add nothing to a sum of p * log p."""
    B, T, W = states.shape
    if W % heads:
        raise ValueError(f"{heads} relation heads do not divide a projection width of {W}")
    dtype = torch.promote_types(states.dtype, torch.float32)
    split = states.to(dtype).view(B, T, heads, W // heads).transpose(1, 2)  # (B, R, T, d_r)
    scores = split @ split.transpose(-1, -2) / math.sqrt(W // heads)
    causal = torch.ones(T, T, dtype=torch.bool, device=states.device).tril()
    readable = causal & mask[:, None, None, :].bool()  # (B, 1, T, T): row i reads key j
    scores = scores.masked_fill(~readable, torch.finfo(dtype).min)
    return scores.log_softmax(-1).masked_fill(~readable, 0.0)


def attention_relation_loss(
    student: Sequence[Sequence[Tensor]], teacher: Sequence[Sequence[Tensor]], mask: Tensor, *, heads: int,
    num_tokens: float | None = None, per_pair: bool = False,
) -> Tensor:
    """The mean over layer pairs of the relation KL, summed over valid rows / `num_tokens`.

    student[l], teacher[l]: the (query, key, value) projection outputs, each (B, T, W), of pair l; mask (B, T), the
    positions that predict completion tokens. `num_tokens` defaults to this batch's valid-token count; 0 valid
    tokens give 0. With `per_pair`, the (L,) values of the pairs instead of their mean (for per-layer logging)."""
    rows = mask.bool()
    sums = []
    for student_qkv, teacher_qkv in zip(student, teacher, strict=True):
        total = 0.0
        for s, t in zip(student_qkv, teacher_qkv, strict=True):
            log_q = relation_log_probs(s, rows, heads)
            log_p = relation_log_probs(t.detach(), rows, heads)
            kl_rows = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, R, T); masked keys have log p = log q = 0
            total = total + kl_rows.mean(1)[rows].sum()  # mean over relation heads, valid rows only
        sums.append(total / len(KINDS))
    count = float(rows.sum()) if num_tokens is None else float(num_tokens)
    values = torch.stack(sums) / max(count, 1.0)
    return values if per_pair else values.mean()
