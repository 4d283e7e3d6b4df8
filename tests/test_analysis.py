"""analysis/: tables, figures and summary from a FAKE study directory (tests/fake_study.py)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_study import RUNS, make_fake_study, run_name  # noqa: E402

import analysis  # noqa: E402
from analysis import tables as T  # noqa: E402
from analysis.__main__ import cli  # noqa: E402
from analysis.collect import load_study  # noqa: E402
from analysis.figures import bench_figure  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TABLE_NAMES = ["ppl", "genppl", "mauve", "diversity", "lengths", "cost_train", "cost_sample", "jobs", "summary"]
FIGURE_NAMES = ["genppl_steps", "entropy_steps", "mauve_steps", "lengths", "train_loss", "cost"]


def assert_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.01          # not a blank canvas


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    study_dir, config, values = make_fake_study(tmp_path_factory.mktemp("study"))
    files = analysis.main(study_dir, config)
    return study_dir, config, values, files


def test_main_writes_every_table_and_figure(full):
    study_dir, _, _, files = full
    expected = {study_dir / "tables" / f"{n}.{ext}" for n in TABLE_NAMES for ext in ("csv", "md", "tex")}
    expected |= {study_dir / "figures" / f"{n}.png" for n in FIGURE_NAMES} | {study_dir / "summary.md"}
    assert set(files) == expected
    for f in files:
        assert f.stat().st_size > 0
    for n in FIGURE_NAMES:
        assert_png(study_dir / "figures" / f"{n}.png")
    assert not list(study_dir.rglob("*.tmp"))                       # atomic writes left nothing behind


def test_ppl_table_shows_fixture_numbers(full):
    study_dir, _, values, _ = full
    md = (study_dir / "tables" / "ppl.md").read_text()
    csv = pd.read_csv(study_dir / "tables" / "ppl.csv")
    for method, layout, seed in RUNS:
        if (method, layout) == ("did", "varlen"):
            continue                                                  # two seeds: checked below
        v = values[run_name(method, layout, seed)]["ppl"]
        assert f"{T.fmt(v['nats_per_token'])} ± {T.fmt(v['stderr'])}" in md
        row = csv[(csv.method == method) & (csv.layout == layout)].iloc[0]
        assert row.nats_per_token == pytest.approx(v["nats_per_token"])
        assert row.nats_per_token_err == pytest.approx(v["stderr"]) and row.err_kind == "stderr"
        assert row.dataset == "fakecorpus"
    # two seeds of did/varlen: mean and sample sd over seeds
    seeds = [values[run_name("did", "varlen", s)]["ppl"]["nats_per_token"] for s in (0, 1)]
    row = csv[(csv.method == "did") & (csv.layout == "varlen")].iloc[0]
    assert row.n_seeds == 2 and row.err_kind == "sd over seeds"
    assert row.nats_per_token == pytest.approx(np.mean(seeds))
    assert row.nats_per_token_err == pytest.approx(np.std(seeds, ddof=1))
    tex = (study_dir / "tables" / "ppl.tex").read_text()
    assert "\\begin{tabular}" in tex and "$\\pm$" in tex and "did-fixed" in tex


def test_genppl_mauve_lengths_tables(full):
    study_dir, _, values, _ = full
    g = pd.read_csv(study_dir / "tables" / "genppl.csv")
    v = values["mdlm-varlen-tiny-s0"]["genppl"]["by_steps"][1]       # ci95 given as [lo, hi]
    row = g[(g.method == "mdlm") & (g.layout == "varlen") & (g.steps == v["steps"])].iloc[0]
    assert row.gen_ppl == pytest.approx(v["gen_ppl"])
    assert (row.ci95_lo, row.ci95_hi) == pytest.approx(tuple(v["ci95"]))
    v = values["mdlm-fixed-tiny-s0"]["genppl"]["by_steps"][0]        # ci95 given as a half-width
    row = g[(g.method == "mdlm") & (g.layout == "fixed") & (g.steps == v["steps"])].iloc[0]
    assert (row.ci95_lo, row.ci95_hi) == pytest.approx((v["gen_ppl"] - v["ci95"], v["gen_ppl"] + v["ci95"]))
    data = g[g.method == "data"]
    assert sorted(data.layout) == ["fixed", "varlen"] and (data.gen_ppl == 42.0).all()
    assert "| data | varlen |" in (study_dir / "tables" / "genppl.md").read_text()

    mauve_md = (study_dir / "tables" / "mauve.md").read_text()
    assert T.fmt(values["mdlm-varlen-tiny-s0"]["mauve"]["by_steps"][1]["mauve"]) in mauve_md
    ar_fixed = [line for line in mauve_md.splitlines() if line.startswith("| ar | fixed |")]
    assert ar_fixed == []            # ar-fixed has no mauve.json: no row invented for it

    lengths = pd.read_csv(study_dir / "tables" / "lengths.csv")
    assert set(lengths.layout) == {"varlen"}                          # fixed runs have no lengths
    w1 = values["ilm-varlen-tiny-s0"]["lengths"]["by_steps"][0]["w1"]
    assert lengths[(lengths.method == "ilm")].w1.iloc[0] == pytest.approx(w1)


def test_cost_ratios_to_did(full):
    study_dir, _, values, _ = full
    c = pd.read_csv(study_dir / "tables" / "cost_train.csv")
    did = np.mean([values[run_name("did", "varlen", s)]["speed"]["train"]["tokens_per_s"] for s in (0, 1)])
    mdlm = values["mdlm-varlen-tiny-s0"]["speed"]["train"]["tokens_per_s"]
    row = c[(c.method == "mdlm") & (c.layout == "varlen")].iloc[0]
    assert row.tokens_per_s_ratio == pytest.approx(mdlm / did) and row.reference == "did"
    ref_f = values["did-fixed-fixed-tiny-s0"]["speed"]["train"]["s_per_step"]
    row = c[(c.method == "ar") & (c.layout == "fixed")].iloc[0]
    assert row.s_per_step_ratio == pytest.approx(values["ar-fixed-tiny-s0"]["speed"]["train"]["s_per_step"] / ref_f)
    assert row.reference == "did-fixed"
    ilm = c[c.method == "ilm"].iloc[0]                                # no speed.json: ratio missing, not made up
    assert math.isnan(ilm.tokens_per_s) and math.isnan(ilm.tokens_per_s_ratio)
    assert "| ilm | varlen | tiny |" in (study_dir / "tables" / "cost_train.md").read_text()

    s = pd.read_csv(study_dir / "tables" / "cost_sample.csv")
    row = s[(s.method == "ar") & (s.layout == "varlen") & (s.steps == 64)].iloc[0]
    did64 = np.mean([values[run_name("did", "varlen", k)]["speed"]["sample"][1]["s_per_sample"] for k in (0, 1)])
    ar64 = values["ar-varlen-tiny-s0"]["speed"]["sample"][1]["s_per_sample"]
    assert row.s_per_sample_ratio == pytest.approx(ar64 / did64)
    ilm = s[s.method == "ilm"]
    assert (ilm.nfe == [16, 64]).all() and ilm.s_per_sample.isna().all()   # NFE from samples.json


def test_summary_headline(full):
    study_dir, _, values, _ = full
    text = (study_dir / "summary.md").read_text()
    assert "Gen PPL @64" in text and "Train tokens/s vs DID" in text
    assert T.fmt(values["mdlm-fixed-tiny-s0"]["genppl"]["by_steps"][1]["gen_ppl"]) in text
    assert "`ar-fixed-tiny-s0`: mauve" in text and "`ilm-varlen-tiny-s0`: speed" in text
    assert "did-fixed for fixed, did for varlen" in text


def test_missing_and_broken_files_are_tolerated(tmp_path):
    runs = [("did", "varlen", 0), ("mdlm", "fixed", 0)]
    everything = {"ppl", "genppl", "mauve", "diversity", "lengths", "speed", "samples"}
    study_dir, config, _ = make_fake_study(tmp_path, runs=runs, missing={"mdlm-fixed-tiny-s0": everything})
    (study_dir / "runs" / "did-varlen-tiny-s0" / "eval" / "mauve.json").write_text("{not json")
    (study_dir / "runs" / "did-varlen-tiny-s0" / "history.csv").unlink()
    files = analysis.main(study_dir, config)
    study = load_study(study_dir, config)
    assert any("mauve.json" in p for p in study.problems)
    assert "Unreadable files" in (study_dir / "summary.md").read_text()
    ppl = (study_dir / "tables" / "ppl.md").read_text()
    assert "| did | varlen |" in ppl and "mdlm" not in ppl
    summary = (study_dir / "tables" / "summary.md").read_text()
    assert "| mdlm | fixed | tiny | – | – |" in summary                 # a row of dashes, no numbers
    for f in files:
        if f.suffix == ".png":
            assert_png(f)
    # a study with no runs at all still writes the whole (empty) set
    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    files = analysis.main(empty, {"study": "empty"})
    assert len(files) == len(TABLE_NAMES) * 3 + len(FIGURE_NAMES) + 1
    assert "No results" in (empty / "tables" / "ppl.md").read_text()


def test_bench_figure_and_cli(tmp_path, capsys):
    rows = [{"method": m, "layout": "fixed", "size": "tiny", "seq_len": 128,
             "s_per_step": {"min": 0.1 * k, "median": 0.11 * k, "max": 0.13 * k},
             "tokens_per_s": {"min": 1, "median": 2, "max": 3},
             "ratio_to_did": {"min": 0.9 * k, "median": k, "max": 1.1 * k}, "peak_mem_mb": 100}
            for k, m in ((1, "did-fixed"), (2, "mdlm"))]
    (tmp_path / "bench.json").write_text(json.dumps({"rows": rows}))
    assert_png(bench_figure(tmp_path / "bench.json", tmp_path / "bench.png"))
    (tmp_path / "bad.json").write_text("[]")
    assert_png(bench_figure(tmp_path / "bad.json", tmp_path / "bad.png"))    # placeholder, no crash
    # the hand-run entry point picks up results/<study>/bench/*.json too
    study_dir, _, _ = make_fake_study(tmp_path, runs=[("did", "varlen", 0)], missing={})
    (study_dir / "bench").mkdir()
    (study_dir / "bench" / "train.json").write_text(json.dumps({"rows": rows}))
    assert cli([str(study_dir)]) == 0
    assert "bench-train.png" in capsys.readouterr().out
    assert_png(study_dir / "figures" / "bench-train.png")


def test_formatting_helpers():
    assert T.fmt(float("nan")) == T.DASH and T.fmt(None) == T.DASH
    assert T.fmt(3.14159) == "3.142" and T.fmt(123456.0) == "123456" and T.fmt(16.0, "int") == "16"
    assert T.fmt(15.5, "int") == "15.50"                  # a seed mean of counts is not rounded away
    assert T.pm(1.0, float("nan")) == "1.000" and T.pm(float("nan"), 1.0) == T.DASH
    assert T.tex_escape("a_b & 5% ± –") == r"a\_b \& 5\% $\pm$ --"
    agg = T.aggregate(pd.DataFrame({"method": ["a", "a", "b"], "seed": [0, 1, 0], "x": [1.0, 3.0, 5.0]}),
                      ["method"], ["x"])
    assert list(agg.x) == [2.0, 5.0] and list(agg.n_seeds) == [2, 1]
    assert agg.x_sd.iloc[0] == pytest.approx(math.sqrt(2)) and math.isnan(agg.x_sd.iloc[1])
