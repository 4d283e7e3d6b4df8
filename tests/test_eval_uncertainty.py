"""Issue 11 item 3: MAUVE only with enough samples, bootstrap CIs on every quality number,
length-matched data rows, and the masked models' content after the first PAD."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp, wasserstein_distance

from harness.core.batch import Vocab
from harness.core.config import load_config
from harness.metrics import diversity, genppl, lengths, mauve, samples
from harness.core.settings import EvaluateSettings, MauveSettings
from harness.metrics.common import bootstrap_mean_ci, bootstrap_ratio_ci
from harness.core.methods import SampleResult

REPO = Path(__file__).resolve().parent.parent


def width(ci):
    return ci[1] - ci[0]


# --- MAUVE needs enough samples ----------------------------------------------------------------
@pytest.fixture
def no_mauve(monkeypatch):
    """mauve-text's compute_mauve fails the test if it is called."""
    import mauve as mauve_lib

    def boom(*args, **kwargs):
        raise AssertionError("compute_mauve must not run below min_samples")

    monkeypatch.setattr(mauve_lib, "compute_mauve", boom)


def test_mauve_below_min_samples_is_null_with_reason_and_not_run(no_mauve):
    rng = np.random.default_rng(0)
    s = MauveSettings(human_samples=256, subsets=5)   # spec 6.5 sizes
    assert s.min_samples == 256
    (e,) = mauve.evaluate_mauve(rng.normal(size=(40, 8)), {16: rng.normal(size=(16, 8))}, s)
    assert e["mauve"] is None and e["mauve_sd"] is None and e["mauve_subsets"] == [] and e["uncertainty"] is None
    assert e["reason"] == "n too small (n_p=40, n_q=16, need >= 256 each)"
    assert (e["steps"], e["n_p"], e["n_q"], e["n_subsets"]) == (16, 40, 16, 1)
    # enough references (one full subset of 256) but too few samples
    (e,) = mauve.evaluate_mauve(rng.normal(size=(300, 8)), {64: rng.normal(size=(255, 8))}, s)
    assert e["mauve"] is None and e["reason"] == "n too small (n_p=256, n_q=255, need >= 256 each)"


def test_mauve_with_one_subset_has_no_sd():
    rng = np.random.default_rng(1)
    p = rng.normal(size=(60, 8))
    s = MauveSettings(human_samples=20, subsets=1, min_samples=20)
    (e,) = mauve.evaluate_mauve(p, {16: p[:20] + 0.01}, s)
    assert 0 < e["mauve"] <= 1 + 1e-9 and e["mauve_sd"] is None and e["reason"] is None
    assert e["uncertainty"] == "none (one human subset)" and len(e["mauve_subsets"]) == 1


def test_reference_count_covers_the_mauve_subsets_and_default_study_is_n_too_small():
    def reference_count(config):
        return EvaluateSettings.of(config).reference_count()

    assert reference_count({"evaluate": {"mauve": {"human_samples": 256, "subsets": 5}}}) == 256 * 5
    ev = EvaluateSettings.of(load_config(REPO / "config/default.yaml"))
    assert reference_count(load_config(REPO / "config/default.yaml")) == max(16, 32) and ev.mauve.subsets == 1
    assert min(ev.mauve.human_samples, ev.samples.n) < ev.mauve.min_samples  # MAUVE null: honest
    assert reference_count({"evaluate": {"samples": {"n": 2000}}}) == 2000  # a length-matched reference per sample
    assert reference_count({"evaluate": {"references": {"n": 7}}}) == 7


# --- bootstrap CIs ------------------------------------------------------------------------------
def test_bootstrap_mean_ci_contains_the_mean_shrinks_with_n_and_is_seeded():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=50), rng.normal(size=800)
    a, b = bootstrap_mean_ci(small, reps=1000, seed=0), bootstrap_mean_ci(large, reps=1000, seed=0)
    assert a[0] <= small.mean() <= a[1] and b[0] <= large.mean() <= b[1]
    assert width(b) < width(a) / 2  # ~ 1 / sqrt(16) = 1/4
    assert bootstrap_mean_ci(small, reps=1000, seed=0) == a != bootstrap_mean_ci(small, reps=1000, seed=1)
    assert bootstrap_mean_ci([1.0], reps=100, seed=0) is None and bootstrap_mean_ci(small, reps=0, seed=0) is None
    lo, hi = bootstrap_ratio_ci([2.0, 4.0, 6.0], [1, 2, 3], reps=100, seed=0, transform=math.exp)
    assert lo == pytest.approx(math.exp(2.0)) and hi == pytest.approx(math.exp(2.0))


