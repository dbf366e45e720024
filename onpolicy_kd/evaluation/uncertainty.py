"""How sure a held-out figure is: standard errors over prompts, and a bootstrap over training seeds and prompts.

A method's held-out figure varies with the training seed (which student a run hands back) and with the
prompts it is measured on. `seed_prompt_bootstrap` resamples both: each draw takes as many seeds as were run,
with replacement, and as many prompts as were measured, with replacement (the same prompts for every seed:
they are one held-out set), and averages the chosen cells. The standard deviation of the draws is the standard
error a table prints beside the mean, and their 2.5% and 97.5% quantiles the 95% interval.

`difference` does the same for the difference between two methods measured on the same prompts: the seeds of
each are drawn independently, the prompts once for both (a paired comparison, which removes the prompts' own
difficulty from the noise). A difference is real when its interval excludes 0.

With `weights` (e.g. each prompt's number of sampled tokens), a draw's figure is the weighted mean of its cells,
sum(w v) / sum(w): a token-level mean such as the held-out KL, resampled by prompt.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def standard_error(values: Sequence[float]) -> float:
    """The standard error of the mean of independent values (sample standard deviation / sqrt(n)); nan below 2
    values or with a non-finite one (an infinite perplexity)."""
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return math.nan
    return statistics.stdev(float(v) for v in values) / math.sqrt(len(values))


@dataclass(frozen=True)
class Estimate:
    mean: float  # the plain mean over every (seed, prompt) cell
    se: float  # the bootstrap standard error
    low: float  # 95% interval
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.se:.3f}"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _cells(values: Sequence[Sequence[float]]) -> np.ndarray:
    cells = np.asarray(values, dtype=np.float64)
    if cells.ndim != 2 or cells.shape[0] < 1 or cells.shape[1] < 1:
        raise ValueError(f"expected a (seeds, prompts) table of values, got shape {cells.shape}")
    return cells


def _weights(cells: np.ndarray, weights: Sequence[Sequence[float]] | None) -> np.ndarray:
    if weights is None:
        return np.ones_like(cells)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != cells.shape:
        raise ValueError(f"weights of shape {w.shape} for values of shape {cells.shape}")
    return w


def _mean(cells: np.ndarray, w: np.ndarray, seeds: np.ndarray | slice, prompts: np.ndarray | slice) -> float:
    index = np.ix_(seeds, prompts) if isinstance(seeds, np.ndarray) else (seeds, prompts)
    chosen_w = w[index]
    return float((cells[index] * chosen_w).sum() / max(chosen_w.sum(), 1e-300))


def _estimate(mean: float, draws: np.ndarray) -> Estimate:
    low, high = np.quantile(draws, [0.025, 0.975])
    return Estimate(mean, float(draws.std(ddof=1)), float(low), float(high))


def seed_prompt_bootstrap(values: Sequence[Sequence[float]], draws: int = 2000, seed: int = 0,
                          weights: Sequence[Sequence[float]] | None = None) -> Estimate:
    """`values[s][p]`: the figure of training seed s on prompt p. The mean, and its bootstrap standard error and
    95% interval over seeds and prompts (module docstring)."""
    cells = _cells(values)
    w = _weights(cells, weights)
    rng = np.random.default_rng(seed)
    n_seeds, n_prompts = cells.shape
    means = np.empty(draws)
    for d in range(draws):
        means[d] = _mean(cells, w, rng.integers(0, n_seeds, n_seeds), rng.integers(0, n_prompts, n_prompts))
    return _estimate(_mean(cells, w, slice(None), slice(None)), means)


def difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], draws: int = 2000, seed: int = 0,
               weights_a: Sequence[Sequence[float]] | None = None,
               weights_b: Sequence[Sequence[float]] | None = None) -> Estimate:
    """mean(a) - mean(b) for two methods measured on the same prompts (columns): seeds resampled for each method
    on its own, prompts once for both."""
    cells_a, cells_b = _cells(a), _cells(b)
    if cells_a.shape[1] != cells_b.shape[1]:
        raise ValueError(f"the two methods were measured on {cells_a.shape[1]} and {cells_b.shape[1]} prompts; a "
                         f"paired difference needs the same prompts")
    w_a, w_b = _weights(cells_a, weights_a), _weights(cells_b, weights_b)
    rng = np.random.default_rng(seed)
    n_prompts = cells_a.shape[1]
    diffs = np.empty(draws)
    for d in range(draws):
        prompts = rng.integers(0, n_prompts, n_prompts)
        seeds_a = rng.integers(0, cells_a.shape[0], cells_a.shape[0])
        seeds_b = rng.integers(0, cells_b.shape[0], cells_b.shape[0])
        diffs[d] = _mean(cells_a, w_a, seeds_a, prompts) - _mean(cells_b, w_b, seeds_b, prompts)
    everything = slice(None), slice(None)
    return _estimate(_mean(cells_a, w_a, *everything) - _mean(cells_b, w_b, *everything), diffs)
