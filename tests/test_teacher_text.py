"""GKD's lambda mixing of the teacher's text and the student's samples within one stage: the teacher's text is
decoded by its own keys (teacher_text.*), independent of the rollout's (rollout.*, the student's samples), whether
it is cached once (teacher_text.cache) or decoded afresh at each step; lambda is the share of student-sample steps."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import pytest

from onpolicy_kd.data.sampler import teacher_sample
from onpolicy_kd.errors import ConfigError
from onpolicy_kd.objectives.modes import completion_source
from onpolicy_kd.recipe import load_recipe
from onpolicy_kd.train import main

from test_train import metrics_of, recipe_for

MIXED = ["objective.mode=gkd", "objective.seq_kd=true", "objective.lmbda=0.5", "rollout.temperature=0.7",
         "rollout.do_sample=true", "train.max_steps=6", "train.batch_size=2", "eval.max_samples=2"]


def test_lambda_is_the_share_of_student_sample_steps_the_rest_teacher_text(tmp_path, far_pair):
    recipe = load_recipe(recipe_for(tmp_path, far_pair, "gkd"), ["objective.seq_kd=true", "objective.lmbda=0.25",
                                                                 "teacher_text.cache=true"])
    sources = Counter(completion_source(recipe, step) for step in range(4000))
    assert set(sources) == {"student", "teacher"}
    assert abs(sources["student"] / 4000 - 0.25) < 0.02  # 3.5 standard errors of a fair coin's share


def recorded_decodes(monkeypatch) -> list[dict]:
    """How training decodes: every rollout call of a step (phases) and every teacher-cache entry training asks for
    (loop; the held-out teacher answers of the evaluation, decoded by eval.*, are not recorded)."""
    import onpolicy_kd.training.loop as loop
    import onpolicy_kd.training.phases as phases

    calls = []

    def record(source, settings):
        calls.append({"source": source, **{k: settings[k] for k in ("do_sample", "temperature", "max_new_tokens")}})

    def rollout(*args, real=phases.rollout, **kwargs):
        record(kwargs["source"], kwargs)
        return real(*args, **kwargs)

    def cached(teacher, tokenizer, prompts, settings, real=loop.cached_teacher_completions, **kwargs):
        record("teacher", settings)
        return real(teacher, tokenizer, prompts, settings, **kwargs)

    monkeypatch.setattr(phases, "rollout", rollout)
    monkeypatch.setattr(loop, "cached_teacher_completions", cached)
    return calls


def training_entries(cache: Path) -> list[datasets.Dataset]:
    """The teacher-cache entries of the training prompts (the others hold the held-out answers of the evaluation,
    eval.max_samples = 2 prompts)."""
    entries = [datasets.load_from_disk(str(p)) for p in sorted((cache / "data" / "teacher").iterdir())]
    return [entry for entry in entries if len(entry) > 2]


@pytest.mark.parametrize("cache", [True, False])
def test_the_teacher_text_follows_its_own_decoding_keys(cache, tmp_path, far_pair, isolated_cache, monkeypatch):
    calls = recorded_decodes(monkeypatch)
    path = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(path), *MIXED, f"teacher_text.cache={str(cache).lower()}", "teacher_text.max_new_tokens=5"]) == 0
    student = [c for c in calls if c["source"] == "student"]
    teacher = [c for c in calls if c["source"] == "teacher"]
    assert student and teacher  # both kinds of step ran (steps 1-6 at lambda 0.5 with seed 5)
    assert all(c == {"source": "student", "do_sample": True, "temperature": 0.7, "max_new_tokens": 8} for c in student)
    assert all(c == {"source": "teacher", "do_sample": False, "temperature": 1.0, "max_new_tokens": 5} for c in teacher)
    on_policy = [r["data/on_policy"] for r in metrics_of(tmp_path / "out") if "train/loss" in r]
    recipe = load_recipe(path, [*MIXED])
    assert on_policy == [float(completion_source(recipe, step) == "student") for step in range(6)]
    if cache:  # the teacher decoded once per training prompt, before the first step; never at a step
        entries = training_entries(isolated_cache)
        assert len(entries) == 1 and len([c for c in teacher]) == 1
        assert all(1 <= len(ids) <= 5 for ids in entries[0]["teacher_ids"])
    else:  # afresh at each teacher step, 2 prompts per call
        assert len(teacher) == on_policy.count(0.0)


def test_several_sampled_teacher_answers_per_prompt_are_cached_and_each_is_trained_on(tmp_path, far_pair,
                                                                                   isolated_cache, monkeypatch):
    import onpolicy_kd.data.sampler as sampler

    picks = []
    real_pick = sampler.teacher_sample
    monkeypatch.setattr(sampler, "teacher_sample", lambda *a: picks.append(real_pick(*a)) or picks[-1])
    path = recipe_for(tmp_path, far_pair, "seqkd")
    assert main([str(path), "teacher_text.cache=true", "teacher_text.do_sample=true", "teacher_text.temperature=1.5",
                 "teacher_text.samples_per_prompt=3", "train.max_steps=8", "eval.max_samples=2"]) == 0
    entries = training_entries(isolated_cache)
    assert len(entries) == 3  # one entry per sample (seeds train.seed + 0, 1, 2): each reusable on its own
    texts = list(zip(*(entry["teacher_text"] for entry in entries)))  # per prompt, its three answers
    assert sum(len(set(answers)) > 1 for answers in texts) > len(texts) / 2  # sampled at temperature 1.5: they differ
    assert set(picks) == {0, 1, 2} and len(picks) == 8 * 4  # 8 steps of 4 prompts, every answer used


def test_which_cached_teacher_answer_is_a_function_of_seed_step_and_row():
    draws = [teacher_sample(5, step, row, 3) for step in range(200) for row in range(5)]
    assert draws == [teacher_sample(5, step, row, 3) for step in range(200) for row in range(5)]
    assert all(abs(draws.count(k) / len(draws) - 1 / 3) < 0.05 for k in range(3))
    assert draws != [teacher_sample(6, step, row, 3) for step in range(200) for row in range(5)]
    assert {teacher_sample(5, step, 0, 1) for step in range(50)} == {0}


@pytest.mark.parametrize("overrides, message", [
    (["rollout.teacher_cache=true"], "rollout.teacher_cache is now teacher_text.cache"),
    (["objective.mode=seqkd", "teacher_text.temperature=0.5"], "have no effect with teacher_text.do_sample=false"),
    (["objective.mode=seqkd", "teacher_text.do_sample=true", "teacher_text.samples_per_prompt=2"],
     "needs teacher_text.do_sample=true and teacher_text.cache=true"),
    (["objective.mode=gkd", "objective.lmbda=1.0", "teacher_text.cache=true"], "teacher_text.cache=True has no effect"),
    (["objective.mode=seqkd", "rollout.do_sample=false"], "rollout.do_sample=False has no effect"),
    (["objective.mode=gkd", "objective.lmbda=0.0", "objective.seq_kd=true", "rollout.temperature=0.5"],
     "rollout.temperature=0.5 has no effect"),
])
def test_teacher_text_and_rollout_keys_where_they_do_nothing_are_errors(overrides, message, tmp_path, far_pair):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_recipe(recipe_for(tmp_path, far_pair, "gkd"), overrides)


def test_the_default_recipes_read_the_teacher_cache_entries_they_wrote_before(tmp_path):
    """Moving the teacher's decoding keys from rollout to teacher_text keeps the settings the cache is keyed by, so
    the default recipe's ~6 minutes of teacher summaries are not generated again."""
    root = Path(__file__).resolve().parent.parent
    news = load_recipe(root / "recipes" / "smollm2_news.yaml")
    assert news.teacher_text_decoding() == {"max_new_tokens": 32, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                            "do_sample": False, "stop_strings": []}
    arithmetic = load_recipe(root / "recipes" / "smollm2_arithmetic.yaml")
    assert arithmetic.teacher_text_decoding()["max_new_tokens"] == 64 and arithmetic.teacher_text.cache


