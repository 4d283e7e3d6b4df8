"""The study's tables: numbers as CSV (full precision), and Markdown + LaTeX for reading.

Each table function takes a loaded `Study` and returns a `Table`; nothing here computes a
metric, it only aggregates seeds (mean, and sd when there are several) and divides by the
reference method (the ratio-to-DID columns). A missing value is an empty CSV cell and "–" in
Markdown/LaTeX. LaTeX is written by hand (no jinja2 dependency) and needs `booktabs`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import GROUP, Study
from harness.atomic import atomic_write_text  # noqa: F401 (used by analysis.__init__ too)

DASH = "–"
#: default reference ("DID") per layout for every ratio column; config `report.reference` overrides
DEFAULT_REFERENCE = {"varlen": "did", "fixed": "did-fixed"}


@dataclass
class Table:
    """One table: `data` (numbers, tidy) goes to CSV, `display` (strings) to Markdown/LaTeX."""

    name: str
    title: str
    data: pd.DataFrame
    display: pd.DataFrame
    notes: list[str] = field(default_factory=list)


# --- formatting --------------------------------------------------------------------------------
def missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def fmt(v, kind: str = "auto") -> str:
    """A number for humans: about 4 significant digits, integers as integers, "–" when missing."""
    if missing(v):
        return DASH
    if isinstance(v, str):
        return v
    v = float(v)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if kind == "sci":
        return f"{v:.3g}"
    if kind == "ratio":
        return f"{v:.2f}×"
    if v.is_integer() and (kind == "int" or abs(v) >= 1000):   # counts; a seed-mean may not be whole
        return f"{v:.0f}"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 10:
        return f"{v:.2f}"
    if a >= 0.001:
        return f"{v:.3f}"
    return f"{v:.2e}"


def pm(mean, err, kind: str = "auto") -> str:
    """"mean ± err", or just the mean when there is no uncertainty."""
    if missing(mean):
        return DASH
    return fmt(mean, kind) if missing(err) else f"{fmt(mean, kind)} ± {fmt(err, kind)}"


def ci_text(lo, hi) -> str:
    return DASH if missing(lo) or missing(hi) else f"[{fmt(lo)}, {fmt(hi)}]"


# --- aggregation -------------------------------------------------------------------------------
def reference_methods(config: dict | None) -> dict[str, str]:
    """Which method is "DID" (the ratio denominator) for each layout."""
    ref = dict(DEFAULT_REFERENCE)
    ref.update(((config or {}).get("report") or {}).get("reference") or {})
    return ref


def aggregate(df: pd.DataFrame, keys: list[str], cols: list[str], keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """Mean over seeds of `cols` per `keys`, with `<col>_sd` (NaN for one seed) and `n_seeds`.

    `keep` columns (per-run uncertainties such as a CI) survive only when a group has one seed:
    with several seeds the spread over seeds replaces them.
    """
    ordered = keys + ["n_seeds"] + [x for c in cols for x in (c, f"{c}_sd")] + list(keep)
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=object if c in keys else float) for c in ordered})
    df = df.assign(**{c: np.nan for c in [*cols, *keep] if c not in df.columns})   # absent metric: all missing
    g = df.groupby(keys, dropna=False, sort=False)
    out = g[cols].mean()
    sd = g[cols].std(ddof=1).add_suffix("_sd")
    n = g["seed"].nunique(dropna=False).rename("n_seeds") if "seed" in df.columns else g.size().rename("n_seeds")
    parts = [n, out, sd]
    kept = list(keep)
    if kept:
        first = g[kept].first()
        first[n > 1] = np.nan
        parts.append(first)
    res = pd.concat(parts, axis=1).reset_index()
    return res[ordered]


def sort_rows(df: pd.DataFrame, config: dict | None) -> pd.DataFrame:
    """Rows in the config's `runs` order (method, layout); data rows last in their layout."""
    if df.empty:
        return df
    order = [(r.get("method"), r.get("layout")) for r in (config or {}).get("runs") or [] if isinstance(r, dict)]
    layouts = list(dict.fromkeys([lay for _, lay in order] + sorted(df["layout"].dropna().astype(str).unique())))
    rank = {k: i for i, k in enumerate(order)}

    def key(row):
        method, layout = row.get("method"), row.get("layout")
        is_data = method == "data"
        return (layouts.index(layout) if layout in layouts else len(layouts), is_data,
                rank.get((method, layout), len(rank)), str(method), str(row.get("size")),
                row.get("steps", 0) if not missing(row.get("steps", 0)) else 0)

    keys = [key(r) for r in df.to_dict("records")]
    idx = sorted(range(len(df)), key=lambda i: keys[i])
    return df.iloc[idx].reset_index(drop=True)


