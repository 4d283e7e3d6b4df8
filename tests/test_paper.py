"""analysis/paper.py: the paper's tables and figure from a FAKE study (tests/fake_study.py).

Every expected number is recomputed here from the fake files, by hand (no call into the code under
test for an expected value).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))
from fake_study import RUNS, make_fake_study, run_name, write_fake_cost  # noqa: E402

from analysis import paper as P  # noqa: E402
from analysis.__main__ import cli  # noqa: E402
from analysis.frames import fmt  # noqa: E402
from harness.core.errors import UserError  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: the fake study plus a second seed of did-fixed (seed pooling in Table 1)
PAPER_RUNS = RUNS + [("did-fixed", "fixed", 1)]
FILES = ["table1.md", "table1.csv", "genppl_steps.md", "genppl_steps.csv", "length_cdf.png", "length_cdf.csv",
         "speed.md", "speed.csv", "README.md"]
Z = 1.959963984540054


def index_of(method, layout, seed):
    return PAPER_RUNS.index((method, layout, seed))


def cell(v, lo, hi):
    return f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"


def md_row(md: str, *starts: str) -> list[str]:
    """The cells of the first Markdown table row whose leading cells are `starts`."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:len(starts)] == list(starts):
            return cells
    raise AssertionError(f"no row {starts} in:\n{md}")


def section(md: str, heading: str) -> str:
    """The text of the `## heading...` section."""
    parts = md.split("\n## ")
    hit = [p for p in parts if p.startswith(heading)]
    assert hit, f"no section {heading!r}"
    return hit[0]


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _result(kind: str, values: dict, settings: dict | None = None) -> dict:
    return {"schema": "didbench.result/1", "kind": kind, "settings": settings or {}, "values": values}


#: zero-shot values of fixed run index i (nats per predicted token) per dataset; did-fixed seed 1 lacks ptb
def zs_nats(i: int, ds: str) -> float:
    return {"wikitext103": 3.5, "ptb": 4.25, "lambada": 3.75}[ds] + 0.125 * i


def zs_values(i: int, datasets) -> dict:
    out = {}
    for ds in datasets:
        n = zs_nats(i, ds)
        out[ds] = {"nats_per_token": n, "ppl": math.exp(n), "stderr": 0.02, "n_sequences": 10, "n_tokens": 1270,
                   "paper_convention": {"nats_per_token": n - 0.25, "ppl": math.exp(n - 0.25), "stderr": 0.01,
                                        "divided_by_seq_len": {"nats_per_token": (n - 0.25) * 127 / 128,
                                                               "ppl": math.exp((n - 0.25) * 127 / 128)}},
                   "source": f"fake-{ds}", "documents": 7, "detokenizer": "none"}
    return {"datasets": out, "missing": {"pubmed": "no local file (fake)"}}


