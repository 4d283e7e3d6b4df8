"""Synthetic sources (harness.data.synthetic) against enumeration and sampling, and their data path."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import chi2

from harness.data import synthetic
from harness.core.errors import UserError


def tiny_sources():
    return [synthetic.hmm_source(states=4, symbols=3, max_length=7, seed=3),
            synthetic.dyck_source(types=2, depth=2, fillers=2, min_length=2, max_length=7, seed=1)]


def enumerate_law(src):
    """{document: probability} over every sequence of length in range (zero-probability ones left out)."""
    out = {}
    for n in range(src.min_length, src.max_length + 1):
        for d in itertools.product(range(src.n_symbols), repeat=n):
            lp = src.log_prob(d)
            if lp > -math.inf:
                out[d] = math.exp(lp)
    return out


def chi_square_p(observed: dict, expected: dict, n: int) -> float:
    """p-value of Pearson's chi-square over cells with expected count >= 5 (the rest pooled)."""
    obs, exp, rest_o, rest_e = [], [], 0.0, 0.0
    for key, p in expected.items():
        if p * n >= 5:
            obs.append(observed.get(key, 0))
            exp.append(p * n)
        else:
            rest_o += observed.get(key, 0)
            rest_e += p * n
    rest_o += sum(v for k, v in observed.items() if k not in expected)
    obs.append(rest_o)
    exp.append(rest_e)
    obs, exp = np.array(obs, float), np.array(exp, float)
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, keep.sum() - 1))


@pytest.mark.parametrize("src", tiny_sources(), ids=lambda s: s.name)
def test_log_prob_sums_to_one_and_entropy_matches_enumeration(src):
    law = enumerate_law(src)
    assert sum(law.values()) == pytest.approx(1.0, abs=1e-10)
    h_enum = -sum(p * math.log(p) for p in law.values())
    ent = src.entropy(n_mc=20000, seed=0)
    if src.deterministic:
        assert ent["method"] == "exact" and ent["nats_per_document"] == pytest.approx(h_enum, abs=1e-9)
    else:
        assert abs(ent["nats_per_document"] - h_enum) < 4 * ent["stderr"]
    lengths = np.zeros(src.max_length + 1)
    for d, p in law.items():
        lengths[len(d)] += p
    np.testing.assert_allclose(src.length_pmf(), lengths, atol=1e-12)
    assert ent["mean_length"] == pytest.approx(float(np.arange(lengths.size) @ lengths))


@pytest.mark.parametrize("src", tiny_sources(), ids=lambda s: s.name)
def test_samples_follow_the_law(src):
    n = 20000
    docs = src.sample(n, np.random.default_rng(0))
    counts: dict = {}
    for d in docs:
        counts[tuple(int(x) for x in d)] = counts.get(tuple(int(x) for x in d), 0) + 1
    assert chi_square_p(counts, enumerate_law(src), n) > 1e-3


@pytest.mark.parametrize("src", tiny_sources(), ids=lambda s: s.name)
def test_stream_windows_are_a_law_and_match_simulated_streams(src):
    width = 4
    windows = np.array(list(itertools.product(range(src.n_symbols + 1), repeat=width)))
    start = src.stream_start([0, width])
    for s in (start[0], start[1], src.stationary()):
        assert np.exp(src.stream_log_prob(windows, s)).sum() == pytest.approx(1.0, abs=1e-10)
    # the second window (stream position `width`) of independent streams, against its exact law
    n, docs, k = 20000, src.sample(60000, np.random.default_rng(1)), 0
    counts: dict = {}
    for _ in range(n):
        stream: list[int] = []
        while len(stream) < 2 * width:
            stream += [int(x) for x in docs[k]] + [src.eos]
            k += 1
        key = tuple(stream[width : 2 * width])
        counts[key] = counts.get(key, 0) + 1
    lp = src.stream_log_prob(windows, start[1])
    expected = {tuple(int(x) for x in w): math.exp(p) for w, p in zip(windows, lp) if p > -math.inf}
    assert chi_square_p(counts, expected, n) > 1e-3


def test_dyck_documents_are_balanced_and_mismatches_impossible():
    src = synthetic.dyck_source(types=2, depth=3, fillers=3, max_length=40)
    opens = {src.symbols.index(b[0]): i for i, b in enumerate(synthetic.BRACKETS[:2])}
    closes = {src.symbols.index(b[1]): i for i, b in enumerate(synthetic.BRACKETS[:2])}
    for d in src.sample(500, np.random.default_rng(0)):
        stack = []
        for t in d:
            if t in opens:
                stack.append(opens[t])
                assert len(stack) <= 3
            elif t in closes:
                assert stack and stack.pop() == closes[t]
        assert not stack and src.log_prob(d) > -math.inf
    o, c = src.symbols.index("("), src.symbols.index("]")
    assert src.log_prob([o, c]) == -math.inf            # mismatched
    assert src.log_prob([o, src.symbols.index(")")]) > -math.inf
    assert src.log_prob([o]) == -math.inf               # unclosed
    assert src.log_prob([o, 99]) == -math.inf           # not a symbol


