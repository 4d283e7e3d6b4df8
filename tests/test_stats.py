"""analysis.stats: the difference tests behind the significance marks, on hand-made values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analysis import stats


def test_paired_ratio_difference_hand_values():
    # d = (1, 1, 4), N = (1, 2, 3): estimate 6/6 = 1; residuals d - N = (0, -1, 1)
    d = stats.paired_ratio_difference([3.0, 4.0, 9.0], [2.0, 3.0, 5.0], [1, 2, 3])
    se = math.sqrt(2 / (3 * 2)) / 2
    assert d.estimate == pytest.approx(1.0)
    assert (d.lo, d.hi) == pytest.approx((1 - stats.Z95 * se, 1 + stats.Z95 * se))
    assert d.significant
    # pairing removes the shared per-sequence difficulty: a constant shift of 0.01 nats/token is
    # significant although the sequences themselves vary by nats
    rng = np.random.default_rng(0)
    n = rng.integers(10, 50, 200)
    hard = rng.normal(3.0, 1.0, 200) * n
    shifted = stats.paired_ratio_difference(hard + 0.01 * n + rng.normal(0, 0.01, 200), hard, n)
    assert shifted.significant and shifted.estimate == pytest.approx(0.01, abs=1e-3)
    same = stats.paired_ratio_difference(hard + rng.normal(0, 1.0, 200), hard, n)
    assert not same.significant
    assert not stats.paired_ratio_difference([1.0], [2.0], [1]).significant   # one sequence: no test


def test_bootstrap_difference_covers_the_true_gap():
    rng = np.random.default_rng(1)
    a = rng.normal(1.0, 1.0, (400, 1))
    b = rng.normal(0.0, 1.0, (400, 1))
    d = stats.bootstrap_difference(stats.column_mean, a, b, reps=500)
    assert d.lo < 1.0 < d.hi and d.significant
    assert d.estimate == pytest.approx(a.mean() - b.mean())
    null = stats.bootstrap_difference(stats.column_mean, b[:200], b[200:], reps=500)
    assert null.lo < 0 < null.hi and not null.significant
    # token-weighted log perplexity from (nll_sum, n_targets) rows
    rows = np.array([[2.0, 1.0], [6.0, 3.0]])
    assert stats.log_token_ratio(rows) == pytest.approx(2.0)


def test_seed_difference_matches_welch():
    from scipy import stats as sps

    a, b = [1.0, 1.2, 0.9, 1.1], [0.5, 0.7, 0.6]
    d = stats.seed_difference(a, b)
    p = sps.ttest_ind(a, b, equal_var=False).pvalue
    assert d.significant == (p < 0.05)
    assert d.estimate == pytest.approx(np.mean(a) - np.mean(b))
    assert not stats.seed_difference([1.0], [2.0, 3.0]).significant


def test_combined_difference_adds_the_evaluation_error_to_the_seed_spread():
    from analysis.stats import Diff, combined_difference

    seeds = Diff(-0.02, -0.03, -0.01, "Welch")          # significant on its own
    rows = Diff(-0.018, -0.058, 0.022, "paired")         # the shared rows and draws: wide
    both = combined_difference(seeds, rows)
    assert both.estimate == -0.02 and both.lo == pytest.approx(-0.02 - math.hypot(0.01, 0.04))
    assert both.hi == pytest.approx(-0.02 + math.hypot(0.01, 0.04)) and not both.significant
    assert combined_difference(seeds, Diff(math.nan, math.nan, math.nan, "none")) is seeds
