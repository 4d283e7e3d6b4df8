"""The subsequence-count DP against a brute-force oracle (spec §5.4, Appendix A), and the
forward deletion process that feeds it."""
from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch

from did.counting import dense_insertion_targets, sparse_insertion_targets
from did.process import delete

BOS = 0


# --- oracle (spec Appendix A) ----------------------------------------------------------------
def count_embeddings(s: list[int], x: list[int]) -> int:
    """N(s, x): the number of index sets of x that spell s (1-D distinct-subsequence DP)."""
    dp = [1] + [0] * len(s)
    for c in x:
        for j in range(len(s), 0, -1):
            if s[j - 1] == c:
                dp[j] += dp[j - 1]
    return dp[len(s)]


def brute_targets(x0: list[int], xt: list[int], vocab: int, anchor: int = 1) -> list[list[Fraction]]:
    """r[i][v] by enumerating every insertion, with x_t[:anchor] matched to x0[:anchor]
    (BOS, spec §12.15, plus a protected prompt); slots inside the anchor get nothing."""
    total = count_embeddings(xt[anchor:], x0[anchor:])
    assert total > 0
    r = []
    for i in range(len(xt)):
        row = []
        for v in range(vocab):
            y = xt[: i + 1] + [v] + xt[i + 1 :]
            hits = count_embeddings(y[anchor:], x0[anchor:]) if i >= anchor - 1 else 0
            row.append(Fraction(hits, total))
        r.append(row)
    return r


def one(x0: list[int], keep: list[int], vocab: int, **kw) -> torch.Tensor:
    return dense_insertion_targets(
        torch.tensor([x0]), torch.tensor([keep]).bool(), torch.tensor([len(x0)]), vocab, **kw
    )[0]


# --- spec §5.4 vectors ----------------------------------------------------------------------
def test_worked_example():
    r = one([BOS, 1, 2, 1], [1, 1, 0, 0], 3)  # x_t = [B, a]
    expected = torch.zeros(4, 3)
    expected[0, 1:] = 0.5
    expected[1, 1:] = 0.5
    torch.testing.assert_close(r, expected)
    assert r.sum().item() == pytest.approx(2.0)


def test_repeated_token_vector():
    r = one([BOS, 1, 1, 1], [1, 0, 1, 0], 3)  # x_t = [B, a], N = 3
    expected = torch.zeros(4, 3)
    expected[0, 1] = 1.0
    expected[1, 1] = 1.0
    torch.testing.assert_close(r, expected)


def test_unique_embedding_vector():
    r = one([BOS, 1, 2, 1, 2], [1, 0, 1, 1, 0], 3)  # x_t = [B, b, a], N = 1
    expected = torch.zeros(5, 3)
    expected[0, 1] = 1.0
    expected[2, 2] = 1.0
    torch.testing.assert_close(r, expected)


def test_bos_reappearing_is_anchored():
    """Spec §12.15: x0 = [E,a,E,b,E], x_t = [E,b] with BOS = E; the anchored targets sum to m - n."""
    E, a, b = 0, 1, 2
    r = one([E, a, E, b, E], [1, 0, 0, 1, 0], 3)
    expected = torch.zeros(5, 3)
    expected[0, a] = 1.0
    expected[0, E] = 1.0
    expected[1, E] = 1.0
    torch.testing.assert_close(r, expected)
    assert r.sum().item() == pytest.approx(3.0)


# --- random cases vs brute force ------------------------------------------------------------
def random_cases(count: int, seed: int, allow_bos_inside: bool):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        vocab = rng.randint(2, 4)
        m = rng.randint(1, 9)
        low = 0 if allow_bos_inside else 1
        x0 = [BOS] + [rng.randint(low, vocab - 1) for _ in range(m - 1)]
        keep = [1] + [rng.random() < 0.5 for _ in range(m - 1)]
        cases.append((x0, [int(k) for k in keep], vocab))
    return cases


def pad_batch(cases, width: int, pad_value: int):
    x0 = torch.full((len(cases), width), pad_value, dtype=torch.long)
    keep = torch.zeros((len(cases), width), dtype=torch.bool)
    keep[:, :] = torch.rand(len(cases), width) < 0.5  # garbage beyond the lengths must be ignored
    lengths = torch.tensor([len(c[0]) for c in cases])
    for b, (seq, kp, _) in enumerate(cases):
        x0[b, : len(seq)] = torch.tensor(seq)
        keep[b, : len(seq)] = torch.tensor(kp).bool()
    return x0, keep, lengths


