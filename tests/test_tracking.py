"""harness.results.tracking.log_study: one MLflow run per trained model, idempotent, crash-safe.

MLflow takes seconds to create a SQLite store, so these tests are few and each checks a lot.
The study is FAKE (tests/fake_study.py): 8 result sets, two evaluations missing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_study import RUNS, fake_valid, make_fake_study, run_name, write_fake_cost  # noqa: E402

pytest.importorskip("mlflow")
from mlflow.entities import ViewType  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from harness.results import payloads, tracking  # noqa: E402

MODEL_RUNS = {run_name(m, lay, s) for m, lay, s in RUNS}
IDENT = {run_name(m, lay, s): (m, lay, str(s)) for m, lay, s in RUNS}


def active_runs(uri: str, study: str) -> dict[str, list]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(study)
    out: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000):
        out.setdefault(r.info.run_name, []).append(r)
    return out


def test_log_twice_default_store_no_duplicates(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study_dir, config, values = make_fake_study(tmp_path)
    (study_dir / "tables").mkdir()
    (study_dir / "tables" / "ppl.md").write_text("fake table\n")

    first = tracking.log_study(study_dir, config)
    uri = f"sqlite:///{study_dir.resolve() / 'mlflow.db'}"
    assert first["tracking_uri"] == uri and (study_dir / "mlflow.db").is_file()
    assert sorted(first["logged"]) == sorted(MODEL_RUNS | {"study"}) and first["runs"] == 8
    second = tracking.log_study(study_dir, config)
    assert second["logged"] == [] and sorted(second["skipped"]) == sorted(MODEL_RUNS | {"study"})

    runs = active_runs(uri, "fake")
    assert set(runs) == MODEL_RUNS | {"study"} and all(len(v) == 1 for v in runs.values())   # N + 1 runs
    client = MlflowClient(tracking_uri=uri)
    for name in MODEL_RUNS:
        r = runs[name][0]
        v = values[name]
        assert r.info.status == "FINISHED"
        assert r.data.tags["didbench.key"] == f"fake/{name}" and r.data.tags["didbench.rule"] == "train"
        assert (r.data.tags["method"], r.data.tags["layout"], r.data.tags["seed"]) == IDENT[name]
        assert r.data.tags["git_commit"] == "0" * 40 and r.data.tags["config_hash"] == "fakehash"
        assert r.data.metrics["nats_per_token"] == pytest.approx(v["ppl"]["nats_per_token"])
        assert r.data.metrics["gen_ppl_64steps"] == pytest.approx(v["genppl"]["by_steps"][1]["gen_ppl"])
        assert r.data.metrics["entropy_nats_64steps"] == pytest.approx(v["genppl"]["by_steps"][1]["entropy_nats"])
        assert ("mauve_64steps" in r.data.metrics) == (name != "ar-fixed-tiny-s0")      # missing file: no metric
        assert ("w1_64steps" in r.data.metrics) == ("varlen" in name)
        assert ("tokens_per_s" in r.data.metrics) == (name != "ilm-varlen-tiny-s0")
        assert r.data.params["data.corpus.name"] == "fakecorpus" and r.data.params["seed"] == name[-1]
        # params are the run's inputs; what training measured is a metric (sortable, chartable)
        assert not {"final_loss", "wall_seconds", "tokens_per_s", "created"} & set(r.data.params), name
        i = [run_name(*r) for r in RUNS].index(name)                         # fake_study's train.json values
        assert r.data.metrics["final_loss"] == pytest.approx(2.5 - 0.1 * i)
        assert r.data.metrics["train_wall_seconds"] == pytest.approx(10.0 + i)
        assert r.data.params["params"] == str(12345 + i)                      # the model's size: an input
    r, v = runs["did-varlen-tiny-s1"][0], values["did-varlen-tiny-s1"]
    assert r.data.metrics["s_per_sample_16steps"] == pytest.approx(v["speed"]["sample"][0]["s_per_sample"])
    assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == list(range(1, 11))
    valid = client.get_metric_history(r.info.run_id, "train/valid_nats_per_token")   # the validation steps only
    assert sorted((m.step, m.value) for m in valid) == [(s, pytest.approx(fake_valid(1, s))) for s in (5, 10)]
    curve = client.get_metric_history(r.info.run_id, "steps/gen_ppl")
    assert sorted((m.step, m.value) for m in curve) == [(b["steps"], b["gen_ppl"]) for b in v["genppl"]["by_steps"]]
    arts = {a.path for d in (None, "eval") for a in client.list_artifacts(r.info.run_id, d)}
    assert {"train.json", "history.csv", "eval/samples.jsonl", "eval/genppl.json", "benchmarks"} <= arts
    assert (study_dir / "mlartifacts").is_dir()
    study_run = runs["study"][0]
    assert study_run.data.tags["didbench.rule"] == "log"
    assert "tables/ppl.md" in {a.path for a in client.list_artifacts(study_run.info.run_id, "tables")}

    # as a researcher reads it: nested under the study run, training times, constants on the parent
    assert study_run.data.metrics == {} and study_run.data.params["n_runs"] == "8"
    assert study_run.data.params["reference.varlen.gen_ppl"] == "42.0"
    for i, name in enumerate(n for n in (run_name(m, lay, s) for m, lay, s in RUNS)):
        r = runs[name][0]
        assert r.data.tags["mlflow.parentRunId"] == study_run.info.run_id
        assert not any(k.startswith("data/") for k in r.data.metrics)
        assert r.data.tags["mlflow.source.name"] == f"python -m harness train ({name})"
        end = 946684800000 + 60000 * i                                      # train.json created, 2000-01-01
        assert (r.info.start_time, r.info.end_time) == (end - 1000 * (10 + i), end)   # minus wall_seconds
    assert study_run.info.start_time == min(r[0].info.start_time for n, r in runs.items() if n != "study")
    # its end: the last training or result (created stamps), not when the tables were written today
    assert study_run.info.end_time == max(r[0].info.end_time for n, r in runs.items() if n != "study")
    exp = client.get_experiment_by_name("fake")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags[tracking.VIEW_TAG])
    assert view["name"] == "didbench: key metrics"
    assert "metrics.`nats_per_token`" in json.loads(view["state"])["selectedColumns"]
    assert first["view"].endswith(f"/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={tracking.VIEW_ID}")

    # a changed result is re-logged in place: still exactly one run for that model
    genppl = study_dir / "runs" / "mdlm-fixed-tiny-s0" / "eval" / "genppl.json"
    genppl.write_text(genppl.read_text().replace('"n": 32', '"n": 33'))
    third = tracking.log_study(study_dir, config)
    assert third["replaced"] == ["mdlm-fixed-tiny-s0"] and third["runs"] == 8
    runs = active_runs(uri, "fake")
    assert len(runs["mdlm-fixed-tiny-s0"]) == 1
    assert runs["mdlm-fixed-tiny-s0"][0].data.metrics["gen_ppl_n_16steps"] == 33


def test_history_metrics_log_validation_only_at_its_steps(tmp_path):
    """history.csv cells left empty (rows without validation) are skipped, never logged as NaN."""
    study_dir, _, _ = make_fake_study(tmp_path, runs=[("did", "varlen", 0), ("ilm", "varlen", 0)], missing={})
    m = payloads.history_metrics(study_dir / "runs" / "did-varlen-tiny-s0" / "history.csv", 0)
    by_key: dict = {}
    for key, value, step, _ in m:
        by_key.setdefault(key, []).append((step, value))
    assert by_key["train/valid_nats_per_token"] == [(5, fake_valid(0, 5)), (10, fake_valid(0, 10))]
    assert [s for s, _ in by_key["train/valid_stderr"]] == [5, 10] == [s for s, _ in by_key["train/valid_seconds"]]
    assert [s for s, _ in by_key["train/train_flops"]] == list(range(1, 11))
    assert all(v == v for _, v, _, _ in m)                                   # no NaN anywhere
    old = payloads.history_metrics(study_dir / "runs" / "ilm-varlen-tiny-s0" / "history.csv", 0)
    assert not any(k.startswith("train/valid") for k, *_ in old)


def test_crash_half_way_then_rerun_completes(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    study_dir, config, _ = make_fake_study(tmp_path)
    real = tracking.log_payload
    calls = {"n": 0}

    def crashing(client, exp_id, p):
        calls["n"] += 1
        if calls["n"] == 4:          # die in the middle of the 4th run: created, half logged, never finished
            run = client.create_run(exp_id, run_name=p.name, tags=p.tags)
            client.log_param(run.info.run_id, "half", "way")
            raise KeyboardInterrupt("simulated crash")
        return real(client, exp_id, p)

    monkeypatch.setattr(tracking, "log_payload", crashing)
    with pytest.raises(KeyboardInterrupt):
        tracking.log_study(study_dir, config)
    runs = active_runs(uri, "fake")
    assert len(runs) == 4 and sum(r.info.status != "FINISHED" for v in runs.values() for r in v) == 1
    assert not (study_dir / "mlflow.db").exists()                          # the env URI was used

    monkeypatch.setattr(tracking, "log_payload", real)
    summary = tracking.log_study(study_dir, config)
    assert len(summary["skipped"]) == 3 and len(summary["replaced"]) == 1 and summary["runs"] == 8
    runs = active_runs(uri, "fake")
    assert set(runs) == MODEL_RUNS | {"study"}
    assert all(len(v) == 1 and v[0].info.status == "FINISHED" and "half" not in v[0].data.params
               for v in runs.values())


def test_cost_results_are_logged_and_rehashed(tmp_path, monkeypatch):
    """Each run gets its method's numbers from its layout's cost file; the study run gets the files."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'cost.db'}")
    runs = [("did", "varlen", 0), ("mdlm", "varlen", 0), ("did-fixed", "fixed", 0), ("ar", "fixed", 0)]
    study_dir, config, _ = make_fake_study(tmp_path, runs=runs, missing={})
    cost = write_fake_cost(study_dir, runs=runs)
    first = tracking.log_study(study_dir, config)
    assert len(first["logged"]) == 5
    got = active_runs(f"sqlite:///{tmp_path / 'cost.db'}", "fake")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'cost.db'}")
    mdlm = got["mdlm-varlen-tiny-s0"][0]
    train = cost["varlen"]["train"]["rows"][1]
    assert train["method"] == "mdlm"
    m = mdlm.data.metrics
    assert m["cost/train_ratio_to_did"] == pytest.approx(2.0) and m["cost/train_ratio_to_did_max"] == pytest.approx(2.0)
    assert m["cost/train_tokens_per_s"] == pytest.approx(train["tokens_per_s"]["median"])
    assert m["cost/train_s_per_step_min"] == pytest.approx(train["s_per_step"]["min"])
    assert m["cost/flops_per_token"] == pytest.approx(train["flops_per_token"])
    for k in (16, 64):
        row = next(r for r in cost["varlen"]["sample"]["rows"] if r["method"] == "mdlm" and r["steps"] == k)
        assert m[f"cost/s_per_sample_{k}steps"] == pytest.approx(row["s_per_sample"]["median"])
        assert m[f"cost/sample_ratio_to_did_{k}steps"] == pytest.approx(2.0)
        assert m[f"cost/nfe_{k}steps"] == k and m[f"cost/gen_tokens_per_s_{k}steps"] > 0
    assert got["did-varlen-tiny-s0"][0].data.metrics["cost/train_ratio_to_did"] == 1.0
    assert got["did-varlen-tiny-s0"][0].data.metrics["cost/train_dp_fraction"] == pytest.approx(0.01)
    assert "cost/train_dp_fraction" not in m
    assert got["ar-fixed-tiny-s0"][0].data.metrics["cost/train_ratio_to_did"] == pytest.approx(2.0)
    curve = client.get_metric_history(mdlm.info.run_id, "steps/cost_s_per_sample")
    assert sorted(x.step for x in curve) == [16, 64]
    assert "cost/varlen.json" in {a.path for a in client.list_artifacts(mdlm.info.run_id, "cost")}
    study_arts = {a.path for a in client.list_artifacts(got["study"][0].info.run_id, "cost")}
    assert study_arts == {"cost/fixed.json", "cost/varlen.json"}

    # a changed cost file re-logs the runs of that layout and the study run, nothing else
    path = study_dir / "cost" / "varlen.json"
    path.write_text(path.read_text().replace('"wall_seconds": 10.0', '"wall_seconds": 11.0'))
    again = tracking.log_study(study_dir, config)
    assert sorted(again["replaced"]) == ["did-varlen-tiny-s0", "mdlm-varlen-tiny-s0", "study"]
    assert sorted(again["skipped"]) == ["ar-fixed-tiny-s0", "did-fixed-fixed-tiny-s0"]