def add_lengths(study_dir: Path) -> dict:
    """Lengths of the varlen runs: lengths.json lists for most, samples/references.jsonl for ilm."""
    lengths = {}
    for i, (m, lay, seed) in enumerate(PAPER_RUNS):
        if lay != "varlen":
            continue
        name = run_name(m, lay, seed)
        ev = study_dir / "runs" / name / "eval"
        gen = {s: [(3 * k + i + s) % 40 + 1 for k in range(12)] for s in (16, 64)}
        ref = [(7 * k) % 50 + 2 for k in range(20)]
        lengths[name] = (gen, ref)
        if m == "ilm":
            (ev / "lengths.json").unlink(missing_ok=True)
            (ev / "samples.jsonl").write_text("".join(json.dumps({"steps": s, "index": k, "length": x}) + "\n"
                                                      for s in (16, 64) for k, x in enumerate(gen[s])))
            (ev / "references.jsonl").write_text("".join(json.dumps({"length": x}) + "\n" for x in ref))
        else:
            obj = json.loads((ev / "lengths.json").read_text())
            for e in obj["values"]["by_steps"]:
                e["lengths"] = gen[e["steps"]]
            obj["values"]["data"]["lengths"] = ref
            obj["settings"] = {"length": "fake content tokens"}
            _write(ev / "lengths.json", obj)
    return lengths


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The fake study with cost files, stored lengths and a per-sample CI in one genppl.json."""
    study_dir, config, values = make_fake_study(tmp_path_factory.mktemp("paper"), runs=PAPER_RUNS)
    write_fake_cost(study_dir, PAPER_RUNS)
    lengths = add_lengths(study_dir)
    g = study_dir / "runs" / run_name("mdlm", "varlen", 0) / "eval" / "genppl.json"
    obj = json.loads(g.read_text())
    for e in obj["values"]["by_steps"]:
        e["gen_ppl_mean_per_sample_ci95"] = [e["gen_ppl_mean_per_sample"] - 3, e["gen_ppl_mean_per_sample"] + 4]
    obj["settings"] = {"evaluator": {"name": "fake-evaluator", "source": "fake.gguf"}, "max_tokens": 99}
    _write(g, obj)
    files = P.main(study_dir, config)
    return study_dir, config, values, lengths, files


def test_writes_every_file_deterministically(study):
    study_dir, config, _, _, files = study
    out = study_dir / "paper"
    assert sorted(f.name for f in files) == sorted(FILES)
    before = {n: (out / n).read_bytes() for n in FILES}
    P.main(study_dir, config)
    assert {n: (out / n).read_bytes() for n in FILES} == before          # no timestamps, same bytes
    readme = (out / "README.md").read_text()
    for n in ("table1.md", "genppl_steps.md", "speed.md", "length_cdf.png", "table1.csv"):
        assert f"({n})" in readme
    assert "in-domain only" in readme
    assert not list(out.glob(".*"))                                       # atomic writes left nothing


def test_table1_in_domain_fallback(study):
    study_dir, _, values, _, _ = study
    md = (study_dir / "paper" / "table1.md").read_text()
    assert "No run has eval/zeroshot.json" in md and "fakecorpus test (in-domain)" in md
    strict = section(md, "Measured: strict")
    assert "in-domain, NOT zero-shot" in strict
    # rows: the fixed-length runs only
    assert "| this study | did-fixed |" in strict and "| this study | mdlm |" in strict
    assert "| this study | ilm |" not in md and "| this study | did |" not in md
    # one seed (mdlm fixed): exp(nats ± 1.96 stderr)
    v = values[run_name("mdlm", "fixed", 0)]["ppl"]
    n, se = v["nats_per_token"], v["stderr"]
    assert md_row(strict, "this study", "mdlm", "tiny")[3:] == ["1", cell(math.exp(n), math.exp(n - Z * se),
                                                                          math.exp(n + Z * se))]
    # two seeds (did-fixed): exp(mean) with a t interval over seeds
    x = np.array([values[run_name("did-fixed", "fixed", s)]["ppl"]["nats_per_token"] for s in (0, 1)])
    half = stats.t.ppf(0.975, 1) * x.std(ddof=1) / math.sqrt(2)
    assert md_row(strict, "this study", "did-fixed", "tiny")[3:] == [
        "2", cell(math.exp(x.mean()), math.exp(x.mean() - half), math.exp(x.mean() + half))]
    # paper convention, divided by the row length (config seq_len 128; fake rows: 64 sequences, 4096 tokens)
    paper = section(md, "Paper convention")
    pc = v["paper_convention"]
    scale = 4096 / (64 * 128)
    p, pse = pc["nats_per_token"] * scale, pc["stderr"] * scale
    row = md_row(paper, "this study", "mdlm", "tiny")
    assert row[4] == cell(math.exp(p), math.exp(p - Z * pse), math.exp(p + Z * pse))
    assert row[5:] == ["–"] * 7                                            # no zero-shot column measured
    csv = pd.read_csv(study_dir / "paper" / "table1.csv")
    r = csv[(csv.method == "mdlm") & (csv.convention == "paper")].iloc[0]
    assert r.nats_per_token == pytest.approx(pc["nats_per_token"]) and r.dataset == "in_domain"
    assert not r.zero_shot


def test_table1_reference_rows(study):
    study_dir = study[0]
    md = (study_dir / "paper" / "table1.md").read_text()
    paper = section(md, "Paper convention")
    header = md_row(paper, "Source", "Method", "Size")
    assert header[4:] == ["fakecorpus test (in-domain)", "WikiText", "LAMBADA", "PubMed", "AG News", "LM1B", "ArXiv",
                          "PTB"]
    assert md_row(paper, "paper (published)", "RADD", "small")[5:] == ["38.27", "51.82", "56.99", "73.18", "72.99",
                                                                       "85.95", "108.79"]
    assert md_row(paper, "paper (published)", "DID-F (FLOPs-aligned)", "medium")[5] == "28.35"
    assert md_row(paper, "paper (published)", "DID-F (FLOPs-aligned)", "medium")[-1] == "87.09"
    assert "paper (published)" not in section(md, "Measured: strict")    # published numbers: paper convention only
    assert "not yet checked against the PDF" in md
    notes = section(md, "Notes")
    for word in ("Token counting", "GPT-2", "OpenWebText", "Model size and budget", "10 training steps of batch 4"):
        assert word in notes
    csv = pd.read_csv(study_dir / "paper" / "table1.csv")
    pub = csv[csv.source == "paper (published)"]
    assert len(pub) == 5 * 7 and set(pub.convention) == {"paper_per_position"}


def test_table1_zero_shot(tmp_path):
    runs = [("did-fixed", "fixed", 0), ("did-fixed", "fixed", 1), ("radd", "fixed", 0), ("did", "varlen", 0)]
    study_dir, config, _ = make_fake_study(tmp_path, runs=runs, missing={})
    for i, (m, lay, seed) in enumerate(runs):
        if lay == "fixed":
            ds = ["ptb", "wikitext103"] if (m, seed) != ("did-fixed", 1) else ["wikitext103"]
            _write(study_dir / "runs" / run_name(m, lay, seed) / "eval" / "zeroshot.json",
                   _result("zeroshot", zs_values(i, ds), {"mc": 3, "seq_len": 128, "denominator": "fake denominator"}))
    P.main(study_dir, config)
    md = (study_dir / "paper" / "table1.md").read_text()
    strict = section(md, "Measured: strict")
    assert "(zero-shot)" in strict and "in-domain" not in strict
    assert md_row(strict, "Source", "Method", "Size")[4:] == ["WikiText", "PTB"]    # the paper's order
    # radd (index 2), one seed
    n = zs_nats(2, "ptb")
    assert md_row(strict, "this study", "radd", "tiny")[5] == cell(math.exp(n), math.exp(n - Z * 0.02),
                                                                   math.exp(n + Z * 0.02))
    # did-fixed: wikitext from 2 seeds (t interval), ptb from 1 of 2 seeds
    x = np.array([zs_nats(0, "wikitext103"), zs_nats(1, "wikitext103")])
    half = stats.t.ppf(0.975, 1) * x.std(ddof=1) / math.sqrt(2)
    row = md_row(strict, "this study", "did-fixed", "tiny")
    assert row[4] == cell(math.exp(x.mean()), math.exp(x.mean() - half), math.exp(x.mean() + half))
    n0 = zs_nats(0, "ptb")
    assert row[5] == cell(math.exp(n0), math.exp(n0 - Z * 0.02), math.exp(n0 + Z * 0.02)) + " (1 of 2 seeds)"
    # the paper convention uses zeroshot.json's divided_by_seq_len; its stderr scaled alike
    paper = section(md, "Paper convention")
    p = (zs_nats(2, "ptb") - 0.25) * 127 / 128
    se = 0.01 * 127 / 128
    prow = md_row(paper, "this study", "radd", "tiny")
    header = md_row(paper, "Source", "Method", "Size")
    assert header[4:] == ["WikiText", "LAMBADA", "PubMed", "AG News", "LM1B", "ArXiv", "PTB"]
    assert prow[-1] == cell(math.exp(p), math.exp(p - Z * se), math.exp(p + Z * se))
    assert prow[5] == "–"                                                 # LAMBADA: not scored
    notes = section(md, "Notes")
    assert "PubMed: no local file (fake) (every run)" in notes and "fake-ptb" in notes and "3 draws" in notes
    assert "fake denominator" in notes
    assert "zero-shot test sets" in (study_dir / "paper" / "README.md").read_text()


def test_genppl_steps_table(study):
    study_dir, _, values, _, _ = study
    md = (study_dir / "paper" / "genppl_steps.md").read_text()
    tw = section(md, "Measured: gen PPL")
    assert md_row(tw, "Source", "Method", "Size")[4:] == ["16 steps", "64 steps"]
    # mdlm varlen, one seed, even index: ci95 = [gen - 5, gen + 5]
    e = values[run_name("mdlm", "varlen", 0)]["genppl"]["by_steps"]
    assert md_row(tw, "this study", "mdlm", "tiny")[4:] == [cell(x["gen_ppl"], x["gen_ppl"] - 5, x["gen_ppl"] + 5)
                                                            for x in e]
    # ilm (index 5, odd): ci95 given as a half-width 5.0
    g = values[run_name("ilm", "varlen", 0)]["genppl"]["by_steps"][1]["gen_ppl"]
    assert md_row(tw, "this study", "ilm", "tiny")[5] == cell(g, g - 5, g + 5)
    # did varlen, two seeds: geometric mean, t interval on the log scale
    x = np.log([values[run_name("did", "varlen", s)]["genppl"]["by_steps"][0]["gen_ppl"] for s in (0, 1)])
    half = stats.t.ppf(0.975, 1) * x.std(ddof=1) / math.sqrt(2)
    row = md_row(tw, "this study", "did", "tiny")
    assert row[3] == "2" and row[4] == cell(math.exp(x.mean()), math.exp(x.mean() - half), math.exp(x.mean() + half))
    assert md_row(tw, "this study", "held-out text (data)")[4] == cell(42.0, 40.0, 44.0)
    assert "| this study | did-fixed |" not in md                         # variable-length runs only
    # the paper aggregation: mean per sample (+ its CI where the file has one) and the published rows
    mp = section(md, "Paper aggregation")
    assert md_row(mp, "Source", "Method", "Size")[4:] == ["16 steps", "64 steps", "128 steps", "256 steps", "512 steps"]
    m = [x["gen_ppl_mean_per_sample"] for x in e]
    assert md_row(mp, "this study", "mdlm", "tiny")[4:6] == [cell(v, v - 3, v + 4) for v in m]
    assert md_row(mp, "paper (published)", "DID", "small")[4:] == ["–", "22.78", "21.07", "21.90", "23.88"]
    assert md_row(mp, "paper (published)", "RADD (padded)", "small")[5] == "81.92"
    assert md_row(mp, "paper (published)", "ILM", "small")[-1] == "31.14"
    notes = section(md, "Notes")
    assert "`fake-evaluator`" in notes and "GPT-2-large" in notes and "99 evaluator tokens" in notes
    csv = pd.read_csv(study_dir / "paper" / "genppl_steps.csv")
    r = csv[(csv.method == "mdlm") & (csv.steps == 64)].iloc[0]
    assert r.gen_ppl == pytest.approx(e[1]["gen_ppl"]) and r.gen_ppl_lo == pytest.approx(e[1]["gen_ppl"] - 5)
    assert (csv.source == "paper (published)").sum() == 12


def test_speed_table(study):
    study_dir = study[0]
    md = (study_dir / "paper" / "speed.md").read_text()
    # fake cost: the j-th method of a layout (reference first) takes exactly j + 1 times DID's time
    header = md_row(md, "Layout", "DID vs", "Size")
    assert header[4:] == ["Training speedup", "Inference @16 steps", "Inference @64 steps", "Inference (paper's setting)"]
    varlen = [m for m in dict.fromkeys(m for m, lay, _ in PAPER_RUNS if lay == "varlen") if m != "did"]
    for j, m in enumerate(varlen, start=2):
        row = md_row(md, "varlen", m, "tiny")
        assert row[3] == "this study (interleaved cost job)"
        assert row[4:7] == [f"{j:.2f}× [{j:.2f}–{j:.2f}]"] * 3
    assert md_row(md, "fixed", "ar", "tiny")[4] == "3.00× [3.00–3.00]"
    with pytest.raises(AssertionError):
        md_row(md, "varlen", "did", "tiny")                               # no row for the reference itself
    pub = md_row(md, "varlen", "RADD", "small → large")
    assert pub[3] == "paper (published)" and "3.42×" in pub[4] and "3.79×" in pub[-1]
    assert "1.99×" in md_row(md, "fixed", "RADD", "small → large")[4]
    notes = section(md, "Notes")
    assert "cost/varlen.json" in notes and "cpu (fake)" in notes and "not yet checked against the PDF" in notes
    csv = pd.read_csv(study_dir / "paper" / "speed.csv")
    r = csv[(csv.method == "mdlm") & (csv.layout == "varlen") & csv.steps.isna() & (csv.source == "this study")].iloc[0]
    assert r.train_speedup == 2.0


def test_length_cdf(study):
    import matplotlib.image as mpimg

    study_dir, _, _, lengths, _ = study
    png = study_dir / "paper" / "length_cdf.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 300 and img[..., :3].std() > 0.01
    csv = pd.read_csv(study_dir / "paper" / "length_cdf.csv")
    # did: two seeds pooled (12 lengths each); ilm from samples.jsonl; the data once (the same refs everywhere)
    did = csv[(csv.method == "did") & (csv.steps == 16)].iloc[0]
    pooled = lengths[run_name("did", "varlen", 0)][0][16] + lengths[run_name("did", "varlen", 1)][0][16]
    assert did.n == 24 and did["mean"] == pytest.approx(np.mean(pooled))
    ref = np.array(lengths[run_name("did", "varlen", 0)][1], float)
    ilm = csv[(csv.method == "ilm") & (csv.steps == 64)].iloc[0]
    gen = np.array(lengths[run_name("ilm", "varlen", 0)][0][64], float)
    grid = np.union1d(gen, ref)
    ks = np.max(np.abs(np.searchsorted(np.sort(gen), grid, "right") / gen.size
                       - np.searchsorted(np.sort(ref), grid, "right") / ref.size))
    assert ilm.n == 12 and ilm.ks_to_data == pytest.approx(ks)
    data = csv[csv.method == "data"].iloc[0]
    assert data.n == len(ref) and data["mean"] == pytest.approx(ref.mean())
    assert "fake content tokens" in (study_dir / "paper" / "README.md").read_text()


def test_no_variable_length_or_cost(tmp_path):
    """A study with fixed runs only and no cost file: the tables say so and keep the published rows."""
    runs = [("did-fixed", "fixed", 0), ("radd", "fixed", 0)]
    study_dir, config, _ = make_fake_study(tmp_path, runs=runs, missing={"radd-fixed-tiny-s0": {"speed"},
                                                                          "did-fixed-fixed-tiny-s0": {"speed"}})
    P.main(study_dir, config)
    out = study_dir / "paper"
    gen = (out / "genppl_steps.md").read_text()
    assert "No results for this table" in gen and "22.78" in gen
    speed = (out / "speed.md").read_text()
    assert "no cost measurements" in speed and "3.79×" in speed
    assert (out / "length_cdf.png").read_bytes()[:8] == PNG_MAGIC       # a placeholder figure


def test_cli_errors_and_dispatch(tmp_path, capsys):
    assert cli(["paper", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: study directory {tmp_path / 'absent'} does not exist"]
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    assert cli(["paper", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "has no runs" in err[0]
    with pytest.raises(UserError, match="has no runs"):
        P.main(tmp_path / "empty")
    study_dir, _, _ = make_fake_study(tmp_path, runs=[("did", "varlen", 0), ("ar", "fixed", 0)], missing={})
    assert cli(["paper", str(study_dir), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == sorted(FILES) and (tmp_path / "out" / "table1.md").is_file()
    with pytest.raises(SystemExit):
        cli(["--help"])
    assert "paper" in capsys.readouterr().out                             # the subcommand is documented
