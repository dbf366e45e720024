"""Frequency, diversity and entropy penalties: differentiable loss forms and PG reward-shaping forms.

Notation: q(v|c_t) the student's next-token distribution at completion position t (1-based), y the
sampled completion, valid positions given by the mask. Each loss is reduced like every other loss
(sum over valid positions / `num_tokens`, the global valid-token count), and each loss function returns
(value to add to the loss, value for logging). The loss forms come in two spellings: `*_loss` from the per-token
quantity the penalty reads (what the training loop passes: objectives/token_terms.py computes it from full logits
or chunk by chunk from hidden states), and `*_penalty` from full logits (the reference). Each `*_shaping` function returns a per-token cost
(B, T) that the PG loss subtracts from the reward (`reward_shaping_BT`). All default to weight 0 (off).

Frequency (discourage re-using tokens already generated), with c_t(v) = count of v in y_<t:
    loss    lambda_freq * mean_t sum_v q(v|c_t) * c_t(v) / t
    reward  r_t -= lambda_freq * c_t(y_t) / t
Diversity (Euclidean distances between token embeddings), with E the student's input embeddings
(without gradient, so only the distribution moves) and e_t = sum_v q(v|c_t) E_v:
    loss    -lambda_div * mean over sequences of mean_{i != j} ||e_i - e_j||_2   (valid positions of one sequence)
    reward  r_t += lambda_div * mean_{j != t} ||E_{y_t} - E_{y_j}||_2  (sampled tokens' embeddings; cost = minus that)
Entropy, with H_t = -sum_v q(v|c_t) log q(v|c_t) and floor h_min:
    loss    lambda_ent * mean_t max(0, h_min - H_t); with h_min = +inf, -lambda_ent * mean_t H_t (plain bonus)
    reward  r_t -= lambda_ent * max(0, h_min - H_t)  (with h_min = +inf, r_t += lambda_ent * H_t), H_t of the
            behaviour student as recorded while sampling: a reward is a constant of the sample
Math is in at least float32 (float64 inputs keep float64).
"""

from __future__ import annotations

import math

import torch

from onpolicy_kd.objectives import token_terms as terms
from onpolicy_kd.objectives.divergences import reduce_tokens

Tensor = torch.Tensor


def any_penalty(penalties) -> bool:
    """Whether any penalty weight of a `penalties` section is on (they all read the student's full distribution)."""
    return bool(penalties.frequency or penalties.diversity or penalties.entropy)


def _at_every_position(term: terms.Term, logits_BTV: Tensor) -> Tensor:
    """A token term from full logits at every position: (B, T) or (B, T, k)."""
    B, T, V = logits_BTV.shape
    values = term.rows(terms.Rows(logits_BTV.reshape(B * T, V)), None, torch.arange(B * T, device=logits_BTV.device))
    return values.reshape(B, T) if term.width == 1 else values.reshape(B, T, term.width)


