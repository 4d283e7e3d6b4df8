"""The log-linear noise schedule shared by DID, MDLM and RADD (eps = 1e-3).

alpha(t) = 1 - (1 - eps) t is the probability that a token is still clean (kept) at time t;
sigma_bar(t) = -log alpha(t) is the cumulative noise, sigma(t) = d sigma_bar / dt the rate.
For this schedule the ELBO weight sigma(t) / (exp(sigma_bar(t)) - 1) equals 1/t exactly.
"""
from __future__ import annotations

import math

import torch

EPS = 1e-3  # schedule epsilon: at t = 1 a token survives with probability EPS
T_MIN = 1e-3  # training-time lower bound on t
SAMPLING_EPS = 1e-5  # samplers stop at this t


def alpha(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return 1 - (1 - eps) * t


def sigma_bar(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return -torch.log1p(-(1 - eps) * t)


def sigma(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return (1 - eps) / (1 - (1 - eps) * t)


def elbo_weight(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """sigma(t) / expm1(sigma_bar(t)), computed stably; equals 1/t for the log-linear schedule."""
    return sigma(t, eps) / torch.expm1(sigma_bar(t, eps))


def stratified_uniform(n: int, generator: torch.Generator | None = None, device=None, dtype=torch.float64) -> torch.Tensor:
    """n values in [0, 1), one per stratum [i/n, (i+1)/n), in a random order.

    Used for t per sequence in a batch and for the K Monte-Carlo samples of one sequence.
    """
    where = generator.device if generator is not None else "cpu"  # draw where the generator lives
    u = torch.rand(n, generator=generator, dtype=dtype, device=where)
    perm = torch.randperm(n, generator=generator, device=where)
    return ((perm.to(dtype) + u) / n).to(device)


def stratified_t(n: int, generator: torch.Generator | None = None, device=None, t_min: float = T_MIN) -> torch.Tensor:
    """Stratified t in [t_min, 1] (the "vdm"/antithetic sampler), float64."""
    return t_min + (1 - t_min) * stratified_uniform(n, generator, device)


#: strict DID bound: smallest time integrated (numerical clamp; see bound_times)
T_FLOOR = 1e-6
#: strict DID bound: share of the strata spent on the slice [T_FLOOR, T_MIN]
LOW_SLICE_SHARE = 0.25


def bound_times(b: int, k: int, generator: torch.Generator | None = None, device=None,
                t_floor: float = T_FLOOR, t_split: float = T_MIN, low_share: float = LOW_SLICE_SHARE):
    """(t [b, k], jac [b, k]): times for an unbiased stratified estimate of an integral over
    [t_floor, 1], as mean_j f(t_j) * jac_j (float64).

    u is stratified per row (k strata of [0, 1)) and mapped by a monotone change of variables:
    u < low_share -> log-uniform on [t_floor, t_split] (the slice where a 1/t weight makes plain
    uniform draws useless: an integrand like c/t gets the constant f * jac = c ln(t_split/t_floor)
    / low_share); u >= low_share -> uniform on [t_split, 1]. jac = dt/du, so E[f(t) jac] is
    exactly the integral of f over [t_floor, 1] whatever f is.
    """
    if not 0 < t_floor < t_split < 1 or not 0 < low_share < 1:
        raise ValueError("need 0 < t_floor < t_split < 1 and 0 < low_share < 1")
    u = torch.stack([stratified_uniform(k, generator) for _ in range(b)]).to(device) if b else \
        torch.zeros(0, k, dtype=torch.float64, device=device)
    span = math.log(t_split / t_floor)
    low = u < low_share
    t_low = t_floor * torch.exp(span * u / low_share)
    t_high = t_split + (1 - t_split) * (u - low_share) / (1 - low_share)
    t = torch.where(low, t_low, t_high)
    jac = torch.where(low, t_low * span / low_share, torch.full_like(u, (1 - t_split) / (1 - low_share)))
    return t, jac


def time_grid(steps: int, kind: str = "uniform", t_end: float = SAMPLING_EPS) -> torch.Tensor:
    """Sampling grid t_0 = 1 > t_1 > ... > t_steps = t_end (float64).

    'cosine' puts denser steps near t = 1 (t <- cos(pi/2 (1 - t)) applied to a uniform grid).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    u = torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64)
    if kind == "uniform":
        return u
    if kind == "cosine":
        g = torch.cos(torch.pi / 2 * (1 - u))
        g[-1] = t_end
        return g
    raise ValueError(f"unknown time grid {kind!r} (uniform|cosine)")


def update_rate(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Probability that a token absent at time t appears by time s < t: (t - s) / t.

    Equals both the 'euler' rate dt * sigma e^{-sb}/(1-e^{-sb}) and the 'tweedie' rate
    (alpha(s) - alpha(t)) / (1 - alpha(t)) for the log-linear schedule (eps cancels).
    """
    return (t - s) / t
