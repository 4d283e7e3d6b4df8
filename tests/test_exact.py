"""Exact metrics of synthetic studies (harness.metrics.exact) on hand-worked values."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from harness.data import synthetic
from harness.core.batch import Vocab
from harness.metrics import exact

SRC = synthetic.dyck_source(types=2, depth=2, fillers=2, max_length=10)
V = SRC.n_symbols
VOCAB = Vocab(size=V + 4, bos=V, eos=V + 1, pad=V + 2, mask=V + 3)
OPEN, CLOSE, A = SRC.symbols.index("("), SRC.symbols.index(")"), SRC.symbols.index("a")


def test_ids_map_to_the_source_alphabet():
    np.testing.assert_array_equal(exact.to_source_ids([OPEN, VOCAB.eos, VOCAB.mask, VOCAB.bos], VOCAB, V),
                                  [OPEN, V, -1, -1])
    # varlen documents: BOS dropped, cut at the first EOS or PAD; a MASK left inside stays (invalid)
    assert exact.document_of([VOCAB.bos, OPEN, CLOSE, VOCAB.eos, A], VOCAB) == [OPEN, CLOSE]
    assert exact.document_of([OPEN, CLOSE, VOCAB.pad, VOCAB.pad], VOCAB) == [OPEN, CLOSE]
    assert exact.document_of([OPEN, VOCAB.mask, CLOSE], VOCAB) == [OPEN, VOCAB.mask, CLOSE]


def test_scored_samples_flag_impossible_ones():
    rows = [{"token_ids": [OPEN, CLOSE]}, {"token_ids": [OPEN, VOCAB.mask, CLOSE]}, {"token_ids": [OPEN, A]},
            {"token_ids": [A, A, VOCAB.eos]}]
    s = exact.score_samples(SRC, rows, VOCAB, "varlen")
    assert s["logp"][0] == pytest.approx(SRC.log_prob([OPEN, CLOSE]))
    assert s["logp"][1] == -math.inf and s["logp"][2] == -math.inf       # a MASK inside; unclosed bracket
    assert s["logp"][3] == pytest.approx(SRC.log_prob([A, A]))
    assert list(s["tokens"]) == [3, 4, 3, 3] and list(s["lengths"]) == [2, 3, 2, 2]
    row = exact.summarise(s, SRC.length_pmf(), seed=0)
    assert row["invalid"] == 2 and row["invalid_fraction"] == 0.5 and row["logp"][1] is None
    assert row["nats_per_token"] == pytest.approx(-(s["logp"][0] + s["logp"][3]) / 6)
    # fixed windows: EOS is the stream separator, scored from the stationary distribution
    rows = [{"token_ids": [A, VOCAB.eos, OPEN, CLOSE]}, {"token_ids": [A, VOCAB.eos, OPEN]}]   # DID-fixed may stop short
    fixed = exact.score_samples(SRC, rows, VOCAB, "fixed", SRC.stationary())
    assert np.isfinite(fixed["logp"]).all() and list(fixed["tokens"]) == [4, 3] and fixed["lengths"] is None
    one = exact.score_samples(SRC, rows[1:], VOCAB, "fixed", SRC.stationary())
    assert one["logp"][0] == pytest.approx(fixed["logp"][1])


def test_bound_gap_is_bound_minus_exact_nll_per_token():
    ppl = {"per_sequence": {"index": [0, 1], "n_tokens": [4, 6], "strict": [10.0, 12.0], "paper": [8.0, 9.0]}}
    g = exact.bound_gaps(ppl, np.array([-7.0, -11.0]), np.array([4, 6]))
    assert g["exact"]["nats_per_token"] == pytest.approx(18 / 10)
    assert g["strict"]["nats_per_token"] == pytest.approx((3 + 1) / 10)
    assert g["paper"]["nats_per_token"] == pytest.approx((1 - 2) / 10) and g["paper"]["negative_rows"] == 1
    assert g["strict"]["negative_rows"] == 0 and g["strict"]["stderr"] is not None


def test_length_distances_and_their_null():
    pmf = np.array([0.0, 0.5, 0.5])
    assert exact.length_distances([1, 2], pmf) == (0.0, 0.0)
    assert exact.length_distances([3, 3], pmf) == pytest.approx((1.0, 1.0))
    assert exact.length_distances([1, 1], pmf) == pytest.approx((0.5, 0.5))
    null = exact.length_null(50, pmf, seed=0, draws=200)
    assert 0 < null["tv_mean"] < null["tv_q95"] < 0.4 and null["_tv"].size == 200
    # lengths drawn from the law itself sit inside the null
    lengths = np.random.default_rng(1).choice(3, size=50, p=pmf)
    tv, ks = exact.length_distances(lengths, pmf)
    assert np.mean(null["_tv"] >= tv) > 0.01


def test_wilson_interval():
    lo, hi = exact.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = exact.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert exact.wilson(0, 0) is None


def test_unigram_entropy():
    assert exact.unigram_entropy([]) == 0.0
    assert exact.unigram_entropy([3, 3, 3]) == 0.0
    assert exact.unigram_entropy([1, 2, 1, 2]) == pytest.approx(math.log(2))


# --- the tables of a synthetic study (analysis.synthetic) ----------------------------------------
def _write(path, values):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"values": values}))


def _exact_values(nll: float, invalid: int, n: int = 40) -> dict:
    logp = [None] * invalid + [-nll * 10] * (n - invalid)
    return {"bound_gap": {"strict": {"nats_per_token": 0.0, "stderr": 0.01, "n_sequences": 8},
                          "paper": {"nats_per_token": 0.0, "stderr": 0.01}, "exact": {"nats_per_token": 1.5}},
            "valid_subset": {"nats_per_token": 1.4},
            "by_steps": [{"steps": 8, "n": n, "nats_per_token": nll, "stderr": 0.01, "invalid": invalid,
                          "invalid_fraction": invalid / n, "invalid_ci95": exact.wilson(invalid, n),
                          "logp": logp, "n_tokens_per_sample": [10] * n}],
            "data": {"n": n, "nats_per_token": 1.5, "invalid": 0, "invalid_fraction": 0.0}}


def test_synthetic_tables_test_against_the_reference(tmp_path):
    import analysis
    from analysis.synthetic import bound_gap_table, exact_samples_table
    from harness.results.study import load_study

    rows = list(range(8))
    for name, shift, nll, invalid in (("did-varlen-tiny-s0", 0.0, 1.6, 2), ("ar-varlen-tiny-s0", 0.25, 1.6, 30)):
        run = tmp_path / "runs" / name
        strict = [10 * (1.5 + shift) + 0.1 * (j % 3) for j in rows]
        _write(run / "eval" / "ppl.json", {"nats_per_token": 1.5 + shift, "per_sequence": {
            "index": rows, "n_tokens": [10] * 8, "strict": strict, "paper": strict}})
        v = _exact_values(nll, invalid)
        v["bound_gap"]["strict"]["nats_per_token"] = shift + 0.01
        _write(run / "eval" / "exact.json", v)
    study = load_study(tmp_path, {"runs": [{"method": "did", "layout": "varlen"}, {"method": "ar", "layout": "varlen"}]})
    gap = bound_gap_table(study, None).data.set_index("method")
    # AR's bound is 0.25 nats/token above DID's on every row: significant, paired over rows
    assert gap.loc["ar", "diff_vs_ref"] == pytest.approx(0.25) and gap.loc["ar", "diff_significant"] is True
    samples = exact_samples_table(study, None).data.set_index("method")
    assert samples.loc["ar", "invalid_significant"] is True            # 75% vs 5% invalid of 40
    assert samples.loc["ar", "nll_significant"] is False               # the same NLL
    summary = analysis.headline(study, None)
    assert "exact metrics" in summary.title
    # no validation curve: nothing says the runs converged, so the headline draws no verdict
    assert "(n.c.)" in summary.display.set_index("Method").loc["ar", "vs DID [95%]"]
    assert "no comparison" in analysis.significance_line(summary)
    for name in ("did-varlen-tiny-s0", "ar-varlen-tiny-s0"):   # flat curves: both plateaued
        (tmp_path / "runs" / name / "history.csv").write_text(
            "step,loss,valid_nats_per_token\n100,1,1.6\n200,1,1.55\n300,1,1.548\n400,1,1.547\n")
        (tmp_path / "runs" / name / "train.json").write_text(json.dumps(
            {"method": name.split("-")[0], "layout": "varlen", "size": "tiny", "seed": 0, "steps": 400,
             "batch_size": 8}))
    study = load_study(tmp_path, {"runs": [{"method": "did", "layout": "varlen"}, {"method": "ar", "layout": "varlen"}]})
    summary = analysis.headline(study, None)
    line = analysis.significance_line(summary)
    assert "ar (varlen): higher likelihood bound" in line
    # the invalid fractions differ, but with no untrained level nothing says both learned: not marked
    assert "invalid fraction" not in line
    assert "not past untrained" in summary.display.set_index("Method").loc["ar", "Invalid @8"]


def test_fixed_windows_also_score_the_documents_they_hold_whole():
    e = SRC.eos
    docs = exact.complete_documents(SRC, [np.array([A, e, OPEN, CLOSE, e, A, A, e, OPEN, e, OPEN])])
    # [OPEN, CLOSE] and [A, A] are whole (between two EOS) and valid; [OPEN] is whole and invalid;
    # the pieces before the first and after the last EOS are cut by the window
    assert docs["logp"][0] == pytest.approx(SRC.log_prob([OPEN, CLOSE]))
    assert docs["logp"][1] == pytest.approx(SRC.log_prob([A, A])) and docs["logp"][2] == -math.inf
    assert list(docs["tokens"]) == [3, 3, 2]
    row = exact.summarise({"logp": np.array([-3.0]), "tokens": np.array([11]), "lengths": None,
                           "entropy": np.array([1.0]), "documents": docs}, None, seed=0)
    assert row["documents"]["n"] == 3 and row["documents"]["invalid"] == 1
    assert row["documents"]["nats_per_token"] == pytest.approx(-(docs["logp"][0] + docs["logp"][1]) / 6)
