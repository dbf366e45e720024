"""Evaluation metrics of one batch of completions: pure functions (tensors and token lists in, numbers out).

- ROUGE-1/2/L F-measure (the rouge-score package, with stemming), of a candidate against a target text.
- Token-level forward KL(p || q) and reverse KL(q || p) per valid position, over the full vocabulary.
- Negative log-likelihood per valid token (perplexity = exp of its mean over the tokens of a set).
- distinct-n: distinct n-grams / n-grams in one completion.
- repetition rate: the fraction of a completion's tokens that already occurred earlier in it
  (what the frequency penalty acts on).
"""

from __future__ import annotations

from typing import Sequence

import torch
from rouge_score import rouge_scorer

from onpolicy_kd.objectives.divergences import gather_logprobs, per_token_divergence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_SCORER = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(candidate: str, target: str) -> dict[str, float]:
    scores = _SCORER.score(target, candidate)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


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
