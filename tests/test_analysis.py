"""analysis/: tables, figures and summary from a FAKE study directory (tests/fake_study.py)."""
from __future__ import annotations

import base64
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_study import NO_VALIDATION, RUNS, fake_valid, make_fake_study, run_name, write_fake_cost  # noqa: E402

import analysis  # noqa: E402
from analysis import cost_tables, frames, tables as T  # noqa: E402
from analysis.__main__ import cli  # noqa: E402
from harness.results.study import load_study  # noqa: E402
from analysis.cost_figures import bench_figure, bench_plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TABLE_NAMES = ["ppl", "genppl", "mauve", "diversity", "lengths", "cost_train", "cost_sample", "jobs", "bound_gap",
               "training", "exact_samples", "summary"]
FIGURE_NAMES = ["genppl_steps", "entropy_steps", "mauve_steps", "lengths", "train_loss", "validation", "cost",
                "bound_gap_curves", "exact_steps", "length_cdf"]


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
    # the report's HTML pages: only the tables with rows (a real-text study has no synthetic tables)
    expected |= {study_dir / "tables" / f"{n}.html" for n in TABLE_NAMES if n not in ("bound_gap", "exact_samples")}
    assert set(files) == expected
    assert not (study_dir / "tables" / "bound_gap.html").exists()
    for f in files:
        assert f.stat().st_size > 0
    page = (study_dir / "tables" / "summary.html").read_text()
    assert "<table" in page and ("Significant at 95%" in page or "**" not in page and "Significance" in page)
    assert 'download="summary.csv" href="data:text/csv;base64,' in page
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
        assert f"{frames.fmt(v['nats_per_token'])} ± {frames.fmt(v['stderr'])}" in md
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
    assert frames.fmt(values["mdlm-varlen-tiny-s0"]["mauve"]["by_steps"][1]["mauve"]) in mauve_md
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
    assert frames.fmt(values["mdlm-fixed-tiny-s0"]["genppl"]["by_steps"][1]["gen_ppl"]) in text
    assert "`ar-fixed-tiny-s0`: mauve" in text
    assert "`ilm-varlen-tiny-s0`: speed" not in text          # speed is opt-in now (the cost job replaces it)
    assert "did-fixed for fixed, did for varlen" in text


def test_strict_and_paper_bounds_and_paired_differences(full):
    study_dir, config, values, _ = full
    study = load_study(study_dir, config)
    t = T.ppl_table(study, config).data.set_index(["method", "layout"])
    for method, layout, i in (("mdlm", "varlen", 4), ("ilm", "varlen", 5), ("ar", "varlen", 7)):
        row = t.loc[(method, layout)]
        v = values[run_name(method, layout, 0)]["ppl"]
        assert row.paper_nats_per_token == pytest.approx(v["paper_convention"]["nats_per_token"])
        # paired over the 64 common sequences against did seed 0 (index 0): 0.25 i nats/token, and
        # the shared per-sequence difficulty cancels, so the interval is tight and excludes 0
        assert row.diff_vs_ref == pytest.approx(0.25 * i, abs=1e-3)
        assert row.diff_lo < 0.25 * i < row.diff_hi and row.diff_hi - row.diff_lo < 0.01
        assert bool(row.diff_significant) and row.reference == "did"
    assert np.isnan(t.loc[("did", "varlen")].diff_vs_ref)            # the reference itself
    md = (study_dir / "tables" / "ppl.md").read_text()
    assert "Paper convention" in md and "+1.000 [" in md and T.MARK_NOTE in md


def test_summary_marks_significant_sample_differences(full):
    study_dir, config, values, _ = full
    study = load_study(study_dir, config)
    summary = T.summary_table(study, config)
    rows = summary.data.set_index(["method", "layout"])
    mdlm = rows.loc[("mdlm", "varlen")]
    # gen PPL 140 vs 100 with 5% per-sample noise: significant; entropy +0.04 with +-0.5 noise: not
    assert mdlm.gen_ppl_significant is True and mdlm.entropy_significant is False
    assert bool(mdlm.diff_significant)
    disp = summary.display.set_index(["Method", "Layout"])
    assert disp.loc[("mdlm", "varlen"), "Gen PPL @64 [95%]"].endswith(f" {T.MARK}")
    assert not disp.loc[("mdlm", "varlen"), "Entropy @64 [95%]"].endswith(f" {T.MARK}")
    assert not disp.loc[("did", "varlen"), "Gen PPL @64 [95%]"].endswith(f" {T.MARK}")   # the reference
    assert T.MARK_NOTE in summary.notes


