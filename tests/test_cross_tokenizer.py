"""Cross-tokenizer distillation's pure parts (objectives/cross_tokenizer.py) against float64 hand computations:
ULD's sorted-probability distance, the span alignment of two tokenizations (tokens split differently included), the
shared-vocabulary buckets and the span-probability KL."""

from __future__ import annotations

import math

import pytest
import torch

from onpolicy_kd.objectives.cross_tokenizer import (
    aligned_spans, shared_divergence, shared_vocabulary, span_binary_kl, span_sums, token_bytes, uld_distance,
)

from conftest import CORPUS, train_tokenizer


def test_uld_distance_and_gradient_against_a_float64_hand_computation():
    torch.manual_seed(0)
    student = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)  # a 5-token student vocabulary
    teacher = torch.randn(3, 8, dtype=torch.float64)  # an 8-token teacher vocabulary
    s_logprobs, t_logprobs = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    got = uld_distance(s_logprobs, t_logprobs)
    want = []
    for row in range(3):
        q = sorted((math.exp(float(x)) for x in s_logprobs[row].detach()), reverse=True) + [0.0] * 3
        p = sorted((math.exp(float(x)) for x in t_logprobs[row]), reverse=True)
        want.append(sum(abs(a - b) for a, b in zip(p, q)))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # the gradient flows to each sorted entry: d/dq_(r) = -sign(p_(r) - q_(r)), through the softmax
    (grad,) = torch.autograd.grad(got.sum(), student)
    q = torch.softmax(student.detach(), -1)
    p = torch.softmax(teacher, -1)
    d_q = torch.zeros_like(q)
    for row in range(3):
        order = q[row].argsort(descending=True)
        p_sorted = torch.cat([p[row].sort(descending=True).values[:5]])
        d_q[row, order] = -torch.sign(p_sorted - q[row, order])
    want_grad = q * (d_q - (d_q * q).sum(-1, keepdim=True))  # the softmax's Jacobian
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_uld_is_zero_for_a_relabelled_vocabulary():
    """It sees only the sorted shape: a permutation of the teacher's vocabulary is the same distribution to it."""
    logprobs = torch.log_softmax(torch.randn(2, 6, dtype=torch.float64), -1)
    assert uld_distance(logprobs, logprobs[:, torch.randperm(6)]).abs().max() < 1e-15


@pytest.mark.parametrize("student, teacher, spans", [
    # the same split: every token its own span
    ([3, 7, 12], [3, 7, 12], [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3)]),
    # "unbelievable news": un|believ|able| news against unbel|ievable| ne|ws
    ([2, 8, 12, 17], [5, 12, 15, 17], [(0, 3, 0, 2), (3, 4, 2, 4)]),
    # one side splits a word the other keeps whole, then they agree again
    ([4, 9, 10], [2, 4, 9, 10], [(0, 1, 0, 2), (1, 2, 2, 3), (2, 3, 3, 4)]),
    # two byte-pieces of one character (both end at 5) stay together
    ([3, 5, 5, 9], [3, 5, 9], [(0, 1, 0, 1), (1, 3, 1, 2), (3, 4, 2, 3)]),
    # the teacher's text goes on past the student's last end: those tokens are in no span
    ([3, 6], [3, 8, 10], [(0, 1, 0, 1)]),
    ([], [1, 2], []),
])
def test_aligned_spans_by_hand(student, teacher, spans):
    assert aligned_spans(student, teacher) == spans


def test_spans_of_two_real_tokenizations_cover_the_same_text():
    """Two BPE tokenizers trained to different sizes split the same text differently; every span is the same
    characters on both sides, and the spans cover both tokenizations whole."""
    small, large = train_tokenizer(CORPUS, vocab_size=280), train_tokenizer(CORPUS, vocab_size=600)
    text = "The Greens won the Senate seat after a count in the bushfire-hit town of Wollongong."
    a = small(text, return_offsets_mapping=True, add_special_tokens=False)
    b = large(text, return_offsets_mapping=True, add_special_tokens=False)
    assert len(a["input_ids"]) != len(b["input_ids"])
    spans = aligned_spans([end for _, end in a["offset_mapping"]], [end for _, end in b["offset_mapping"]])
    assert spans[0][0] == spans[0][2] == 0 and spans[-1][1] == len(a["input_ids"]) and spans[-1][3] == len(b["input_ids"])
    assert any(s1 - s0 != t1 - t0 for s0, s1, t0, t1 in spans)  # some span is split differently
    assert any(s1 - s0 == t1 - t0 == 1 for s0, s1, t0, t1 in spans)
    for s0, s1, t0, t1 in spans:
        assert small.decode(a["input_ids"][s0:s1]) == large.decode(b["input_ids"][t0:t1])
    for (_, s1, _, t1), (s0, _, t0, _) in zip(spans, spans[1:]):  # contiguous: no token left between two spans
        assert (s0, t0) == (s1, t1)


