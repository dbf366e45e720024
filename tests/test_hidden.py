"""Hidden-state distillation: the loss against a float64 loop, layer pairing, stitching, training and export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from onpolicy_kd.recipe import HiddenConfig
from onpolicy_kd.errors import ConfigError
from onpolicy_kd.objectives.hidden import STITCHING, Stitching, attach_stitching, auto_layer_pairs, hidden_state_loss, layer_pairs
from onpolicy_kd.evaluation.plots import curve_panels
from onpolicy_kd.train import main

from conftest import llama_config
from test_train import metrics_of, recipe_for


def naive_hidden_loss(student_hidden, weights, pairs, teacher_hidden, mask, kind, num_tokens):
    """Token by token, pair by pair, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    B, T = mask.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            for w, (s, k) in zip(weights, pairs):
                x = w.double() @ student_hidden[s][b, t].double()
                y = teacher_hidden[k][b, t].double()
                if kind == "mse":
                    total = total + ((x - y) ** 2).mean()
                else:
                    total = total + 1 - (x @ y) / (x.norm() * y.norm())
    return total / (len(pairs) * num_tokens)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("num_tokens", [None, 57.0])
def test_loss_matches_a_float64_loop(kind, num_tokens):
    torch.manual_seed(0)
    B, T, d_student, d_teacher = 3, 7, 5, 11
    pairs = [(1, 2), (3, 5), (0, 0)]
    student_hidden = [torch.randn(B, T, d_student, requires_grad=True) for _ in range(4)]
    teacher_hidden = [torch.randn(B, T, d_teacher) * 3 for _ in range(6)]
    mask = torch.rand(B, T) > 0.4
    # padded positions may hold anything: they must not reach the value or the gradient
    for h in teacher_hidden:
        h[~mask] = float("nan")
    stitching = Stitching(pairs, d_student, d_teacher)
    with torch.no_grad():
        for proj in stitching.projections:
            proj.weight.normal_()

    loss = hidden_state_loss(stitching(student_hidden), [teacher_hidden[k] for _, k in pairs], mask, kind=kind,
                             num_tokens=num_tokens)
    per_pair = hidden_state_loss(stitching(student_hidden), [teacher_hidden[k] for _, k in pairs], mask, kind=kind,
                                 num_tokens=num_tokens, per_pair=True)
    assert per_pair.shape == (3,) and per_pair.mean().item() == pytest.approx(loss.item(), rel=1e-6)
    weights = [p.weight for p in stitching.projections]
    count = num_tokens if num_tokens is not None else float(mask.sum())
    reference = naive_hidden_loss(student_hidden, weights, pairs, teacher_hidden, mask, kind, count)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)

    params = [student_hidden[s] for s in (0, 1, 3)] + weights
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(reference, params)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-7)


def test_all_masked_gives_zero_with_a_zero_gradient():
    student = torch.randn(2, 4, 6, requires_grad=True)
    teacher = torch.full((2, 4, 6), float("nan"))
    loss = hidden_state_loss([student], [teacher], torch.zeros(2, 4, dtype=torch.bool), kind="cosine")
    loss.backward()
    assert loss.item() == 0 and torch.equal(student.grad, torch.zeros_like(student))


def test_bf16_hidden_states_use_float32_math():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    low = hidden_state_loss([student.bfloat16()], [teacher.bfloat16()], mask)
    assert low.dtype == torch.float32
    full = hidden_state_loss([student.bfloat16().float()], [teacher.bfloat16().float()], mask)
    assert low.item() == full.item()


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_a_bf16_student_against_a_float32_teacher_is_measured_in_float32(kind):
    """The stitching projects in the student's precision (bf16 weights or autocast) while the teacher's hidden
    states may be float32: the student's side is widened before the math. cosine_similarity normalises each input
    in its own dtype, so a bf16 student left as it is moves the cosine by ~1e-3 (found by mutation testing)."""
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 3, 16).bfloat16(), torch.randn(2, 3, 16)
    mask = torch.ones(2, 3, dtype=torch.bool)
    low = hidden_state_loss([student.requires_grad_()], [teacher], mask, kind=kind)
    widened = student.detach().float().requires_grad_()
    full = hidden_state_loss([widened], [teacher], mask, kind=kind)
    torch.testing.assert_close(low, full, rtol=0, atol=1e-6)
    low.backward(), full.backward()
    torch.testing.assert_close(student.grad.float(), widened.grad.bfloat16().float(), rtol=0, atol=0)


