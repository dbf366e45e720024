"""Block-by-block hidden-state distillation with an LM-head phase: `train.trainable`, `objective.mode: hidden`,
stitching carried across stages, `head_init: teacher_projected`, per-layer hidden MSE in the evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from onpolicy_kd.errors import ConfigError
from onpolicy_kd.models.freezing import apply_trainable, part_of_each_parameter
from onpolicy_kd.objectives.hidden import Stitching, projected_teacher_head, read_stitching_file
from onpolicy_kd.recipe import load_recipe
from onpolicy_kd.recipe.schema import parse_trainable
from onpolicy_kd.train import main

from test_train import metrics_of, recipe_for

NARROW = "  config_overrides: {num_hidden_layers: 2, hidden_size: 16, intermediate_size: 32}\n"
BLOCKS = """stages:
  - name: block-1
    max_steps: 3
    objective: {mode: hidden}
    hidden: {weight: 1.0, layers: [[1, 2]]}
    train: {trainable: [layer 1]}
    optim: {lr: 0.01}
  - name: block-2
    max_steps: 3
    objective: {mode: hidden}
    hidden: {weight: 1.0, layers: [[1, 2], [2, 3]]}
    train: {trainable: [layer 2]}
    optim: {lr: 0.01}
  - name: head
    max_steps: 3
    head_init: teacher_projected
    objective: {mode: kd}
    train: {trainable: [head, other]}
    optim: {lr: 0.01}
"""


def block_recipe(tmp_path, far_pair, stages: str = BLOCKS):
    path = recipe_for(tmp_path, far_pair, "kd")
    text = path.read_text().replace("  max_steps: 3\n", "")
    text = text.replace("  config_overrides: {num_hidden_layers: 2}\n", NARROW)
    path.write_text(text + stages)
    return path


def layer_keys(state: dict, number: int) -> list[str]:
    return [k for k in state if k.startswith(f"model.layers.{number - 1}.")]


def unchanged(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


@pytest.fixture
def block_run(tmp_path, far_pair, isolated_cache, monkeypatch, capsys):
    """The three-stage block schedule, with the student's weights recorded as each stage starts."""
    import onpolicy_kd.training.stages as stages

    starts, original = [], stages.train

    def spy(recipe, path, models, **kwargs):
        starts.append({k: v.detach().clone() for k, v in models.student.state_dict().items()})
        return original(recipe, path, models, **kwargs)

    monkeypatch.setattr(stages, "train", spy)
    assert main([str(block_recipe(tmp_path, far_pair))]) == 0
    out = tmp_path / "out"
    finals = [load_file(out / "stages" / name / "final" / "model.safetensors")
              for name in ("1-block-1", "2-block-2", "3-head")]
    return out, starts, finals, " ".join(capsys.readouterr().out.split())  # rich wraps long lines


def test_each_block_trains_alone_and_the_frozen_parts_do_not_move(block_run):
    out, starts, finals, printed = block_run
    initial, block1, block2, head = starts[0], *finals
    everything_but = lambda state, keep: [k for k in state if k not in keep]  # noqa: E731
    # block 1: only decoder layer 1 moved (embeddings, layer 2, final norm and head as initialised)
    assert not unchanged(initial, block1, layer_keys(block1, 1))
    assert unchanged(initial, block1, everything_but(block1, layer_keys(block1, 1)))
    # block 2: only layer 2, layer 1 kept as block 1 left it
    assert not unchanged(block1, block2, layer_keys(block2, 2))
    assert unchanged(block1, block2, everything_but(block2, layer_keys(block2, 2)))
    # the head phase: the layers and embeddings as block 2 left them; the head and final norm trained
    frozen = [*layer_keys(head, 1), *layer_keys(head, 2), "model.embed_tokens.weight"]
    assert unchanged(block2, head, frozen)
    assert not torch.equal(starts[2]["lm_head.weight"], head["lm_head.weight"])
    assert "trainable: layer 1 (" in printed and "the rest is frozen" in printed


