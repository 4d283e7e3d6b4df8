"""The cost benchmark and the study's cost job run methods interleaved on identical work and
report ratios to DID (the micro study below trains 4 runs for 2 steps: a few seconds)."""
import json

import pytest
import yaml

from harness import bench


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


# --- the study's cost job (harness/cost.py) on a micro study ------------------------------------
MICRO_RUNS = [("did", "varlen"), ("mdlm", "varlen"), ("ar", "varlen"), ("did-fixed", "fixed")]


@pytest.fixture(scope="module")
def micro_study(toy_config, toy_data, tmp_path_factory):
    """A study directory with 4 runs trained for 2 steps on the toy data (a few seconds)."""
    from harness.config import load_config
    from harness.train import train

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
    from harness import cost

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
