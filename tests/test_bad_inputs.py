"""Inputs a hostile new user tried that were accepted silently or answered unclearly: each is now refused (or
warned about) at start-up with a message that says what, where and how to fix it. README "When things go wrong"
lists these guarantees beside those of tests/test_faults.py."""

from __future__ import annotations

import json
import shutil

import pytest

from onpolicy_kd.errors import ConfigError
from onpolicy_kd.recipe import load_recipe
from onpolicy_kd.train import main

from test_train import recipe_for


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, " ".join((captured.err + captured.out).split())  # rich's line breaks undone


# --- the cache variable ------------------------------------------------------------------------------------------

def test_the_cache_variable_is_the_cache_root_and_a_resume_under_it_is_not_refused(tmp_path, far_pair, capsys,
                                                                                    monkeypatch):
    """ONPOLICY_KD_CACHE_DIR=X puts the data cache in X/data (data.cache_dir stays unset), and a run resumed with the
    variable spelling the same cache another way (here a symlink) is not refused for "changed" paths."""
    from onpolicy_kd.data.loading import data_cache_dir

    cache = tmp_path / "cache"
    shutil.copytree(far_pair[0], cache / "models" / "teacher")
    alias = tmp_path / "alias"
    alias.symlink_to(cache)
    monkeypatch.setenv("ONPOLICY_KD_CACHE_DIR", str(cache))
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    teacher = "teacher.name_or_path=${cache:models/teacher}"
    resolved = load_recipe(recipe, [teacher])
    assert resolved.data.cache_dir is None and data_cache_dir(resolved.data) == cache / "data"
    assert main([str(recipe), teacher, "train.max_steps=1"]) == 0
    monkeypatch.setenv("ONPOLICY_KD_CACHE_DIR", str(alias))
    code, text = run_cli([str(recipe), teacher, "train.max_steps=2", "train.resume_from=latest"], capsys)
    assert code == 0 and "cannot resume" not in text


# --- degenerate inputs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("empty", [None, "", "   "])
def test_data_whose_every_document_is_empty_is_an_error(empty, tmp_path, far_pair, isolated_cache, capsys):
    data = tmp_path / "empty_articles.jsonl"
    data.write_text("".join(json.dumps({"article": empty, "highlights": f"Greens win seat {i}."}) + "\n"
                            for i in range(20)))
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    for args in (["--dry-run"], []):
        code, text = run_cli([str(recipe), f"data.path={data}", *args], capsys)
        assert code == 2 and "empty_articles.jsonl" in text and "empty or null" in text and "'article'" in text


@pytest.mark.parametrize("key", ["rollout.temperature", "objective.temperature", "eval.temperature"])
def test_a_temperature_too_small_to_mean_anything_is_refused(key, tmp_path, far_pair, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    code, text = run_cli([str(recipe), f"{key}=1e-8", "--dry-run"], capsys)
    assert code == 2 and key in text and "below 0.05" in text and "one-hot" in text and "Traceback" not in text
    assert getattr(load_recipe(recipe, [f"{key}=0.05"]), key.split(".")[0]).temperature == 0.05


def test_a_batch_larger_than_the_training_rows_says_rows_repeat(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    code, text = run_cli([str(recipe), "data.max_samples=4", "train.batch_size=8", "train.max_steps=1"], capsys)
    assert code == 0 and "a step takes 8 prompts" in text and "the training split has 4 rows" in text
    assert "each row appears about 2.0 times in every step" in text


@pytest.mark.parametrize("where", ["teacher", "teacher/run", "cache/models/run"])
def test_an_output_folder_among_a_models_files_is_refused(where, tmp_path, far_pair, isolated_cache, capsys):
    teacher_dir = far_pair[0]
    output = {"teacher": teacher_dir, "teacher/run": teacher_dir / "run",
              "cache/models/run": isolated_cache / "models" / "run"}[where]
    before = sorted(p.name for p in teacher_dir.iterdir())
    for args in ([], ["--dry-run"]):
        code, text = run_cli([str(recipe_for(tmp_path, far_pair, "gkd")), f"train.output_dir={output}", *args], capsys)
        assert code == 2 and "train.output_dir" in text and "among the model" in text
    assert sorted(p.name for p in teacher_dir.iterdir()) == before  # nothing written there (no lock file either)
    assert output == teacher_dir or not output.exists()


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.lr=.nan", "objective.beta=.nan", "train.max_time=.inf"])
def test_non_finite_numbers_are_recipe_errors(override, tmp_path, far_pair, capsys):
    code, text = run_cli([str(recipe_for(tmp_path, far_pair, "gkd")), override, "--dry-run"], capsys)
    assert code == 2 and override.split("=")[0] in text and "finite number" in text


def test_an_infinite_entropy_floor_is_still_allowed(tmp_path, far_pair):
    recipe = load_recipe(recipe_for(tmp_path, far_pair, "gkd"),
                         ["penalties.entropy=0.1", "penalties.entropy_floor=.inf"])
    assert recipe.penalties.entropy_floor == float("inf")  # its default: a plain entropy bonus


# --- unclear messages --------------------------------------------------------------------------------------------

def test_a_recipe_path_that_is_a_directory_says_so(tmp_path, far_pair, capsys):
    recipe_for(tmp_path, far_pair, "gkd")
    code, text = run_cli([str(tmp_path)], capsys)
    assert code == 2 and f"the recipe {tmp_path} is a directory" in text and "gkd.yaml" in text


def test_an_unknown_key_in_a_stage_names_the_stage_keys(tmp_path, far_pair):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    typo = "stages=[{name: a, max_steps: 1, objectiv: {mode: kd}}]"
    with pytest.raises(ConfigError, match=r"(?s)stages\.0\.objectiv: unknown key.*did you mean 'stages\.0\.objective'"):
        load_recipe(recipe, ["train.max_steps=null", typo])
    with pytest.raises(ConfigError, match=r"valid keys here: data, epochs, head_init, hidden, max_steps"):
        load_recipe(recipe, ["train.max_steps=null", "stages=[{name: a, max_steps: 1, zzz: 1}]"])


def test_an_override_before_the_recipe_path_is_read_as_an_override(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    code, text = run_cli(["--dry-run", "objective.beta=0.7", str(recipe), "objective.divergence=jsd"], capsys)
    assert code == 0 and "beta: 0.7" in text
    code, text = run_cli(["objective.beta=0.7", "--dry-run"], capsys)
    assert code == 2 and "no recipe given" in text


def test_prune_checks_the_layer_count_before_loading_the_teacher(tmp_path, far_pair, capsys, monkeypatch):
    import onpolicy_kd.prune as prune

    monkeypatch.setattr(prune, "load_teacher", lambda *a, **k: pytest.fail("loaded the teacher before checking --keep"))
    assert prune.main([str(recipe_for(tmp_path, far_pair, "gkd")), "--keep", "99"]) == 2
    assert "--keep 99: the teacher has 3 decoder layers; keep 1 to 2" in " ".join(capsys.readouterr().err.split())


def test_push_with_a_malformed_repo_id_says_so(tmp_path, capsys, monkeypatch):
    import onpolicy_kd.training.publish as publish
    from onpolicy_kd.push import main as push

    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    for name in ("config.json", "README.md", "recipe.yaml", "model.safetensors"):
        (final / name).write_text("{}")
    monkeypatch.setattr(publish, "hub_reachable", lambda *a: pytest.fail("asked the network about a malformed id"))
    assert push([str(tmp_path / "run"), "not a/valid/id"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'not a/valid/id' is not a Hub repository id" in err and "OWNER/NAME" in err
