"""Distillation across two tokenizers (objective.cross_tokenizer) end to end on tiny models: the batch re-tokenised
for the other model lines up span by span, the vocabulary check refuses a mismatch unless the recipe asks for a
cross-tokenizer objective, and a student with its own tokenizer trains on teacher text and its own samples, its
held-out cross-tokenizer loss falling."""

from __future__ import annotations

import pytest
import torch

from onpolicy_kd.batch import Completions, left_pad, right_pad
from onpolicy_kd.data.retokenize import char_ends, pair_for_student
from onpolicy_kd.errors import UserError
from onpolicy_kd.train import main

from conftest import CORPUS, save_tiny_llama, train_tokenizer
from test_train import metrics_of, recipe_for


def tokenizer_of_its_own(vocab_size: int):
    """A byte-level BPE smaller than the teacher's (300), its special tokens in another order (so its EOS and pad ids
    are not the teacher's), trained on text with accents and dashes (so some characters are split into byte pieces
    by one side and not the other)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|assistant|>", "<|user|>", "<|endoftext|>"]
    tok.train_from_iterator(CORPUS + ["café – résumé naïve"] * 30, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return fast


@pytest.fixture(scope="module")
def own_tokenizer_student(tmp_path_factory):
    """A student folder with a tokenizer of its own: it splits words differently from the teacher's."""
    tokenizer = tokenizer_of_its_own(285)
    assert tokenizer.eos_token_id != 0  # the teacher's EOS (and pad) id is 0
    return save_tiny_llama(tmp_path_factory.mktemp("own_tok") / "student", tokenizer, layers=2, hidden=32, seed=3), tokenizer


