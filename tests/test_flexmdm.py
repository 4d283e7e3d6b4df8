"""FlexMDM: the worked examples E1-E7 of spec flexmdm.md section 6, the oracle bound of an
enumerable source (ln 2 for "ab", the alignment slack, >= the exact NLL), and the method on a
micro backbone (loss, bound estimator, sampler invariants, prompts)."""
from __future__ import annotations

import math

import pytest
import torch

from baselines.flexmdm import (
    Corrupted,
    bregman,
    corrupt,
    draw_clocks,
    insert_masks,
    marginals,
    oracle_bound,
    oracle_posterior,
    sequence_loss,
    unmask_probability,
)
from harness.core import backbone
from harness.core.batch import Batch, Vocab
from harness.core.methods import UserError, build

BOS, EOS, PAD, MASK = 0, 1, 2, 3
A, B, C = 4, 5, 6
VOCAB = Vocab(size=8, bos=BOS, eos=EOS, pad=PAD, mask=MASK)


# --- E1: corruption from deterministic clocks -----------------------------------------------------
@pytest.mark.parametrize("t, y, masked, gaps", [
    (0.5, [BOS, MASK, C], [False, True, False], [1, 0, 0]),
    (0.8, [BOS, MASK, B, C], [False, True, False, False], [0, 0, 0, 0]),
    (0.1, [BOS], [False], [3]),
])
def test_e1_corruption(t, y, masked, gaps):
    x0 = torch.tensor([[BOS, A, B, C]])
    tau = torch.tensor([[0.0, 0.7, 0.2, 0.4]], dtype=torch.float64)
    sigma = torch.tensor([[0.0, 0.9, 0.6, 0.45]], dtype=torch.float64)
    c = corrupt(x0, torch.tensor([4]), torch.tensor([t], dtype=torch.float64), tau, sigma, MASK)
    assert c.tokens.tolist() == y and c.masked.tolist() == masked and c.gaps.tolist() == gaps
    assert c.lengths.tolist() == [len(y)]
    if t == 0.5:
        assert c.targets[1].item() == B
    if t == 0.8:
        assert c.targets[1].item() == A
    assert sum(gaps) == 3 - (len(y) - 1)  # E7: sum_j k_j = n - m


# --- E2: marginals ----------------------------------------------------------------------------------
def test_e2_marginals_closed_form_and_monte_carlo():
    assert marginals(0.5) == pytest.approx((0.5, 0.346574, 0.153426), abs=1e-6)
    assert marginals(0.9) == pytest.approx((0.1, 0.230259, 0.669741), abs=1e-6)
    assert math.prod(marginals(0.5)) == pytest.approx(0.026587, abs=1e-6)
    tau, sigma = draw_clocks((200_000,), torch.Generator().manual_seed(0), "cpu")
    absent = (0.5 < tau).double().mean().item()
    masked = ((tau <= 0.5) & (0.5 < sigma)).double().mean().item()
    assert absent == pytest.approx(0.5, abs=0.004) and masked == pytest.approx(0.346574, abs=0.004)


# --- E3 / E6: loss value and Bregman values ---------------------------------------------------------
def test_e6_bregman_values_and_minimiser():
    k = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    lam = torch.tensor([3.0, 1.0, 2.0, 0.7], dtype=torch.float64)
    assert bregman(k, lam).tolist() == pytest.approx([0.0, 0.386294, 0.306853, 0.7], abs=1e-6)
    # E[D(k, lam)] over k ~ {0, 2} is minimised at lam = E[k] = 1
    grid = torch.linspace(0.5, 1.5, 101, dtype=torch.float64)
    mean = 0.5 * bregman(torch.zeros_like(grid), grid) + 0.5 * bregman(torch.full_like(grid, 2.0), grid)
    assert grid[mean.argmin()].item() == pytest.approx(1.0, abs=0.011)


