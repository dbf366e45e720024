"""The per-token terms of the student's distribution: the memory-bounded head against full logits, edge cases.

(The whole step through either head, every mode and penalty: tests/test_step.py::test_the_bounded_head_gives_the_full_logit_step;
each penalty's formula against a float64 loop: tests/test_penalties.py.)"""

from __future__ import annotations

import pytest
import torch

from onpolicy_kd.objectives import token_terms as tt
from onpolicy_kd.objectives.loss import ModelOutputs

B, T, V, HS, HT, E = 3, 5, 23, 6, 8, 4


def _inputs(mask_rows=((0, 5), (1, 2), (2, 0))):
    g = torch.Generator().manual_seed(3)
    h_s = torch.randn(B, T, HS, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(V, HS, generator=g, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(B, T, HT, generator=g, dtype=torch.float64), torch.randn(V, HT, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 4, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for row, length in mask_rows:
        mask[row, :length] = True
    embeddings = torch.randn(V, E, generator=g, dtype=torch.float64)
    return h_s, w_s, h_t, w_t, tokens, mask, embeddings


def _terms(tokens, mask, embeddings):
    return {"logprob": tt.sampled_logprob(tokens, 0.7), "kl": tt.reverse_kl_to_teacher(0.7), "entropy": tt.entropy(),
            "previous": tt.previous_probability(tokens, mask), "expected": tt.expected_embedding(embeddings)}


@pytest.mark.parametrize("chunk_size", [1, 2, 1000])
def test_chunked_terms_equal_the_logit_terms(chunk_size):
    h_s, w_s, h_t, w_t, tokens, mask, embeddings = _inputs()
    wanted = _terms(tokens, mask, embeddings)
    full = tt.token_terms(ModelOutputs(logits=h_s @ w_s.T), ModelOutputs(logits=h_t @ w_t.T), mask, wanted)
    bounded = tt.token_terms(ModelOutputs(hidden=(h_s,), head=w_s), ModelOutputs(hidden=(h_t,), head=w_t), mask, wanted,
                             chunk_size)
    assert full["expected"].shape == (B, T, E) and full["kl"].shape == (B, T)
    weights = {name: torch.randn(value.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i, (name, value) in enumerate(full.items())}

    def grads(values):
        total = sum((values[name] * weights[name]).sum() for name in values)
        return torch.autograd.grad(total, (h_s, w_s))

    for name in wanted:
        torch.testing.assert_close(bounded[name], full[name], rtol=1e-12, atol=1e-12, msg=name)
        assert (full[name][~mask] == 0).all()  # masked positions hold zeros
    for got, expected in zip(grads(bounded), grads(full)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_every_position_masked_gives_zeros_and_a_zero_gradient():
    h_s, w_s, h_t, w_t, tokens, mask, embeddings = _inputs(mask_rows=())
    for student, teacher in ((ModelOutputs(logits=h_s @ w_s.T), ModelOutputs(logits=h_t @ w_t.T)),
                             (ModelOutputs(hidden=(h_s,), head=w_s), ModelOutputs(hidden=(h_t,), head=w_t))):
        values = tt.token_terms(student, teacher, mask, _terms(tokens, mask, embeddings), chunk_size=2)
        total = sum(v.sum() for v in values.values())
        assert total.item() == 0
        for grad in torch.autograd.grad(total, (h_s, w_s)):
            assert torch.isfinite(grad).all() and (grad == 0).all()


def test_sampled_logprob_is_the_log_softmax_at_the_token():
    h_s, w_s, _, _, tokens, mask, _ = _inputs()
    logits = h_s @ w_s.T
    got = tt.token_terms(ModelOutputs(hidden=(h_s,), head=w_s), None, mask, {"lp": tt.sampled_logprob(tokens, 2.0)})["lp"]
    for b in range(B):
        for t in range(T):
            expected = torch.log_softmax(logits[b, t] / 2.0, -1)[tokens[b, t]] if mask[b, t] else torch.tensor(0.0)
            assert got[b, t].item() == pytest.approx(expected.item(), abs=1e-12)


def test_the_single_step_kl_is_at_temperature_one_unless_told():
    h_s, w_s, h_t, w_t, tokens, mask, embeddings = _inputs()
    s, t = h_s.detach() @ w_s.detach().T, h_t @ w_t.T
    got = tt.token_terms(ModelOutputs(logits=s), ModelOutputs(logits=t), mask, {"kl": tt.reverse_kl_to_teacher()})["kl"]
    q, p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    expected = torch.where(mask, (q.exp() * (q - p)).sum(-1), torch.zeros(()))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("frozen", ["head", "hidden"])
def test_the_bounded_head_gives_the_gradient_of_whichever_input_needs_one(frozen):
    """A frozen head (LoRA, or a student whose head is not trained) or hidden states without gradient: the other's
    gradient is still the full-logit one."""
    h_s, w_s, h_t, w_t, tokens, mask, embeddings = _inputs()
    h_s, w_s = (h_s.detach(), w_s) if frozen == "hidden" else (h_s, w_s.detach())
    wanted = {"logprob": tt.sampled_logprob(tokens), "entropy": tt.entropy()}
    weights = torch.randn(B, T, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    trained = w_s if frozen == "hidden" else h_s

    def grad(student):
        values = tt.token_terms(student, None, mask, wanted, chunk_size=2)
        total = (values["logprob"] * weights[..., 0]).sum() + (values["entropy"] * weights[..., 1]).sum()
        return torch.autograd.grad(total, trained)[0]

    torch.testing.assert_close(grad(ModelOutputs(hidden=(h_s,), head=w_s)), grad(ModelOutputs(logits=h_s @ w_s.T)))


def test_a_batch_with_no_valid_position_gives_zeros_in_the_math_precision():
    """bfloat16 hidden states and head with every position masked: the terms are float32 zeros, as they are when some
    position is valid (a caller adding them to float32 losses gets the same dtype either way)."""
    h_s, w_s, _, _, tokens, mask, _ = _inputs()
    h16, w16 = h_s.detach().to(torch.bfloat16).requires_grad_(), w_s.detach().to(torch.bfloat16).requires_grad_()
    wanted = {"logprob": tt.sampled_logprob(tokens), "entropy": tt.entropy()}
    for mask_BT in (mask, torch.zeros_like(mask)):
        values = tt.token_terms(ModelOutputs(hidden=(h16,), head=w16), None, mask_BT, wanted, chunk_size=2)
        assert {name: v.dtype for name, v in values.items()} == {"logprob": torch.float32, "entropy": torch.float32}
    assert all(v.abs().sum() == 0 for v in values.values())


def test_the_bounded_head_returns_gradients_in_the_models_precision():
    """bfloat16 hidden states and head: the math runs in float32, the gradients come back in bfloat16."""
    h_s, w_s, h_t, w_t, tokens, mask, embeddings = _inputs()
    h16, w16 = h_s.detach().to(torch.bfloat16).requires_grad_(), w_s.detach().to(torch.bfloat16).requires_grad_()
    values = tt.token_terms(ModelOutputs(hidden=(h16,), head=w16), None, mask, {"logprob": tt.sampled_logprob(tokens)},
                            chunk_size=2)
    values["logprob"].sum().backward()
    assert h16.grad.dtype == w16.grad.dtype == torch.bfloat16 and w16.grad.abs().sum() > 0
    # and the sampled log-prob is read at temperature 1 unless told
    logits = h_s.detach() @ w_s.detach().T
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got = tt.token_terms(ModelOutputs(logits=logits), None, mask, {"logprob": tt.sampled_logprob(tokens)})["logprob"]
    torch.testing.assert_close(got, torch.where(mask, expected, torch.zeros(())))


def test_each_term_is_read_from_its_own_columns_whatever_their_order():
    """Several terms of different widths share one pass; each comes back as its own formula (against log-softmax
    directly), so a wrong column offset for the third term or later shows."""
    h_s, w_s, h_t, w_t, tokens, mask, embeddings = _inputs()
    logits = (h_s @ w_s.T).detach()
    logq = torch.log_softmax(logits, -1)
    wanted = {"expected": tt.expected_embedding(embeddings), "logprob": tt.sampled_logprob(tokens),
              "entropy": tt.entropy(), "expected_again": tt.expected_embedding(embeddings)}
    got = tt.token_terms(ModelOutputs(logits=logits), None, mask, wanted)
    zero = torch.zeros(())
    torch.testing.assert_close(got["logprob"], torch.where(mask, logq.gather(-1, tokens[..., None])[..., 0], zero))
    torch.testing.assert_close(got["entropy"], torch.where(mask, -(logq.exp() * logq).sum(-1), zero))
    expected = torch.where(mask[..., None], logq.exp() @ embeddings, zero)
    torch.testing.assert_close(got["expected"], expected)
    torch.testing.assert_close(got["expected_again"], expected)
