"""The cost benchmark runs methods interleaved on identical data and reports ratios to DID."""
import json

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