def add_ratio(agg: pd.DataFrame, col: str, ref: dict[str, str], match: tuple[str, ...] = ()) -> pd.Series:
    """`col` divided by the reference method's `col` (same layout, size and `match` columns)."""
    out = pd.Series(np.nan, index=agg.index, dtype=float)
    if agg.empty or col not in agg.columns:
        return out
    keys = ["layout", "size", *match]
    refs = agg[agg.apply(lambda r: ref.get(r["layout"]) == r["method"], axis=1)]
    lookup = {tuple(r[k] for k in keys): r[col] for r in refs.to_dict("records")}
    for i, r in agg.iterrows():
        denom = lookup.get(tuple(r[k] for k in keys), np.nan)
        if not missing(denom) and denom != 0 and not missing(r[col]):
            out[i] = r[col] / denom
    return out


def data_rows(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """One reference ("data") row per layout: the real-data statistics every run recorded.

    Runs of one layout share the data split, so their data rows agree; the mean over runs
    is shown (and equals each of them).
    """
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in cols}).assign(method="data", layout="", size="")
    df = df.assign(**{c: np.nan for c in cols if c not in df.columns})
    res = df.groupby("layout", sort=False)[cols].mean().reset_index()
    return res.assign(method="data", size="")


def _stack(config, *frames: pd.DataFrame) -> pd.DataFrame:
    """Rows of all frames (model rows and data rows) in table order; columns are the union."""
    frames = [f for f in frames if len(f)] or [frames[0]]
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].copy()
    return sort_rows(out, config)


def _ensure(df: pd.DataFrame, cols) -> pd.DataFrame:
    return df.assign(**{c: np.nan for c in cols if c not in df.columns})


def _ident_display(df: pd.DataFrame, steps: bool = False) -> dict:
    cols = {"Method": df["method"].astype(str), "Layout": df["layout"].astype(str),
            "Size": df["size"].fillna("").astype(str)}
    if steps:
        cols["Steps"] = df["steps"].map(lambda s: fmt(s, "int"))
    return cols


def _disp(df: pd.DataFrame, cols: dict) -> pd.DataFrame:
    return pd.DataFrame({k: list(v) for k, v in cols.items()}, index=range(len(df)))


def _pm(df: pd.DataFrame, col: str, err: str | None = None, kind: str = "auto") -> list[str]:
    """"mean ± sd" per row (`err` names another uncertainty column)."""
    return [pm(r[col], r[err or f"{col}_sd"], kind) for r in df.to_dict("records")]


def _f(df: pd.DataFrame, col: str, kind: str = "auto") -> list[str]:
    return [fmt(v, kind) for v in df[col]]


def _err(row, col: str, file_err: str | None = None):
    """The uncertainty shown next to `col`: sd over seeds, else the file's own (e.g. stderr)."""
    sd = row.get(f"{col}_sd")
    if not missing(sd):
        return sd
    return row.get(file_err) if file_err else np.nan


def _steps_cols(cols: list[str]) -> list[str]:
    return ["method", "layout", "size", "steps", "n_seeds"] + [x for c in cols for x in (c, f"{c}_sd")]