def test_the_head_phase_starts_from_the_projected_teacher_head(block_run, far_pair):
    from transformers import AutoModelForCausalLM

    out, starts, finals, printed = block_run
    teacher = AutoModelForCausalLM.from_pretrained(far_pair[0])
    projection = read_stitching_file(out / "stages" / "2-block-2" / "final" / "stitching.safetensors")[(2, 3)]
    expected = teacher.lm_head.weight.detach() @ projection  # W_t P: (V, 32) @ (32, 16)
    torch.testing.assert_close(starts[2]["lm_head.weight"], expected)
    assert "lm_head from the teacher's through the projection of layer pair [2, 3]" in printed


def test_projections_carry_over_and_the_run_keeps_every_pair(block_run):
    out, starts, finals, printed = block_run
    assert "stitching of layer pairs [[1, 2]] continues from the earlier stages" in printed
    kept = read_stitching_file(out / "final" / "stitching.safetensors")
    block2 = read_stitching_file(out / "stages" / "2-block-2" / "final" / "stitching.safetensors")
    assert sorted(kept) == [(1, 2), (2, 3)]
    for pair in kept:
        torch.testing.assert_close(kept[pair], block2[pair])


def test_hidden_distances_fall_and_are_evaluated_per_layer(block_run):
    out, *_ = block_run
    evals = [r for r in metrics_of(out) if "eval/reverse_kl" in r]
    # every stage ends with an evaluation, the next one's start; the head stage measures its own start (a new head)
    assert [r.get("stage") for r in evals] == ["block-1", "block-1", "block-2", "head", "head"]
    assert evals[3]["step"] == evals[2]["step"] and evals[3]["eval/reverse_kl"] != evals[2]["eval/reverse_kl"]
    first, after_block1 = evals[0]["eval/hidden_mse_layer_1_to_2"], evals[1]["eval/hidden_mse_layer_1_to_2"]
    assert after_block1 < first
    assert "eval/hidden_mse_layer_2_to_3" in evals[2] and "eval/hidden_mse_layer_1_to_2" in evals[2]
    steps = [r for r in metrics_of(out) if r.get("stage") in ("block-1", "block-2") and "train/loss" in r]
    for row in steps:  # hidden mode: the loss is the hidden-state loss alone (weight 1)
        assert row["train/loss"] == pytest.approx(row["train/hidden_mse"], rel=1e-5)

    from onpolicy_kd.evaluate import main as evaluate

    assert evaluate([str(out), "eval.max_samples=4"]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["hidden_mse_layer_1_to_2"] > 0 and metrics["hidden_mse_layer_2_to_3"] > 0


def test_a_killed_block_run_resumes_to_the_same_student(tmp_path, far_pair, isolated_cache):
    """Killed in the head phase: the block stages are skipped (their projections read back from their final/),
    head_init runs again and the head stage's checkpoint then brings back what it had trained."""
    import shutil

    path = block_recipe(tmp_path, far_pair)
    path.write_text(path.read_text().replace("  seed: 5\n", "  seed: 5\n  save_steps: 1\n  deterministic: true\n"))
    assert main([str(path)]) == 0
    out = tmp_path / "out"
    reference = load_file(out / "final" / "model.safetensors")
    stitching = read_stitching_file(out / "final" / "stitching.safetensors")
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "stages" / "3-head" / "final")
    for checkpoint in (out / "stages" / "3-head" / "checkpoints").glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) > 1:
            shutil.rmtree(checkpoint)
    assert main([str(path), "train.resume_from=latest"]) == 0
    resumed = load_file(out / "final" / "model.safetensors")
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-5, atol=1e-6)
    again = read_stitching_file(out / "final" / "stitching.safetensors")
    assert sorted(again) == sorted(stitching)
    for pair in stitching:
        torch.testing.assert_close(again[pair], stitching[pair])


