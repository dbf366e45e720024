"""MiniLLM-style policy gradient for the sequence-level reverse KL: a pure function of per-token tensors.

Objective: KL(q_theta(y|x) || p(y|x)) = -E_{y~q}[sum_t r_t], with reward r_t = log p(y_t|c_t) - log q_old(y_t|c_t)
(constants: no gradient flows through rewards or returns). Its gradient, with MiniLLM's single-step
decomposition (docs/algorithms.md):

    grad L = E[ sum_t grad KL(q_theta(.|c_t) || p(.|c_t)) ]           single-step term, exact over V
           - E[ sum_t w_t * R_{t+1} * grad log q_theta(y_t|c_t) ]     long-term term, sampled

Without the single-step term the long-term term uses R_t (it then carries r_t too). Returns are
R_t = sum_{t'>=t} discount^(t'-t) r_t'; with `length_norm` each return is divided by its number of
terms (MiniLLM; a heuristic that changes the objective, so exactness tests turn it off).

Samples may come from the teacher-mixed p~ = alpha p + (1-alpha) q_old. Importance weighting:
- `importance="token"` (MiniLLM, the default): w_t = q_old(y_t) / p~(y_t) on the long-term term
  only, a per-token approximation of the sequence weight; biased when alpha > 0, low variance.
- `importance="sequence"`: exact. A term that depends on y_<=k is weighted by
  W_<=k = prod_{s<=k} w_s: the single-step term at t by W_<t, and each reward r_t' inside a return by
  W_<=t'. Unbiased for any alpha (the enumeration test checks it), higher variance.
`is_clip` caps every weight (per token, or the cumulative product) to bound the variance.

A baseline b is subtracted from every return before weighting: a constant shift, so the long-term
term keeps (almost exactly) its expectation while its variance drops a lot when rewards are large
and same-signed (log p - log q is mostly negative). `baseline="mean"` uses this batch's mean return;
a number is a mean the caller computed over more samples (the training loop passes the mean over the
whole optimizer step, all micro-batches and processes, so a step's gradient does not depend on how
its samples are split). Off by default in this function (the exactness tests use the plain
estimator); the recipe default is `pg_baseline: mean`.

Several optimisation epochs per rollout use PPO's clipped ratio rho_t = q_theta(y_t)/q_old(y_t):
the long-term term is -min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t); at rho = 1 (first epoch)
its gradient is exactly -A_t grad log q_theta(y_t).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from onpolicy_kd.objectives.divergences import reduce_tokens

Tensor = torch.Tensor


@dataclass
class PolicyGradientOutput:
    loss: Tensor  # what to backpropagate
    metrics: dict[str, float] = field(default_factory=dict)  # detached values for logging


def discounted_returns(rewards_BT: Tensor, mask_BT: Tensor, discount: float) -> Tensor:
    """R_t = sum_{t' >= t, valid} discount^(t'-t) r_t' (reverse scan; masked rewards count as 0)."""
    rewards_BT = torch.where(mask_BT.bool(), rewards_BT, torch.zeros_like(rewards_BT))
    returns_BT = torch.zeros_like(rewards_BT)
    running_B = torch.zeros_like(rewards_BT[:, 0])
    for t in range(rewards_BT.shape[1] - 1, -1, -1):
        running_B = rewards_BT[:, t] + discount * running_B
        returns_BT[:, t] = running_B
    return returns_BT


def _next(x_BT: Tensor) -> Tensor:
    """x_{t+1} aligned at t (0 after the last position)."""
    return torch.cat([x_BT[:, 1:], torch.zeros_like(x_BT[:, :1])], dim=1)


@dataclass
class Returns:
    """The constants of the PG loss for one batch, all (B, T): computed before any gradient is taken."""

    rewards: Tensor  # r_t (shaped), 0 at padding
    future: Tensor  # the (length-normalised) return each sampled token is credited with, before the baseline
    single_step_weight: Tensor  # importance weight of the single-step term at t
    advantage_weight: Tensor  # importance weight of the long-term term at t


def pg_returns(
    old_logprobs_BT: Tensor,
    teacher_logprobs_BT: Tensor,
    mask_BT: Tensor,
    *,
    sample_logprobs_BT: Tensor | None = None,
    reward_shaping_BT: Tensor | None = None,
    single_step: bool = True,
    discount: float = 1.0,
    length_norm: bool = True,
    importance: Literal["token", "sequence"] = "token",
    is_clip: float | None = None,
) -> Returns:
    """Rewards, returns and importance weights (no gradient): see the module docstring."""
    if importance not in ("token", "sequence"):
        raise ValueError(f"importance={importance!r}: use 'token' or 'sequence'")
    mask = mask_BT.bool()
    zeros = torch.zeros_like(old_logprobs_BT)
    old = old_logprobs_BT.detach()
    rewards = (teacher_logprobs_BT.detach() - old)
    if reward_shaping_BT is not None:
        rewards = rewards - reward_shaping_BT.detach()
    rewards = torch.where(mask, rewards, zeros)

    # log importance weights log w_t = log q_old - log p~ (0 when sampling from the student itself)
    log_w = zeros if sample_logprobs_BT is None else torch.where(mask, old - sample_logprobs_BT.detach(), zeros)
    log_cap = None if is_clip is None else torch.log(torch.tensor(is_clip, dtype=log_w.dtype))
    if importance == "sequence":
        log_w_upto = torch.cumsum(log_w, dim=1)  # log W_<=t
        log_w_before = log_w_upto - log_w  # log W_<t
        if log_cap is not None:
            log_w_upto, log_w_before = log_w_upto.clamp(max=log_cap), log_w_before.clamp(max=log_cap)
        # Each reward weighted by the prefix weight up to its own token; the advantage at t needs no extra factor.
        returns = discounted_returns(rewards * log_w_upto.exp(), mask, discount)
        single_step_weight, advantage_weight = log_w_before.exp(), torch.ones_like(log_w)
    else:
        w = log_w.exp() if log_cap is None else log_w.clamp(max=log_cap).exp()
        returns = discounted_returns(rewards, mask, discount)
        single_step_weight, advantage_weight = torch.ones_like(w), w

    # Long-term return: from t+1 with the single-step term (which covers r_t exactly), else from t.
    future = _next(returns) if single_step else returns
    if length_norm:
        remaining = torch.flip(torch.cumsum(torch.flip(mask.to(returns.dtype), [1]), 1), [1])  # valid terms from t on
        n_terms = _next(remaining) if single_step else remaining
        future = future / n_terms.clamp_min(1)
    return Returns(rewards, torch.where(mask, future, zeros), single_step_weight, advantage_weight)


