"""Staged recipes, the teacher-completion cache, and collapse showing in training's evaluations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onpolicy_kd.errors import ConfigError, DataError
from onpolicy_kd.recipe import load_recipe
from onpolicy_kd.train import main

from test_train import metrics_of, recipe_for

STAGES = """stages:
  - name: warmup
    max_steps: 2
    objective: {mode: seqkd}
    teacher_text: {cache: true}
    optim: {lr: 0.01}
  - name: onpolicy
    max_steps: 3
    objective: {mode: gkd}
    train: {batch_size: 2}
"""


def staged(tmp_path: Path, far_pair, extra: str = "") -> Path:
    path = recipe_for(tmp_path, far_pair, "gkd")
    text = path.read_text().replace("  max_steps: 3\n", "")  # each stage sets its own
    path.write_text(text + STAGES + extra)
    return path


def test_stages_run_in_order_and_hand_over_the_student(tmp_path, far_pair, isolated_cache, capsys):
    path = staged(tmp_path, far_pair)
    assert main([str(path)]) == 0
    out = tmp_path / "out"
    rows = metrics_of(out)
    steps = [r for r in rows if "train/loss" in r]
    assert [(r["stage"], r["step"]) for r in steps] == [("warmup", 1), ("warmup", 2), ("onpolicy", 3), ("onpolicy", 4),
                                                        ("onpolicy", 5)]
    assert "train/ce" in steps[0] and "train/reverse_kl" in steps[-1]  # each stage its own objective
    evals = [(r.get("stage"), r["step"]) for r in rows if "eval/reverse_kl" in r]
    assert evals == [("warmup", 0), ("warmup", 2), ("onpolicy", 5)]  # before, and at each stage's end
    assert all("eval/greedy/distinct1" in r for r in rows if "eval/reverse_kl" in r)
    # stage 2 started from stage 1's student: its first held-out KL is stage 1's last
    first = load_file(out / "stages" / "1-warmup" / "final" / "model.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(first[k], final[k]) for k in first)
    assert (out / "final" / "staged_recipe.yaml").is_file()
    import yaml

    assert yaml.safe_load((out / "final" / "recipe.yaml").read_text())["stages"] == []  # the task, for `evaluate`
    printed = capsys.readouterr().out
    assert "stage 1/2: warmup" in printed and "stage 2/2: onpolicy" in printed


def test_second_stage_starts_from_the_first_ones_student(tmp_path, far_pair, isolated_cache, monkeypatch):
    """The hand-over itself: the student the second stage trains is the first stage's exported one."""
    import onpolicy_kd.training.stages as stages

    seen = []
    original = stages.train

    def spy(recipe, path, models, **kwargs):
        seen.append({k: v.detach().clone() for k, v in models.student.state_dict().items()})
        return original(recipe, path, models, **kwargs)

    monkeypatch.setattr(stages, "train", spy)
    assert main([str(staged(tmp_path, far_pair))]) == 0
    exported = load_file(tmp_path / "out" / "stages" / "1-warmup" / "final" / "model.safetensors")
    assert len(seen) == 2
    for key, value in exported.items():
        torch.testing.assert_close(seen[1][key], value)


def test_resume_in_the_middle_of_a_stage_ends_where_an_uninterrupted_run_ends(tmp_path, far_pair, isolated_cache):
    extra = "  save_steps: 1\n  deterministic: true\n"
    whole = tmp_path / "whole"
    whole.mkdir()
    path = staged(whole, far_pair)
    path.write_text(path.read_text().replace("  seed: 5\n", "  seed: 5\n" + extra))
    assert main([str(path)]) == 0
    reference = load_file(whole / "out" / "final" / "model.safetensors")
    # as if killed during stage 2 after its second step's checkpoint: the later one and every final/ are gone
    out = whole / "out"
    for folder in (out / "final", out / "stages" / "2-onpolicy" / "final"):
        shutil.rmtree(folder)
    for checkpoint in (out / "stages" / "2-onpolicy" / "checkpoints").glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) > 2:
            shutil.rmtree(checkpoint)
    (out / "metrics.jsonl").unlink()
    assert main([str(path), "train.resume_from=latest"]) == 0
    resumed = load_file(out / "final" / "model.safetensors")
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in metrics_of(out) if "train/loss" in r]
    assert steps == [5]  # stage 1 skipped, stage 2 resumed after its step 2 (run step 4)


