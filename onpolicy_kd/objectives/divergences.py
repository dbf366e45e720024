"""Token-level divergences between student and teacher next-token distributions: pure tensor functions.

Conventions (docs/algorithms.md; the same beta as TRL's `generalized_jsd_loss`, so recipes move
between the two). With p the teacher and q the student, per position over the full vocabulary:

    forward_kl       KL(p || q)
    reverse_kl       KL(q || p)
    jsd (beta)       beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta p + (1 - beta) q;
                     beta = 0 is defined as forward_kl and beta = 1 as reverse_kl (TRL's endpoints)
    tv               1/2 sum |p - q|
    skew_forward_kl  KL(p || skew p + (1 - skew) q)
    skew_reverse_kl  KL(q || skew q + (1 - skew) p)
    logit_mse        (1/V) sum_v (c_s(v) - c_t(v))^2, c = z / tau - mean_v(z / tau): the squared error of the
                     logits after removing each row's mean, the one part of the logits the softmax ignores
                     (Distily's logit MSE compares raw logits, which also charges the student for a
                     constant offset that changes no probability); v and V over the entries finite in both
                     (a logit masked to -inf has nothing to compare)

Temperature divides both models' logits before the softmax; the loss is *not* rescaled by tau^2
(as in TRL). All math is in log space (log_softmax; mixtures through logsumexp), in float32 for
half-precision inputs and in the input's own precision for float32 and float64 (a float64 reference
test gets float64 math). Terms with p(v) = 0 contribute 0 (the 0 log 0 = 0 convention).

Reduction: the sum over valid tokens divided by `num_tokens`, the number of valid tokens in the
*global* batch (all micro-batches of an optimizer step, all processes) when the caller passes it,
else by the local valid count. Only valid positions are computed, so an all-masked batch gives 0
with a zero (not NaN) gradient, whatever the logits at padded positions hold.

Memory: `divergence` takes full logits (B, T, V). `chunked_divergence` takes hidden states and the
two `lm_head` weights and works on `chunk_size` tokens at a time: each chunk's float32 logits,
loss and gradients are computed and freed before the next, so peak memory is O(chunk_size * V)
rather than O(N * V), with the same values and gradients. The gradient is computed during the
forward pass (no recomputation), as Liger's fused-linear losses do.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from onpolicy_kd.batch import TeacherTopK


Tensor = torch.Tensor


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per row from log-probabilities, with 0 log 0 = 0."""
    a = log_a.exp()
    # `a == 0`, not `a > 0`: NaN must propagate (NaN > 0 is False and would silently turn NaN into 0).
    return torch.where(a == 0, 0.0, a * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), stably."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _forward_kl(s: Tensor, t: Tensor, beta: float, skew: float) -> Tensor:
    return _kl(t, s)


def _reverse_kl(s: Tensor, t: Tensor, beta: float, skew: float) -> Tensor:
    return _kl(s, t)


def _jsd(s: Tensor, t: Tensor, beta: float, skew: float) -> Tensor:
    if beta == 0:
        return _kl(t, s)
    if beta == 1:
        return _kl(s, t)
    log_m = _log_mix(t, s, beta)
    return beta * _kl(t, log_m) + (1 - beta) * _kl(s, log_m)


def _tv(s: Tensor, t: Tensor, beta: float, skew: float) -> Tensor:
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


def _skew_forward_kl(s: Tensor, t: Tensor, beta: float, skew: float) -> Tensor:
    return _kl(t, _log_mix(t, s, skew))


def _skew_reverse_kl(s: Tensor, t: Tensor, beta: float, skew: float) -> Tensor:
    return _kl(s, _log_mix(s, t, skew))


