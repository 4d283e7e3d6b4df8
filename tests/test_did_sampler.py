"""The DID sampler against oracle score functions (spec §7)."""
from __future__ import annotations

import pytest
import torch

from did.counting import dense_insertion_targets
from did.sampler import sample

BOS, V = 0, 6


def embed_greedy(x: list[int], x0: list[int]) -> list[bool]:
    """A keep mask of x0 that spells x (leftmost embedding); targets do not depend on which."""
    keep, j = [False] * len(x0), 0
    for p, tok in enumerate(x0):
        if j < len(x) and tok == x[j]:
            keep[p], j = True, j + 1
    assert j == len(x), "the sampler left the support of the oracle"
    return keep


class Oracle:
    """Exact scores r(x_t, x0) for one known x0: the data distribution is a point mass."""

    def __init__(self, x0: list[int], protect: int = 1):
        self.x0 = x0
        self.protect = protect
        self.calls = 0
        self.sequences_scored = 0
        self.sigmas = []

    def __call__(self, tokens, lengths, sigma):
        self.calls += 1
        self.sequences_scored += len(lengths)
        self.sigmas.append(sigma)
        out = []
        for x in tokens.split(lengths.tolist()):
            keep = torch.tensor([embed_greedy(x.tolist(), self.x0)])
            r = dense_insertion_targets(
                torch.tensor([self.x0]), keep, torch.tensor([len(self.x0)]), V, protect=self.protect
            )[0, : len(x)]
            out.append(r.log())
        return torch.cat(out)


X0 = [BOS, 3, 1, 4, 1, 5, 2, 5, 3, 5, 4, 2]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_oracle_regenerates_x0_with_many_steps(top_p):
    oracle = Oracle(X0)
    g = torch.Generator().manual_seed(0)
    out = sample(oracle, 8, 200, bos=BOS, cap=64, time_conditioned=True, generator=g, top_p=top_p)
    assert out.sequences == [X0] * 8
    assert out.nfe == oracle.calls <= 200
    assert all(s is not None and s.shape == (len(s),) for s in oracle.sigmas)
    assert len(out.trajectory) == 200 and out.trajectory[-1] == [len(X0) - 1] * 8
    # lengths never shrink, and grow by at most a factor 2 (+BOS slot) per step
    for before, after in zip(out.trajectory, out.trajectory[1:]):
        assert all(b <= a <= 2 * b + 1 for b, a in zip(before, after))


def test_oracle_regenerates_x0_with_few_steps():
    """Two steps: step 1 inserts one of the two tokens (VOID has prob 1e-5), step 2 the other."""
    x0 = [BOS, 4, 5]
    g = torch.Generator().manual_seed(1)
    out = sample(Oracle(x0), 16, 2, bos=BOS, cap=16, time_conditioned=True, generator=g)
    assert out.sequences == [x0] * 16
    assert [row[0] for row in out.trajectory] == [1, 2]
    x0 = [BOS, 4, 5, 3, 1]  # 4 tokens in 3 steps: 1 -> 2 -> 4 content tokens needs every draw right
    out = sample(Oracle(x0), 16, 3, bos=BOS, cap=16, time_conditioned=True, generator=g)
    assert all(len(s) <= 5 for s in out.sequences)
    assert all(x in (x0,) or embed_greedy(x, x0) for x in out.sequences)


def test_single_step_probabilities():
    """One (last) step from [BOS]: insert with prob 1.001 * sum(s), token proportional to s."""
    s = torch.tensor([0.0, 0.0, 0.1, 0.2, 0.0, 0.0])

    def score_fn(tokens, lengths, sigma):
        return s.log().expand(len(tokens), V)

    g = torch.Generator().manual_seed(2)
    n = 20000
    out = sample(score_fn, n, 1, bos=BOS, cap=8, time_conditioned=False, generator=g)
    lens = torch.tensor([len(x) for x in out.sequences])
    p_insert = (lens == 2).double().mean().item()
    assert p_insert == pytest.approx(1.001 * 0.3, abs=4 * (0.3 * 0.7 / n) ** 0.5)
    inserted = torch.tensor([x[1] for x in out.sequences if len(x) == 2])
    assert set(inserted.tolist()) <= {2, 3}
    frac3 = (inserted == 3).double().mean().item()
    assert frac3 == pytest.approx(2 / 3, abs=4 * (2 / 9 / len(inserted)) ** 0.5)
    assert out.nfe == 1


def test_cache_recomputes_only_changed_sequences():
    oracle = Oracle(X0)
    g = torch.Generator().manual_seed(3)
    out = sample(oracle, 6, 60, bos=BOS, cap=64, time_conditioned=False, cache=True, generator=g)
    assert out.sequences == [X0] * 6
    assert all(s is None for s in oracle.sigmas)
    assert out.nfe == oracle.calls < 60
    assert out.info["sequence_evaluations"] == oracle.sequences_scored < 6 * 60
    # a sequence is rescored only after it changed: at most one evaluation per length increase + 1
    assert out.info["sequence_evaluations"] <= 6 * len(X0)