def test_the_hidden_loss_edges_one_token_small_norms_a_wider_teacher_and_mismatched_pairs():
    """One valid token is divided by one; cosine's eps only guards a zero norm (states of norm 0.01 are compared
    exactly); a float64 teacher does not widen a float32 student's loss; as many teacher states as projected ones,
    and a loss it knows, or a clear error."""
    g = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(1, 3, 4, generator=g) * 0.01, torch.randn(1, 3, 4, generator=g) * 0.01
    one = torch.tensor([[False, True, False]])
    for kind in ("mse", "cosine"):
        reference = naive_hidden_loss([student], [torch.eye(4)], [(0, 0)], [teacher], one, kind, 1.0)
        torch.testing.assert_close(hidden_state_loss([student], [teacher], one, kind=kind).double(), reference,
                                   rtol=1e-5, atol=1e-9)
    assert hidden_state_loss([student], [teacher.double()], one).dtype == torch.float32
    with pytest.raises(ValueError):
        hidden_state_loss([student, student], [teacher], one)
    with pytest.raises(ValueError, match="^unknown hidden-state loss 'l1': use mse or cosine$"):
        hidden_state_loss([student], [teacher], one, kind="l1")


def test_the_stitching_is_made_on_the_students_device_and_in_its_precision():
    """attach_stitching puts the projections where the student's weights are, in their dtype (meta stands in for an
    accelerator: no memory is used)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        student = LlamaForCausalLM(llama_config(64, layers=2, hidden=16)).to(torch.bfloat16)
        teacher = LlamaForCausalLM(llama_config(64, layers=4, hidden=32))
    stitching = attach_stitching(student, teacher, "auto")
    weight = stitching.projections[0].weight
    assert weight.device.type == "meta" and weight.dtype == torch.bfloat16
    assert all(p.bias is None for p in stitching.projections)


def test_auto_pairs_are_uniform_and_end_on_the_last_layer():
    assert auto_layer_pairs(10, 30) == [(i, 3 * i) for i in range(1, 11)]
    assert auto_layer_pairs(4, 30) == [(1, 8), (2, 15), (3, 23), (4, 30)]  # 7.5 -> 8, 22.5 -> 23: halves up
    assert auto_layer_pairs(3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert layer_pairs(HiddenConfig(layers=[[0, 0], [2, 4]]).layers, 2, 4) == [(0, 0), (2, 4)]


def test_out_of_range_layer_is_a_clear_error():
    with pytest.raises(ConfigError) as err:
        layer_pairs(HiddenConfig(layers=[[1, 2], [3, 9]]).layers, 2, 4)
    message = str(err.value)
    assert "hidden.layers" in message and "[3, 9]" in message and "0..2" in message and "0..4" in message


def test_stitching_init_identity_when_widths_match_xavier_otherwise():
    torch.manual_seed(0)
    same = Stitching([(1, 1), (2, 3)], 16, 16)
    assert all(torch.equal(p.weight, torch.eye(16)) for p in same.projections)
    wide = Stitching([(1, 2)], 16, 48)
    bound = (6 / (16 + 48)) ** 0.5
    weight = wide.projections[0].weight
    assert weight.shape == (48, 16) and weight.abs().max() <= bound and weight.std() > bound / 3


def test_an_exact_copy_starts_at_zero_loss():
    from transformers import AutoModelForCausalLM

    from onpolicy_kd.batch import Completions
    from onpolicy_kd.models.forward import forward_completions

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(llama_config(50, layers=2)).eval()
    student = copy.deepcopy(teacher)
    stitching = attach_stitching(student, teacher, HiddenConfig(weight=1.0).layers)
    assert getattr(student, STITCHING) is stitching and stitching.pairs == [(1, 1), (2, 2)]
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    batch = Completions(ids[:, :3], mask[:, :3], ids[:, 3:], mask[:, 3:], source="references", texts=["", ""])
    student_hidden = forward_completions(student, batch, logits=False, hidden=True).hidden
    teacher_hidden = forward_completions(teacher, batch, logits=False, hidden=True).hidden
    assert len(student_hidden) == 3 and student_hidden[0].shape == (2, 3, 32)
    loss = hidden_state_loss(stitching(student_hidden), [teacher_hidden[t] for _, t in stitching.pairs], batch.completion_mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


NARROW_STUDENT = ["student.config_overrides={num_hidden_layers: 2, hidden_size: 16, intermediate_size: 32}",
                  "hidden.weight=1.0"]


def test_training_pulls_hidden_states_together_and_exports_a_plain_student(tmp_path, far_pair, isolated_cache):
    """gkd with a 16-wide student of a 32-wide teacher: the stitched MSE falls; final/ loads as a plain model."""
    from transformers import AutoModelForCausalLM

    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), *NARROW_STUDENT, "train.max_steps=20", "optim.lr=1.0e-2", "train.batch_size=8"]) == 0
    out = tmp_path / "out"
    mse = [r["train/hidden_mse"] for r in metrics_of(out) if "train/hidden_mse" in r]
    assert len(mse) == 20 and all(torch.isfinite(torch.tensor(mse)))
    assert sum(mse[-5:]) < 0.7 * sum(mse[:5]), mse  # seen: 0.35 vs 0.64 per token
    # per layer pair too (auto pairs for 2 student layers over 3 teacher layers: 1 -> 2, 2 -> 3), and plotted
    for row in (r for r in metrics_of(out) if "train/hidden_mse" in r):
        pairs = [row["hidden/mse_layer_1_to_2"], row["hidden/mse_layer_2_to_3"]]
        assert sum(pairs) / 2 == pytest.approx(row["train/hidden_mse"], rel=1e-6)
    panels = dict(curve_panels(metrics_of(out)))
    assert list(panels["hidden-state loss per layer pair (student -> teacher)"]) == [
        "hidden/mse_layer_1_to_2", "hidden/mse_layer_2_to_3"]
    assert "train/hidden_mse" in panels["loss terms"]

    final = out / "final"
    own = load_file(final / "model.safetensors")
    assert not any(STITCHING in key for key in own)
    stitching = load_file(final / "stitching.safetensors")
    # auto pairs for 2 student layers over 3 teacher layers: (1, 2), (2, 3)
    assert sorted(stitching) == ["projections.0.weight", "projections.1.weight"]
    assert all(w.shape == (32, 16) for w in stitching.values())
    with safe_open(final / "stitching.safetensors", "pt") as f:
        assert json.loads(f.metadata()["pairs"]) == [[1, 2], [2, 3]]
    model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert model.config.hidden_size == 16
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("mode, extra", [("sft", ["hidden.loss=cosine"]),
                                          ("pg", ["hidden.layers=[[0, 0], [2, 3]]"])])
def test_hidden_loss_in_other_modes(mode, extra, tmp_path, far_pair, isolated_cache):
    recipe = recipe_for(tmp_path, far_pair, mode)
    assert main([str(recipe), *NARROW_STUDENT, *extra]) == 0
    key = "train/hidden_cosine" if "hidden.loss=cosine" in extra else "train/hidden_mse"
    rows = [r for r in metrics_of(tmp_path / "out") if "train/loss" in r]
    assert len(rows) == 3 and all(r[key] > 0 for r in rows)


def test_resume_restores_the_stitching(tmp_path, far_pair, isolated_cache):
    """2 steps + resume for 2 more == 4 steps in one go, stitching projections included."""
    common = [*NARROW_STUDENT, "train.deterministic=true", "train.max_steps=4"]
    finals = {}
    for name, runs in (("straight", [[]]), ("resumed", [["train.max_steps=2"], ["train.resume_from=latest"]])):
        run = tmp_path / name
        run.mkdir()
        recipe = recipe_for(run, far_pair, "gkd")
        for i, overrides in enumerate(runs):
            assert main([str(recipe), *common, *overrides]) == 0
            finals[name, i] = load_file(run / "out" / "final" / "stitching.safetensors")
    for key in finals["straight", 0]:
        torch.testing.assert_close(finals["resumed", 1][key], finals["straight", 0][key], rtol=0, atol=1e-6)
        assert not torch.equal(finals["resumed", 1][key], finals["resumed", 0][key])  # steps 3-4 moved them


def test_dry_run_prints_the_pairs_and_rejects_bad_layers(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), *NARROW_STUDENT, "--dry-run"]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "layer pairs [[1, 2], [2, 3]]" in out and "1,024 stitching parameters" in out
    assert main([str(recipe), *NARROW_STUDENT, "hidden.layers=[[1, 2], [3, 3]]"]) == 2
    err = capsys.readouterr().err
    assert "hidden.layers: pair [3, 3] is out of range: the student has layers 0..2" in err and "Traceback" not in err


def test_float64_hidden_states_keep_float64_math():
    torch.manual_seed(2)
    student = [torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)]
    teacher = [torch.randn(2, 5, 8, dtype=torch.float64)]
    mask = torch.rand(2, 5) > 0.3
    loss = hidden_state_loss(student, teacher, mask, kind="mse")
    assert loss.dtype == torch.float64
    reference = naive_hidden_loss(student, [torch.eye(8, dtype=torch.float64)], [(0, 0)], teacher, mask, "mse",
                                  float(mask.sum()))
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-14)


# --- the exported stitching file and the projected head (found by mutation testing: scripts/mutation.py) ---------


def test_a_stitching_file_reads_back_as_the_module_that_wrote_it(tmp_path):
    """stitching_file -> safetensors -> read_stitching_file / stitching_from_file: the same pairs and weights, and a
    later stage's module takes over exactly the pairs whose shapes fit."""
    from safetensors.torch import save_file

    from onpolicy_kd.objectives.hidden import read_stitching_file, stitching_file, stitching_from_file

    g = torch.Generator().manual_seed(0)
    weights = {(1, 2): torch.randn(6, 4, generator=g), (2, 4): torch.randn(6, 4, generator=g)}
    tensors, metadata = stitching_file(weights)
    save_file(tensors, tmp_path / "stitching.safetensors", metadata=metadata)
    read = read_stitching_file(tmp_path / "stitching.safetensors")
    assert list(read) == [(1, 2), (2, 4)] and all(torch.equal(read[p], weights[p]) for p in weights)
    module = stitching_from_file(tmp_path / "stitching.safetensors")
    assert module.pairs == [(1, 2), (2, 4)]
    assert all(torch.equal(proj.weight, weights[p]) for p, proj in zip(module.pairs, module.projections))
    later = Stitching([(1, 2), (2, 3), (2, 4)], student_width=4, teacher_width=6)
    narrower = Stitching([(1, 2)], student_width=3, teacher_width=6)
    assert later.start_from(read) == [(1, 2), (2, 4)]  # (2, 3) is new: it keeps its own start
    assert torch.equal(later.projections[2].weight, weights[(2, 4)])
    assert narrower.start_from(read) == [] and not torch.equal(narrower.projections[0].weight[:, :3], weights[(1, 2)][:, :3])


def test_the_projected_teacher_head_is_w_t_p_in_at_least_float32():
    from onpolicy_kd.objectives.hidden import projected_teacher_head

    g = torch.Generator().manual_seed(1)
    head, projection = torch.randn(7, 6, generator=g), torch.randn(6, 4, generator=g)
    got = projected_teacher_head(head.to(torch.bfloat16), projection)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, head.to(torch.bfloat16).float() @ projection)
    assert projected_teacher_head(head.double(), projection).dtype == torch.float64


def test_the_hidden_mode_has_no_distribution_loss():
    from onpolicy_kd.objectives.loss import no_loss

    batch = type("Batch", (), {"completion_mask": torch.ones(2, 3, dtype=torch.bool).to("meta")})()
    loss = no_loss(batch, None, None, None, None, {})
    assert loss.shape == () and loss.device.type == "meta"