def _logit_mse(s: Tensor, t: Tensor, beta: float, skew: float) -> Tensor:
    # log-probs are the logits / tau minus a per-row constant, which centring removes: no raw logits needed. Entries
    # a model masks to -inf (probability 0) have no logit to compare: the means and the error run over the entries
    # finite in both rows (else one -inf would make the row's mean -inf and the loss NaN); a NaN still propagates.
    finite = ~(torch.isneginf(s) | torch.isneginf(t))
    count = finite.sum(-1, keepdim=True).clamp_min(1)
    s, t = torch.where(finite, s, 0.0), torch.where(finite, t, 0.0)
    centred = (s - s.sum(-1, keepdim=True) / count) - (t - t.sum(-1, keepdim=True) / count)
    return torch.where(finite, centred, 0.0).pow(2).sum(-1) / count.squeeze(-1)


# name -> f(student_logprobs, teacher_logprobs, beta, skew) -> per-row values (in the log-probs' precision)
DIVERGENCES: dict[str, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "tv": _tv,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "logit_mse": _logit_mse,
}


def _check(kind: str, beta: float, skew: float, temperature: float) -> Callable[[Tensor, Tensor, float, float], Tensor]:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; valid: {', '.join(DIVERGENCES)}")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    if not 0 < skew < 1:
        raise ValueError(f"skew={skew} must be in (0, 1)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    return DIVERGENCES[kind]


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the losses compute in: float32 at least, float64 when given float64."""
    return torch.promote_types(dtype, torch.float32)


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log-softmax of logits / temperature, in at least float32."""
    logits = logits.to(math_dtype(logits.dtype))
    return F.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)