def test_exact_metrics_of_a_synthetic_run():
    from harness.results.payloads import eval_metrics

    values = {"bound_gap": {"strict": {"nats_per_token": 0.3, "stderr": 0.02}, "paper": {"nats_per_token": 0.1},
                            "exact": {"nats_per_token": 1.5}},
              "by_steps": [{"steps": 8, "nats_per_token": 1.7, "invalid_fraction": 0.25, "unigram_entropy_mean": 1.1,
                            "lengths": {"tv": 0.2, "ks": 0.1}},
                           {"steps": 32, "nats_per_token": None, "invalid_fraction": 1.0}],
              "data": {"nats_per_token": 1.5, "invalid_fraction": 0.0}}
    got = {(k, s): v for k, v, s, _ in eval_metrics("exact", values)}
    assert got[("bound_gap_strict", 0)] == 0.3 and got[("bound_gap_strict_stderr", 0)] == 0.02
    assert got[("bound_gap_paper", 0)] == 0.1 and got[("exact_nats_per_token", 0)] == 1.5
    assert got[("exact_nll_8steps", 0)] == 1.7 and got[("steps/exact_nll", 8)] == 1.7
    assert got[("invalid_fraction_32steps", 0)] == 1.0 and ("exact_nll_32steps", 0) not in got   # null: not logged
    assert got[("length_tv_8steps", 0)] == 0.2 and got[("data/exact_nll", 0)] == 1.5


