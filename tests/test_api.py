"""The Python API: `distill()` with recipe files or dicts, model objects (custom classes too) and in-memory data."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from onpolicy_kd import TrainResult, distill
from onpolicy_kd.errors import ConfigError, DataError, ModelLoadError, VocabularyMismatchError
from onpolicy_kd.objectives.hidden import STITCHING

from test_train import metrics_of, recipe_for


class CustomConfig(LlamaConfig):
    model_type = "onpolicy-kd-test-custom"  # registered nowhere: only the object itself knows the class


class CustomLM(LlamaForCausalLM):
    """A user's own architecture: a subclass the Auto classes cannot build."""

    config_class = CustomConfig


def small_config(vocab: int, **changes) -> CustomConfig:
    base = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0,
                eos_token_id=0)
    return CustomConfig(**(base | changes))


ROWS = [{"prompt": f"Question {i}: what did the Greens win?", "completion": f" Seat {i}."} for i in range(24)]


def recipe_dict(tmp_path, **sections) -> dict:
    return {
        "objective": {"mode": "gkd"},
        "rollout": {"max_new_tokens": 6},
        "optim": {"lr": 3.0e-3},
        "train": {"max_steps": 3, "batch_size": 4, "seed": 5, "output_dir": str(tmp_path / "out")},
        "eval": {"max_samples": 4, "max_new_tokens": 6},
        "data": {"eval_size": 4, "max_prompt_tokens": 32, "max_response_tokens": 8},
        "logging": {"live": False},
    } | sections


@pytest.fixture
def teacher_and_tokenizer(far_pair):
    teacher_dir, _ = far_pair
    return AutoModelForCausalLM.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(teacher_dir)


def test_custom_student_object_in_memory_data(tmp_path, teacher_and_tokenizer, isolated_cache):
    teacher, tokenizer = teacher_and_tokenizer
    torch.manual_seed(0)
    student = CustomLM(small_config(len(tokenizer)))
    before = {k: v.clone() for k, v in student.state_dict().items()}

    result = distill(recipe_dict(tmp_path), teacher=teacher, student=student, tokenizer=tokenizer, train_data=ROWS)

    assert isinstance(result, TrainResult) and result.steps == 3 and result.stopped_by_signal is None
    assert result.student is student  # trained in place, returned as it was given
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    assert set(result.before) >= {"eval/reverse_kl"} and set(result.after) >= {"eval/reverse_kl"}
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen
    assert result.final_dir == tmp_path / "out" / "final"
    reloaded = CustomLM.from_pretrained(result.final_dir)
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, student.state_dict()[key])
    card = (result.final_dir / "README.md").read_text()
    # the card names the objects: the teacher's source folder, the fresh student's class
    assert "- student: `CustomLM`" in card and f"- teacher: `{teacher.name_or_path}`" in card
    steps = [r for r in metrics_of(tmp_path / "out") if "train/loss" in r]
    assert len(steps) == 3


def test_recipe_attention_implementation_applies_to_a_student_object(tmp_path, teacher_and_tokenizer, isolated_cache):
    teacher, tokenizer = teacher_and_tokenizer
    student = AutoModelForCausalLM.from_config(teacher.config)
    assert student.config._attn_implementation != "eager"
    result = distill(recipe_dict(tmp_path, student={"attn_implementation": "eager"}, train={
        "max_steps": 1, "batch_size": 2, "output_dir": str(tmp_path / "out")}),
        teacher=teacher, student=student, tokenizer=tokenizer, train_data=ROWS)
    assert result.student.config._attn_implementation == "eager"


def test_recipe_file_and_overrides_as_on_the_command_line(tmp_path, far_pair, isolated_cache):
    """A recipe file, an override, hidden-state distillation: the stitching comes back apart from the student."""
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    result = distill(recipe, "train.max_steps=2", "hidden.weight=0.5")
    assert result.steps == 2 and result.output_dir == tmp_path / "out"
    assert result.stitching is not None and [tuple(p) for p in result.stitching.pairs] == [(1, 2), (2, 3)]
    assert not hasattr(result.student, STITCHING)  # a plain transformers model again
    assert (result.final_dir / "stitching.safetensors").is_file()


def test_teacher_object_with_student_from_its_layers(tmp_path, teacher_and_tokenizer, isolated_cache):
    teacher, tokenizer = teacher_and_tokenizer
    recipe = recipe_dict(tmp_path, student={"init": "teacher_layers", "keep_layers": [0, 2]})
    result = distill(recipe, "train.max_steps=1", teacher=teacher, tokenizer=tokenizer, train_data={
        "document": [f"The Senate count {i} was finalised." for i in range(12)],
        "summary": [f"Count {i}." for i in range(12)],
    })
    assert result.student.config.num_hidden_layers == 2
    torch.testing.assert_close(result.student.model.embed_tokens.weight.shape, teacher.model.embed_tokens.weight.shape)


def test_bad_input_raises_the_command_lines_errors(tmp_path, teacher_and_tokenizer, isolated_cache):
    teacher, tokenizer = teacher_and_tokenizer
    student = CustomLM(small_config(len(tokenizer)))
    recipe = recipe_dict(tmp_path)
    with pytest.raises(ModelLoadError, match="needs its tokenizer"):
        distill(recipe, teacher=teacher, student=student, train_data=ROWS)
    with pytest.raises(ModelLoadError, match="must be a transformers PreTrainedModel"):
        distill(recipe, teacher=torch.nn.Linear(2, 2), student=student, tokenizer=tokenizer, train_data=ROWS)
    with pytest.raises(ConfigError, match=r"(?s)<recipe dict>.*train.max_stpes: unknown key.*did you mean 'train.max_steps'"):
        distill(recipe, "train.max_stpes=2", teacher=teacher, student=student, tokenizer=tokenizer, train_data=ROWS)
    with pytest.raises(DataError, match="train_data= must be"):
        distill(recipe, teacher=teacher, student=student, tokenizer=tokenizer, train_data="news.jsonl")
    with pytest.raises(DataError, match="eval_data= needs train_data="):
        distill(recipe, eval_data=ROWS)
    with pytest.raises(ConfigError, match="data.path: required key is missing"):
        distill(recipe, teacher=teacher, student=student, tokenizer=tokenizer)
    # a student whose vocabulary cannot hold the teacher's tokens
    with pytest.raises(VocabularyMismatchError, match="embedding rows"):
        distill(recipe, teacher=teacher, student=CustomLM(small_config(10)), tokenizer=tokenizer, train_data=ROWS)
