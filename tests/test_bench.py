"""The cost benchmark and the study's cost job run methods interleaved on identical work and
report ratios to DID (the micro study below trains 4 runs for 2 steps: a few seconds)."""
import argparse
import json

import pytest
import torch
import yaml

from harness.metrics import bench, timing


def test_bench_train_tiny(toy_data, tmp_path):
    out = tmp_path / "bench.json"
    rc = bench.main(["train", "--data", str(toy_data), "--sizes", "tiny", "--fixed-lengths", "32",
                     "--methods", "did-fixed", "radd", "did", "--batch-size", "4", "--warmup", "0",
                     "--repeats", "2", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {(r["method"], r["layout"]): r for r in result["rows"]}
    assert set(rows) == {("did-fixed", "fixed"), ("radd", "fixed"), ("did", "varlen"), ("radd", "varlen")}
    for (method, layout), row in rows.items():
        assert row["reference"] == ("did-fixed" if layout == "fixed" else "did")
        assert row["s_per_step"]["min"] <= row["s_per_step"]["median"] <= row["s_per_step"]["max"]
        if method.startswith("did"):
            assert row["ratio_to_did"]["median"] == 1.0
            assert 0 < row["dp_fraction_of_step"]["median"] < 1
    # identical clean tokens per step for every method of a layout
    assert rows[("did-fixed", "fixed")]["clean_tokens"] == rows[("radd", "fixed")]["clean_tokens"] == 4 * 32
    assert rows[("did", "varlen")]["clean_tokens"] == rows[("radd", "varlen")]["clean_tokens"]
    # the limit: the bare network on the dense canvas and on DID's kept tokens, in every row
    for (method, layout), row in rows.items():
        did = rows[("did-fixed" if layout == "fixed" else "did", layout)]
        assert row["dense_tokens"] == 4 * row["seq_len"] and row["seed"] == 0
        assert row["kept_tokens"] == did["kept_tokens"] and 0 < row["kept_fraction"] < 1
        assert row["kept_fraction"] == pytest.approx(row["kept_tokens"] / row["clean_tokens"])
        for key in ("backbone_dense_s_per_step", "backbone_kept_s_per_step", "limit_ratio", "achieved_fraction"):
            assert row[key]["min"] <= row[key]["median"] <= row[key]["max"]
        assert row["limit_ratio"] == did["limit_ratio"]


def test_bench_train_no_limit_balanced_seed(toy_data, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["train", "--data", str(toy_data), "--sizes", "tiny", "--fixed-lengths", "16", "--no-varlen",
                       "--methods", "did-fixed", "ar", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                       "--no-limit", "--balanced-seed", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["did-fixed"]["limit_ratio"] is None and rows["ar"]["achieved_fraction"] is None
    assert rows["did-fixed"]["seed"] in range(10) and rows["did-fixed"]["backbone_dense_s_per_step"] is None


def _tiny(name, layout, toy_data, max_len=16):
    from harness.data.manifest import load_tokenizer
    from harness.core import methods

    torch.manual_seed(0)
    return methods.build(name, load_tokenizer(toy_data).vocab, "tiny", layout, max_len)


def test_limit_arithmetic_on_fake_times():
    fake = {"did": {"times": [2.0, 4.0]}, "radd": {"times": [3.0, 8.0]}, "ar": {"times": [1.0, 1.0]},
            bench.DENSE: {"times": [4.0, 6.0]}, bench.KEPT: {"times": [2.0, 2.0]}}
    assert bench.limit_ratio(fake) == {"min": 2.0, "median": 2.5, "max": 3.0}
    radd = bench.achieved_fraction(fake, "radd", "did")          # (3/2)/2 and (8/4)/3
    assert radd["min"] == pytest.approx(2 / 3) and radd["max"] == pytest.approx(0.75)
    assert radd["median"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert bench.achieved_fraction(fake, "did", "did") == {"min": 0.5, "median": 0.75, "max": 1.0}  # kept / did
    assert bench.achieved_fraction(fake, "ar", "did") is None
    assert bench.achieved_fraction(fake, "radd", "ar") is None                 # not a DID reference
    no_bare = {k: v for k, v in fake.items() if k != bench.KEPT}
    assert bench.limit_ratio(no_bare) is None and bench.achieved_fraction(no_bare, "radd", "did") is None
    # a packed-input method's own limit: its bare network on its own input over its step
    own = {**fake, "flexmdm": {"times": [4.0, 2.0]}, bench.own_entry("flexmdm"): {"times": [2.0, 1.5]}}
    assert bench.achieved_fraction(own, "flexmdm", "did") == {"min": 0.5, "median": 0.625, "max": 0.75}


def test_every_registered_method_of_a_layout_is_timed_by_default_did_first():
    varlen, fixed = timing.default_methods("varlen"), timing.default_methods("fixed")
    assert varlen[0] == "did" and fixed[0] == "did-fixed"
    assert {"flexmdm", "ilm", "mdlm", "radd", "ar"} <= set(varlen) and "did-fixed" not in varlen
    assert "flexmdm" not in fixed and "ilm" not in fixed


def test_network_input_is_what_the_did_step_feeds(toy_data):
    model = _tiny("did-fixed", "fixed", toy_data).train()
    batch = bench.fixed_batches(str(toy_data), 16, 3, model.vocab)
    torch.manual_seed(5)
    _, stats = model.loss(batch)
    tokens, lengths = bench.network_input(model, batch, 5)
    assert tokens.dim() == 1 and int(lengths.sum()) == tokens.numel() and len(lengths) == 3
    assert bench.kept_fraction(tokens, batch) == stats["kept_fraction"]
    assert not model.backbone._forward_pre_hooks                               # the hook is gone
    seed, kept_tokens, kept_lengths = bench._case_seed(model, batch, argparse.Namespace(balanced_seed=True, seed=0))
    gaps = [abs(bench.kept_fraction(bench.network_input(model, batch, s)[0], batch) - 0.5) for s in range(10)]
    assert gaps[seed] == min(gaps) and seed == gaps.index(min(gaps))
    bare = bench.BareBackbone(model.vocab.size, "tiny", 16, kept_tokens, kept_lengths)
    loss, st = bare.loss(None)
    assert loss.dim() == 0 and st == {}


class _FakeNet(torch.nn.Module):
    """forward plus a decode entry point that calls forward (counted once)."""

    def forward(self, tokens, lengths=None):
        return tokens.float()

    def decode(self, tokens, cache=None):
        return self(tokens), cache


def test_network_probe_counts_sizes_and_cleans_up():
    from harness.core.backbone import Backbone, backbone_config

    net = Backbone(backbone_config("tiny", n_layers=1, d_model=32, n_heads=2), 50)
    with timing.NetworkProbe(net, torch.device("cpu")) as probe:
        net(torch.zeros(3, 5, dtype=torch.long))                                          # dense [3, 5]
        net(torch.zeros(7, dtype=torch.long), lengths=torch.tensor([3, 4]))               # packed T = 7, 2 rows
    assert probe.calls == 2 and probe.tokens == [15, 7] and probe.rows == [3, 2]
    assert probe.tokens_per_call() == 11 and probe.row_length_per_call() == (5 + 3.5) / 2 and probe.seconds > 0
    assert not net._forward_pre_hooks and not net._forward_hooks
    fake = _FakeNet()
    with timing.NetworkProbe(fake, torch.device("cpu")) as probe:
        fake.decode(torch.zeros(2, 1))
        fake(torch.zeros(2, 4))
    assert probe.tokens == [2, 8] and probe.rows == [2, 2] and "decode" not in vars(fake)


def test_interleaved_sample_network_numbers(toy_data):
    samplers = {name: _tiny(name, "varlen", toy_data).eval() for name in ("did", "radd", "ar")}
    for name, m in samplers.items():                          # the probe's calls are the sampler's NFE
        with timing.NetworkProbe(m.backbone, m.device) as probe:
            res = m.sample(2, 3, generator=torch.Generator().manual_seed(0))
        assert probe.calls == res.nfe > 0
        if name == "did":
            assert sum(probe.rows) == res.info["sequence_evaluations"]
            assert sum(probe.tokens) >= sum(probe.rows)
        if name == "radd":
            assert set(probe.tokens) <= {16, 32} and probe.row_length_per_call() == 16      # canvas of max_len
    timings = timing.interleaved_sample(samplers, [3], n=2, warmup=0, repeats=1, seed=0)
    for name, m in samplers.items():
        e = timings[(name, 3)]
        assert e["network_calls"] == e["nfe"] and 0 <= e["outside_fraction"][0] <= 1
        assert 0 < e["network_seconds"][0] <= e["times"][0] and e["tokens_per_call"][0] >= e["row_length_per_call"][0]
        assert not m.backbone._forward_pre_hooks and not m.backbone._forward_hooks and "decode" not in vars(m.backbone)
    assert timings[("radd", 3)]["row_length_per_call"] == [16]
    for name in samplers:                     # the counted call is the timed calls' work (same seed)
        e = timings[(name, 3)]
        assert e["flops"] > 0 and e["flops_content_tokens"] == e["content_tokens"][0]
    # RADD scores the whole canvas every step: more FLOPs per call than DID's growing sequences
    assert timings[("radd", 3)]["flops"] > timings[("did", 3)]["flops"]


def test_counted_flops_are_the_matmuls_and_the_cpu_attention():
    import torch.nn.functional as F

    a, b = torch.randn(3, 5), torch.randn(5, 7)
    out, flops = timing.counted_flops(lambda: a @ b)
    assert flops == 2 * 3 * 5 * 7 and out.shape == (3, 7)
    q = torch.randn(2, 4, 16, 8)                                  # B, heads, L, head dim
    _, flops = timing.counted_flops(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert flops == 4 * 2 * 4 * 16 * 16 * 8                         # QK^T and AV, the whole matrix


# --- the study's cost job (harness/metrics/cost.py) on a micro study ------------------------------------
MICRO_RUNS = [("did", "varlen"), ("mdlm", "varlen"), ("ar", "varlen"), ("did-fixed", "fixed")]


@pytest.fixture(scope="module")
def micro_study(toy_config, toy_data, tmp_path_factory):
    """A study directory with 4 runs trained for 2 steps on the toy data (a few seconds)."""
    from harness.core.config import load_config
    from harness.run.loop import train

    root = tmp_path_factory.mktemp("cost_study") / "micro"
    cfg = json.loads(json.dumps(toy_config))
    cfg["runs"] = [{"method": m, "layout": lay} for m, lay in MICRO_RUNS]
    cfg["train"].update({"steps": 2, "valid_sequences": 4, "valid_mc": 1})
    cfg["evaluate"]["samples"]["steps"] = [2, 4]
    cfg["evaluate"]["cost"] = {"n": 2, "repeats": 3, "warmup": 1, "train_repeats": 5, "seed": 3}
    cfg = load_config(cfg)
    path = root / "config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    (root / "data").symlink_to(toy_data, target_is_directory=True)     # results/<study>/data
    for m, lay in MICRO_RUNS:
        train(cfg, m, lay, 0, str(toy_data), str(root / "runs" / f"{m}-{lay}-tiny-s0"), progress=False)
    return root, path, cfg


def test_cost_job_varlen(micro_study, toy_data):
    from harness.cli import main as cli

    root, config_path, cfg = micro_study
    out = root / "cost" / "varlen.json"
    assert cli(["cost", "--config", str(config_path), "--study-dir", str(root), "--layout", "varlen",
                "--data", str(toy_data), "--out", str(out), "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["schema"] == "didbench.result/1" and result["kind"] == "cost" and result["layout"] == "varlen"
    v = result["values"]
    assert v["layout"] == "varlen" and v["reference"] == "did" and v["methods"] == ["did", "mdlm", "ar"]
    assert result["settings"]["train_repeats"] == 5 and result["settings"]["seed"] == 3

    def ordered(d):
        return d["min"] <= d["median"] <= d["max"]

    train = {r["method"]: r for r in v["train"]["rows"]}
    assert set(train) == {"did", "mdlm", "ar"} and v["train"]["batch_size"] == cfg["train"]["batch_size"]
    for m, r in train.items():
        assert len(r["times"]) == 5 and all(t > 0 for t in r["times"])
        assert ordered(r["s_per_step"]) and ordered(r["tokens_per_s"]) and ordered(r["ratio"])
        assert r["tokens_per_s"]["median"] == pytest.approx(v["train"]["clean_tokens"] / r["s_per_step"]["median"])
        assert r["flops_per_token"] > 0 and r["peak_mem_mb"] is None            # CPU: no GPU peak
        assert r["run"] == f"{m}-varlen-tiny-s0"
    assert train["did"]["ratio"] == {"min": 1.0, "median": 1.0, "max": 1.0}    # the reference against itself
    assert 0 < train["did"]["dp_fraction"]["median"] < 1 and train["mdlm"]["dp_fraction"] is None

    sample = {(r["method"], r["steps"]): r for r in v["sample"]["rows"]}
    assert set(sample) == {(m, k) for m in ("did", "mdlm", "ar") for k in (2, 4)} and v["sample"]["n"] == 2
    for (m, k), r in sample.items():
        assert len(r["times"]) == 3 and ordered(r["s_per_sample"]) and ordered(r["gen_tokens_per_s"])
        assert r["nfe"]["min"] == r["nfe"]["max"] > 0                           # same seed: identical work
        assert r["mean_length"]["min"] == r["mean_length"]["max"]
        assert r["s_per_sample"]["median"] == pytest.approx(r["s_per_call"]["median"] / 2)
    for k in (2, 4):
        assert sample[("did", k)]["ratio"] == {"min": 1.0, "median": 1.0, "max": 1.0}
        assert sample[("did", k)]["nfe"]["median"] == k                         # DID: one call per step


def test_cost_job_fixed_and_missing_runs(micro_study, toy_data, tmp_path):
    """A layout with one trained method; a method without a checkpoint is listed, not invented."""
    from harness.metrics import cost

    root, config_path, cfg = micro_study
    cfg2 = {**cfg, "runs": cfg["runs"] + [{"method": "radd", "layout": "fixed"}]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg2))
    out = tmp_path / "fixed.json"
    args = cost.build_parser().parse_args(["--config", str(path), "--study-dir", str(root), "--layout", "fixed",
                                           "--out", str(out)])                 # data: <study-dir>/data
    v = cost.run(args)
    assert v["methods"] == ["did-fixed"] and v["missing"] == ["radd"] and v["reference"] == "did-fixed"
    assert [r["method"] for r in v["train"]["rows"]] == ["did-fixed"]
    assert v["train"]["clean_tokens"] == cfg["train"]["batch_size"] * cfg["data"]["seq_len"]


def test_bench_sample_uses_the_shared_loop(micro_study, tmp_path):
    root, _, _ = micro_study
    out = tmp_path / "sample.json"
    assert bench.main(["sample", "--study-dir", str(root), "--steps", "2", "--n", "2", "--repeats", "2",
                       "--warmup", "0", "--methods", "did", "ar", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "bench-sample"
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"did", "ar"} and rows["did"]["ratio_to_did"]["median"] == 1.0
    assert rows["did"]["s_per_sample"]["min"] <= rows["did"]["s_per_sample"]["max"]
    for r in rows.values():                                   # the NetworkProbe numbers of every row
        assert r["network_calls"] == r["nfe"] and 0 <= r["outside_fraction"]["median"] <= 1
        assert r["tokens_per_call"] >= r["row_length_per_call"] > 0