# --- the tables -----------------------------------------------------------------------------------
def ppl_table(study: Study, config: dict | None) -> Table:
    agg = aggregate(study.ppl, GROUP, ["nats_per_token", "ppl", "n_sequences", "n_tokens"], keep=("stderr",))
    agg = sort_rows(agg, config)
    agg.insert(3, "dataset", study.corpus or "")
    agg["nats_per_token_err"] = [_err(r, "nats_per_token", "stderr") for r in agg.to_dict("records")]
    agg["err_kind"] = ["sd over seeds" if r["n_seeds"] > 1 else "stderr" for r in agg.to_dict("records")]
    data = agg[["method", "layout", "size", "dataset", "n_seeds", "nats_per_token", "nats_per_token_err",
                "err_kind", "ppl", "ppl_sd", "n_sequences", "n_tokens"]]
    disp = _disp(agg, {**_ident_display(agg), "Dataset": agg["dataset"], "Seeds": _f(agg, "n_seeds", "int"),
                       "NLL bound (nats/token)": _pm(agg, "nats_per_token", "nats_per_token_err"),
                       "PPL bound": _pm(agg, "ppl"), "Tokens": _f(agg, "n_tokens", "int")})
    title = f"Perplexity upper bound on the {study.corpus or 'test'} test split (lower is better)"
    return Table("ppl", title, data, disp, [
        "NLL: negative-log-likelihood bound in nats per predicted token; PPL = exp(NLL). Exact for "
        "autoregressive models, a variational upper bound for diffusion/insertion models.",
        "± is the standard error over sequences for one seed, the sd over seeds when there are several."])


def genppl_table(study: Study, config: dict | None) -> Table:
    cols = ["gen_ppl", "gen_ppl_mean_per_sample", "entropy_nats", "entropy_bits", "n"]
    agg = aggregate(study.genppl, GROUP + ["steps"], cols, keep=("ci95_lo", "ci95_hi"))
    ref = data_rows(study.genppl_data, cols + ["ci95_lo", "ci95_hi"]).assign(steps=np.nan)
    rows = _ensure(_stack(config, agg, ref), agg.columns)
    data = rows[["method", "layout", "size", "steps", "n_seeds", "gen_ppl", "gen_ppl_sd", "ci95_lo", "ci95_hi",
                 "gen_ppl_mean_per_sample", "entropy_nats", "entropy_nats_sd", "entropy_bits", "n"]]
    unc = [f"± {fmt(r['gen_ppl_sd'])} (sd)" if not missing(r["gen_ppl_sd"]) else ci_text(r["ci95_lo"], r["ci95_hi"])
           for r in rows.to_dict("records")]
    disp = _disp(rows, {**_ident_display(rows, steps=True), "Gen PPL": _f(rows, "gen_ppl"), "95% CI / sd": unc,
                        "Entropy (nats)": _pm(rows, "entropy_nats"), "Entropy (bits)": _f(rows, "entropy_bits"),
                        "Samples": _f(rows, "n", "int")})
    return Table("genppl", "Generative perplexity and unigram entropy vs sampling steps", data, disp, [
        "Gen PPL: perplexity of the generated text under the evaluator LM (token-weighted; lower is better, "
        "but too low with low entropy means repetitive text). Entropy: unigram entropy of each sample's tokens, "
        "averaged over samples (data: the same statistic on real text).",
        "95% CI from the file for one seed; with several seeds the sd over seeds is shown instead."])


def _wide_by_steps(frame: pd.DataFrame, col: str, label: str, config, kind="auto"):
    """Tidy numbers per (method, layout, size, steps) and a display with one column per steps."""
    agg = sort_rows(aggregate(frame, GROUP + ["steps"], [col]), config)
    data = agg[["method", "layout", "size", "steps", "n_seeds", col, f"{col}_sd"]]
    steps = sorted(agg["steps"].dropna().unique())
    rows = []
    for (m, lay, size), g in agg.groupby(GROUP, sort=False):
        row = {"Method": m, "Layout": lay, "Size": size}
        for s in steps:
            hit = g[g["steps"] == s]
            row[f"{label} ({fmt(s, 'int')} steps)"] = pm(hit.iloc[0][col], hit.iloc[0][f"{col}_sd"], kind) \
                if len(hit) else DASH
        rows.append(row)
    return data, pd.DataFrame(rows, columns=None if rows else ["Method", "Layout", "Size"])


def mauve_table(study: Study, config: dict | None) -> Table:
    data, disp = _wide_by_steps(study.mauve, "mauve", "MAUVE", config)
    return Table("mauve", "MAUVE of generated vs held-out text, by sampling steps (higher is better)", data, disp,
                 ["MAUVE in [0, 1] (mauve-text; settings recorded in each mauve.json). ± is the sd over seeds."])


