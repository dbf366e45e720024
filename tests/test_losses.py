"""Divergences against a naive float64 reference (values and gradients), and the chunked path against the plain one."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from onpolicy_kd.objectives.divergences import (
    DIVERGENCES, chunked_divergence, divergence, per_token_divergence, reduce_tokens, token_cross_entropy,
)

KINDS = list(DIVERGENCES)
B, T, V = 3, 47, 123  # odd shapes on purpose


def naive_divergence(s_logits, t_logits, mask, kind, beta=0.5, skew=0.1, temperature=1.0):
    """Straight from the formulas in probability space, float64, one valid position at a time."""
    s_logits, t_logits = s_logits.double() / temperature, t_logits.double() / temperature
    values = []
    for b in range(s_logits.shape[0]):
        for t in range(s_logits.shape[1]):
            if not mask[b, t]:
                continue
            q = torch.softmax(s_logits[b, t], -1)
            p = torch.softmax(t_logits[b, t], -1)
            kl = lambda a, c: (a * (a / c).log()).sum()  # noqa: E731
            if kind == "forward_kl" or (kind == "jsd" and beta == 0):
                v = kl(p, q)
            elif kind == "reverse_kl" or (kind == "jsd" and beta == 1):
                v = kl(q, p)
            elif kind == "jsd":
                m = beta * p + (1 - beta) * q
                v = beta * kl(p, m) + (1 - beta) * kl(q, m)
            elif kind == "tv":
                v = 0.5 * (p - q).abs().sum()
            elif kind == "skew_forward_kl":
                v = kl(p, skew * p + (1 - skew) * q)
            elif kind == "skew_reverse_kl":
                v = kl(q, skew * q + (1 - skew) * p)
            elif kind == "logit_mse":  # the logits (at temperature) with each row's mean taken off
                c_s, c_t = s_logits[b, t] - s_logits[b, t].mean(), t_logits[b, t] - t_logits[b, t].mean()
                v = ((c_s - c_t) ** 2).mean()
            values.append(v)
    return torch.stack(values).sum() / max(len(values), 1)


def _inputs(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g) * scale).requires_grad_()
    t = (torch.randn(B, T, V, generator=g) * scale).requires_grad_()
    mask = torch.rand(B, T, generator=g) > 0.3
    return s, t, mask


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


CASES = [(kind, 0.5) for kind in KINDS if kind != "jsd"] + [("jsd", beta) for beta in (0.0, 0.3, 0.5, 0.9, 1.0)]


@pytest.mark.parametrize("kind, beta", CASES)
def test_against_naive_float64(kind, beta):
    s, t, mask = _inputs(seed=KINDS.index(kind) * 10 + int(beta * 10))
    ours = divergence(s, t, mask, kind=kind, beta=beta, skew=0.25)
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    ref = naive_divergence(s64, t64, mask, kind, beta=beta, skew=0.25)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    g_ours = _grads(ours, s, t)
    g_ref = _grads(ref, s64, t64)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)


def test_beta_endpoints_equal_torch_kl_div():
    s, t, mask = _inputs(seed=3)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    forward = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)[mask].mean()  # KL(p || q)
    reverse = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)[mask].mean()  # KL(q || p)
    torch.testing.assert_close(divergence(s, t, mask, kind="jsd", beta=0.0), forward)
    torch.testing.assert_close(divergence(s, t, mask, kind="jsd", beta=1.0), reverse)
    torch.testing.assert_close(divergence(s, t, mask, kind="forward_kl"), forward)
    torch.testing.assert_close(divergence(s, t, mask, kind="reverse_kl"), reverse)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_inputs_give_zero(kind):
    s, _, mask = _inputs(seed=4)
    value = divergence(s, s.detach().clone(), mask, kind=kind)
    assert abs(value.item()) < 1e-6
    grad = _grads(value, s)[0]
    assert grad.abs().max() < 1e-6  # a minimum: zero gradient too


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_gives_zero_not_nan(kind):
    s, t, _ = _inputs(seed=5)
    garbage = s.detach().clone()
    garbage[0, 0, 0] = float("inf")  # padded positions may hold anything
    garbage = garbage.requires_grad_()
    mask = torch.zeros(B, T, dtype=torch.bool)
    value = divergence(garbage, t, mask, kind=kind)
    assert value.item() == 0.0
    grad = _grads(value, garbage)[0]
    assert torch.isfinite(grad).all() and grad.abs().max() == 0
    value_chunked = chunked_divergence(torch.randn(4, 8, requires_grad=True), torch.randn(4, 8), torch.randn(V, 8),
                                       torch.randn(V, 8), torch.zeros(4, dtype=torch.bool), kind=kind)
    assert value_chunked.item() == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_divides_logits_without_rescaling(kind):
    s, t, mask = _inputs(seed=6)
    tau = 2.5
    torch.testing.assert_close(divergence(s, t, mask, kind=kind, temperature=tau), divergence(s / tau, t / tau, mask, kind=kind))
    ref = naive_divergence(s.detach(), t.detach(), mask, kind, temperature=tau)
    torch.testing.assert_close(divergence(s, t, mask, kind=kind, temperature=tau).double(), ref, rtol=1e-5, atol=1e-6)


def test_low_precision_inputs_use_float32_math():
    s, t, mask = _inputs(seed=7)
    ours = divergence(s.bfloat16(), t.bfloat16(), mask, kind="jsd")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, divergence(s.bfloat16().float(), t.bfloat16().float(), mask, kind="jsd"))


def test_global_token_count_reduction():
    """Two micro-batches, each divided by the global count, add up to the full batch's mean."""
    s, t, mask = _inputs(seed=8)
    full = divergence(s, t, mask, kind="reverse_kl")
    n_global = mask.sum()
    parts = [divergence(s[i:j], t[i:j], mask[i:j], kind="reverse_kl", num_tokens=n_global) for i, j in ((0, 1), (1, 3))]
    torch.testing.assert_close(sum(parts), full)
    torch.testing.assert_close(reduce_tokens(torch.ones(2, 3), torch.tensor([[1, 0, 0], [1, 1, 0]])), torch.tensor(1.0))


