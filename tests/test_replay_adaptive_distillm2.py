"""DistiLLM's off-policy reuse (a replay buffer of the student's samples) and adaptive schedule, and DistiLLM-2's
loss: each against what its documentation says, the loss against a float64 hand computation."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from onpolicy_kd.batch import right_pad
from onpolicy_kd.errors import ConfigError
from onpolicy_kd.objectives.loss import ModelOutputs, StepContext, distillm2_loss
from onpolicy_kd.objectives.modes import lambda_coin
from onpolicy_kd.recipe import load_recipe
from onpolicy_kd.rollout.replay import ReplayBuffer, replay_coin
from onpolicy_kd.train import main

from conftest import recipe
from test_train import metrics_of, recipe_for

ON_POLICY = ["objective.mode=gkd", "objective.lmbda=1.0", "train.batch_size=2", "eval.max_samples=2"]


# --- the replay buffer ------------------------------------------------------------------------------------------


def filled(size=6, reuse=1, max_age=None, count=4, step=0) -> ReplayBuffer:
    buffer = ReplayBuffer(size, reuse, max_age)
    buffer.add(list(range(count)), [[10 + i, 2] for i in range(count)], [f"t{i}" for i in range(count)],
               [False] * count, step)
    return buffer


def test_a_stored_sample_is_reused_at_most_reuse_times():
    once = filled(reuse=1)
    first = once.take(2, step=1, seed=0)
    assert len(once) == 2 and not {s.row for s in first} & {s.row for s in once.items}  # used up, gone
    twice = filled(reuse=2)
    uses = {}
    for step in range(1, 5):  # 4 samples x 2 reuses = 8 draws of 2
        for s in twice.take(2, step=step, seed=0):
            uses[s.row] = uses.get(s.row, 0) + 1
    assert uses == {0: 2, 1: 2, 2: 2, 3: 2} and len(twice) == 0
    assert not twice.can_serve(1, step=5)


def test_samples_older_than_max_age_are_dropped_and_the_oldest_go_beyond_size():
    buffer = filled(size=6, max_age=3, count=4, step=0)
    buffer.add([4, 5, 6], [[1], [2], [3]], ["a", "b", "c"], [False, True, False], step=2)
    assert [s.row for s in buffer.items] == [1, 2, 3, 4, 5, 6]  # 7 stored, size 6: row 0 (the oldest) went first
    assert buffer.can_serve(6, step=3)  # age 3 is still usable
    assert not buffer.can_serve(4, step=4) and [s.row for s in buffer.items] == [4, 5, 6]  # ages 4 dropped
    assert {s.row for s in buffer.take(3, step=5, seed=1)} == {4, 5, 6}


def test_every_process_picks_the_same_positions_and_the_buffer_survives_a_checkpoint():
    a, b = filled(count=6), filled(count=6)
    b.items = [type(s)(s.row + 100, s.ids, s.text, s.born, s.truncated) for s in b.items]  # another rank: other prompts
    assert [s.row for s in a.take(3, 1, seed=7)] == [s.row - 100 for s in b.take(3, 1, seed=7)]
    restored = ReplayBuffer(6, 1, None)
    restored.load(a.state())
    assert restored.items == a.items


def test_the_replay_coin_is_a_share_of_the_steps():
    draws = [replay_coin(3, step, 0.3) for step in range(4000)]
    assert abs(sum(draws) / 4000 - 0.3) < 0.025 and draws == [replay_coin(3, s, 0.3) for s in range(4000)]


def count_rollouts(monkeypatch) -> list[str]:
    import onpolicy_kd.training.phases as phases

    calls = []

    def rollout(*args, real=phases.rollout, **kwargs):
        calls.append(kwargs["source"])
        return real(*args, **kwargs)

    monkeypatch.setattr(phases, "rollout", rollout)
    return calls


def test_a_run_reuses_stored_samples_on_replay_share_of_its_steps(tmp_path, far_pair, isolated_cache, monkeypatch):
    import onpolicy_kd.training.phases as phases

    calls = count_rollouts(monkeypatch)
    temperatures = []
    real = phases.stored_batch
    monkeypatch.setattr(phases, "stored_batch", lambda *a, **k: temperatures.append(k["temperature"]) or real(*a, **k))
    path = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(path), *ON_POLICY, "train.max_steps=10", "replay.size=8", "replay.share=0.5",
                 "replay.reuse=2", "rollout.temperature=0.8"]) == 0
    assert temperatures and set(temperatures) == {0.8}  # a reused sample keeps the temperature it was drawn at
    rows = [r for r in metrics_of(tmp_path / "out") if "train/loss" in r]
    reused = [r["replay/reused"] for r in rows]
    # the coin and a buffer with a step's worth (2 samples) decide; the first step has nothing stored yet
    expected = [0.0] + [float(replay_coin(5, step, 0.5)) for step in range(1, 10)]
    assert reused == expected and 0 < sum(reused) < 10
    assert len(calls) == reused.count(0.0)  # a reusing step draws no sample
    assert all(r["replay/age"] >= 1 for r in rows if r["replay/reused"])  # samples of an earlier step
    assert all("replay/age" not in r for r in rows if not r["replay/reused"])
    assert [r["replay/stored"] for r in rows][:2] == [0.0, 2.0]


def test_a_resumed_run_reuses_what_the_interrupted_one_would_have(tmp_path, far_pair, isolated_cache):
    path = recipe_for(tmp_path, far_pair, "gkd")
    args = [str(path), *ON_POLICY, "train.max_steps=8", "train.save_steps=4", "train.deterministic=true",
            "replay.size=8", "replay.share=0.7", "replay.reuse=2"]
    assert main(args) == 0
    out = tmp_path / "out"
    reference = load_file(out / "final" / "model.safetensors")
    whole = [r.get("replay/reused") for r in metrics_of(out) if "train/loss" in r]
    checkpoint = out / "checkpoints" / "checkpoint-0000004"
    assert (checkpoint / "replay-0.json").is_file()  # the buffer is saved with the checkpoint, not rebuilt
    # as if killed after step 6: the later checkpoints and final/ are gone
    shutil.rmtree(out / "final")
    for later in out.glob("checkpoints/checkpoint-*"):
        if int(later.name.split("-")[1]) > 4:
            shutil.rmtree(later)
    (out / "metrics.jsonl").unlink()
    assert main([*args, "train.resume_from=latest"]) == 0
    resumed = load_file(out / "final" / "model.safetensors")
    assert [r.get("replay/reused") for r in metrics_of(out) if "train/loss" in r] == whole[4:]
    assert sum(whole[4:]) > 0  # the resumed steps did reuse samples stored before the interruption
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-5, atol=1e-6)


# --- the adaptive schedule --------------------------------------------------------------------------------------


def test_the_adaptive_schedule_raises_the_share_exactly_when_the_heldout_kl_rises(tmp_path, far_pair, isolated_cache,
                                                                                 monkeypatch):
    import onpolicy_kd.training.loop as loop

    scripted = iter([1.0, 0.9, 1.1, 1.3, 1.2])  # evaluations at steps 0, 2, 4, 6, 8: rises at 4 and 6
    real = loop.logged_metrics
    monkeypatch.setattr(loop, "logged_metrics", lambda summary: real(summary) | {"eval/reverse_kl": next(scripted)})
    path = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(path), *ON_POLICY, "objective.lmbda=0.1", "objective.lmbda_schedule=adaptive",
                 "objective.lmbda_step=0.4", "objective.seq_kd=true", "teacher_text.cache=true", "train.max_steps=8",
                 "eval.eval_steps=2"]) == 0
    records = metrics_of(tmp_path / "out")
    at_eval = [(r["step"], r["data/lmbda"]) for r in records if "eval/reverse_kl" in r]
    assert at_eval == [(0, 0.1), (2, 0.1), (4, pytest.approx(0.5)), (6, pytest.approx(0.9)), (8, pytest.approx(0.9))]
    steps = [r for r in records if "train/loss" in r]
    share = {1: 0.1, 2: 0.1, 3: 0.1, 4: 0.1, 5: 0.5, 6: 0.5, 7: 0.9, 8: 0.9}  # the step logged as N ran at N - 1
    assert [r["data/lmbda"] for r in steps] == [pytest.approx(share[r["step"]]) for r in steps]
    assert [r["data/on_policy"] for r in steps] == [float(lambda_coin(5, r["step"] - 1, share[r["step"]]))
                                                    for r in steps]


def test_adaptive_needs_evaluations_and_room_to_rise(tmp_path, far_pair):
    path = recipe_for(tmp_path, far_pair, "gkd")
    with pytest.raises(ConfigError, match="set eval.eval_steps > 0"):
        load_recipe(path, ["objective.lmbda=0.0", "objective.lmbda_schedule=adaptive"])
    with pytest.raises(ConfigError, match="nothing to raise"):
        load_recipe(path, ["objective.lmbda_schedule=adaptive", "eval.eval_steps=2"])
    with pytest.raises(ConfigError, match="objective.lmbda_step=0.3 has no effect"):
        load_recipe(path, ["objective.lmbda_step=0.3"])
    with pytest.raises(ConfigError, match="replay.size=4 has no effect"):
        load_recipe(path, ["objective.mode=pg", "replay.size=4"])
    with pytest.raises(ConfigError, match="replay.reuse=3 has no effect"):
        load_recipe(path, ["replay.reuse=3"])
    with pytest.raises(ConfigError, match="fewer samples than a step trains on"):
        load_recipe(path, ["replay.size=3", "train.batch_size=2", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match="replay.share=0 never reuses"):
        load_recipe(path, ["replay.size=8", "replay.share=0.0"])
    with pytest.raises(ConfigError, match="greedy rollout"):
        load_recipe(path, ["rollout.truncated=penalise", "rollout.do_sample=false"])
    staged = load_recipe(path, ["train.max_steps=null", "stages=[{name: a, max_steps: 1, objective: {mode: seqkd}}, "
                                "{name: b, max_steps: 1, replay: {size: 8}}]"])
    from onpolicy_kd.recipe.loading import resolve_stages

    assert [stage.replay.size for stage in resolve_stages(staged)] == [0, 8]  # a stage's replay section applies


def test_distillm2_accumulates_both_halves_of_a_step_into_one_optimizer_step(tmp_path, far_pair):
    from onpolicy_kd.models.distributed import make_accelerator

    path = recipe_for(tmp_path, far_pair, "distillm2")
    assert make_accelerator(load_recipe(path, ["train.grad_accum=3"])).gradient_accumulation_steps == 6
    assert make_accelerator(load_recipe(path, ["objective.mode=gkd", "train.grad_accum=3"])).gradient_accumulation_steps == 3


# --- DistiLLM-2 -------------------------------------------------------------------------------------------------


def skew_kl64(p_logits, q_logits, skew):
    """KL(P || skew P + (1 - skew) Q) per position, float64, from the definitions."""
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    mix = skew * p + (1 - skew) * q
    return (p * (p.log() - mix.log())).sum(-1)


def test_distillm2_loss_equals_a_float64_hand_computation():
    torch.manual_seed(0)
    V, skew = 11, 0.2
    r = recipe(objective={"mode": "distillm2", "skew": skew})
    lengths = {"teacher": [3, 5], "student": [4, 1]}
    batches, outputs = [], []
    for source, lens in lengths.items():
        ids, mask = right_pad([[1] * n for n in lens], 0)
        from onpolicy_kd.batch import Completions

        batch = Completions(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool), ids, mask,
                            source=source, texts=["", ""])
        s, t = torch.randn(2, ids.shape[1], V, requires_grad=True), torch.randn(2, ids.shape[1], V)
        batches.append(batch)
        outputs.append((s, t))
    total = sum(sum(lens) for lens in lengths.values())
    ctx = StepContext(num_tokens=total, head="torch")
    metrics = [{}, {}]
    got = sum(distillm2_loss(b, ModelOutputs(logits=s), ModelOutputs(logits=t), r, ctx, m)
              for b, (s, t), m in zip(batches, outputs, metrics))
    (teacher_batch, (s1, t1)), (student_batch, (s2, t2)) = zip(batches, outputs)
    forward = skew_kl64(t1, s1, skew)[teacher_batch.completion_mask].sum()  # KL(p || skew p + (1 - skew) q)
    reverse = skew_kl64(s2, t2, skew)[student_batch.completion_mask].sum()  # KL(q || skew q + (1 - skew) p)
    want = (forward + reverse) / total
    forward = forward.detach()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-8)
    got.backward()
    grads = [s1.grad.clone(), s2.grad.clone()]
    s1.grad, s2.grad = None, None
    want.backward()  # float64 graph through the same float32 leaves
    for g, s in zip(grads, (s1, s2)):
        torch.testing.assert_close(g, s.grad.float(), rtol=1e-4, atol=1e-7)
    assert set(metrics[0]) == {"train/skew_forward_kl"} and set(metrics[1]) == {"train/skew_reverse_kl"}
    assert metrics[0]["train/skew_forward_kl"] == pytest.approx(forward.item() / 8, rel=1e-5)


@pytest.mark.parametrize("cache", [True, False])
def test_a_distillm2_step_trains_on_the_teachers_text_and_the_students_samples_of_the_same_prompts(
        cache, tmp_path, far_pair, isolated_cache, monkeypatch):
    calls = count_rollouts(monkeypatch)
    import onpolicy_kd.training.phases as phases

    seen = []
    real = phases.completions_of
    monkeypatch.setattr(phases, "completions_of",
                        lambda run, source, rows, timer: seen.append((source, rows)) or real(run, source, rows, timer))
    path = recipe_for(tmp_path, far_pair, "distillm2")
    assert main([str(path), f"teacher_text.cache={str(cache).lower()}", "train.max_steps=3", "eval.max_samples=2"]) == 0
    assert [source for source, _ in seen] == ["student", "teacher"] * 3
    assert all(seen[i][1] == seen[i + 1][1] for i in range(0, 6, 2))  # the same prompts
    assert calls.count("student") == 3 and calls.count("teacher") == (0 if cache else 3)
    rows = [r for r in metrics_of(tmp_path / "out") if "train/loss" in r]
    assert all(r["train/skew_forward_kl"] > 0 and r["train/skew_reverse_kl"] > 0 for r in rows)


# --- completions cut at max_new_tokens --------------------------------------------------------------------------


def test_the_truncation_loss_equals_a_float64_hand_computation():
    from onpolicy_kd.objectives.penalties import truncation_loss

    torch.manual_seed(1)
    logprob = (-torch.rand(3, 4, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    cut = torch.tensor([True, False, True])
    got = truncation_loss(logprob, mask, cut, 0.7, num_completions=5)
    want = 0.7 * (logprob[0].sum() + logprob[2].sum()) / 5
    torch.testing.assert_close(got, want)
    got.backward()
    expected = torch.zeros(3, 4, dtype=torch.float64)
    expected[0], expected[2] = 0.7 / 5, 0.7 / 5
    torch.testing.assert_close(logprob.grad, expected)


def test_the_truncation_penalty_gradient_is_the_gradient_of_the_cost_of_being_cut():
    """Enumerate every sequence of a two-step policy over {a, b, EOS}: the expectation under the policy of the
    penalty's gradient equals the gradient of c x P(cut) (the score-function identity), exactly."""
    import itertools

    from onpolicy_kd.objectives.penalties import truncation_loss

    torch.manual_seed(2)
    theta = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)  # position t's logits (EOS = token 2)
    c, eos = 1.3, 2
    logq = theta.log_softmax(-1)
    p_cut = logq[0, :eos].exp().sum() * logq[1, :eos].exp().sum()  # no EOS at either step
    (exact,) = torch.autograd.grad(c * p_cut, theta)
    expected = torch.zeros_like(theta)
    for y in itertools.product(range(3), repeat=2):
        length = 1 if y[0] == eos else 2
        mask = torch.tensor([[True, length == 2]])
        logq = theta.log_softmax(-1)
        lp = torch.stack([logq[0, y[0]], logq[1, y[1]]]).unsqueeze(0)
        weight = float(lp[0, :length].sum().exp().detach())  # q(y): the sequence's probability (stops at EOS)
        if length == 1 and y[1] != 0:
            continue  # after EOS nothing is sampled: count each one-token sequence once
        loss = truncation_loss(lp, mask, torch.tensor([eos not in y[:length]]), c, num_completions=1)
        (grad,) = torch.autograd.grad(loss, theta, allow_unused=True)
        expected += weight * (grad if grad is not None else torch.zeros_like(theta))
    torch.testing.assert_close(expected, exact)