def test_e3_loss_value():
    c = Corrupted(tokens=torch.tensor([BOS, MASK, C]), lengths=torch.tensor([3]), seq=torch.zeros(3, dtype=torch.long),
                  masked=torch.tensor([False, True, False]), targets=torch.tensor([BOS, B, C]),
                  gaps=torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    log_phi = torch.tensor([0.0, math.log(0.25), 0.0], dtype=torch.float64)
    lam = torch.tensor([0.5, 0.2, 1.0], dtype=torch.float64)
    assert sequence_loss(log_phi, lam, c, torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(5.558883, abs=1e-6)


# --- E4: the oracle's bound and the alignment slack -------------------------------------------------
def test_e4_oracle_bound_is_ln2_for_one_two_token_sequence():
    assert oracle_bound({("a", "b"): 1.0}, ("a", "b")) == pytest.approx(math.log(2), abs=1e-7)
    assert oracle_bound({("a", "a"): 1.0}, ("a", "a")) == pytest.approx(math.log(2), abs=1e-7)
    # spec 4.4's Monte-Carlo slack for three distinct tokens: about 1.56 nats
    assert oracle_bound({(0, 1, 2): 1.0}, (0, 1, 2)) == pytest.approx(1.56, abs=0.01)


def test_oracle_bound_is_at_least_the_exact_nll():
    source = {("a", "b"): 0.5, ("b", "a"): 0.3, ("a",): 0.2}
    for x, p in source.items():
        assert oracle_bound(source, x) >= -math.log(p) - 1e-9
    assert oracle_bound(source, ("a",)) == pytest.approx(-math.log(0.2), abs=1e-6)  # one token: no slack


# --- E5 / E7: the sampler step ------------------------------------------------------------------------
def test_e5_unmask_probabilities_and_insertion():
    assert unmask_probability(0.5, 1 / 8, "exact") == pytest.approx(0.25)
    assert unmask_probability(0.5, 1 / 8, "tau") == pytest.approx(0.1947, abs=1e-4)
    rows = torch.tensor([[BOS, MASK, C, PAD]])
    out, n = insert_masks(rows, torch.tensor([3]), torch.tensor([[1, 0, 2, 5]]), MASK, PAD)
    assert out.tolist() == [[BOS, MASK, MASK, C, MASK, MASK]] and n.tolist() == [6]  # counts beyond the row ignored
    out, n = insert_masks(torch.tensor([[BOS, MASK, C], [BOS, A, PAD]]), torch.tensor([3, 2]),
                          torch.tensor([[1, 0, 0], [0, 0, 0]]), MASK, PAD)
    assert out.tolist() == [[BOS, MASK, MASK, C], [BOS, A, PAD, PAD]] and n.tolist() == [4, 2]


# --- the method on a micro backbone ---------------------------------------------------------------------
@pytest.fixture
def micro(monkeypatch):
    monkeypatch.setitem(backbone.SIZES, "micro", dict(n_layers=1, d_model=32, n_heads=2))


def _batch() -> Batch:
    x0 = torch.tensor([[BOS, A, B, C, PAD], [BOS, A, PAD, PAD, PAD], [BOS, C, C, A, B]])
    return Batch(x0, torch.tensor([4, 2, 5]), "varlen")


def test_registered_varlen_only_and_options_checked(micro):
    with pytest.raises(UserError, match="layout"):
        build("flexmdm", VOCAB, "micro", "fixed", 6)
    with pytest.raises(UserError, match="unknown option"):
        build("flexmdm", VOCAB, "micro", "varlen", 6, bogus=1)
    with pytest.raises(UserError, match="unmask"):
        build("flexmdm", VOCAB, "micro", "varlen", 6, unmask="greedy")
    model = build("flexmdm", VOCAB, "micro", "varlen", 6)
    assert model.gap_head.scale == 5.0  # the longest content length (spec 2.2's L_max)
    with pytest.raises(UserError, match="special"):
        model.loss(Batch(torch.tensor([[BOS, A, MASK]]), torch.tensor([3]), "varlen"))


def test_loss_backward_and_a_reproducible_bound(micro):
    torch.manual_seed(0)
    model = build("flexmdm", VOCAB, "micro", "varlen", 6)
    loss, stats = model.loss(_batch())
    loss.backward()
    assert torch.isfinite(loss) and 0 < stats["kept_fraction"] <= 1
    assert all(p.grad is not None for p in model.gap_head.parameters())
    model.eval()
    first = model.nll_bound(_batch(), 4, torch.Generator().manual_seed(3))
    again = model.nll_bound(_batch(), 4, torch.Generator().manual_seed(3))
    assert first.dtype == torch.float64 and torch.equal(first, again) and bool((first > 0).all())
    assert model.nll_bound(_batch(), 4, torch.Generator().manual_seed(3), convention="paper").tolist() == first.tolist()


def test_bound_estimator_of_the_oracle_network_is_ln2(micro, monkeypatch):
    """The method's own estimator (clocks, packing, gap reading, weights) with the network replaced
    by the oracle of the source "always A B" converges to the exact ln 2 of E4."""
    model = build("flexmdm", VOCAB, "micro", "varlen", 3).eval()

    def oracle_network(tokens, lengths, t):
        logits = torch.full((len(tokens), VOCAB.size), -1e9)
        lam = torch.zeros(len(tokens))
        row = 0
        for b, n in enumerate(lengths.tolist()):
            y = tuple(None if tok == MASK else tok for tok in tokens[row + 1: row + n].tolist())
            phis, lams = oracle_posterior({(A, B): 1.0}, float(t[b]))[y]
            for j, dist in phis.items():
                for tok, p in dist.items():
                    logits[row + 1 + j, tok] = math.log(p)
            lam[row: row + n] = torch.tensor(lams)
            row += n
        return logits, lam

    monkeypatch.setattr(model, "network", oracle_network)
    batch = Batch(torch.tensor([[BOS, A, B]] * 8), torch.tensor([3] * 8), "varlen")
    value = model.nll_bound(batch, 200, torch.Generator().manual_seed(0)).mean().item()
    assert value == pytest.approx(math.log(2), abs=0.03)


def test_sampler_invariants_and_prompt(micro):
    torch.manual_seed(0)
    model = build("flexmdm", VOCAB, "micro", "varlen", 7).eval()
    for unmask in ("exact", "tau"):
        model.unmask = unmask
        res = model.sample(6, 10, generator=torch.Generator().manual_seed(1))
        assert res.nfe == 10 and len(res.tokens) == 6 and len(res.trajectory) == 10
        for i, seq in enumerate(res.tokens):
            assert len(seq) <= 6 and not set(seq) & set(VOCAB.specials)  # no MASK left, no specials
            lengths = [step[i] for step in res.trajectory]
            assert lengths == sorted(lengths) and lengths[-1] == len(seq)  # |y| never decreases
            assert lengths[-1] == lengths[-2]  # no insertion in the final step
    res = model.sample(4, 6, generator=torch.Generator().manual_seed(2), prompt=[A, B], top_p=0.9)
    assert all(seq[:2] == [A, B] for seq in res.tokens)
    again = model.sample(4, 6, generator=torch.Generator().manual_seed(2), prompt=[A, B], top_p=0.9)
    assert again.tokens == res.tokens
    with pytest.raises(UserError, match="special"):
        model.sample(1, 2, prompt=[MASK])


def test_the_slack_depends_on_the_length_alone_and_its_monte_carlo_matches():
    """What analysis.alignment_slack relies on to give the slack of a whole source: every
    sequence of n tokens has the slack of one lone sequence of n tokens, which the closed-form
    Monte Carlo reproduces."""
    from analysis.alignment_slack import single_sequence_slack

    lone = {n: oracle_bound({tuple(range(n)): 1.0}, tuple(range(n))) for n in (2, 3)}
    source = {(0, 1, 2): 0.4, (0, 0, 1): 0.3, (1, 0): 0.3}
    for x, p in source.items():
        assert oracle_bound(source, x) + math.log(p) == pytest.approx(lone[len(x)], abs=1e-6)
    mc, se = single_sequence_slack(3, draws=20000, seed=1)
    assert abs(mc - lone[3]) < 4 * se and se < 0.05
