"""DISE / DICE values (spec §4, §5.4 loss test) and the output heads (spec §6.3)."""
from __future__ import annotations

import math

import pytest
import torch

from did.counting import SparseTargets, dense_insertion_targets, sparse_insertion_targets
from did.heads import CSoftmaxHead, SeqNormHead, prompt_blocked_slots, segment_log_softmax
from did.loss import dice, dise
from did.process import delete
from harness.core.batch import Vocab
from harness.core.schedule import elbo_weight

VOCAB = Vocab(size=12, bos=0, eos=1, pad=2, mask=3)


def random_batch(B, L, seed, fixed=False):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(4, VOCAB.size, (B, L), generator=g)
    x0[:, 0] = VOCAB.bos
    lengths = torch.full((B,), L) if fixed else torch.randint(1, L + 1, (B,), generator=g)
    d = delete(x0, lengths, generator=g)
    return x0, lengths, d


def test_dise_is_zero_at_the_exact_scores():
    x0, lengths, d = random_batch(8, 15, seed=0)
    targets = sparse_insertion_targets(x0, d.keep, lengths, VOCAB.size, dp_dtype=torch.float64, threshold=0.0)
    log_r = targets.to_dense(VOCAB.size).log()
    loss = dise(log_r, targets, d.row_sequence(), elbo_weight(d.t), acc_dtype=torch.float64)
    assert loss.shape == (8,)
    torch.testing.assert_close(loss, torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)
    # any other score is strictly worse
    worse = dise(log_r + 0.1, targets, d.row_sequence(), elbo_weight(d.t), acc_dtype=torch.float64)
    assert bool((worse[d.lengths < lengths] > 0).all())


def test_point_mass_by_hand():
    """x0 = [B, a, b], x_t = [B, b]: r[0, a] = 1 is the only target. t = 0.5 so w = 2."""
    a, b = 4, 5
    x0 = torch.tensor([[VOCAB.bos, a, b]])
    keep = torch.tensor([[True, False, True]])
    targets = sparse_insertion_targets(x0, keep, torch.tensor([3]), VOCAB.size)
    assert targets.rows.tolist() == [0] and targets.tokens.tolist() == [a] and targets.values.tolist() == [1.0]
    s = torch.zeros(2, VOCAB.size)
    s[0, a], s[0, b], s[1, a], s[1, b] = 0.5, 0.25, 0.1, 0.2
    w = elbo_weight(torch.tensor([0.5], dtype=torch.float64))
    assert w.item() == pytest.approx(2.0)
    rows = torch.tensor([0, 0])
    got_dise = dise(s.log(), targets, rows, w, acc_dtype=torch.float64).item()
    got_dice = dice(s.log(), targets, rows, w, acc_dtype=torch.float64).item()
    assert got_dise == pytest.approx(2 * ((0.5 + 0.25 + 0.1 + 0.2) - math.log(0.5) + (0.0 - 1)))
    assert got_dice == pytest.approx(2 * (0.0 - math.log(0.5)))


def seqnorm_scores(L, lengths, seed, blocked=None):
    torch.manual_seed(seed)
    head = SeqNormHead(16, VOCAB, seq_len=L)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    h = torch.randn(int(lengths.sum()), 16)
    return head(h, lengths, blocked)


def test_seqnorm_total_mass_is_L_minus_n():
    L = 20
    lengths = torch.tensor([1, 5, 19, 20, 7])
    log_s = seqnorm_scores(L, lengths, seed=1)
    seq = torch.repeat_interleave(torch.arange(5), lengths)
    mass = torch.zeros(5, dtype=torch.float64).index_add(0, seq, log_s.double().exp().sum(-1))
    torch.testing.assert_close(mass, (L - lengths).double() + 1e-4, rtol=1e-5, atol=0)
    for tok in (VOCAB.bos, VOCAB.pad, VOCAB.mask):
        assert torch.isneginf(log_s[:, tok]).all()
    assert torch.isfinite(log_s[:, VOCAB.eos]).all()


