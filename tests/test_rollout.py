"""The rollout engine: masks, recorded log-probs, greedy equivalence with `generate`, the sampled mixture."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from onpolicy_kd.objectives.divergences import log_probs
from onpolicy_kd.batch import left_pad
from onpolicy_kd.rollout.engine import filter_logprobs, rollout

from conftest import CORPUS, llama_config, train_tokenizer


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer(CORPUS)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"  # GPT-2 style: pad == eos
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(llama_config(len(tok), layers=2)).eval()
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(llama_config(len(tok), layers=3, hidden=48)).eval()
    with torch.no_grad():  # random-init heads give near-uniform distributions: sharpen them so the models differ
        student.lm_head.weight *= 30
        teacher.lm_head.weight *= 30
    prompts = [tok(x).input_ids for x in ["Hello world", "The quick brown fox jumps over the lazy", "A"]]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    return tok, student, teacher, prompts, ids, mask


def greedy(setup, **kw):
    tok, student, teacher, _, ids, mask = setup
    return rollout(student, teacher, ids, mask, tokenizer=tok, max_new_tokens=8, do_sample=False, **kw)


def test_masks_eos_kept_and_everything_after_masked(setup):
    tok, *_ = setup
    free = greedy(setup)
    assert free.completion_mask.all()  # no EOS at all: every position valid, up to max_new_tokens
    eos = int(free.completion_ids[0, 2])  # make row 0's third token the EOS
    out = greedy(setup, eos_token_ids=[eos])
    row0 = out.completion_mask[0].tolist()
    assert row0 == [True, True, True] + [False] * 5  # EOS kept, everything after it masked
    assert (out.completion_ids[0, 3:] == tok.pad_token_id).all()
    for b in range(3):  # the other rows end at their own first occurrence of that token, or never
        hits = (free.completion_ids[b] == eos).nonzero()
        expected = int(hits[0]) + 1 if len(hits) else 8
        assert int(out.lengths[b]) == expected
    # The prompt is never part of the completion mask; the joint attention mask keeps the left padding.
    assert out.attention_mask.shape[1] == out.prompt_ids.shape[1] + 8
    assert out.attention_mask[2, 0] == 0  # "A" is the shortest prompt: left-padded


def test_pad_equal_to_eos(setup):
    """When the model emits the pad/EOS id, that token counts (mask 1) and only what follows is padding."""
    tok, *_ = setup
    free = greedy(setup)
    eos = int(free.completion_ids[1, 4])
    out = greedy(setup, eos_token_ids=[eos])
    assert int(out.lengths[1]) <= 5 and out.completion_mask[1, int(out.lengths[1]) - 1]
    assert out.completion_ids[1, int(out.lengths[1]) - 1] == eos


def test_batch_equals_each_prompt_alone(setup):
    tok, student, teacher, prompts, ids, mask = setup
    batch = greedy(setup)
    for i, p in enumerate(prompts):
        alone_ids, alone_mask = left_pad([p], tok.pad_token_id)
        alone = rollout(student, teacher, alone_ids, alone_mask, tokenizer=tok, max_new_tokens=8, do_sample=False)
        assert torch.equal(alone.completion_ids[0], batch.completion_ids[i])


@pytest.mark.parametrize("alpha, model", [(0.0, "student"), (1.0, "teacher")])
def test_greedy_reproduces_generate(setup, alpha, model):
    tok, student, teacher, _, ids, mask = setup
    out = greedy(setup, alpha=alpha)
    reference = (student if model == "student" else teacher).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
        eos_token_id=None)
    assert torch.equal(out.completion_ids, reference[:, ids.shape[1]:])


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_recorded_logprobs_equal_a_fresh_forward_pass(setup, alpha):
    tok, student, teacher, _, ids, mask = setup
    temperature = 0.8
    out = rollout(student, teacher, ids, mask, tokenizer=tok, max_new_tokens=10, alpha=alpha, temperature=temperature,
                  generator=torch.Generator().manual_seed(3))
    seq, att = out.sequences, torch.cat([mask, torch.ones_like(out.completion_ids)], 1)
    positions = (att.cumsum(-1) - 1).clamp_min(0)
    T = out.completion_ids.shape[1]
    fresh = {}
    for name, model in (("student", student), ("teacher", teacher)):
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=att, position_ids=positions).logits[:, -T - 1 : -1]
        fresh[name] = log_probs(logits, temperature).gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1)
    valid = out.completion_mask
    torch.testing.assert_close(out.student_logprobs[valid], fresh["student"][valid], rtol=0, atol=1e-5)
    if alpha > 0:  # lockstep decoding records the teacher's log-probs; alone, the student records none
        torch.testing.assert_close(out.teacher_logprobs[valid], fresh["teacher"][valid], rtol=0, atol=1e-5)
    else:
        assert out.teacher_logprobs is None
    entropy = -(log_probs_of(student, seq, att, positions, T, temperature))
    torch.testing.assert_close(out.student_entropy[valid], entropy[valid], rtol=0, atol=1e-5)
    mixture = torch.log(alpha * fresh["teacher"].exp() + (1 - alpha) * fresh["student"].exp())
    torch.testing.assert_close(out.sample_logprobs[valid], mixture[valid], rtol=0, atol=1e-5)
    assert (out.student_logprobs[~valid] == 0).all()


@torch.no_grad()
def log_probs_of(model, seq, att, positions, T, temperature):
    """sum_v q log q at each completion position (minus the entropy), from a fresh forward pass."""
    logq = log_probs(model(input_ids=seq, attention_mask=att, position_ids=positions).logits[:, -T - 1 : -1], temperature)
    return (logq.exp() * logq).sum(-1)


@torch.no_grad()
def _first_token_distribution(setup, alpha, temperature, top_k=0, top_p=1.0):
    tok, student, teacher, prompts, *_ = setup
    ids, mask = left_pad([prompts[0]], tok.pad_token_id)
    q = log_probs(student(input_ids=ids).logits[0, -1], temperature)
    p = log_probs(teacher(input_ids=ids).logits[0, -1], temperature)
    mix = torch.log(alpha * p.exp() + (1 - alpha) * q.exp())
    return filter_logprobs(mix.unsqueeze(0), top_k, top_p)[0].exp(), q.exp(), ids, mask


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (8, 1.0), (0, 0.5)])
def test_sampled_token_frequencies_match_the_mixture(setup, top_k, top_p):
    """40,000 first-token draws from alpha = 0.4, temperature 1.3: empirical frequencies within 5 standard errors
    of the intended (filtered) mixture at every token, and far from the student's own distribution."""
    tok, student, teacher, *_ = setup
    alpha, temperature, n = 0.4, 1.3, 40_000
    target, student_probs, ids, mask = _first_token_distribution(setup, alpha, temperature, top_k, top_p)
    out = rollout(student, teacher, ids.expand(n, -1), mask.expand(n, -1), tokenizer=tok, max_new_tokens=1,
                  alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p,
                  generator=torch.Generator().manual_seed(0), eos_token_ids=[])
    freq = torch.bincount(out.completion_ids[:, 0], minlength=target.shape[0]).float() / n
    stderr = (target * (1 - target) / n).sqrt()
    assert ((freq - target).abs() <= 5 * stderr + 1e-4).all()
    assert (freq[target == 0] == 0).all()  # filtered tokens are never drawn
    assert 0.5 * (freq - target).abs().sum() < 0.5 * (freq - student_probs).abs().sum() / 4


