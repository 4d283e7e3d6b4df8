"""The DID paper's published numbers, and the helpers that set a study's numbers beside them:
pooling over seeds, interval cells, and the notes that say how a study differs from the paper
(tokenizer, data, budget, alignment), read from the study's own files.

Published numbers (`PAPER_*`) are the paper's (Ding et al., "Beyond Masks", ICLR 2026) as
transcribed by third-party notes of the paper; they have not been checked against the PDF.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.core import methods
from harness.results.rows import num
from harness.results.study import GROUP, Study, read_json
from analysis.frames import DASH, Table, fmt, missing


Z95 = 1.959963984540054


#: the zero-shot test sets of Table 1: (key in zeroshot.json, column label), the paper's column order
PAPER_DATASETS = (("wikitext103", "WikiText"), ("lambada", "LAMBADA"), ("pubmed", "PubMed"),
                  ("ag_news", "AG News"), ("lm1b", "LM1B"), ("arxiv", "ArXiv"), ("ptb", "PTB"))


DATASET_LABELS = dict(PAPER_DATASETS)


#: Table 1 (fixed length, trained on OpenWebText): (size, model, PPL per dataset in PAPER_DATASETS order)
PAPER_TABLE1 = (
    ("small", "RADD", (38.27, 51.82, 56.99, 73.18, 72.99, 85.95, 108.79)),
    ("small", "DID-S (step-aligned)", (38.72, 49.10, 55.02, 76.02, 74.04, 82.41, 115.37)),
    ("small", "DID-F (FLOPs-aligned)", (36.91, 48.00, 52.89, 71.48, 72.04, 78.38, 111.60)),
    ("medium", "RADD", (28.44, 44.10, 41.06, 48.96, 60.32, 66.28, 81.05)),
    ("medium", "DID-F (FLOPs-aligned)", (28.35, 41.00, 38.71, 48.84, 58.05, 61.77, 87.09)),
)


#: variable-length (stories) gen PPL under GPT-2-large vs sampling steps: model -> {steps: PPL}
PAPER_GENPPL_STEPS = (64, 128, 256, 512)


PAPER_GENPPL = (("ILM", (161.80, 137.64, 42.29, 31.14)),
                ("RADD (padded)", (81.92, 50.89, 34.47, 26.78)),
                ("DID", (22.78, 21.07, 21.90, 23.88)))


#: published speedups of DID over RADD: layout -> (training low, training high, training text, inference, text)
PAPER_SPEED = {
    "fixed": (1.89, 1.99, "1.89× (small) – 1.99× (large)", 1.58, "1.58× (\"up to\"; ≈1.5× in the notes)"),
    "varlen": (2.58, 3.42, "2.58× (small) – 3.42× (large)", 3.79, "3.79× (\"up to\")"),
}


PAPER_CITE = ("the DID paper (Ding et al., ICLR 2026), as transcribed by third-party notes of the paper; "
              "not yet checked against the PDF")


PUBLISHED = "paper (published)"


MEASURED = "this study"


@dataclass
class PaperTable:
    """One output file: sections (a Table each, rendered without its notes) and one notes block."""

    name: str
    title: str
    intro: str
    sections: list[Table]
    notes: list[str]
    data: pd.DataFrame = field(default_factory=pd.DataFrame)


def t95(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def pool(values, errs=None, los=None, his=None, log: bool = False) -> tuple[float, float, float, int, str]:
    """(centre, lo, hi, n, how) of one row's values over seeds.

    One value: the value with its own 95% interval (± 1.96 `errs`, or [`los`, `his`]). Several: the
    mean over seeds with a t interval for that mean (mean ± t_{n-1} sd / sqrt(n)), taken on the log
    scale when `log` (a perplexity: the geometric mean, a symmetric interval in nats)."""
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v)
    n = int(ok.sum())
    if n == 0:
        return math.nan, math.nan, math.nan, 0, ""
    if n == 1:
        i = int(np.flatnonzero(ok)[0])
        c = float(v[i])
        if errs is not None and np.isfinite(num(list(errs)[i])):
            e = num(list(errs)[i])
            return c, c - Z95 * e, c + Z95 * e, 1, "stderr"
        if los is not None and his is not None:
            return c, num(list(los)[i]), num(list(his)[i]), 1, "file CI"
        return c, math.nan, math.nan, 1, ""
    x = np.log(v[ok]) if log else v[ok]
    m, half = float(x.mean()), t95(n) * float(x.std(ddof=1)) / math.sqrt(n)
    lo, hi = m - half, m + half
    if log:
        m, lo, hi = math.exp(m), math.exp(lo), math.exp(hi)
    return m, lo, hi, n, f"t over {n} seeds"


def safe_exp(x: float) -> float:
    return math.nan if missing(x) else math.exp(min(float(x), 700.0))


def ci_cell(value, lo, hi, suffix: str = "") -> str:
    """"value [lo, hi]", the value alone without an interval, "–" when missing."""
    if missing(value):
        return DASH
    text = fmt(value) if missing(lo) or missing(hi) else f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"
    return text + suffix


def published_text(v: float) -> str:
    return f"{v:.2f}"


def paper_table(name: str, title: str, display: pd.DataFrame, data: pd.DataFrame | None = None) -> Table:
    return Table(name, title, data if data is not None else pd.DataFrame(), display, [])


def result_settings(study: Study, run: str, kind: str) -> dict:
    obj = read_json(Path(study.root) / "runs" / run / "eval" / f"{kind}.json", []) or {}
    s = obj.get("settings")
    return s if isinstance(s, dict) else {}


def eval_values(study: Study, run: str, kind: str) -> dict:
    obj = read_json(Path(study.root) / "runs" / run / "eval" / f"{kind}.json", []) or {}
    v = obj.get("values")
    return v if isinstance(v, dict) else {}


def study_run_rows(study: Study, layout: str | None = None) -> pd.DataFrame:
    r = study.runs
    if r.empty:
        return r
    return r[r["layout"] == layout] if layout else r


def first_settings(study: Study, runs: pd.DataFrame, kind: str) -> dict:
    """The settings of `kind` of the runs merged, the first run that has a key winning."""
    out: dict = {}
    for run in runs["run"] if len(runs) else []:
        for k, v in result_settings(study, run, kind).items():
            if v is not None:
                out.setdefault(k, v)
    return out


def join_words(items) -> str:
    items = [str(i) for i in dict.fromkeys(items) if i not in (None, "")]
    return ", ".join(items) if items else "unknown"


def data_manifest(study: Study) -> dict:
    return read_json(Path(study.root) / "data" / "manifest.json", []) or {}


def tokenizer_text(study: Study) -> str:
    tok = data_manifest(study).get("tokenizer") or {}
    name = tok.get("name")
    size = (tok.get("vocab") or {}).get("size")
    if not name:
        return "the study's tokenizer (not recorded in data/manifest.json)"
    return f"the study's tokenizer `{name}`" + (f" (vocabulary {size} ids, specials included)" if size else "")


def seq_len(study: Study, config: dict | None, key: str) -> int | None:
    m = data_manifest(study)
    v = m.get(key, ((config or {}).get("data") or {}).get(key))
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def corpus_name(study: Study) -> str:
    return study.corpus or "the study's corpus"


def budget_text(study: Study, layout: str) -> str:
    """Model size and training budget of a layout's runs, from train.json (study.runs)."""
    r = study_run_rows(study, layout)
    if r.empty:
        return "no trained runs"
    sizes = join_words(sorted(r["size"].dropna().astype(str).unique()))
    params = pd.to_numeric(r.get("params"), errors="coerce").dropna() if "params" in r else pd.Series(dtype=float)
    steps = pd.to_numeric(r.get("steps"), errors="coerce").dropna() if "steps" in r else pd.Series(dtype=float)
    batch = pd.to_numeric(r.get("batch_size"), errors="coerce").dropna() if "batch_size" in r else pd.Series(dtype=float)
    text = f"`{sizes}` models"
    if len(params):
        lo, hi = count_text(params.min()), count_text(params.max())
        text += f" ({lo} parameters)" if lo == hi else f" ({lo}–{hi} parameters)"
    if len(steps):
        s = join_words(f"{v:.0f}" for v in sorted(steps.unique()))
        b = join_words(f"{v:.0f}" for v in sorted(batch.unique())) if len(batch) else "?"
        text += f", {s} training steps of batch {b} sequences"
    per = r.groupby(GROUP, sort=False)["seed"].nunique() if "seed" in r else pd.Series([1])
    lo, hi = int(per.min()), int(per.max())
    seeds = f"{lo}" if lo == hi else f"{lo}–{hi}"
    return text + f", {seeds} seed{'' if hi == 1 else 's'} per method"