def test_seqnorm_prompt_slots_get_no_mass():
    L = 20
    lengths = torch.tensor([6, 9])
    blocked = prompt_blocked_slots(lengths, torch.tensor([4, 1]))
    assert blocked.tolist() == [True, True, True, False, False, False] + [False] * 9
    log_s = seqnorm_scores(L, lengths, seed=2, blocked=blocked)
    assert torch.isneginf(log_s[blocked]).all()
    mass0 = log_s[:6].double().exp().sum()
    assert mass0.item() == pytest.approx(L - 6 + 1e-4, rel=1e-5)


def test_dice_equals_dise_under_seqnorm():
    L = 16
    x0, lengths, d = random_batch(10, L, seed=3, fixed=True)
    targets = sparse_insertion_targets(x0, d.keep, lengths, VOCAB.size, dp_dtype=torch.float64, threshold=0.0)
    log_s = seqnorm_scores(L, d.lengths, seed=4).double()
    w = elbo_weight(d.t)
    a = dise(log_s, targets, d.row_sequence(), w, acc_dtype=torch.float64)
    b = dice(log_s, targets, d.row_sequence(), w, acc_dtype=torch.float64)
    # difference = w * (sum s - sum r) = w * 1e-4, up to the float32 rounding of the head
    assert bool(((a - b - 1e-4 * w).abs() <= 2e-5 * w).all())
    assert bool((a > 0).all())


def test_csoftmax_count_is_clamped_and_specials_suppressed():
    head = CSoftmaxHead(8, VOCAB, max_len=10)
    with torch.no_grad():
        head.count.bias.fill_(5.0)  # e^5 > 10: clamped to log 10
    lengths = torch.tensor([3, 2])
    log_s = head(torch.randn(5, 8), lengths)
    row_mass = log_s.exp().sum(-1)
    torch.testing.assert_close(row_mass, torch.full((5,), 10.0))
    for tok in (VOCAB.bos, VOCAB.pad, VOCAB.mask):
        assert torch.isneginf(log_s[:, tok]).all()
    blocked = torch.tensor([True, False, False, False, False])
    assert torch.isneginf(head(torch.randn(5, 8), lengths, blocked)[0]).all()


def test_segment_log_softmax_matches_per_segment():
    z = torch.randn(9)
    seq = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
    got = segment_log_softmax(z, seq, 4)
    for s in range(4):
        torch.testing.assert_close(got[seq == s], torch.log_softmax(z[seq == s], 0))


def test_dise_gradient_points_to_the_targets():
    """d DISE / d log s = w (s - r): gradient descent moves s towards r."""
    x0, lengths, d = random_batch(4, 10, seed=5)
    targets = sparse_insertion_targets(x0, d.keep, lengths, VOCAB.size, dp_dtype=torch.float64, threshold=0.0)
    log_s = torch.randn(int(d.lengths.sum()), VOCAB.size, dtype=torch.float64, requires_grad=True)
    w = elbo_weight(d.t)
    dise(log_s, targets, d.row_sequence(), w, acc_dtype=torch.float64).sum().backward()
    r = targets.to_dense(VOCAB.size)
    expected = w[d.row_sequence()][:, None] * (log_s.detach().exp() - r)
    torch.testing.assert_close(log_s.grad, expected)


def test_dense_and_sparse_targets_agree_in_the_loss():
    x0, lengths, d = random_batch(6, 12, seed=6)
    sp = sparse_insertion_targets(x0, d.keep, lengths, VOCAB.size, dp_dtype=torch.float64, threshold=0.0)
    dense = dense_insertion_targets(x0, d.keep, lengths, VOCAB.size, out_dtype=torch.float64)
    packed = torch.cat([dense[b, : d.lengths[b]] for b in range(6)])
    nz = packed.nonzero(as_tuple=True)
    as_sparse = SparseTargets(rows=nz[0], tokens=nz[1], values=packed[nz], n_rows=packed.shape[0])
    log_s = torch.randn(packed.shape[0], VOCAB.size, dtype=torch.float64)
    w = elbo_weight(d.t)
    torch.testing.assert_close(
        dise(log_s, sp, d.row_sequence(), w, acc_dtype=torch.float64),
        dise(log_s, as_sparse, d.row_sequence(), w, acc_dtype=torch.float64),
    )
