"""Evaluation metrics against hand-worked values, with tiny stand-ins for methods and tokenizers."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp, wasserstein_distance

from harness.core.batch import Batch, Vocab, predicted_tokens
from harness.core.bounds import nll_statistics
from harness.metrics import diversity, lengths, mauve, ppl, samples, speed
from harness.data.tokenizer import render
from harness.core.settings import MauveSettings
from harness.core.methods import SampleResult

LETTERS = "abcdefghijklmnopqrstuvwxyz "
VOCAB = Vocab(size=31, bos=27, eos=28, pad=29, mask=30)


class FakeTokenizer:
    """One id per character; the specials are 27..30."""

    name = "chars"
    vocab = VOCAB

    def encode(self, text):
        return [LETTERS.index(c) for c in text]

    def decode(self, ids, skip_special=True):
        names = {27: "<bos>", 28: "<eos>", 29: "<pad>", 30: "<mask>"}
        return "".join(LETTERS[i] if i < 27 else ("" if skip_special else names[i]) for i in ids)


class FakeMethod(torch.nn.Module):
    """nll_bound = 2 nats per predicted token + U(0,1) noise; samples of random letters."""

    max_len = 13

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    @property
    def device(self):
        return self.w.device

    paper_equals_strict = False

    def nll_bound(self, batch, mc, generator=None, convention="strict"):
        noise = torch.rand(batch.size, generator=generator, dtype=torch.float64)
        per_token = 2.0 if convention == "strict" else 1.5   # the paper convention truncates 0.5 nats/token
        return per_token * predicted_tokens(batch).double() + noise

    def bound_omits(self, convention="strict"):
        return f"fake {convention}"

    def sample(self, n, steps, *, generator=None, top_p=1.0, prompt=None, length=None):
        self.calls += 1
        lens = torch.randint(0, self.max_len, (n,), generator=generator)
        toks = [torch.randint(0, 27, (int(k),), generator=generator).tolist() for k in lens]
        traj = [[min(int(k), s) for k in lens] for s in range(steps)]
        return SampleResult(toks, nfe=steps, trajectory=traj, info={"fake": True})

    def flops_per_token(self, batch):
        return 123.0


class FakeData:
    """A varlen split of 5 documents: [BOS] + content."""

    docs = [[0, 1], [2, 26, 3, 28, 4], [], [5, 5, 5], [7]]

    def __len__(self):
        return len(self.docs)

    def batch(self, indices):
        rows = [[VOCAB.bos] + self.docs[i] for i in indices]
        width = max(map(len, rows))
        x0 = torch.full((len(rows), width), VOCAB.pad)
        for b, r in enumerate(rows):
            x0[b, : len(r)] = torch.tensor(r)
        return Batch(x0, torch.tensor([len(r) for r in rows]), "varlen")


# --- entropy / distinct-n / self-BLEU ------------------------------------------------------
def test_unigram_entropy_hand_value():
    h = diversity.unigram_entropy([1, 1, 2, 3])  # p = (1/2, 1/4, 1/4)
    assert h == pytest.approx(1.039721, abs=1e-6)
    assert h / diversity.LN2 == pytest.approx(1.5, abs=1e-12)
    assert diversity.unigram_entropy([4, 4, 4]) == 0.0
    assert diversity.mean_entropy([[1, 1, 2, 3], [], [5, 6]]) == pytest.approx((1.039721 + math.log(2)) / 2, abs=1e-6)


def test_distinct_n_hand_values():
    toks = [["a", "b", "a", "b"], ["a", "b", "c"]]
    assert diversity.distinct_n(toks, 1) == pytest.approx(3 / 7)
    assert diversity.distinct_n(toks, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc
    assert diversity.distinct_n(toks, 3) == pytest.approx(1.0)
    assert diversity.distinct_n([["a"]], 2) is None


def test_self_bleu_identical_is_one_and_hand_value():
    same = [["the", "cat", "sat", "on", "the", "mat"]] * 4
    assert diversity.self_bleu(same)[0] == pytest.approx(1.0)
    # "a b c d" vs "a b c e": p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0 -> 0.1/1 (smoothing method1), BP = 1
    value, used = diversity.self_bleu([list("abcd"), list("abce")])
    assert used == 2 and value == pytest.approx((0.75 * (2 / 3) * 0.5 * 0.1) ** 0.25, rel=1e-9)
    # the cap limits the samples used; empty samples are skipped
    assert diversity.self_bleu([list("abcd"), [], list("abcd"), list("wxyz")], max_samples=2) == (pytest.approx(1.0), 2)


def test_diversity_values_on_rows():
    rows = [{"token_ids": [1, 1, 2, 3], "text": "the cat sat"}, {"token_ids": [4, 5], "text": "the dog sat"}]
    v = diversity.diversity_values(rows, self_bleu_samples=10)
    assert v["entropy_nats"] == pytest.approx((1.039721 + math.log(2)) / 2, abs=1e-6)
    assert v["entropy_bits"] == pytest.approx(v["entropy_nats"] / math.log(2))
    assert v["distinct_1"] == pytest.approx(4 / 6) and v["distinct_2"] == pytest.approx(4 / 4)
    assert v["n"] == 2 and v["n_self_bleu"] == 2 and 0 < v["self_bleu"] < 1


# --- lengths ---------------------------------------------------------------------------------
def test_w1_and_ks_hand_values_and_scipy():
    a, b = [1, 2, 3, 4], [2, 3, 4, 5, 6]
    d = lengths.distances(a, b)
    # integral of |F_a - F_b|: 0.25 + 0.3 + 0.35 + 0.4 + 0.2 ; sup |F_a - F_b| = 0.4 (at 4)
    assert d["w1"] == pytest.approx(1.5) and d["ks"] == pytest.approx(0.4)
    assert d["w1"] == pytest.approx(wasserstein_distance(a, b)) and d["ks"] == pytest.approx(ks_2samp(a, b).statistic)
    shifted = lengths.distances([0, 1, 3], [5, 6, 8])
    assert shifted == {"w1": pytest.approx(5.0), "ks": pytest.approx(1.0)}


def test_length_stats_and_histogram():
    s = lengths.length_stats([0, 2, 4, 10, 10], max_length=10)
    assert s["mean"] == pytest.approx(5.2) and s["sd"] == pytest.approx(np.std([0, 2, 4, 10, 10], ddof=1))
    assert s["q50"] == 4 and s["q10"] == pytest.approx(0.8) and s["q90"] == pytest.approx(10)
    assert s["empty_rate"] == pytest.approx(0.2) and s["max_rate"] == pytest.approx(0.4)
    v = lengths.lengths_values({16: [0, 2, 10]}, [1, 1, 9, 10], max_length=10, bins=4)
    h = v["histogram"]
    assert len(h["bins"]) == len(h["data"]) + 1 and h["bins"][0] == 0 and h["bins"][-1] > 10
    assert sum(h["samples"]["16"]) == 3 and sum(h["data"]) == 4
    assert v["by_steps"][0]["steps"] == 16 and v["data"]["mean"] == pytest.approx(5.25)


# --- MAUVE -------------------------------------------------------------------------------------
def _mauve_settings(**given) -> MauveSettings:
    return MauveSettings(**given)


def test_mauve_identical_near_one_disjoint_near_zero():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(120, 16)).astype(np.float32)
    s = _mauve_settings()
    kw = {k: getattr(s, k) for k in mauve.MAUVE_KEYS}
    assert mauve.mauve_score(p, p.copy(), seed=25, **kw) > 0.99
    far = rng.normal(size=(120, 16)).astype(np.float32) + 50.0
    assert mauve.mauve_score(p, far, seed=25, **kw) < 0.05


def test_mauve_subsets_are_disjoint_and_reported():
    idx = mauve.human_subsets(100, 30, 3, seed=1)
    assert len(idx) == 3 and all(len(i) == 30 for i in idx)
    assert len(set(np.concatenate(idx).tolist())) == 90
    assert len(mauve.human_subsets(50, 30, 3, seed=1)) == 1  # only one full subset fits
    rng = np.random.default_rng(1)
    p = rng.normal(size=(60, 8))
    s = _mauve_settings(human_samples=20, subsets=3, min_samples=20)
    out = mauve.evaluate_mauve(p, {16: p[:20] + 0.01}, s)
    assert out[0]["steps"] == 16 and len(out[0]["mauve_subsets"]) == 3 and out[0]["mauve_sd"] is not None
    assert out[0]["n_p"] == 20 and out[0]["n_q"] == 20 and out[0]["n_subsets"] == 3 and out[0]["reason"] is None
    assert out[0]["uncertainty"] == "sd (ddof=1) over 3 disjoint human subsets"


# --- ppl ---------------------------------------------------------------------------------------
def test_nll_statistics_hand_values():
    v = nll_statistics([2.0, 4.0, 9.0], [1, 2, 3])
    assert v["nats_per_token"] == pytest.approx(2.5) and v["ppl"] == pytest.approx(math.exp(2.5))
    assert v["per_sequence_mean"] == pytest.approx(7 / 3)
    # residuals B - R N = (-0.5, -1, 1.5): sqrt(3.5 / (3 * 2)) / mean N (= 2)
    assert v["stderr"] == pytest.approx(math.sqrt(3.5 / 6) / 2)
    assert v["n_sequences"] == 3 and v["n_tokens"] == 6
    assert nll_statistics([1.0], [2])["stderr"] is None


def test_evaluate_ppl_is_seeded_and_token_weighted():
    method, data = FakeMethod(), FakeData()
    batches = lambda: [data.batch([0, 1]), data.batch([2, 3, 4])]  # noqa: E731
    a = ppl.evaluate_ppl(method, batches(), mc=4, seed=3)
    b = ppl.evaluate_ppl(method, batches(), mc=4, seed=3)
    c = ppl.evaluate_ppl(method, batches(), mc=4, seed=4)
    assert a["nats_per_token"] == b["nats_per_token"] != c["nats_per_token"]
    n_tok = 3 + 6 + 1 + 4 + 2  # varlen N = content + 1
    g = torch.Generator().manual_seed(3)
    noise = torch.cat([torch.rand(2, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64)])
    assert a["n_tokens"] == n_tok and a["nats_per_token"] == pytest.approx(2.0 + float(noise.sum()) / n_tok)
    # the paper convention: its own seeded draws (seed + 1), same rows, labelled
    g = torch.Generator().manual_seed(4)
    noise_p = torch.cat([torch.rand(2, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64)])
    pc = a["paper_convention"]
    assert pc["nats_per_token"] == pytest.approx(1.5 + float(noise_p.sum()) / n_tok) and pc["stderr"] is not None
    assert a["convention"] == "strict" and a["omits"] == "fake strict" and pc["omits"] == "fake paper"
    assert not pc["same_as_strict"]
    per = a["per_sequence"]
    assert per["index"] == [0, 1, 2, 3, 4] and sum(per["n_tokens"]) == n_tok
    assert sum(per["strict"]) / n_tok == pytest.approx(a["nats_per_token"])
    assert sum(per["paper"]) / n_tok == pytest.approx(pc["nats_per_token"])
    # a method whose paper convention truncates nothing reports the strict values twice
    method.paper_equals_strict = True
    d = ppl.evaluate_ppl(method, batches(), mc=4, seed=3)
    assert d["paper_convention"]["nats_per_token"] == d["nats_per_token"] and d["paper_convention"]["same_as_strict"]


# --- samples and references -----------------------------------------------------------------
def test_render_splits_segments_at_eos_and_counts_content():
    r = render([0, 1, 28, 2, 29, 30], FakeTokenizer())
    assert r == {"text": "abc", "segments": ["ab", "c"], "length": 3}


def test_generate_is_reproducible_and_complete():
    tok = FakeTokenizer()
    rows, summary = samples.generate(FakeMethod(), tok, steps=[2, 5], n=5, batch_size=2, seed=7)
    again, _ = samples.generate(FakeMethod(), tok, steps=[2, 5], n=5, batch_size=2, seed=7)
    other, _ = samples.generate(FakeMethod(), tok, steps=[2, 5], n=5, batch_size=2, seed=8)
    key = lambda rs: [r["token_ids"] for r in rs]  # noqa: E731
    assert key(rows) == key(again) != key(other)
    assert [(r["steps"], r["index"]) for r in rows] == [(k, i) for k in (2, 5) for i in range(5)]
    assert [r["batch_size"] for r in rows[:5]] == [2, 2, 2, 2, 1]
    assert len({r["seed"] for r in rows}) == 6  # 3 batches x 2 steps values, all distinct
    for r in rows:
        assert r["text"] == tok.decode(r["token_ids"]) and r["length"] == len(r["token_ids"])
        assert len(r["trajectory"]) == r["steps"] and r["nfe"] == r["steps"]
    s2 = summary[0]
    assert s2["steps"] == 2 and s2["n"] == 5 and s2["batches"] == 3 and s2["nfe"] == 2 and s2["nfe_total"] == 6
    assert s2["mean_length"] == pytest.approx(np.mean([r["length"] for r in rows[:5]]))
    assert s2["seconds_per_sample"] >= 0 and s2["sampler_info"] == {"fake": True}


def test_reference_rows_strip_bos_and_follow_a_seeded_order():
    tok = FakeTokenizer()
    rows = samples.reference_rows(FakeData(), tok, n=4, seed=0)
    order = np.random.default_rng(0).permutation(5)[:4].tolist()
    assert [r["index"] for r in rows] == order
    for r in rows:
        assert r["token_ids"] == FakeData.docs[r["index"]]
    doc1 = render(FakeData.docs[1], tok)  # [c, space, d, EOS, e]
    assert doc1["segments"] == ["c d", "e"] and doc1["text"] == "c de" and doc1["length"] == 4
    everything = samples.reference_rows(FakeData(), tok, n=50, seed=0)
    assert sorted(r["index"] for r in everything) == list(range(5))  # n is capped by the split


# --- speed ---------------------------------------------------------------------------------------
def test_train_throughput_from_history(tmp_path):
    p = tmp_path / "history.csv"
    p.write_text("step,loss,lr,tokens_per_s,wall_time\n10,3,0.1,100,1.0\n20,3,0.1,200,2.0\n"
                 "30,3,0.1,300,3.5\n40,3,0.1,400,5.0\n")
    v = speed.train_throughput(p, skip_rows=1)
    assert v["tokens_per_s"] == pytest.approx(300) and v["s_per_step"] == pytest.approx(0.15) and v["rows"] == 3


def test_sample_cost_counts_calls_and_reports_memory():
    m = FakeMethod()
    out = speed.sample_cost(m, [3, 4], n=2, warmup=1, repeats=2)
    assert m.calls == 2 * (1 + 2)
    assert [e["steps"] for e in out] == [3, 4] and [e["nfe"] for e in out] == [3, 4]
    assert all(e["s_per_sample"] >= 0 and e["peak_mem_mb"] > 0 and len(e["times"]) == 2 for e in out)
    assert "ru_maxrss" in out[0]["peak_mem_kind"]


def test_the_metric_registry_agrees_with_the_schema_and_the_implementations():
    """One source of what each evaluation is: the schema's metric names and default come from the
    same list, and every registered implementation exists."""
    import importlib

    from harness.core.config import schema
    from harness.core.metric_registry import METRICS, SYNTHETIC_DEFAULT

    spec = schema()["properties"]["evaluate"]["properties"]["metrics"]
    selectable = [m.name for m in METRICS.values() if m.name != "zeroshot"]   # zeroshot: evaluate.zeroshot.datasets
    assert sorted(spec["items"]["enum"]) == sorted(selectable)
    assert spec["default"] == [m.name for m in METRICS.values() if m.default]
    assert set(SYNTHETIC_DEFAULT) <= set(METRICS)
    for m in METRICS.values():
        assert callable(getattr(importlib.import_module(m.module), m.function)), m.name
