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
from harness.core.metric_registry import default_run_kinds, result_kinds
from harness.core.records import read_history as read_history_rows, read_json_object, read_result
from harness.results.rows import (COST_SAMPLE_COLS, COST_TRAIN_COLS, ID, cost_files, load_cost, load_eval, num,
                                  result_values)




#: group key for aggregation over seeds
GROUP = ["method", "layout", "size"]


#: evaluation files every run of a default study has, in the order a study produces them (the
#: metric registry's defaults; the opt-in ones, speed, exact and zeroshot, are read when present
#: and never reported as missing)
EVAL_FILES = default_run_kinds()


def all_eval_files() -> tuple[str, ...]:
    """Every per-run evaluation file the loaders read (harness.core.metric_registry), the plugin
    metrics' included (read when the loader runs: a plugin registered later is seen)."""
    return result_kinds()



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
    #: the plugin metrics' rows (harness.core.metric_registry), by metric: ID (+ steps) and their numbers
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: runs the study's config lists that have no training summary (not trained, or deleted)
    missing_runs: list[str] = field(default_factory=list)

    #: the frames that hold per-run evaluation results (not training, cost or job records)
    EVALUATION_FRAMES = ("ppl", "genppl", "mauve", "diversity", "lengths", "samples", "exact", "bound_gap",
                         "speed_sample", "zeroshot")

    def evaluated(self) -> bool:
        """Whether any run has an evaluation result (a plugin metric's included): a study whose runs
        were trained but never evaluated (a recipe study) is summarised by how they trained."""
        return (any(len(getattr(self, k)) for k in self.EVALUATION_FRAMES)
                or any(len(f) for f in self.extra.values()))


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
        for kind in all_eval_files():
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
    out["extra"] = {}
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
        for kind in all_eval_files():
            result = read_json(run_dir / "eval" / f"{kind}.json", problems)
            if result is not None:
                ident = _identity(run_dir, train, result)
                bad = restore_nonfinite(result)
                if bad:
                    problems.append(f"{run_dir.name}: eval/{kind}.json has non-finite values ({', '.join(bad[:4])}"
                                    f"{', ...' if len(bad) > 4 else ''}): its rows say so and are not averaged away")
                    ident["nonfinite"] = True
                load_eval(kind, ident, result_values(result), out)
        hist = read_history(run_dir / "history.csv", problems)
        if hist is not None and len(hist):
            for k in ID:
                hist.insert(ID.index(k), k, base[k])
            histories.append(hist)
        out["benchmarks"] += _load_benchmarks(study_dir, run_dir.name, base, problems)
    for path in cost_files(study_dir):
        obj = read_json(path, problems)
        if obj is not None:
            load_cost(path, obj, out)
    frames = {k: _frame(out[k]) for k in names}
    for k in _STEPS_FRAMES:                          # an empty per-steps frame still has its steps column
        if "steps" not in frames[k].columns:
            frames[k]["steps"] = pd.Series(dtype=float)
    for k, cols in (("cost_train", COST_TRAIN_COLS), ("cost_sample", COST_SAMPLE_COLS)):
        frames[k] = frames[k].reindex(columns=ID + cols)
    frames["history"] = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(columns=ID)
    trained = set(frames["runs"]["run"]) if len(frames["runs"]) and "run" in frames["runs"] else set()
    missing = [n for n in (expected or {}) if n not in trained or not (study_dir / "runs" / n / "train.json").is_file()]
    extra = {kind: _frame(rows) for kind, rows in out["extra"].items()}
    return Study(root=study_dir, name=str(name), corpus=_corpus_name(study_dir, config, problems),
                 problems=problems, length_pmf=out["length_pmf"], missing_runs=missing, extra=extra, **frames)


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
