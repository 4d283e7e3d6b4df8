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
import csv
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.core.config import parse_run_name
from harness.core.errors import UserError
from harness.core.records import read_history, read_json_object, read_result
from harness.results.study import (ALL_EVAL_FILES, COST_DIR, benchmark_files, benchmark_rule, ci_bounds, identity_of,
                                   num, run_dirs)

#: bump when what a run records changes, so existing runs are logged again
TRACKING_FORMAT = "2"
KEY_TAG = "didbench.key"
HASH_TAG = "didbench.content_hash"
RULE_TAG = "didbench.rule"
STUDY_RUN = "study"
LIVE_TAG = "didbench.live"   # "1" on runs created by harness.results.live while training
PARENT_TAG = "mlflow.parentRunId"
VIEW_ID = "didbench-key-metrics"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
#: the runs-table columns of the saved view (metrics that every study has come first)
KEY_COLUMNS = ["nats_per_token", "ppl", "train/valid_nats_per_token", "train/nats_per_token", "steps/gen_ppl",
               "steps/mauve", "steps/w1", "steps/exact_nll", "cost/train_tokens_per_s", "cost/train_ratio_to_did",
               "train_wall_seconds"]
KEY_TAGS = ["method", "layout", "size", "seed"]
LOCK_FILE = ".mlflow.lock"   # in the study directory: one logger at a time
_MAX_PARAM_VALUE = 6000     # MLflow's limit on a parameter value
_MAX_BATCH = 1000           # MLflow's limit on entities per log_batch call
MAX_PARAMS_PER_BATCH = 100

# result-file keys -> metric names (suffix `_<steps>steps` for per-steps entries)
_BY_STEPS = {
    "genppl": {"gen_ppl": "gen_ppl", "gen_ppl_mean_per_sample": "gen_ppl_mean_per_sample",
               "entropy_nats": "entropy_nats", "entropy_bits": "entropy_bits", "n": "gen_ppl_n"},
    "mauve": {"mauve": "mauve"},
    "diversity": {"entropy_nats": "div_entropy_nats", "entropy_bits": "div_entropy_bits", "distinct_1": "distinct_1",
                  "distinct_2": "distinct_2", "distinct_3": "distinct_3", "self_bleu": "self_bleu"},
    "lengths": {"mean": "len_mean", "sd": "len_sd", "q10": "len_q10", "q50": "len_q50", "q90": "len_q90",
                "w1": "w1", "ks": "ks", "empty_rate": "empty_rate", "max_rate": "max_rate"},
    "exact": {"nats_per_token": "exact_nll", "invalid_fraction": "invalid_fraction",
              "unigram_entropy_mean": "exact_unigram_entropy"},
    "samples": {"n": "n_samples", "mean_length": "mean_length", "nfe": "samples_nfe",
                "seconds_per_sample": "samples_s_per_sample"},
}
_PPL = {"nats_per_token": "nats_per_token", "ppl": "ppl", "stderr": "nats_per_token_stderr",
        "per_sequence_mean": "nats_per_token_seq_mean", "n_sequences": "ppl_n_sequences", "n_tokens": "ppl_n_tokens"}
_SPEED_SAMPLE = {"s_per_sample": "s_per_sample", "nfe": "nfe", "peak_mem_mb": "peak_mem_mb"}
#: per-steps metrics also logged as a curve `steps/<name>` with step = sampling steps
_CURVES = {"gen_ppl", "entropy_nats", "mauve", "w1", "s_per_sample", "distinct_2", "exact_nll", "invalid_fraction"}


@dataclass
class Payload:
    """Everything one MLflow run records, computed before anything is written."""

    name: str
    key: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: list = field(default_factory=list)          # (key, value, step, timestamp_ms)
    tags: dict[str, str] = field(default_factory=dict)
    files: list[tuple[Path, str | None]] = field(default_factory=list)   # (local file, artifact dir)
    dirs: list[tuple[Path, str]] = field(default_factory=list)           # (local dir, artifact dir)
    content_hash: str = ""
    start_ms: int | None = None                                        # the run's Created (training start)
    end_ms: int | None = None
    constants: dict[str, str] = field(default_factory=dict)            # study-level params (reference.*)


# --- store ------------------------------------------------------------------------------------
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