def test_filter_logprobs_against_naive():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(5, 50, generator=g) * 2, -1)
    out = filter_logprobs(lp, top_k=7, top_p=0.6)
    for row, filtered in zip(lp, out):
        probs = row.exp()
        keep = set(torch.topk(probs, 7).indices.tolist())
        order = [i for i in torch.argsort(probs, descending=True).tolist() if i in keep]
        renorm = probs[order] / probs[order].sum()
        kept, mass = [], 0.0
        for i, pr in zip(order, renorm.tolist()):
            if mass >= 0.6:
                break
            kept.append(i)
            mass += pr
        expected = torch.zeros_like(probs)
        expected[kept] = probs[kept] / probs[kept].sum()
        torch.testing.assert_close(filtered.exp(), expected, atol=1e-6, rtol=1e-5)
    assert math.isclose(float(out.exp().sum(-1)[0]), 1.0, rel_tol=1e-5)


def test_stop_strings_end_a_row(setup):
    tok, student, teacher, _, ids, mask = setup
    free = greedy(setup)
    stop = tok.decode(free.completion_ids[0, 2:4])  # text the first row produces at steps 3-4
    out = greedy(setup, stop_strings=[stop])
    assert int(out.lengths[0]) <= 4 and stop in tok.decode(out.completion_ids[0, : int(out.lengths[0])])


def test_reproducible_with_a_seed(setup):
    tok, student, teacher, _, ids, mask = setup
    runs = [rollout(student, teacher, ids, mask, tokenizer=tok, max_new_tokens=6, alpha=0.2,
                    generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert runs[0].texts == runs[1].texts


def test_student_left_in_train_mode(setup):
    tok, student, teacher, _, ids, mask = setup
    student.train()
    rollout(student, teacher, ids, mask, tokenizer=tok, max_new_tokens=2)
    assert student.training  # eval mode only while sampling
    student.eval()


def test_stop_strings_watch_only_open_rows_and_see_special_tokens(tiny_tokenizer):
    """A row that ended this step (EOS) or earlier is not reported again; a stop string that is a special token
    (a chat template's turn marker) is seen in the decoded tail."""
    from onpolicy_kd.rollout.engine import _StopStrings

    user = tiny_tokenizer.convert_tokens_to_ids("<|user|>")
    stops = _StopStrings(tiny_tokenizer, ["<|user|>"], batch_size=3)
    step = torch.tensor([user, user, user])
    finished = torch.tensor([False, False, True])  # row 2 ended before this step
    ended = torch.tensor([False, True, True])  # row 1 wrote its EOS-like end this step
    assert stops.update(step, finished, ended).tolist() == [True, False, False]
    assert stops.rows == [[user], [user], []]