@pytest.mark.parametrize("allow_bos_inside", [False, True])
def test_random_cases_match_brute_force(allow_bos_inside):
    cases = random_cases(300, seed=7 + allow_bos_inside, allow_bos_inside=allow_bos_inside)
    x0, keep, lengths = pad_batch(cases, width=11, pad_value=3)
    r = dense_insertion_targets(x0, keep, lengths, 4, out_dtype=torch.float64)
    for b, (seq, kp, vocab) in enumerate(cases):
        xt = [t for t, k in zip(seq, kp) if k]
        expected = torch.zeros(11, 4, dtype=torch.float64)
        expected[: len(xt), :vocab] = torch.tensor([[float(f) for f in row] for row in brute_targets(seq, xt, vocab)], dtype=torch.float64)
        torch.testing.assert_close(r[b], expected, atol=1e-12, rtol=0)
        assert r[b].sum().item() == pytest.approx(len(seq) - len(xt))


def test_protected_prompt_is_anchored():
    """A prompt that is never deleted is matched to itself: x0 = [B,a,b,a], prompt [B,a], x_t = [B,a]."""
    x0, keep = [BOS, 1, 2, 1], [1, 1, 0, 0]
    r = one(x0, keep, 3, protect=2)
    expected = torch.zeros(4, 3)
    expected[1, 1:] = 1.0  # "b a" after the prompt; nothing before its a
    torch.testing.assert_close(r, expected)
    assert one(x0, keep, 3)[0, 1:].tolist() == [0.5, 0.5]  # BOS-only anchoring: the a may be x0[3]

    rng = random.Random(5)
    cases = random_cases(150, seed=5, allow_bos_inside=False)
    protect = torch.tensor([rng.randint(1, len(c[0])) for c in cases])
    for (seq, kp, _), p in zip(cases, protect.tolist()):
        kp[:p] = [1] * p  # the process keeps the protected prefix
    x0b, keepb, lengths = pad_batch(cases, width=9, pad_value=0)
    dense = dense_insertion_targets(x0b, keepb, lengths, 4, protect=protect, out_dtype=torch.float64)
    sp = sparse_insertion_targets(x0b, keepb, lengths, 4, protect=protect, dp_dtype=torch.float64, threshold=0.0)
    packed = []
    for b, ((seq, kp, vocab), p) in enumerate(zip(cases, protect.tolist())):
        xt = [t for t, k in zip(seq, kp) if k]
        expected = torch.zeros(9, 4, dtype=torch.float64)
        brute = brute_targets(seq, xt, vocab, anchor=p)
        expected[: len(xt), :vocab] = torch.tensor([[float(f) for f in row] for row in brute], dtype=torch.float64)
        torch.testing.assert_close(dense[b], expected, atol=1e-12, rtol=0)
        packed.append(expected[: len(xt)])
    torch.testing.assert_close(sp.to_dense(4), torch.cat(packed), atol=1e-12, rtol=0)


def test_sparse_matches_dense_float32_and_float64():
    cases = random_cases(200, seed=3, allow_bos_inside=False)
    x0, keep, lengths = pad_batch(cases, width=9, pad_value=0)
    dense = dense_insertion_targets(x0, keep, lengths, 4, out_dtype=torch.float64)
    n = keep.logical_and(torch.arange(9)[None] < lengths[:, None]).sum(1)
    packed = torch.cat([dense[b, : n[b]] for b in range(len(cases))])  # slot rows in packed order
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        sp = sparse_insertion_targets(x0, keep, lengths, 4, dp_dtype=dtype, threshold=1e-6)
        assert sp.values.dtype == dtype and sp.n_rows == int(n.sum())
        assert (sp.values >= 1e-6).all()
        flat = sp.rows * 4 + sp.tokens
        assert flat.unique().numel() == flat.numel()  # coalesced
        torch.testing.assert_close(sp.to_dense(4), packed, atol=tol, rtol=0)


def test_sum_rule_and_threshold_on_realistic_batch():
    g = torch.Generator().manual_seed(0)
    B, L, V = 6, 200, 50
    x0 = torch.randint(1, V, (B, L), generator=g)
    x0[:, 0] = BOS
    lengths = torch.tensor([200, 150, 3, 1, 77, 199])
    d = delete(x0, lengths, generator=g)
    sp = sparse_insertion_targets(x0, d.keep, lengths, V, threshold=1e-6)
    seq_of_row = d.row_sequence()
    per_seq = torch.zeros(B, dtype=torch.float64).index_add_(0, seq_of_row[sp.rows], sp.values.double())
    # entries below 1e-6 are dropped, so the sum can only fall short by a tiny amount
    torch.testing.assert_close(per_seq, (lengths - d.lengths).double(), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 3e-3), (torch.float64, 1e-9)])