def test_mauve_below_min_samples_reads_n_too_small(tmp_path):
    runs = [("did", "varlen", 0), ("mdlm", "varlen", 0)]
    study_dir, config, _ = make_fake_study(tmp_path, runs=runs, missing={})
    path = study_dir / "runs" / "mdlm-varlen-tiny-s0" / "eval" / "mauve.json"
    obj = json.loads(path.read_text())
    obj["values"]["by_steps"] = [{"steps": s, "mauve": None, "mauve_sd": None, "n_p": 32, "n_q": 16,
                                  "reason": "n too small (n_p=32, n_q=16, need >= 256 each)"} for s in (16, 64)]
    path.write_text(json.dumps(obj))
    study = load_study(study_dir, config)
    disp = T.mauve_table(study, config).display.set_index("Method")
    assert disp.loc["mdlm", "MAUVE (64 steps)"] == "n too small" and disp.loc["mdlm", "n (human / samples)"] == "32 / 16"
    assert disp.loc["did", "MAUVE (64 steps)"] != "n too small"
    summary = T.summary_table(study, config).display.set_index("Method")
    assert summary.loc["mdlm", "MAUVE @64"] == "n too small"


def test_missing_and_broken_files_are_tolerated(tmp_path):
    runs = [("did", "varlen", 0), ("mdlm", "fixed", 0)]
    everything = {"ppl", "genppl", "mauve", "diversity", "lengths", "speed", "samples"}
    study_dir, config, _ = make_fake_study(tmp_path, runs=runs, missing={"mdlm-fixed-tiny-s0": everything})
    (study_dir / "runs" / "did-varlen-tiny-s0" / "eval" / "mauve.json").write_text("{not json")
    (study_dir / "runs" / "did-varlen-tiny-s0" / "history.csv").unlink()
    files = analysis.main(study_dir, config)
    study = load_study(study_dir, config)
    assert any("mauve.json" in p for p in study.problems)
    assert "Files left out, unreadable or non-finite" in (study_dir / "summary.md").read_text()
    ppl = (study_dir / "tables" / "ppl.md").read_text()
    assert "| did | varlen |" in ppl and "mdlm" not in ppl
    summary = (study_dir / "tables" / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| mdlm | fixed | tiny |"))
    assert row.split("|")[7:-1] == [" – "] * 8                         # training facts, then dashes: no numbers
    for f in files:
        if f.suffix == ".png":
            assert_png(f)
    # a study with no runs at all still writes the whole (empty) set
    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    files = analysis.main(empty, {"study": "empty"})
    assert len(files) == len(TABLE_NAMES) * 3 + len(FIGURE_NAMES) + 1
    assert "No results" in (empty / "tables" / "ppl.md").read_text()


def test_trained_but_unevaluated_study_heads_its_summary_with_the_training_table(tmp_path):
    """A recipe study trains and never evaluates: its summary shows how the runs trained, not an empty table."""
    runs = [("did", "varlen", 0), ("mdlm", "varlen", 0)]
    everything = {"ppl", "genppl", "mauve", "diversity", "lengths", "speed", "samples"}
    study_dir, config, _ = make_fake_study(tmp_path, runs=runs, missing={run_name(*r): everything for r in runs})
    study = load_study(study_dir, config)
    table = analysis.headline(study, config)
    assert "How each row was trained" in table.title and set(table.data["method"]) == {"did", "mdlm"}
    assert "No significance test" in analysis.significance_line(table)


def test_validation_figure_three_panels_one_line_per_run(full, tmp_path, monkeypatch):
    """Strict bound vs step, wall-clock and training FLOPs (log x) for the runs whose history has the
    validation columns; a study whose histories have none gets a placeholder saying why."""
    from analysis import figures as F
    from analysis import plotting

    study_dir, config, _, _ = full
    drawn = []
    real_save = plotting.save_figure
    for module in (F, plotting):   # figures draw through figures.save_figure, placeholders through plotting's
        monkeypatch.setattr(module, "save_figure", lambda fig, path: (drawn.append(fig), real_save(fig, path))[1])
    assert_png(F.validation_figure(load_study(study_dir, config), config, tmp_path / "validation.png"))
    axes = drawn[-1].axes
    assert [ax.get_xscale() for ax in axes] == ["linear", "linear", "log"]
    assert "strict" in drawn[-1]._suptitle.get_text()
    with_valid = [(i, run_name(m, lay, s)) for i, (m, lay, s) in enumerate(RUNS) if run_name(m, lay, s) not in NO_VALIDATION]
    for ax, xs in zip(axes, (lambda i: [5, 10], lambda i: [0.5 * s + 0.1 * i for s in (5, 10)],
                             lambda i: [1.0e9 * (i + 1) * s for s in (5, 10)])):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert set(lines) == {name for _, name in with_valid}
        for i, name in with_valid:
            assert list(lines[name].get_xdata()) == pytest.approx(xs(i))
            assert list(lines[name].get_ydata()) == pytest.approx([fake_valid(i, s) for s in (5, 10)])
        assert len(ax.collections) == len(with_valid)                  # one ± stderr band per line
    # histories without the columns: the placeholder
    old_dir, old_cfg, _ = make_fake_study(tmp_path / "old", runs=[("ilm", "varlen", 0)], missing={})
    drawn.clear()
    F.validation_figure(load_study(old_dir, old_cfg), old_cfg, tmp_path / "old.png")
    assert "no validation points" in " ".join(t.get_text() for t in drawn[-1].axes[0].texts)


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
    assert frames.fmt(float("nan")) == frames.DASH and frames.fmt(None) == frames.DASH
    assert frames.fmt(3.14159) == "3.142" and frames.fmt(123456.0) == "123456" and frames.fmt(16.0, "int") == "16"
    assert frames.fmt(15.5, "int") == "15.50"                  # a seed mean of counts is not rounded away
    assert frames.pm(1.0, float("nan")) == "1.000" and frames.pm(float("nan"), 1.0) == frames.DASH
    assert frames.tex_escape("a_b & 5% ± –") == r"a\_b \& 5\% $\pm$ --"
    agg = frames.aggregate(pd.DataFrame({"method": ["a", "a", "b"], "seed": [0, 1, 0], "x": [1.0, 3.0, 5.0]}),
                      ["method"], ["x"])
    assert list(agg.x) == [2.0, 5.0] and list(agg.n_seeds) == [2, 1]
    assert agg.x_sd.iloc[0] == pytest.approx(math.sqrt(2)) and math.isnan(agg.x_sd.iloc[1])


# --- the study's interleaved cost job (cost/<layout>.json) -------------------------------------
@pytest.fixture(scope="module")
def with_cost(tmp_path_factory):
    study_dir, config, values = make_fake_study(tmp_path_factory.mktemp("costed"))
    cost = write_fake_cost(study_dir)
    files = analysis.main(study_dir, config)
    return study_dir, config, values, cost, files


def test_cost_frames(with_cost):
    from harness.results.rows import COST_SAMPLE_COLS, COST_TRAIN_COLS, ID

    study_dir, config, _, cost, _ = with_cost
    study = load_study(study_dir, config)
    t, s = study.cost_train, study.cost_sample
    assert list(t.columns) == ID + COST_TRAIN_COLS and list(s.columns) == ID + COST_SAMPLE_COLS
    for col in ("method", "layout", "size", "s_per_step_min", "s_per_step_median", "s_per_step_max",
                "tokens_per_s_min", "tokens_per_s_median", "tokens_per_s_max", "ratio_min", "ratio_median",
                "ratio_max", "reference", "dp_fraction_median", "flops_per_token", "peak_mem_mb"):
        assert col in t.columns, col
    for col in ("steps", "n", "s_per_sample_min", "s_per_sample_median", "s_per_sample_max",
                "gen_tokens_per_s_median", "nfe", "mean_length", "ratio_min", "ratio_median", "ratio_max"):
        assert col in s.columns, col
    assert len(t) == 4 + 3 and len(s) == 2 * len(t)                   # varlen: did mdlm ilm ar; fixed: 3
    for layout, v in cost.items():
        for j, row in enumerate(v["train"]["rows"]):
            got = t[(t.layout == layout) & (t.method == row["method"])].iloc[0]
            assert got.s_per_step_median == pytest.approx(row["s_per_step"]["median"])
            assert got.ratio_median == pytest.approx(j + 1) and got.reference == v["reference"]
            assert got.run == row["run"] and got.seed == 0
        ref = s[(s.layout == layout) & (s.method == v["reference"])]
        assert (ref.ratio_min == 1).all() and (ref.ratio_max == 1).all()
    assert (s.s_per_sample_min <= s.s_per_sample_median).all() and (s.s_per_sample_median <= s.s_per_sample_max).all()
    assert (s.nfe == s.steps).all()
    did = t[t.method == "did"].iloc[0]
    assert did.dp_fraction_median == pytest.approx(0.01) and math.isnan(t[t.method == "ar"].iloc[0].dp_fraction_median)


def test_cost_tables_use_the_interleaved_job(with_cost):
    study_dir, _, values, cost, _ = with_cost
    c = pd.read_csv(study_dir / "tables" / "cost_train.csv")
    assert set(c.source.dropna()) == {cost_tables.COST_SOURCE}
    mdlm = c[(c.method == "mdlm") & (c.layout == "varlen")].iloc[0]
    j = cost["varlen"]["methods"].index("mdlm")
    assert mdlm.s_per_step_ratio == pytest.approx(j + 1) and mdlm.tokens_per_s_ratio == pytest.approx(1 / (j + 1))
    row = cost["varlen"]["train"]["rows"][j]
    assert (mdlm.s_per_step_min, mdlm.s_per_step, mdlm.s_per_step_max) == pytest.approx(
        (row["s_per_step"]["min"], row["s_per_step"]["median"], row["s_per_step"]["max"]))
    assert mdlm.reference == "did" and mdlm.loop_tokens_per_s == pytest.approx(900.0 * 5)   # train.json, run 4
    md = (study_dir / "tables" / "cost_train.md").read_text()
    assert "interleaved cost job" in md and "shared-machine" not in md.split("\n")[0]
    assert cost_tables.range_text(row["s_per_step"]["median"], row["s_per_step"]["min"], row["s_per_step"]["max"]) in md
    assert f"{j + 1:.2f}× [{j + 1:.2f}–{j + 1:.2f}]" in md

    s = pd.read_csv(study_dir / "tables" / "cost_sample.csv")
    ar = s[(s.method == "ar") & (s.layout == "fixed") & (s.steps == 64)].iloc[0]
    j = cost["fixed"]["methods"].index("ar")
    assert ar.s_per_sample_ratio == pytest.approx(j + 1) and ar.source == cost_tables.COST_SOURCE
    assert ar.gen_tokens_per_s == pytest.approx(cost["fixed"]["sample"]["rows"][2 * j + 1]["gen_tokens_per_s"]["median"])
    assert ar.nfe == 64 and ar.mean_length == pytest.approx(20.0 + j) and ar.n == 4
    jobs = (study_dir / "tables" / "jobs.md").read_text()
    assert "| (study) fixed | cost | 12.50 |" in jobs


def test_cost_tables_fall_back_per_layout(tmp_path):
    """A layout without a cost file keeps the speed.json numbers, labelled as such (the cost table
    alone, built as analysis.main builds it)."""
    study_dir, config, values = make_fake_study(tmp_path)
    write_fake_cost(study_dir, runs=[r for r in RUNS if r[1] == "varlen"])
    table = cost_tables.cost_train_table(load_study(study_dir, config), config)
    c = table.data
    assert set(c[c.layout == "varlen"].source) == {cost_tables.COST_SOURCE}
    assert set(c[c.layout == "fixed"].source) == {cost_tables.SPEED_SOURCE}
    ar = c[(c.method == "ar") & (c.layout == "fixed")].iloc[0]
    ref = values["did-fixed-fixed-tiny-s0"]["speed"]["train"]["s_per_step"]
    assert ar.s_per_step_ratio == pytest.approx(values["ar-fixed-tiny-s0"]["speed"]["train"]["s_per_step"] / ref)
    md = frames.to_markdown(table)
    assert "per-run (shared machine)" in md and "interleaved" in md
    # and with no cost file at all the title says where the numbers come from
    plain, cfg, _ = make_fake_study(tmp_path / "x")
    assert "(shared-machine per-run measurement)" in frames.to_markdown(cost_tables.cost_train_table(load_study(plain, cfg), cfg))


def test_cost_figure_reads_the_cost_frames(with_cost):
    from analysis.cost_figures import cost_frames

    study_dir, config, _, cost, _ = with_cost
    assert_png(study_dir / "figures" / "cost.png")
    tr, sp, sources = cost_frames(load_study(study_dir, config), config)
    assert sources == {cost_tables.COST_SOURCE} and len(tr) == 7 and len(sp) == 14
    row = tr[(tr.method == "mdlm") & (tr.layout == "fixed")].iloc[0]
    r = cost["fixed"]["train"]["rows"][cost["fixed"]["methods"].index("mdlm")]["tokens_per_s"]
    assert (row.tokens_per_s_lo, row.tokens_per_s, row.tokens_per_s_hi) == pytest.approx((r["min"], r["median"], r["max"]))


def test_bench_figure_reads_both_kinds(tmp_path):
    """bench-sample rows have s_per_sample / steps (not s_per_step / seq_len): both kinds plot."""
    sample = {"kind": "bench-sample", "device": "cpu", "repeats": 2, "rows": [
        {"run": f"{m}-{lay}-tiny-s0", "method": m, "layout": lay, "steps": k, "n": 8,
         "s_per_sample": {"min": 0.01 * k * q, "median": 0.011 * k * q, "max": 0.012 * k * q},
         "nfe": k, "ratio_to_did": {"min": q * 0.9, "median": q, "max": q * 1.1}}
        for k in (16, 64) for m, lay, q in (("did", "varlen", 1.0), ("mdlm", "varlen", 2.5), ("did-fixed", "fixed", 1.0))]}
    fig = bench_plot(sample, "sample")
    left, right = fig.axes[0], fig.axes[1]
    assert "per sample" in left.get_xlabel() and "s/sample" in right.get_xlabel()
    ticks = [t.get_text() for t in left.get_yticklabels()]
    assert ticks == ["fixed · 16 steps", "fixed · 64 steps", "varlen · 16 steps", "varlen · 64 steps"]
    widths = sorted(round(p.get_width(), 6) for p in left.patches if p.get_width() > 0)
    assert widths == sorted(round(r["s_per_sample"]["median"], 6) for r in sample["rows"])   # no empty panel
    texts = {t.get_text() for t in right.texts}
    assert {"1.00×", "2.50×"} <= texts
    train = {"kind": "bench-train", "device": "cpu", "repeats": 3, "rows": [
        {"method": m, "layout": "fixed", "size": "tiny", "seq_len": L, "batch_size": 4,
         "s_per_step": {"min": 0.1, "median": 0.2 * (i + 1), "max": 0.7}, "ratio_to_did": {"min": 1, "median": i + 1, "max": 2}}
        for L in (128, 1024) for i, m in enumerate(("did-fixed", "mdlm", "radd"))]}
    fig = bench_plot(train, "train")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["tiny · fixed · L=128 · B=4", "tiny · fixed · L=1024 · B=4"]
    assert "training step" in fig.axes[0].get_xlabel()
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"did-fixed", "mdlm", "radd"}   # one legend
    (tmp_path / "s.json").write_text(json.dumps(sample))
    assert_png(bench_figure(tmp_path / "s.json", tmp_path / "s.png"))


