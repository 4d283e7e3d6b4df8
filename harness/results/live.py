"""Live MLflow logging while a model trains: the curve appears as it is made.

Only when MLFLOW_TRACKING_URI is set (and DIDBENCH_MLFLOW_LIVE is not "0"): a tracking server is
the intended target, since every training job of a study writes at once (SQLite serialises
them; use a server on a cluster). The run is the same MLflow run that `harness log` completes
afterwards (harness.results.tracking.complete_live_run): same `didbench.key` tag, nested under the
study's parent run, so evaluations, artifacts and the content hash are added to it and its
system metrics and run id stay.

Tracking is never allowed to stop a training: every MLflow error prints one warning line and
turns live logging off for the rest of the run; the JSON/CSV results stay the source of truth.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from harness.results import payloads, tracking

LIVE_ENV = "DIDBENCH_MLFLOW_LIVE"
SYSTEM_METRICS_ENV = "DIDBENCH_MLFLOW_SYSTEM_METRICS"   # "0": no system metrics (CPU, memory, GPU)


def enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI")) and os.environ.get(LIVE_ENV, "1") != "0"


class LiveRun:
    """One training's MLflow run, fed history rows as they are written."""

    def __init__(self, client, run_id: str, monitor=None):
        self.client, self.run_id, self.monitor = client, run_id, monitor

    # --- start -----------------------------------------------------------------------------
    @classmethod
    def start(cls, config: dict, info: dict, out_dir, start_step: int) -> "LiveRun | None":
        """The live run of training `info["run"]` (created, or reopened when resuming), or None."""
        if not enabled():
            return None
        try:
            return cls._start(config, info, Path(out_dir), start_step)
        except Exception as err:  # noqa: BLE001 - tracking must not stop a training
            _warn(f"live MLflow logging off ({type(err).__name__}: {tracking.first_line(err)})")
            return None

    @classmethod
    def _start(cls, config: dict, info: dict, out_dir: Path, start_step: int) -> "LiveRun":
        from mlflow.tracking import MlflowClient

        uri = os.environ["MLFLOW_TRACKING_URI"]
        study_dir = out_dir.resolve().parent.parent            # results/<study>/runs/<run>
        study = str(config.get("study") or study_dir.name)
        if tracking.is_server(uri):
            for var, value in tracking.HTTP_DEFAULTS.items():
                os.environ.setdefault(var, value)
        else:
            tracking.ensure_store(uri)
        client = MlflowClient(tracking_uri=uri)
        artifacts = None if tracking.is_server(uri) else (study_dir / "mlartifacts").resolve().as_uri()
        exp_id = tracking.ensure_experiment(client, study, artifacts)
        parent = _find(client, exp_id, f"{study}/{payloads.STUDY_RUN}")
        if parent is None:
            parent = client.create_run(exp_id, run_name=payloads.STUDY_RUN, tags={
                payloads.KEY_TAG: f"{study}/{payloads.STUDY_RUN}", payloads.LIVE_TAG: "1",
                "didbench.study": study, payloads.RULE_TAG: "log"})
        key = f"{study}/{info['run']}"
        run = _find(client, exp_id, key, live_only=True)
        if run is not None and start_step > 0:                 # a resumed training: the same run
            client.update_run(run.info.run_id, status="RUNNING")
            rid = run.info.run_id
        else:
            if run is not None:                                   # a restart from scratch: a new curve
                client.delete_run(run.info.run_id)
            tags = {payloads.KEY_TAG: key, payloads.LIVE_TAG: "1", payloads.RULE_TAG: "train",
                    payloads.PARENT_TAG: parent.info.run_id, "didbench.study": study,
                    "didbench.format": payloads.TRACKING_FORMAT,
                    **payloads.source_tags(f"python -m harness train ({info['run']})"),
                    **{k: str(info[k]) for k in ("method", "layout", "size", "seed", "config_hash") if k in info}}
            rid = client.create_run(exp_id, run_name=info["run"], tags=tags).info.run_id
            params = payloads.flatten(config)
            from mlflow.entities import Param

            items = [Param(payloads.clean_key(k), v) for k, v in params.items()]
            for chunk in tracking.chunks(items, tracking.MAX_PARAMS_PER_BATCH):
                client.log_batch(rid, params=chunk)
        monitor = None
        if os.environ.get(SYSTEM_METRICS_ENV, "1") != "0":
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                monitor = SystemMetricsMonitor(rid, sampling_interval=10, resume_logging=start_step > 0,
                                               tracking_uri=uri)
                monitor.start()
            except Exception as err:  # noqa: BLE001 - psutil missing, no GPU library, ...
                _warn(f"no MLflow system metrics ({type(err).__name__}: {tracking.first_line(err)})")
                monitor = None
        print(f"{info['run']}: logging live to MLflow run {rid} at {uri}", flush=True)
        return cls(client, rid, monitor)

    # --- logging ---------------------------------------------------------------------------
    def log_row(self, row: dict) -> None:
        """One history row as `train/<column>` at its step (the names `harness log` uses)."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        step, now = int(row["step"]), int(time.time() * 1000)
        metrics = []
        for col, value in row.items():
            if col in ("step", "wall_time"):
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if v == v and abs(v) != float("inf"):
                metrics.append(Metric(payloads.clean_key(f"train/{col}"), v, now, step))
        self._call(self.client.log_batch, self.run_id, metrics=metrics)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED; KILLED when preempted: a resume reopens it)."""
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception:  # noqa: BLE001
                pass
            self.monitor = None
        if self.client is not None:
            self._call(self.client.set_terminated, self.run_id, status)
            self.client = None

    def _call(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must not stop a training
            _warn(f"live MLflow logging off ({type(err).__name__}: {tracking.first_line(err)})")
            self.client = None


def _find(client, exp_id: str, key: str, live_only: bool = False):
    """The active run with didbench.key `key` (a live one without content hash if `live_only`)."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`{payloads.KEY_TAG}` = '{key}'", max_results=50)
    if live_only:
        runs = [r for r in runs if r.data.tags.get(payloads.LIVE_TAG) == "1" and payloads.HASH_TAG not in r.data.tags]
    return runs[0] if runs else None


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)
