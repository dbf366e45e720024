"""The quantised teacher: weight-only 8/4-bit codes against a float64 reference, the model's logits against full
precision, the student copied before the teacher is quantised, and clear errors where a kind cannot run."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from onpolicy_kd import distill
from onpolicy_kd.errors import ConfigError
from onpolicy_kd.models.loading import decoder_layers, load_models
from onpolicy_kd.models.quantization import WeightOnlyLinear, bitsandbytes_config, model_bytes, quantize_weight_only
from onpolicy_kd.recipe import load_recipe
from onpolicy_kd.rollout.teacher_cache import teacher_fingerprint

from test_api import ROWS, recipe_dict, teacher_and_tokenizer  # noqa: F401 (a fixture)


STUDENT = {"init": "teacher_layers", "keep_layers": [0]}
DATA = recipe_dict(__import__("pathlib").Path("unused"))["data"] | {"path": "unused.jsonl"}  # models only: the data is never read


def reference_dequantized(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric round-to-nearest, one scale per `group` inputs of a row, element by element in float64."""
    qmax = 2 ** (bits - 1) - 1
    w = weight.double()
    out = torch.empty_like(w)
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            block = w[row, start:start + group]
            scale = block.abs().max().item() / qmax
            out[row, start:start + group] = torch.tensor([round(x / scale) * scale for x in block.tolist()])
    return out


@pytest.mark.parametrize("bits, group", [(8, 16), (4, 4), (4, 16)])
def test_codes_and_scales_match_a_float64_reference(bits, group):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 6)
    linear.weight.data[2, 3] = 0.0  # an exact zero stays zero
    layer = WeightOnlyLinear(linear.weight, linear.bias, bits, group if bits == 4 else 0)
    expected = reference_dequantized(linear.weight.detach(), bits, 16 if bits == 8 else group)
    got = layer.dequantized_weight().double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert got[2, 3] == 0
    # within half a step of the float weight, and the storage is int8 / packed nibbles
    step = linear.weight.detach().abs().max() / (2 ** (bits - 1) - 1)
    assert (got - linear.weight.detach().double()).abs().max() <= step / 2 + 1e-7
    assert layer.codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert layer.codes.numel() == 16 * 6 // (8 // bits)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, expected.float(), linear.bias))


@pytest.mark.parametrize("bits, tolerance", [(8, 1e-4), (4, 2e-2)])
def test_quantized_teacher_logits_stay_close_to_full_precision(tiny_llama_dir, bits, tolerance):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    quantized = copy.deepcopy(teacher)
    count = quantize_weight_only(quantized, decoder_layers(quantized)[1], bits, 16)
    assert count == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 layers
    assert type(quantized.lm_head) is torch.nn.Linear and type(quantized.model.embed_tokens) is torch.nn.Embedding
    assert model_bytes(quantized) < 0.6 * model_bytes(teacher)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    with torch.no_grad():
        full, low = teacher(ids).logits.log_softmax(-1), quantized(ids).logits.log_softmax(-1)
    kl = (full.exp() * (full - low)).sum(-1).mean().item()
    assert 0 < kl < tolerance


def test_gpt2_conv1d_layers_are_quantized_too(tiny_gpt2_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    quantized = copy.deepcopy(teacher)
    assert quantize_weight_only(quantized, decoder_layers(quantized)[1], 8, 128) == 2 * 4  # c_attn, c_proj x2, c_fc
    ids = torch.randint(0, teacher.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids).logits, teacher(ids).logits, atol=5e-3, rtol=0)


def test_student_is_copied_from_the_float_teacher_then_the_teacher_is_quantized(tmp_path, tiny_llama_dir, isolated_cache):
    recipe = load_recipe(recipe_dict(tmp_path, teacher={
        "name_or_path": str(tiny_llama_dir), "quantization": {"bits": 4, "group_size": 16}},
        student={"init": "teacher_layers", "keep_layers": [0, 3]}, data=DATA))
    models = load_models(recipe)
    float_teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert isinstance(models.teacher.model.layers[3].mlp.down_proj, WeightOnlyLinear)
    torch.testing.assert_close(models.student.model.layers[1].mlp.down_proj.weight,
                               float_teacher.model.layers[3].mlp.down_proj.weight, rtol=0, atol=0)
    # the teacher-summary cache is keyed on the quantisation: a quantised teacher writes other text
    assert teacher_fingerprint(models.teacher) != teacher_fingerprint(float_teacher)


def test_training_with_a_quantized_teacher(tmp_path, teacher_and_tokenizer, isolated_cache, capsys):
    teacher, tokenizer = teacher_and_tokenizer
    result = distill(recipe_dict(tmp_path, teacher={"name_or_path": "given", "quantization": {"bits": 8}},
                                 student={"init": "config", "config_overrides": {"num_hidden_layers": 2}}),
                     teacher=teacher, tokenizer=tokenizer, train_data=ROWS)
    assert result.steps == 3 and result.after["eval/reverse_kl"] < result.before["eval/reverse_kl"]
    assert isinstance(teacher.model.layers[0].self_attn.q_proj, WeightOnlyLinear)
    assert "teacher float32 (8-bit weight-only decoder weights)" in capsys.readouterr().out


def test_kinds_that_cannot_run_here_are_clear_errors(tmp_path, tiny_llama_dir, isolated_cache):
    teacher = {"name_or_path": str(tiny_llama_dir), "quantization": {"bits": 4, "backend": "bitsandbytes"}}
    recipe = load_recipe(recipe_dict(tmp_path, teacher=teacher, student=STUDENT, data=DATA))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="backend=bitsandbytes needs a CUDA device.*backend: weight_only"):
            load_models(recipe)
    with pytest.raises(ConfigError, match="group_size applies to 4-bit weight_only"):
        load_recipe(recipe_dict(tmp_path, teacher={"name_or_path": "x", "quantization": {"bits": 8, "group_size": 64}},
                                student=STUDENT, data=DATA))
    bad = {"name_or_path": str(tiny_llama_dir), "quantization": {"bits": 4, "group_size": 24}}
    with pytest.raises(ConfigError, match="group_size=24 does not divide the 32 inputs"):
        load_models(load_recipe(recipe_dict(tmp_path, teacher=bad, student=STUDENT, data=DATA)))


def test_bitsandbytes_settings_passed_to_transformers():
    from onpolicy_kd.recipe.schema import QuantizationConfig

    eight = bitsandbytes_config(QuantizationConfig(bits=8), torch.float32)
    four = bitsandbytes_config(QuantizationConfig(bits=4), torch.bfloat16)
    assert eight.load_in_8bit and not eight.load_in_4bit
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_compute_dtype == torch.bfloat16
