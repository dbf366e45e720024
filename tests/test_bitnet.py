"""BitNet b1.58 students: the quantisers against float64 references, the straight-through gradient against its
formula, training that lowers the held-out KL, and an export whose weights are ternary and reload exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from onpolicy_kd.errors import ConfigError
from onpolicy_kd.models.bitnet import BitLinear, quantize_activations, ternary_weight, to_bitnet
from onpolicy_kd.models.loading import decoder_layers, load_model
from onpolicy_kd.recipe import load_recipe
from onpolicy_kd import distill

from test_train import metrics_of, recipe_for


def test_quantizers_match_float64_references():
    torch.manual_seed(0)
    w = torch.randn(6, 10, dtype=torch.float64)
    gamma = sum(abs(v) for v in w.flatten().tolist()) / w.numel()
    expected = torch.tensor([[max(-1, min(1, round(v / gamma))) * gamma for v in row] for row in w.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(ternary_weight(w), expected, rtol=1e-12, atol=1e-12)
    assert set((ternary_weight(w) / gamma).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    x = torch.randn(3, 4, 10, dtype=torch.float64) * 5
    m = x.abs().amax(-1, keepdim=True)
    expected_x = torch.tensor([[[max(-128, min(127, round(v * 127 / mx))) * mx / 127 for v in row]
                                for row, mx in zip(batch, maxes.flatten().tolist())]
                               for batch, maxes in zip(x.tolist(), m)], dtype=torch.float64)
    torch.testing.assert_close(quantize_activations(x), expected_x, rtol=1e-12, atol=1e-12)
    assert ((quantize_activations(x) * 127 / m).round() - quantize_activations(x) * 127 / m).abs().max() < 1e-9


def test_straight_through_gradient_equals_the_formula():
    """dL/dW = dL/dW_q = g^T x_q, dL/dx = dL/dx_q = g W_q, dL/db = sum g: the quantisers pass gradients straight
    through (float64)."""
    torch.manual_seed(1)
    layer = torch.nn.Linear(10, 6, dtype=torch.float64)
    layer.__class__ = BitLinear
    x = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 6, dtype=torch.float64)
    y = layer(x)
    (y * g).sum().backward()
    w_q, x_q = ternary_weight(layer.weight.detach()), quantize_activations(x.detach())
    torch.testing.assert_close(y, torch.nn.functional.linear(x_q, w_q, layer.bias.detach()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, g.reshape(-1, 6).T @ x_q.reshape(-1, 10), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, g @ w_q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 1)), rtol=1e-12, atol=1e-12)


def test_bitnet_student_trains_and_exports_ternary_weights(tmp_path, far_pair, isolated_cache, capsys):
    path = recipe_for(tmp_path, far_pair, "gkd")
    result = distill(path, "student.bitnet=true", "train.max_steps=30", "eval.eval_steps=15", "optim.lr=1.0e-2",
                     "train.batch_size=8")
    assert "BitNet b1.58: 14 ternary Linear layers" in capsys.readouterr().out  # 2 layers x 7 linears
    evals = [r["eval/reverse_kl"] for r in metrics_of(tmp_path / "out") if "eval/reverse_kl" in r]
    assert evals[-1] < 0.95 * evals[0], evals
    final = result.final_dir
    listed = json.loads((final / "bitnet.json").read_text())["layers"]
    assert len(listed) == 14 and not any("lm_head" in name or "embed" in name for name in listed)
    plain = AutoModelForCausalLM.from_pretrained(final).eval()  # loads as a dense transformers model
    for name in listed:  # ternary: one magnitude per matrix
        weight = plain.get_submodule(name).weight.detach()
        magnitudes = weight.abs()[weight != 0]
        torch.testing.assert_close(magnitudes, magnitudes.new_full(magnitudes.shape, magnitudes[0].item()))
    assert plain.lm_head.weight.abs().unique().numel() > 3  # the head stays full precision
    # the project's loader wraps the layers again and computes what the trained student computes
    reloaded = load_model(str(final), "student").eval()
    assert all(isinstance(reloaded.get_submodule(name), BitLinear) for name in listed)
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    with torch.no_grad():
        exact = result.student.eval()(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, exact, rtol=0, atol=1e-5)
        assert (plain(ids).logits - exact).abs().max() > 1e-4  # float activations: not the trained function


def test_bitnet_settings_that_cannot_work_are_errors(tmp_path, tiny_gpt2_dir, far_pair):
    with pytest.raises(ConfigError, match="student.bitnet .* student.lora .* use one of the two"):
        load_recipe(recipe_for(tmp_path, far_pair, "gkd"), ["student.bitnet=true", "student.lora={r: 4}"])
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(ConfigError, match="no nn.Linear layers to make ternary"):
        to_bitnet(gpt2, *decoder_layers(gpt2))


def test_the_trained_forward_is_exactly_the_quantised_product():
    """In float32 the training forward equals F.linear(x_q, W_q) bit for bit, so the export (W_q written as it is)
    computes exactly the trained function: a straight-through sum x + (x_q - x) is x_q only up to a rounding,
    and the next layer's 8-bit quantiser can turn that rounding into a whole quantisation step."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256)
    layer.__class__ = BitLinear
    with torch.no_grad():  # rows of different scales: W + (W_q - W) misses W_q by a rounding at ~8% of the entries
        layer.weight.copy_(torch.randn(256, 256) * torch.rand(256, 1) * 0.1)
    x = torch.randn(8, 16, 256) * 3
    expected = torch.nn.functional.linear(quantize_activations(x), ternary_weight(layer.weight.detach()), layer.bias)
    assert torch.equal(layer(x), expected)
