"""Per-token quantities of the student's next-token distribution, from full logits or chunk by chunk.

The PG loss, the cross-entropy and the penalties read the student's distribution q(.|c_t) only through
a few numbers per position: log q(y_t), KL(q || p) to the teacher, the entropy, sum_{s<t} q(y_s|c_t),
the expected embedding sum_v q(v|c_t) E_v. Each is a *row function*: (student logits of n positions,
teacher logits of the same positions or None, which positions) -> (n, k) values. `token_terms` applies a
set of them at the valid positions of a batch and returns each as a (B, T) or (B, T, k) tensor that
carries the gradient, from either

- full logits (`ModelOutputs.logits`): the row functions run on them directly (the reference), or
- the last hidden states and the lm_head weights (the memory-bounded head): `_ChunkedRows` projects
  `chunk_size` positions at a time, so the (N, V) float32 logits never exist. Its backward recomputes
  each chunk's logits and takes the vector-Jacobian product there (one extra head matmul per chunk, as
  activation checkpointing does); the values and gradients are the same as from full logits.

The losses then work on those (B, T) tensors exactly as on the full-logit path, so one formula serves both
(objectives/loss.py). The divergence losses keep their own chunked head (divergences.py), which needs no
recomputation because a divergence is linear in its per-token values.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F

from onpolicy_kd.objectives.divergences import _kl, accumulate, log_probs, math_dtype

Tensor = torch.Tensor


class Rows:
    """The logits of n positions and their log-softmax at each temperature a term asks for, computed once for all
    the terms of a chunk (each would otherwise normalise the same (n, V) logits again)."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits
        self._log_probs: dict[float, Tensor] = {}

    def log_probs(self, temperature: float = 1.0) -> Tensor:
        if temperature not in self._log_probs:
            self._log_probs[temperature] = log_probs(self.logits, temperature)
        return self._log_probs[temperature]


class Term(NamedTuple):
    """A row function and how many values it returns per position."""

    rows: Callable[[Rows, "Rows | None", Tensor], Tensor]  # (student rows (n, V), teacher rows or None, the n
    #                                   rows' flat positions b * T + t in the batch) -> (n, k) values
    width: int = 1


def sampled_logprob(tokens_BT: Tensor, temperature: float = 1.0) -> Term:
    """log q(y_t) at the temperature (the PG's policy log-prob; minus the cross-entropy at temperature 1)."""
    tokens_N = tokens_BT.reshape(-1)

    def rows(student: Rows, teacher: Rows | None, at: Tensor) -> Tensor:
        return student.log_probs(temperature).gather(-1, tokens_N[at].unsqueeze(-1))
    return Term(rows)


def reverse_kl_to_teacher(temperature: float = 1.0) -> Term:
    """KL(q(.|c_t) || p(.|c_t)) over the vocabulary, both at the temperature (pg's single-step term)."""
    def rows(student: Rows, teacher: Rows | None, at: Tensor) -> Tensor:
        assert teacher is not None, "the single-step KL reads the teacher"
        return _kl(student.log_probs(temperature), teacher.log_probs(temperature)).unsqueeze(-1)
    return Term(rows)


def entropy() -> Term:
    """H_t = -sum_v q log q (temperature 1)."""
    def rows(student: Rows, teacher: Rows | None, at: Tensor) -> Tensor:
        logq = student.log_probs()
        return -(logq.exp() * logq).sum(-1, keepdim=True)
    return Term(rows)


def previous_probability(tokens_BT: Tensor, mask_BT: Tensor) -> Term:
    """sum_{s<t, valid} q(y_s|c_t): the expected count of already-generated tokens (the frequency penalty)."""
    B, T = tokens_BT.shape
    earlier_TT = torch.ones(T, T, dtype=torch.bool, device=tokens_BT.device).tril(-1)
    earlier_tokens_NT = tokens_BT.unsqueeze(1).expand(-1, T, -1).reshape(B * T, T)  # [b*T + t, s] = y_s
    earlier_valid_NT = (earlier_TT & mask_BT.bool().unsqueeze(1)).reshape(B * T, T)  # s < t and s valid

    def rows(student: Rows, teacher: Rows | None, at: Tensor) -> Tensor:
        q = student.log_probs().exp().gather(-1, earlier_tokens_NT[at])
        return torch.where(earlier_valid_NT[at], q, torch.zeros_like(q)).sum(-1, keepdim=True)
    return Term(rows)