def test_char_ends_measure_a_sides_own_tokens_and_its_eos():
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    ids = tokenizer("The quick fox.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ends = char_ends(tokenizer, ids)
    assert ends[-2] == len("The quick fox.") and ends[-1] == ends[-2] + 1
    assert ends == sorted(ends)
    for i in range(len(ids) - 1):
        assert len(tokenizer.decode(ids[: i + 1])) == ends[i]


def test_a_batch_in_the_other_tokens_lines_up_span_by_span(far_pair, own_tokenizer_student):
    from transformers import AutoTokenizer

    from onpolicy_kd.models.loading import prepare_tokenizer_for_generation

    teacher_tok = AutoTokenizer.from_pretrained(far_pair[0])
    student_tok = AutoTokenizer.from_pretrained(own_tokenizer_student[0])
    for tokenizer in (teacher_tok, student_tok):  # (as training loads them: a pad token)
        prepare_tokenizer_for_generation(tokenizer)
    texts = ["markets rose today as investors cheered the news", "the sky is blue", "a café – naïve résumé"]
    ended = [True, False, True]
    rows = [teacher_tok(t, add_special_tokens=False)["input_ids"] + ([teacher_tok.eos_token_id] if e else [])
            for t, e in zip(texts, ended)]
    prompts = ["Summary: the news.", "Context: the sky.", "Instruction: the café."]
    p_ids, p_mask = left_pad([teacher_tok(p, add_special_tokens=False)["input_ids"] for p in prompts], 0)
    ids, mask = right_pad(rows, 0)
    batch = Completions(p_ids, p_mask, ids, mask, source="teacher", texts=texts, rows=[0, 1, 2])
    paired = pair_for_student(batch, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok,
                              student_prompts=[student_tok(p, add_special_tokens=False)["input_ids"] for p in prompts],
                              teacher_prompts=[teacher_tok(p, add_special_tokens=False)["input_ids"] for p in prompts])
    assert paired.teacher_view is batch and paired.source == "teacher"
    for b in range(3):
        s_ids = paired.completion_ids[b][paired.completion_mask[b]].tolist()
        t_ids = rows[b]
        assert (s_ids[-1] == student_tok.eos_token_id) == ended[b]
        assert student_tok.decode(s_ids, skip_special_tokens=True) == texts[b]
        spans = paired.spans[b]
        assert spans[0][0] == spans[0][2] == 0 and spans[-1][1] == len(s_ids) and spans[-1][3] == len(t_ids)
        for s0, s1, t0, t1 in spans:  # each span is the same text on both sides
            assert student_tok.decode(s_ids[s0:s1], skip_special_tokens=True) == teacher_tok.decode(
                t_ids[t0:t1], skip_special_tokens=True)
        if ended[b]:  # the two EOS tokens are a span of their own
            assert spans[-1] == (len(s_ids) - 1, len(s_ids), len(t_ids) - 1, len(t_ids))
    assert any(s1 - s0 != t1 - t0 for row in paired.spans for s0, s1, t0, t1 in row)  # the tokenizers differ
    # the accents and the dash: the teacher (trained without them) writes them in byte pieces, the student whole
    t_pieces = [teacher_tok.decode([t]) for t in rows[2]]
    assert any("\ufffd" in piece for piece in t_pieces)


def cross_run(tmp_path, far_pair, student_dir, vocab: int, *extra: str) -> list[str]:
    return [str(recipe_for(tmp_path, far_pair, "gkd")), "student.init=config", f"student.name_or_path={student_dir}",
            f"student.tokenizer={student_dir}", f"student.config_overrides={{num_hidden_layers: 2, vocab_size: {vocab}}}",
            "train.batch_size=2", "eval.max_samples=4", *extra]


def test_a_different_tokenizer_is_refused_unless_the_recipe_asks_for_a_cross_tokenizer_objective(
        tmp_path, far_pair, own_tokenizer_student, capsys):
    student_dir, tokenizer = own_tokenizer_student
    assert main(cross_run(tmp_path, far_pair, student_dir, len(tokenizer), "objective.lmbda=0.0",
                          "objective.seq_kd=true", "teacher_text.cache=true", "train.max_steps=1")) == 2
    assert "objective.cross_tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["spans", "uld"])
def test_a_student_with_its_own_tokenizer_learns_from_teacher_text_and_its_own_samples(
        how, tmp_path, far_pair, own_tokenizer_student, isolated_cache):
    student_dir, tokenizer = own_tokenizer_student
    keys = [f"objective.cross_tokenizer={how}", "objective.seq_kd=true", "objective.lmbda=0.5",
            "teacher_text.cache=true", "rollout.do_sample=true", "train.max_steps=16", "optim.lr=1e-2",
            *(["objective.divergence=forward_kl"] if how == "spans" else [])]
    assert main(cross_run(tmp_path, far_pair, student_dir, len(tokenizer), *keys)) == 0
    rows = metrics_of(tmp_path / "out")
    steps = [r for r in rows if "train/loss" in r]
    assert {r["data/on_policy"] for r in steps} == {0.0, 1.0}  # both kinds of step ran
    if how == "spans":  # spans of one token on both sides, and spans split differently, both occur
        assert all(0 < r["cross/one_token_share"] < 1 for r in steps)
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in steps)
    evals = [r["eval/cross_loss"] for r in rows if "eval/cross_loss" in r]
    assert len(evals) == 2 and evals[1] < 0.9 * evals[0]  # the held-out loss falls
    final = tmp_path / "out" / "final"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(final).get_vocab() == tokenizer.get_vocab()  # its own tokenizer exported


@pytest.mark.parametrize("overrides, message", [
    (["objective.mode=pg"], "objective.mode=pg"),
    (["rollout.alpha=0.2", "objective.lmbda=1.0"], "rollout.alpha"),
    (["teacher_text.cache=true", "teacher_text.topk=5", "objective.seq_kd=true", "objective.lmbda=0"], "teacher_text.topk"),
    (["objective.divergence=logit_mse"], "logit_mse"),
    (["objective.seq_kd=true", "objective.lmbda=0.5"], "teacher_text.cache"),
])
def test_what_cannot_cross_tokenizers_is_refused(overrides, message, tmp_path, far_pair, own_tokenizer_student):
    from onpolicy_kd.recipe import load_recipe

    student_dir, tokenizer = own_tokenizer_student
    argv = cross_run(tmp_path, far_pair, student_dir, len(tokenizer), "objective.cross_tokenizer=spans", *overrides)
    with pytest.raises(UserError, match=message):
        load_recipe(argv[0], argv[1:])