# --- building payloads ----------------------------------------------------------------------------
def flatten(d, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"}; lists and other values as compact JSON/text."""
    out: dict[str, str] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
            out[key] = text[:_MAX_PARAM_VALUE]
    return out


def clean_key(key: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . / space; at most 250 characters)."""
    return re.sub(r"[^\w.\- /]", "_", str(key)).strip("/")[:250] or "_"


def _hash(files: list[Path], extra: dict) -> str:
    h = hashlib.sha256(TRACKING_FORMAT.encode())
    h.update(json.dumps(extra, sort_keys=True).encode())
    for p in sorted(files, key=str):
        h.update(f"{p.parent.name}/{p.name}".encode())   # not the absolute path: a moved study still matches
        h.update(p.read_bytes())
    return h.hexdigest()


def _add(metrics: list, key: str, value, step: int = 0, ts: int | None = None) -> None:
    v = num(value)
    if math.isfinite(v):                      # missing or non-numeric: not logged, never invented
        metrics.append((key, v, int(step), ts))


def eval_metrics(kind: str, values: dict) -> list:
    """Readable final metrics from one result file's `values` (see module constants)."""
    m: list = []
    if kind == "ppl":
        for src, dst in _PPL.items():
            _add(m, dst, values.get(src))
    if kind in _BY_STEPS:
        names = _BY_STEPS[kind]
        for e in values.get("by_steps") or []:
            if not isinstance(e, dict) or not math.isfinite(num(e.get("steps"))):
                continue
            s = int(num(e["steps"]))
            for src, dst in names.items():
                _add(m, f"{dst}_{s}steps", e.get(src))
                if dst in _CURVES:
                    _add(m, f"steps/{dst}", e.get(src), step=s)
            if kind == "genppl" and e.get("ci95") is not None:
                lo, hi = ci_bounds(e.get("gen_ppl"), e.get("ci95"))
                _add(m, f"gen_ppl_ci95_lo_{s}steps", lo)
                _add(m, f"gen_ppl_ci95_hi_{s}steps", hi)
        data = values.get("data")
        if isinstance(data, dict):
            for src, dst in names.items():
                _add(m, f"data/{dst}", data.get(src))
    if kind == "exact":
        gap = values.get("bound_gap") if isinstance(values.get("bound_gap"), dict) else {}
        for part in ("strict", "paper", "exact"):
            g = gap.get(part) if isinstance(gap.get(part), dict) else {}
            name = "exact_nats_per_token" if part == "exact" else f"bound_gap_{part}"
            _add(m, name, g.get("nats_per_token"))
            _add(m, f"{name}_stderr", g.get("stderr"))
        for e in values.get("by_steps") or []:
            lengths = e.get("lengths") if isinstance(e, dict) and isinstance(e.get("lengths"), dict) else {}
            if lengths and math.isfinite(num(e.get("steps"))):
                _add(m, f"length_tv_{int(num(e['steps']))}steps", lengths.get("tv"))
                _add(m, f"length_ks_{int(num(e['steps']))}steps", lengths.get("ks"))
    if kind == "speed":
        train = values.get("train") if isinstance(values.get("train"), dict) else {}
        _add(m, "tokens_per_s", train.get("tokens_per_s"))
        _add(m, "s_per_step", train.get("s_per_step"))
        _add(m, "flops_per_token", values.get("flops_per_token"))
        for e in values.get("sample") or []:
            if isinstance(e, dict) and math.isfinite(num(e.get("steps"))):
                s = int(num(e["steps"]))
                for src, dst in _SPEED_SAMPLE.items():
                    _add(m, f"{dst}_{s}steps", e.get(src))
                    if dst in _CURVES:
                        _add(m, f"steps/{dst}", e.get(src), step=s)
    return m


def cost_metrics(values: dict, method: str) -> list:
    """The `method`'s numbers from its layout's cost/<layout>.json `values` (harness/metrics/cost.py).

    cost/train_s_per_step, cost/train_tokens_per_s, cost/train_ratio_to_did (s/step over the
    reference's, median over repeats, with _min/_max), cost/train_dp_fraction,
    cost/flops_per_token, cost/train_peak_mem_mb; per steps value k: cost/s_per_sample_<k>steps,
    cost/gen_tokens_per_s_<k>steps, cost/nfe_<k>steps, cost/mean_length_<k>steps,
    cost/sample_ratio_to_did_<k>steps (with _min/_max) and the curve steps/cost_s_per_sample.
    """
    m: list = []

    def stat(key: str, d, extremes: bool = False) -> None:
        d = d if isinstance(d, dict) else {}
        _add(m, key, d.get("median"))
        if extremes:
            _add(m, f"{key}_min", d.get("min"))
            _add(m, f"{key}_max", d.get("max"))

    train = values.get("train") if isinstance(values.get("train"), dict) else {}
    for r in train.get("rows") or []:
        if isinstance(r, dict) and r.get("method") == method:
            stat("cost/train_s_per_step", r.get("s_per_step"), True)
            stat("cost/train_tokens_per_s", r.get("tokens_per_s"), True)
            stat("cost/train_ratio_to_did", r.get("ratio"), True)
            stat("cost/train_dp_fraction", r.get("dp_fraction"))
            _add(m, "cost/flops_per_token", r.get("flops_per_token"))
            _add(m, "cost/train_peak_mem_mb", r.get("peak_mem_mb"))
    sample = values.get("sample") if isinstance(values.get("sample"), dict) else {}
    for r in sample.get("rows") or []:
        if not (isinstance(r, dict) and r.get("method") == method and math.isfinite(num(r.get("steps")))):
            continue
        k = int(num(r["steps"]))
        stat(f"cost/s_per_sample_{k}steps", r.get("s_per_sample"), True)
        stat(f"cost/gen_tokens_per_s_{k}steps", r.get("gen_tokens_per_s"))
        stat(f"cost/nfe_{k}steps", r.get("nfe"))
        stat(f"cost/mean_length_{k}steps", r.get("mean_length"))
        stat(f"cost/sample_ratio_to_did_{k}steps", r.get("ratio"), True)
        _add(m, f"cost/sample_peak_mem_mb_{k}steps", r.get("peak_mem_mb"))
        _add(m, "steps/cost_s_per_sample", (r.get("s_per_sample") or {}).get("median")
             if isinstance(r.get("s_per_sample"), dict) else None, step=k)
    return m


def cost_file(study_dir: Path, layout) -> Path:
    """results/<study>/cost/<layout>.json (may not exist)."""
    return Path(study_dir) / COST_DIR / f"{layout}.json"


def history_metrics(path: Path, t0_ms: int) -> list:
    """The training curve: `train/<column>` at each logged step (timestamps follow wall_time)."""
    m: list = []
    if not path.is_file():
        return m
    for row in read_history(path):             # a cut or binary file is one UserError, not lost points
        step = num(row.get("step"))
        if not math.isfinite(step):
            continue
        wall = num(row.get("wall_time"))
        ts = t0_ms + int(1000 * wall) if math.isfinite(wall) else t0_ms
        for col, value in row.items():
            if col not in ("step", "wall_time") and col:
                _add(m, f"train/{col}", value, step=int(step), ts=ts)
    return m


def training_times(train: dict, fallback_ms: int) -> tuple[int, int]:
    """(start, end) of the training in ms: end = train.json `created`, start = end - wall_seconds."""
    import datetime as _dt

    try:
        end = int(_dt.datetime.fromisoformat(str(train["created"])).timestamp() * 1000)
    except (KeyError, TypeError, ValueError):
        return fallback_ms, fallback_ms
    wall = num(train.get("wall_seconds"))
    return (end - int(1000 * wall) if math.isfinite(wall) and wall >= 0 else end), end


def source_tags(name: str) -> dict[str, str]:
    return {"mlflow.source.name": name, "mlflow.source.type": "LOCAL",
            "mlflow.user": os.environ.get("USER") or os.environ.get("LOGNAME") or "didbench"}


def run_payload(run_dir: Path, study_dir: Path, study: str, config: dict | None, t0_ms: int,
                checkpoints: bool = False) -> Payload:
    """What the MLflow run of one trained model records (`checkpoints`: also checkpoint.pt)."""
    train = read_json_object(run_dir / "train.json", "training summary") if (run_dir / "train.json").is_file() else {}
    start_ms, end_ms = training_times(train, t0_ms)
    cfg_path = run_dir / "config.yaml"
    try:
        run_cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else config
    except yaml.YAMLError:
        run_cfg = config                       # unreadable run config: the study config stands in
    ident = {**parse_run_name(run_dir.name), **identity_of(train)}
    p = Payload(name=run_dir.name, key=f"{study}/{run_dir.name}")
    p.params = {**flatten(run_cfg if isinstance(run_cfg, dict) else {}), **flatten(train)}
    files: list[tuple[Path, str | None]] = [(run_dir / f, None) for f in ("train.json", "history.csv", "config.yaml")]
    if checkpoints:
        files.append((run_dir / "checkpoint.pt", "checkpoint"))
    eval_dir = run_dir / "eval"
    for kind in ALL_EVAL_FILES:
        path = eval_dir / f"{kind}.json"
        result = read_result(path, kind) if path.is_file() else None   # a bad file stops the logger
        if result is not None:
            values = result.get("values") if isinstance(result.get("values"), dict) else {}
            p.metrics += eval_metrics(kind, values)
            for k in ("git_commit", "device", "config_hash"):
                ident.setdefault(k, result.get(k))
    if eval_dir.is_dir():
        files += [(f, "eval") for f in sorted(eval_dir.iterdir()) if f.suffix in (".json", ".jsonl") and f.is_file()]
    if ident.get("layout") and ident.get("method"):     # the study's cost job of this run's layout
        cost = cost_file(study_dir, ident["layout"])
        result = read_result(cost, "cost") if cost.is_file() else None
        if result is not None:
            values = result.get("values") if isinstance(result.get("values"), dict) else {}
            p.metrics += cost_metrics(values, ident["method"])
            files.append((cost, "cost"))                 # an artifact, and in the content hash
    bench_root = Path(study_dir) / "benchmarks"
    for b in benchmark_files(study_dir, run_dir.name):
        rel = b.relative_to(bench_root).parent
        files.append((b, "benchmarks" if rel == Path(".") else f"benchmarks/{rel.as_posix()}"))
        rule = benchmark_rule(b, bench_root, run_dir.name)
        _add(p.metrics, f"job_s/{rule}", _tsv_first(b, "s"))
        _add(p.metrics, f"job_max_rss_mb/{rule}", _tsv_first(b, "max_rss"))
    _add(p.metrics, "final_loss", train.get("final_loss"))
    _add(p.metrics, "train_wall_seconds", train.get("wall_seconds"))
    _add(p.metrics, "train_loop_tokens_per_s", train.get("tokens_per_s"))
    _add(p.metrics, "clipped_fraction", train.get("clipped_fraction"))       # of all steps (history: per window)
    _add(p.metrics, "grad_norm_median", train.get("grad_norm_median"))       # before clipping
    p.metrics += history_metrics(run_dir / "history.csv", start_ms)
    p.start_ms, p.end_ms = start_ms, end_ms
    # the held-out reference rows (data/*) are the same in every run of a layout: study params
    layout = ident.get("layout") or "all"
    p.constants = {f"reference.{layout}.{k[len('data/'):]}": repr(round(v, 6)) if isinstance(v, float) else str(v)
                   for k, v, _, _ in p.metrics if k.startswith("data/")}
    p.metrics = [m for m in p.metrics if not m[0].startswith("data/")]
    p.files = [(f, d) for f, d in files if f.is_file()]
    for k in ("git_commit", "device", "config_hash"):
        ident[k] = train.get(k, ident.get(k))
    p.tags = {KEY_TAG: p.key, RULE_TAG: "train", "didbench.format": TRACKING_FORMAT, "didbench.study": study,
              **source_tags(f"python -m harness train ({run_dir.name})"),
              **{k: str(v) for k, v in ident.items() if v is not None}}
    if ident.get("git_commit"):
        p.tags["mlflow.source.git.commit"] = str(ident["git_commit"])
    p.content_hash = _hash([f for f, _ in p.files], p.params)
    p.tags[HASH_TAG] = p.content_hash
    return p


def _tsv_first(path: Path, col: str):
    try:
        with open(path, newline="") as f:
            row = next(csv.DictReader(f, delimiter="\t"), {})
        return row.get(col)
    except OSError:
        return None


def study_payload(study_dir: Path, study: str, config: dict | None, n_runs: int,
                  children: list[Payload] | None = None) -> Payload:
    """The study-level (parent) run: the study config and the reference statistics of its runs
    as params, tables/, figures/ and summary.md as artifacts; no metrics, so it stays out of the
    run charts. Its times span its runs' trainings."""
    p = Payload(name=STUDY_RUN, key=f"{study}/{STUDY_RUN}")
    p.params = flatten(config or {})
    for child in children or []:
        for k, v in child.constants.items():
            p.params.setdefault(k, v)
    p.params["n_runs"] = str(n_runs)
    starts = [c.start_ms for c in children or [] if c.start_ms is not None]
    p.start_ms = min(starts) if starts else None
    for sub in ("tables", "figures", "paper", "bench", COST_DIR):
        if (study_dir / sub).is_dir():
            p.dirs.append((study_dir / sub, sub))
    p.files = [(f, None) for f in (study_dir / "summary.md", study_dir / "data" / "manifest.json") if f.is_file()]
    hashed = [f for f, _ in p.files] + [f for d, _ in p.dirs for f in d.rglob("*") if f.is_file()]
    p.content_hash = _hash(hashed, {"params": p.params, "n_runs": n_runs})
    ends = [int(f.stat().st_mtime * 1000) for f in hashed] + [c.end_ms for c in children or [] if c.end_ms]
    p.end_ms = max(ends) if ends else None            # when its last table or run was made, not the log time
    p.tags = {KEY_TAG: p.key, RULE_TAG: "log", "didbench.format": TRACKING_FORMAT, "didbench.study": study,
              **source_tags(f"snakemake (didbench study {study})"), HASH_TAG: p.content_hash}
    return p


# --- writing ------------------------------------------------------------------------------------
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


# --- the SQLite store: built whole, once ------------------------------------------------------------
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
