"""What one MLflow run carries: its params, metrics, tags and artifacts, built from a study's files.

A `Payload` is everything `harness.results.tracking` logs for one run (a trained model, or the
study's parent run), with a content hash of the files it came from, so logging again skips what
is unchanged. Nothing here talks to MLflow.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.core.config import parse_run_name
from harness.core.records import read_history, read_json_object, read_result
from harness.results.rows import COST_DIR, ci_bounds, num
from harness.core.metric_registry import metrics as registered_metrics
from harness.results.rows import registered_rows
from harness.results.study import all_eval_files, benchmark_files, benchmark_rule, identity_of


#: bump when what a run records changes, so existing runs are logged again
TRACKING_FORMAT = "3"


KEY_TAG = "didbench.key"


HASH_TAG = "didbench.content_hash"


RULE_TAG = "didbench.rule"


STUDY_RUN = "study"


LIVE_TAG = "didbench.live"   # "1" on runs created by harness.results.live while training


PARENT_TAG = "mlflow.parentRunId"


MAX_PARAM_VALUE = 6000     # MLflow's limit on a parameter value


#: train.json keys that are results of the training (logged as metrics, or as the run's times),
#: never params: MLflow's params are a run's inputs, its metrics what it measured
TRAIN_RESULTS = ("final_loss", "wall_seconds", "tokens_per_s", "flops_per_step", "clipped_fraction",
                 "grad_norm_median", "valid_nats_per_token", "valid_ppl", "valid_stderr", "created")


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


def flatten(d, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"}; lists and other values as compact JSON/text."""
    out: dict[str, str] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
            out[key] = text[:MAX_PARAM_VALUE]
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


def plugin_metric_keys(kind: str, values: dict, columns: tuple[str, ...] = ()) -> list:
    """A plugin metric's MLflow metrics: `<kind>/<key>` (flat values) or `<kind>/<key>_<k>steps`
    (per steps), with `_ci95_lo/_hi`: the numbers its table shows (rows.registered_rows)."""
    m: list = []
    for row in registered_rows({}, values, columns):
        steps = row.pop("steps", None)
        suffix = f"_{int(steps)}steps" if steps is not None and math.isfinite(steps) else ""
        for key, value in row.items():
            _add(m, f"{kind}/{key}{suffix}", value)
    return m


def eval_metrics(kind: str, values: dict) -> list:
    """Readable final metrics from one result file's `values` (see module constants; a plugin
    metric's: `plugin_metric_keys`)."""
    metric = registered_metrics().get(kind)
    if metric is not None and metric.plugin:
        return plugin_metric_keys(kind, values, metric.columns)
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
    cost/sample_ratio_to_did_<k>steps (with _min/_max), cost/flops_per_sample_<k>steps and
    cost/flops_per_gen_token_<k>steps (counted, machine-independent) and the curve steps/cost_s_per_sample.
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
        _add(m, f"cost/flops_per_sample_{k}steps", r.get("flops_per_sample"))
        _add(m, f"cost/flops_per_gen_token_{k}steps", r.get("flops_per_gen_token"))
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


def result_times(study_dir: Path) -> list[int]:
    """The `created` times (ms) of a study's result files: every run's eval/*.json and cost/*.json,
    i.e. when each evaluation job finished (unreadable files and missing stamps are skipped)."""
    import datetime as _dt

    out = []
    for path in [*Path(study_dir).glob("runs/*/eval/*.json"), *Path(study_dir).glob(f"{COST_DIR}/*.json")]:
        try:
            created = json.loads(path.read_text()).get("created")
            out.append(int(_dt.datetime.fromisoformat(str(created)).timestamp() * 1000))
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    return out


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
    inputs = {k: v for k, v in train.items() if k not in TRAIN_RESULTS}       # results are metrics, not params
    p.params = {**flatten(run_cfg if isinstance(run_cfg, dict) else {}), **flatten(inputs)}
    files: list[tuple[Path, str | None]] = [(run_dir / f, None) for f in ("train.json", "history.csv", "config.yaml")]
    if checkpoints:
        files.append((run_dir / "checkpoint.pt", "checkpoint"))
    eval_dir = run_dir / "eval"
    for kind in all_eval_files():
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
    _add(p.metrics, "train_flops_per_step", train.get("flops_per_step"))
    _add(p.metrics, "valid_nats_per_token", train.get("valid_nats_per_token"))   # the final validation bound
    _add(p.metrics, "valid_nats_per_token_stderr", train.get("valid_stderr"))
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
    run charts. Its times span the study: its first training's start to its last result's creation."""
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
    # the study's real span: its first training's start to its last result's `created` (file times
    # would say when the files were checked out or re-rendered: days after the study ran)
    ends = [c.end_ms for c in children or [] if c.end_ms] + result_times(study_dir)
    p.end_ms = max(ends) if ends else None
    p.tags = {KEY_TAG: p.key, RULE_TAG: "log", "didbench.format": TRACKING_FORMAT, "didbench.study": study,
              **source_tags(f"snakemake (didbench study {study})"), HASH_TAG: p.content_hash}
    return p
