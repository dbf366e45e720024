"""Model loading: vocabulary check, layer-dropped students, pad/eos set-up, unreachable Hub."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from onpolicy_kd.recipe import StudentConfig
from onpolicy_kd.errors import ModelLoadError, VocabularyMismatchError
from onpolicy_kd.models.loading import (
    check_same_vocabulary, copy_with_layers, load_model, load_student, load_teacher, load_tokenizer,
)
from onpolicy_kd.recipe import TeacherConfig
from onpolicy_kd.train import main

from conftest import CORPUS, llama_config, save_tiny_llama, train_tokenizer, write_recipe


def test_tokenizer_prepared_for_generation(tiny_gpt2_dir):
    tok = load_tokenizer(str(tiny_gpt2_dir), "teacher.name_or_path")
    assert tok.padding_side == "left"
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"  # GPT-2 style: no pad token, so pad with EOS


def test_teacher_is_frozen_and_in_eval_mode(tiny_llama_dir):
    teacher, _ = load_teacher(TeacherConfig(name_or_path=str(tiny_llama_dir)))
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_vocabulary_mismatch_is_an_error(tmp_path, tiny_tokenizer, tiny_llama_dir):
    # Same size, different merges: ids differ even though len() agrees (sizes alone would not catch it).
    other = train_tokenizer([s.upper() for s in CORPUS], vocab_size=len(tiny_tokenizer))
    assert len(other) == len(tiny_tokenizer)
    with pytest.raises(VocabularyMismatchError, match="tokenizers differ.*map to different ids"):
        check_same_vocabulary(tiny_tokenizer, other)


def test_vocabulary_mismatch_through_the_cli(tmp_path, tiny_llama_dir, isolated_cache, capsys):
    other_tok = train_tokenizer([s.upper() for s in CORPUS], vocab_size=280)
    student_dir = save_tiny_llama(tmp_path / "student", other_tok, layers=2)
    data = tmp_path / "d.jsonl"
    data.write_text('{"article": "a b c", "highlights": "a"}\n' * 10)
    recipe = write_recipe(tmp_path / "r.yaml", f"""
        teacher:
          name_or_path: {tiny_llama_dir}
        student:
          name_or_path: {student_dir}
        data:
          path: {data}
    """)
    assert main([str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "teacher and student tokenizers differ" in err and "Traceback" not in err


def test_padded_embedding_rows_are_fine(tmp_path, tiny_tokenizer, tiny_llama_dir):
    padded = save_tiny_llama(tmp_path / "padded", tiny_tokenizer, layers=2, extra_rows=64)  # as Qwen 151,936 vs 152,064
    teacher = load_model(str(tiny_llama_dir), "teacher.name_or_path")
    student = load_model(str(padded), "student.name_or_path")
    assert student.get_input_embeddings().num_embeddings == len(tiny_tokenizer) + 64
    check_same_vocabulary(tiny_tokenizer, load_tokenizer(str(padded), "student.name_or_path"), teacher, student)


def test_copy_with_all_layers_is_the_teacher(tiny_llama_dir):
    teacher = load_model(str(tiny_llama_dir), "teacher.name_or_path")
    student = copy_with_layers(teacher, list(range(teacher.config.num_hidden_layers)))
    ids = torch.randint(0, teacher.config.vocab_size, (2, 11))
    torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=0)


def test_layer_dropped_student(tiny_llama_dir, tiny_tokenizer):
    teacher = load_model(str(tiny_llama_dir), "teacher.name_or_path")
    student, tok = load_student(StudentConfig(init="teacher_layers", layer_stride=3), teacher, tiny_tokenizer)
    assert tok is tiny_tokenizer
    assert student.config.num_hidden_layers == 2  # layers 0 and 3 of 4
    for new, old in enumerate([0, 3]):
        for (name, p_s), (_, p_t) in zip(student.model.layers[new].named_parameters(), teacher.model.layers[old].named_parameters()):
            assert torch.equal(p_s, p_t), name
        assert student.model.layers[new].self_attn.layer_idx == new  # KV-cache slots re-numbered
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    # Cached decoding equals uncached: the re-numbered layer_idx addresses the right cache slots.
    prompt = torch.tensor([[5, 6, 7, 8]])
    cached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_bad_keep_layers(tiny_llama_dir):
    teacher = load_model(str(tiny_llama_dir), "teacher.name_or_path")
    with pytest.raises(ModelLoadError, match=r"distinct layer ids in \[0, 3\]"):
        copy_with_layers(teacher, [0, 7])


def test_student_from_config_is_seeded(tiny_llama_dir, tiny_tokenizer):
    teacher = load_model(str(tiny_llama_dir), "teacher.name_or_path")
    cfg = StudentConfig(init="config", config_overrides={"num_hidden_layers": 1})
    a, _ = load_student(cfg, teacher, tiny_tokenizer, seed=3)
    b, _ = load_student(cfg, teacher, tiny_tokenizer, seed=3)
    assert a.config.num_hidden_layers == 1
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(ModelLoadError, match="has no field 'num_layerz'"):
        load_student(StudentConfig(init="config", config_overrides={"num_layerz": 1}), teacher, tiny_tokenizer)


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelLoadError, match="local path does not exist"):
        load_model(str(tmp_path / "nothing"), "teacher.name_or_path")


def test_unreachable_hub_fails_fast_with_instructions():
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as excinfo:
        load_model("onpolicy-kd-test/no-such-model", "student.name_or_path", recipe_path="r.yaml")
    message = str(excinfo.value)
    assert "'onpolicy-kd-test/no-such-model'" in message and "student.name_or_path" in message
    assert "student.name_or_path=/models/no-such-model" in message  # says how to point at a local copy
    assert time.perf_counter() - started < 30


@pytest.mark.slow
def test_gpt2_cnn_recipe_offline_stops_within_a_minute():
    """Acceptance: `accelerate launch -m onpolicy_kd.train recipes/gpt2_cnn.yaml` with no Hub."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "onpolicy_kd.train", "recipes/gpt2_cnn.yaml"],
        capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode != 0
    assert "cannot load the teacher model 'gpt2-medium' (teacher.name_or_path in recipes/gpt2_cnn.yaml)" in proc.stderr
    assert "teacher.name_or_path=/models/gpt2-medium" in proc.stderr
    assert elapsed < 60, elapsed


