"""Metrics from other packages: the `didbench.metrics` entry-point group (harness.core.metric_registry).

A fake installed package (a dist-info folder and two modules on sys.path in tmp_path) declares a
toy metric, with no other edit anywhere: Snakemake plans its job for every run, the study config
accepts and default-fills its settings, the evaluate CLI runs it, the study loader reads its
rows, MLflow gets its numbers and the analysis writes its table. A broken declaration is one line.
"""
from __future__ import annotations

import json

import pytest
import yaml

from harness.core import metric_registry
from harness.core.config import load_config
from harness.core.errors import UserError
from tests.fake_study import STEPS, make_fake_study
from tests.test_plugins import fake_package
from tests.test_workflow import REPO, job_counts, snakemake

DECLARATION = '''
from dataclasses import dataclass

from harness.core.metric_registry import Metric


@dataclass
class ToySettings:
    scale: float = 1.0
    max_samples: int = 1000


METRIC = Metric("toy", "toy_metric_impl", "words per sample, scaled", needs=("samples",), settings=ToySettings,
                columns=("mean_words", "n"), title="Toy: words per sample")
'''

IMPLEMENTATION = '''
from pathlib import Path

from harness.core.records import header_of, read_jsonl, read_result, write_result
from harness.metrics.common import settings


def run(args, config):
    s = settings(config, "toy")
    summary = read_result(args.samples, "samples")
    by_steps = {}
    for row in read_jsonl(Path(args.samples).with_suffix(".jsonl")):
        by_steps.setdefault(row["steps"], []).append(len(row["text"].split()))
    values = {"by_steps": [{"steps": k, "mean_words": s["scale"] * sum(w) / len(w), "mean_words_ci95": 0.5,
                            "n": len(w), "ignored": 1.0} for k, w in sorted(by_steps.items())]}
    write_result(args.out, "toy", header_of(summary), s, values)
'''


