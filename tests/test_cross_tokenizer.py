"""Cross-tokenizer distillation's pure parts (objectives/cross_tokenizer.py) against float64 hand computations:
ULD's sorted-probability distance, the span alignment of two tokenizations (tokens split differently included), the
shared-vocabulary buckets and the span-probability KL."""

from __future__ import annotations

import math

import pytest
import torch

from onpolicy_kd.objectives.cross_tokenizer import (
    aligned_spans, shared_buckets, shared_divergence, shared_vocabulary, span_binary_kl, span_sums, token_bytes,
    uld_distance,
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


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv", "skew_forward_kl", "skew_reverse_kl"])
def test_shared_divergence_against_a_float64_hand_computation(kind):
    torch.manual_seed(1)
    student = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 9, dtype=torch.float64)
    student_ids, teacher_ids = torch.tensor([0, 2, 5]), torch.tensor([7, 1, 4])
    got = shared_divergence(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), student_ids, teacher_ids,
                            kind=kind, beta=0.3, skew=0.2)
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
        elif kind == "skew_forward_kl":
            want.append(kl(pb, 0.2 * pb + 0.8 * qb))
        elif kind == "skew_reverse_kl":
            want.append(kl(qb, 0.2 * qb + 0.8 * pb))
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
    loss, metrics = spans_loss(s_lp, t_lp, s_tokens, t_tokens, spans, shared, kind="forward_kl", beta=0.5, skew=0.1,
                               num_tokens=10)
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
                            beta=0.4, skew=0.1)
    torch.testing.assert_close(got.mean(), divergence(student, teacher, kind=kind, beta=0.4))
    (grad,) = torch.autograd.grad(got.sum(), student)
    assert torch.isfinite(grad).all()


# --- edges the mutation run found untested (scripts/mutation.py) ---------------------------------------------


def test_uld_and_the_buckets_are_in_the_students_precision():
    """A float32 student against a float64 teacher: the results are float32 (the teacher is cast, not the student)."""
    torch.manual_seed(7)
    s_lp = torch.log_softmax(torch.randn(2, 5), -1)
    t_lp = torch.log_softmax(torch.randn(2, 8, dtype=torch.float64), -1)
    assert uld_distance(s_lp, t_lp).dtype == torch.float32
    student, teacher = shared_buckets(s_lp, t_lp, torch.tensor([0, 3]), torch.tensor([5, 1]))
    assert student.dtype == teacher.dtype == torch.float32
    assert span_binary_kl(s_lp[:, 0], t_lp[:, 0]).dtype == torch.float32


@pytest.mark.parametrize("student, teacher, spans", [
    # the student's text goes on past the teacher's last token
    ([3, 6, 9], [3, 6], [(0, 1, 0, 1), (1, 2, 1, 2)]),
    # byte pieces of one character at the very end, on either side
    ([3, 5, 5], [3, 5], [(0, 1, 0, 1), (1, 3, 1, 2)]),
    ([3, 5], [3, 5, 5], [(0, 1, 0, 1), (1, 2, 1, 3)]),
    # byte pieces of one character in the teacher's tokens, then a common end
    ([3, 5, 9], [3, 5, 5, 9], [(0, 1, 0, 1), (1, 2, 1, 3), (2, 3, 3, 4)]),
    ([3, 5, 9], [3, 5, 5, 5, 9], [(0, 1, 0, 1), (1, 2, 1, 4), (2, 3, 4, 5)]),
])
def test_aligned_spans_at_the_ends_and_byte_pieces_on_either_side(student, teacher, spans):
    assert aligned_spans(student, teacher) == spans
    assert aligned_spans(teacher, student) == [(c, d, a, b) for a, b, c, d in spans]  # symmetric


class PlainVocabulary:
    """A tokenizer-like with a vocabulary and no list of special tokens."""

    eos_token_id = 0

    def get_vocab(self):
        return {"▁the": 1}


def test_token_bytes_reads_each_scheme_as_told_and_leaves_other_text_as_it_is():
    byte_level = train_tokenizer(CORPUS, vocab_size=280)
    assert token_bytes(PlainVocabulary(), "▁the", byte_level=False) == b" the"  # no all_special_tokens: nothing special
    # the scheme passed wins over the tokenizer's own: Ġ is GPT-2's stand-in for a space only in a byte-level table
    assert token_bytes(byte_level, "Ġthe", byte_level=False) == "Ġthe".encode()
    assert token_bytes(SentencePieceLike(), "Ġthe", byte_level=True) == b" the"
    # an entry with characters outside the byte table (an added token) stands for its own UTF-8 text
    assert token_bytes(byte_level, "日本", byte_level=True) == "日本".encode()
    # only <0xNN> is a raw byte: other six-character entries in angle brackets are text
    assert token_bytes(SentencePieceLike(), "<pad1>", byte_level=False) == b"<pad1>"
    assert token_bytes(SentencePieceLike(), "<0x4142>", byte_level=False) == b"<0x4142>"
    assert token_bytes(SentencePieceLike(), "<0x41>", byte_level=False) == b"A"


def test_the_byte_table_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from onpolicy_kd.objectives.cross_tokenizer import _byte_decoder

    assert _byte_decoder() == {char: byte for byte, char in bytes_to_unicode().items()}


def test_shared_vocabulary_leaves_out_special_tokens_and_ids_past_the_models_vocabulary():
    small, large = train_tokenizer(CORPUS, vocab_size=280), train_tokenizer(CORPUS, vocab_size=600)
    for tokenizer in (small, large):  # the chat tokens as special tokens (they stand for no text)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    special = set(small.all_special_ids) - {small.eos_token_id}
    assert len(special) == 2
    student_ids, teacher_ids = shared_vocabulary(small, large, len(small), len(large))
    assert not special & set(student_ids.tolist()) and not (set(large.all_special_ids) - {large.eos_token_id}) & set(teacher_ids.tolist())
    # a model whose vocabulary stops at id `size` (a smaller embedding than the tokenizer): ids from `size` on are out
    size = max(student_ids.tolist()) - 10
    assert size in student_ids.tolist()  # (so that the boundary is tested: id `size` is shared but not in the model)
    cut_ids, _ = shared_vocabulary(small, large, size, len(large))
    assert max(i for i in cut_ids.tolist() if i != small.eos_token_id) == max(i for i in student_ids.tolist() if i < size)
    assert size not in cut_ids.tolist() or size == small.eos_token_id


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_shared_vocabulary_needs_an_eos_token_on_each_side(side):
    small, large = train_tokenizer(CORPUS, vocab_size=280), train_tokenizer(CORPUS, vocab_size=600)
    (small if side == "student" else large).eos_token = None
    with pytest.raises(ValueError, match=r"^cross-tokenizer distillation needs an EOS token in both tokenizers \(they end completions\)$"):
        shared_vocabulary(small, large, len(small), len(large))


@pytest.mark.parametrize("full, kind", [("student", "reverse_kl"), ("student", "tv"), ("student", "jsd"),
                                        ("teacher", "forward_kl"), ("teacher", "tv"), ("teacher", "jsd")])
def test_the_buckets_when_one_vocabulary_is_all_shared(full, kind):
    """One side's tokens are all in the other's vocabulary: its rest bucket is empty (probability 0), the other's
    is not; against a hand computation (reverse KL when the student's is empty: the forward KL is then infinite,
    the teacher's rest having no student mass to match)."""
    torch.manual_seed(9)
    vs, vt = (3, 5) if full == "student" else (5, 3)
    student = torch.randn(2, vs, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, vt, dtype=torch.float64)
    s_ids, t_ids = (torch.tensor([0, 1, 2]), torch.tensor([4, 0, 2])) if full == "student" else (
        torch.tensor([3, 0, 1]), torch.tensor([0, 1, 2]))
    got = shared_divergence(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), s_ids, t_ids, kind=kind,
                            beta=0.5, skew=0.1)
    q, p = torch.softmax(student, -1), torch.softmax(teacher, -1)
    qb = torch.cat([q[:, s_ids], 1 - q[:, s_ids].sum(-1, keepdim=True)], -1)
    pb = torch.cat([p[:, t_ids], 1 - p[:, t_ids].sum(-1, keepdim=True)], -1)
    def kl(a, b):
        return torch.where(a > 1e-300, a * (a.clamp_min(1e-300).log() - b.log()), 0.0).sum(-1)

    if kind == "tv":
        want = 0.5 * (pb - qb).abs().sum(-1)
    elif kind == "jsd":
        m = 0.5 * pb + 0.5 * qb
        want = 0.5 * kl(pb, m) + 0.5 * kl(qb, m)
    else:
        want = kl(qb, pb) if kind == "reverse_kl" else kl(pb, qb)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), student)
    (want_grad,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)


def test_shared_divergence_refuses_logit_mse():
    every = torch.arange(3)
    with pytest.raises(ValueError, match="^logit_mse compares logits of one vocabulary; across tokenizers use a KL, the JSD or tv$"):
        shared_divergence(torch.zeros(1, 3), torch.zeros(1, 3), every, every, kind="logit_mse", beta=0.5, skew=0.1)


def test_span_binary_kl_where_a_span_is_certain_or_impossible():
    """P_t = 1: KL = -log P_s; P_t = 0: KL = -log(1 - P_s); P_s = 1 with P_t < 1 is infinite in exact arithmetic and
    stays finite here (1 - P_s is read as 1 - e^(-1e-12))."""
    log_ps = torch.log(torch.tensor([0.3, 0.3, 1.0], dtype=torch.float64)).requires_grad_(True)
    log_pt = torch.log(torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    got = span_binary_kl(log_ps, log_pt)
    tiny = -math.expm1(-1e-12)
    want = [-math.log(0.3), -math.log(0.7), 0.5 * math.log(0.5) + 0.5 * (math.log(0.5) - math.log(tiny))]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), log_ps)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad[:2], torch.tensor([-1.0, 0.3 / 0.7], dtype=torch.float64))


def test_span_sums_of_no_spans_is_empty():
    assert span_sums(torch.randn(4), []).shape == (0,)


def _rows(seed: int, lengths_s: list[int], lengths_t: list[int], vs: int = 6, vt: int = 9):
    torch.manual_seed(seed)
    s_logits = [torch.randn(n, vs, dtype=torch.float64, requires_grad=True) for n in lengths_s]
    t_logits = [torch.randn(n, vt, dtype=torch.float64) for n in lengths_t]
    s_tokens = [torch.randint(vs, (n,)) for n in lengths_s]
    t_tokens = [torch.randint(vt, (n,)) for n in lengths_t]
    return s_logits, [torch.log_softmax(x, -1) for x in s_logits], [torch.log_softmax(x, -1) for x in t_logits], s_tokens, t_tokens


@pytest.mark.parametrize("kind, beta, skew", [("jsd", 0.3, 0.1), ("skew_forward_kl", 0.5, 0.25), ("skew_reverse_kl", 0.5, 0.4)])
def test_the_span_loss_divides_by_the_batchs_student_tokens_and_passes_beta_and_skew(kind, beta, skew):
    """Without num_tokens the sum is divided by the batch's student tokens (here 4 + 3); the one-token spans use
    the recipe's beta and skew; the share of one-token spans counts every row's spans."""
    from onpolicy_kd.objectives.cross_tokenizer import spans_loss

    _, s_lp, t_lp, s_tok, t_tok = _rows(10, [4, 3], [3, 4])
    spans = [[(0, 1, 0, 1), (1, 3, 1, 2), (3, 4, 2, 3)], [(0, 2, 0, 1), (2, 3, 1, 4)]]
    shared = (torch.tensor([0, 1, 3]), torch.tensor([1, 2, 6]))
    loss, metrics = spans_loss(s_lp, t_lp, s_tok, t_tok, spans, shared, kind=kind, beta=beta, skew=skew)
    want = 0
    for b in range(2):
        token_s = s_lp[b].gather(-1, s_tok[b][:, None])[:, 0]
        token_t = t_lp[b].gather(-1, t_tok[b][:, None])[:, 0]
        for s0, s1, t0, t1 in spans[b]:
            if s1 - s0 == t1 - t0 == 1:
                want = want + shared_divergence(s_lp[b][s0:s1], t_lp[b][t0:t1], *shared, kind=kind, beta=beta,
                                                skew=skew).sum()
            else:
                want = want + span_binary_kl(token_s[s0:s1].sum()[None], token_t[t0:t1].sum()[None]).sum()
    torch.testing.assert_close(loss, want / 7)
    assert metrics == {"cross/one_token_share": 2 / 5}
    one, counted = spans_loss(s_lp[:1], t_lp[:1], s_tok[:1], t_tok[:1], [spans[0][:1]], shared, kind=kind, beta=beta,
                              skew=skew, num_tokens=1)  # a divisor of 1 is 1, one span of one token a share of 1
    assert counted == {"cross/one_token_share": 1.0}
    torch.testing.assert_close(one, shared_divergence(s_lp[0][:1], t_lp[0][:1], *shared, kind=kind, beta=beta,
                                                      skew=skew).sum())


def test_the_span_loss_of_rows_without_a_span_is_zero_with_a_gradient_path():
    """Texts cut where the two tokenizations share no end (every token after the last common end): no span, a loss
    of 0 that backward still reaches the student through; the one-token share of no spans is 0."""
    from onpolicy_kd.objectives.cross_tokenizer import spans_loss

    s_logits, s_lp, t_lp, s_tok, t_tok = _rows(11, [2], [3])
    loss, metrics = spans_loss(s_lp, t_lp, s_tok, t_tok, [[]], (torch.tensor([0]), torch.tensor([0])),
                               kind="forward_kl", beta=0.5, skew=0.1)
    assert loss.item() == 0 and metrics == {"cross/one_token_share": 0.0}
    (grad,) = torch.autograd.grad(loss, s_logits)
    assert (grad == 0).all()


def test_the_uld_loss_divides_by_num_tokens_when_given_and_refuses_an_empty_batch():
    from onpolicy_kd.objectives.cross_tokenizer import uld_loss

    _, s_lp, t_lp, _, _ = _rows(12, [3], [2])
    total = uld_distance(s_lp[0][:2], t_lp[0]).sum()
    torch.testing.assert_close(uld_loss(s_lp, t_lp, num_tokens=1), total)
    torch.testing.assert_close(uld_loss(s_lp, t_lp, num_tokens=5), total / 5)
    with pytest.raises(ValueError, match="^uld_loss of an empty batch$"):
        uld_loss([], [])


def test_uld_with_the_larger_vocabulary_on_the_students_side():
    """The padding goes to whichever side is smaller: here the teacher's 5 tokens against the student's 8, 2 rows."""
    torch.manual_seed(13)
    s_lp = torch.log_softmax(torch.randn(2, 8, dtype=torch.float64), -1)
    t_lp = torch.log_softmax(torch.randn(2, 5, dtype=torch.float64), -1)
    want = []
    for row in range(2):
        q = sorted(s_lp[row].exp().tolist(), reverse=True)
        p = sorted(t_lp[row].exp().tolist(), reverse=True) + [0.0] * 3
        want.append(sum(abs(a - b) for a, b in zip(p, q)))
    torch.testing.assert_close(uld_distance(s_lp, t_lp), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("how, kind", [("spans", "jsd"), ("spans", "skew_reverse_kl"), ("uld", "jsd")])
def test_the_kd_loss_across_tokenizers_reads_each_rows_own_tokens_and_logs_its_mean(how, kind):
    """objectives/loss.py's cross_tokenizer_loss, reached as the step reaches it (divergence_loss, the kd / gkd loss,
    hands a batch with a `teacher_view` over to it): the student's log-probs over its own completion tokens and the
    teacher's over its, each row cut to its length (padding unread), through the span loss or ULD, divided by the
    step's tokens; the per-token mean and the one-token share logged."""
    from types import SimpleNamespace

    from onpolicy_kd.batch import Completions, completion_mask
    from onpolicy_kd.objectives.cross_tokenizer import spans_loss, uld_loss
    from onpolicy_kd.objectives.loss import ModelOutputs, StepContext, divergence_loss

    torch.manual_seed(14)
    vs, vt = 6, 9
    s_lengths, t_lengths = [3, 2], [2, 3]

    def batch(lengths, width, vocab):
        ids = torch.randint(vocab, (2, width))
        return Completions(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), ids,
                           completion_mask(torch.tensor(lengths), width), source="student", texts=["a", "b"])

    student_batch, teacher_batch = batch(s_lengths, 4, vs), batch(t_lengths, 4, vt)
    student_batch.teacher_view = teacher_batch
    student_batch.spans = [[(0, 1, 0, 1), (1, 3, 1, 2)], [(0, 1, 0, 1), (1, 2, 1, 3)]]
    s_logits = torch.randn(2, 4, vs, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(2, 4, vt, dtype=torch.float64)
    shared = (torch.tensor([0, 2, 3]), torch.tensor([4, 1, 0]))
    obj = SimpleNamespace(cross_tokenizer=how, divergence=kind, beta=0.3, skew=0.2)
    ctx = StepContext(num_tokens=10.0, shared_vocabulary=shared)
    metrics: dict = {}
    loss = divergence_loss(student_batch, ModelOutputs(logits=s_logits), ModelOutputs(logits=t_logits),
                           SimpleNamespace(objective=obj), ctx, metrics)
    s_lp = [torch.log_softmax(s_logits[b, :n], -1) for b, n in enumerate(s_lengths)]
    t_lp = [torch.log_softmax(t_logits[b, :n], -1) for b, n in enumerate(t_lengths)]
    if how == "uld":
        want = uld_loss(s_lp, t_lp, num_tokens=10)
    else:
        want, counts = spans_loss(s_lp, t_lp, [student_batch.completion_ids[b, :n] for b, n in enumerate(s_lengths)],
                                  [teacher_batch.completion_ids[b, :n] for b, n in enumerate(t_lengths)],
                                  student_batch.spans, shared, kind=kind, beta=0.3, skew=0.2, num_tokens=10)
        assert metrics["cross/one_token_share"] == counts["cross/one_token_share"] == 0.5
    torch.testing.assert_close(loss, want)
    assert metrics[f"train/cross_{how}"] == pytest.approx(want.item() * 10 / 5)
    # padding positions are never read: they get no gradient
    (grad,) = torch.autograd.grad(loss, s_logits)
    assert grad[0, 3].abs().sum() == 0 and grad[1, 2:].abs().sum() == 0 and grad[0, :3].abs().sum() > 0
