"""AR: worked example (spec 4.d), input/target shifting, exactness of the NLL against
prefix-by-prefix evaluation, overfitting, and the sampler's length behaviour."""
from __future__ import annotations

import math

import pytest
import torch

from baselines.ar import AR, causal_inputs, per_sequence_sum, suppress, suppressed_ids, token_nll
from harness.core import backbone
from harness.core.batch import Batch, Vocab, predicted_tokens
from harness.core.methods import UserError, build

VOCAB = Vocab(size=12, bos=0, eos=1, pad=2, mask=3)  # content ids 4..11


# --- worked example, spec 4.d ------------------------------------------------------------------
def test_worked_example_nll_per_token_and_ppl():
    # x = [BOS, a, b, EOS] with a = 4, b = 5; predictive p over (a, b, EOS) at each step
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64)
    logits = torch.full((3, VOCAB.size), float("-inf"), dtype=torch.float64)
    logits[:, [4, 5, 1]] = probs.log()
    logits[:, [VOCAB.bos, VOCAB.pad, VOCAB.mask]] = 7.0  # must not matter once suppressed
    nll = token_nll(suppress(logits, suppressed_ids(VOCAB)), torch.tensor([4, 5, 1]))
    total = nll.sum().item()
    assert total == pytest.approx(1.427116, abs=1e-6)
    assert total / 3 == pytest.approx(0.475705, abs=1e-6)
    assert math.exp(total / 3) == pytest.approx(1.609149, abs=1e-6)


def test_suppressed_ids_exclude_eos():
    assert suppressed_ids(VOCAB) == [0, 2, 3]
    assert suppressed_ids(Vocab(size=5, bos=0, eos=2, pad=2, mask=3)) == [0, 3]


def fixed_batch() -> Batch:
    return Batch(torch.tensor([[0, 4, 5, 1, 6], [0, 7, 8, 9, 10]]), torch.tensor([5, 5]), "fixed")


def varlen_batch(rows: list[list[int]]) -> Batch:
    lmax = max(len(r) for r in rows)
    x0 = torch.full((len(rows), lmax), VOCAB.pad)
    for i, r in enumerate(rows):
        x0[i, : len(r)] = torch.tensor(r)
    return Batch(x0, torch.tensor([len(r) for r in rows]), "varlen")


def test_causal_inputs_fixed_and_varlen():
    inputs, lengths, targets = causal_inputs(fixed_batch(), VOCAB.eos)
    assert lengths.tolist() == [4, 4] == predicted_tokens(fixed_batch()).tolist()
    assert inputs.tolist() == [0, 4, 5, 1, 0, 7, 8, 9]
    assert targets.tolist() == [4, 5, 1, 6, 7, 8, 9, 10]
    batch = varlen_batch([[0, 4, 5], [0], [0, 6, 7, 8]])
    inputs, lengths, targets = causal_inputs(batch, VOCAB.eos)
    assert lengths.tolist() == [3, 1, 4] == predicted_tokens(batch).tolist()
    assert inputs.tolist() == [0, 4, 5, 0, 0, 6, 7, 8]
    assert targets.tolist() == [4, 5, 1, 1, 6, 7, 8, 1]


def test_per_sequence_sum():
    assert per_sequence_sum(torch.arange(6.0), torch.tensor([2, 1, 3])).tolist() == [1.0, 2.0, 12.0]


# --- the method on a micro backbone -----------------------------------------------------------------
@pytest.fixture
def micro(monkeypatch):
    monkeypatch.setitem(backbone.SIZES, "micro", dict(n_layers=1, d_model=32, n_heads=2))
    torch.manual_seed(0)


def prefix_nll(model: AR, seq: list[int], targets: list[int]) -> float:
    """-log p by one dense call per prefix: checks causality and packing of the fast path."""
    total = 0.0
    for i, tgt in enumerate(targets):
        logits = model.logits(torch.tensor([seq[: i + 1]]))[0, -1].double()
        total -= torch.log_softmax(logits, -1)[tgt].item()
    return total


def test_options_and_layouts(micro):
    with pytest.raises(UserError):
        build("ar", VOCAB, "micro", "fixed", 8, bogus=1)
    with pytest.raises(UserError):
        build("ar", VOCAB, "micro", "fixed", 8, temperature=0.0)
    model = build("ar", VOCAB, "micro", "fixed", 8)
    assert model.backbone.cfg.causal
    with pytest.raises(UserError):
        model.loss(varlen_batch([[0, 4]]))