def _positions(tokens_BT: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """1-based position t of each completion token, as float (the denominator of the frequency terms)."""
    return torch.arange(1, tokens_BT.shape[1] + 1, device=tokens_BT.device, dtype=dtype).expand_as(tokens_BT)


def frequency_loss(previous_probability_BT: Tensor, mask_BT: Tensor, weight: float,
                   num_tokens: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
    """From sum_{s<t} q(y_s|c_t) per position (token_terms.previous_probability)."""
    value_BT = previous_probability_BT / _positions(mask_BT, previous_probability_BT.dtype)
    value = reduce_tokens(value_BT, mask_BT, num_tokens)
    return weight * value, value.detach()


def frequency_penalty(
    logits_BTV: Tensor, tokens_BT: Tensor, mask_BT: Tensor, weight: float, num_tokens: Tensor | int | None = None,
) -> tuple[Tensor, Tensor]:
    previous = _at_every_position(terms.previous_probability(tokens_BT, mask_BT), logits_BTV)
    return frequency_loss(previous, mask_BT, weight, num_tokens)


def frequency_shaping(tokens_BT: Tensor, mask_BT: Tensor, weight: float) -> Tensor:
    """Cost lambda_freq * c_t(y_t) / t per position (subtracted from the reward)."""
    T = tokens_BT.shape[1]
    same_BTT = tokens_BT.unsqueeze(2) == tokens_BT.unsqueeze(1)  # [b, t, s] = (y_t == y_s)
    earlier_TT = torch.ones(T, T, dtype=torch.bool, device=tokens_BT.device).tril(-1)
    counts_BT = (same_BTT & earlier_TT & mask_BT.bool().unsqueeze(1)).sum(-1).float()
    return torch.where(mask_BT.bool(), weight * counts_BT / _positions(tokens_BT), torch.zeros_like(counts_BT))


def _mean_pairwise_distance(points_BTH: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence, mean_{i != j} ||x_i - x_j|| over valid positions; and which sequences have >= 2 of them."""
    # Exact differences (no |a|^2 + |b|^2 - 2ab cancellation); the diagonal is excluded below.
    dist_BTT = torch.cdist(points_BTH, points_BTH, compute_mode="donot_use_mm_for_euclid_dist")
    valid_BT = mask_BT.bool()
    T = valid_BT.shape[1]
    pair_BTT = valid_BT.unsqueeze(2) & valid_BT.unsqueeze(1) & ~torch.eye(T, dtype=torch.bool, device=valid_BT.device)
    n_pairs_B = pair_BTT.sum((1, 2))
    total_B = torch.where(pair_BTT, dist_BTT, torch.zeros_like(dist_BTT)).sum((1, 2))
    return total_B / n_pairs_B.clamp_min(1), n_pairs_B > 0


def diversity_penalty(
    logits_BTV: Tensor, embeddings_VH: Tensor, mask_BT: Tensor, weight: float,
    num_sequences: Tensor | int | None = None,
) -> tuple[Tensor, Tensor]:
    expected_BTH = _at_every_position(terms.expected_embedding(embeddings_VH), logits_BTV)
    return diversity_loss(expected_BTH, mask_BT, weight, num_sequences)


def diversity_loss(expected_BTH: Tensor, mask_BT: Tensor, weight: float,
                   num_sequences: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
    """-lambda_div * mean over sequences of the mean pairwise distance of expected embeddings
    (token_terms.expected_embedding).

    The sum over sequences is divided by `num_sequences`, the global number of sequences with at least two
    valid tokens (all micro-batches and processes, as tokens are for the other losses), else by the local
    one. The logged value is this batch's own mean.
    """
    spread_B, has_pairs_B = _mean_pairwise_distance(expected_BTH, mask_BT)
    total = torch.where(has_pairs_B, spread_B, torch.zeros_like(spread_B)).sum()
    local = has_pairs_B.sum().clamp_min(1)
    denominator = local if num_sequences is None else torch.as_tensor(num_sequences, device=total.device).clamp_min(1)
    return -weight * total / denominator, (total / local).detach()


def sequences_with_pairs(mask_BT: Tensor) -> int:
    """How many sequences have at least two valid tokens (the diversity penalty's denominator)."""
    return int((mask_BT.sum(1) >= 2).sum())


def diversity_shaping(tokens_BT: Tensor, embeddings_VH: Tensor, mask_BT: Tensor, weight: float) -> Tensor:
    """Cost -lambda_div * mean_{j != t} ||E_{y_t} - E_{y_j}|| per position (a bonus once subtracted from the reward)."""
    points_BTH = embeddings_VH.detach().float()[tokens_BT]
    dist_BTT = torch.cdist(points_BTH, points_BTH, compute_mode="donot_use_mm_for_euclid_dist")
    valid_BT = mask_BT.bool()
    T = valid_BT.shape[1]
    other_BTT = valid_BT.unsqueeze(1) & ~torch.eye(T, dtype=torch.bool, device=valid_BT.device)
    mean_BT = torch.where(other_BTT, dist_BTT, torch.zeros_like(dist_BTT)).sum(-1) / other_BTT.sum(-1).clamp_min(1)
    return torch.where(valid_BT, -weight * mean_BT, torch.zeros_like(mean_BT))


def entropy(logits_BTV: Tensor) -> Tensor:
    """H_t = -sum_v q log q per position (float32)."""
    return _at_every_position(terms.entropy(), logits_BTV)


def entropy_penalty(
    logits_BTV: Tensor, mask_BT: Tensor, weight: float, floor: float = math.inf, num_tokens: Tensor | int | None = None,
) -> tuple[Tensor, Tensor]:
    return entropy_loss(entropy(logits_BTV), mask_BT, weight, floor, num_tokens)


def entropy_loss(h_BT: Tensor, mask_BT: Tensor, weight: float, floor: float = math.inf,
                 num_tokens: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
    """lambda_ent * mean_t max(0, floor - H_t); a plain bonus -lambda_ent * mean_t H_t when floor is +inf.

    The logged value is the mean entropy H_t over valid positions.
    """
    shortfall_BT = -h_BT if math.isinf(floor) else torch.clamp(floor - h_BT, min=0)
    return weight * reduce_tokens(shortfall_BT, mask_BT, num_tokens), reduce_tokens(h_BT.detach(), mask_BT, num_tokens)


def entropy_shaping(entropy_BT: Tensor, mask_BT: Tensor, weight: float, floor: float = math.inf) -> Tensor:
    """Cost lambda_ent * max(0, floor - H_t) per position (subtracted from the reward); -lambda_ent * H_t at floor = inf.

    `entropy_BT` is the behaviour student's entropy at each sampled position (the rollout records it).
    """
    h_BT = entropy_BT.detach()
    shortfall_BT = -h_BT if math.isinf(floor) else torch.clamp(floor - h_BT, min=0)
    return torch.where(mask_BT.bool(), weight * shortfall_BT, torch.zeros_like(shortfall_BT))


def truncation_loss(logprob_BT: Tensor, mask_BT: Tensor, truncated_B: Tensor, weight: float,
                    num_completions: Tensor | float | None = None) -> Tensor:
    """rollout.truncated=penalise: weight x sum over the cut samples of sum_t log q(y_t), over the step's number of
    sampled completions. On the student's own samples its gradient is an unbiased estimate of the gradient of
    weight x P(cut) (the score function: grad E_q[c 1{cut}] = c E_q[1{cut} grad log q(y)]), so descending it makes
    the student less likely to run past max_new_tokens; the value itself is not P(cut) (rollout/truncated logs
    the share cut)."""
    per_row = torch.where(mask_BT.bool(), logprob_BT, torch.zeros_like(logprob_BT)).sum(-1)
    count = truncated_B.numel() if num_completions is None else num_completions
    return weight * (per_row * truncated_B.to(per_row.dtype)).sum() / max(float(count), 1.0)