def _toy_package(root, entry="toy = toy_metric:METRIC", modules=None):
    mods = {"toy_metric": DECLARATION, "toy_metric_impl": IMPLEMENTATION} if modules is None else modules
    site = fake_package(root / "site", "didbench_toy_metric", [], mods)
    (next(site.glob("*.dist-info")) / "entry_points.txt").write_text(f"[didbench.metrics]\n{entry}\n")
    return site


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy package on sys.path and its metric registered; forgotten afterwards."""
    import sys

    site = _toy_package(tmp_path)
    monkeypatch.syspath_prepend(str(site))
    metric_registry.load_plugins(force=True)
    yield site
    monkeypatch.undo()
    for name in ("toy_metric", "toy_metric_impl"):
        sys.modules.pop(name, None)
    metric_registry.load_plugins(force=True)
    assert "toy" not in metric_registry.metrics()


def test_a_toy_metric_is_planned_run_loaded_logged_and_tabulated(toy, tmp_path):
    from harness.metrics import main as evaluate
    from harness.results.payloads import eval_metrics
    from harness.results.study import load_study
    from analysis.tables import all_tables

    assert metric_registry.metrics()["toy"].plugin and metric_registry.metrics()["toy"].files == ("toy.json",)
    # the config: toy is a metric, its settings a section filled from the dataclass
    micro = yaml.safe_load((REPO / "tests/configs/micro.yaml").read_text())
    micro["evaluate"]["metrics"] = [*micro["evaluate"].get("metrics", ["ppl", "samples"]), "toy"]
    micro["evaluate"]["toy"] = {"scale": 2.0}
    cfg = load_config(micro)
    assert cfg["evaluate"]["toy"] == {"scale": 2.0, "max_samples": 1000}
    with pytest.raises(UserError, match=r"evaluate\.toy\.nope: unknown key \(known: scale, max_samples\)"):
        load_config({**micro, "evaluate": {**micro["evaluate"], "toy": {"nope": 1}}})
    with pytest.raises(UserError, match=r"evaluate\.toy\.max_samples: 'many' is not of type 'integer'"):
        load_config({**micro, "evaluate": {**micro["evaluate"], "toy": {"max_samples": "many"}}})
    assert "toy" not in load_config({})["evaluate"]          # a study that does not list it: no section

    # Snakemake plans one CPU job per run (it reads samples, not a checkpoint), after the samples
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(micro))
    dry = snakemake("-n", "-p", "--cores", "1", "--directory", str(tmp_path / "w"), "--configfile",
                    str(tmp_path / "study.yaml"), PYTHONPATH=str(toy))
    assert dry.returncode == 0, dry.stderr[-3000:]
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts["eval_registered_cpu"] == counts["train"] == counts["eval_samples"] > 0
    assert "eval_registered" not in counts
    assert dry.stdout.count("python -m harness evaluate toy --config ") == counts["train"]

    # the CLI runs it on every run of a study; the loader, MLflow and the analysis take it from there
    study_dir, config, _ = make_fake_study(tmp_path / "results")
    runs = sorted(p for p in (study_dir / "runs").iterdir())
    for rd in runs:
        assert evaluate(["toy", "--config", str(tmp_path / "study.yaml"), "--out", str(rd / "eval" / "toy.json")]) == 0
    result = json.loads((runs[0] / "eval" / "toy.json").read_text())
    assert result["kind"] == "toy" and result["settings"] == {"scale": 2.0, "max_samples": 1000}
    assert [e["mean_words"] for e in result["values"]["by_steps"]] == [6.0] * len(STEPS)  # "fake sample k": 3 words

    study = load_study(study_dir, config)
    rows = study.extra["toy"]
    assert len(rows) == len(runs) * len(STEPS) and sorted(set(rows["steps"])) == list(STEPS)
    assert set(rows.columns) >= {"run", "method", "seed", "mean_words", "mean_words_ci95_lo", "n"}
    assert "ignored" not in rows.columns                     # only the declared columns
    assert rows["mean_words_ci95_lo"].tolist() == [5.5] * len(rows)

    logged = {(k, s): v for k, v, s, _ in eval_metrics("toy", result["values"])}
    assert logged[("toy/mean_words_16steps", 0)] == 6.0 and logged[("toy/mean_words_ci95_hi_64steps", 0)] == 6.5
    assert logged[("toy/n_16steps", 0)] == 2.0 and not any("ignored" in k for k, _ in logged)

    table = {t.name: t for t in all_tables(study, config)}["toy"]
    assert table.title == "Toy: words per sample"
    did = table.data[(table.data["method"] == "did") & (table.data["steps"] == 16)].iloc[0]
    assert did["n_seeds"] == 2 and did["mean_words"] == 6.0 and did["mean_words_sd"] == 0.0
    one_seed = table.display[table.data["method"].eq("mdlm").to_numpy()]
    assert one_seed["mean_words"].iloc[0] == "6.000 [5.500, 6.500]"     # the metric's own CI, one seed


@pytest.mark.parametrize("entry, modules, expect", [
    ("toy = toy_metric:NOPE", None, "failed to load: AttributeError"),
    ("toy = toy_metric:ToySettings", None, "not a harness.core.metric_registry.Metric"),
    ("ppl = toy_metric:METRIC", None, "takes a name didbench already uses"),
    ("toy = toy_metric:METRIC", {"toy_metric": DECLARATION.replace('("samples",)', '("nothing",)')},
     "needs nothing, not a metric"),
])
def test_a_broken_metric_entry_point_is_one_line_and_stops_only_the_studies_that_list_it(
        tmp_path, monkeypatch, entry, modules, expect):
    import sys

    monkeypatch.syspath_prepend(str(_toy_package(tmp_path, entry, modules)))
    try:
        metric_registry.load_plugins(force=True)
        assert not metric_registry.plugin_metrics() and metric_registry.metrics()["ppl"].module == "harness.metrics.ppl"
        load_config({})                                         # other studies still load
        name = entry.split(" = ")[0]
        if name == "toy":
            with pytest.raises(UserError) as err:
                load_config({"evaluate": {"metrics": ["ppl", "toy"]}}, source="study.yaml")
            msg = str(err.value)
            assert "\n" not in msg and msg.startswith("study.yaml: evaluate.metrics: metric 'toy': ") and expect in msg
            assert "(entry point of group didbench.metrics, package didbench_toy_metric 0.1)" in msg
        else:                                                   # a built-in's name: the built-in stays
            assert expect in metric_registry.BROKEN["ppl"]
            assert load_config({"evaluate": {"metrics": ["ppl"]}})["evaluate"]["metrics"] == ["ppl"]
    finally:
        monkeypatch.undo()
        sys.modules.pop("toy_metric", None)
        metric_registry.load_plugins(force=True)
    assert not metric_registry.BROKEN and not metric_registry.plugin_metrics()
