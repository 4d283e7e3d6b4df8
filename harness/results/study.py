"""Load every result of one study into tidy pandas DataFrames.

Why here, in the harness: which files a study writes and what their keys mean is harness
knowledge (it sits beside the result schema of harness/core/records.py). MLflow logging
(harness/results/tracking.py) and the tables and figures (analysis/) all read the same files through
this one module, so the harness never imports the analysis and a change to a table cannot break
logging. It tolerates a study that skipped an evaluation or a method without some output:
everything missing simply yields no rows (never a made-up number), and unreadable files are
recorded in `Study.problems`.

Layout read (see docs/architecture.md): results/<study>/data/manifest.json,
runs/<run>/{train.json, history.csv, config.yaml, eval/*.json}, cost/<layout>.json (the study's
interleaved cost job, harness/metrics/cost.py), benchmarks/**/*.tsv, bench/*.json.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.core.config import load_config, parse_run_name, run_entries, run_settings_hash, study_runs
from harness.core.errors import UserError
from harness.core.records import read_history as read_history_rows, read_json_object, read_result

#: identity columns every per-run frame starts with
ID = ["run", "method", "layout", "size", "seed"]
#: group key for aggregation over seeds
GROUP = ["method", "layout", "size"]
#: evaluation files every run of a default study has, in the order a study produces them
EVAL_FILES = ("ppl", "samples", "genppl", "mauve", "diversity", "lengths")
#: opt-in per-run evaluations (evaluate.metrics; zeroshot: evaluate.zeroshot.datasets, fixed-length
#: runs): read when present, never reported as missing
OPTIONAL_EVAL_FILES = ("speed", "exact", "zeroshot")
#: every per-run evaluation file the loaders read
ALL_EVAL_FILES = EVAL_FILES + OPTIONAL_EVAL_FILES
#: study-level cost files: results/<study>/cost/<layout>.json (harness/metrics/cost.py)
COST_DIR = "cost"



@dataclass
class Study:
    """All results of one study. Every frame may be empty; per-run frames start with `ID`."""

    root: Path
    name: str
    corpus: str | None = None
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    ppl: pd.DataFrame = field(default_factory=pd.DataFrame)
    genppl: pd.DataFrame = field(default_factory=pd.DataFrame)
    genppl_data: pd.DataFrame = field(default_factory=pd.DataFrame)
    mauve: pd.DataFrame = field(default_factory=pd.DataFrame)
    diversity: pd.DataFrame = field(default_factory=pd.DataFrame)
    diversity_data: pd.DataFrame = field(default_factory=pd.DataFrame)
    lengths: pd.DataFrame = field(default_factory=pd.DataFrame)
    lengths_data: pd.DataFrame = field(default_factory=pd.DataFrame)
    length_hist: pd.DataFrame = field(default_factory=pd.DataFrame)
    samples: pd.DataFrame = field(default_factory=pd.DataFrame)
    speed_train: pd.DataFrame = field(default_factory=pd.DataFrame)
    speed_sample: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: synthetic corpora (exact.json): per steps, the data row, and the bound gap per run
    exact: pd.DataFrame = field(default_factory=pd.DataFrame)
    exact_data: pd.DataFrame = field(default_factory=pd.DataFrame)
    exact_samples: pd.DataFrame = field(default_factory=pd.DataFrame)   # one row per sample: logp, n_tokens, length
    bound_gap: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: the exact length law of a synthetic varlen corpus: P(length = n), n = 0, 1, ...
    length_pmf: list = field(default_factory=list)
    #: the interleaved cost job (cost/<layout>.json), one row per (method, layout, size): COST_TRAIN_COLS
    cost_train: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: the same per (method, layout, size, steps): COST_SAMPLE_COLS
    cost_sample: pd.DataFrame = field(default_factory=pd.DataFrame)
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    benchmarks: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: per-sequence bounds (ID + index, n_tokens, strict, paper): the same rows for every method
    ppl_seq: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: per-sample evaluator scores (ID + steps, sample, nll, n_targets, entropy_nats)
    genppl_samples: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: zero-shot bounds (zeroshot.json), one row per (run, dataset): ID + dataset, the ppl columns,
    #: paper_*, paper_seq_len_ppl, documents, source, detokenizer; a missing set has its `reason`
    zeroshot: pd.DataFrame = field(default_factory=pd.DataFrame)
    problems: list[str] = field(default_factory=list)
    #: runs the study's config lists that have no training summary (not trained, or deleted)
    missing_runs: list[str] = field(default_factory=list)


# --- small readers ---------------------------------------------------------------------------
def read_json(path: Path, problems: list[str]) -> dict | None:
    """The parsed JSON object at `path`, or None if absent; a broken file is noted, not raised."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable JSON ({exc})")
        return None
    if not isinstance(obj, dict):
        problems.append(f"{path}: expected a JSON object")
        return None
    return obj




