"""RADD: the worked example of spec 2.g, the any-order identity of 2.b, and a tiny model end to end."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from baselines.masked import (
    exact_k_mask,
    k_dce,
    lambda_dce,
    masked_nll_sum,
    radd_code_t_dce,
    continuous_nelbo,
    stratified_levels,
    target_nll,
)
from harness.core.batch import Batch, Vocab, predicted_tokens
from harness.core.methods import UserError, build
from harness.core.schedule import sigma, sigma_bar

torch.set_num_threads(1)

VOCAB = Vocab(size=10, bos=0, eos=1, pad=2, mask=3)
TINY = {"backbone": {"n_layers": 1, "d_model": 32, "n_heads": 2}}

# spec 1.j / 2.g: V = {a, b, c}, MASK = 3, x = [a, b, c], positions 1 and 2 masked
LOGITS = torch.tensor(
    [[[1.0, 2.0, 3.0, 4.0], [0.0, math.log(2), 0.0, 5.0], [math.log(0.2), math.log(0.2), math.log(0.6), -3.0]]]
)
X = torch.tensor([[0, 1, 2]])
MASKED = torch.tensor([[False, True, True]])
HALF = torch.tensor([0.5], dtype=torch.float64)


def s_example() -> torch.Tensor:
    return masked_nll_sum(LOGITS, X, MASKED, [3])


# --- spec 2.g ------------------------------------------------------------------------------------
def test_lambda_and_t_dce():
    assert float(s_example()) == pytest.approx(1.203973, abs=1e-6)
    assert float(lambda_dce(s_example(), HALF)) == pytest.approx(2.407946, abs=1e-6)
    assert float(continuous_nelbo(s_example(), HALF)) == pytest.approx(2.407946, abs=1e-6)


def test_t_dse_equals_t_dce():
    """SEDD score entropy with s = c/(e^sb - 1) equals t-DCE because sum_v c = 1 (spec 2.b)."""
    t = HALF
    c = torch.softmax(LOGITS[0, :, :3].double(), -1)  # restricted to real tokens
    q = 1 / torch.expm1(sigma_bar(t))
    s = c / torch.expm1(sigma_bar(t))
    dse = 0.0
    for l in (1, 2):
        dse += float(sigma(t) * (s[l].sum() - q * torch.log(s[l, X[0, l]]) + q * (torch.log(q) - 1)))
    assert dse == pytest.approx(2.407946, abs=1e-6)


def test_radd_code_t_dce_is_offset():
    val = radd_code_t_dce(s_example(), torch.tensor([2]), HALF)
    assert float(val) == pytest.approx(2.399946, abs=1e-6)
    assert float(val - continuous_nelbo(s_example(), HALF)) == pytest.approx(-0.008000, abs=1e-6)


def test_k_dce():
    assert float(k_dce(s_example(), torch.tensor([2]), torch.tensor([3]))) == pytest.approx(1.805959, abs=1e-6)


def test_lambda_dce_any_order_identity_l2():
    """Spec 2.b: with L = 2 and any table of conditionals, E_lambda[S/lambda] is the average of
    the left-to-right and right-to-left AR NLLs."""
    from scipy.integrate import quad

    g = torch.Generator().manual_seed(0)
    l1mm, l2mm, l1mb, l2am = (torch.rand(4, generator=g, dtype=torch.float64) * 3).tolist()

    def integrand(lam):
        ll = torch.tensor([lam], dtype=torch.float64)
        both = lambda_dce(torch.tensor([l1mm + l2mm], dtype=torch.float64), ll)
        first = lambda_dce(torch.tensor([l1mb], dtype=torch.float64), ll)  # only position 1 masked
        second = lambda_dce(torch.tensor([l2am], dtype=torch.float64), ll)
        return float(lam**2 * both + lam * (1 - lam) * (first + second))

    value = quad(integrand, 0.0, 1.0)[0]
    assert value == pytest.approx(0.5 * (l1mm + l2am) + 0.5 * (l2mm + l1mb), rel=1e-9)


def test_lambda_dce_zero_when_nothing_masked():
    assert float(lambda_dce(torch.tensor([0.0]), torch.tensor([0.0]))) == 0.0


def test_exact_k_mask_and_levels():
    pred = torch.tensor([[False, True, True, True, True], [False, True, True, False, False]])
    m = exact_k_mask(pred, torch.tensor([3, 1]), torch.Generator().manual_seed(0))
    assert m.sum(1).tolist() == [3, 1] and not (m & ~pred).any()
    lam = stratified_levels(5, 4, torch.Generator().manual_seed(0))
    strata = (lam * 4).floor().long()
    assert (strata == torch.arange(4)).all() and (lam > 0).all() and (lam < 1).all()


# --- tiny model ------------------------------------------------------------------------------------
def tiny(layout: str, max_len: int, seed: int = 0, **opts):
    torch.manual_seed(seed)
    model = build("radd", VOCAB, "tiny", layout, max_len, **TINY, **opts)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def fixed_batch(rows):
    x0 = torch.tensor(rows)
    return Batch(x0, torch.full((len(rows),), x0.shape[1]), "fixed")


def varlen_batch(rows, width):
    x0 = torch.full((len(rows), width), VOCAB.pad)
    for i, r in enumerate(rows):
        x0[i, : len(r)] = torch.tensor(r)
    return Batch(x0, torch.tensor([len(r) for r in rows]), "varlen")


def average_order_nll(model, batch) -> float:
    """Exact average over reveal orders of the any-order AR NLL of the first sequence."""
    canvas, pred = model.canvas(batch)
    canvas = canvas[:1]
    pos = pred[0].nonzero().flatten().tolist()
    model.eval()
    total = 0.0
    with torch.no_grad():
        orders = list(itertools.permutations(pos))
        for order in orders:
            hidden = set(order)
            for l in order:
                z = canvas.clone()
                z[0, list(hidden)] = VOCAB.mask
                total += float(target_nll(model.head(model.hidden(z)).double(), canvas, model.forbidden)[0, l])
                hidden.remove(l)
    return total / len(orders)


@pytest.mark.parametrize("layout", ["fixed", "varlen"])
def test_bound_matches_any_order_enumeration(layout):
    if layout == "fixed":
        model, batch = tiny("fixed", 4, seed=1), fixed_batch([[0, 8, 4, 1]] * 8192)
    else:
        model, batch = tiny("varlen", 4, seed=1), varlen_batch([[0, 9, 5]] * 8192, 3)
    exact = average_order_nll(model, batch)
    est = model.nll_bound(batch, mc=8, generator=torch.Generator().manual_seed(5))
    mean, se = float(est.mean()), float(est.std() / math.sqrt(len(est)))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)


@pytest.mark.parametrize("loss", ["lambda_dce", "t_dce", "k_dce"])
@pytest.mark.parametrize("layout", ["fixed", "varlen"])
def test_loss_finite_and_backward(loss, layout):
    model = tiny(layout, 8, loss=loss)
    batch = fixed_batch([[0, 4, 5, 6, 7, 8, 9, 1]] * 4) if layout == "fixed" else varlen_batch([[0, 4, 5], [0, 6, 7, 8, 9]], 5)
    value, stats = model.loss(batch)
    assert value.dim() == 0 and torch.isfinite(value) and "nelbo" in stats
    assert ("t_dce_radd_code" in stats) == (loss == "t_dce")
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_overfits_one_sentence():
    torch.manual_seed(0)
    model = build("radd", VOCAB, "tiny", "varlen", 10, **TINY)
    batch = varlen_batch([[0, 4, 9, 5, 8, 6]] * 32, 6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(200):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.15 * first, (first, last)
    model.eval()
    bound = model.nll_bound(batch, mc=8, generator=torch.Generator().manual_seed(0))
    assert float(bound.sum() / predicted_tokens(batch).sum()) < 0.15 * first
    out = model.sample(8, 16, generator=torch.Generator().manual_seed(0))
    assert sum(row == [4, 9, 5, 8, 6] for row in out.tokens) >= 6


def test_sample_fixed_and_prompt():
    model = tiny("fixed", 8).eval()
    out = model.sample(5, 4, generator=torch.Generator().manual_seed(0))
    assert len(out.tokens) == 5 and all(len(r) == 7 for r in out.tokens)
    assert all(t not in (VOCAB.bos, VOCAB.mask, VOCAB.pad) and 0 <= t < VOCAB.size for r in out.tokens for t in r)
    assert 1 <= out.nfe <= 4 and out.info["sampler"] == "radd_cache"
    one_step = model.sample(3, 1, generator=torch.Generator().manual_seed(0))  # last step unmasks all
    assert one_step.nfe == 1 and all(len(r) == 7 for r in one_step.tokens)
    prompted = model.sample(3, 8, prompt=[9, 9, 9], generator=torch.Generator().manual_seed(0))
    assert all(r[:3] == [9, 9, 9] and len(r) == 7 for r in prompted.tokens)


def test_sample_varlen_cut_at_pad():
    model = tiny("varlen", 12).eval()
    with torch.no_grad():
        model.head.bias[VOCAB.pad] = 2.0
    out = model.sample(6, 32, generator=torch.Generator().manual_seed(0))
    assert len(out.tokens) == 6 and any(len(r) < 11 for r in out.tokens)
    assert all(t not in (VOCAB.bos, VOCAB.mask, VOCAB.pad) for r in out.tokens for t in r)
    one = model.sample(1, 200, generator=torch.Generator().manual_seed(0))
    assert 1 <= one.nfe <= 11  # cached: a call only after the sequence changed


def test_top_p_restricts_to_the_nucleus():
    model = tiny("fixed", 6).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[7] = 5.0  # p(7) ~ 0.96 among the real tokens
    out = model.sample(16, 4, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert all(t == 7 for r in out.tokens for t in r)
    free = model.sample(16, 4, generator=torch.Generator().manual_seed(0))
    assert any(t != 7 for r in free.tokens for t in r)


def test_user_errors():
    with pytest.raises(UserError):
        build("radd", VOCAB, "tiny", "fixed", 8, loss="dse")
    model = tiny("fixed", 8)
    with pytest.raises(UserError):
        model.sample(2, 4, prompt=[4] * 8)
    with pytest.raises(UserError):
        model.nll_bound(fixed_batch([[0, 4, 5, 6, 7, 8, 9, 1]]), mc=0)
