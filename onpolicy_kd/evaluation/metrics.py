"""Evaluation metrics of one batch of completions: pure functions (tensors and token lists in, numbers out).

- ROUGE-1/2/L F-measure (the rouge-score package, with stemming), of a candidate against a target text, or
  against several (the best-matching one per ROUGE type: rouge-score's `score_multi`).
- Token-level forward KL(p || q) and reverse KL(q || p) per valid position, over the full vocabulary.
- Negative log-likelihood per valid token (perplexity = exp of its mean over the tokens of a set).
- distinct-n: distinct n-grams / n-grams in one completion.
- repetition rate: the fraction of a completion's tokens that already occurred earlier in it
  (what the frequency penalty acts on).
- cut: whether a completion was stopped by the length limit (max_new_tokens tokens, the last not an EOS).
- the final answer of a completion (the last match of a pattern's group) and exact-match accuracy against
  the reference's answer; a completion without an answer is wrong.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from rouge_score import rouge_scorer

from onpolicy_kd.objectives.divergences import gather_logprobs, per_token_divergence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_SCORER = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(candidate: str, target: str | Sequence[str]) -> dict[str, float]:
    """F-measures against `target`, or against the best-matching of several targets (per ROUGE type)."""
    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise ValueError("ROUGE needs at least one target text")
    scores = _SCORER.score(targets[0], candidate) if len(targets) == 1 else _SCORER.score_multi(targets, candidate)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def was_cut(tokens: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int]) -> bool:
    """Whether decoding stopped at the length limit rather than at an end of text: a completion (up to and
    including its EOS) of max_new_tokens tokens whose last is not an EOS."""
    return len(tokens) >= max_new_tokens and (not tokens or tokens[-1] not in eos_ids)


def final_answer(text: str, pattern: re.Pattern[str] | str) -> str | None:
    """The group of the last match of `pattern` in `text`, stripped; None when nothing matches."""
    matches = list(re.finditer(pattern, text))
    if not matches or matches[-1].group(1) is None:
        return None
    return matches[-1].group(1).strip()


def exact_match(candidate: str, gold: str, pattern: re.Pattern[str] | str) -> float:
    """1.0 when the candidate's final answer equals `gold` (the reference's answer), else 0.0 (no answer is wrong)."""
    answer = final_answer(candidate, pattern)
    return float(answer is not None and answer == gold)


def distinct_n(tokens: Sequence[int], n: int) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(tokens: Sequence[int]) -> float:
    seen: set[int] = set()
    repeats = 0
    for token in tokens:
        repeats += token in seen
        seen.add(token)
    return repeats / len(tokens) if tokens else 0.0


def token_kls(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward KL(p || q), reverse KL(q || p)) per position: (B, T, V) -> (B, T)."""
    return (per_token_divergence(student_logits, teacher_logits, kind="forward_kl"),
            per_token_divergence(student_logits, teacher_logits, kind="reverse_kl"))


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log q(token) per position: (B, T, V), (B, T) -> (B, T)."""
    return -gather_logprobs(logits, tokens)