def test_per_token_variant_and_errors():
    s, t, mask = _inputs(seed=9)
    per = per_token_divergence(s, t, kind="tv")
    assert per.shape == (B, T) and ((per >= 0) & (per <= 1 + 1e-6)).all()
    torch.testing.assert_close(per[mask].mean(), divergence(s, t, mask, kind="tv"))
    for kind in KINDS:  # (B, T, V) in, the value at every position out: the rows' reductions run over V alone
        per = per_token_divergence(s, t, kind=kind)
        assert per.shape == (B, T), kind
        torch.testing.assert_close(per[mask].mean(), divergence(s, t, mask, kind=kind), msg=kind)
    with pytest.raises(ValueError, match="unknown divergence 'kl'; valid: forward_kl, reverse_kl, jsd"):
        divergence(s, t, mask, kind="kl")
    with pytest.raises(ValueError, match="beta=1.5"):
        divergence(s, t, mask, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="differ"):
        divergence(s, t[:, :-1], kind="jsd")


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_plain_with_different_hidden_widths(kind):
    g = torch.Generator().manual_seed(10)
    hs, ht, n_pad = 24, 40, 5  # different widths; the teacher head has padded rows
    h_s = torch.randn(B, T, hs, generator=g).requires_grad_()
    h_t = torch.randn(B, T, ht, generator=g)
    w_s = (torch.randn(V, hs, generator=g) * 0.5).requires_grad_()
    w_t = torch.randn(V + n_pad, ht, generator=g) * 0.5
    mask = torch.rand(B, T, generator=g) > 0.3
    plain = divergence(h_s @ w_s.T, h_t @ w_t[:V].T, mask, kind=kind, beta=0.3, temperature=1.5)
    chunked = chunked_divergence(h_s, h_t, w_s, w_t, mask, kind=kind, beta=0.3, temperature=1.5, chunk_size=16)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-7)
    for a, b in zip(_grads(chunked, h_s, w_s), _grads(plain, h_s, w_s)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_frozen_head_and_global_count():
    g = torch.Generator().manual_seed(11)
    h_s = torch.randn(10, 8, generator=g).requires_grad_()
    w = torch.randn(V, 8, generator=g)  # frozen head: only the hidden states get a gradient
    h_t = torch.randn(10, 8, generator=g)
    out = chunked_divergence(h_s, h_t, w, w, kind="forward_kl", num_tokens=40, chunk_size=3)
    plain = divergence(h_s @ w.T, h_t @ w.T, kind="forward_kl", num_tokens=40)
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(_grads(out, h_s)[0], _grads(plain, h_s)[0])
    # one row per pass is the smallest chunk, and a valid one
    torch.testing.assert_close(chunked_divergence(h_s, h_t, w, w, kind="forward_kl", num_tokens=40, chunk_size=1), plain)


def test_chunked_divergence_says_what_is_wrong_with_its_inputs():
    """The messages name the bad value: a chunk size below one row, and hidden states with different numbers of
    positions (widths 5 and 7, so a message that read the width instead of the positions would show)."""
    w = torch.randn(V, 5)
    with pytest.raises(ValueError, match=r"^chunk_size=0 must be >= 1$"):
        chunked_divergence(torch.randn(3, 5), torch.randn(3, 5), w, w, kind="jsd", chunk_size=0)
    with pytest.raises(ValueError, match=r"^student has 3 positions, teacher 4$"):
        chunked_divergence(torch.randn(3, 5), torch.randn(4, 7), w, torch.randn(V, 7), kind="jsd")


def test_token_cross_entropy():
    s, _, mask = _inputs(seed=12)
    labels = torch.randint(0, V, (B, T))
    ref = F.cross_entropy(s[mask], labels[mask])
    torch.testing.assert_close(token_cross_entropy(s, labels, mask), ref)
    # divided by the step's count when given one (micro-batches and processes), not this batch's
    torch.testing.assert_close(token_cross_entropy(s, labels, mask, num_tokens=2 * mask.sum()), ref / 2)


def test_gather_logprobs_reads_the_distribution_at_temperature():
    from onpolicy_kd.objectives.divergences import gather_logprobs

    s, _, _ = _inputs(seed=13)
    labels = torch.randint(0, V, (B, T))
    expected = F.log_softmax(s.detach() / 2.0, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_logprobs(s.detach(), labels, temperature=2.0), expected)
    plain = F.log_softmax(s.detach(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_logprobs(s.detach(), labels), plain)  # temperature 1 unless told


def test_logit_mse_of_a_row_with_one_shared_finite_entry_is_zero():
    """One entry finite in both rows: each centred logit is 0 (its own mean), so the rows agree."""
    s, t, _ = _inputs(seed=14)
    t = t.detach().clone()
    t[..., 1:] = float("-inf")
    assert divergence(s, t, kind="logit_mse").item() == 0.0


@pytest.mark.parametrize("backend", ["torch", "chunked"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wider_head, num_tokens", [("teacher", 20), ("student", None)])
def test_linear_divergence_backends_agree(backend, kind, wider_head, num_tokens):
    """Either head may be the wider (padded) one: both are cut to the shared vocabulary; with no num_tokens the
    divergence is the mean over the valid positions."""
    g = torch.Generator().manual_seed(13)
    h_s = torch.randn(2, 9, 12, generator=g).requires_grad_()
    h_t = torch.randn(2, 9, 20, generator=g)
    pad_s, pad_t = (0, 3) if wider_head == "teacher" else (3, 0)
    w_s, w_t = torch.randn(V + pad_s, 12, generator=g).requires_grad_(), torch.randn(V + pad_t, 20, generator=g)
    mask = torch.rand(2, 9, generator=g) > 0.4
    from onpolicy_kd.objectives.divergences import linear_divergence

    # beta, skew and temperature away from their defaults: each must reach the backend
    settings = dict(kind=kind, beta=0.3, skew=0.25, temperature=1.7, num_tokens=num_tokens)
    out = linear_divergence(h_s, h_t, w_s, w_t, mask, backend=backend, chunk_size=4, **settings)
    ref = divergence(h_s @ w_s[:V].T, h_t @ w_t[:V].T, mask, **settings)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)


def test_linear_divergence_hands_its_chunk_size_to_the_chunked_backend(monkeypatch):
    """objective.chunk_size bounds the memory of one pass over the head: the values are the same at any size (the
    test above), so only a look at what reaches the backend shows the user's setting is not replaced by the default
    (found by mutation testing)."""
    from onpolicy_kd.objectives import divergences

    seen, real = [], divergences.chunked_divergence
    monkeypatch.setattr(divergences, "chunked_divergence", lambda *a, **k: seen.append(k["chunk_size"]) or real(*a, **k))
    h, w = torch.randn(10, 8), torch.randn(V, 8)
    divergences.linear_divergence(h, h, w, w, kind="forward_kl", backend="chunked", chunk_size=3)
    assert seen == [3]


def test_linear_divergence_rejects_an_unresolved_backend():
    """The backend is chosen once at set-up (training.loop.choose_head); the loss takes only a resolved one."""
    from onpolicy_kd.objectives.divergences import linear_divergence

    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"^unknown divergence backend 'auto'; valid: torch, chunked, liger$"):
        linear_divergence(h, h, w, w, kind="jsd", backend="auto")
    with pytest.raises(ValueError, match=r"^the liger backend computes \['forward_kl', 'jsd', 'reverse_kl'\], not tv$"):
        linear_divergence(h, h, w, w, kind="tv", backend="liger")


def test_linear_divergence_is_chunked_unless_told():
    """Called with no backend (the Python API), the divergence is the chunked one: the reference's value."""
    from onpolicy_kd.objectives.divergences import linear_divergence

    g = torch.Generator().manual_seed(29)
    h_s, h_t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 6, generator=g)
    w_s, w_t = torch.randn(V, 8, generator=g), torch.randn(V, 6, generator=g)
    out = linear_divergence(h_s, h_t, w_s, w_t, kind="reverse_kl")
    torch.testing.assert_close(out, divergence(h_s @ w_s.T, h_t @ w_t.T, kind="reverse_kl"), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel runs on CUDA only")
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_liger_equals_chunked_on_cuda(kind):
    pytest.importorskip("liger_kernel")
    from onpolicy_kd.objectives.divergences import linear_divergence

    g = torch.Generator(device="cuda").manual_seed(0)
    h_s = torch.randn(64, 32, device="cuda", generator=g).requires_grad_()
    h_t = torch.randn(64, 48, device="cuda", generator=g)
    w_s = torch.randn(1000, 32, device="cuda", generator=g).requires_grad_()
    w_t = torch.randn(1000, 48, device="cuda", generator=g)
    mask = torch.rand(64, device="cuda", generator=g) > 0.3
    a = linear_divergence(h_s, h_t, w_s, w_t, mask, kind=kind, beta=0.3, temperature=2.0, backend="liger", num_tokens=50)
    b = linear_divergence(h_s, h_t, w_s, w_t, mask, kind=kind, beta=0.3, temperature=2.0, backend="chunked", num_tokens=50)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for x, y in zip(torch.autograd.grad(a, (h_s, w_s)), torch.autograd.grad(b, (h_s, w_s))):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5)


class _LigerFusedLinearJSDOnCPU(torch.nn.Module):
    """What Liger's LigerFusedLinearJSD documents, in plain torch: the generalized JSD of the two heads' logits at
    `temperature`, forward KL at jsd_beta 0 and reverse KL at 1, averaged over the rows. Liger runs on CUDA only;
    with this in its place the glue around it (the mapping of kinds to jsd_beta, the heads cut to the shared
    vocabulary, the token count and an empty batch) is tested on the CPU. test_liger_equals_chunked_on_cuda checks
    the real kernel on a GPU."""

    def __init__(self, jsd_beta: float, temperature: float):
        super().__init__()
        self.kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(jsd_beta, "jsd")
        self.beta, self.temperature = jsd_beta, temperature

    def forward(self, h_s, w_s, h_t, w_t, shift_labels):
        assert shift_labels is None and not h_t.requires_grad and not w_t.requires_grad
        return divergence(h_s @ w_s.T, h_t @ w_t.T, kind=self.kind, beta=self.beta, temperature=self.temperature)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("num_tokens, wider_head", [(None, "student"), (50, "student"), (50, "teacher")])
def test_the_liger_backend_glue_equals_chunked_with_ligers_documented_kernel(kind, num_tokens, wider_head,
                                                                              monkeypatch):
    """Either head may have padded rows (both are cut to the shared vocabulary), and a batch with one valid
    position is a batch, not an empty one."""
    import types

    from onpolicy_kd.objectives.divergences import linear_divergence

    monkeypatch.setitem(sys.modules, "liger_kernel.transformers",
                        types.SimpleNamespace(LigerFusedLinearJSD=_LigerFusedLinearJSDOnCPU))
    g = torch.Generator().manual_seed(31)
    h_s, h_t = torch.randn(2, 9, 12, generator=g).requires_grad_(), torch.randn(2, 9, 20, generator=g)
    pad_s, pad_t = (2, 0) if wider_head == "student" else (0, 3)
    w_s = torch.randn(V + pad_s, 12, generator=g).requires_grad_()
    w_t = torch.randn(V + pad_t, 20, generator=g).requires_grad_()
    mask = torch.rand(2, 9, generator=g) > 0.4
    settings = dict(kind=kind, beta=0.3, temperature=1.7, num_tokens=num_tokens)
    a = linear_divergence(h_s, h_t, w_s, w_t, mask, backend="liger", **settings)
    b = linear_divergence(h_s, h_t, w_s, w_t, mask, backend="chunked", chunk_size=4, **settings)
    assert a.dtype == torch.float32 and a.shape == ()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for x, y in zip(torch.autograd.grad(a, (h_s, w_s)), torch.autograd.grad(b, (h_s, w_s))):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    # no valid position: a zero that still reaches the student's graph (the step's backward needs it)
    none = linear_divergence(h_s, h_t, w_s, w_t, torch.zeros(2, 9, dtype=torch.bool), backend="liger", **settings)
    assert none.item() == 0.0 and none.dtype == torch.float32 and none.requires_grad
    one = torch.zeros(2, 9, dtype=torch.bool)
    one[1, 4] = True
    torch.testing.assert_close(linear_divergence(h_s, h_t, w_s, w_t, one, backend="liger", **settings),
                               linear_divergence(h_s, h_t, w_s, w_t, one, backend="chunked", **settings))
    assert linear_divergence(h_s, h_t, w_s, w_t, one, backend="liger", **settings).item() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_nan_logits_give_nan_not_zero(kind):
    """A broken model must be visible: NaN logits at a valid position give a NaN divergence, never 0."""
    s, t, _ = _inputs(seed=14)
    s = s.detach().clone()
    s[0, 0] = float("nan")
    assert torch.isnan(divergence(s, t, kind=kind))


@pytest.mark.parametrize("kind, beta", CASES)
def test_float64_inputs_keep_float64_math(kind, beta):
    """float64 logits give float64 values and gradients that match the float64 reference to ~1e-12 (float32 math
    would be ~1e-6 off)."""
    s, t, mask = _inputs(seed=40 + KINDS.index(kind) + int(beta * 10))
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    ours = divergence(s64, t64, mask, kind=kind, beta=beta, skew=0.25)
    ref_s, ref_t = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    ref = naive_divergence(ref_s, ref_t, mask, kind, beta=beta, skew=0.25)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-11, atol=1e-13)
    for a, b in zip(_grads(ours, s64, t64), _grads(ref, ref_s, ref_t)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_float64_chunked_divergence_and_cross_entropy(kind):
    g = torch.Generator().manual_seed(50)
    h_s = torch.randn(2, 9, 12, generator=g, dtype=torch.float64).requires_grad_()
    h_t = torch.randn(2, 9, 20, generator=g, dtype=torch.float64)
    w_s = torch.randn(V, 12, generator=g, dtype=torch.float64).requires_grad_()
    w_t = torch.randn(V, 20, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 9, generator=g) > 0.4
    out = chunked_divergence(h_s, h_t, w_s, w_t, mask, kind=kind, chunk_size=4)
    ref = naive_divergence(h_s @ w_s.T, h_t @ w_t.T, mask, kind)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-13)
    for a, b in zip(_grads(out, h_s, w_s), _grads(ref, h_s, w_s)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    labels = torch.randint(0, V, (2, 9), generator=g)
    logits = h_s @ w_s.T
    ce = token_cross_entropy(logits, labels, mask)
    naive = torch.stack([-torch.log_softmax(logits[b, t], -1)[labels[b, t]] for b in range(2) for t in range(9)
                         if mask[b, t]]).mean()
    assert ce.dtype == torch.float64
    torch.testing.assert_close(ce, naive, rtol=1e-12, atol=1e-14)


def test_chunked_head_gradient_without_rows_and_a_second_backward():
    """The head's gradient is built from the first chunk's (no zero-filled start): with every row masked it is
    still a zero gradient of the head's shape; and since the backward scales the kept gradient in place, a second
    backward through the same graph is refused instead of returning a twice-scaled gradient."""
    from onpolicy_kd.objectives.divergences import first

    g = torch.Generator().manual_seed(12)
    h_s = torch.randn(2, 5, 8, generator=g).requires_grad_()
    w_s = torch.randn(V, 8, generator=g).requires_grad_()
    h_t, w_t = torch.randn(2, 5, 8, generator=g), torch.randn(V, 8, generator=g)
    none = chunked_divergence(h_s, h_t, w_s, w_t, torch.zeros(2, 5, dtype=torch.bool), kind="jsd", chunk_size=3)
    grad_h, grad_w = torch.autograd.grad(none, (h_s, w_s))
    assert grad_w.shape == w_s.shape and not grad_w.any() and not grad_h.any()

    loss = chunked_divergence(h_s, h_t, w_s, w_t, kind="reverse_kl", chunk_size=3) * 3.0
    plain = divergence(h_s @ w_s.T, h_t @ w_t.T, kind="reverse_kl") * 3.0
    loss.backward(retain_graph=True)
    torch.testing.assert_close(w_s.grad, torch.autograd.grad(plain, w_s)[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"^chunked_divergence's graph was backwarded twice \(retain_graph\); "
                                           r"compute the loss again$"):
        loss.backward()
    assert first(w_s, V) is w_s and first(w_s, None) is w_s and first(w_s, 3).shape == (3, 8)


def test_logit_mse_ignores_a_constant_added_to_a_row_of_logits():
    """The softmax ignores a per-row offset; so does logit_mse (a raw-logit MSE would charge the student for it)."""
    s, t, mask = _inputs(seed=11)
    offset = torch.randn(B, T, 1) * 50
    torch.testing.assert_close(divergence(s + offset, t, mask, kind="logit_mse"), divergence(s, t, mask, kind="logit_mse"))
    assert divergence(s + offset, s, mask, kind="logit_mse").item() < 1e-6


def test_logit_mse_compares_only_the_entries_both_models_leave_finite():
    """A teacher that masks vocabulary entries to -inf: the loss is the one over the other entries, finite, with a
    finite gradient (a plain mean over the row would make it NaN)."""
    s, t, mask = _inputs(seed=12)
    masked = t.detach().clone()
    masked[..., :10] = float("-inf")
    value = divergence(s, masked, mask, kind="logit_mse")
    torch.testing.assert_close(value, divergence(s[..., 10:], t[..., 10:], mask, kind="logit_mse"))
    assert torch.isfinite(_grads(value, s)[0]).all()


def test_cross_entropy_loss_is_the_negative_log_likelihood_of_the_valid_tokens():
    """sft / seqkd: -sum of log q(y_t) over the valid completion tokens / the step's token count; the metric is this
    batch's per-token mean."""
    from onpolicy_kd.batch import Completions, completion_mask
    from onpolicy_kd.objectives.loss import ModelOutputs, StepContext, cross_entropy_loss

    mask = completion_mask(torch.tensor([3, 1]), 3)
    logprob = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -50.0, -60.0]], requires_grad=True)
    batch = Completions(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1), torch.zeros(2, 3, dtype=torch.long), mask,
                        source="references", texts=["", ""])
    metrics = {}
    loss = cross_entropy_loss(batch, ModelOutputs(terms={"logprob": logprob}), None, None, StepContext(num_tokens=8),
                              metrics)
    torch.testing.assert_close(loss, torch.tensor((1 + 2 + 3 + 4) / 8))
    assert metrics == {"train/ce": pytest.approx((1 + 2 + 3 + 4) / 4)}
    loss.backward()
    torch.testing.assert_close(logprob.grad, torch.where(mask, -1 / 8, 0.0))


