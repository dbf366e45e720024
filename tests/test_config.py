"""Recipe parsing: precedence of the layers, and one test per kind of error (message, status 2, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from onpolicy_kd.recipe import ENV_OVERRIDES, load_recipe, recipe_to_yaml
from onpolicy_kd.errors import ConfigError
from onpolicy_kd.train import main

from conftest import write_recipe

BASE = """
teacher:
  name_or_path: /models/teacher
student:
  init: teacher_layers
  layer_stride: 3
data:
  path: /data/news.jsonl
objective:
  mode: gkd
  beta: 0.5
train:
  max_steps: 10
  batch_size: 4
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    return write_recipe(tmp_path / "r.yaml", BASE)


def test_valid_recipe_and_defaults(recipe):
    r = load_recipe(recipe, environ={})
    assert r.train.max_steps == 10 and r.objective.beta == 0.5
    assert r.rollout.temperature == 1.0 and r.optim.name == "adamw"  # schema defaults
    assert "layer_stride: 3" in recipe_to_yaml(r)


def test_precedence_cli_over_env_over_file_over_default(recipe):
    env = {"ONPOLICY_KD_OUTPUT_DIR": "/env/out", "ONPOLICY_KD_LOSS_BACKEND": "chunked"}
    r = load_recipe(recipe, ["train.output_dir=/cli/out", "train.max_steps=3"], environ=env)
    assert r.train.output_dir == "/cli/out"  # command line beats environment
    assert r.objective.backend == "chunked"  # environment beats default
    assert r.train.max_steps == 3  # command line beats file
    assert r.train.batch_size == 4  # file beats default
    assert load_recipe(recipe, environ=env).train.output_dir == "/env/out"  # environment beats default


def test_mixed_precision_no_is_not_read_as_false(recipe, tmp_path):
    """YAML reads a bare `no` as false: `train.mixed_precision=no` (the README's advice for CPUs without bfloat16)
    works on the command line, in the environment and in a file."""
    assert load_recipe(recipe, ["train.mixed_precision=no"], environ={}).train.mixed_precision == "no"
    assert load_recipe(recipe, environ={"ONPOLICY_KD_MIXED_PRECISION": "no"}).train.mixed_precision == "no"
    text = recipe.read_text().replace("train:\n", "train:\n  mixed_precision: no\n", 1)
    assert "mixed_precision: no" in text
    (tmp_path / "no.yaml").write_text(text)
    assert load_recipe(tmp_path / "no.yaml", environ={}).train.mixed_precision == "no"


def test_env_overrides_map_to_schema_keys(recipe):
    for var, key in ENV_OVERRIDES.items():
        section, name = key.split(".")
        assert name in type(getattr(load_recipe(recipe, environ={}), section)).model_fields, var


