"""Categorical sampling in float64 and nucleus (top-p) filtering, shared by every sampler.

Float64 matters: a float32 Exp(1) draw is never below ~2^-24, so tail tokens are
under-sampled and generative perplexity looks better than it is (baselines spec section 0).
"""
from __future__ import annotations

import torch


def generator_on(device, generator: torch.Generator | None) -> torch.Generator | None:
    """A generator usable on `device`: the given one, or one seeded from it (deterministic), so a
    CPU generator can drive sampling on a GPU and vice versa."""
    if generator is None or generator.device.type == torch.device(device).type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def exp_race(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample an index per row with probability proportional to the non-negative `weights`.

    Exponential race: argmax_v w_v / E_v with E_v ~ Exp(1), computed in float64. Rows need not
    be normalised; negative weights are treated as 0. Returns LongTensor of shape weights.shape[:-1].
    """
    w = weights.to(torch.float64).clamp_min(0)
    e = torch.empty_like(w).exponential_(1.0, generator=generator)
    return torch.argmax(w / e, dim=-1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero out the tail of each row beyond cumulative mass `top_p` (rows renormalised).

    The most likely token of every row is always kept. top_p >= 1 returns probs unchanged.
    """
    if top_p >= 1.0:
        return probs
    if not 0.0 < top_p < 1.0:
        raise ValueError("top_p must be in (0, 1]")
    p = probs.to(torch.float64)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    sorted_p, idx = torch.sort(p, dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    drop_sorted = (cum - sorted_p) >= top_p  # mass before this token already reaches top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
    p = p.masked_fill(drop, 0.0)
    return p / p.sum(-1, keepdim=True)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Draw one index per row from (unnormalised) probabilities, optionally nucleus-filtered."""
    return exp_race(top_p_filter(probs, top_p) if top_p < 1.0 else probs, generator)


def uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform [0, 1) float64 draws made on the generator's device and moved to `device` (the same
    numbers whichever device runs the method, for a given generator)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=where).to(device)


def bernoulli_at_least_one(eligible: torch.Tensor, rate: torch.Tensor,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hit [B, L] bool, p_any [B] float64): independent Bernoulli(rate[b]) hits over the eligible
    positions of each row, conditioned on at least one hit, and the probability of that event.

    Why: the likelihood bounds weight a corruption at time t by 1/t, and at small t a corruption
    is rare (probability ~ t x length), so the plain estimator has a heavy tail. Splitting
    E[f(x_t)] = P(none) f(x0) + P(>= 1) E[f(x_t) | >= 1] and sampling the second term
    conditioned keeps every draw of order 1 (P(>= 1) / t stays bounded) with the same expectation.

    Exact sampler: the first hit J among the D eligible positions is truncated-geometric,
    P(J = j | >= 1) = q (1 - q)^j / p_any, and the positions after J are independent Bernoulli(q).
    Rows with no eligible position get no hit and p_any = 0.
    """
    q = rate.to(torch.float64).to(eligible.device).clamp(0.0, 1.0)
    n_eligible = eligible.sum(1).to(torch.float64)
    log_keep = torch.log1p(-q.clamp_max(1 - 1e-16))
    p_any = -torch.expm1(n_eligible * log_keep)
    u = uniform(q.shape, generator, eligible.device)
    first = torch.floor(torch.log1p(-u * p_any) / log_keep)
    first = torch.minimum(first, (n_eligible - 1).clamp_min(0)).nan_to_num(0.0).long()
    rank = torch.cumsum(eligible.long(), 1) - 1
    later = uniform(eligible.shape, generator, eligible.device) < q[:, None]
    hit = eligible & ((rank == first[:, None]) | ((rank > first[:, None]) & later))
    hit &= (n_eligible > 0)[:, None]
    return hit, p_any