def _scored(rng, m):
    S = genppl.Scored
    out = []
    for _ in range(m):
        k = int(rng.integers(1, 20))
        tok = np.abs(rng.normal(3.0, 0.5, size=k))
        out.append(S(float(tok.sum()), k, rng.integers(0, 8, size=k).tolist(), k, False, None, tok.tolist()))
    return out


def test_genppl_cis_contain_the_point_and_shrink_with_n():
    rng = np.random.default_rng(3)
    few, many = _scored(rng, 16), _scored(rng, 1024)
    vf, vm = genppl.summarize(few, bootstrap=500, seed=0), genppl.summarize(many, bootstrap=500, seed=0)
    for v in (vf, vm):
        assert v["ci95"][0] <= v["gen_ppl"] <= v["ci95"][1]
        assert v["entropy_ci95"][0] <= v["entropy_nats"] <= v["entropy_ci95"][1]
        assert v["gen_ppl_mean_per_sample_ci95"][0] <= v["gen_ppl_mean_per_sample"] <= v["gen_ppl_mean_per_sample_ci95"][1]
        assert len(v["per_sample"]["nll"]) == len(v["per_sample"]["entropy_nats"]) == v["n"]
    for key in ("ci95", "entropy_ci95", "gen_ppl_mean_per_sample_ci95"):
        assert width(vm[key]) < width(vf[key]) / 3, key  # n x 64: ~ 1/8


def _rows(rng, m, vocab=20):
    words = [f"w{i}" for i in range(vocab)]
    rows = []
    for _ in range(m):
        k = int(rng.integers(3, 12))
        rows.append({"token_ids": rng.integers(0, 50, size=k).tolist(), "text": " ".join(rng.choice(words, size=k))})
    return rows


def test_diversity_cis_contain_the_point_and_shrink_with_n():
    rng = np.random.default_rng(5)
    kw = dict(self_bleu_samples=128, bleu_order=2, bootstrap=500, seed=0)
    few, many = diversity.diversity_values(_rows(rng, 12), **kw), diversity.diversity_values(_rows(rng, 120), **kw)
    names = {"entropy_nats": "entropy_ci95", **{k: f"{k}_ci95" for k in ("distinct_1", "distinct_2", "distinct_3",
                                                                          "self_bleu")}}
    for v in (few, many):
        for name, ci in names.items():
            assert v[ci][0] <= v[name] <= v[ci][1], name
        assert len(v["per_sample"]["self_bleu"]) == v["n_self_bleu"] and len(v["per_sample"]["entropy_nats"]) == v["n"]
    assert few["distinct_3"] == 1.0 and width(few["distinct_3_ci95"]) == 0  # every trigram unique in every resample
    for name, ci in names.items():  # n x 10: ~ 1/3
        if name != "distinct_3":
            assert width(many[ci]) < width(few[ci]) / 1.5, ci


def test_distinct_contributions_add_up_to_distinct_n():
    toks = [["a", "b", "a"], ["b", "a"], [], ["c"]]
    for n in (1, 2):
        w, g = diversity.distinct_contributions(toks, n)
        assert w.sum() / g.sum() == pytest.approx(diversity.distinct_n(toks, n))
    w, g = diversity.distinct_contributions(toks, 1)  # counts a:3 b:2 c:1
    assert w.tolist() == pytest.approx([2 / 3 + 1 / 2, 1 / 2 + 1 / 3, 0.0, 1.0]) and g.tolist() == [3, 2, 0, 1]


def test_ecdf_distances_equal_scipy():
    rng = np.random.default_rng(2)
    for _ in range(5):
        a, b = rng.integers(0, 30, size=int(rng.integers(1, 40))), rng.integers(5, 40, size=int(rng.integers(1, 40)))
        w1, ks = lengths.ecdf_distances(a, b)
        assert w1 == pytest.approx(wasserstein_distance(a, b)) and ks == pytest.approx(ks_2samp(a, b).statistic)


