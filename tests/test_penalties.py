"""Each penalty (loss and reward-shaping forms) against a naive float64 loop, values and gradients."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from onpolicy_kd.objectives.penalties import (
    entropy,
    diversity_penalty, diversity_shaping, entropy_penalty, entropy_shaping, frequency_penalty, frequency_shaping,
)

from conftest import recipe as make_recipe

B, T, V, H = 3, 11, 17, 5


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).requires_grad_()
    tokens = torch.randint(0, 6, (B, T), generator=g)  # few distinct ids: many repeats
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False  # a shorter completion
    mask[2, 1:] = False  # a single token: no pairs for the diversity term
    embeddings = torch.randn(V, H, generator=g)
    return logits, tokens, mask, embeddings


def _grad(value, x):
    return torch.autograd.grad(value, x)[0]


def naive_frequency(logits, tokens, mask):
    values = []
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            q = torch.softmax(logits[b, t].double(), -1)
            counts = Counter(tokens[b, s].item() for s in range(t) if mask[b, s])
            values.append(sum(q[v] * c for v, c in counts.items()) / (t + 1) if counts else q.sum() * 0)
    return torch.stack(values).mean()


def test_frequency_penalty(batch):
    logits, tokens, mask, _ = batch
    loss, value = frequency_penalty(logits, tokens, mask, weight=0.7)
    logits64 = logits.detach().double().requires_grad_()
    ref = naive_frequency(logits64, tokens, mask)
    torch.testing.assert_close(loss.double(), 0.7 * ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(value.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_grad(loss, logits).double(), _grad(0.7 * ref, logits64), rtol=1e-4, atol=1e-7)


def test_frequency_shaping(batch):
    _, tokens, mask, _ = batch
    cost = frequency_shaping(tokens, mask, weight=0.5)
    for b in range(B):
        for t in range(T):
            n_before = sum(1 for s in range(t) if mask[b, s] and tokens[b, s] == tokens[b, t])
            expected = 0.5 * n_before / (t + 1) if mask[b, t] else 0.0
            assert math.isclose(cost[b, t].item(), expected, abs_tol=1e-7)


def naive_diversity(logits, mask, embeddings):
    spreads = []
    for b in range(B):
        points = [torch.softmax(logits[b, t].double(), -1) @ embeddings.double() for t in range(T) if mask[b, t]]
        pairs = [torch.linalg.norm(points[i] - points[j]) for i in range(len(points)) for j in range(len(points)) if i != j]
        if pairs:
            spreads.append(torch.stack(pairs).mean())
    return torch.stack(spreads).mean()


def test_diversity_penalty(batch):
    logits, _, mask, embeddings = batch
    loss, value = diversity_penalty(logits, embeddings, mask, weight=0.3)
    logits64 = logits.detach().double().requires_grad_()
    ref = naive_diversity(logits64, mask, embeddings)
    torch.testing.assert_close(loss.double(), -0.3 * ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(value.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_grad(loss, logits).double(), _grad(-0.3 * ref, logits64), rtol=1e-4, atol=1e-7)


def test_diversity_embeddings_get_no_gradient(batch):
    logits, _, mask, embeddings = batch
    embeddings = embeddings.clone().requires_grad_()
    loss, _ = diversity_penalty(logits, embeddings, mask, weight=1.0)
    loss.backward()
    assert embeddings.grad is None  # only the distribution moves


def test_diversity_shaping(batch):
    _, tokens, mask, embeddings = batch
    cost = diversity_shaping(tokens, embeddings, mask, weight=0.2)
    for b in range(B):
        for t in range(T):
            others = [j for j in range(T) if j != t and mask[b, j]]
            if not mask[b, t] or not others:
                assert cost[b, t].item() == 0.0
                continue
            mean = sum(torch.linalg.norm(embeddings[tokens[b, t]].double() - embeddings[tokens[b, j]].double()) for j in others) / len(others)
            assert math.isclose(cost[b, t].item(), -0.2 * mean.item(), rel_tol=1e-5)


def naive_entropy(logits, mask, floor):
    values = []
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                q = torch.softmax(logits[b, t].double(), -1)
                h = -(q * q.log()).sum()
                values.append(-h if math.isinf(floor) else torch.clamp(floor - h, min=0))
    return torch.stack(values).mean()


@pytest.mark.parametrize("floor", [math.inf, 2.2])
def test_entropy_penalty(batch, floor):
    logits, _, mask, _ = batch
    loss, mean_entropy = entropy_penalty(logits, mask, weight=0.4, floor=floor)
    logits64 = logits.detach().double().requires_grad_()
    ref = naive_entropy(logits64, mask, floor)
    torch.testing.assert_close(loss.double(), 0.4 * ref.detach(), rtol=1e-5, atol=1e-7)
    grad = _grad(loss, logits)
    torch.testing.assert_close(grad.double(), _grad(0.4 * ref, logits64), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(mean_entropy.double(), -naive_entropy(logits64, mask, math.inf).detach(), rtol=1e-5, atol=1e-7)
    if not math.isinf(floor):
        assert 0 < loss.item()  # some positions are below the floor...
        assert (grad.abs().sum(-1) == 0).any()  # ...and the others get no gradient


def test_entropy_shaping(batch):
    logits, _, mask, _ = batch
    cost = entropy_shaping(entropy(logits), mask, weight=0.5, floor=2.2)
    for b in range(B):
        for t in range(T):
            q = torch.softmax(logits[b, t].detach().double(), -1)
            h = -(q * q.log()).sum().item()
            expected = 0.5 * max(0.0, 2.2 - h) if mask[b, t] else 0.0
            assert math.isclose(cost[b, t].item(), expected, abs_tol=1e-6)


def test_penalties_off_are_zero(batch):
    logits, tokens, mask, embeddings = batch
    for loss, _ in (frequency_penalty(logits, tokens, mask, 0.0), diversity_penalty(logits, embeddings, mask, 0.0),
                    entropy_penalty(logits, mask, 0.0)):
        assert loss.item() == 0.0


def test_diversity_global_sequence_count(batch):
    """Micro-batches divided by the global number of sequences add up to the full batch (accumulation-exact)."""
    from onpolicy_kd.objectives.penalties import sequences_with_pairs

    logits, _, mask, embeddings = batch
    full, _ = diversity_penalty(logits, embeddings, mask, weight=0.3)
    n = sequences_with_pairs(mask)
    assert n == 2  # the third sequence has a single valid token
    parts = [diversity_penalty(logits[i:j], embeddings, mask[i:j], 0.3, num_sequences=n)[0] for i, j in ((0, 1), (1, 3))]
    torch.testing.assert_close(sum(parts), full)


def test_float64_inputs_keep_float64_math(batch):
    """Every penalty computes in float64 when given float64 logits: ~1e-12 from the float64 loops."""
    logits, tokens, mask, embeddings = batch
    logits64 = logits.detach().double().requires_grad_()
    loss, _ = frequency_penalty(logits64, tokens, mask, weight=1.0)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, naive_frequency(logits64, tokens, mask), rtol=1e-12, atol=1e-14)
    loss, _ = diversity_penalty(logits64, embeddings.double(), mask, weight=1.0)
    torch.testing.assert_close(loss, -naive_diversity(logits64, mask, embeddings.double()), rtol=1e-10, atol=1e-12)
    loss, _ = entropy_penalty(logits64, mask, weight=1.0, floor=2.2)
    torch.testing.assert_close(loss, naive_entropy(logits64, mask, 2.2), rtol=1e-12, atol=1e-14)


# --- edge cases the tests above leave open (each found by mutation testing: scripts/mutation.py) ------------------


def test_frequency_shaping_counts_only_valid_earlier_tokens():
    """A masked position inside the completion is not a use of its token (the count reads the mask at s < t)."""
    tokens = torch.tensor([[4, 4, 4]])
    cost = frequency_shaping(tokens, torch.tensor([[True, False, True]]), weight=1.0)
    assert cost[0].tolist() == pytest.approx([0.0, 0.0, 1 / 3])  # the masked middle 4 is neither counted nor charged
    logits = torch.randn(1, 3, 6, generator=torch.Generator().manual_seed(1))  # the loss form reads the mask the same way
    mask = torch.tensor([[True, False, True]])
    q = torch.softmax(logits[0, 2].double(), -1)
    torch.testing.assert_close(frequency_penalty(logits, tokens, mask, 1.0)[1].double(), q[4] / 3 / 2)


def test_entropy_shaping_without_a_floor_is_a_bonus(batch):
    """floor = +inf: the cost is -lambda_ent * H_t (a bonus once subtracted from the reward)."""
    logits, _, mask, _ = batch
    h = entropy(logits).detach()
    cost = entropy_shaping(h, mask, weight=0.5)
    torch.testing.assert_close(cost, torch.where(mask, -0.5 * h, torch.zeros_like(h)))
    assert (cost[mask] < 0).all()


def test_the_smallest_groups_divide_by_their_own_size():
    """One sequence with exactly two valid tokens: its spread is the one distance (2 ordered pairs / 2), each token's
    mean distance to the others is that same distance (1 other), and the batch mean is over that one sequence."""
    embeddings = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    tokens = torch.tensor([[0, 1, 2], [2, 2, 2]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    cost = diversity_shaping(tokens, embeddings, mask, weight=1.0)
    assert cost.tolist() == [[-5.0, -5.0, 0.0], [0.0, 0.0, 0.0]]
    logits = torch.full((2, 3, 3), -1e4)
    logits[0, 0, 0] = logits[0, 1, 1] = logits[1, 0, 2] = 0.0  # each distribution on one token: e_t = E_{y_t}
    for num_sequences in (None, 1):
        loss, value = diversity_penalty(logits, embeddings, mask, weight=1.0, num_sequences=num_sequences)
        torch.testing.assert_close(loss, torch.tensor(-5.0))
        torch.testing.assert_close(value, torch.tensor(5.0))


def test_distances_stay_exact_far_from_the_origin():
    """Embeddings with a large common offset: ||a - b|| is computed from the differences, not |a|^2 + |b|^2 - 2ab
    (which loses every digit of a small distance in float32)."""
    g = torch.Generator().manual_seed(0)
    n = 30  # torch.cdist's default takes the matrix-product route above 25 points
    embeddings = 1e4 + 1e-2 * torch.randn(n, 4, generator=g)
    tokens, mask = torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool)
    exact = torch.cdist(embeddings[None].double() - 1e4, embeddings[None].double() - 1e4)[0]
    expected = -(exact.sum(-1) / (n - 1))
    torch.testing.assert_close(diversity_shaping(tokens, embeddings, mask, 1.0)[0].double(), expected, rtol=1e-2, atol=0)
    logits = torch.where(torch.eye(n, dtype=torch.bool), 0.0, -1e4)[None]  # position t puts all its mass on token t
    _, value = diversity_penalty(logits, embeddings, mask, weight=1.0)
    torch.testing.assert_close(value.double(), exact.sum() / (n * (n - 1)), rtol=1e-2, atol=0)


def test_losses_divide_by_the_step_token_count_they_are_given(batch):
    """With num_tokens (the step's count over micro-batches and processes) twice this batch's, each loss halves."""
    logits, tokens, mask, _ = batch
    n = int(mask.sum())
    for penalty in (lambda k: frequency_penalty(logits, tokens, mask, 0.7, num_tokens=k),
                    lambda k: entropy_penalty(logits, mask, 0.4, 2.2, num_tokens=k)):
        torch.testing.assert_close(penalty(2 * n)[0], penalty(None)[0] / 2)
        torch.testing.assert_close(penalty(2 * n)[1], penalty(None)[1] / 2)  # the logged value too (the loop rescales)


def test_penalties_make_their_tensors_on_the_inputs_device(batch):
    """Every helper tensor (positions, masks, identity, counts) is made on the inputs' device: the meta device stands
    in for an accelerator here (a tensor made on the CPU beside it fails)."""
    logits, tokens, mask, embeddings = (x.detach().to("meta") for x in batch)
    outputs = [frequency_shaping(tokens, mask, 0.5), diversity_shaping(tokens, embeddings, mask, 0.2),
               frequency_penalty(logits, tokens, mask, 0.7)[0], entropy_penalty(logits, mask, 0.4)[0],
               diversity_penalty(logits, embeddings, mask, 0.3, num_sequences=2)[0]]
    assert all(x.device.type == "meta" for x in outputs)


def test_expected_embeddings_follow_the_logits_dtype(batch):
    """float64 logits with float32 embeddings (a float64 reference run of a float32 model): float64 math."""
    logits, _, mask, embeddings = batch
    loss, _ = diversity_penalty(logits.detach().double(), embeddings.float(), mask, weight=1.0)
    assert loss.dtype == torch.float64


def test_the_step_adds_each_penalty_with_its_sign_and_the_steps_counts(batch):
    """loss.penalty_loss: frequency + diversity + entropy losses (each from its own function, with the step's token
    and sequence counts), logged as this batch's per-token means."""
    from onpolicy_kd.batch import Completions
    from onpolicy_kd.objectives import token_terms as tt
    from onpolicy_kd.objectives.loss import ModelOutputs, StepContext, penalty_loss, penalty_terms
    from onpolicy_kd.objectives.penalties import diversity_loss, entropy_loss, frequency_loss

    logits, tokens, mask, embeddings = batch
    recipe = make_recipe(penalties={"frequency": 0.7, "diversity": 0.3, "entropy": 0.4, "entropy_floor": 2.2})
    completions = Completions(torch.ones(B, 1, dtype=torch.long), torch.ones(B, 1), tokens, mask, source="student",
                              texts=[""] * B)
    terms = tt.token_terms(ModelOutputs(logits=logits), None, mask, penalty_terms(recipe, completions, embeddings))
    ctx = StepContext(num_tokens=2.0 * int(mask.sum()), num_sequences=3.0)
    metrics = {}
    total = penalty_loss(recipe, completions, ModelOutputs(terms=terms), ctx, metrics)
    parts = [frequency_loss(terms["previous_probability"], mask, 0.7, ctx.num_tokens),
             diversity_loss(terms["expected_embedding"], mask, 0.3, ctx.num_sequences),
             entropy_loss(terms["entropy"], mask, 0.4, 2.2, ctx.num_tokens)]
    torch.testing.assert_close(total, sum(loss for loss, _ in parts))
    assert all(loss.abs() > 1e-3 for loss, _ in parts)  # each term counts
    assert metrics["penalty/frequency"] == pytest.approx(2 * parts[0][1].item())  # per-token mean of this batch
    assert metrics["penalty/entropy"] == pytest.approx(2 * parts[2][1].item())
    assert metrics["penalty/diversity"] == pytest.approx(parts[1][1].item())


def test_any_penalty_is_on_when_any_one_weight_is():
    from types import SimpleNamespace

    from onpolicy_kd.objectives.penalties import any_penalty

    for on in ("frequency", "diversity", "entropy"):
        weights = {"frequency": 0.0, "diversity": 0.0, "entropy": 0.0, on: 0.1}
        assert any_penalty(SimpleNamespace(**weights)), on
    assert not any_penalty(SimpleNamespace(frequency=0.0, diversity=0.0, entropy=0.0))


def test_the_truncation_penalty_divides_by_the_batch_size_unless_told_the_steps():
    from onpolicy_kd.objectives.penalties import truncation_loss

    logprob = torch.tensor([[-1.0, -2.0, -4.0], [-8.0, -16.0, -32.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    cut = torch.tensor([False, True])
    torch.testing.assert_close(truncation_loss(logprob, mask, cut, weight=0.5), torch.tensor(0.5 * -56.0 / 2))
    torch.testing.assert_close(truncation_loss(logprob, mask, cut, weight=0.5, num_completions=8),
                               torch.tensor(0.5 * -56.0 / 8))


def test_the_step_penalises_cut_samples_with_the_recipes_weight_over_the_steps_completions(batch):
    from onpolicy_kd.batch import Completions
    from onpolicy_kd.objectives import token_terms as tt
    from onpolicy_kd.objectives.loss import ModelOutputs, StepContext, penalty_loss, penalty_terms
    from onpolicy_kd.objectives.penalties import truncation_loss

    logits, tokens, mask, _ = batch
    recipe = make_recipe(objective={"mode": "gkd", "lmbda": 1.0},
                         rollout={"truncated": "penalise", "truncation_penalty": 0.5})
    completions = Completions(torch.ones(B, 1, dtype=torch.long), torch.ones(B, 1), tokens, mask, source="student",
                              texts=[""] * B, truncated=torch.tensor([True, False, True]))
    terms = tt.token_terms(ModelOutputs(logits=logits), None, mask, penalty_terms(recipe, completions, None))
    total = penalty_loss(recipe, completions, ModelOutputs(terms=terms), StepContext(num_tokens=1.0, num_completions=6.0),
                         {})
    torch.testing.assert_close(total, truncation_loss(terms["logprob"], mask, completions.truncated, 0.5, 6.0))
    assert total.item() < 0 and not torch.isclose(total, truncation_loss(terms["logprob"], mask, completions.truncated, 0.5))
