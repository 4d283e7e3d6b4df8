"""The registered DID methods end to end on a tiny backbone."""
from __future__ import annotations

import pytest
import torch

from did import counting, loss as losses
from did.process import delete
from harness.core import methods, schedule
from harness.core.batch import Batch, Vocab
from harness.core.methods import UserError

VOCAB = Vocab(size=24, bos=0, eos=1, pad=2, mask=3)
SPECIALS_NEVER_SAMPLED = {VOCAB.bos, VOCAB.pad, VOCAB.mask}
L = 16
CASES = [("did", "varlen"), ("did-fixed", "fixed")]


def make(name, layout, **options):
    torch.manual_seed(0)
    return methods.build(name, VOCAB, "tiny", layout, L, **options)


def random_batch(layout, B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(4, VOCAB.size, (B, L), generator=g)
    x0[:, 0] = VOCAB.bos
    lengths = torch.full((B,), L) if layout == "fixed" else torch.tensor([L, 9, 2, 1, 13])[:B]
    x0[torch.arange(L)[None] >= lengths[:, None]] = VOCAB.pad
    return Batch(x0, lengths, layout)


def test_registered_with_their_layouts():
    assert {"did", "did-fixed"} <= set(methods.available())
    assert methods.get("did").layouts == ("varlen",) and methods.get("did").time_conditioned
    assert methods.get("did-fixed").layouts == ("fixed",) and not methods.get("did-fixed").time_conditioned
    with pytest.raises(UserError):
        make("did", "fixed")
    with pytest.raises(UserError):
        make("did", "varlen", loss="fancy")
    with pytest.raises(UserError):
        make("did", "varlen", colour="red")


@pytest.mark.parametrize("name,layout", CASES)
def test_loss_is_finite_and_backpropagates(name, layout):
    m = make(name, layout)
    torch.manual_seed(1)
    value, stats = m.loss(random_batch(layout))
    assert value.ndim == 0 and torch.isfinite(value) and value.item() > 0
    assert {"dp_seconds", "forward_seconds", "kept_fraction"} <= set(stats)
    assert 0 < stats["kept_fraction"] <= 1
    value.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert m.head.token.weight.grad.abs().sum() > 0 and m.head.count.weight.grad.abs().sum() > 0
    # the head starts at zero (uniform tokens, unit counts), so the backbone gets gradient from step 2
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    m.zero_grad()
    m.loss(random_batch(layout))[0].backward()
    assert m.backbone.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name,layout", CASES)
def test_packed_batch_equals_one_sequence_at_a_time(name, layout):
    m = make(name, layout).eval()
    batch = random_batch(layout)
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0.9, 0.5, 0.3, 0.7, 0.05], dtype=torch.float64)
    d = delete(batch.x0, batch.lengths, t, generator=g)
    sigma = schedule.sigma_bar(d.t).float() if m.time_conditioned else None
    loss_fn = losses.LOSSES[m.loss_name]
    w = schedule.elbo_weight(d.t)

    def run(x0, keep, lengths, n, tokens, sig, weight):
        targets = counting.sparse_insertion_targets(x0, keep, lengths, VOCAB.size, dp_dtype=torch.float64)
        log_s = m.score(tokens, n, sig)
        seq = torch.repeat_interleave(torch.arange(len(n)), n)
        return log_s, loss_fn(log_s, targets, seq, weight, acc_dtype=torch.float64)

    with torch.no_grad():
        log_s, per_seq = run(batch.x0, d.keep, batch.lengths, d.lengths, d.tokens, sigma, w)
        rows = log_s.split(d.lengths.tolist())
        starts = torch.cumsum(d.lengths, 0) - d.lengths
        for b in range(batch.size):
            tok = d.tokens[starts[b] : starts[b] + d.lengths[b]]
            sig = sigma[b : b + 1] if sigma is not None else None
            one_s, one_loss = run(batch.x0[b : b + 1], d.keep[b : b + 1], batch.lengths[b : b + 1],
                                  d.lengths[b : b + 1], tok, sig, w[b : b + 1])
            torch.testing.assert_close(one_s, rows[b], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(one_loss[0], per_seq[b], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name,layout", CASES)
def test_bound_is_deterministic_per_generator_and_positive(name, layout):
    m = make(name, layout).eval()
    batch = random_batch(layout)
    a = m.nll_bound(batch, 3, torch.Generator().manual_seed(5))
    b = m.nll_bound(batch, 3, torch.Generator().manual_seed(5))
    assert a.dtype == torch.float64 and a.shape == (batch.size,)
    torch.testing.assert_close(a, b)
    assert bool((a > 0).all())  # even [BOS] alone costs the mass the model puts on insertions
    assert m.last_bound_stats["convention"] == "strict" and len(m.last_bound_stats["insertion_mass_at_t0"]) == batch.size
    paper = m.nll_bound(batch, 3, torch.Generator().manual_seed(5), convention="paper")
    assert paper.shape == a.shape and bool((paper > 0).all())
    p = m.last_bound_stats["mean_p_x1_not_bos"]
    assert p == pytest.approx(float((1 - (1 - 1e-3) ** (batch.lengths - 1).double()).mean()))


def overfit(name, layout, steps):
    """Train on one sentence (batch of copies); return the bound before and after."""
    torch.manual_seed(0)
    sentence = [VOCAB.bos, 5, 9, 7, 12, 5, 20, 8, 15, 11, 9, 6]
    n = len(sentence)
    m = methods.build(name, VOCAB, "tiny", layout, n, loss="simple")  # weight 1: low variance
    train = Batch(torch.tensor([sentence] * 16), torch.full((16,), n), layout)
    valid = Batch(train.x0[:4], train.lengths[:4], layout)
    bound = lambda: float(m.eval().nll_bound(valid, 16, torch.Generator().manual_seed(1)).mean())  # noqa: E731
    before = bound()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    m.train()
    for _ in range(steps):
        value, _ = m.loss(train)
        opt.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        decay.step()
    after = bound()
    samples = m.sample(16, 32, generator=torch.Generator().manual_seed(2)).tokens
    return before, after, samples, sentence


@pytest.mark.parametrize("name,layout,steps", [("did", "varlen", 200), ("did-fixed", "fixed", 300)])
def test_tiny_model_overfits_one_sentence(name, layout, steps):
    torch.set_num_threads(1)
    before, after, samples, sentence = overfit(name, layout, steps)
    assert after < 0.15 * before, (before, after)
    assert any(s == sentence[1:] for s in samples)


@pytest.mark.parametrize("name,layout", CASES)
def test_sample_returns_valid_ids_and_counts_nfe(name, layout):
    m = make(name, layout).eval()
    out = m.sample(5, 24, generator=torch.Generator().manual_seed(3))
    assert len(out.tokens) == 5
    assert all(0 <= t < VOCAB.size and t not in SPECIALS_NEVER_SAMPLED for s in out.tokens for t in s)
    assert 1 <= out.nfe <= 24
    assert len(out.trajectory) == 24 and out.trajectory[-1] == [len(s) for s in out.tokens]
    if layout == "fixed":
        # seqnorm keeps the total predicted mass at L - n, so samples grow to the model length
        assert all(L - 1 - 2 <= len(s) <= L - 1 for s in out.tokens)
        assert out.info["sequence_evaluations"] <= 5 * 24
    else:
        assert all(len(s) <= L - 1 for s in out.tokens)
        assert out.nfe == 24  # time-conditioned: one forward call per step


def test_fixed_sampling_respects_prompt_and_length():
    m = make("did-fixed", "fixed").eval()
    prompt = [7, 8, 9]
    out = m.sample(3, 16, generator=torch.Generator().manual_seed(4), prompt=prompt, length=10)
    assert all(s[:3] == prompt and len(s) <= 9 for s in out.tokens)
    with pytest.raises(UserError):
        m.sample(1, 4, length=L + 1)


@pytest.mark.parametrize("name,layout", CASES)
def test_flops_per_token_counts_about_half_the_tokens(name, layout):
    m = make(name, layout)
    batch = random_batch(layout)
    per_token = m.flops_per_token(batch)
    full = 3 * (m.backbone.forward_flops(batch.lengths) + 2 * m.backbone.cfg.d_model * (VOCAB.size + 1) * float(batch.lengths.sum()))
    assert 0.3 * full / float(batch.lengths.sum()) < per_token < 0.75 * full / float(batch.lengths.sum())