def test_cap_stops_growth():
    """Distinct tokens: every embedding is unique, so parallel insertions (tau-leaping, the
    last step inserts everything still predicted) can never conflict; with repeated tokens two
    slots may insert copies that match different embeddings, which no finite-step sampler avoids."""
    x0 = [BOS, 1, 2, 3, 4, 5]
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        out = sample(Oracle(x0), 8, 100, bos=BOS, cap=4, time_conditioned=False, cache=True, generator=g)
        assert all(len(x) == 4 for x in out.sequences)
        assert all(embed_greedy(x, x0) for x in out.sequences)  # still subsequences of x0
        assert out.info["reached_cap"] == 8


def test_prompt_is_kept_and_its_slots_blocked():
    prompt = X0[1:4]
    oracle = Oracle(X0, protect=len(prompt) + 1)
    g = torch.Generator().manual_seed(5)
    out = sample(oracle, 4, 100, bos=BOS, cap=64, time_conditioned=True, generator=g, prompt=prompt)
    assert out.sequences == [X0] * 4
    assert out.trajectory[0][0] >= len(prompt)

    def uniform(tokens, lengths, sigma):  # would insert everywhere if slots were not blocked
        return torch.zeros(len(tokens), V)

    out = sample(uniform, 4, 3, bos=BOS, cap=64, time_conditioned=False, generator=g, prompt=prompt, forbidden=[BOS])
    for x in out.sequences:
        assert x[: len(prompt) + 1] == [BOS] + prompt and BOS not in x[1:]


def test_generator_makes_samples_reproducible():
    def score_fn(tokens, lengths, sigma):
        return torch.full((len(tokens), V), -1.0)

    a = sample(score_fn, 5, 10, bos=BOS, cap=30, time_conditioned=True, generator=torch.Generator().manual_seed(9))
    b = sample(score_fn, 5, 10, bos=BOS, cap=30, time_conditioned=True, generator=torch.Generator().manual_seed(9))
    assert a.sequences == b.sequences and a.trajectory == b.trajectory


def _draw_all_float64(log_scores, rho, blocked, forbidden, top_p, gen):
    """The reference draw: every slot's probabilities in float64 (the sampler before screening)."""
    from harness.core import sampling

    probs = log_scores.to(torch.float64).exp() * rho
    if forbidden is not None:
        probs[:, forbidden] = 0.0
    total = probs.sum(-1)
    u = torch.rand(total.shape, generator=gen, dtype=torch.float64)
    insert = u < total.clamp(max=1.0)
    tok = torch.full_like(insert, -1, dtype=torch.long)
    if insert.any():
        tok[insert] = sampling.sample_categorical(probs[insert], gen, top_p=top_p)
    return tok.masked_fill(blocked, -1)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("rho", [0.05, 0.5, 1.001])
def test_screened_draw_equals_the_all_float64_draw(top_p, rho):
    from did.sampler import _draw

    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        R, V = 300, 37
        # totals spread over (0, 3): many slots near the insert/VOID boundary
        log_scores = torch.randn(R, V, generator=g) + torch.empty(R, 1).uniform_(-6, 1, generator=g)
        forbidden = torch.tensor([0, 5])
        if seed % 2:  # the model's own suppression: forbidden columns already at -inf
            log_scores[:, forbidden] = float("-inf")
        blocked = torch.rand(R, generator=g) < 0.1
        got = _draw(log_scores, rho, blocked, forbidden, top_p, torch.Generator().manual_seed(seed))
        ref = _draw_all_float64(log_scores, rho, blocked, forbidden, top_p, torch.Generator().manual_seed(seed))
        assert torch.equal(got, ref), seed


@pytest.mark.parametrize("tolerance", [0.0, 10.0])
def test_both_screen_branches_give_the_float64_draw(monkeypatch, tolerance):
    """tolerance 10: every slot is re-decided in float64; 0: the float32 screen decides alone."""
    from did import sampler

    monkeypatch.setattr(sampler, "SCREEN_TOLERANCE", tolerance)
    g = torch.Generator().manual_seed(7)
    log_scores = torch.randn(500, 23, generator=g) + torch.empty(500, 1).uniform_(-5, 1, generator=g)
    blocked = torch.zeros(500, dtype=torch.bool)
    got = sampler._draw(log_scores, 0.3, blocked, None, 1.0, torch.Generator().manual_seed(1))
    ref = _draw_all_float64(log_scores, 0.3, blocked, None, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(got, ref)