def test_shared_vocabulary_matches_tokens_by_their_bytes():
    small, large = train_tokenizer(CORPUS, vocab_size=280), train_tokenizer(CORPUS, vocab_size=600)
    student_ids, teacher_ids = shared_vocabulary(small, large, len(small), len(large))
    assert len(student_ids) > 250  # the smaller vocabulary's tokens nearly all exist in the larger one
    for s, t in zip(student_ids.tolist(), teacher_ids.tolist()):
        if s == small.eos_token_id:
            assert t == large.eos_token_id
        else:
            assert small.decode([s]) == large.decode([t])
    assert token_bytes(small, "Ġthe") == b" the" and token_bytes(small, "<|endoftext|>") is None
    assert len(set(teacher_ids.tolist())) == len(teacher_ids)  # one to one


class SentencePieceLike:
    """A SentencePiece-style vocabulary ('▁' for a space, <0xNN> byte tokens, text as UTF-8), no byte-level decoder."""

    all_special_tokens = ["</s>"]
    eos_token_id = 0

    def get_vocab(self):
        return {"</s>": 0, "<0x41>": 1, "A": 2, "▁the": 3, "é": 4, "<0xC3>": 5, "café": 6}


def test_a_sentencepiece_vocabulary_is_read_as_text_and_matched_one_to_one():
    tokenizer = SentencePieceLike()
    assert token_bytes(tokenizer, "é") == "é".encode() and token_bytes(tokenizer, "<0xC3>") == b"\xc3"
    assert token_bytes(tokenizer, "▁the") == b" the" and token_bytes(tokenizer, "café") == "café".encode()
    byte_level = train_tokenizer(CORPUS + ["café A é"] * 40, vocab_size=300)  # (often enough to merge C3 A9)
    student_ids, teacher_ids = shared_vocabulary(tokenizer, byte_level, 7, len(byte_level))
    pairs = dict(zip(student_ids.tolist(), teacher_ids.tolist()))
    assert 1 not in pairs and pairs[2] == byte_level.convert_tokens_to_ids("A")  # 'A', not its byte token, is kept
    assert pairs[0] == byte_level.eos_token_id and len(set(pairs.values())) == len(pairs)
    assert pairs[4] == byte_level.convert_tokens_to_ids("Ã©")  # 'é' is the bytes C3 A9 in both, in their own way


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_shared_divergence_against_a_float64_hand_computation(kind):
    torch.manual_seed(1)
    student = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 9, dtype=torch.float64)
    student_ids, teacher_ids = torch.tensor([0, 2, 5]), torch.tensor([7, 1, 4])
    got = shared_divergence(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), student_ids, teacher_ids,
                            kind=kind, beta=0.3)
    want = []
    for row in range(2):
        q, p = torch.softmax(student[row], -1), torch.softmax(teacher[row], -1)
        qb = torch.stack([q[0], q[2], q[5], q[1] + q[3] + q[4]])
        pb = torch.stack([p[7], p[1], p[4], p.sum() - p[7] - p[1] - p[4]])
        kl = lambda a, b: (a * (a.log() - b.log())).sum()  # noqa: E731
        if kind == "forward_kl":
            want.append(kl(pb, qb))
        elif kind == "reverse_kl":
            want.append(kl(qb, pb))
        elif kind == "jsd":
            m = 0.3 * pb + 0.7 * qb
            want.append(0.3 * kl(pb, m) + 0.7 * kl(qb, m))
        else:
            want.append(0.5 * (pb - qb).abs().sum())
    want = torch.stack(want)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), student), torch.autograd.grad(want.sum(), student)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_span_binary_kl_against_a_float64_hand_computation():
    token_student = torch.log(torch.tensor([0.5, 0.4, 0.9, 0.2, 0.7], dtype=torch.float64)).requires_grad_(True)
    token_teacher = torch.log(torch.tensor([0.6, 0.8, 0.3, 0.95], dtype=torch.float64))
    # spans: student tokens [0, 2) with teacher [0, 1); [2, 3) with [1, 3); [3, 5) with [3, 4)
    ps = span_sums(token_student, [(0, 2), (2, 3), (3, 5)])
    pt = span_sums(token_teacher, [(0, 1), (1, 3), (3, 4)])
    got = span_binary_kl(ps, pt)
    want = []
    for s, t in ((0.5 * 0.4, 0.6), (0.9, 0.8 * 0.3), (0.2 * 0.7, 0.95)):
        want.append(t * math.log(t / s) + (1 - t) * math.log((1 - t) / (1 - s)))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), token_student)
    # d/d log q_i of the span's KL = P_s * (-(P_t / P_s) + (1 - P_t) / (1 - P_s)) for each token i in the span
    expected = []
    for s, t, n in ((0.2, 0.6, 2), (0.9, 0.24, 1), (0.14, 0.95, 2)):
        expected += [s * (-(t / s) + (1 - t) / (1 - s))] * n
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert span_binary_kl(pt, pt).abs().max() < 1e-15  # equal span probabilities: nothing to learn