@pytest.mark.parametrize("layout", ["fixed", "varlen"])
def test_loss_finite_backward_and_nll_is_exact(micro, layout):
    model = build("ar", VOCAB, "micro", layout, 8)
    batch = fixed_batch() if layout == "fixed" else varlen_batch([[0, 4, 5], [0], [0, 6, 7, 8, 9]])
    loss, stats = model.loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    nll = model.nll_bound(batch, mc=4)
    assert nll.dtype == torch.float64 and nll.shape == (batch.size,)
    inputs, lengths, targets = causal_inputs(batch, VOCAB.eos)
    starts = (torch.cumsum(lengths, 0) - lengths).tolist()
    for b, (s, n) in enumerate(zip(starts, lengths.tolist())):
        want = prefix_nll(model, inputs[s : s + n].tolist(), targets[s : s + n].tolist())
        assert nll[b].item() == pytest.approx(want, abs=1e-4)
    # the training loss is the token-weighted mean of the same NLL
    with torch.no_grad():
        loss, _ = model.loss(batch)
    assert loss.item() == pytest.approx(nll.sum().item() / predicted_tokens(batch).sum().item(), abs=1e-5)


def test_overfits_one_sentence_and_samples_it(micro):
    torch.set_num_threads(1)
    sentence = [0, 4, 7, 5, 9, 6]
    model = build("ar", VOCAB, "micro", "varlen", 10)
    batch = varlen_batch([sentence] * 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert model.nll_bound(batch).mean().item() < 0.1
    out = model.sample(8, 3, generator=torch.Generator().manual_seed(0))
    assert all(t == sentence[1:] for t in out.tokens)
    assert out.nfe == len(sentence)  # five content tokens then EOS
    assert out.info["steps_ignored"] and out.info["truncated"] == 0


def test_fixed_sampler_gives_length_minus_one_tokens(micro):
    model = build("ar", VOCAB, "micro", "fixed", 9).eval()
    out = model.sample(4, 100, generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in out.tokens] == [8] * 4 and out.nfe == 8
    assert all(tok not in (VOCAB.bos, VOCAB.pad, VOCAB.mask) and 0 <= tok < VOCAB.size for t in out.tokens for tok in t)
    out = model.sample(2, 1, generator=torch.Generator().manual_seed(0), length=5, prompt=[4, 5], top_p=0.5)
    assert [len(t) for t in out.tokens] == [4, 4] and all(t[:2] == [4, 5] for t in out.tokens)
    with pytest.raises(UserError):
        model.sample(1, 1, length=20)


def test_varlen_sampler_stops_at_eos_or_max_len(micro):
    model = build("ar", VOCAB, "micro", "varlen", 7).eval()
    torch.nn.init.zeros_(model.head.weight)
    with torch.no_grad():
        model.head.bias.zero_()
        model.head.bias[VOCAB.eos] = 30.0  # EOS first: empty samples after one call
    out = model.sample(3, 10, generator=torch.Generator().manual_seed(0))
    assert out.tokens == [[]] * 3 and out.nfe == 1
    with torch.no_grad():
        model.head.bias[VOCAB.eos] = -30.0  # never EOS: cut at max_len - 1 content tokens
        model.head.bias[VOCAB.bos] = 50.0  # suppressed ids never appear, however large
    out = model.sample(3, 10, generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in out.tokens] == [6] * 3 and out.info["truncated"] == 3 and out.nfe == 6
    assert all(4 <= tok < VOCAB.size for t in out.tokens for tok in t)


def test_sampler_matches_model_distribution(micro):
    # two-step varlen outcomes: [], [v] then EOS is cut at max_len = 2 (one content token)
    model = build("ar", VOCAB, "micro", "varlen", 2, temperature=0.7).eval()
    with torch.no_grad():
        model.head.weight.mul_(8.0)
    logits = model.logits(torch.tensor([[VOCAB.bos]]))[0, -1].double() / 0.7
    want = torch.softmax(logits, -1)
    n = 20000
    out = model.sample(n, 1, generator=torch.Generator().manual_seed(1))
    first = torch.tensor([t[0] if t else VOCAB.eos for t in out.tokens])
    got = torch.bincount(first, minlength=VOCAB.size).double() / n
    assert 0.5 * (got - want).abs().sum().item() < 0.02


def test_flops_per_token_counts_the_full_sequence(micro):
    model = build("ar", VOCAB, "micro", "varlen", 64)
    batch = varlen_batch([[0] + [4] * 40])
    want = 3 * (model.backbone.forward_flops([41]) + 2 * 32 * 12 * 41) / 41
    assert model.flops_per_token(batch) == pytest.approx(want)



# --- the KV cache -----------------------------------------------------------------------------------
@pytest.fixture
def small(monkeypatch):
    monkeypatch.setitem(backbone.SIZES, "small-test", dict(n_layers=2, d_model=32, n_heads=4))
    torch.manual_seed(0)


@torch.no_grad()
def test_cached_decode_logits_equal_recomputation(small):
    model = build("ar", VOCAB, "small-test", "varlen", 40).eval()
    model.head.weight.mul_(4.0)  # sharper logits: differences would show
    x = torch.randint(4, VOCAB.size, (3, 30))
    x[:, 0] = VOCAB.bos
    hidden, cache = model.backbone.decode(x[:, :5], capacity=8)  # a 5-token prompt; the buffer must grow
    torch.testing.assert_close(suppress(model.head(hidden).float(), model.suppressed), model.logits(x[:, :5]))
    for t in range(5, 30):
        hidden, cache = model.backbone.decode(x[:, t : t + 1], cache)
        assert len(cache) == t + 1 and hidden.shape == (3, 1, 32)
        cached = suppress(model.head(hidden[:, -1]).float(), model.suppressed)
        torch.testing.assert_close(cached, model.logits(x[:, : t + 1])[:, -1], atol=1e-5, rtol=1e-5)
    k, v = cache.layer(1)
    assert k.shape == v.shape == (3, 4, 30, 8)
    # several new tokens over a cached prefix: causal among themselves
    _, cache = model.backbone.decode(x[:, :1])
    hidden, cache = model.backbone.decode(x[:, 1:12], cache)
    torch.testing.assert_close(hidden, model.backbone(x[:, :12])[:, 1:], atol=1e-5, rtol=1e-5)
    # keeping rows: the selected cache goes on exactly like a cache of those rows alone
    kept = cache.select(torch.tensor([2, 0]))
    assert kept.batch_size == 2 and len(kept) == 12 and cache.batch_size == 3
    hidden, _ = model.backbone.decode(x[[2, 0], 12:14], kept)
    torch.testing.assert_close(hidden, model.backbone(x[[2, 0], :14])[:, 12:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        model.backbone.decode(x[:, 14:15], kept)  # 3 rows against a 2-row cache
    bidirectional = backbone.Backbone(backbone.backbone_config("small-test"), VOCAB.size)
    with pytest.raises(ValueError):  # a cache is only valid for causal attention
        bidirectional.decode(x[:, :2])


class Recorder(torch.nn.Module):
    """An output head that keeps the hidden states it is given, one [rows, d] per network call."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head, self.seen = head, []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.seen.append(h.clone())
        return self.head(h)


def sampled_both_ways(layout: str, max_len: int, sample_kw: dict, eos_bias: float = 0.0):
    """One model sampled without and with the KV cache from the same seed: the same samples, and at
    every step the same hidden states row for row (rows that stopped must have left the cache)."""
    plain = build("ar", VOCAB, "small-test", layout, max_len, kv_cache=False).eval()
    with torch.no_grad():  # varied tokens and stopping steps, so rows' prefixes differ
        plain.head.bias.zero_()
        plain.head.bias[VOCAB.eos] = eos_bias
    cached = build("ar", VOCAB, "small-test", layout, max_len).eval()
    cached.load_state_dict(plain.state_dict())
    for m in (plain, cached):
        m.head = Recorder(m.head)
    outs = [m.sample(8, 1, generator=torch.Generator().manual_seed(3), **sample_kw) for m in (plain, cached)]
    assert [o.info["kv_cache"] for o in outs] == [False, True]
    assert len(plain.head.seen) == len(cached.head.seen) == outs[0].nfe
    for want, got in zip(plain.head.seen, cached.head.seen):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert outs[0].tokens == outs[1].tokens and outs[0].nfe == outs[1].nfe
    assert outs[0].info["truncated"] == outs[1].info["truncated"]
    return outs[1]


@pytest.mark.parametrize("sample_kw", [{}, {"prompt": [4, 5, 6], "top_p": 0.8, "length": 12}])
def test_fixed_samples_identical_with_and_without_cache(small, sample_kw):
    prompt, width = sample_kw.get("prompt", []), sample_kw.get("length", 16) - 1
    out = sampled_both_ways("fixed", 16, sample_kw, eos_bias=1.0)  # EOS inside does not stop
    assert [len(t) for t in out.tokens] == [width] * 8 and out.nfe == width - len(prompt)
    assert all(t[: len(prompt)] == prompt for t in out.tokens)
    assert any(VOCAB.eos in t for t in out.tokens)


@pytest.mark.parametrize("sample_kw, eos_bias", [({}, -1.0), ({"prompt": [7, 8], "top_p": 0.9}, -1.0)])
def test_varlen_samples_identical_with_and_without_cache(small, sample_kw, eos_bias):
    out = sampled_both_ways("varlen", 14, sample_kw, eos_bias=eos_bias)
    lengths = [len(t) for t in out.tokens]  # rows leave at different steps, some are cut at max_len
    assert len(set(lengths)) > 3 and out.info["truncated"] >= 1 and max(lengths) == 13, lengths
    assert all(t[: len(sample_kw.get("prompt", []))] == sample_kw.get("prompt", []) for t in out.tokens)


def test_kv_cache_option(small):
    for bad in ("false", 0, 1, None):
        with pytest.raises(UserError):
            build("ar", VOCAB, "small-test", "varlen", 8, kv_cache=bad)
    for flag in (False, True):
        model = build("ar", VOCAB, "small-test", "varlen", 8, kv_cache=flag).eval()
        assert model.kv_cache is flag
        assert model.sample(2, 1, generator=torch.Generator().manual_seed(0)).info["kv_cache"] is flag
    assert build("ar", VOCAB, "small-test", "fixed", 8).kv_cache is True  # the default