def test_length_cis_contain_the_point_and_shrink_with_n():
    rng = np.random.default_rng(4)

    def draw(m):
        gen = np.clip(rng.normal(20, 4, size=m).round(), 0, 60).astype(int).tolist()
        ref = np.clip(rng.normal(26, 5, size=m).round(), 0, 60).astype(int).tolist()
        return lengths.lengths_values({16: gen}, ref, max_length=60, bins=6, bootstrap=500, seed=0)

    few, many = draw(32), draw(1024)
    for v in (few, many):
        e = v["by_steps"][0]
        for name in ("mean", "w1", "ks"):
            assert e[f"{name}_ci95"][0] <= e[name] <= e[f"{name}_ci95"][1], name
        assert v["data"]["mean_ci95"][0] <= v["data"]["mean"] <= v["data"]["mean_ci95"][1]
        assert len(e["lengths"]) == e["n"] and len(v["data"]["lengths"]) == v["data"]["n"]
    for name in ("mean", "w1", "ks"):
        assert width(many["by_steps"][0][f"{name}_ci95"]) < width(few["by_steps"][0][f"{name}_ci95"]) / 2, name
    none = lengths.lengths_values({16: [3, 4]}, [5, 6], max_length=10, bins=2)  # bootstrap = 0: no CIs
    assert none["by_steps"][0]["w1_ci95"] is None and none["by_steps"][0]["mean_ci95"] is None


# --- length-matched data rows -------------------------------------------------------------------
def S(targets, token_nll):
    return genppl.Scored(float(sum(token_nll)), len(targets), list(targets), len(targets), False, None, list(token_nll))


def test_length_matched_exact_values_with_a_short_match():
    # samples with 3, 1, 0 (empty), 2 and 6 scored targets; only their lengths matter
    smp = [S([1] * k, [1.0] * k) for k in (3, 1, 0, 2, 6)]
    refs = [S([7, 7, 8, 9, 9], [0.5, 1.0, 1.5, 2.0, 2.5]),  # the only one >= 3: cut to 3 for sample 0
            S([4, 5], [1.0, 3.0]),                          # the only one >= 2 left: sample 3, whole
            S([6], [2.0]), S([], []), S([6], [2.0])]        # two equal 1-target texts: sample 1, and 6 (short)
    v = genppl.length_matched(smp, refs, bootstrap=200, seed=0, key=16)
    assert v["n"] == 4 and v["n_short"] == 1 and v["n_targets"] == 7 and v["note"] == "distinct references"
    assert v["gen_ppl"] == pytest.approx(math.exp((3.0 + 4.0 + 2.0 + 2.0) / 7))
    h3 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert v["entropy_nats"] == pytest.approx((h3 + math.log(2) + 0 + 0) / 4)
    ps = v["per_sample"]
    assert ps["sample_index"] == [0, 1, 3, 4] and ps["n_targets"] == [3, 1, 2, 1]
    assert ps["reference_index"][0] == 0 and ps["reference_index"][2] == 1
    assert {ps["reference_index"][1], ps["reference_index"][3]} == {2, 4}  # each reference once
    assert ps["nll"] == pytest.approx([3.0, 2.0, 4.0, 2.0])
    assert v["ci95"][0] <= v["gen_ppl"] <= v["ci95"][1] and v["entropy_ci95"][0] <= v["entropy_nats"] <= v["entropy_ci95"][1]


def test_length_matched_reuses_references_only_when_too_few():
    smp = [S([1, 2], [0.1, 0.1]) for _ in range(3)]
    v = genppl.length_matched(smp, [S([3, 3, 4], [1.0, 2.0, 4.0]), S([], [])], bootstrap=0)
    assert v["n"] == 3 and v["n_short"] == 0 and v["per_sample"]["reference_index"] == [0, 0, 0]
    assert v["note"] == "references reused: 1 non-empty references for 3 samples (each used at most 3 times)"
    assert v["gen_ppl"] == pytest.approx(math.exp(3.0 / 2)) and v["entropy_nats"] == 0.0 and v["ci95"] is None
    assert genppl.length_matched([S([], [])], [S([1], [1.0])]) is None  # no non-empty sample: nothing to match


def test_match_lengths_is_seeded_and_maximises_full_matches():
    lens, refs = [3, 3, 1, 2, 5], [3, 1, 3, 9, 2, 6, 4]
    seen = set()
    for seed in range(20):
        pairs, n_short, uses = genppl.match_lengths(lens, refs, seed)
        assert n_short == 0 and uses == 1 and len({j for _, j in pairs}) == len(lens)
        assert all(refs[j] >= lens[i] for i, j in pairs)
        assert genppl.match_lengths(lens, refs, seed) == (pairs, n_short, uses)
        seen.add(tuple(pairs))
    assert len(seen) > 1  # the draw among eligible references is random
    # a sample longer than every reference can only get a short one, and it does not steal a
    # reference that a shorter sample needs
    pairs, n_short, _ = genppl.match_lengths([9, 2], [2, 1], 0)
    assert n_short == 1 and dict(pairs) == {0: 1, 1: 0}