def test_the_span_loss_of_a_batch_against_a_float64_hand_computation():
    """Two rows; the first has a one-token span, a span split differently on each side and another one-token span;
    the second two one-token spans and a teacher tail in no span."""
    from onpolicy_kd.objectives.cross_tokenizer import spans_loss

    torch.manual_seed(4)
    Vs, Vt = 6, 9
    s_logits = [torch.randn(4, Vs, dtype=torch.float64, requires_grad=True),
                torch.randn(2, Vs, dtype=torch.float64, requires_grad=True)]
    t_logits = [torch.randn(3, Vt, dtype=torch.float64), torch.randn(3, Vt, dtype=torch.float64)]
    s_tokens = [torch.tensor([1, 4, 2, 0]), torch.tensor([3, 5])]
    t_tokens = [torch.tensor([2, 7, 1]), torch.tensor([6, 0, 8])]
    spans = [[(0, 1, 0, 1), (1, 3, 1, 2), (3, 4, 2, 3)], [(0, 1, 0, 1), (1, 2, 1, 2)]]
    shared = (torch.tensor([0, 1, 3]), torch.tensor([1, 2, 6]))
    s_lp = [torch.log_softmax(x, -1) for x in s_logits]
    t_lp = [torch.log_softmax(x, -1) for x in t_logits]
    loss, metrics = spans_loss(s_lp, t_lp, s_tokens, t_tokens, spans, shared, kind="forward_kl", num_tokens=10)
    want = torch.zeros((), dtype=torch.float64)
    for b in range(2):
        q_all, p_all = s_lp[b].exp(), t_lp[b].exp()
        for s0, s1, t0, t1 in spans[b]:
            if s1 - s0 == 1 and t1 - t0 == 1:
                q, p = q_all[s0], p_all[t0]
                qb = torch.stack([q[0], q[1], q[3], q[2] + q[4] + q[5]])
                pb = torch.stack([p[1], p[2], p[6], 1 - p[1] - p[2] - p[6]])
                want = want + (pb * (pb.log() - qb.log())).sum()
            else:
                ps = torch.stack([q_all[i, s_tokens[b][i]] for i in range(s0, s1)]).prod()
                pt = torch.stack([p_all[j, t_tokens[b][j]] for j in range(t0, t1)]).prod()
                want = want + pt * (pt / ps).log() + (1 - pt) * ((1 - pt) / (1 - ps)).log()
    want = want / 10
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-13)
    assert metrics == {"cross/one_token_share": 0.8}
    got_grads = torch.autograd.grad(loss, s_logits, retain_graph=True)  # (the two share the log-softmax's graph)
    for a, b in zip(got_grads, torch.autograd.grad(want, s_logits)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert a.abs().sum() > 0


def test_the_uld_loss_of_a_batch_pairs_positions_by_index_up_to_the_shorter():
    from onpolicy_kd.objectives.cross_tokenizer import uld_loss

    torch.manual_seed(5)
    s_lp = [torch.log_softmax(torch.randn(4, 5, dtype=torch.float64), -1),
            torch.log_softmax(torch.randn(2, 5, dtype=torch.float64), -1)]
    t_lp = [torch.log_softmax(torch.randn(3, 7, dtype=torch.float64), -1),
            torch.log_softmax(torch.randn(5, 7, dtype=torch.float64), -1)]
    got = uld_loss(s_lp, t_lp)
    want = (uld_distance(s_lp[0][:3], t_lp[0]).sum() + uld_distance(s_lp[1], t_lp[1][:2]).sum()) / 6
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_with_one_vocabulary_the_shared_divergence_is_the_divergence_with_a_finite_gradient(kind):
    from onpolicy_kd.objectives.divergences import divergence

    torch.manual_seed(6)
    student = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, dtype=torch.float64)
    every = torch.arange(7)
    got = shared_divergence(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), every, every, kind=kind,
                            beta=0.4)
    torch.testing.assert_close(got.mean(), divergence(student, teacher, kind=kind, beta=0.4))
    (grad,) = torch.autograd.grad(got.sum(), student)
    assert torch.isfinite(grad).all()