def per_token_divergence(
    student_logits: Tensor, teacher_logits: Tensor, *, kind: str, beta: float = 0.5, skew: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """The divergence at every position: (..., V) logits -> (...) float32 values (for logging, or custom reductions)."""
    fn = _check(kind, beta, skew, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ")
    return fn(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature), beta, skew)


def reduce_tokens(values: Tensor, mask: Tensor | None = None, num_tokens: Tensor | int | None = None) -> Tensor:
    """Sum of `values` over valid positions / `num_tokens` (global count) or / local valid count (min 1)."""
    if mask is not None:
        values = torch.where(mask.bool(), values, torch.zeros_like(values))
        count = mask.sum()
    else:
        count = torch.tensor(values.numel(), device=values.device)
    denominator = count.clamp_min(1) if num_tokens is None else torch.as_tensor(num_tokens, device=values.device).clamp_min(1)
    return values.sum() / denominator


def divergence(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, kind: str, beta: float = 0.5,
    skew: float = 0.1, temperature: float = 1.0, num_tokens: Tensor | int | None = None,
) -> Tensor:
    """Mean divergence over valid positions. Logits (B, T, V) or (N, V); mask (B, T) or (N,), 1 = valid."""
    fn = _check(kind, beta, skew, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ")
    s_NV = student_logits.reshape(-1, student_logits.shape[-1])
    t_NV = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if mask is None:
        valid_N = torch.ones(s_NV.shape[0], dtype=torch.bool, device=s_NV.device)
    else:
        valid_N = mask.reshape(-1).bool()
    # Only valid rows are computed: padded positions can hold anything (even inf) without harm.
    values = fn(log_probs(s_NV[valid_N], temperature), log_probs(t_NV[valid_N], temperature), beta, skew)
    return reduce_tokens(values, None, num_tokens)  # (values holds the valid rows only: their count by default)


class _ChunkedDivergence(torch.autograd.Function):
    """Sum of per-token divergences over rows of hidden states, chunk by chunk, gradients computed in forward.
    `rows(student_logprobs, start, end)` gives the divergence of each row of the chunk [start, end) from the
    student's log-probabilities there (the teacher's side is its business: its own head, or a cached top-k)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, student_hidden: Tensor, student_weight: Tensor, rows: Callable[[Tensor, int, int], Tensor],
        temperature: float, chunk_size: int,
    ) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(student_hidden) if need_hidden else None
        dtype = math_dtype(student_hidden.dtype)
        grad_weight = None  # (V, H): the first chunk's gradient, then the others added to it (no zero-filled start)
        total = torch.zeros((), dtype=dtype, device=student_hidden.device)
        weight = student_weight.detach().requires_grad_(need_weight)
        for start in range(0, student_hidden.shape[0], chunk_size):
            end = start + chunk_size
            hidden = student_hidden[start:end].detach().requires_grad_(need_hidden)
            with torch.enable_grad():
                student_logprobs = log_probs(F.linear(hidden, weight), temperature)
                chunk_sum = rows(student_logprobs, start, end).sum()
                inputs = [x for x, needed in ((hidden, need_hidden), (weight, need_weight)) if needed]
                grads = torch.autograd.grad(chunk_sum, inputs) if inputs else ()
            grads = list(grads)
            if need_hidden:
                grad_hidden[start:end] = grads.pop(0)  # type: ignore[index]
            if need_weight:
                grad_weight = accumulate(grad_weight, grads.pop(0), math_dtype(student_weight.dtype))
            total += chunk_sum.detach()
        if need_weight and grad_weight is None:  # no rows at all
            grad_weight = torch.zeros_like(student_weight, dtype=math_dtype(student_weight.dtype))
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has = (need_hidden, need_weight)
        ctx.weight_dtype = student_weight.dtype
        ctx.consumed = False
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if ctx.consumed:  # the saved gradients were scaled in place by the first backward
            raise RuntimeError("chunked_divergence's graph was backwarded twice (retain_graph); compute the loss again")
        ctx.consumed = True
        saved = list(ctx.saved_tensors)
        need_hidden, need_weight = ctx.has
        grad_hidden = saved.pop(0) * grad_output if need_hidden else None
        # in place: the head's gradient is the size of the head, and a second copy of it is the costliest allocation
        # of a CPU step (fresh pages, zero-filled by the kernel)
        grad_weight = saved.pop(0).mul_(grad_output).to(ctx.weight_dtype) if need_weight else None
        return grad_hidden, grad_weight, None, None, None


def accumulate(total: Tensor | None, chunk: Tensor, dtype: torch.dtype) -> Tensor:
    """A chunk's gradient added to the sum so far; the first chunk's becomes the sum (converted to `dtype`), so
    a weight-sized sum is never zero-filled first."""
    if total is None:
        return chunk.to(dtype)
    return total.add_(chunk)


def first(x: Tensor, n: int | None, dim: int = 0) -> Tensor:
    """x's first n entries along `dim`, or x itself when that is all of it: a slice that keeps everything still
    records a SliceBackward, whose backward zero-fills and copies a gradient the size of x (an lm_head's, for the
    vocabulary cuts)."""
    if n is None or n >= x.shape[dim]:
        return x
    return x.narrow(dim, 0, n)


def chunked_divergence(
    student_hidden: Tensor, teacher_hidden: Tensor, student_lm_head: Tensor, teacher_lm_head: Tensor,
    mask: Tensor | None = None, *, kind: str, beta: float = 0.5, skew: float = 0.1, temperature: float = 1.0,
    num_tokens: Tensor | int | None = None, chunk_size: int = 1024, vocab_size: int | None = None,
) -> Tensor:
    """`divergence` from hidden states and `lm_head` weights without materialising (N, V) logits.

    student_hidden (..., Hs) and teacher_hidden (..., Ht) are aligned position by position (the widths may
    differ); the heads are (Vs, Hs) and (Vt, Ht). `vocab_size` (default min(Vs, Vt)) drops padded
    embedding rows. Heads without bias only (as Llama, Qwen, GPT-2).
    """
    fn = _check(kind, beta, skew, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    vocab = vocab_size or min(student_lm_head.shape[0], teacher_lm_head.shape[0])
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if h_s.shape[0] != h_t.shape[0]:
        raise ValueError(f"student has {h_s.shape[0]} positions, teacher {h_t.shape[0]}")
    if mask is not None:
        valid = mask.reshape(-1).bool()
        h_s, h_t = h_s[valid], h_t[valid]
    count = h_s.shape[0]
    h_t, w_t = h_t.detach(), first(teacher_lm_head, vocab).detach()

    def rows(student_logprobs: Tensor, start: int, end: int) -> Tensor:
        with torch.no_grad():
            teacher_logprobs = log_probs(F.linear(h_t[start:end], w_t), temperature)
        return fn(student_logprobs, teacher_logprobs, beta, skew)

    total = _ChunkedDivergence.apply(h_s, first(student_lm_head, vocab), rows, temperature, chunk_size)
    return reduce_tokens(total, None, num_tokens if num_tokens is not None else count)


def topk_buckets(student_logprobs: Tensor, top: TeacherTopK) -> tuple[Tensor, Tensor]:
    """Both distributions over the teacher's k tokens plus one bucket for everything else: (N, k + 1) log-probs of
    the student and of the teacher, from the student's full (N, V) log-probabilities and the teacher's top-k rows.
    The bucket holds the probability each model gives the tokens outside the teacher's k; it is left out when k
    covers the vocabulary (both models' tail is then empty, and the buckets are the whole distributions)."""
    student_top = student_logprobs.gather(-1, top.ids.long())
    teacher_top = top.logprobs.to(student_logprobs.dtype)
    if top.ids.shape[-1] >= student_logprobs.shape[-1]:
        return student_top, teacher_top
    # the student's mass outside the k ids, summed in log space (not 1 - sum, which loses it to rounding)
    student_tail = student_logprobs.scatter(-1, top.ids.long(), float("-inf")).logsumexp(-1, keepdim=True)
    teacher_tail = top.tail.to(student_logprobs.dtype).unsqueeze(-1)
    return torch.cat([student_top, student_tail], -1), torch.cat([teacher_top, teacher_tail], -1)


def _check_topk(kind: str, beta: float, skew: float, temperature: float) -> Callable[[Tensor, Tensor, float, float], Tensor]:
    if kind == "logit_mse":
        raise ValueError("logit_mse compares whole rows of logits, which a top-k cache does not keep; use a KL, the "
                         "JSD or tv")
    return _check(kind, beta, skew, temperature)


def topk_divergence(
    student_logits: Tensor, top: TeacherTopK, mask: Tensor | None = None, *, kind: str, beta: float = 0.5,
    skew: float = 0.1, temperature: float = 1.0, num_tokens: Tensor | int | None = None,
) -> Tensor:
    """`divergence` against a teacher kept as its top-k (`TeacherTopK`, already at `temperature`): the divergence
    between the two models' distributions over the teacher's k tokens and one bucket for the rest of the
    vocabulary (`topk_buckets`). Merging tokens into one bucket can only lower a KL, the JSD or tv, so this is
    a lower bound of the full divergence, equal to it when k covers the vocabulary; the student is still pushed
    to give the rest the mass the teacher gives it, but not told how to share it out. Logits (B, T, V) or
    (N, V), top-k rows (B, T, k) or (N, k)."""
    fn = _check_topk(kind, beta, skew, temperature)
    s_NV = student_logits.reshape(-1, student_logits.shape[-1])
    top_N = TeacherTopK(*(x.reshape(-1, *x.shape[student_logits.dim() - 1:]) for x in top))
    if top_N.ids.shape[0] != s_NV.shape[0]:
        raise ValueError(f"the student has {s_NV.shape[0]} positions, the teacher's top-k {top_N.ids.shape[0]}")
    valid_N = torch.ones(s_NV.shape[0], dtype=torch.bool, device=s_NV.device) if mask is None else mask.reshape(-1).bool()
    values = fn(*topk_buckets(log_probs(s_NV[valid_N], temperature), top_N.rows(valid_N)), beta, skew)
    return reduce_tokens(values, None, num_tokens)  # (values holds the valid rows only: their count by default)


def chunked_topk_divergence(
    student_hidden: Tensor, student_lm_head: Tensor, top: TeacherTopK, mask: Tensor | None = None, *, kind: str,
    beta: float = 0.5, skew: float = 0.1, temperature: float = 1.0, num_tokens: Tensor | int | None = None,
    chunk_size: int = 1024, vocab_size: int | None = None,
) -> Tensor:
    """`topk_divergence` from the student's hidden states (..., H) and lm_head (V, H) without materialising its
    (N, V) logits, `chunk_size` positions at a time (as `chunked_divergence`); `vocab_size` drops padded rows of
    the head."""
    fn = _check_topk(kind, beta, skew, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    top_N = TeacherTopK(*(x.reshape(-1, *x.shape[student_hidden.dim() - 1:]) for x in top))
    if top_N.ids.shape[0] != h_s.shape[0]:
        raise ValueError(f"the student has {h_s.shape[0]} positions, the teacher's top-k {top_N.ids.shape[0]}")
    if mask is not None:
        valid = mask.reshape(-1).bool()
        h_s, top_N = h_s[valid], top_N.rows(valid)

    def rows(student_logprobs: Tensor, start: int, end: int) -> Tensor:
        return fn(*topk_buckets(student_logprobs, top_N.rows(slice(start, end))), beta, skew)

    total = _ChunkedDivergence.apply(h_s, first(student_lm_head, vocab_size), rows, temperature, chunk_size)
    return reduce_tokens(total, None, num_tokens if num_tokens is not None else h_s.shape[0])


def token_cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor | None = None, num_tokens: Tensor | int | None = None) -> Tensor:
    """Language-modelling loss: -log q(label) at each valid position (logits already aligned with labels)."""
    nll = -log_probs(logits).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return reduce_tokens(nll, mask, num_tokens)


def gather_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log q(token) per position, float32: (B, T, V), (B, T) -> (B, T)."""
    return log_probs(logits, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# Liger-Kernel's fused linear JSD computes exactly our generalized JSD (same beta convention: P teacher,
# Q student, beta = 0 forward KL, beta = 1 reverse KL), averaged over its rows, on CUDA only.
LIGER_KINDS = {"jsd", "forward_kl", "reverse_kl"}
BACKENDS = ("torch", "chunked", "liger")


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # not installed, or no Triton/CUDA stack
        return False
    return True


def linear_divergence(
    student_hidden: Tensor, teacher_hidden: Tensor, student_lm_head: Tensor, teacher_lm_head: Tensor,
    mask: Tensor | None = None, *, kind: str, beta: float = 0.5, skew: float = 0.1, temperature: float = 1.0,
    num_tokens: Tensor | int | None = None, backend: str = "chunked", chunk_size: int = 1024,
) -> Tensor:
    """The divergence from hidden states and heads, with the given implementation (chosen once, at set-up).

    'torch' materialises full logits (the reference), 'chunked' bounds memory, 'liger' fuses on CUDA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown divergence backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "liger" and kind not in LIGER_KINDS:
        raise ValueError(f"the liger backend computes {sorted(LIGER_KINDS)}, not {kind}")
    vocab = min(student_lm_head.shape[0], teacher_lm_head.shape[0])
    if backend == "chunked":
        return chunked_divergence(student_hidden, teacher_hidden, student_lm_head, teacher_lm_head, mask, kind=kind,
                                  beta=beta, skew=skew, temperature=temperature, num_tokens=num_tokens,
                                  chunk_size=chunk_size, vocab_size=vocab)
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if mask is not None:
        valid = mask.reshape(-1).bool()
        h_s, h_t = h_s[valid], h_t[valid]
    count = h_s.shape[0]
    if backend == "torch":
        return divergence(F.linear(h_s, first(student_lm_head, vocab)),
                          F.linear(h_t, first(teacher_lm_head, vocab)).detach(), kind=kind, beta=beta, skew=skew,
                          temperature=temperature, num_tokens=num_tokens if num_tokens is not None else count)
    from liger_kernel.transformers import LigerFusedLinearJSD

    liger_beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, beta)
    if count == 0:
        return (student_hidden.sum() * 0).float()
    mean = LigerFusedLinearJSD(jsd_beta=liger_beta, temperature=temperature)(
        h_s, first(student_lm_head, vocab), h_t.detach(), first(teacher_lm_head, vocab).detach(), None
    )
    return reduce_tokens(mean.float() * count, None, num_tokens if num_tokens is not None else count)