def expected_embedding(embeddings_VH: Tensor) -> Term:
    """e_t = sum_v q(v|c_t) E_v with the embeddings held constant (the diversity penalty)."""
    def rows(student: Rows, teacher: Rows | None, at: Tensor) -> Tensor:
        probs = student.log_probs().exp()
        return probs @ embeddings_VH.detach().to(probs.dtype)[: probs.shape[-1]]
    return Term(rows, embeddings_VH.shape[-1])


def _apply(terms: Mapping[str, Term], student: Tensor, teacher: Tensor | None, at: Tensor) -> Tensor:
    student_rows, teacher_rows = Rows(student), None if teacher is None else Rows(teacher)
    return torch.cat([term.rows(student_rows, teacher_rows, at) for term in terms.values()], dim=-1)


class _ChunkedRows(torch.autograd.Function):
    """The row functions over hidden states @ lm_head, chunk by chunk; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor | None,  # type: ignore[override]
                teacher_head: Tensor | None, terms: Mapping[str, Term], positions: Tensor, chunk_size: int) -> Tensor:
        ctx.save_for_backward(student_hidden, student_head)
        ctx.teacher, ctx.terms, ctx.positions, ctx.chunk_size = (teacher_hidden, teacher_head), terms, positions, chunk_size
        outputs = [_apply(terms, F.linear(student_hidden[at], student_head), _teacher_logits(ctx.teacher, at),
                          positions[at]) for at in _chunks(student_hidden.shape[0], chunk_size)]
        width = sum(term.width for term in terms.values())
        return torch.cat(outputs) if outputs else student_hidden.new_zeros((0, width), dtype=math_dtype(student_hidden.dtype))

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        hidden_all, head = ctx.saved_tensors
        need_hidden, need_head = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden_all) if need_hidden else None
        grad_head = None  # the first chunk's gradient, then the others added to it (divergences.accumulate)
        weight = head.detach().requires_grad_(need_head)
        for at in _chunks(hidden_all.shape[0], ctx.chunk_size):
            hidden = hidden_all[at].detach().requires_grad_(need_hidden)
            with torch.enable_grad():
                values = _apply(ctx.terms, F.linear(hidden, weight), _teacher_logits(ctx.teacher, at), ctx.positions[at])
                inputs = [x for x, needed in ((hidden, need_hidden), (weight, need_head)) if needed]
                grads = list(torch.autograd.grad(values, inputs, grad_output[at].to(values.dtype))) if inputs else []
            if need_hidden:
                grad_hidden[at] = grads.pop(0)  # type: ignore[index]
            if need_head:
                grad_head = accumulate(grad_head, grads.pop(0), head.dtype)
        if need_head and grad_head is None:  # no rows at all
            grad_head = torch.zeros_like(head)
        return grad_hidden, grad_head, None, None, None, None, None


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _teacher_logits(teacher: tuple[Tensor | None, Tensor | None], at: Tensor) -> Tensor | None:
    hidden, head = teacher
    if hidden is None:
        return None
    with torch.no_grad():
        return F.linear(hidden[at], head)


def token_terms(student, teacher, mask_BT: Tensor, terms: Mapping[str, Term], chunk_size: int = 1024) -> dict[str, Tensor]:
    """Each term at the valid positions of a batch, as (B, T) (one value per position) or (B, T, k), with zeros at
    masked positions; the gradient flows to the student's logits, or to its last hidden state and head.

    `student`/`teacher` are ModelOutputs over the batch's completions: with `logits`, or with the last `hidden`
    state and `head` (the memory-bounded head; `teacher` may be None when no term reads it).
    """
    B, T = mask_BT.shape
    valid_N = mask_BT.reshape(-1).bool()
    positions = valid_N.nonzero().squeeze(-1)
    if student.logits is not None:
        s = student.logits.reshape(B * T, -1)[valid_N]
        t = None if teacher is None else teacher.logits.reshape(B * T, -1)[valid_N]
        values = _apply(terms, s, t, positions)
    else:
        h_s = student.hidden[-1].reshape(B * T, -1)[valid_N]
        h_t = None if teacher is None else teacher.hidden[-1].reshape(B * T, -1)[valid_N].detach()
        values = _ChunkedRows.apply(h_s, student.head, h_t, None if teacher is None else teacher.head.detach(), terms,
                                    positions, chunk_size)
    out = values.new_zeros((B * T, values.shape[-1])).index_put((positions,), values)
    result, start = {}, 0
    for name, term in terms.items():
        column = out[:, start : start + term.width].reshape(B, T, term.width)
        result[name] = column.squeeze(-1) if term.width == 1 else column
        start += term.width
    return result