def test_a_run_saved_before_teacher_text_existed_still_evaluates(tmp_path):
    """A saved final/recipe.yaml of the previous layout (rollout.teacher_cache; the teacher's decoding in
    rollout.*) is carried over to teacher_text.* by `evaluate`'s loader, as that run decoded."""
    import yaml

    from onpolicy_kd.recipe.loading import load_run_recipe, recipe_to_yaml

    root = Path(__file__).resolve().parent.parent
    current = load_recipe(root / "recipes" / "smollm2_news.yaml")
    old = yaml.safe_load(recipe_to_yaml(current))
    old.pop("teacher_text"), old.pop("replay")
    old["rollout"] |= {"teacher_cache": True, "do_sample": False}  # what the default recipe saved before
    old["stages"] = [{"name": "sampled", "max_steps": 2,  # the recipe's objective: gkd on teacher text
                      "rollout": {"teacher_cache": False, "do_sample": True, "temperature": 0.7}}]
    old["train"]["max_steps"] = None
    saved = tmp_path / "recipe.yaml"
    saved.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="rollout.teacher_cache is now teacher_text.cache"):
        load_recipe(saved)  # a user's recipe gets the error
    migrated = load_run_recipe(saved)
    assert migrated.teacher_text.cache and migrated.teacher_text_decoding() == current.teacher_text_decoding()
    stage = migrated.stages[0]
    assert stage.teacher_text == {"cache": False, "do_sample": True, "temperature": 0.7}
    assert "do_sample" not in stage.rollout and "temperature" not in stage.rollout


def test_the_cache_key_of_a_teacher_reached_through_a_symlink_is_the_folders(tmp_path, far_pair):
    """A cache root moved behind a symlink (ONPOLICY_KD_CACHE_DIR=X with X/models linked to the old models) reads
    the teacher's cached text instead of generating it again: the key holds the resolved folder."""
    from transformers import AutoModelForCausalLM

    from onpolicy_kd.rollout.teacher_cache import teacher_fingerprint

    teacher_dir, _ = far_pair
    (tmp_path / "models").symlink_to(Path(teacher_dir).parent)
    direct = AutoModelForCausalLM.from_pretrained(teacher_dir)
    linked = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / Path(teacher_dir).name)
    assert teacher_fingerprint(linked) == teacher_fingerprint(direct)