# --- content after the first PAD (masked models, varlen) ----------------------------------------
VOCAB = Vocab(size=10, bos=0, eos=1, pad=2, mask=3)


def test_cut_at_first_pad_counts_what_it_drops():
    from baselines.masked import cut_at_first_pad

    tokens, after = cut_at_first_pad([[4, 5, 2, 2], [2, 6, 2, 7], [4, 5, 6], [2, 2, 2]], pad=2)
    assert tokens == [[4, 5], [], [4, 5, 6], []] and after == [0, 2, 0, 0]


@pytest.mark.parametrize("layout", ["varlen", "fixed"])
def test_masked_sample_reports_content_after_pad(monkeypatch, layout):
    """A hand-built final canvas through MaskedDiffusion.sample (the unmasking itself stubbed)."""
    import baselines.masked as masked
    from harness.core.methods import build

    canvas = torch.tensor([[0, 4, 5, 2, 2, 2], [0, 2, 6, 2, 7, 8], [0, 4, 5, 6, 7, 8], [0, 9, 2, 2, 2, 4]])
    monkeypatch.setattr(masked, "ancestral_unmask", lambda *a, **k: (canvas.clone(), 3))
    model = build("mdlm", VOCAB, "tiny", layout, 6, backbone={"n_layers": 1, "d_model": 16, "n_heads": 2}).eval()
    out = model.sample(4, 2, generator=torch.Generator().manual_seed(0))
    if layout == "fixed":
        assert out.per_sample == {} and out.tokens == canvas[:, 1:].tolist()
        return
    assert out.tokens == [[4, 5], [], [4, 5, 6, 7, 8], [9]] and out.nfe == 3
    assert out.per_sample == {"content_after_pad": [False, True, False, True], "tokens_after_pad": [0, 3, 0, 1]}


class PadMethod(torch.nn.Module):
    """Samples of length i % 3; per-sample flags `i % 2 == 1` (i counted over calls); a per-call count."""

    max_len = 8

    def __init__(self, report=True):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen, self.report = 0, report

    @property
    def device(self):
        return self.w.device

    def sample(self, n, steps, *, generator=None, top_p=1.0, prompt=None, length=None):
        idx = list(range(self.seen, self.seen + n))
        self.seen += n
        per = {"content_after_pad": [i % 2 == 1 for i in idx], "tokens_after_pad": [i % 2 for i in idx]}
        return SampleResult([[4] * (i % 3) for i in idx], nfe=1, info={"steps": steps, "truncated": n},
                            per_sample=per if self.report else {})


class CharTokenizer:
    vocab = Vocab(size=10, bos=0, eos=1, pad=2, mask=3)

    def decode(self, ids, skip_special=True):
        return "".join("x" for t in ids if t > 3)


def test_generate_counts_content_after_pad_over_every_batch():
    rows, summary = samples.generate(PadMethod(), CharTokenizer(), steps=[4], n=5, batch_size=2, seed=0)
    assert [r["content_after_pad"] for r in rows] == [False, True, False, True, False]
    assert [r["tokens_after_pad"] for r in rows] == [0, 1, 0, 1, 0]
    (e,) = summary
    assert e["batches"] == 3 and e["content_after_pad_count"] == 2 and e["content_after_pad_rate"] == pytest.approx(0.4)
    assert e["sampler_info"] == {"steps": 4, "truncated": 5}  # per-call counts summed, settings kept
    rows, summary = samples.generate(PadMethod(report=False), CharTokenizer(), steps=[4], n=3, batch_size=2, seed=0)
    assert all(r["content_after_pad"] is None for r in rows)
    assert summary[0]["content_after_pad_rate"] is None and summary[0]["content_after_pad_count"] is None


def test_merge_info_sums_counts_and_keeps_what_varies():
    merged = samples.merge_info([{"steps": 4, "reached_length_cap": 1, "grid": "a"},
                                 {"steps": 4, "reached_length_cap": 2, "grid": "b"}])
    assert merged == {"steps": 4, "reached_length_cap": 3, "grid": "a", "varies_by_call": {"grid": ["a", "b"]}}
    assert samples.merge_info([]) == {}