def count_text(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else f"{n:.0f}"


#: the methods of the paper's Table 1, by the paper's own names (`Method.paper_label`)
PAPER_TABLE1_METHODS = ("RADD", "DID")


def paper_label_of(runs: pd.DataFrame) -> dict:
    """{row method (a label or a method): the paper's name of its registered method, or None}."""
    labels = methods.paper_labels()
    base = runs["base_method"] if "base_method" in runs else runs["method"]
    return {m: labels.get(str(b)) for m, b in zip(runs["method"], base.fillna(runs["method"]))}


def not_in_paper(runs: pd.DataFrame) -> str:
    """Which of the rows' methods the paper's Table 1 does not have (it has RADD and DID only)."""
    label = paper_label_of(runs) if len(runs) else {}
    extra = [m for m in dict.fromkeys(runs["method"]) if label.get(m) not in PAPER_TABLE1_METHODS] \
        if len(runs) else []
    if not extra:
        return ""
    return f" {', '.join(extra)} {'is' if len(extra) == 1 else 'are'} not in the paper's Table 1 (RADD and DID only)."


def alignment_text(runs: pd.DataFrame) -> str:
    """Whether the study's DID trained as many steps as the other methods (the paper's DID-S) or not."""
    if runs.empty or "steps" not in runs:
        return ""
    steps = runs.assign(steps=pd.to_numeric(runs["steps"], errors="coerce")).groupby("method")["steps"].max()
    label = paper_label_of(runs)
    did = [m for m in steps.index if label.get(m) == "DID"]
    others = steps.drop(did)
    if not did or others.empty:
        return ""
    if all(steps[d] == v for d in did for v in others):
        return (f"This study's {', '.join(did)} trained as many steps as every other method (step-aligned, like "
                "the paper's DID-S; the paper's DID-F has about twice the steps, RADD's FLOPs).")
    return ("Training steps per method here: " + ", ".join(f"{m} {v:.0f}" for m, v in steps.items())
            + " (the paper's DID-S is step-aligned with RADD, DID-F FLOPs-aligned).")