def test_huge_counts_stay_finite(dtype, rtol):
    """x0 = BOS + 1023 copies of one token: N = C(1023, n') ~ 1e306, r[i, a] = (m' - n') / (n' + 1).

    float32 log-counts near 700 carry ~1e-3 relative error after 1023 steps (the paper's
    choice; the bound uses float64)."""
    L = 1024
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((2, L), 1, dtype=torch.long)
    x0[:, 0] = BOS
    keep = torch.rand(2, L, generator=g) < torch.tensor([[0.5], [0.05]])
    keep[:, 0] = True
    # threshold 0: nothing dropped, so float64 must be exact to rounding
    sp = sparse_insertion_targets(x0, keep, torch.tensor([L, L]), 3, dp_dtype=dtype, threshold=0.0)
    n = keep.sum(1) - 1
    expected = (L - 1 - n).double() / (n + 1).double()
    assert torch.isfinite(sp.values).all()
    assert (sp.tokens == 1).all() and sp.rows.numel() == int((n + 1).sum())
    offset = torch.tensor([0, int(n[0]) + 1])
    seq = (sp.rows >= offset[1]).long()
    torch.testing.assert_close(sp.values.double(), expected[seq], rtol=rtol, atol=0)


def test_padding_and_batchmates_do_not_matter():
    cases = random_cases(12, seed=11, allow_bos_inside=False)
    x_a, k_a, l_a = pad_batch(cases, width=9, pad_value=2)
    x_b, k_b, l_b = pad_batch(cases[::-1], width=14, pad_value=1)
    r_a = dense_insertion_targets(x_a, k_a, l_a, 4)
    r_b = dense_insertion_targets(x_b, k_b, l_b, 4).flip(0)
    torch.testing.assert_close(r_a, r_b[:, :9])
    assert (r_b[:, 9:] == 0).all()


# --- forward process --------------------------------------------------------------------------
def test_deletion_keeps_bos_and_protected_prefix():
    g = torch.Generator().manual_seed(0)
    B, L = 64, 40
    x0 = torch.randint(1, 9, (B, L), generator=g)
    x0[:, 0] = BOS
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    d = delete(x0, lengths, generator=g, protect=5)
    assert d.keep[:, : 1].all()
    assert d.keep[:, :5][torch.arange(5)[None] < lengths[:, None]].all()
    assert not d.keep[torch.arange(L)[None] >= lengths[:, None]].any()
    assert torch.equal(d.lengths, d.keep.sum(1)) and d.tokens.numel() == int(d.lengths.sum())
    assert torch.equal(d.tokens, x0[d.keep])
    assert ((d.t >= 1e-3) & (d.t <= 1)).all()


def test_deletion_rate_follows_schedule():
    g = torch.Generator().manual_seed(2)
    B, L = 4, 20000
    x0 = torch.ones(B, L, dtype=torch.long)
    t = torch.tensor([0.001, 0.25, 0.5, 1.0], dtype=torch.float64)
    d = delete(x0, torch.full((B,), L), t, generator=g)
    kept = (d.lengths - 1).double() / (L - 1)
    alpha = 1 - (1 - 1e-3) * t
    assert torch.allclose(kept, alpha, atol=4 / (L**0.5))


def test_worked_example_tables():
    """Spec §5.4 P and S tables: with BOS only at index 0, the anchored DP on x0[1:], x_t[1:]
    sees P'[p][q] = P[p+1][q+1] and S'[p][q] = S[p+1][q+1]; its products are P[p+1][i+1] S[p+2][i+1]."""
    from did.counting import _tables

    P = [[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 2]]
    S = [[2, 2, 1], [0, 2, 1], [0, 1, 1], [0, 1, 1], [0, 0, 1]]
    tab = _tables(torch.tensor([[BOS, 1, 2, 1]]), torch.tensor([[1, 1, 0, 0]]).bool(), torch.tensor([4]), torch.float64)
    assert tab.log_n.exp().item() == pytest.approx(P[4][2]) == S[0][0]
    expected = torch.tensor([[P[p + 1][i + 1] * S[p + 2][i + 1] for i in range(2)] for p in range(3)], dtype=torch.float64)
    torch.testing.assert_close(tab.log_pair[:, 0].exp(), expected)
