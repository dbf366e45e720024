"""The policy-gradient estimator against the exact gradient, computed by enumerating every sequence.

Tabular student and teacher over sequences of length 3 and 4 tokens (64 sequences). The exact
gradient of KL(q(y) || p(y)) comes from autograd through the enumerated sum; the estimator is the
gradient of `policy_gradient_loss` on Monte Carlo samples (per-sequence sums: num_tokens = number of
samples), with discount 1 and no length normalisation, the settings under which it is unbiased.

Tolerance: relative L2 error below 3% with 200,000 samples (seen: 0.7-1.1% over two tables).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from onpolicy_kd.objectives.divergences import per_token_divergence
from onpolicy_kd.objectives.pg import discounted_returns, pg_returns, policy_gradient_loss

from conftest import recipe as make_recipe, record_token_terms_chunk_sizes
from tabular import Tabular

N_SAMPLES = 200_000
TOLERANCE = 0.03


def estimator_gradient(model: Tabular, seqs, rows, old, teacher, mix, *, alpha, single_step, importance, num_tokens):
    logits = model.student[rows]
    logprobs = torch.log_softmax(logits, -1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
    kl = per_token_divergence(logits, model.teacher[rows], kind="reverse_kl").double() if single_step else None
    out = policy_gradient_loss(
        logprobs, old, teacher, torch.ones_like(seqs, dtype=torch.bool),
        sample_logprobs_BT=mix if alpha else None, single_step_kl_BT=kl, discount=1.0, length_norm=False,
        importance=importance, num_tokens=num_tokens,
    )
    return torch.autograd.grad(out.loss, model.student)[0]


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("single_step", [True, False], ids=["single_step", "no_single_step"])
@pytest.mark.parametrize("alpha, importance", [(0.0, "token"), (0.3, "sequence")])
def test_monte_carlo_gradient_matches_enumeration(alpha, importance, single_step):
    model = Tabular(seed=0)
    exact = torch.autograd.grad(model.exact_reverse_kl(), model.student)[0]
    samples = model.sample(N_SAMPLES, alpha, torch.Generator().manual_seed(123))
    estimate = estimator_gradient(model, *samples, alpha=alpha, single_step=single_step, importance=importance,
                                  num_tokens=N_SAMPLES)
    assert relative_error(estimate, exact) < TOLERANCE


def test_token_weights_estimate_their_own_expectation_and_are_biased():
    """MiniLLM's per-token weights: the Monte Carlo average equals the estimator's exact expectation under
    the mixture (enumerated), and that expectation is not the true gradient when alpha > 0 (documented bias)."""
    model, alpha = Tabular(seed=1), 0.3
    exact = torch.autograd.grad(model.exact_reverse_kl(), model.student)[0]
    # Exact expectation of the estimator: every sequence once, weighted by its probability under the mixture.
    all_seqs = torch.tensor(list(itertools.product(range(model.V), repeat=model.T)))
    rows = torch.stack([model.context_index(all_seqs[:, :t]) for t in range(model.T)], 1)
    with torch.no_grad():
        q = torch.softmax(model.student[rows], -1)
        p = torch.softmax(model.teacher[rows], -1)
    take = lambda probs: probs.gather(-1, all_seqs.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    q_y, p_y = take(q), take(p)
    mix_y = alpha * p_y + (1 - alpha) * q_y
    expected = torch.zeros_like(exact)
    for i in range(len(all_seqs)):
        g = estimator_gradient(model, all_seqs[i : i + 1], rows[i : i + 1], q_y[i : i + 1].log(), p_y[i : i + 1].log(),
                               mix_y[i : i + 1].log(), alpha=alpha, single_step=True, importance="token", num_tokens=1)
        expected += mix_y[i].prod() * g
    samples = model.sample(N_SAMPLES, alpha, torch.Generator().manual_seed(7))
    estimate = estimator_gradient(model, *samples, alpha=alpha, single_step=True, importance="token", num_tokens=N_SAMPLES)
    assert relative_error(estimate, expected) < TOLERANCE
    assert relative_error(expected, exact) > 0.2  # the per-token approximation's bias at alpha = 0.3


def test_is_clip_caps_weights():
    """Each weight is min(w, is_clip): the uncapped ones above the cap come down to it, the others stay as they were
    (the mean weight alone would not show a missing cap: its expectation is 1 either way)."""
    model = Tabular(seed=2)
    seqs, rows, old, teacher, mix = model.sample(1000, 0.5, torch.Generator().manual_seed(1))
    mask = torch.ones_like(seqs, dtype=torch.bool)
    cap = 1.05
    for importance, weight in (("token", "advantage_weight"), ("sequence", "single_step_weight")):
        free = getattr(pg_returns(old, teacher, mask, sample_logprobs_BT=mix, importance=importance), weight)
        capped = getattr(pg_returns(old, teacher, mask, sample_logprobs_BT=mix, importance=importance, is_clip=cap),
                         weight)
        assert (free > cap).float().mean() > 0.05  # the cap has something to do
        assert capped.dtype == torch.float64  # and it is applied in the weights' precision, to the last digits
        torch.testing.assert_close(capped, free.clamp(max=cap), rtol=1e-13, atol=0)
    # and the loss reads the capped weights: its metric is their mean
    logprobs = torch.log_softmax(model.student[rows], -1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
    out = policy_gradient_loss(logprobs, old, teacher, mask, sample_logprobs_BT=mix, importance="token", is_clip=cap)
    expected = pg_returns(old, teacher, mask, sample_logprobs_BT=mix, is_clip=cap).advantage_weight.mean()
    assert math.isclose(out.metrics["pg/is_weight"], float(expected), rel_tol=1e-6)


def test_returns_discount_and_length_norm():
    rewards = torch.tensor([[1.0, 2.0, 4.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last position is padding: its reward must not count
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.5), torch.tensor([[1 + 1 + 1.0, 2 + 2.0, 4.0, 0.0]]))
    # Without the single-step term A_t = R_t / (terms from t): (7/3, 6/2, 4/1); at ratio 1 the loss is -mean(A).
    zeros = torch.zeros(1, 4)
    teacher = torch.tensor([[1.0, 2.0, 4.0, 100.0]])
    out = policy_gradient_loss(zeros.clone().requires_grad_(), zeros, teacher, mask, discount=1.0, length_norm=True)
    torch.testing.assert_close(out.loss, -torch.tensor((7 / 3 + 3 + 4) / 3))
    # With the single-step term A_t = R_{t+1} / (terms after t): (6/2, 4/1, 0).
    kl = torch.zeros(1, 4, requires_grad=True)
    out = policy_gradient_loss(zeros.clone().requires_grad_(), zeros, teacher, mask, single_step_kl_BT=kl, length_norm=True)
    torch.testing.assert_close(out.loss, -torch.tensor((3 + 4 + 0) / 3))


def test_ppo_clipping_and_lm_term():
    old = torch.zeros(1, 3)
    teacher = torch.ones(1, 3)  # positive rewards: advantage > 0
    mask = torch.ones(1, 3, dtype=torch.bool)
    far = torch.full((1, 3), 0.5, requires_grad=True)  # ratio e^0.5 > 1.2: clipped, no gradient
    out = policy_gradient_loss(far, old, teacher, mask, ppo_clip=0.2, length_norm=False)
    assert out.metrics["pg/clip_frac"] == 1.0
    assert torch.autograd.grad(out.loss, far)[0].abs().max() == 0
    near = torch.zeros(1, 3, requires_grad=True)
    lm = torch.tensor(2.0, requires_grad=True)
    out = policy_gradient_loss(near, old, teacher, mask, lm_loss=lm, lm_coef=0.5, length_norm=False)
    grads = torch.autograd.grad(out.loss, (near, lm))
    assert grads[0].abs().min() > 0 and grads[1].item() == 0.5
    assert out.metrics["pg/lm_loss"] == 2.0


def test_all_masked_pg_is_zero():
    x = torch.randn(2, 5, requires_grad=True)
    out = policy_gradient_loss(x, x.detach(), torch.randn(2, 5), torch.zeros(2, 5, dtype=torch.bool),
                               single_step_kl_BT=torch.randn(2, 5, requires_grad=True))
    assert out.loss.item() == 0.0
    assert torch.isfinite(torch.autograd.grad(out.loss, x)[0]).all()


# --- where the rewards' teacher log-probs and costs come from (found by mutation testing: scripts/mutation.py) ----


def _sampled_batch(temperature=2.0):
    from onpolicy_kd.batch import Completions, completion_mask

    g = torch.Generator().manual_seed(5)
    ids = torch.tensor([[1, 1, 2, 1], [3, 3, 5, 6]])  # repeats: the frequency cost has something to count
    return Completions(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1), ids, completion_mask(torch.tensor([4, 2]), 4),
                       source="student", texts=["", ""], temperature=temperature,
                       student_logprobs=-torch.rand(2, 4, generator=g), student_entropy=torch.rand(2, 4, generator=g))


def _mixed_batch():
    """A teacher-mixed batch (alpha 0.3, sample log-probs apart from the student's), the teacher's logits over it and
    its log-probs of the sampled tokens."""
    batch = _sampled_batch(temperature=1.0)
    batch.alpha, batch.sample_logprobs = 0.3, batch.student_logprobs - torch.linspace(0.5, -0.5, 4)
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(8))
    return batch, logits, torch.log_softmax(logits, -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)


def test_teacher_token_logprobs_at_the_sampling_temperature_from_every_source():
    """From the teacher's logits, from its last hidden state and head (made once per rollout and kept), or from the
    lockstep decode's record; without any of them, an error that says so."""
    from onpolicy_kd.objectives.loss import ModelOutputs, teacher_token_logprobs

    batch = _sampled_batch(temperature=2.0)
    g = torch.Generator().manual_seed(6)
    hidden, head = torch.randn(2, 4, 3, generator=g), torch.randn(7, 3, generator=g)
    logits = hidden @ head.T
    expected = torch.log_softmax(logits / 2.0, -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(teacher_token_logprobs(batch, ModelOutputs(logits=logits)), expected)
    bounded = ModelOutputs(hidden=(hidden,), head=head)
    got = teacher_token_logprobs(batch, bounded, chunk_size=3)
    torch.testing.assert_close(got[batch.completion_mask], expected[batch.completion_mask])
    bounded.terms["logprob"] = sentinel = torch.full((2, 4), 7.0)  # kept: a second call reads it back
    assert teacher_token_logprobs(batch, bounded) is sentinel
    batch.teacher_logprobs = recorded = torch.full((2, 4), -1.0)
    assert teacher_token_logprobs(batch, None) is recorded
    batch.teacher_logprobs = None
    with pytest.raises(ValueError, match="^the PG rewards need the teacher's log-probs: run the teacher or sample with alpha > 0$"):
        teacher_token_logprobs(batch, None)


def test_reward_shaping_adds_each_penalty_cost_only_when_asked():
    from onpolicy_kd.objectives import penalties as pen
    from onpolicy_kd.objectives.loss import reward_shaping

    def recipe(**penalties):
        return make_recipe(objective={"mode": "pg"}, penalties=penalties)

    batch = _sampled_batch()
    embeddings = torch.randn(7, 3, generator=torch.Generator().manual_seed(7))
    mask = batch.completion_mask
    assert reward_shaping(recipe(frequency=0.5), batch, embeddings) is None  # shape_reward off: the loss form
    cost = reward_shaping(recipe(frequency=0.5, diversity=0.2, entropy=0.3, entropy_floor=0.4, shape_reward=True), batch,
                          embeddings)
    expected = (pen.frequency_shaping(batch.completion_ids, mask, 0.5)
                + pen.diversity_shaping(batch.completion_ids, embeddings, mask, 0.2)
                + pen.entropy_shaping(batch.student_entropy, mask, 0.3, 0.4))
    torch.testing.assert_close(cost, expected)
    assert (pen.frequency_shaping(batch.completion_ids, mask, 0.5) > 0).any()  # each term has something to add


@pytest.mark.parametrize("setting", [{}, {"discount": 0.5}, {"length_norm": False}, {"single_step": False},
                                     {"importance": "sequence"}, {"is_clip": 1.01}])
def test_batch_returns_pass_every_pg_setting_of_the_recipe(setting):
    """batch_returns = pg_returns with the recipe's settings, the rollout's importance weights (alpha > 0) and the
    reward shaping; each setting changes the returns (so none can be dropped on the way)."""
    from dataclasses import astuple

    from onpolicy_kd.objectives.loss import ModelOutputs, batch_returns, reward_shaping

    recipe = make_recipe(objective={"mode": "pg", **setting}, rollout={"alpha": 0.3},
                         penalties={"frequency": 0.5, "shape_reward": True})
    batch, logits, teacher_lp = _mixed_batch()
    got = batch_returns(batch, ModelOutputs(logits=logits), recipe, None)
    obj = recipe.objective
    args = (batch.student_logprobs, teacher_lp, batch.completion_mask)
    expected = pg_returns(*args, sample_logprobs_BT=batch.sample_logprobs,
                          reward_shaping_BT=reward_shaping(recipe, batch, None), single_step=obj.single_step,
                          discount=obj.discount, length_norm=obj.length_norm, importance=obj.importance,
                          is_clip=obj.is_clip)
    for a, b in zip(astuple(got), astuple(expected)):
        torch.testing.assert_close(a, b)
    if setting:  # the setting matters: the defaults give other returns
        default = pg_returns(*args, sample_logprobs_BT=batch.sample_logprobs,
                             reward_shaping_BT=reward_shaping(recipe, batch, None))
        assert any(not torch.allclose(a, b) for a, b in zip(astuple(got), astuple(default)))
    else:  # and the pieces matter: without the importance weights or the shaping, other returns
        assert not torch.allclose(got.advantage_weight, pg_returns(*args).advantage_weight)
        plain = pg_returns(*args, sample_logprobs_BT=batch.sample_logprobs)
        assert not torch.allclose(got.rewards, plain.rewards)
        batch.alpha = 0.0  # sampled from the student alone: no importance weights
        torch.testing.assert_close(batch_returns(batch, ModelOutputs(logits=logits), recipe, None).advantage_weight,
                                   torch.ones(2, 4))


@pytest.mark.parametrize("setting", [{}, {"discount": 0.5}, {"length_norm": False}, {"single_step": False},
                                     {"importance": "sequence"}, {"is_clip": 1.01}, {"ppo_clip": 0.01},
                                     {"pg_baseline": "none"}])
def test_the_pg_step_loss_passes_every_setting_and_the_steps_normalisers(setting):
    """policy_gradient_step_loss = policy_gradient_loss with the recipe's settings, the rollout's importance weights,
    the reward shaping, the single-step KL term, the step's baseline and token count; values and gradients, and
    each setting changes one of them. Its logged loss terms are this batch's per-token means."""
    from onpolicy_kd.objectives.loss import ModelOutputs, StepContext, policy_gradient_step_loss, reward_shaping
    from onpolicy_kd.objectives.pg import policy_gradient_loss

    baseline = setting.pop("pg_baseline", "mean")
    recipe = make_recipe(objective={"mode": "pg", "pg_baseline": baseline, **setting}, rollout={"alpha": 0.3},
                         penalties={"frequency": 0.5, "shape_reward": True})
    batch, logits, teacher_lp = _mixed_batch()
    mask = batch.completion_mask
    ctx = StepContext(num_tokens=12.0, pg_baseline=-0.4 if baseline == "mean" else 0.0)

    def run(fn):
        logprob = (batch.student_logprobs + torch.linspace(-0.3, 0.3, 4)).requires_grad_()  # ratios away from 1
        kl = torch.rand(2, 4, generator=torch.Generator().manual_seed(9)).requires_grad_()
        loss, metrics = fn(logprob, kl)
        return loss, torch.autograd.grad(loss, (logprob, kl), allow_unused=True), metrics

    def ours(logprob, kl):
        metrics = {}
        student = ModelOutputs(terms={"logprob": logprob, "single_step_kl": kl} if recipe.objective.single_step
                               else {"logprob": logprob})
        return policy_gradient_step_loss(batch, student, ModelOutputs(logits=logits), recipe, ctx, metrics), metrics

    def explicit(obj=recipe.objective, defaults=False):
        def fn(logprob, kl):
            settings = {} if defaults else dict(discount=obj.discount, length_norm=obj.length_norm,
                                                importance=obj.importance, is_clip=obj.is_clip, ppo_clip=obj.ppo_clip)
            out = policy_gradient_loss(
                logprob, batch.student_logprobs, teacher_lp, mask, sample_logprobs_BT=batch.sample_logprobs,
                single_step_kl_BT=kl if obj.single_step or defaults else None,
                reward_shaping_BT=reward_shaping(recipe, batch, None), baseline=0.0 if defaults else ctx.pg_baseline,
                num_tokens=ctx.num_tokens, **settings)
            return out.loss, out.metrics
        return fn

    loss, grads, metrics = run(ours)
    want_loss, want_grads, want_metrics = run(explicit())
    torch.testing.assert_close(loss, want_loss)
    for a, b in zip(grads, want_grads):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b))
    scale = 12.0 / int(mask.sum())  # the step's count over this batch's
    assert metrics["pg/loss"] == pytest.approx(want_metrics["pg/loss"] * scale)
    assert metrics["pg/single_step_kl"] == pytest.approx(want_metrics["pg/single_step_kl"] * scale)
    if setting or baseline == "mean":  # against the defaults (and no baseline): each setting changes something
        other_loss, other_grads, _ = run(explicit(defaults=True))
        differs = not torch.allclose(loss, other_loss) or any(
            (a is None) != (b is None) or (a is not None and not torch.allclose(a, b)) for a, b in zip(grads, other_grads))
        assert differs, setting