def test_figures_use_one_palette_and_leave_rcparams_alone():
    import matplotlib

    from analysis.plotting import method_colors

    before = dict(matplotlib.rcParams)
    a, b = method_colors(["did", "ar", "mdlm"]), method_colors(["ar", "zeta", "did-fixed"])
    assert a["ar"] == b["ar"] and len({a["did"], b["did-fixed"], a["mdlm"], a["ar"], b["zeta"]}) == 5
    bench_plot({"kind": "bench-train", "rows": [{"method": "did", "layout": "varlen", "size": "tiny", "seq_len": 8,
                                                 "s_per_step": {"min": 1, "median": 1, "max": 1}}]}, "t")
    assert dict(matplotlib.rcParams) == before


def test_missing_evaluations_follow_the_schemas_metrics_for_the_corpus(tmp_path):
    """A synthetic study's config leaves evaluate.metrics to the schema (exact metrics, no evaluator
    LM): its summary must not list genppl/mauve as missing, but must list a missing exact.json."""
    import yaml

    runs = [("did", "varlen", 0)]
    study_dir, _, _ = make_fake_study(tmp_path, runs=runs, missing={run_name(*runs[0]): {"genppl", "mauve"}})
    config = yaml.safe_load((Path(__file__).parents[1] / "config" / "synthetic.yaml").read_text())
    config["runs"] = [{"method": "did", "layout": "varlen"}]
    gaps = analysis._missing_evaluations(load_study(study_dir, config), config)
    assert gaps == {run_name(*runs[0]): ["exact"]}


def test_html_table_escapes_cells_and_renders_the_notes_markdown():
    from analysis.frames import Table, to_html

    t = Table("x", "A <title>", pd.DataFrame({"v": [1.5]}), pd.DataFrame({"Method": ["<b>ar</b>"], "PPL": ["2 ± 1"]}),
              ["**Bold** then *italic*; 2 * 3 = 6."])
    page = to_html(t)
    assert "&lt;b&gt;ar&lt;/b&gt;" in page and "<b>ar</b>" not in page and "A &lt;title&gt;" in page
    assert "<strong>Bold</strong> then <em>italic</em>; 2 * 3 = 6." in page
    csv = base64.b64decode(page.split("base64,")[1].split('"')[0]).decode()
    assert csv == "v\n1.5\n"                                         # the numbers, at full precision