def test_logits_are_linear_only_for_a_plain_head(tiny_tokenizer):
    """The memory-bounded divergence projects hidden states with the head's weight: it is used only when that is
    exactly what the model computes (no soft-capping, logit scaling or head bias)."""
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GPT2Config

    from onpolicy_kd.models.loading import logits_are_linear

    small = dict(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    build = AutoModelForCausalLM.from_config
    assert logits_are_linear(build(llama_config(len(tiny_tokenizer), layers=1)))
    assert logits_are_linear(build(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)))
    assert not logits_are_linear(build(Gemma2Config(**small, final_logit_softcapping=30.0)))
    assert logits_are_linear(build(Gemma2Config(**small, final_logit_softcapping=None)))
    assert not logits_are_linear(build(CohereConfig(**small, logit_scale=0.0625)))
    biased = build(llama_config(len(tiny_tokenizer), layers=1))
    biased.lm_head = torch.nn.Linear(32, len(tiny_tokenizer), bias=True)
    assert not logits_are_linear(biased)


# --- which layers a layer-dropped student keeps (models/pruning.py, onpolicy-kd prune) ---------------------------


def _pruning_setup(tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from onpolicy_kd.batch import Completions, left_pad, right_pad

    torch.manual_seed(3)
    teacher = AutoModelForCausalLM.from_config(llama_config(len(tiny_tokenizer), layers=5)).eval()
    prompts = [tiny_tokenizer(t).input_ids for t in ["The quick brown fox jumps", "Hello world", "A bushfire near"]]
    ids, mask = left_pad(prompts, 0)
    completion_ids, completion_mask = right_pad([[5, 6, 7], [8], [9, 10]], 0)
    return teacher, Completions(ids, mask, completion_ids, completion_mask, source="teacher", texts=["", "", ""])


def _naive_kl(teacher, batch, keep):
    """KL(p || q) with a real copy of the kept layers, float64, one real position at a time."""
    from onpolicy_kd.models.loading import copy_with_layers

    student = copy_with_layers(teacher, keep).eval()
    total, count = 0.0, 0
    for b in range(len(batch.texts)):
        real = batch.attention_mask[b].bool()
        ids = batch.sequences[b][real].unsqueeze(0)
        with torch.no_grad():
            p = teacher(ids).logits[0].double().log_softmax(-1)
            q = student(ids).logits[0].double().log_softmax(-1)
        for j in range(ids.shape[1] - 1):
            total, count = total + float((p[j].exp() * (p[j] - q[j])).sum()), count + 1
    return total / count


def test_layer_subset_kl_equals_a_real_copy_and_restores_the_model(tiny_tokenizer):
    from onpolicy_kd.models.pruning import layer_subset_kl

    teacher, batch = _pruning_setup(tiny_tokenizer)
    before = teacher(input_ids=batch.sequences, attention_mask=batch.attention_mask).logits
    for keep in ([0, 2, 4], [1, 3], [0, 1, 2, 3]):
        assert layer_subset_kl(teacher, batch, keep) == pytest.approx(_naive_kl(teacher, batch, keep), rel=1e-4)
    assert layer_subset_kl(teacher, batch, list(range(5))) == pytest.approx(0.0, abs=1e-6)
    assert teacher.config.num_hidden_layers == 5 and len(teacher.model.layers) == 5
    after = teacher(input_ids=batch.sequences, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(after, before)


def test_greedy_removal_drops_the_cheapest_layer_each_round(tiny_tokenizer):
    from onpolicy_kd.models.pruning import block_influence, greedy_removal, most_influential

    teacher, batch = _pruning_setup(tiny_tokenizer)
    kept, kl = greedy_removal(teacher, batch, keep=3)
    # the reference: the same rounds, each candidate scored with a real copy
    reference = list(range(5))
    while len(reference) > 3:
        scores = {i: _naive_kl(teacher, batch, [j for j in reference if j != i]) for i in reference}
        reference.remove(min(scores, key=scores.get))
    assert kept == reference and kl == pytest.approx(_naive_kl(teacher, batch, kept), rel=1e-4)
    influence = block_influence(teacher, batch)
    assert len(influence) == 5 and all(0 <= v <= 2 for v in influence)
    assert most_influential([0.1, 0.5, 0.2, 0.9, 0.3], 3) == [1, 3, 4]


def test_prune_command_prints_the_choices_and_the_recipe_line(tiny_recipe, capsys):
    from onpolicy_kd.cli import main

    assert main(["prune", str(tiny_recipe), "--keep", "2", "--samples", "3"]) == 0
    out = capsys.readouterr().out
    for choice in ("block influence", "evenly spaced", "greedy removal by KL", "keep_layers: ["):
        assert choice in out
    assert main(["prune", str(tiny_recipe), "--keep", "9"]) == 2
    assert "the teacher has 4 decoder layers" in capsys.readouterr().err
