"""Log a finished study to MLflow: one experiment per study, one parent run ("study") with one
nested run per trained model.

Why one sequential logger: cluster jobs write plain JSON/CSV results (DAG outputs), and this
single local step copies them into MLflow, so no two processes ever write the SQLite store at
once (a lock file in the study directory makes concurrent `log` calls take turns). It is idempotent: every MLflow run carries the tag `didbench.key` = "<study>/<run>" and a
hash of everything it was logged from. A re-run skips runs that are FINISHED with the same hash,
and deletes and re-logs runs that are unfinished (a crash half-way), failed, or stale, so after
any interruption running it again completes the set without duplicates.

Cost: each model run also records its method's row of the study's cost job for its layout
(results/<study>/cost/<layout>.json, metrics `cost/...`, see cost_metrics); the file is one of the
run's artifacts, so it is in the run's content hash and a changed cost file re-logs the runs of
that layout. The study run carries every cost file under `cost/`.

As researchers read it (TRACKING_FORMAT 2): the model runs are nested under the study run
(`mlflow.parentRunId`); each run's Created/Duration are those of its training (train.json), its
Source the command that made it; the held-out reference statistics (the same in every run of a
layout) are params `reference.<layout>.*` of the study run, not metrics of every run; the
experiment carries a saved view "didbench: key metrics" (open it from "Views", or the URL
`harness log` prints) whose table shows the headline numbers. Training logged live
(harness.results.live, when MLFLOW_TRACKING_URI is set) is completed in place: the same run gets its
evaluations, artifacts and content hash, so its system metrics and run id stay.

Store: `sqlite:///<abs study_dir>/mlflow.db` with artifacts under `<study_dir>/mlartifacts`,
unless MLFLOW_TRACKING_URI is set. Browse with
`mlflow ui --backend-store-uri sqlite:///results/<study>/mlflow.db` (run from the repo root).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path


from harness.core.errors import UserError
from harness.results.payloads import (HASH_TAG, KEY_TAG, LIVE_TAG, PARENT_TAG, Payload, clean_key, run_payload,
                                      study_payload)
from harness.results.study import run_dirs


VIEW_ID = "didbench-key-metrics"


VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"


#: the runs-table columns of the saved view (metrics that every study has come first)
KEY_COLUMNS = ["nats_per_token", "ppl", "train/valid_nats_per_token", "train/nats_per_token", "steps/gen_ppl",
               "steps/mauve", "steps/w1", "steps/exact_nll", "cost/train_tokens_per_s", "cost/train_ratio_to_did",
               "train_wall_seconds"]


KEY_TAGS = ["method", "layout", "size", "seed"]


LOCK_FILE = ".mlflow.lock"   # in the study directory: one logger at a time


_MAX_BATCH = 1000           # MLflow's limit on entities per log_batch call


MAX_PARAMS_PER_BATCH = 100


def tracking_uri(study_dir) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite file inside the study directory."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env if env else f"sqlite:///{Path(study_dir).resolve() / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    return uri.split(":", 1)[0] in ("http", "https", "databricks", "uc")


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(name, artifact_location=artifact_location)
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
    # a model-training experiment (MLflow 3 opens others on its GenAI pages)
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    return exp_id


def key_view_state(parent_id: str | None = None, columns: list[str] = KEY_COLUMNS) -> dict:
    """The MLflow UI state of the saved view: key metrics and tags as table columns, the key
    curves as the first chart section. (MLflow does not keep which runs are expanded or hidden
    in a saved view: the study's runs open with the parent's expander, and the parent leaves the
    charts' legends with its eye icon.)"""
    cols = ["attributes.`Source`"] + [f"tags.`{t}`" for t in KEY_TAGS] + [f"metrics.`{c}`" for c in columns]
    return {"selectedColumns": cols, "runsExpanded": {parent_id: True} if parent_id else {},
            "runsHiddenMode": "SHOW_ALL", "hideEmptyCharts": True, **_key_charts(),
            "orderByKey": "attributes.start_time", "orderByAsc": False, "searchFilter": "", "datasetsFilter": [],
            "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "startTime": "ALL"}


#: the curves the view's charts show first, in their own section (the rest follow, grouped by prefix)
KEY_CURVES = ["train/valid_nats_per_token", "train/nats_per_token", "steps/gen_ppl", "steps/w1", "steps/exact_nll"]


def _key_charts() -> dict:
    section = "didbench-curves"
    charts = [{"uuid": f"didbench-{k.replace('/', '-')}", "type": "LINE", "deleted": False, "isGenerated": False,
               "metricSectionId": section, "metricKey": k, "selectedMetricKeys": [k], "xAxisKey": "step",
               "yAxisKey": "metric", "scaleType": "linear", "displayPoints": True, "lineSmoothness": 0,
               "runsCountToCompare": 20, "selectedXAxisMetricKey": ""} for k in KEY_CURVES]
    return {"compareRunSections": [{"uuid": section, "name": "didbench: validation bound, objective, by steps",
                                    "display": True, "isReordered": False}],
            "compareRunCharts": charts}


def set_study_view(client, exp_id: str, study: str, parent_id: str | None = None) -> None:
    """The experiment's description and its saved view "didbench: key metrics" (experiment tags)."""
    now = int(time.time() * 1000)
    envelope = {"name": "didbench: key metrics", "createdAt": now, "updatedAt": now,
                "state": json.dumps(key_view_state(parent_id))}
    client.set_experiment_tag(exp_id, VIEW_TAG, json.dumps(envelope))
    client.set_experiment_tag(exp_id, "mlflow.note.content", (   # Markdown
        f"didbench study `{study}`: the run `study` holds the study config, the reference statistics "
        "(params `reference.LAYOUT.NAME`), `tables/` and `figures/`; each trained model is a run nested under it. "
        "Open the view **didbench: key metrics** (Views) for the headline numbers: `nats_per_token`, `ppl` = the "
        "strict NLL bound on the test split; `train/valid_nats_per_token` = the common validation bound (same rows, "
        "same seed, every method); `steps/NAME` = by sampling steps (the table shows the largest). Training curves: "
        "`train/nats_per_token` (the objective per predicted token, comparable across methods) and "
        "`train/valid_nats_per_token`."))


def view_url(exp_id: str, host: str = "http://127.0.0.1:5000", view: str = VIEW_ID, charts: bool = False) -> str:
    """Where a saved view opens in `mlflow ui` (its default address); `charts`: its charts tab."""
    return f"{host}/#/experiments/{exp_id}/runs?viewStateShareKey={view}" + ("&compareRunsMode=CHART" if charts else "")


def _runs_by_key(client, exp_id: str) -> dict[str, list]:
    """Active runs of the experiment grouped by their didbench.key tag."""
    out: dict[str, list] = {}
    token = None
    while True:
        page = client.search_runs([exp_id], max_results=1000, page_token=token)
        for r in page:
            out.setdefault(r.data.tags.get(KEY_TAG, ""), []).append(r)
        token = page.token
        if not token:
            return out


@contextlib.contextmanager
def _exclusive(path: Path):
    """An exclusive lock on `path` (flock) for the duration of the block.

    Two loggers of one study (a re-run started while another still runs, two workflows on one
    results directory) would both see no run for a key and both log it, or race to create the
    SQLite tables; holding this lock makes them take turns, and the second one then skips.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (one logger at a time is then the user's job)
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def log_payload(client, exp_id: str, p: Payload) -> str:
    """Create one MLflow run from a payload; FINISHED only once everything is written."""
    from mlflow.entities import Metric, RunTag

    run = client.create_run(exp_id, run_name=p.name, tags=p.tags, start_time=p.start_ms)
    rid = run.info.run_id
    try:
        now = int(time.time() * 1000)
        _write_contents(client, rid, p, {clean_key(k): v for k, v in p.params.items()},
                        [Metric(clean_key(k), v, ts if ts is not None else now, s) for k, v, s, ts in p.metrics])
        client.log_batch(rid, tags=[RunTag("didbench.logged_at", time.strftime("%Y-%m-%dT%H:%M:%S"))])
    except BaseException:
        try:
            client.set_terminated(rid, "FAILED")
        finally:
            raise
    client.set_terminated(rid, "FINISHED", end_time=_end_time(p))
    return rid


def _write_contents(client, rid: str, p: Payload, params: dict[str, str], metrics: list) -> None:
    """Params, metrics (mlflow Metric entities) and the payload's artifacts, in MLflow's batch sizes."""
    from mlflow.entities import Param

    for chunk in chunks([Param(k, v) for k, v in params.items()], MAX_PARAMS_PER_BATCH):
        client.log_batch(rid, params=chunk)
    for chunk in chunks(metrics, _MAX_BATCH):
        client.log_batch(rid, metrics=chunk)
    for f, d in p.files:
        client.log_artifact(rid, str(f), d)
    for d, name in p.dirs:
        client.log_artifacts(rid, str(d), name)


def _end_time(p: Payload) -> int:
    return max(p.end_ms or int(time.time() * 1000), p.start_ms or 0)


def complete_live_run(client, run, p: Payload) -> bool:
    """Log payload `p` into `run`, a run harness.results.live created while training; False (nothing
    written) if one of its params has another value than `p`'s (then the caller replaces it).

    The training curve (train/*) the live run already has is not logged again; the content hash
    is the last tag written, so a crash half-way leaves a run that the next `log` completes again.
    """
    from mlflow.entities import Metric, RunTag

    have = run.data.params
    params = {clean_key(k): v for k, v in p.params.items()}
    if any(k in have and have[k] != v for k, v in params.items()):
        return False
    rid = run.info.run_id
    now = int(time.time() * 1000)
    live_curve = any(k.startswith("train/") for k in run.data.metrics)
    metrics = [Metric(clean_key(k), v, ts if ts is not None else now, s) for k, v, s, ts in p.metrics
               if not (live_curve and k.startswith("train/"))]
    _write_contents(client, rid, p, {k: v for k, v in params.items() if k not in have}, metrics)
    tags = {k: v for k, v in p.tags.items() if k != HASH_TAG}
    tags["didbench.logged_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    client.log_batch(rid, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    if run.info.status != "FINISHED" or p.end_ms:
        client.set_terminated(rid, "FINISHED", end_time=max(_end_time(p), run.info.start_time or 0))
    client.set_tag(rid, HASH_TAG, p.content_hash)
    return True


def _sync(client, exp_id: str, p: Payload, existing: list, summary: dict) -> str:
    """Skip if an identical FINISHED run exists, complete a live one, else replace whatever is
    there. Returns the run id that now stands for `p`."""
    good = [r for r in existing if r.info.status == "FINISHED" and r.data.tags.get(HASH_TAG) == p.content_hash]
    if good:
        for r in existing:
            if r.info.run_id != good[0].info.run_id:      # duplicates from an older, non-idempotent log
                client.delete_run(r.info.run_id)
        summary["skipped"].append(p.name)
        return good[0].info.run_id
    live = [r for r in existing if r.data.tags.get(LIVE_TAG) == "1" and HASH_TAG not in r.data.tags]
    if live and complete_live_run(client, live[0], p):
        for r in existing:
            if r.info.run_id != live[0].info.run_id:
                client.delete_run(r.info.run_id)
        summary["completed"].append(p.name)
        return live[0].info.run_id
    for r in existing:
        client.delete_run(r.info.run_id)
    if existing:
        summary["replaced"].append(p.name)
    rid = log_payload(client, exp_id, p)
    summary["logged"].append(p.name)
    return rid


def log_study(study_dir, config: dict | None, checkpoints: bool = False) -> dict:
    """Log every trained run of a study, nested under a "study" run with tables and figures.

    `checkpoints`: also each run's checkpoint.pt as an artifact (config tracking.log_checkpoints).
    Returns {"experiment", "experiment_id", "tracking_uri", "logged", "skipped", "replaced",
    "completed" (live runs finished in place), "runs", "view"} where "runs" is the number of
    model runs now in the experiment for this study and "view" the saved view's URL.
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise UserError(f"study directory {study_dir} does not exist (run the workflow first)")
    with _exclusive(study_dir / LOCK_FILE):
        return _log_study(study_dir, config, checkpoints)


def _log_study(study_dir: Path, config: dict | None, checkpoints: bool = False) -> dict:
    study = str((config or {}).get("study") or study_dir.name)
    uri = tracking_uri(study_dir)
    t0 = int(time.time() * 1000)
    dirs = run_dirs(study_dir)
    # every payload is read (strictly) before MLflow is touched: a bad result file stops here with
    # one line naming it, and never replaces a good run by one without its metrics
    payloads = [run_payload(run_dir, study_dir, study, config, t0, checkpoints) for run_dir in dirs]
    payloads.insert(0, study_payload(study_dir, study, config, len(dirs), payloads))   # the parent first
    if is_server(uri):
        for var, value in HTTP_DEFAULTS.items():   # bounded waits: never hang on a silent server
            os.environ.setdefault(var, value)
    else:
        ensure_store(uri)
    try:
        return _write(uri, study_dir, study, payloads, dirs)
    except Exception as err:
        if not _is_tracking_error(err):
            raise
        raise UserError(f"MLflow at {uri} failed: {first_line(err)}") from None


#: MLflow's HTTP client settings unless the environment sets them: 20 s per request, 2 retries,
#: 1 s backoff factor (about a minute at most before a silent or unreachable server is an error)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}


def _is_tracking_error(err: BaseException) -> bool:
    """An error of the tracking store or the connection to it (not a bug of this module)."""
    names = {c.__name__ for c in type(err).__mro__}
    mods = {c.__module__.split(".")[0] for c in type(err).__mro__}
    return bool(names & {"MlflowException", "RequestException", "ConnectionError", "TimeoutError", "OSError"}
                or mods & {"requests", "urllib3", "sqlalchemy", "sqlite3", "alembic"})


def first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _write(uri: str, study_dir: Path, study: str, payloads: list[Payload], dirs: list[Path]) -> dict:
    from mlflow.tracking import MlflowClient

    artifacts = None if is_server(uri) else (study_dir / "mlartifacts").resolve().as_uri()
    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(client, study, artifacts)
    existing = _runs_by_key(client, exp_id)
    summary = {"experiment": study, "experiment_id": exp_id, "tracking_uri": uri, "logged": [], "skipped": [],
               "replaced": [], "completed": []}
    parent, children = payloads[0], payloads[1:]
    parent_id = _sync(client, exp_id, parent, existing.get(parent.key, []), summary)
    for p in children:
        p.tags[PARENT_TAG] = parent_id
        _sync(client, exp_id, p, existing.get(p.key, []), summary)
    keys = {f"{study}/{d.name}" for d in dirs}
    now_by_key = _runs_by_key(client, exp_id)
    for k in keys:                       # a replaced parent: skipped runs move under the new one
        for r in now_by_key.get(k, []):
            if r.data.tags.get(PARENT_TAG) != parent_id:
                client.set_tag(r.info.run_id, PARENT_TAG, parent_id)
    set_study_view(client, exp_id, study, parent_id)
    summary["runs"] = sum(1 for k, rs in now_by_key.items() if k in keys for _ in rs)
    summary["view"] = view_url(exp_id)
    return summary


def _sqlite_path(uri: str) -> Path | None:
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


def _store_complete(path: Path, head: str) -> bool:
    """True if the SQLite file holds a fully migrated MLflow schema (alembic at the head revision)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            rows = con.execute("SELECT version_num FROM alembic_version").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return [r[0] for r in rows] == [head]


def ensure_store(uri: str) -> None:
    """Create a fresh SQLite store atomically, under a lock shared by every logger of that file.

    MLflow migrates a new SQLite file in dozens of steps; a process killed (or a disk filling up)
    in between leaves a half-built store on which every later run fails, and loggers of several
    studies creating one shared store at once race in alembic. Here the store is built under a
    temporary name and renamed into place, with `<db>.lock` held, so others wait for it. A store
    found half-built (not at MLflow's head revision) is moved aside to `<db>.broken-<time>` and
    built afresh: the JSON results are the source of truth, and the next `log` re-logs them.
    """
    import fcntl

    path = _sqlite_path(uri)
    if path is None:
        return
    from mlflow.store.db.utils import _get_latest_schema_revision

    head = _get_latest_schema_revision()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if path.exists() and _store_complete(path, head):
            return
        if path.exists():
            aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
            os.replace(path, aside)
            import sys

            print(f"mlflow: {path} was half-built (not at schema {head}); moved aside to {aside.name} "
                  "and building a new store (every run is logged again from the JSON results)", file=sys.stderr)
        for old in path.parent.glob(f".{path.name}.*.tmp"):   # left by a killed creation
            old.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = SqlAlchemyStore(f"sqlite:///{tmp}", (path.parent / "mlartifacts").resolve().as_uri())
            store.engine.dispose()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