def test_liger_is_available_exactly_when_its_transformers_module_imports(monkeypatch):
    import sys
    import types

    from onpolicy_kd.objectives.divergences import liger_available

    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # an import of it fails
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    assert liger_available() is False
    package = types.ModuleType("liger_kernel")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", types.ModuleType("liger_kernel.transformers"))
    assert liger_available() is True


def test_chunked_divergence_trains_a_head_under_frozen_hidden_states():
    """Only the head needs a gradient (hidden states from a frozen body): the head's gradient is the plain one and
    nothing is kept for the hidden states."""
    g = torch.Generator().manual_seed(17)
    h_s, h_t = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    w_s, w_t = torch.randn(V, 8, generator=g).requires_grad_(), torch.randn(V, 8, generator=g)
    out = chunked_divergence(h_s, h_t, w_s, w_t, kind="reverse_kl", chunk_size=3)
    plain = divergence(h_s @ w_s.T, h_t @ w_t.T, kind="reverse_kl")
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(_grads(out, w_s)[0], _grads(plain, w_s)[0])


def test_chunked_divergence_sums_on_the_inputs_device():
    """The running sum lives on the hidden states' device, not the default one (the meta device stands in for a
    GPU on this CPU-only machine: a sum made on the CPU could not take a chunk's sum from it)."""
    h = torch.randn(5, 8, device="meta", requires_grad=True)
    w = torch.randn(V, 8, device="meta")
    out = chunked_divergence(h, h.detach(), w, w, kind="jsd", chunk_size=2)
    out.backward()
    assert out.device.type == "meta" and h.grad.device.type == "meta"