def test_cache_resolver(recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("ONPOLICY_KD_CACHE_DIR", str(tmp_path / "c"))
    r = load_recipe(recipe, ["teacher.name_or_path=${cache:models/x}"])
    assert r.teacher.name_or_path == str(tmp_path / "c" / "models" / "x")


# Each case: overrides (or a file body), then strings the message must contain.
ERROR_CASES = {
    "unknown key, with suggestion": (["train.max_stpes=5"], ["train.max_stpes", "unknown key", "did you mean 'train.max_steps'", "command line"]),
    "unknown section": (["trian.max_steps=5"], ["trian", "unknown key", "did you mean 'train'"]),
    "unknown key, no close match": (["optim.zzz=1"], ["optim.zzz", "valid keys here:", "lr"]),
    "wrong type": (["train.batch_size=eight"], ["train.batch_size", "'eight'", "valid integer"]),
    "wrong type, bool": (["rollout.do_sample=maybe"], ["rollout.do_sample", "'maybe'", "valid boolean"]),
    "beta above 1": (["objective.beta=1.5"], ["objective.beta", "1.5", "less than or equal to 1", "allowed"]),
    "beta below 0": (["objective.beta=-0.1"], ["objective.beta", "-0.1", "greater than or equal to 0"]),
    "alpha equal 1": (["rollout.alpha=1.0"], ["rollout.alpha", "1.0", "less than 1", "seqkd"]),
    "alpha negative": (["rollout.alpha=-0.2"], ["rollout.alpha", "-0.2"]),
    "temperature zero": (["rollout.temperature=0"], ["rollout.temperature", "greater than 0"]),
    "divergence temperature negative": (["objective.temperature=-1"], ["objective.temperature", "greater than 0"]),
    "negative length": (["rollout.max_new_tokens=-5"], ["rollout.max_new_tokens", "-5", "greater than or equal to 1"]),
    "negative prompt length": (["data.max_prompt_tokens=-1"], ["data.max_prompt_tokens", "-1"]),
    "unknown mode": (["objective.mode=ppo"], ["objective.mode", "'ppo'", "'pg', 'gkd', 'kd', 'seqkd', 'sft', 'distillm2' or 'hidden'"]),
    "unknown divergence": (["objective.divergence=kl"], ["objective.divergence", "forward_kl", "reverse_kl", "jsd"]),
    "top_p zero": (["rollout.top_p=0"], ["rollout.top_p", "greater than 0"]),
    "contradiction: alpha in kd mode": (
        ["objective.mode=kd", "rollout.alpha=0.3"], ["contradictory", "rollout.alpha=0.3", "objective.mode=kd"]),
    "contradiction: alpha in gkd without student samples": (
        ["objective.mode=gkd", "objective.lmbda=0", "rollout.alpha=0.3"],
        ["contradictory", "rollout.alpha=0.3", "objective.mode=gkd with lmbda=0 samples no student", "lmbda > 0"]),
    "contradiction: seq_kd outside gkd": (["objective.mode=pg", "objective.seq_kd=true"], ["contradictory", "seq_kd"]),
    "contradiction: ppo epochs outside pg": (["objective.ppo_epochs=4"], ["contradictory", "ppo_epochs=4", "mode=pg"]),
    "contradiction: stride and keep_layers": (["student.keep_layers=[0,2]"], ["contradictory", "exactly one of layer_stride or keep_layers"]),
    "contradiction: teacher_layers with a student path": (["student.name_or_path=gpt2"], ["contradictory", "student.name_or_path is not used"]),
    "contradiction: greedy with top_k": (["rollout.do_sample=false", "rollout.top_k=5"], ["contradictory", "greedy"]),
    "contradiction: both warmups": (["optim.warmup_steps=5", "optim.warmup_ratio=0.1"], ["contradictory", "warmup_steps or optim.warmup_ratio"]),
    "bad override syntax": (["train.max_steps"], ["train.max_steps", "expected section.key=value"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_config_errors(case, recipe, capsys):
    overrides, expected = ERROR_CASES[case]
    with pytest.raises(ConfigError) as excinfo:
        load_recipe(recipe, overrides, environ={})
    for text in expected:
        assert text in str(excinfo.value), (text, str(excinfo.value))
    # The entry point turns it into status 2 and a message on stderr, no traceback.
    assert main([str(recipe), *overrides]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    # where: the file (and line) for recipe errors, the command line for a malformed override
    assert str(recipe) in err or "command-line override 'train.max_steps'" in err


def test_error_names_file_and_line(tmp_path):
    path = write_recipe(tmp_path / "bad.yaml", BASE.replace("  beta: 0.5", "  beta: 2.0"))
    with pytest.raises(ConfigError, match=r"objective.beta = 2.0 \(.*bad.yaml:10\)"):
        load_recipe(path, environ={})


def test_error_names_environment_variable(recipe):
    with pytest.raises(ConfigError, match="environment variable ONPOLICY_KD_LOSS_BACKEND") as excinfo:
        load_recipe(recipe, environ={"ONPOLICY_KD_LOSS_BACKEND": "cuda"})
    assert "'auto', 'torch', 'chunked' or 'liger'" in str(excinfo.value)


@pytest.mark.parametrize(
    "body, expected",
    [
        ("teacher: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "a recipe is a mapping"),
        ("teacher:\n  name_or_path: x\n", "student: required key is missing"),
        ("teacher:\n  name_or_path: !!python/object:os.system x\n", "not valid YAML"),  # safe_load only
        ("train:\n  seed: 1\nteacher:\n  name_or_path: x\ntrain:\n  max_steps: 2\n", "broken.yaml:5: duplicate key 'train'"),
    ],
)
def test_broken_files(tmp_path, body, expected, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=expected):
        load_recipe(path, environ={})
    assert main([str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.max_stpes=5"], "did you mean 'train.max_steps'"),
        (["objective.beta=1.5"], "objective.beta = 1.5"),
        (["objective.mode=sft", "rollout.alpha=0.5"], "contradictory"),
    ],
)
def test_cli_subprocess_exit_2_without_traceback(recipe, overrides, expected):
    """The real entry point in a fresh interpreter: status 2, message on stderr, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "onpolicy_kd.train", str(recipe), *overrides],
        capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr
