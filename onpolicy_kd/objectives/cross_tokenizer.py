"""Distillation between a teacher and a student whose tokenizers differ: pure functions over the same text
tokenized twice (no model runs here).

Two objectives, and why both:

ULD (Boizard et al., 2024, the Universal Logit Distillation loss): at the i-th completion position of each model
(the student's i-th token against the teacher's i-th, up to the shorter of the two), the L1 distance between the
two next-token probability vectors each sorted in decreasing order, the smaller vocabulary padded with zeros:

    ULD_i = sum_r | p_(r) - q_(r) |

It needs no correspondence between the vocabularies: it matches the *shape* of the teacher's distribution (how sure
it is), not which token it prefers. And it pairs positions by index, though the i-th tokens of two tokenizations of
one text need not cover the same characters once one of them splits a word differently.

Span alignment (after TRL's GOLD): the two tokenizations are cut into *spans*, the shortest runs of consecutive
tokens that cover the same characters on both sides (`aligned_spans`, from the tokens' character end offsets). A
span of one token on each side is the same string, predicted from the same preceding text: there the two
next-token distributions are compared over the tokens both vocabularies share (equal byte strings,
`shared_vocabulary`) plus one bucket for the mass on everything else (`shared_buckets`, the same device as the
top-k cache's, objectives/divergences.py). A span split differently (one token against two, or two against three)
has no pair of next-token distributions to compare; there the probability each model gives the span's text, the
product of its tokens' probabilities given the preceding text (its own tokenization of the span only), is
compared as a yes/no outcome: KL(Bern(P_t) || Bern(P_s)) (`span_binary_kl`). Tokens after the last common end
(texts cut at different lengths) are in no span and get no loss.
"""

from __future__ import annotations

from typing import Sequence

import torch

from onpolicy_kd.objectives.divergences import DIVERGENCES

Tensor = torch.Tensor


def uld_distance(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Per row, sum_r |p_(r) - q_(r)| between the probabilities sorted in decreasing order: (N, Vs), (N, Vt) log-probs
    -> (N,). The shorter vocabulary is padded with zeros (tokens it does not have, probability 0)."""
    q, p = student_logprobs.exp(), teacher_logprobs.exp().to(student_logprobs.dtype)
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    q_sorted = q.sort(-1, descending=True).values
    p_sorted = p.sort(-1, descending=True).values
    return (p_sorted - q_sorted).abs().sum(-1)


def aligned_spans(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """The spans of two tokenizations of one text: (student start, student stop, teacher start, teacher stop) token
    index ranges, in order, each the shortest run of tokens on both sides ending at the same character. `*_ends`:
    each token's character end offset (non-decreasing). Tokens that end at the same character as the token before
    them (pieces of one character) stay with it. Tokens after the last end both sides share are left out."""
    spans: list[tuple[int, int, int, int]] = []
    i = j = 0
    S, T = list(student_ends), list(teacher_ends)
    while i < len(S) and j < len(T):
        a, c = i, j
        while S[i] != T[j]:
            if S[i] < T[j]:
                i += 1
            else:
                j += 1
            if i == len(S) or j == len(T):
                return spans
        while i + 1 < len(S) and S[i + 1] == S[i]:
            i += 1
        while j + 1 < len(T) and T[j + 1] == T[j]:
            j += 1
        spans.append((a, i + 1, c, j + 1))
        i, j = i + 1, j + 1
    return spans


def is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer's vocabulary is written in GPT-2's byte-to-character table (byte-level BPE: GPT-2,
    Llama 3, SmolLM2, Qwen) rather than as text with '▁' for a space (SentencePiece: Llama 2, T5, Gemma)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


def token_bytes(tokenizer, token: str, byte_level: bool | None = None) -> bytes | None:
    """The bytes a vocabulary entry stands for, None for special tokens (they stand for no text). Byte-level BPE maps
    each byte to a printable character; SentencePiece writes a space as '▁' and a raw byte as <0xNN>.
    `byte_level`: the tokenizer's scheme (`is_byte_level`), decided once per tokenizer, not per token (a
    SentencePiece token such as 'é' also looks like a string of byte characters)."""
    if token in getattr(tokenizer, "all_special_tokens", ()):
        return None
    if is_byte_level(tokenizer) if byte_level is None else byte_level:
        decoder = _byte_decoder()
        return bytes(decoder[ch] for ch in token) if all(ch in decoder for ch in token) else token.encode()
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        return bytes([int(token[3:5], 16)])
    return token.replace("▁", " ").encode()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def _vocabulary_bytes(tokenizer, size: int) -> dict[bytes, int]:
    """bytes -> one id below `size` standing for them: where several do (SentencePiece's <0x41> and 'A'), the id of
    the entry that is not a raw-byte token, else the lowest."""
    byte_level, found = is_byte_level(tokenizer), {}
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: (item[0].startswith("<0x"), item[1])):
        raw = token_bytes(tokenizer, token, byte_level)
        if raw is not None and index < size:
            found.setdefault(raw, index)
    return found


def shared_vocabulary(student_tokenizer, teacher_tokenizer, student_vocab: int, teacher_vocab: int) -> tuple[Tensor, Tensor]:
    """(student ids, teacher ids) of the tokens both vocabularies have, matched one to one by the bytes they stand
    for (ids below each model's vocabulary size), plus the two EOS tokens matched to each other; sorted by student
    id."""
    teacher_bytes = _vocabulary_bytes(teacher_tokenizer, teacher_vocab)
    pairs = {index: teacher_bytes[raw] for raw, index in _vocabulary_bytes(student_tokenizer, student_vocab).items()
             if raw in teacher_bytes}
    if student_tokenizer.eos_token_id is None or teacher_tokenizer.eos_token_id is None:
        raise ValueError("cross-tokenizer distillation needs an EOS token in both tokenizers (they end completions)")
    pairs[student_tokenizer.eos_token_id] = teacher_tokenizer.eos_token_id
    student_ids = sorted(pairs)
    return torch.tensor(student_ids, dtype=torch.long), torch.tensor([pairs[s] for s in student_ids], dtype=torch.long)


def shared_buckets(student_logprobs: Tensor, teacher_logprobs: Tensor, student_ids: Tensor,
                   teacher_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Both distributions over the shared tokens (matched pairs, `shared_vocabulary`) plus one bucket each for the
    rest of its own vocabulary: (N, K + 1) log-probs of the student and of the teacher."""
    def buckets(logprobs: Tensor, ids: Tensor) -> Tensor:
        shared = logprobs.index_select(-1, ids)
        if len(ids) >= logprobs.shape[-1]:  # every token is shared: nothing left (a constant, no gradient path)
            return torch.cat([shared, shared.new_full((*shared.shape[:-1], 1), float("-inf"))], -1)
        rest = logprobs.index_fill(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([shared, rest], -1)

    student, teacher = buckets(student_logprobs, student_ids), buckets(teacher_logprobs.to(student_logprobs.dtype), teacher_ids)
    if len(student_ids) >= student_logprobs.shape[-1] and len(teacher_ids) >= teacher_logprobs.shape[-1]:
        return student[..., :-1], teacher[..., :-1]  # one vocabulary: the buckets are the whole distributions
    return student, teacher


def shared_divergence(student_logprobs: Tensor, teacher_logprobs: Tensor, student_ids: Tensor, teacher_ids: Tensor,
                      *, kind: str, beta: float, skew: float) -> Tensor:
    """Per row, the divergence `kind` between the two models' distributions over the shared tokens and one bucket
    for the rest (`shared_buckets`): (N,)."""
    if kind == "logit_mse":
        raise ValueError("logit_mse compares logits of one vocabulary; across tokenizers use a KL, the JSD or tv")
    return DIVERGENCES[kind](*shared_buckets(student_logprobs, teacher_logprobs, student_ids, teacher_ids), beta, skew)


def span_sums(token_logprobs: Tensor, spans: Sequence[tuple[int, int]]) -> Tensor:
    """The log-probability of each span's text under one model: the sum of its tokens' log-probabilities, (G,)."""
    if not spans:
        return token_logprobs.new_zeros(0)
    return torch.stack([token_logprobs[start:stop].sum() for start, stop in spans])


def span_binary_kl(student_span_logprobs: Tensor, teacher_span_logprobs: Tensor) -> Tensor:
    """KL(Bern(P_t) || Bern(P_s)) per span from the log-probabilities of its text (0 log 0 = 0), (G,):
    P_t log(P_t / P_s) + (1 - P_t) log((1 - P_t) / (1 - P_s))."""
    log_ps, log_pt = student_span_logprobs, teacher_span_logprobs.to(student_span_logprobs.dtype)
    pt = log_pt.exp()
    log_not_ps = torch.log(-torch.expm1(log_ps.clamp_max(-1e-12)))  # log(1 - P_s), finite while P_s < 1
    log_not_pt = torch.log(-torch.expm1(log_pt.clamp_max(-1e-12)))
    yes = torch.where(pt == 0, 0.0, pt * (log_pt - log_ps))
    no = torch.where(pt == 1, 0.0, (1 - pt) * (log_not_pt - log_not_ps))
    return yes + no


def spans_loss(student_logprobs: Sequence[Tensor], teacher_logprobs: Sequence[Tensor],
               student_tokens: Sequence[Tensor], teacher_tokens: Sequence[Tensor],
               spans: Sequence[Sequence[tuple[int, int, int, int]]], shared: tuple[Tensor, Tensor], *,
               kind: str, beta: float, skew: float, num_tokens: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """The span-aligned loss of a batch, row by row (each row's completion in the student's and in the teacher's
    tokens: log-probs (T_s, V_s) / (T_t, V_t) at the positions predicting its tokens, and those tokens): over the
    one-token spans the shared-vocabulary divergence `kind`, over the others the span binary KL; summed and divided
    by `num_tokens` (the step's student tokens; default this batch's). Metric: the share of one-token spans."""
    student_ids, teacher_ids = shared
    terms, one, many, count = [], 0, 0, 0
    for s_lp, t_lp, s_tok, t_tok, row in zip(student_logprobs, teacher_logprobs, student_tokens, teacher_tokens, spans):
        count += s_lp.shape[0]
        single = [(s0, t0) for s0, s1, t0, t1 in row if s1 - s0 == 1 and t1 - t0 == 1]
        split = [(s0, s1, t0, t1) for s0, s1, t0, t1 in row if not (s1 - s0 == 1 and t1 - t0 == 1)]
        if single:
            at_s = torch.tensor([s for s, _ in single], device=s_lp.device)
            at_t = torch.tensor([t for _, t in single], device=t_lp.device)
            terms.append(shared_divergence(s_lp[at_s], t_lp[at_t], student_ids, teacher_ids, kind=kind, beta=beta,
                                           skew=skew).sum())
            one += len(single)
        if split:
            s_token_lp = s_lp.gather(-1, s_tok.unsqueeze(-1)).squeeze(-1)
            t_token_lp = t_lp.gather(-1, t_tok.unsqueeze(-1)).squeeze(-1)
            terms.append(span_binary_kl(span_sums(s_token_lp, [(a, b) for a, b, _, _ in split]),
                                        span_sums(t_token_lp, [(c, d) for _, _, c, d in split])).sum())
            many += len(split)
    total = torch.stack(terms).sum() if terms else student_logprobs[0].sum() * 0
    loss = total / max(num_tokens if num_tokens is not None else count, 1)
    return loss, {"cross/one_token_share": one / max(one + many, 1)}


def uld_loss(student_logprobs: Sequence[Tensor], teacher_logprobs: Sequence[Tensor], *,
             num_tokens: float | None = None) -> Tensor:
    """ULD over a batch, row by row: the sorted-probability distance at the first min(T_s, T_t) positions of each
    row's completion (paired by index, as the ULD paper does), summed and divided by `num_tokens` (default this
    batch's student tokens)."""
    total, count = None, 0
    for s_lp, t_lp in zip(student_logprobs, teacher_logprobs):
        count += s_lp.shape[0]
        n = min(s_lp.shape[0], t_lp.shape[0])
        value = uld_distance(s_lp[:n], t_lp[:n]).sum()
        total = value if total is None else total + value
    if total is None:
        raise ValueError("uld_loss of an empty batch")
    return total / max(num_tokens if num_tokens is not None else count, 1)