def test_a_stage_with_a_time_budget_hands_over_after_the_steps_it_took(tmp_path, far_pair, isolated_cache):
    path = staged(tmp_path, far_pair)
    stages = ("stages=[{name: warmup, max_time: 1.5, objective: {mode: seqkd}, teacher_text: {cache: true}}, "
              "{name: onpolicy, max_steps: 2}]")
    assert main([str(path), stages]) == 0
    rows = [r for r in metrics_of(tmp_path / "out") if "train/loss" in r]
    warmup = [r["step"] for r in rows if r["stage"] == "warmup"]
    assert len(warmup) >= 1 and warmup == list(range(1, len(warmup) + 1))
    assert [r["step"] for r in rows if r["stage"] == "onpolicy"] == [len(warmup) + 1, len(warmup) + 2]


def test_dry_run_prints_the_plan(tmp_path, far_pair, isolated_cache, capsys, monkeypatch):
    from onpolicy_kd.console import console

    monkeypatch.setattr(console, "width", 200)  # one line per stage
    assert main([str(staged(tmp_path, far_pair)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    table = out.split("stages (run in order")[1]
    assert "1 warmup" in table and "2 onpolicy" in table and "seqkd" in table and "news.jsonl" in table


def test_a_broken_stage_is_a_recipe_error(tmp_path, far_pair):
    path = staged(tmp_path, far_pair)
    with pytest.raises(ConfigError, match=r"(?s)stage 1 \(onpolicy\).*objective.beta"):
        load_recipe(path, ["stages=[{name: a, max_steps: 1}, {name: onpolicy, max_steps: 1, objective: {beta: 0.2}}]"])
    with pytest.raises(ConfigError, match="train.max_steps is not used with stages"):
        load_recipe(path, ["train.max_steps=7"])
    with pytest.raises(ConfigError, match="train.grad_accum and train.trainable only"):
        load_recipe(path, ["stages=[{name: a, max_steps: 1, train: {seed: 3}}]"])
    with pytest.raises(ConfigError, match="needs a budget"):
        load_recipe(path, ["stages=[{name: a}]"])
    with pytest.raises(ConfigError, match="train.max_time is not used with stages"):
        load_recipe(path, ["train.max_time=60"])
    with pytest.raises(ConfigError, match="must differ"):
        load_recipe(path, ["stages=[{name: a, max_steps: 1}, {name: a, max_steps: 1}]"])


# --- the teacher-completion cache -------------------------------------------------------------------------------


@pytest.fixture
def cache_inputs(far_pair, tiny_tokenizer):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, _ = far_pair
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    tok.pad_token = tok.eos_token
    prompts = Dataset.from_dict({"prompt_ids": [tok(f"The Senate count {i} was").input_ids for i in range(5)]})
    settings = {"max_new_tokens": 4, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "do_sample": True,
                "stop_strings": []}
    return teacher, tok, prompts, settings


def _cached(cache_inputs, cache_dir, **changes):
    from onpolicy_kd.rollout.teacher_cache import cached_teacher_completions

    teacher, tok, prompts, settings = cache_inputs
    return cached_teacher_completions(teacher, tok, prompts, {**settings, **changes}, cache_dir=cache_dir, batch_size=2,
                                      seed=3, device=torch.device("cpu"), vocab=len(tok))


def test_teacher_cache_miss_then_hit(cache_inputs, tmp_path, monkeypatch):
    import onpolicy_kd.rollout.teacher_cache as teacher_cache

    first, hit, folder = _cached(cache_inputs, tmp_path)
    assert not hit and len(first) == 5 and all(1 <= len(ids) <= 4 for ids in first["teacher_ids"])
    monkeypatch.setattr(teacher_cache, "generate_teacher_completions", lambda *a, **k: pytest.fail("regenerated"))
    again, hit, same = _cached(cache_inputs, tmp_path)
    assert hit and same == folder and again["teacher_ids"] == first["teacher_ids"]
    assert again["teacher_text"] == first["teacher_text"]


@pytest.mark.parametrize("change", [{"max_new_tokens": 3}, {"temperature": 0.5}, {"do_sample": False}])
def test_teacher_cache_key_follows_the_settings(cache_inputs, tmp_path, change):
    _, _, folder = _cached(cache_inputs, tmp_path)
    _, hit, other = _cached(cache_inputs, tmp_path, **change)
    assert not hit and other != folder


def test_teacher_cache_is_shared_by_prompt_orders_and_greedy_seeds(cache_inputs, tmp_path, monkeypatch):
    """Another seed shuffles the same prompts: the entry is found and its rows come back in the new order."""
    import onpolicy_kd.rollout.teacher_cache as teacher_cache

    teacher, tok, prompts, settings = cache_inputs
    first, _, folder = _cached(cache_inputs, tmp_path, do_sample=False)
    monkeypatch.setattr(teacher_cache, "generate_teacher_completions", lambda *a, **k: pytest.fail("regenerated"))
    shuffled = prompts.select([3, 0, 4, 1, 2])
    again, hit, same = teacher_cache.cached_teacher_completions(
        teacher, tok, shuffled, {**settings, "do_sample": False}, cache_dir=tmp_path, batch_size=2, seed=99,
        device=torch.device("cpu"), vocab=len(tok))
    assert hit and same == folder
    assert again["teacher_ids"] == [first["teacher_ids"][i] for i in (3, 0, 4, 1, 2)]
    monkeypatch.undo()
    _, hit, other = _cached(cache_inputs, tmp_path, do_sample=True)  # sampled: its own entry, seeded
    assert not hit and other != folder


def test_teacher_cache_key_follows_the_prompts_and_the_teacher(cache_inputs, tmp_path):
    from datasets import Dataset

    from onpolicy_kd.rollout.teacher_cache import cache_key

    teacher, _, prompts, settings = cache_inputs
    key = cache_key(teacher, prompts, settings)
    assert cache_key(teacher, Dataset.from_dict({"prompt_ids": prompts["prompt_ids"][:4]}), settings) != key
    other = type(teacher)(teacher.config)
    other.config.rms_norm_eps = 1e-3
    assert cache_key(other, prompts, settings) != key


def test_corrupted_teacher_cache_is_a_clear_error(cache_inputs, tmp_path):
    _, _, folder = _cached(cache_inputs, tmp_path)
    for file in folder.glob("*.arrow"):
        file.write_bytes(b"not arrow")
    with pytest.raises(DataError, match="cannot be read.*delete that folder"):
        _cached(cache_inputs, tmp_path)


def test_seqkd_trains_on_the_cached_completions(tmp_path, far_pair, isolated_cache, capsys):
    path = recipe_for(tmp_path, far_pair, "seqkd")
    assert main([str(path), "teacher_text.cache=true"]) == 0
    assert "teacher completions: written to" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "out")
    assert main([str(path), "teacher_text.cache=true"]) == 0
    assert "teacher completions: read from" in capsys.readouterr().out
    steps = [r for r in metrics_of(tmp_path / "out") if "train/ce" in r]
    assert len(steps) == 3 and not any("time/rollout_s" in r for r in steps)  # no teacher decoding per step
    assert all(r["data/mean_len"] > 0 and "rollout/mean_len" not in r for r in steps)  # stored text, nothing decoded


# --- collapse shows in training's evaluations -------------------------------------------------------------------


def test_collapse_metrics_are_logged_warned_and_can_end_the_run(tmp_path, far_pair, isolated_cache, capsys):
    path = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(path), "eval.max_new_tokens=12", "eval.collapse_distinct1=1.0", "eval.stop_on_collapse=true",
                 "eval.eval_steps=1"]) == 0
    printed = capsys.readouterr().out
    rows = metrics_of(tmp_path / "out")
    evals = [r for r in rows if "eval/reverse_kl" in r]
    assert {"eval/greedy/distinct1", "eval/greedy/repetition", "eval/greedy/rougeL_teacher"} <= set(evals[0])
    assert "collapsing" in printed and "stopping (eval.stop_on_collapse)" in printed
    assert max(r["step"] for r in rows if "train/loss" in r) == 1  # ended at the first evaluation after a step
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()  # exported as it was
    flat = " ".join(printed.split())
    assert "greedy text: distinct-1" in flat and "ROUGE-L vs teacher" in flat  # the summary line


def test_training_text_metrics_match_the_evaluation_command(tmp_path, far_pair, isolated_cache):
    """The collapse metrics logged in training are the greedy-text metrics of `evaluate` (same loop, same numbers),
    which tests/test_evaluate.py checks against hand-counted references."""
    from onpolicy_kd.evaluate import main as evaluate_main

    path = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(path), "train.max_steps=1"]) == 0
    logged = [r for r in metrics_of(tmp_path / "out") if "eval/greedy/distinct1" in r][-1]
    assert evaluate_main([str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    for key in ("greedy/distinct1", "greedy/repetition", "greedy/rougeL_teacher", "sampled/rougeL_ref",
                "sampled/truncated", "teacher/sampled/rougeL_teacher_samples"):
        assert logged[f"eval/{key}"] == pytest.approx(summary[key], abs=1e-9)