def test_length_conditioning_is_exact():
    base = synthetic.hmm_source(states=4, symbols=3, max_length=9, min_length=0, seed=2)
    cond = synthetic.hmm_source(states=4, symbols=3, max_length=6, min_length=3, seed=2)
    pmf = base.length_pmf()
    z = pmf[3:7].sum()
    np.testing.assert_allclose(cond.length_pmf()[3:], pmf[3:7] / z, atol=1e-12)
    doc = cond.sample(1, np.random.default_rng(0))[0]
    assert 3 <= len(doc) <= 6
    # log p under the conditioned law = base law (whose range includes it) renormalised
    assert cond.log_prob(doc) == pytest.approx(base.log_prob(doc) - math.log(z) + math.log(pmf[: 10].sum()))
    with pytest.raises(UserError):
        synthetic.hmm_source(min_length=5, max_length=4)


def test_source_from_spec_errors_are_one_line():
    with pytest.raises(UserError, match="unknown source"):
        synthetic.source_from_spec({"name": "synthetic", "source": "nope"})
    with pytest.raises(UserError, match="bad options"):
        synthetic.source_from_spec({"name": "synthetic", "source": "dyck", "states": 3})


# --- the data path ---------------------------------------------------------------------------------
def synthetic_data_cfg(**over):
    cfg = {"corpus": {"name": "synthetic", "source": "dyck", "documents": 300, "max_length": 20},
           "tokenizer": {"kind": "symbols"}, "seq_len": 16, "max_len": 21, "min_tokens": 2,
           "valid_fraction": 0.2, "test_fraction": 0.2}
    cfg.update(over)
    return cfg


def test_prepare_keeps_every_document_and_ids_are_source_symbols(tmp_path):
    from harness.data.storage import load_split
    from harness.data.manifest import load_tokenizer
    from harness.data.prepare import prepare
    from harness.metrics.exact import score_rows

    manifest = prepare(synthetic_data_cfg(), tmp_path)
    assert manifest["synthetic"]["source"] == "dyck" and manifest["synthetic"]["entropy"]["method"] == "exact"
    for split in ("train", "valid", "test"):
        assert manifest["splits"][split]["varlen"]["truncated"] == 0
        assert manifest["splits"][split]["varlen"]["dropped_short"] == 0
    tok = load_tokenizer(tmp_path)
    src = synthetic.source_from_spec(manifest["config"]["corpus"])
    assert tok.vocab.bos == src.n_symbols and tok.vocab.eos == src.n_symbols + 1
    assert tok.encode(" ".join(src.symbols)) == list(range(src.n_symbols))
    for layout in ("varlen", "fixed"):
        data = load_split(tmp_path, "test", layout)
        logp, n_tok = score_rows(src, data, range(len(data)), layout)
        assert np.isfinite(logp).all() and (logp < 0).all()
        if layout == "fixed":
            assert (n_tok == 15).all()
    # the documents drawn are the source's own draws: the varlen test rows' mean exact NLL per
    # document is close to the source's entropy (exact for dyck), within 4 standard errors
    data = load_split(tmp_path, "train", "varlen")
    logp, _ = score_rows(src, data, range(len(data)), "varlen")
    ent = manifest["synthetic"]["entropy"]["nats_per_document"]
    assert abs(-logp.mean() - ent) < 4 * logp.std() / math.sqrt(logp.size)


def test_prepare_refuses_to_cut_or_drop_documents(tmp_path):
    from harness.data.prepare import prepare

    with pytest.raises(UserError, match="max_len"):
        prepare(synthetic_data_cfg(max_len=20), tmp_path)
    with pytest.raises(UserError, match="min_tokens"):
        prepare(synthetic_data_cfg(min_tokens=4), tmp_path)
    with pytest.raises(UserError, match="symbols"):
        prepare(synthetic_data_cfg(tokenizer={"kind": "bpe", "vocab_size": 300}), tmp_path)


def test_config_synthetic_defaults_and_checks(toy_config):
    from harness.core.config import load_config
    from harness.core.metric_registry import SYNTHETIC_DEFAULT

    cfg = {"data": synthetic_data_cfg()}
    assert load_config(cfg)["evaluate"]["metrics"] == list(SYNTHETIC_DEFAULT)
    given = {"data": synthetic_data_cfg(), "evaluate": {"metrics": ["ppl", "samples", "genppl"]}}
    assert load_config(given)["evaluate"]["metrics"] == ["ppl", "samples", "genppl"]
    with pytest.raises(UserError, match="exact needs a synthetic corpus"):
        load_config({**toy_config, "evaluate": {"metrics": ["ppl", "samples", "exact"]}})
    with pytest.raises(UserError, match="symbols"):
        load_config({"data": synthetic_data_cfg(tokenizer={"kind": "bpe"})})
    with pytest.raises(UserError, match="synthetic.*unknown key|unknown key"):
        load_config({"data": synthetic_data_cfg(corpus={"name": "synthetic", "source": "hmm", "bogus": 1})})