def test_live_training_run_is_completed_in_place(tmp_path, monkeypatch):
    """harness.results.live streams the curve into the run `harness log` later completes: same run id,
    nested, the curve not logged twice; a resumed training reopens the same run."""
    from harness.results.live import LiveRun

    uri = f"sqlite:///{tmp_path / 'live.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DIDBENCH_MLFLOW_SYSTEM_METRICS", "0")
    study_dir, config, _ = make_fake_study(tmp_path, runs=[("did", "varlen", 0), ("ar", "varlen", 0)], missing={})
    name = "did-varlen-tiny-s0"
    run_cfg = {**config, "method": "did", "layout": "varlen", "seed": 0}
    info = {"run": name, "method": "did", "layout": "varlen", "size": "tiny", "seed": 0}
    live = LiveRun.start(run_cfg, info, study_dir / "runs" / name, start_step=0)
    for s in range(1, 6):
        live.log_row({"step": s, "loss": 3.0 - 0.1 * s, "wall_time": 0.5 * s, "nats_per_token": 5.0})
    live.finish("KILLED")                                  # preempted at step 5
    again = LiveRun.start(run_cfg, info, study_dir / "runs" / name, start_step=5)
    assert again.run_id == live.run_id                     # the resume continues the same run
    for s in range(6, 11):
        again.log_row({"step": s, "loss": 3.0 - 0.1 * s, "wall_time": 0.5 * s, "bad": "text"})
    again.finish()

    summary = tracking.log_study(study_dir, config)
    assert summary["completed"] == ["study", name] and summary["logged"] == ["ar-varlen-tiny-s0"]   # parent: live too
    runs = active_runs(uri, "fake")
    assert set(runs) == {name, "ar-varlen-tiny-s0", "study"} and all(len(v) == 1 for v in runs.values())
    r = runs[name][0]
    assert r.info.run_id == live.run_id and r.info.status == "FINISHED"
    assert r.data.tags["mlflow.parentRunId"] == runs["study"][0].info.run_id
    client = MlflowClient(tracking_uri=uri)
    assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == list(range(1, 11))
    assert "train/bad" not in r.data.metrics and "nats_per_token" in r.data.metrics     # eval metrics added
    assert sorted(tracking.log_study(study_dir, config)["skipped"]) == sorted(["study", name, "ar-varlen-tiny-s0"])


