"""MDLM: the worked example of spec 1.j, the shared masked machinery, and a tiny model end to end."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from baselines.masked import (
    FP16_SAFE_NEG,
    ancestral_unmask,
    build_canvas,
    continuous_nelbo,
    forbidden_ids,
    masked_nll_sum,
    restrict_logits,
    subs_log_probs,
    target_nll,
)
from harness.core.batch import Batch, Vocab, predicted_tokens
from harness.core.methods import UserError, build

torch.set_num_threads(1)

A, B_, C, M = 0, 1, 2, 3  # spec 1.j: V = {a, b, c}, MASK = 3
VOCAB = Vocab(size=10, bos=0, eos=1, pad=2, mask=3)  # real tokens 4..9 (+ EOS in fixed)
TINY = {"backbone": {"n_layers": 1, "d_model": 32, "n_heads": 2}}


def example_logits(mask_logit: float = 5.0, pos0=(1.0, -2.0, 0.5, 7.0)) -> torch.Tensor:
    return torch.tensor(
        [[list(pos0), [0.0, math.log(2), 0.0, mask_logit], [math.log(0.2), math.log(0.2), math.log(0.6), -3.0]]]
    )


X = torch.tensor([[A, B_, C]])
MASKED = torch.tensor([[False, True, True]])


# --- spec 1.j -----------------------------------------------------------------------------------
def test_worked_example_per_sequence_and_per_token():
    s = masked_nll_sum(example_logits(), X, MASKED, [M])
    assert s.dtype == torch.float64
    assert float(s) == pytest.approx(1.203973, abs=1e-6)
    per_seq = continuous_nelbo(s, torch.tensor([0.5], dtype=torch.float64))
    assert float(per_seq) == pytest.approx(2.407946, abs=1e-6)
    assert float(per_seq) / 3 == pytest.approx(0.802649, abs=1e-6)


def test_subs_probabilities_and_carry_over():
    z = torch.where(MASKED, torch.full_like(X, M), X)
    p = subs_log_probs(example_logits(), z, M, [M]).exp()[0]
    assert torch.allclose(p[1], torch.tensor([0.25, 0.5, 0.25, 0.0]), atol=1e-6)
    assert torch.allclose(p[2], torch.tensor([0.2, 0.2, 0.6, 0.0]), atol=1e-6)
    assert torch.allclose(p[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # carry-over of the clean 'a'
    # the full SUBS loss over all positions equals the masked-only sum
    nll = -subs_log_probs(example_logits(), z, M, [M]).gather(-1, X[..., None]).sum()
    assert float(nll) == pytest.approx(1.203973, abs=1e-6)


@pytest.mark.parametrize("mask_logit", [-50.0, 0.0, 5.0, 80.0])
@pytest.mark.parametrize("pos0", [(0.0, 0.0, 0.0, 0.0), (9.0, -9.0, 3.0, 40.0)])
def test_invariant_to_mask_logit_and_unmasked_logits(mask_logit, pos0):
    s = masked_nll_sum(example_logits(mask_logit, pos0), X, MASKED, [M])
    assert float(s) == pytest.approx(1.203973, abs=1e-6)


def test_fp16_safe_constant():
    logits = example_logits(mask_logit=5.0).half()
    out = restrict_logits(logits, [M])
    assert out.dtype == torch.float16 and float(out[0, 1, M]) == FP16_SAFE_NEG
    s = masked_nll_sum(logits, X, MASKED, [M])
    assert torch.isfinite(s).all() and float(s) == pytest.approx(1.203973, abs=2e-3)
    assert float(torch.softmax(out[0, 1].float(), -1)[M]) == 0.0
    # float32/bf16 use -1e6 and stay finite
    assert torch.isfinite(target_nll(example_logits().bfloat16(), X, [M])).all()


def test_forbidden_ids():
    assert forbidden_ids(VOCAB, "fixed") == [0, 2, 3]
    assert forbidden_ids(VOCAB, "varlen") == [0, 3]  # PAD is a target on the varlen canvas
    shared = Vocab(size=10, bos=0, eos=1, pad=1, mask=3)  # PAD == EOS: EOS must stay a target
    assert forbidden_ids(shared, "fixed") == [0, 3]


def test_mdlm_nelbo_equals_any_order_identity_up_to_eps():
    """Spec 1.e: with t ~ U[0, 1] and mask rate (1 - eps) t, MDLM's NELBO expectation is the
    any-order AR average of spec 2.b up to O(eps)."""
    from scipy.integrate import quad

    g = torch.Generator().manual_seed(0)
    l1mm, l2mm, l1mb, l2am = (torch.rand(4, generator=g, dtype=torch.float64) * 3).tolist()

    def integrand(t):
        lam = (1 - 1e-3) * t
        tt = torch.tensor([t], dtype=torch.float64)
        both = continuous_nelbo(torch.tensor([l1mm + l2mm], dtype=torch.float64), tt)
        one = continuous_nelbo(torch.tensor([l1mb], dtype=torch.float64), tt)
        two = continuous_nelbo(torch.tensor([l2am], dtype=torch.float64), tt)
        return float(lam**2 * both + lam * (1 - lam) * (one + two))

    value = quad(integrand, 0.0, 1.0)[0]
    orders = 0.5 * (l1mm + l2am) + 0.5 * (l2mm + l1mb)
    assert value == pytest.approx(orders, rel=3e-3)
    assert value != pytest.approx(orders, rel=1e-6)  # the eps-truncation is really there


# --- canvas ---------------------------------------------------------------------------------------
def test_canvas_varlen_pads_and_predicts_pad():
    x0 = torch.tensor([[0, 5, 6, 2], [0, 7, 2, 2]])
    batch = Batch(x0, torch.tensor([3, 2]), "varlen")
    canvas, pred = build_canvas(batch, 6, VOCAB.pad)
    assert canvas.tolist() == [[0, 5, 6, 2, 2, 2], [0, 7, 2, 2, 2, 2]]
    assert pred[:, 0].eq(False).all() and pred[:, 1:].all()
    with pytest.raises(UserError):
        build_canvas(batch, 2, VOCAB.pad)
    fixed = Batch(torch.tensor([[0, 5, 6, 1]]), torch.tensor([4]), "fixed")
    canvas, pred = build_canvas(fixed, 4, VOCAB.pad)
    assert canvas.tolist() == [[0, 5, 6, 1]] and pred.tolist() == [[False, True, True, True]]


# --- the sampler core -----------------------------------------------------------------------------
def test_ancestral_unmask_samples_the_model_distribution_and_counts_calls():
    """A context-free fake network: every position is drawn from p; forbidden ids never appear."""
    p = torch.tensor([0.3, 0.1, 0.05, 0.4, 0.15])  # ids 0..4; 3 is MASK, 0 is forbidden
    calls = []

    def hidden_fn(x):
        calls.append(x.shape[0])
        return torch.zeros(*x.shape, 1)

    head = torch.nn.Linear(1, 5)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(p.log())
    n, width = 4000, 4
    x = torch.full((n, width), 3)
    x[:, 0] = 0
    g = torch.Generator().manual_seed(1)
    rates = [0.3, 0.5, 0.2, 1.0]
    out, nfe = ancestral_unmask(hidden_fn, head, x, 3, [0, 3], rates, generator=g)
    assert nfe == len(calls) <= len(rates)
    body = out[:, 1:]
    assert not (body == 3).any() and not (body == 0).any()
    q = p.clone()
    q[[0, 3]] = 0
    q /= q.sum()
    freq = torch.bincount(body.flatten(), minlength=5).double() / body.numel()
    se = (q * (1 - q) / body.numel()).sqrt()
    assert ((freq - q).abs() <= 4 * se + 1e-12).all()
    # with the cache, the first call covers all rows; later calls only rows that changed
    assert calls[0] == n and all(c <= n for c in calls[1:])


def test_ancestral_unmask_skips_calls_when_nothing_changes():
    calls = []

    def hidden_fn(x):
        calls.append(x.shape[0])
        return torch.zeros(*x.shape, 1)

    head = torch.nn.Linear(1, 5)
    x = torch.full((3, 3), 3)
    x[:, 0] = 0
    out, nfe = ancestral_unmask(hidden_fn, head, x, 3, [0, 3], [0.0] * 50 + [1.0], generator=torch.Generator().manual_seed(0))
    assert nfe == 1 and not (out == 3).any()


# --- tiny model ------------------------------------------------------------------------------------
def tiny(layout: str, max_len: int, seed: int = 0, **opts):
    torch.manual_seed(seed)
    model = build("mdlm", VOCAB, "tiny", layout, max_len, **TINY, **opts)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # context-dependent conditionals for the bound test
    return model


def fixed_batch(rows):
    x0 = torch.tensor(rows)
    return Batch(x0, torch.full((len(rows),), x0.shape[1]), "fixed")


def varlen_batch(rows, width):
    x0 = torch.full((len(rows), width), VOCAB.pad)
    for i, r in enumerate(rows):
        x0[i, : len(r)] = torch.tensor(r)
    return Batch(x0, torch.tensor([len(r) for r in rows]), "varlen")


def any_order_exact(model, batch) -> tuple[float, float]:
    """(average over orders of the any-order AR NLL, -log of the order mixture) for one sequence."""
    canvas, pred = model.canvas(batch)
    canvas = canvas[:1]
    pos = pred[0].nonzero().flatten().tolist()
    model.eval()
    nlls = []
    with torch.no_grad():
        for order in itertools.permutations(pos):
            hidden = set(order)
            total = 0.0
            for l in order:
                z = canvas.clone()
                z[0, list(hidden)] = VOCAB.mask
                logits = model.head(model.hidden(z))
                total += float(target_nll(logits.double(), canvas, model.forbidden)[0, l])
                hidden.remove(l)
            nlls.append(total)
    nlls = torch.tensor(nlls, dtype=torch.float64)
    return float(nlls.mean()), float(-(torch.logsumexp(-nlls, 0) - math.log(len(nlls))))


@pytest.mark.parametrize("layout", ["fixed", "varlen"])
def test_bound_matches_any_order_enumeration(layout):
    if layout == "fixed":
        model, seq = tiny("fixed", 4, seed=2), [0, 5, 7, 1]
        batch = fixed_batch([seq] * 8192)
    else:
        model, seq = tiny("varlen", 4, seed=2), [0, 6, 8]
        batch = varlen_batch([seq] * 8192, 3)
    exact, mixture = any_order_exact(model, batch)
    est = model.nll_bound(batch, mc=8, generator=torch.Generator().manual_seed(3))
    assert est.dtype == torch.float64 and est.shape == (8192,)
    mean, se = float(est.mean()), float(est.std() / math.sqrt(len(est)))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert exact >= mixture and mean > mixture - 4 * se
    if layout == "fixed":  # the test has the power to tell the bound from the order mixture
        assert exact - mixture > 6 * se


@pytest.mark.parametrize("layout", ["fixed", "varlen"])
def test_loss_finite_and_backward(layout):
    model = tiny(layout, 8)
    batch = fixed_batch([[0, 4, 5, 6, 7, 8, 9, 1]] * 4) if layout == "fixed" else varlen_batch([[0, 4, 5], [0, 6, 7, 8, 9]], 5)
    loss, stats = model.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and "nelbo" in stats
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.head.weight.grad.abs().sum() > 0


def test_overfits_one_sentence():
    torch.manual_seed(0)
    model = build("mdlm", VOCAB, "tiny", "fixed", 8, **TINY)
    batch = fixed_batch([[0, 4, 9, 5, 8, 6, 7, 1]] * 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(120):
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
    assert sum(row == [4, 9, 5, 8, 6, 7, 1] for row in out.tokens) >= 6


@pytest.mark.parametrize("noise_removal", ["sample", "argmax"])
def test_sample_fixed(noise_removal):
    model = tiny("fixed", 8, noise_removal=noise_removal).eval()
    out = model.sample(5, 4, generator=torch.Generator().manual_seed(0))
    assert len(out.tokens) == 5 and all(len(r) == 7 for r in out.tokens)
    assert all(t not in (VOCAB.bos, VOCAB.mask, VOCAB.pad) and 0 <= t < VOCAB.size for r in out.tokens for t in r)
    assert 1 <= out.nfe <= 5 and out.info["noise_removal"] == noise_removal and out.info["float64"]
    short = model.sample(2, 3, length=5, prompt=[4, 5], generator=torch.Generator().manual_seed(0))
    assert all(len(r) == 4 and r[:2] == [4, 5] for r in short.tokens)
    again = model.sample(5, 4, generator=torch.Generator().manual_seed(0))
    assert again.tokens == out.tokens


def test_sample_varlen_cuts_at_pad_and_caches():
    model = tiny("varlen", 12).eval()
    with torch.no_grad():  # make PAD likely so that the cut is exercised
        model.head.bias[VOCAB.pad] = 2.0
    out = model.sample(6, 64, generator=torch.Generator().manual_seed(0))
    assert len(out.tokens) == 6 and all(len(r) <= 11 for r in out.tokens)
    assert any(len(r) < 11 for r in out.tokens)
    assert all(t not in (VOCAB.bos, VOCAB.mask, VOCAB.pad) for r in out.tokens for t in r)
    assert out.nfe <= 65
    # caching: one sequence changes at most 11 times, so it needs at most 11 calls, not 65
    one = model.sample(1, 64, generator=torch.Generator().manual_seed(1))
    assert 1 <= one.nfe <= 11


def test_user_errors():
    with pytest.raises(UserError):
        build("mdlm", VOCAB, "tiny", "fixed", 8, bogus=1)
    model = tiny("fixed", 8)
    with pytest.raises(UserError):
        model.sample(2, 4, length=9)
    with pytest.raises(UserError):
        model.sample(2, 4, prompt=[VOCAB.mask])
    with pytest.raises(UserError):
        model.loss(varlen_batch([[0, 4]], 2))