@pytest.mark.parametrize("handling", ["keep", "mask", "penalise"])
def test_cut_samples_are_kept_masked_or_penalised_as_the_key_says(handling, tmp_path, far_pair, isolated_cache):
    path = recipe_for(tmp_path, far_pair, "gkd")
    args = [*ON_POLICY, "train.max_steps=2", "rollout.max_new_tokens=3"]  # the random student seldom ends in 3
    assert main([str(path), *args, f"rollout.truncated={handling}"]) == 0
    rows = [r for r in metrics_of(tmp_path / "out") if "train/loss" in r]
    assert all(0 < r["rollout/truncated"] <= 1 for r in rows)
    if handling == "mask":  # a step of cut samples only has nothing left to train on
        assert all(r["train/loss"] == 0 for r in rows if r["rollout/truncated"] == 1)
        return
    shutil.rmtree(tmp_path / "out")
    other = "keep" if handling == "penalise" else "penalise"
    assert main([str(path), *args, f"rollout.truncated={other}"]) == 0
    others = [r for r in metrics_of(tmp_path / "out") if "train/loss" in r]
    penalised, kept = (rows, others) if handling == "penalise" else (others, rows)
    # the same samples (same seed, first step): the penalty adds c x the cut samples' mean log-probability (< 0)
    assert penalised[0]["rollout/truncated"] == kept[0]["rollout/truncated"]
    assert penalised[0]["train/loss"] < kept[0]["train/loss"]