def diversity_table(study: Study, config: dict | None) -> Table:
    cols = ["entropy_nats", "entropy_bits", "distinct_1", "distinct_2", "distinct_3", "self_bleu"]
    agg = aggregate(study.diversity, GROUP + ["steps"], cols)
    rows = _ensure(_stack(config, agg, data_rows(study.diversity_data, cols).assign(steps=np.nan)), agg.columns)
    names = {"entropy_nats": "Entropy (nats)", "distinct_1": "Distinct-1", "distinct_2": "Distinct-2",
             "distinct_3": "Distinct-3", "self_bleu": "Self-BLEU"}
    disp = _disp(rows, {**_ident_display(rows, steps=True), **{label: _pm(rows, c) for c, label in names.items()}})
    return Table("diversity", "Diversity of generated text vs sampling steps", rows[_steps_cols(cols)], disp, [
        "Distinct-n: unique n-grams / all n-grams (higher = more diverse); Self-BLEU: mean BLEU of each "
        "sample against the others (lower = more diverse); entropy: unigram entropy in nats (bits in the CSV)."])


def lengths_table(study: Study, config: dict | None) -> Table:
    cols = ["mean", "sd", "q10", "q50", "q90", "w1", "ks", "empty_rate", "max_rate"]
    agg = aggregate(study.lengths, GROUP + ["steps"], cols)
    rows = _ensure(_stack(config, agg, data_rows(study.lengths_data, cols[:5]).assign(steps=np.nan)), agg.columns)
    pct = lambda v: DASH if missing(v) else f"{100 * v:.1f}%"   # noqa: E731
    quant = [DASH if missing(r["q50"]) else f"{fmt(r['q10'])} / {fmt(r['q50'])} / {fmt(r['q90'])}"
             for r in rows.to_dict("records")]
    disp = _disp(rows, {**_ident_display(rows, steps=True), "Mean length": _pm(rows, "mean"), "SD": _f(rows, "sd"),
                        "q10 / q50 / q90": quant, "W1 to data": _pm(rows, "w1"), "KS to data": _pm(rows, "ks"),
                        "Empty": rows["empty_rate"].map(pct), "At max length": rows["max_rate"].map(pct)})
    return Table("lengths", "Generated sequence lengths vs the data (variable-length runs)",
                 rows[_steps_cols(cols)], disp, [
        "Lengths in tokens. W1: Wasserstein-1 distance (tokens) and KS: Kolmogorov-Smirnov statistic between "
        "the generated and the data length distributions (lower is closer). Empty / at max length: share of "
        "samples with no content / hitting the length limit."])


def cost_train_table(study: Study, config: dict | None) -> Table:
    ref = reference_methods(config)
    bench = aggregate(study.speed_train, GROUP, ["tokens_per_s", "s_per_step", "flops_per_token"])
    loop = aggregate(study.runs, GROUP, ["tokens_per_s", "params"])[GROUP + ["tokens_per_s", "params"]]
    loop = loop.rename(columns={"tokens_per_s": "loop_tokens_per_s"})
    agg = sort_rows(loop.merge(bench, on=GROUP, how="outer"), config)   # a row per trained or benchmarked model
    agg["tokens_per_s_ratio"] = add_ratio(agg, "tokens_per_s", ref)
    agg["s_per_step_ratio"] = add_ratio(agg, "s_per_step", ref)
    agg["reference"] = [ref.get(lay, "") for lay in agg["layout"]]
    data = agg[["method", "layout", "size", "n_seeds", "params", "tokens_per_s", "tokens_per_s_sd",
                "tokens_per_s_ratio", "s_per_step", "s_per_step_sd", "s_per_step_ratio", "flops_per_token",
                "loop_tokens_per_s", "reference"]]
    disp = _disp(agg, {**_ident_display(agg), "Params": _f(agg, "params", "int"),
                       "Train tokens/s": _pm(agg, "tokens_per_s"),
                       "tokens/s vs ref": _f(agg, "tokens_per_s_ratio", "ratio"),
                       "s/step": _pm(agg, "s_per_step"), "s/step vs ref": _f(agg, "s_per_step_ratio", "ratio"),
                       "FLOPs/token": _f(agg, "flops_per_token", "sci"),
                       "Train-loop tokens/s": _f(agg, "loop_tokens_per_s"), "Reference": agg["reference"]})
    return Table("cost_train", "Training cost (speed benchmark) and ratio to DID", data, disp, [
        _ref_note(ref) + " tokens/s vs ref > 1: faster than the reference; s/step vs ref > 1: slower.",
        "Train tokens/s and s/step: the timed benchmark in speed.json (after warm-up). Train-loop tokens/s: "
        "the mean throughput the training run itself logged (train.json), a separate measurement.",
        "FLOPs/token: the method's own estimate of training FLOPs per clean token."])