def policy_gradient_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    teacher_logprobs_BT: Tensor,
    mask_BT: Tensor,
    *,
    sample_logprobs_BT: Tensor | None = None,
    single_step_kl_BT: Tensor | None = None,
    reward_shaping_BT: Tensor | None = None,
    discount: float = 1.0,
    length_norm: bool = True,
    importance: Literal["token", "sequence"] = "token",
    is_clip: float | None = None,
    ppo_clip: float = 0.2,
    lm_loss: Tensor | None = None,
    lm_coef: float = 0.0,
    baseline: Literal["none", "mean"] | float | Tensor = "none",
    num_tokens: Tensor | int | None = None,
) -> PolicyGradientOutput:
    """The PG loss for one batch of completions (all tensors (B, T), aligned with the completion tokens).

    logprobs_BT: log q_theta(y_t|c_t) of the model being trained (carries the gradient).
    old_logprobs_BT: log q_old(y_t|c_t) recorded at rollout (behaviour student).
    teacher_logprobs_BT: log p(y_t|c_t).
    sample_logprobs_BT: log p~(y_t|c_t) of the distribution sampled from; None = the old student (alpha = 0).
    single_step_kl_BT: KL(q_theta(.|c_t) || p(.|c_t)) per position, with gradient; None = no single-step term.
    reward_shaping_BT: subtracted from the rewards (penalties in reward form), constant.
    baseline: "none", "mean" (this batch's mean return) or the value to subtract (e.g. a mean over a whole step).
    num_tokens: the global valid-token count for the reduction (default: the local one). Passing the number of
        sequences instead makes the loss a per-sequence sum, whose gradient estimates grad KL(q || p) itself.
    """
    returns = pg_returns(
        old_logprobs_BT, teacher_logprobs_BT, mask_BT, sample_logprobs_BT=sample_logprobs_BT,
        reward_shaping_BT=reward_shaping_BT, single_step=single_step_kl_BT is not None, discount=discount,
        length_norm=length_norm, importance=importance, is_clip=is_clip,
    )
    mask = mask_BT.bool()
    zeros = torch.zeros_like(returns.future)
    future = returns.future
    if isinstance(baseline, str):
        if baseline not in ("none", "mean"):
            raise ValueError(f"baseline={baseline!r}: use 'none', 'mean' or a number")
        baseline = future.sum() / mask.sum().clamp_min(1) if baseline == "mean" else 0.0
    future = torch.where(mask, future - baseline, zeros)
    advantage = torch.where(mask, returns.advantage_weight * future, zeros).detach()

    old = old_logprobs_BT.detach()
    ratio = torch.exp(logprobs_BT - old)
    surrogate = torch.minimum(ratio * advantage, torch.clamp(ratio, 1 - ppo_clip, 1 + ppo_clip) * advantage)
    pg_loss = reduce_tokens(-surrogate, mask, num_tokens)
    loss = pg_loss
    single_step = torch.zeros((), device=pg_loss.device, dtype=pg_loss.dtype)
    if single_step_kl_BT is not None:
        single_step = reduce_tokens(returns.single_step_weight.detach() * single_step_kl_BT, mask, num_tokens)
        loss = loss + single_step
    if lm_loss is not None and lm_coef:
        loss = loss + lm_coef * lm_loss

    with torch.no_grad():
        n_valid = mask.sum().clamp_min(1)
        clipped = ((ratio - 1).abs() > ppo_clip) & mask
        weight = returns.advantage_weight * returns.single_step_weight
        metrics = {
            "pg/loss": pg_loss.item(),
            "pg/single_step_kl": single_step.item(),
            "pg/reward": (returns.rewards.sum() / n_valid).item(),
            "pg/return": (future.sum() / n_valid).item(),
            "pg/ratio": (torch.where(mask, ratio, zeros).sum() / n_valid).item(),
            "pg/clip_frac": (clipped.sum() / n_valid).item(),
            "pg/is_weight": (torch.where(mask, weight, zeros).sum() / n_valid).item(),
        }
        if lm_loss is not None and lm_coef:
            metrics["pg/lm_loss"] = lm_loss.item()
    return PolicyGradientOutput(loss=loss, metrics=metrics)