def num(x) -> float:
    """A float, or NaN for anything that is not a finite-or-infinite number (None, text, lists)."""
    if isinstance(x, bool) or x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def ci_bounds(value, ci) -> tuple[float, float]:
    """(low, high) of a confidence interval given as [lo, hi] or as a half-width around `value`."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return num(ci[0]), num(ci[1])
    h = num(ci)
    v = num(value)
    return v - h, v + h


def identity_of(src: dict | None) -> dict:
    """The identity keys (method, layout, size, seed) that a train.json or a result header gives.

    A run's `method` in a study's tables, figures and MLflow is its label (harness.core.config.run_label:
    the method unless the run names one), so DID-S and DID-F, or the points of a sweep, are rows
    of their own; `base_method` is the registered method behind it.
    """
    src = src or {}
    out = {k: src[k] for k in ("layout", "size", "seed") if src.get(k) is not None}
    if src.get("method") is not None:
        out["method"] = src.get("label") or src["method"]
        out["base_method"] = src["method"]
    return out


def _identity(run_dir: Path, train: dict | None, result: dict | None) -> dict:
    """Run identity from the result file, else train.json, else the run directory name."""
    ident = {"run": run_dir.name, **parse_run_name(run_dir.name)}
    for src in (train, result):
        ident.update(identity_of(src))
    for k in ID:
        ident.setdefault(k, None)
    return ident


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def restore_nonfinite(result: dict | None) -> list[str]:
    """Put back the non-finite numbers a result file stored as null (its `nonfinite` map,
    harness.core.records.nonfinite_paths), so inf stays inf and NaN is NaN, not "missing"; returns the
    paths restored (the loader lists them as problems: a non-finite result is never averaged away)."""
    if not isinstance(result, dict) or not isinstance(result.get("nonfinite"), dict):
        return []
    restored = []
    for path, kind in result["nonfinite"].items():
        parts = [int(i) if i else k for k, i in _PATH_PART.findall(str(path))]
        node = result
        try:
            for part in parts[:-1]:
                node = node[part]
            if node[parts[-1]] is None:
                node[parts[-1]] = {"inf": math.inf, "-inf": -math.inf}.get(kind, math.nan)
                restored.append(str(path))
        except (KeyError, IndexError, TypeError):
            continue
    return restored


def _values(result: dict | None) -> dict:
    v = (result or {}).get("values")
    return v if isinstance(v, dict) else {}


def _rows_by_steps(ident: dict, values: dict, keys: tuple[str, ...], cis: tuple[str, ...] = ()) -> list[dict]:
    """One row per by_steps entry: `keys`, and `<k>_ci95_lo/hi` for each k of `cis` (from `<k>_ci95`)."""
    rows = []
    for entry in values.get("by_steps") or []:
        if isinstance(entry, dict):
            rows.append({**ident, "steps": num(entry.get("steps")), **{k: num(entry.get(k)) for k in keys},
                         **_cis(entry, cis)})
    return rows


def _cis(entry: dict, keys: tuple[str, ...]) -> dict:
    out = {}
    for k in keys:
        ci = entry.get(f"{k}_ci95", entry.get("entropy_ci95") if k == "entropy_nats" else None)
        lo, hi = ci_bounds(entry.get(k), ci)
        out.update({f"{k}_ci95_lo": lo, f"{k}_ci95_hi": hi})
    return out


# --- per-file loaders: each returns rows for one or more frames ------------------------------
_GENPPL_KEYS = ("gen_ppl", "gen_ppl_mean_per_sample", "entropy_nats", "entropy_bits", "n")
_DIVERSITY_KEYS = ("entropy_nats", "entropy_bits", "distinct_1", "distinct_2", "distinct_3", "self_bleu")
_LENGTH_KEYS = ("mean", "sd", "q10", "q50", "q90", "w1", "ks", "empty_rate", "max_rate", "content_after_pad_rate")
_DIVERSITY_CIS = ("entropy_nats", "distinct_1", "distinct_2", "distinct_3", "self_bleu")
_LENGTH_CIS = ("mean", "w1", "ks")
_PPL_KEYS = ("nats_per_token", "ppl", "stderr", "per_sequence_mean", "n_sequences", "n_tokens")


def _ci(entry: dict, key: str, value_key: str, prefix: str) -> dict:
    lo, hi = ci_bounds(entry.get(value_key), entry.get(key)) if entry.get(key) is not None else (math.nan, math.nan)
    return {f"{prefix}_lo": lo, f"{prefix}_hi": hi}


def _genppl_row(base: dict, entry: dict) -> dict:
    row = {**base, **{k: num(entry.get(k)) for k in _GENPPL_KEYS}, **_ci(entry, "ci95", "gen_ppl", "ci95"),
           **_ci(entry, "entropy_ci95", "entropy_nats", "entropy_ci95")}
    matched = entry.get("length_matched_data")
    if isinstance(matched, dict):   # held-out text cut to the samples' lengths (same steps)
        row.update({"lm_gen_ppl": num(matched.get("gen_ppl")), **_ci(matched, "ci95", "gen_ppl", "lm_ci95"),
                    "lm_entropy_nats": num(matched.get("entropy_nats")),
                    **_ci(matched, "entropy_ci95", "entropy_nats", "lm_entropy_ci95"),
                    "lm_n_short": num(matched.get("n_short"))})
    return row


def _per_sample_rows(base: dict, per: dict | None, keys: tuple[str, ...]) -> list[dict]:
    """Tidy rows (one per sample) from a {key: [values]} block; empty if absent or ragged."""
    if not isinstance(per, dict):
        return []
    cols = [per.get(k) for k in keys]
    if any(not isinstance(c, list) for c in cols) or len({len(c) for c in cols}) != 1:
        return []
    return [{**base, "sample": i, **{k: num(c[i]) for k, c in zip(keys, cols)}} for i in range(len(cols[0]))]


def _load_genppl(ident, values, out):
    keys = ("nll", "n_targets", "entropy_nats")
    for entry in values.get("by_steps") or []:
        if isinstance(entry, dict):
            base = {**ident, "steps": num(entry.get("steps"))}
            out["genppl"].append(_genppl_row(base, entry))
            out["genppl_samples"] += _per_sample_rows(base, entry.get("per_sample"), keys)
    if isinstance(values.get("data"), dict):
        out["genppl_data"].append(_genppl_row(dict(ident), values["data"]))


def _load_lengths(ident, values, out):
    out["lengths"] += _rows_by_steps(ident, values, _LENGTH_KEYS, _LENGTH_CIS)
    if isinstance(values.get("data"), dict):
        out["lengths_data"].append({**ident, **{k: num(values["data"].get(k)) for k in _LENGTH_KEYS[:5]},
                                    **_cis(values["data"], ("mean",))})
    hist = values.get("histogram")
    if not isinstance(hist, dict):
        return
    bins = [num(b) for b in hist.get("bins") or []]
    series = [(str(s), c) for s, c in (hist.get("samples") or {}).items()]
    if hist.get("data") is not None:
        series.append(("data", hist["data"]))
    for steps, counts in series:
        counts = [num(c) for c in counts or []]
        if len(bins) == len(counts) + 1:          # bins are edges
            edges = list(zip(bins[:-1], bins[1:]))
        elif len(bins) == len(counts):            # bins are left edges / integer lengths
            edges = [(b, b + 1) for b in bins]
        else:
            out["problems"].append(f"{ident['run']}: lengths histogram has {len(bins)} bins for {len(counts)} counts")
            continue
        source = "data" if steps == "data" else "model"
        for (lo, hi), c in zip(edges, counts):
            out["length_hist"].append({**ident, "source": source, "steps": math.nan if source == "data" else num(steps),
                                       "bin_lo": lo, "bin_hi": hi, "count": c})


def _load_speed(ident, values, out):
    train = values.get("train") if isinstance(values.get("train"), dict) else {}
    out["speed_train"].append({**ident, "tokens_per_s": num(train.get("tokens_per_s")),
                               "s_per_step": num(train.get("s_per_step")),
                               "flops_per_token": num(values.get("flops_per_token"))})
    for entry in values.get("sample") or []:
        if isinstance(entry, dict):
            out["speed_sample"].append({**ident, "steps": num(entry.get("steps")),
                                        **{k: num(entry.get(k)) for k in ("s_per_sample", "nfe", "peak_mem_mb")}})


# --- the study's cost files ---------------------------------------------------------------------
#: columns of Study.cost_train (after the ID columns: the run whose checkpoint was measured)
COST_TRAIN_COLS = [
    "s_per_step_min", "s_per_step_median", "s_per_step_max", "tokens_per_s_min", "tokens_per_s_median",
    "tokens_per_s_max", "ratio_min", "ratio_median", "ratio_max", "reference", "dp_fraction_median",
    "flops_per_token", "peak_mem_mb", "params", "batch_size", "clean_tokens", "repeats", "precision", "device",
    "threads", "wall_seconds", "file"]
#: columns of Study.cost_sample (after the ID columns)
COST_SAMPLE_COLS = [
    "steps", "n", "s_per_sample_min", "s_per_sample_median", "s_per_sample_max", "gen_tokens_per_s_min",
    "gen_tokens_per_s_median", "gen_tokens_per_s_max", "nfe", "nfe_min", "nfe_max", "mean_length",
    "mean_length_min", "mean_length_max", "ratio_min", "ratio_median", "ratio_max", "reference", "peak_mem_mb",
    "repeats", "device", "threads", "file"]


def _stat(d, prefix: str) -> dict:
    """{prefix_min, prefix_median, prefix_max} from a {min, median, max} dict (NaN where absent)."""
    d = d if isinstance(d, dict) else {}
    return {f"{prefix}_{k}": num(d.get(k)) for k in ("min", "median", "max")}


def _cost_ident(row: dict, values: dict, layout) -> dict:
    run = row.get("run")
    ident = {"run": run, **(parse_run_name(run) if isinstance(run, str) else {})}
    ident.update({"method": row.get("method"), "layout": layout,
                  "size": row.get("size") or values.get("size") or ident.get("size")})
    ident.setdefault("seed", None)
    return {k: ident.get(k) for k in ID}


def cost_files(study_dir) -> list[Path]:
    """results/<study>/cost/*.json, sorted."""
    root = Path(study_dir) / COST_DIR
    return sorted(p for p in root.glob("*.json") if p.is_file()) if root.is_dir() else []


def _load_cost(path: Path, obj: dict, out: dict) -> None:
    """Rows of cost_train / cost_sample from one cost/<layout>.json (see docs/architecture.md)."""
    values = _values(obj)
    layout = values.get("layout") or obj.get("layout") or path.stem
    ref = values.get("reference")
    common = {"device": values.get("device") or obj.get("device"), "threads": num(values.get("threads")),
              "file": str(path)}
    train = values.get("train") if isinstance(values.get("train"), dict) else {}
    for r in train.get("rows") or []:
        if not isinstance(r, dict):
            continue
        dp = r.get("dp_fraction") if isinstance(r.get("dp_fraction"), dict) else {}
        out["cost_train"].append({
            **_cost_ident(r, values, layout), **_stat(r.get("s_per_step"), "s_per_step"),
            **_stat(r.get("tokens_per_s"), "tokens_per_s"), **_stat(r.get("ratio"), "ratio"), "reference": ref,
            "dp_fraction_median": num(dp.get("median")), "flops_per_token": num(r.get("flops_per_token")),
            "peak_mem_mb": num(r.get("peak_mem_mb")), "params": num(r.get("params")),
            "batch_size": num(train.get("batch_size")), "clean_tokens": num(train.get("clean_tokens")),
            "repeats": num(train.get("repeats")), "precision": train.get("precision"),
            "wall_seconds": num(values.get("wall_seconds")), **common})
    sample = values.get("sample") if isinstance(values.get("sample"), dict) else {}
    for r in sample.get("rows") or []:
        if not isinstance(r, dict):
            continue
        nfe, length = _stat(r.get("nfe"), "nfe"), _stat(r.get("mean_length"), "mean_length")
        gen = _stat(r.get("gen_tokens_per_s"), "gen_tokens_per_s")
        out["cost_sample"].append({
            **_cost_ident(r, values, layout), "steps": num(r.get("steps")), "n": num(r.get("n", sample.get("n"))),
            **_stat(r.get("s_per_sample"), "s_per_sample"), **gen,
            "nfe": nfe["nfe_median"], "nfe_min": nfe["nfe_min"], "nfe_max": nfe["nfe_max"],
            "mean_length": length["mean_length_median"], "mean_length_min": length["mean_length_min"],
            "mean_length_max": length["mean_length_max"], **_stat(r.get("ratio"), "ratio"), "reference": ref,
            "peak_mem_mb": num(r.get("peak_mem_mb")), "repeats": num(sample.get("repeats")), **common})


_EXACT_KEYS = ("n", "nats_per_token", "stderr", "invalid", "invalid_fraction", "unigram_entropy_mean")


def _exact_row(base: dict, entry: dict) -> dict:
    lo, hi = (entry.get("invalid_ci95") or [math.nan, math.nan])[:2]
    lengths = entry.get("lengths") if isinstance(entry.get("lengths"), dict) else {}
    null = lengths.get("null") if isinstance(lengths.get("null"), dict) else {}
    docs = entry.get("documents") if isinstance(entry.get("documents"), dict) else {}   # fixed layout
    dlo, dhi = (docs.get("invalid_ci95") or [math.nan, math.nan])[:2]
    return {**base, **{k: num(entry.get(k)) for k in _EXACT_KEYS}, "invalid_ci95_lo": num(lo),
            "invalid_ci95_hi": num(hi), **{f"len_{k}": num(lengths.get(k)) for k in ("mean", "tv", "ks", "tv_p", "ks_p")},
            **{f"len_null_{k}": num(null.get(k)) for k in ("tv_mean", "tv_q95", "ks_mean", "ks_q95")},
            **{f"doc_{k}": num(docs.get(k)) for k in ("n", "nats_per_token", "stderr", "invalid_fraction")},
            "doc_invalid_ci95_lo": num(dlo), "doc_invalid_ci95_hi": num(dhi)}


def _load_exact(ident, values, out):
    for entry in values.get("by_steps") or []:
        if isinstance(entry, dict):
            base = {**ident, "steps": num(entry.get("steps"))}
            out["exact"].append(_exact_row(base, entry))
            lengths = entry.get("lengths") if isinstance(entry.get("lengths"), dict) else {}
            per = {"logp": entry.get("logp"), "n_tokens": entry.get("n_tokens_per_sample")}
            if isinstance(lengths.get("values"), list):
                per["length"] = lengths["values"]
            out["exact_samples"] += _per_sample_rows(base, per, tuple(per))
    if isinstance(values.get("length_pmf"), list) and not out["length_pmf"]:
        out["length_pmf"] = [num(p) for p in values["length_pmf"]]
    if isinstance(values.get("data"), dict):
        out["exact_data"].append(_exact_row(dict(ident), values["data"]))
    gap = values.get("bound_gap") if isinstance(values.get("bound_gap"), dict) else {}
    row = dict(ident)
    for part in ("strict", "paper", "exact"):
        g = gap.get(part) if isinstance(gap.get(part), dict) else {}
        row.update({f"{part}_{k}": num(g.get(k)) for k in ("nats_per_token", "stderr", "n_sequences")})
        if part != "exact":
            row[f"{part}_negative_rows"] = num(g.get("negative_rows"))
    valid = values.get("valid_subset") if isinstance(values.get("valid_subset"), dict) else {}
    row["valid_exact_nats_per_token"] = num(valid.get("nats_per_token"))
    out["bound_gap"].append(row)


def _load_zeroshot(ident: dict, values: dict, out: dict) -> None:
    sets = values.get("datasets") if isinstance(values.get("datasets"), dict) else {}
    for name, v in sets.items():
        if not isinstance(v, dict):
            continue
        paper = v.get("paper_convention") if isinstance(v.get("paper_convention"), dict) else {}
        per_len = paper.get("divided_by_seq_len") if isinstance(paper.get("divided_by_seq_len"), dict) else {}
        out["zeroshot"].append({**ident, "dataset": name, **{k: num(v.get(k)) for k in _PPL_KEYS},
                                **{f"paper_{k}": num(paper.get(k)) for k in ("nats_per_token", "ppl", "stderr")},
                                "paper_seq_len_ppl": num(per_len.get("ppl")), "documents": num(v.get("documents")),
                                "source": v.get("source"), "detokenizer": v.get("detokenizer"), "reason": None})
    missing = values.get("missing") if isinstance(values.get("missing"), dict) else {}
    for name, reason in missing.items():
        out["zeroshot"].append({**ident, "dataset": name, "reason": str(reason)})


def _load_eval(kind: str, ident: dict, values: dict, out: dict) -> None:
    if kind == "ppl":
        paper = values.get("paper_convention") if isinstance(values.get("paper_convention"), dict) else {}
        out["ppl"].append({**ident, **{k: num(values.get(k)) for k in _PPL_KEYS},
                           **{f"paper_{k}": num(paper.get(k)) for k in ("nats_per_token", "ppl", "stderr")},
                           **{k: num(values.get(k)) for k in ("low_slice_nats_per_token", "insertion_mass_at_t0_mean")}})
        seq = values.get("per_sequence")
        if isinstance(seq, dict):
            out["ppl_seq"] += [{k: v for k, v in r.items() if k != "sample"} | {"index": r["sample"]}
                               for r in _per_sample_rows(dict(ident), seq, ("n_tokens", "strict", "paper"))]
    elif kind == "genppl":
        _load_genppl(ident, values, out)
    elif kind == "mauve":
        entries = [e for e in values.get("by_steps") or [] if isinstance(e, dict)]
        rows = _rows_by_steps(ident, values, ("mauve", "mauve_sd", "n_p", "n_q"))
        out["mauve"] += [{**row, "reason": e.get("reason")} for row, e in zip(rows, entries)]   # why null
    elif kind == "diversity":
        out["diversity"] += _rows_by_steps(ident, values, _DIVERSITY_KEYS, _DIVERSITY_CIS)
        if isinstance(values.get("data"), dict):
            out["diversity_data"].append({**ident, **{k: num(values["data"].get(k)) for k in _DIVERSITY_KEYS},
                                          **_cis(values["data"], _DIVERSITY_CIS)})
    elif kind == "lengths":
        _load_lengths(ident, values, out)
    elif kind == "speed":
        _load_speed(ident, values, out)
    elif kind == "exact":
        _load_exact(ident, values, out)
    elif kind == "zeroshot":
        _load_zeroshot(ident, values, out)
    elif kind == "samples":
        out["samples"] += _rows_by_steps(ident, values, ("n", "mean_length", "nfe", "seconds_per_sample",
                                                         "content_after_pad_rate"))


def read_history(path: Path, problems: list[str]) -> pd.DataFrame | None:
    """history.csv as a DataFrame with numeric columns, or None if absent/unreadable; a file cut
    mid-row keeps its complete rows and is noted (harness.core.records.read_history says how)."""
    if not path.is_file():
        return None
    try:
        read_history_rows(path)
    except UserError as exc:
        problems.append(str(exc))
        if "not UTF-8" in str(exc) or "binary" in str(exc):
            return None
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable CSV ({exc})")
        return None
    return df.apply(pd.to_numeric, errors="coerce")


def benchmark_files(study_dir: Path, run: str) -> list[Path]:
    """Snakemake benchmark TSVs whose path names this run (the run name delimited, not a prefix)."""
    root = Path(study_dir) / "benchmarks"
    if not root.is_dir():
        return []
    pat = re.compile(r"(?<![A-Za-z0-9])" + re.escape(run) + r"(?![A-Za-z0-9])")
    return sorted(p for p in root.rglob("*.tsv") if pat.search(str(p.relative_to(root))))


def benchmark_rule(path: Path, root: Path, run: str) -> str:
    """The rule a benchmark file belongs to: its path under benchmarks/ without the run name."""
    rel = str(path.relative_to(root).with_suffix(""))
    rest = re.sub(r"[^A-Za-z0-9_]+", " ", rel.replace(run, " ")).split()
    return "_".join(rest) or "job"


def _load_benchmarks(study_dir: Path, run: str, ident: dict, problems: list[str]) -> list[dict]:
    rows = []
    root = Path(study_dir) / "benchmarks"
    for p in benchmark_files(study_dir, run):
        try:
            df = pd.read_csv(p, sep="\t")
        except (OSError, ValueError) as exc:
            problems.append(f"{p}: unreadable benchmark TSV ({exc})")
            continue
        for _, r in df.iterrows():   # one row per repeat of the job
            rows.append({**ident, "rule": benchmark_rule(p, root, run), "file": str(p),
                         "s": num(r.get("s")), "max_rss_mb": num(r.get("max_rss"))})
    return rows


def _corpus_name(study_dir: Path, config: dict | None, problems: list[str]) -> str | None:
    manifest = read_json(Path(study_dir) / "data" / "manifest.json", problems) or {}
    for src in (manifest, (config or {}).get("data") or {}):
        corpus = src.get("corpus")
        if isinstance(corpus, dict):
            corpus = corpus.get("name")
        if corpus:
            return str(corpus)
    return None


def check_results(study_dir) -> int:
    """Read every file the report and MLflow summarise with the strict readers (train.json,
    history.csv, eval/<kind>.json against the result schema and its kind, cost/<layout>.json);
    the first bad one is a UserError naming it. Returns how many files were checked."""
    n = 0
    for run_dir in run_dirs(study_dir):
        if (run_dir / "train.json").is_file():
            read_json_object(run_dir / "train.json", "training summary")
            n += 1
        if (run_dir / "history.csv").is_file():
            read_history_rows(run_dir / "history.csv")
            n += 1
        for kind in ALL_EVAL_FILES:
            if (run_dir / "eval" / f"{kind}.json").is_file():
                read_result(run_dir / "eval" / f"{kind}.json", kind)
                n += 1
    for path in cost_files(study_dir):
        read_result(path, "cost")
        n += 1
    return n


def run_dirs(study_dir: Path) -> list[Path]:
    """Run directories of a study (those with a train.json, an eval/ folder or a history)."""
    runs = Path(study_dir) / "runs"
    if not runs.is_dir():
        return []
    return sorted(d for d in runs.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and any((d / f).exists() for f in ("train.json", "eval", "history.csv")))


def load_study(study_dir, config: dict | None = None) -> Study:
    """Read everything under results/<study>/ into a `Study`. Missing files yield no rows."""
    study_dir = Path(study_dir)
    problems: list[str] = []
    name = (config or {}).get("study") or study_dir.name
    names = ("runs", "ppl", "genppl", "genppl_data", "mauve", "diversity", "diversity_data", "lengths",
             "lengths_data", "length_hist", "samples", "speed_train", "speed_sample", "cost_train", "cost_sample",
             "benchmarks", "ppl_seq", "genppl_samples", "exact", "exact_data", "exact_samples", "bound_gap",
             "zeroshot")
    out: dict[str, list] = {k: [] for k in names}
    out["problems"] = problems
    out["length_pmf"] = []
    histories = []
    expected = _expected_runs(config)
    for run_dir in run_dirs(study_dir):
        train = read_json(run_dir / "train.json", problems)
        if expected is not None and not _belongs(run_dir, train, expected, config, problems):
            continue
        base = _identity(run_dir, train, None)
        t = train or {}
        out["runs"].append({**base, **{k: t.get(k) for k in (
            "steps", "batch_size", "lr", "match", "matched_to", "params", "final_loss", "wall_seconds",
            "tokens_per_s", "flops_per_step", "valid_nats_per_token", "valid_stderr", "clipped_fraction",
            "grad_norm_median", "device", "git_commit", "config_hash")}})
        for kind in ALL_EVAL_FILES:
            result = read_json(run_dir / "eval" / f"{kind}.json", problems)
            if result is not None:
                ident = _identity(run_dir, train, result)
                bad = restore_nonfinite(result)
                if bad:
                    problems.append(f"{run_dir.name}: eval/{kind}.json has non-finite values ({', '.join(bad[:4])}"
                                    f"{', ...' if len(bad) > 4 else ''}): its rows say so and are not averaged away")
                    ident["nonfinite"] = True
                _load_eval(kind, ident, _values(result), out)
        hist = read_history(run_dir / "history.csv", problems)
        if hist is not None and len(hist):
            for k in ID:
                hist.insert(ID.index(k), k, base[k])
            histories.append(hist)
        out["benchmarks"] += _load_benchmarks(study_dir, run_dir.name, base, problems)
    for path in cost_files(study_dir):
        obj = read_json(path, problems)
        if obj is not None:
            _load_cost(path, obj, out)
    frames = {k: _frame(out[k]) for k in names}
    for k in _STEPS_FRAMES:                          # an empty per-steps frame still has its steps column
        if "steps" not in frames[k].columns:
            frames[k]["steps"] = pd.Series(dtype=float)
    for k, cols in (("cost_train", COST_TRAIN_COLS), ("cost_sample", COST_SAMPLE_COLS)):
        frames[k] = frames[k].reindex(columns=ID + cols)
    frames["history"] = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(columns=ID)
    trained = set(frames["runs"]["run"]) if len(frames["runs"]) and "run" in frames["runs"] else set()
    missing = [n for n in (expected or {}) if n not in trained or not (study_dir / "runs" / n / "train.json").is_file()]
    return Study(root=study_dir, name=str(name), corpus=_corpus_name(study_dir, config, problems),
                 problems=problems, length_pmf=out["length_pmf"], missing_runs=missing, **frames)


def _expected_runs(config: dict | None) -> dict | None:
    """{run name: runs entry} of a study config (validated and default-filled here: the analysis may
    read a raw YAML); None for a partial or invalid one (nothing to compare). The entries carry the
    filled config as `config` for run_settings_hash."""
    if not isinstance(config, dict) or not all(k in config for k in ("runs", "data")):
        return None
    try:
        config = load_config(config)
    except UserError:
        return None
    entries = {(e["label"], e["layout"]): {**e, "config": config} for e in run_entries(config)}
    return {r["name"]: entries[(r["label"], r["layout"])] for r in study_runs(config)}


def _belongs(run_dir: Path, train: dict | None, expected: dict, config: dict, problems: list) -> bool:
    """Whether a run folder is one of the config's runs, trained under its recipe (train.json's
    settings_hash, harness.core.config.run_settings_hash); otherwise it is left out of every table, and
    the summary says why."""
    if run_dir.name not in expected:
        problems.append(f"runs/{run_dir.name}: not a run of this study's config (left out of the tables)")
        return False
    entry = expected[run_dir.name]
    recorded = (train or {}).get("settings_hash")
    if recorded is not None and recorded != run_settings_hash(entry["config"], entry):
        problems.append(f"runs/{run_dir.name}: trained under another recipe than this config gives it "
                        f"(settings {recorded}); left out of the tables: retrain it (snakemake re-runs it)")
        return False
    return True


#: frames with one row per sampling-steps value
_STEPS_FRAMES = ("genppl", "mauve", "diversity", "lengths", "length_hist", "samples", "speed_sample", "cost_sample",
                 "exact")


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=ID)
    if "steps" in df.columns and len(df):
        df["steps"] = df["steps"].astype(float)
    return df