def cost_sample_table(study: Study, config: dict | None) -> Table:
    ref = reference_methods(config)
    keys = GROUP + ["steps"]
    bench = aggregate(study.speed_sample, keys, ["s_per_sample", "nfe", "peak_mem_mb"])
    gen = aggregate(study.samples, keys, ["nfe"])[keys + ["nfe"]].rename(columns={"nfe": "nfe_samples"})
    agg = sort_rows(bench.merge(gen, on=keys, how="outer"), config)
    agg["nfe"] = agg["nfe"].combine_first(agg["nfe_samples"])          # NFE is a count: either file has it
    agg["s_per_sample_ratio"] = add_ratio(agg, "s_per_sample", ref, match=("steps",))
    agg["reference"] = [ref.get(lay, "") for lay in agg["layout"]]
    data = agg[["method", "layout", "size", "steps", "n_seeds", "s_per_sample", "s_per_sample_sd",
                "s_per_sample_ratio", "nfe", "peak_mem_mb", "reference"]]
    disp = _disp(agg, {**_ident_display(agg, steps=True), "s/sample": _pm(agg, "s_per_sample"),
                       "s/sample vs ref": _f(agg, "s_per_sample_ratio", "ratio"), "NFE": _f(agg, "nfe", "int"),
                       "Peak memory (MB)": _f(agg, "peak_mem_mb"), "Reference": agg["reference"]})
    return Table("cost_sample", "Inference cost per sample and ratio to DID", data, disp, [
        _ref_note(ref) + " s/sample vs ref > 1: slower than the reference at the same number of steps.",
        "NFE: network forward calls for the whole batch of samples (from speed.json, else samples.json)."])


def jobs_table(study: Study, config: dict | None) -> Table:
    b = study.benchmarks
    if b.empty:
        data = pd.DataFrame(columns=["run", "rule", "s", "max_rss_mb"])
    else:
        data = b.groupby(["run", "method", "layout", "rule"], sort=False)[["s", "max_rss_mb"]].mean().reset_index()
        data = sort_rows(data, config)[["run", "rule", "s", "max_rss_mb"]]
    disp = _disp(data, {"Run": data["run"], "Rule": data["rule"], "Wall time (s)": data["s"].map(fmt),
                        "Max RSS (MB)": data["max_rss_mb"].map(fmt)})
    return Table("jobs", "Workflow jobs (Snakemake benchmark files)", data, disp,
                 ["Whole-job wall time and peak resident memory as Snakemake's `benchmark:` recorded them "
                  "(includes start-up and I/O; mean over repeats)."])


def _ref_note(ref: dict) -> str:
    return "Reference (\"DID\") per layout: " + ", ".join(f"{m} for {lay}" for lay, m in sorted(ref.items())) + "."


TABLES = (ppl_table, genppl_table, mauve_table, diversity_table, lengths_table, cost_train_table,
          cost_sample_table, jobs_table)


def all_tables(study: Study, config: dict | None) -> list[Table]:
    return [f(study, config) for f in TABLES]


# --- summary (the headline table) -------------------------------------------------------------
def _at_max_steps(frame: pd.DataFrame, col: str) -> tuple[pd.DataFrame, float]:
    """Seed-mean of `col` per group at the study's largest number of sampling steps."""
    agg = aggregate(frame, GROUP + ["steps"], [col])
    if agg.empty or agg["steps"].dropna().empty:
        return pd.DataFrame(columns=GROUP + [col, f"{col}_sd"]), np.nan
    smax = agg["steps"].max()
    return agg[agg["steps"] == smax][GROUP + [col, f"{col}_sd"]], smax


