"""Is a difference between two methods larger than its noise? The tests the tables use.

Each test returns a `Diff`: the difference (method minus reference) in the metric's own
scale, a 95% interval for it, and whether the interval excludes 0. Which test fits depends on
how the numbers were drawn:

* likelihood bounds are computed on the SAME held-out sequences for every method, so the
  difference of two token-weighted bounds is tested pairwise, sequence by sequence
  (`paired_ratio_difference`: the delta-method standard error of sum d_i / sum N_i);
* sample metrics (generative perplexity, entropy, lengths) come from independent samples, so
  they are compared with a two-sample bootstrap (`bootstrap_difference`);
* with several training seeds per method, the seed-to-seed spread is noise too:
  `seed_difference` (Welch's t interval on the per-seed values). For bounds it is not all of it:
  every seed is scored on the same rows with the same Monte-Carlo draws, whose error its seeds
  share, so `combined_difference` adds the paired-over-rows error of the seed-averaged bounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Diff:
    """`estimate` = metric(method) - metric(reference); [lo, hi] its 95% interval."""

    estimate: float
    lo: float
    hi: float
    test: str

    @property
    def significant(self) -> bool:
        return bool(np.isfinite(self.lo) and np.isfinite(self.hi) and (self.lo > 0 or self.hi < 0))


def paired_ratio_difference(b_method, b_ref, n_tokens) -> Diff:
    """sum(B_m - B_ref) / sum N over the same sequences, with a paired delta-method interval."""
    bm, br, n = (np.asarray(x, np.float64) for x in (b_method, b_ref, n_tokens))
    if bm.shape != br.shape or bm.shape != n.shape or bm.size < 2 or n.sum() <= 0:
        return Diff(math.nan, math.nan, math.nan, "paired (not enough common sequences)")
    d = bm - br
    est = d.sum() / n.sum()
    se = math.sqrt(((d - est * n) ** 2).sum() / (d.size * (d.size - 1))) / n.mean()
    return Diff(float(est), float(est - Z95 * se), float(est + Z95 * se),
                f"paired over {d.size} common sequences (delta method)")


def bootstrap_difference(stat: Callable[[np.ndarray], float], a: np.ndarray, b: np.ndarray, *,
                         reps: int = 2000, seed: int = 0) -> Diff:
    """stat(a) - stat(b) with a 95% percentile bootstrap (a and b resampled independently).

    `a` and `b` are arrays of per-sample records (rows); `stat` maps such an array to a number.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return Diff(math.nan, math.nan, math.nan, "bootstrap (fewer than 2 samples)")
    rng = np.random.default_rng(seed)
    est = stat(a) - stat(b)
    draws = np.array([stat(a[rng.integers(0, len(a), len(a))]) - stat(b[rng.integers(0, len(b), len(b))])
                      for _ in range(int(reps))])
    draws = draws[np.isfinite(draws)]
    if draws.size < 10:
        return Diff(float(est), math.nan, math.nan, "bootstrap (degenerate)")
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return Diff(float(est), float(lo), float(hi), f"two-sample bootstrap ({len(a)} vs {len(b)} samples, {reps} reps)")


def log_token_ratio(rows: np.ndarray) -> float:
    """log of a token-weighted perplexity from rows (nll_sum, n_targets): sum nll / sum n."""
    n = rows[:, 1].sum()
    return float(rows[:, 0].sum() / n) if n > 0 else math.nan


def column_mean(rows: np.ndarray) -> float:
    return float(np.nanmean(rows[:, 0])) if len(rows) else math.nan


def seed_difference(values_method, values_ref) -> Diff:
    """mean(method) - mean(reference) over training seeds, Welch's t 95% interval."""
    from scipy import stats

    a, b = np.asarray(values_method, np.float64), np.asarray(values_ref, np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return Diff(math.nan, math.nan, math.nan, "seeds (fewer than 2 per method)")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    est = a.mean() - b.mean()
    se = math.sqrt(va + vb)
    if se == 0:
        return Diff(float(est), float(est), float(est), "seeds (no spread)")
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    q = float(stats.t.ppf(0.975, dof))
    return Diff(float(est), float(est - q * se), float(est + q * se), f"Welch t over {len(a)} vs {len(b)} seeds")


def combined_difference(seeds: Diff, rows: Diff) -> Diff:
    """Welch over seeds with the evaluation's own error added: the interval's half-widths (seed
    part: Welch's t; row part: the paired delta method over the same rows) add in quadrature
    around the seed-mean difference. Conservative: neither source of noise can hide the other."""
    if not (np.isfinite(seeds.lo) and np.isfinite(rows.lo)):
        return seeds if np.isfinite(seeds.lo) else rows
    half = math.hypot((seeds.hi - seeds.lo) / 2, (rows.hi - rows.lo) / 2)
    return Diff(seeds.estimate, seeds.estimate - half, seeds.estimate + half,
                f"{seeds.test} + {rows.test} (half-widths in quadrature)")