def test_live_logging_never_stops_training(tmp_path, monkeypatch, capsys):
    from harness.results.live import LiveRun

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")       # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    info = {"run": "did-varlen-tiny-s0", "method": "did", "layout": "varlen", "size": "tiny", "seed": 0}
    assert LiveRun.start({"study": "x"}, info, tmp_path / "x" / "runs" / "r", 0) is None
    assert "live MLflow logging off" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert LiveRun.start({"study": "x"}, info, tmp_path, 0) is None      # not asked for: nothing


def test_checkpoints_are_artifacts_only_when_asked(tmp_path, monkeypatch):
    """tracking.log_checkpoints (harness log --checkpoints): checkpoint.pt under checkpoint/."""
    from harness import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'ck.db'}")
    study_dir, config, _ = make_fake_study(tmp_path, runs=[("ar", "varlen", 0)], missing={})
    (study_dir / "runs" / "ar-varlen-tiny-s0" / "checkpoint.pt").write_bytes(b"fake weights")
    cfg = tmp_path / "cfg.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({"study": "fake", "tracking": {"log_checkpoints": True}}))
    assert cli.main(["log", "--config", str(cfg), "--study-dir", str(study_dir)]) == 0      # default: no
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ck.db'}")
    rid = active_runs(f"sqlite:///{tmp_path / 'ck.db'}", "fake")["ar-varlen-tiny-s0"][0].info.run_id
    assert client.list_artifacts(rid, "checkpoint") == []
    assert cli.main(["log", "--config", str(cfg), "--study-dir", str(study_dir), "--checkpoints"]) == 0
    rid = active_runs(f"sqlite:///{tmp_path / 'ck.db'}", "fake")["ar-varlen-tiny-s0"][0].info.run_id
    assert [a.path for a in client.list_artifacts(rid, "checkpoint")] == ["checkpoint/checkpoint.pt"]