def summary_table(study: Study, config: dict | None) -> Table:
    ref = reference_methods(config)
    groups = [df[GROUP] for df in (study.runs, study.ppl, study.genppl, study.mauve, study.speed_train) if len(df)]
    if not groups:
        empty = pd.DataFrame(columns=GROUP)
        return Table("summary", "Headline results", empty, pd.DataFrame(columns=["Method", "Layout", "Size"]))
    base = pd.concat(groups).drop_duplicates().reset_index(drop=True)
    ppl = aggregate(study.ppl, GROUP, ["ppl"])[GROUP + ["ppl", "ppl_sd"]]
    gen, s_gen = _at_max_steps(study.genppl, "gen_ppl")
    ent, _ = _at_max_steps(study.genppl, "entropy_nats")
    mau, s_mau = _at_max_steps(study.mauve, "mauve")
    sps, s_sps = _at_max_steps(study.speed_sample, "s_per_sample")
    tr = aggregate(study.speed_train, GROUP, ["tokens_per_s"])[GROUP + ["tokens_per_s"]]
    t = base
    for part in (ppl, gen, ent, mau, sps, tr):
        t = t.merge(part, on=GROUP, how="left")
    t = sort_rows(t, config)
    t["tokens_per_s_ratio"] = add_ratio(t, "tokens_per_s", ref)
    t["s_per_sample_ratio"] = add_ratio(t, "s_per_sample", ref)
    t = t.assign(gen_ppl_steps=s_gen, mauve_steps=s_mau, s_per_sample_steps=s_sps)   # which steps "@max" is
    data = t[GROUP + ["ppl", "ppl_sd", "gen_ppl", "gen_ppl_sd", "entropy_nats", "gen_ppl_steps", "mauve", "mauve_sd",
                      "mauve_steps", "tokens_per_s_ratio", "s_per_sample_ratio", "s_per_sample_steps"]]
    disp = _disp(t, {**_ident_display(t), "PPL bound": _pm(t, "ppl"),
                     f"Gen PPL @{fmt(s_gen, 'int')}": _pm(t, "gen_ppl"),
                     f"Entropy (nats) @{fmt(s_gen, 'int')}": _f(t, "entropy_nats"),
                     f"MAUVE @{fmt(s_mau, 'int')}": _pm(t, "mauve"),
                     "Train tokens/s vs DID": _f(t, "tokens_per_s_ratio", "ratio"),
                     f"s/sample vs DID @{fmt(s_sps, 'int')}": _f(t, "s_per_sample_ratio", "ratio")})
    return Table("summary", "Headline results", data, disp, [
        _ref_note(ref) + " Ratios: > 1 means more tokens/s (faster training) or more s/sample (slower sampling) "
        "than the reference.", "@N: at the largest number of sampling steps in the study; ± is the sd over seeds."])


# --- rendering --------------------------------------------------------------------------------
def to_markdown(table: Table, heading: str = "###") -> str:
    d = table.display
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    lines = [f"{heading} {table.title}", ""]
    if d.empty:
        lines.append("_No results for this table in this study._")
    else:
        lines.append("| " + " | ".join(cell(c) for c in d.columns) + " |")
        lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(d.columns))) + "|")
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in d.itertuples(index=False)]
    lines += [""] + [f"*{n}*" for n in table.notes]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "–": "--",
        "×": r"$\times$", "≤": r"$\le$"}


def tex_escape(s) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def to_latex(table: Table) -> str:
    d = table.display
    lines = [f"% {table.title}", "% generated by `python -m analysis`; needs \\usepackage{booktabs}"]
    if d.empty:
        return "\n".join(lines + ["% no results for this table in this study"]) + "\n"
    align = "".join("l" if i < 3 else "r" for i in range(len(d.columns)))
    lines += [f"\\begin{{tabular}}{{{align}}}", "\\toprule",
              " & ".join(tex_escape(c) for c in d.columns) + r" \\", "\\midrule"]
    lines += [" & ".join(tex_escape(v) for v in row) + r" \\" for row in d.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}"] + [f"% {n}" for n in table.notes]
    return "\n".join(lines) + "\n"


def write_table(table: Table, out_dir) -> list[Path]:
    """tables/<name>.csv (numbers), .md and .tex (display). Returns the three paths."""
    out_dir = Path(out_dir)
    return [atomic_write_text(out_dir / f"{table.name}.csv", table.data.to_csv(index=False, na_rep="")),
            atomic_write_text(out_dir / f"{table.name}.md", to_markdown(table)),
            atomic_write_text(out_dir / f"{table.name}.tex", to_latex(table))]