def test_chunked_divergence_sums_a_bfloat16_heads_gradient_in_float32():
    """A bfloat16 head's gradient is summed over the chunks in float32: in bfloat16 (8 significant bits) a sum of 600
    equal chunk gradients stops growing at 256 of them (256 g + g rounds back to 256 g); in float32 the sum is the
    float64 reference's to bfloat16 precision."""
    g = torch.Generator().manual_seed(23)
    rows = 600
    h_s = torch.randn(1, 8, generator=g).expand(rows, 8).to(torch.bfloat16)
    h_t = torch.randn(1, 8, generator=g).expand(rows, 8).to(torch.bfloat16)
    w_s = torch.randn(V, 8, generator=g).to(torch.bfloat16).requires_grad_()
    w_t = torch.randn(V, 8, generator=g).to(torch.bfloat16)
    out = chunked_divergence(h_s, h_t, w_s, w_t, kind="reverse_kl", chunk_size=1)
    (grad,) = _grads(out, w_s)
    w64 = w_s.detach().double().requires_grad_()
    reference = divergence(h_s.double() @ w64.T, h_t.double() @ w_t.double().T, kind="reverse_kl")
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), _grads(reference, w64)[0], rtol=2e-2, atol=1e-4)


def test_per_token_divergence_says_which_shapes_differ():
    """Logits of two shapes (two vocabularies, or misaligned positions) are refused with both shapes named."""
    from onpolicy_kd.objectives.divergences import per_token_divergence

    with pytest.raises(ValueError, match=r"^student logits \(2, 3, 5\) and teacher logits \(2, 3, 6\) differ$"):
        per_token_divergence(torch.zeros(2, 3, 5), torch.zeros(2, 3, 6), kind="forward_kl")


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_per_token_divergence_divides_both_models_logits_by_the_temperature(kind):
    """At temperature 2 every position's value is the float64 reference's on both models' logits halved."""
    s, t, mask = _inputs(seed=13)
    every = torch.ones(B, T, dtype=torch.bool)
    reference = torch.stack([naive_divergence(s[b:b + 1, j:j + 1], t[b:b + 1, j:j + 1], every[:1, :1], kind,
                                              temperature=2.0) for b in range(B) for j in range(T)]).view(B, T)
    per = per_token_divergence(s, t, kind=kind, temperature=2.0)
    torch.testing.assert_close(per.double(), reference, rtol=1e-5, atol=1e-6)
