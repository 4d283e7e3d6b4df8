"""The shared math of harness/core/schedule.py and harness/core/sampling.py (baselines spec 6.9 item 5)."""
import math

import torch

from harness.core import sampling, schedule


def test_elbo_weight_is_one_over_t():
    t = torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.elbo_weight(t), 1 / t)
    # the same identity written with alpha: -alpha'(t) / (1 - alpha(t))
    torch.testing.assert_close((1 - schedule.EPS) / (1 - schedule.alpha(t)), 1 / t)


def test_stratified_uniform_has_one_value_per_stratum():
    u = schedule.stratified_uniform(8, torch.Generator().manual_seed(0))
    assert sorted(torch.floor(u * 8).long().tolist()) == list(range(8))


def test_exp_race_matches_probabilities_in_float64():
    p = torch.tensor([0.5, 0.3, 0.2 - 1e-5, 1e-5], dtype=torch.float64)
    n = 1_000_000
    draws = sampling.exp_race(p.expand(n, 4), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).double()
    sd = torch.sqrt(n * p * (1 - p))
    assert bool(((counts - n * p).abs() <= 3 * sd + 1).all()), counts


def test_float64_exponential_reaches_below_float32_floor():
    """float32 -log(U) never goes below ~2^-24; the float64 draws used by the samplers do."""
    e = torch.empty(10_000_000, dtype=torch.float64).exponential_(1.0, generator=torch.Generator().manual_seed(1))
    assert float(e.min()) < 2.0**-24


def test_top_p_keeps_the_nucleus_and_renormalises():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    out = sampling.top_p_filter(p, 0.8)
    torch.testing.assert_close(out, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(sampling.top_p_filter(p, 1.0), p)


def test_generator_on_the_same_device_is_the_given_one():
    """(The cross-device branch, a CPU generator driving GPU sampling, needs a GPU: not tested here.)"""
    g = torch.Generator().manual_seed(3)
    assert sampling.generator_on("cpu", g) is g
    assert sampling.generator_on("cpu", None) is None


def test_bernoulli_at_least_one_is_the_conditional_law():
    import itertools

    from harness.core.sampling import bernoulli_at_least_one

    n, q = 20000, torch.tensor([0.3, 1e-4, 0.9, 0.5], dtype=torch.float64)
    eligible = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    hit, p_any = bernoulli_at_least_one(eligible.repeat_interleave(n, 0), q.repeat_interleave(n), torch.Generator().manual_seed(0))
    expected_any = 1 - (1 - q[:3]) ** 3
    torch.testing.assert_close(p_any.view(4, n)[:3, 0], expected_any)
    assert p_any.view(4, n)[3].eq(0).all() and not hit.view(4, n, 4)[3].any()   # nothing eligible
    hit = hit.view(4, n, 4)
    assert not hit[..., 0].any() and hit[:3].any(-1).all()                          # never BOS, always >= 1
    for row in range(3):
        counts = {}
        for pattern in hit[row, :, 1:].tolist():
            counts[tuple(pattern)] = counts.get(tuple(pattern), 0) + 1
        qq = float(q[row])
        for pattern in itertools.product((False, True), repeat=3):
            if not any(pattern):
                continue
            k = sum(pattern)
            p = qq**k * (1 - qq) ** (3 - k) / float(expected_any[row])
            assert abs(counts.get(pattern, 0) / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-4


def test_bound_times_integrate_over_floor_to_one():
    t, jac = schedule.bound_times(2000, 8, torch.Generator().manual_seed(0))
    assert t.min() >= schedule.T_FLOOR and t.max() < 1
    assert ((t < schedule.T_MIN).double().mean() - schedule.LOW_SLICE_SHARE).abs() < 1e-12   # stratified
    for f, exact in ((lambda x: torch.ones_like(x), 1 - schedule.T_FLOOR),
                     (lambda x: x**2, (1 - schedule.T_FLOOR**3) / 3),
                     (lambda x: -torch.log(x), 1 + schedule.T_FLOOR * (math.log(schedule.T_FLOOR) - 1))):
        est = (f(t) * jac).mean()
        assert abs(float(est) - exact) < 0.01 * exact
    # a c / t integrand costs the same on every draw of the slice: c ln(T_MIN / T_FLOOR) / share
    low = t < schedule.T_MIN
    torch.testing.assert_close((jac / t)[low], torch.full_like(t[low], math.log(1e3) / schedule.LOW_SLICE_SHARE))
