"""The console and metrics.jsonl say what a step does: the first lines describe a step in the recipe's terms, and
each step metric appears only where it means something (nothing decoded: no rollout length or rollout time; no
teacher forward: no teacher time; a mode that never samples the student: no on-policy share)."""

from __future__ import annotations

import pytest

from onpolicy_kd.objectives.modes import forward_plan
from onpolicy_kd.training.describe import describe_step
from onpolicy_kd.recipe import load_recipe
from onpolicy_kd.train import main

from test_teacher_text import MIXED
from test_train import metrics_of, recipe_for


def described(tmp_path, far_pair, mode: str, *overrides: str) -> str:
    return describe_step(load_recipe(recipe_for(tmp_path, far_pair, mode), list(overrides)))


def test_the_description_names_the_completions_the_loss_and_the_added_terms(tmp_path, far_pair):
    kd = described(tmp_path, far_pair, "gkd", "objective.lmbda=0", "objective.seq_kd=true", "teacher_text.cache=true",
                   "objective.divergence=forward_kl", "penalties.frequency=0.5", "train.batch_size=2",
                   "train.grad_accum=3")
    assert kd == ("each step: 6 prompts: the teacher's greedy text (cached, at most 8 tokens); the teacher's forward "
                  "over them; loss: forward KL(p‖q) at every completion position + frequency penalty 0.5; "
                  "one optimizer step")
    mixed = described(tmp_path, far_pair, "gkd", *MIXED, "teacher_text.cache=true", "teacher_text.do_sample=true",
                      "teacher_text.samples_per_prompt=3", "objective.divergence=jsd", "objective.beta=0.3")
    assert ("with probability 0.5 the student's own samples (temperature 0.7) of at most 8 tokens, else the "
            "teacher's sampled (temperature 1) text (cached, one of 3 per prompt, at most 8 tokens)") in mixed
    assert "generalized JSD (beta 0.3)" in mixed
    adaptive = described(tmp_path, far_pair, "gkd", "objective.lmbda=0", "objective.lmbda_schedule=adaptive",
                         "objective.lmbda_step=0.25", "eval.eval_steps=2", "replay.size=8", "replay.share=0.5")
    assert "starting at 0, raised by 0.25 after each evaluation whose held-out KL rose" in adaptive
    assert "reuses stored samples with probability 0.5: replay.size 8" in adaptive
    seqkd = described(tmp_path, far_pair, "seqkd")
    assert "teacher's forward" not in seqkd and "cross-entropy on the teacher's tokens" in seqkd
    pg = described(tmp_path, far_pair, "pg", "rollout.alpha=0.2", "objective.ppo_epochs=2", "penalties.entropy=0.1",
                   "rollout.truncated=mask")
    assert "mixed token by token with the teacher's (alpha 0.2), those cut at max_new_tokens masked out" in pg
    assert "+ entropy penalty 0.1" in pg and "2 optimizer steps over the rollout (PPO)" in pg
    distillm2 = described(tmp_path, far_pair, "distillm2", "teacher_text.cache=true")
    assert "the student's own samples" in distillm2 and "and the teacher's greedy text (cached" in distillm2


def test_the_head_is_named_once_chosen(tmp_path, far_pair):
    recipe = load_recipe(recipe_for(tmp_path, far_pair, "kd"), [])
    assert describe_step(recipe, forward_plan(recipe, "chunked")).endswith("(memory-bounded head); one optimizer step")
    assert "(full logits)" in describe_step(recipe, forward_plan(recipe, "torch"))


def step_records(tmp_path) -> list[dict]:
    return [r for r in metrics_of(tmp_path / "out") if "train/loss" in r]


def test_a_mixed_run_logs_rollout_metrics_on_student_steps_only(tmp_path, far_pair, isolated_cache, capsys):
    assert main([str(recipe_for(tmp_path, far_pair, "gkd")), *MIXED, "teacher_text.cache=true"]) == 0
    out = capsys.readouterr().out
    assert "each step: 2 prompts: with probability 0.5 the student's own samples" in out.replace("\n", " ")
    first = metrics_of(tmp_path / "out")[0]
    assert first["run"]["step"].startswith("each step: 2 prompts")
    steps = step_records(tmp_path)
    student = [r for r in steps if r["data/on_policy"] == 1.0]
    teacher = [r for r in steps if r["data/on_policy"] == 0.0]
    assert student and teacher and len(student) + len(teacher) == len(steps)
    for r in student:
        assert {"rollout/mean_len", "time/rollout_s", "rollout/truncated"} <= set(r) and "data/mean_len" not in r
    for r in teacher:  # the cached teacher text: nothing decoded at the step
        assert not {"rollout/mean_len", "time/rollout_s", "rollout/truncated"} & set(r) and r["data/mean_len"] > 0
    assert all("time/teacher_s" in r for r in steps)


@pytest.mark.parametrize("mode, teacher_forward", [("kd", True), ("seqkd", False)])
def test_an_off_policy_run_logs_no_rollout_and_no_on_policy_share(mode, teacher_forward, tmp_path, far_pair,
                                                                  isolated_cache):
    overrides = ["train.max_steps=2", "eval.max_samples=2"] + (["teacher_text.cache=true"] if mode == "seqkd" else [])
    assert main([str(recipe_for(tmp_path, far_pair, mode)), *overrides]) == 0
    steps = step_records(tmp_path)
    assert len(steps) == 2
    for r in steps:
        assert not {"rollout/mean_len", "time/rollout_s", "data/on_policy"} & set(r)
        assert r["data/mean_len"] > 0 and ("time/teacher_s" in r) == teacher_forward


def test_distillm2_counts_half_its_completions_as_the_students(tmp_path, far_pair, isolated_cache):
    assert main([str(recipe_for(tmp_path, far_pair, "distillm2")), "teacher_text.cache=true", "train.max_steps=2",
                 "eval.max_samples=2"]) == 0
    steps = step_records(tmp_path)
    assert [r["data/on_policy"] for r in steps] == [0.5, 0.5]
    assert all(r["rollout/mean_len"] > 0 and r["data/mean_len"] > 0 for r in steps)


def test_every_divergence_has_its_words_for_the_runs_first_lines():
    from onpolicy_kd.objectives.divergences import DIVERGENCES
    from onpolicy_kd.training.describe import DIVERGENCE_NAMES

    assert set(DIVERGENCE_NAMES) == set(DIVERGENCES)
