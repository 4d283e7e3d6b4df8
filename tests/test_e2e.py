"""The whole workflow on the micro study: data -> train -> evaluate -> report -> MLflow.

About a minute or two on 2 CPU cores once the evaluator LM is cached (building the cache adds
~30 s the first time; it is shared with `make study` under resources/evaluators unless
DIDBENCH_EVALUATORS points elsewhere). The working directory is a temporary folder, so the
repository's results/ is untouched.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.core.config import load_config, study_runs

REPO = Path(__file__).resolve().parent.parent
MICRO = "tests/configs/micro.yaml"

pytestmark = pytest.mark.integration


def run_snakemake(workdir: Path, *args: str, timeout: int = 1500, configfile: str = MICRO) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DIDBENCH_EVALUATORS", str(REPO / "resources" / "evaluators"))
    cmd = [sys.executable, "-m", "snakemake", *args, "--directory", str(workdir), "--configfile", configfile]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_micro_study_end_to_end(tmp_path):
    result = run_snakemake(tmp_path, "--cores", "2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]

    cfg = load_config(REPO / MICRO)
    study = tmp_path / "results" / cfg["study"]
    for run in study_runs(cfg):
        run_dir = study / "runs" / run["name"]
        for name in ("checkpoint.pt", "history.csv", "train.json"):
            assert (run_dir / name).is_file(), f"{run['name']}: {name}"
        expected = ["ppl", "samples", "genppl", "mauve", "diversity"]
        expected += ["lengths"] if run["layout"] == "varlen" else []
        for what in expected:
            result_json = json.loads((run_dir / "eval" / f"{what}.json").read_text())
            assert result_json["schema"] == "didbench.result/1" and result_json["kind"] == what
            assert result_json["run"] == run["name"]
        assert not (run_dir / "eval" / "lengths.json").exists() or run["layout"] == "varlen"
        assert (study / "benchmarks" / "train" / f"{run['name']}.tsv").is_file()
        assert (study / "logs" / "train" / f"{run['name']}.log").is_file()

        ppl = json.loads((run_dir / "eval" / "ppl.json").read_text())["values"]
        assert set(ppl["paper_convention"]) >= {"nats_per_token", "ppl", "stderr", "omits"}
        assert len(ppl["per_sequence"]["strict"]) == ppl["n_sequences"] and ppl["omits"]
    for layout in {run["layout"] for run in study_runs(cfg)}:   # the interleaved cost job, one per layout
        cost = json.loads((study / "cost" / f"{layout}.json").read_text())
        assert cost["kind"] == "cost" and cost["values"]["train"]["rows"] and cost["values"]["sample"]["rows"]

    for ext in ("csv", "md", "tex"):
        assert list((study / "tables").glob(f"*.{ext}")), f"no tables/*.{ext}"
    assert list((study / "figures").glob("*.png")), "no figures"
    logged = json.loads((study / "mlflow.done").read_text())
    assert logged["runs"] == len(study_runs(cfg))

    # a second invocation has nothing to do (the settings hashes are stable)
    again = run_snakemake(tmp_path, "--cores", "2", "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr


SYNTHETIC_MICRO = "tests/configs/synthetic-micro.yaml"


@pytest.mark.slow   # ~90 s: the synthetic DAG's own rules are planned in test_workflow; run with -m slow
def test_synthetic_micro_study_end_to_end(tmp_path):
    """A synthetic corpus: the exact metrics replace the evaluator-LM ones, and the headline uses them."""
    result = run_snakemake(tmp_path, "--cores", "2", configfile=SYNTHETIC_MICRO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    cfg = load_config(REPO / SYNTHETIC_MICRO)
    study = tmp_path / "results" / cfg["study"]
    assert "evaluator_cache" not in result.stdout + result.stderr    # no evaluator LM is needed
    for run in study_runs(cfg):
        ev = study / "runs" / run["name"] / "eval"
        assert not (ev / "genppl.json").exists() and not (ev / "mauve.json").exists()
        values = json.loads((ev / "exact.json").read_text())["values"]
        gap = values["bound_gap"]
        ppl = json.loads((ev / "ppl.json").read_text())["values"]
        # the gap is the bound minus the exact NLL of the same rows
        assert gap["strict"]["nats_per_token"] == pytest.approx(
            ppl["nats_per_token"] - gap["exact"]["nats_per_token"], rel=1e-9, abs=1e-12)
        assert values["data"]["invalid"] == 0                      # held-out data is always valid
        assert [e["steps"] for e in values["by_steps"]] == cfg["evaluate"]["samples"]["steps"]
        assert ("lengths" in values["data"]) == (run["layout"] == "varlen")
        hist = (study / "runs" / run["name"] / "history.csv").read_text().splitlines()
        assert "valid_nats_per_token" in hist[0] and "train_flops" in hist[0]
    summary = (study / "summary.md").read_text()
    assert "exact metrics" in summary and "Bound gap" in summary
    for name in ("bound_gap", "exact_samples"):
        assert (study / "tables" / f"{name}.md").is_file()
    for name in ("bound_gap_curves", "exact_steps", "length_cdf"):
        assert (study / "figures" / f"{name}.png").is_file()

    # the HTML report is a results page: every figure and table of the analysis, with its caption
    report = tmp_path / "report.html"
    made = run_snakemake(tmp_path, "--report", str(report), "--cores", "1", timeout=600, configfile=SYNTHETIC_MICRO)
    assert made.returncode == 0, (made.stdout + made.stderr)[-3000:]
    html = report.read_text(errors="replace")
    for f in (study / "figures").glob("*.png"):
        assert f.name in html, f.name
    assert "ppl.csv" in html and "the strict bound" in html   # the ppl table and its caption