def test_the_pg_terms_are_read_at_the_sampling_temperature():
    from onpolicy_kd.objectives import token_terms as tt
    from onpolicy_kd.objectives.loss import ModelOutputs, policy_gradient_terms

    recipe = make_recipe(objective={"mode": "pg"})
    batch = _sampled_batch(temperature=2.0)
    g = torch.Generator().manual_seed(10)
    s, t = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    got = tt.token_terms(ModelOutputs(logits=s), ModelOutputs(logits=t), batch.completion_mask,
                         policy_gradient_terms(recipe, batch))
    q, p = torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1)
    mask = batch.completion_mask
    expected_lp = q.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got["logprob"], torch.where(mask, expected_lp, torch.zeros(())))
    torch.testing.assert_close(got["single_step_kl"], torch.where(mask, (q.exp() * (q - p)).sum(-1), torch.zeros(())))


def naive_pg_loss(lp, old, teacher, mask, *, sample=None, kl=None, shaping=None, discount=1.0, length_norm=True,
                  importance="token", is_clip=None, ppo_clip=0.2, lm_loss=None, lm_coef=0.0, baseline="none",
                  num_tokens=None):
    """policy_gradient_loss from its docstring, one position at a time in float64 (the returns from pg_returns,
    whose own formulas the tests above check)."""
    r = pg_returns(old, teacher, mask, sample_logprobs_BT=sample, reward_shaping_BT=shaping, single_step=kl is not None,
                   discount=discount, length_norm=length_norm, importance=importance, is_clip=is_clip)
    cells = [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    n = num_tokens if num_tokens is not None else len(cells)
    b_value = {"none": 0.0, "mean": sum(r.future[c].item() for c in cells) / max(len(cells), 1)}.get(baseline, baseline)
    pg = single = 0.0
    reward = ret = ratio_sum = clipped = weight = 0.0
    for c in cells:
        advantage = r.advantage_weight[c].item() * (r.future[c].item() - b_value)
        ratio = torch.exp(lp[c] - old[c])
        pg = pg - torch.minimum(ratio * advantage, ratio.clamp(1 - ppo_clip, 1 + ppo_clip) * advantage)
        if kl is not None:
            single = single + r.single_step_weight[c].item() * kl[c]
        reward, ret, ratio_sum = reward + r.rewards[c].item(), ret + r.future[c].item() - b_value, ratio_sum + ratio.item()
        clipped += abs(ratio.item() - 1) > ppo_clip
        weight += (r.advantage_weight[c] * r.single_step_weight[c]).item()
    loss = pg / n + single / n + (lm_coef * lm_loss if lm_loss is not None and lm_coef else 0.0)
    k = max(len(cells), 1)
    metrics = {"pg/loss": float(pg / n), "pg/single_step_kl": float(single / n), "pg/reward": reward / k,
               "pg/return": ret / k, "pg/ratio": ratio_sum / k, "pg/clip_frac": clipped / k, "pg/is_weight": weight / k}
    return loss, metrics


PG_CASES = [
    {},
    {"baseline": "mean", "discount": 0.7, "ppo_clip": 0.05},
    {"baseline": 0.3, "importance": "sequence", "is_clip": 1.5, "length_norm": False},
    {"baseline": "mean", "num_tokens": 20, "lm_coef": 0.5},
    {"ppo_clip": 0.0},  # ratios of exactly 1 are not clipped
]


@pytest.mark.parametrize("case", PG_CASES)
def test_policy_gradient_loss_against_its_formula(case):
    g = torch.Generator().manual_seed(11)
    B, T = 3, 5
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    teacher = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    sample = old - 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    shaping = torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    shift = 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    shift[0, :2] = 0.0  # ratios of exactly 1 beside ones past the clip
    lp = (old + shift).requires_grad_()
    kl = torch.rand(B, T, generator=g, dtype=torch.float64).requires_grad_()
    lm = torch.tensor(2.5, dtype=torch.float64)
    kwargs = dict(sample_logprobs_BT=sample, single_step_kl_BT=kl, reward_shaping_BT=shaping,
                  lm_loss=lm if "lm_coef" in case else None, **case)
    ours = policy_gradient_loss(lp, old, teacher, mask, **kwargs)
    expected, metrics = naive_pg_loss(lp, old, teacher, mask, sample=sample, kl=kl, shaping=shaping,
                                      lm_loss=kwargs["lm_loss"], **case)
    torch.testing.assert_close(ours.loss, expected)
    for got, want in zip(torch.autograd.grad(ours.loss, (lp, kl)), torch.autograd.grad(expected, (lp, kl))):
        torch.testing.assert_close(got, want)
    assert ours.metrics == pytest.approx({**metrics, **({"pg/lm_loss": 2.5} if "lm_coef" in case else {})})


def test_policy_gradient_loss_edges():
    """One valid token with the mean baseline (its advantage is 0); an lm coefficient without an lm loss adds
    nothing; a misspelt baseline is refused."""
    old = torch.tensor([[-1.0, -2.0]])
    mask = torch.tensor([[True, False]])
    out = policy_gradient_loss(old.clone().requires_grad_(), old, torch.tensor([[-3.0, -1.0]]), mask, baseline="mean",
                               lm_coef=0.5)
    assert out.loss.item() == 0.0 and out.metrics["pg/return"] == 0.0
    # the per-token metrics are means over that one token (the same policy: ratio 1, no importance weight)
    assert out.metrics["pg/ratio"] == 1.0 and out.metrics["pg/is_weight"] == 1.0
    without_coef = policy_gradient_loss(old, old, torch.tensor([[-3.0, -1.0]]), mask, lm_loss=torch.tensor(5.0))
    assert without_coef.loss.item() == policy_gradient_loss(old, old, torch.tensor([[-3.0, -1.0]]), mask).loss.item()
    with pytest.raises(ValueError, match="^baseline='avg': use 'none', 'mean' or a number$"):
        policy_gradient_loss(old, old, old, mask, baseline="avg")


def test_pg_returns_subtract_the_shaping_cost_and_check_their_arguments():
    old, teacher = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -0.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    shaped = pg_returns(old, teacher, mask, reward_shaping_BT=torch.tensor([[0.25, 1.0]]))
    torch.testing.assert_close(shaped.rewards, torch.tensor([[-0.5 - 0.25, 1.5 - 1.0]]))
    with pytest.raises(ValueError, match="^importance='tokens': use 'token' or 'sequence'$"):
        pg_returns(old, teacher, mask, importance="tokens")
    # a single position: its return is its reward
    one = pg_returns(old[:, :1], teacher[:, :1], mask[:, :1], single_step=False, length_norm=False)
    torch.testing.assert_close(one.future, torch.tensor([[-0.5]]))


@pytest.mark.parametrize("caller", ["teacher_token_logprobs", "batch_returns", "policy_gradient_step_loss"])
def test_the_teachers_bounded_head_pass_takes_the_recipes_chunk_size(caller, monkeypatch):
    """Each way into the teacher's head chunk by chunk (the rewards, the baseline's returns, the loss with no
    baseline) passes objective.chunk_size on: the values are the same at any size, so a dropped setting (the
    default 1024 instead) shows only in what reaches token_terms (found by mutation testing)."""
    from onpolicy_kd.objectives import loss as L

    seen = record_token_terms_chunk_sizes(monkeypatch)
    recipe = make_recipe(objective={"mode": "pg", "single_step": False, "chunk_size": 3, "pg_baseline": "none"})
    batch = _sampled_batch(temperature=1.0)
    g = torch.Generator().manual_seed(14)
    teacher = L.ModelOutputs(hidden=(torch.randn(2, 4, 3, generator=g),), head=torch.randn(7, 3, generator=g))
    if caller == "teacher_token_logprobs":
        L.teacher_token_logprobs(batch, teacher, 3)
    elif caller == "batch_returns":
        L.batch_returns(batch, teacher, recipe, None)
    else:
        student = L.ModelOutputs(terms={"logprob": batch.student_logprobs.clone().requires_grad_()})
        L.policy_gradient_step_loss(batch, student, teacher, recipe, L.StepContext(num_tokens=6.0), {})
    assert seen == [3]


def test_the_pg_step_loss_reads_a_bounded_teacher_and_weights_only_mixed_samples():
    """The teacher's log-probs from its hidden states and head (chunk by chunk, objective.chunk_size) give the loss
    its logits give; a batch sampled from the student alone (alpha 0) gets no importance weights even when its
    sampling distribution was filtered (top-p): its recorded sample log-probs are not read."""
    from onpolicy_kd.objectives.loss import ModelOutputs, StepContext, policy_gradient_step_loss

    recipe = make_recipe(objective={"mode": "pg", "single_step": False, "chunk_size": 3})
    batch = _sampled_batch(temperature=1.0)
    g = torch.Generator().manual_seed(12)
    hidden, head = torch.randn(2, 4, 3, generator=g), torch.randn(7, 3, generator=g)

    def loss(teacher):
        logprob = (batch.student_logprobs + 0.1).requires_grad_()
        return policy_gradient_step_loss(batch, ModelOutputs(terms={"logprob": logprob}), teacher, recipe,
                                         StepContext(num_tokens=6.0), {})

    by_logits = loss(ModelOutputs(logits=hidden @ head.T))
    torch.testing.assert_close(loss(ModelOutputs(hidden=(hidden,), head=head)), by_logits)
    batch.sample_logprobs = batch.student_logprobs - 1.0  # as if filtered: the weights would be e^1
    torch.testing.assert_close(loss(ModelOutputs(logits=hidden @ head.T)), by_logits)