@pytest.mark.parametrize("stages, message", [
    # the student is tied: head_init would overwrite its embeddings
    ("tied", "tied to them"),
    # the projection head_init reads ([2, 3]: last to last) is trained by no earlier stage
    ("stages:\n  - {name: a, max_steps: 1, objective: {mode: hidden}, hidden: {weight: 1.0, layers: [[1, 2]]}}\n"
     "  - {name: head, max_steps: 1, head_init: teacher_projected}\n", r"add \[2, 3\] to an earlier stage"),
    # a later stage names layers the student does not have
    ("stages:\n  - {name: a, max_steps: 1}\n  - {name: b, max_steps: 1, train: {trainable: [layers 2-5]}}\n",
     r"stage 1 \(b\): train.trainable: layers \[3, 4, 5\] named"),
])
def test_a_bad_stage_is_refused_before_any_stage_trains(stages, message, tmp_path, far_pair, isolated_cache):
    path = block_recipe(tmp_path, far_pair, BLOCKS if stages == "tied" else stages)
    if stages == "tied":
        path.write_text(path.read_text().replace("hidden_size: 16,", "hidden_size: 16, tie_word_embeddings: true,")
                        .replace("trainable: [head, other]", "trainable: all"))
    from onpolicy_kd.training.stages import run_stages

    with pytest.raises(ConfigError, match=message):
        run_stages(load_recipe(path), str(path))
    assert not (tmp_path / "out" / "stages").exists()  # refused before the first stage trained
    assert main([str(path), "--dry-run"]) != 0  # and the dry run says so


def test_recipe_errors_of_the_block_keys(tmp_path, far_pair):
    first = "stages:\n  - name: head\n    max_steps: 1\n    head_init: teacher_projected\n"
    with pytest.raises(ConfigError, match="no earlier stage trains one"):
        load_recipe(block_recipe(tmp_path, far_pair, first))
    path = block_recipe(tmp_path, far_pair, "")
    with pytest.raises(ConfigError, match="an empty list trains nothing"):
        load_recipe(path, ["train.max_steps=1", "train.trainable=[]"])
    with pytest.raises(ConfigError, match="set hidden.weight > 0"):
        load_recipe(path, ["train.max_steps=1", "objective.mode=hidden"])
    with pytest.raises(ConfigError, match="penalties.frequency"):
        load_recipe(path, ["train.max_steps=1", "objective.mode=hidden", "hidden.weight=1.0", "penalties.frequency=1.0"])


def test_trainable_parts_are_read_and_checked():
    assert parse_trainable(["layers 2-4", "head"]).layers == {2, 3, 4}
    assert parse_trainable("all").trains_layer(7)
    for bad in (["layers 3-1"], ["layer 0"], ["lm_head"]):
        with pytest.raises(ValueError, match="train.trainable"):
            parse_trainable(bad)


def test_a_tied_head_must_train_with_its_embeddings(far_pair):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ConfigError, match="list both head and embeddings"):
        apply_trainable(model, parse_trainable(["head"]))
    trainable, total = apply_trainable(model, parse_trainable(["layer 2"]))
    assert trainable == sum(p.numel() for p in model.model.layers[1].parameters())
    parts = part_of_each_parameter(model, need_layers=True)
    assert parts["model.norm.weight"] == "other" and parts["model.layers.0.mlp.up_proj.weight"] == "layer 1"
    with pytest.raises(ConfigError, match="layers 1..2"):
        apply_trainable(model, parse_trainable(["layer 3"]))


def test_projections_start_from_earlier_ones_only_for_the_same_pair_and_shape():
    stitching = Stitching([(1, 2), (2, 3)], 4, 8)
    earlier = {(1, 2): torch.ones(8, 4), (2, 3): torch.ones(8, 5), (3, 3): torch.zeros(8, 4)}
    assert stitching.start_from(earlier) == [(1, 2)]
    assert torch.equal(stitching.projections[0].weight, torch.ones(8, 4))


def test_the_projected_head_gives_the_teachers_logits_on_projected_states():
    torch.manual_seed(0)
    head_t, projection, h_s = torch.randn(11, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64), \
        torch.randn(5, 4, dtype=torch.float64)
    w_s = projected_teacher_head(head_t, projection)
    torch.testing.assert_close(h_s @ w_s.T, (h_s @ projection.T) @ head_t.T)
