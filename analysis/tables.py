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

from analysis import convergence, stats
from harness.study import GROUP, Study
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
    if abs(v) >= 1e9 and kind != "int":   # an untrained model's PPL: digits beyond 4 carry nothing
        return f"{v:.3g}"
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
    ordered = keys + ["n_seeds"] + [x for c in cols for x in (c, f"{c}_sd")] + list(keep) + ["nonfinite"]
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=object if c in keys else float) for c in ordered})
    df = df.assign(**{c: np.nan for c in [*cols, *keep] if c not in df.columns})   # absent metric: all missing
    g = df.groupby(keys, dropna=False, sort=False)
    # a seed without the value (a non-finite bound, a failed metric) makes the mean missing, never
    # the mean of the other seeds under the same "n seeds" (inf stays inf)
    out = g[cols].agg(lambda v: v.mean() if v.notna().all() else np.nan)
    sd = g[cols].agg(lambda v: v.std(ddof=1) if v.notna().all() else np.nan).add_suffix("_sd")
    n = g["seed"].nunique(dropna=False).rename("n_seeds") if "seed" in df.columns else g.size().rename("n_seeds")
    bad = (g["nonfinite"].agg(lambda v: bool(v.fillna(False).astype(bool).any())) if "nonfinite" in df.columns
           else pd.Series(False, index=n.index)).rename("nonfinite")
    parts = [n, out, sd, bad]
    kept = list(keep)
    if kept:
        first = g[kept].first()
        first[n > 1] = np.nan
        parts.append(first)
    res = pd.concat(parts, axis=1).reset_index()
    return res[ordered]


def sort_rows(df: pd.DataFrame, config: dict | None) -> pd.DataFrame:
    """Rows in the config's `runs` order (label, layout); untrained reference runs (`train: {steps:
    0}`) after the trained rows of their layout, data rows last."""
    if df.empty:
        return df
    entries = [r for r in (config or {}).get("runs") or [] if isinstance(r, dict)]
    order = [(r.get("label") or r.get("method"), r.get("layout")) for r in entries]
    untrained = {k for k, r in zip(order, entries) if isinstance(r.get("train"), dict) and r["train"].get("steps") == 0}
    layouts = list(dict.fromkeys([lay for _, lay in order] + sorted(df["layout"].dropna().astype(str).unique())))
    rank = {k: i for i, k in enumerate(order)}

    def key(row):
        method, layout = row.get("method"), row.get("layout")
        is_data = method == "data"
        return (layouts.index(layout) if layout in layouts else len(layouts), is_data,
                (method, layout) in untrained, rank.get((method, layout), len(rank)), str(method), str(row.get("size")),
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


def _ident_display(df: pd.DataFrame, steps: bool = False, facts: pd.DataFrame | None = None) -> dict:
    """The identity columns of a table's rows; with `facts` (analysis.convergence.run_facts) also
    how each row was trained: its budget (steps x batch), its matching (DID-S / DID-F) and whether
    its validation curve plateaued, so no number is read without them (issue 23)."""
    bad = df["nonfinite"].fillna(False).astype(bool).tolist() if "nonfinite" in df.columns else [False] * len(df)
    cols = {"Method": [f"{m} (non-finite!)" if b else str(m) for m, b in zip(df["method"], bad)],
            "Layout": df["layout"].astype(str), "Size": df["size"].fillna("").astype(str)}
    if facts is not None:
        f = df[GROUP].merge(facts, on=GROUP, how="left") if len(df) else pd.DataFrame(columns=list(facts.columns))
        is_data = (df["method"] == "data").to_numpy() if len(df) else np.array([], bool)
        for col, label in (("budget", "Steps x batch"), ("matching", "Matching"), ("plateau_text", "Plateau")):
            cols[label] = ["" if d else (DASH if missing(v) else str(v)) for v, d in zip(f[col], is_data)]
    if steps:
        cols["Sampling steps" if facts is not None else "Steps"] = df["steps"].map(lambda s: fmt(s, "int"))
    return cols


def facts_of(study: Study, config: dict | None) -> pd.DataFrame:
    """analysis.convergence.run_facts with this study's references."""
    return convergence.run_facts(study, reference_methods(config))


def with_facts(data: pd.DataFrame, facts: pd.DataFrame) -> pd.DataFrame:
    """A table's CSV numbers with each row's matching, budget and plateau columns appended."""
    extra = facts[GROUP + ["matching", "budget", "plateau_text", "converged"]].rename(columns={"plateau_text": "plateau"})
    if data.empty or "method" not in data.columns:
        return data.assign(**{c: pd.Series(dtype=object) for c in extra.columns if c not in data.columns})
    return data.merge(extra, on=GROUP, how="left")


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
MARK = "†"
FMARK = "‡"   # differs from DID-F (the FLOPs-matched DID row)
Z95 = stats.Z95
MARK_NOTE = (f"{MARK}: differs from the reference (DID) row at 95%: paired over the same test sequences for "
             "bounds, a two-sample bootstrap over samples for gen PPL and entropy, Welch's t over seeds "
             "when both rows have several seeds.")


def _key(row) -> tuple:
    return tuple(row[k] for k in GROUP)


def _ref_key(row, ref: dict) -> tuple | None:
    method = ref.get(row["layout"])
    return (method, row["layout"], row["size"]) if method and method != row["method"] else None


def _runs_of(frame: pd.DataFrame, key: tuple) -> pd.DataFrame:
    return frame[(frame["method"] == key[0]) & (frame["layout"] == key[1]) & (frame["size"] == key[2])] \
        if len(frame) else frame


def bound_difference(study: Study, key: tuple, ref_key: tuple, col: str = "strict") -> stats.Diff | None:
    """Bound of `key` minus the reference's (nats/token).

    Both with >= 2 seeds: Welch over seeds, widened by the evaluation's own error. Every seed of
    every method is scored on the same test rows with the same Monte-Carlo draws, so the seed
    spread leaves out the error of those rows and draws (shared by a method's seeds); it is the
    paired test over rows of the seed-averaged per-row bounds (`stats.combined_difference`).
    Otherwise paired over the common test sequences of one common seed (the lowest)."""
    a, b = _runs_of(study.ppl, key), _runs_of(study.ppl, ref_key)
    if a.empty or b.empty:
        return None
    value = "nats_per_token" if col == "strict" else "paper_nats_per_token"
    seq = study.ppl_seq
    if a["seed"].nunique() > 1 and b["seed"].nunique() > 1:
        seeds = stats.seed_difference(a[value], b[value])
        rows = _seed_averaged_rows(seq, key, ref_key, col) if not seq.empty else None
        return stats.combined_difference(seeds, rows) if rows is not None else seeds
    if seq.empty:
        return None
    sa, sb = _runs_of(seq, key), _runs_of(seq, ref_key)
    common = sorted(set(sa["seed"]) & set(sb["seed"]))
    seed = common[0] if common else None
    sa = sa[sa["seed"] == (seed if seed is not None else sa["seed"].min())].sort_values("index")
    sb = sb[sb["seed"] == (seed if seed is not None else sb["seed"].min())].sort_values("index")
    if len(sa) != len(sb) or not np.array_equal(sa["n_tokens"].to_numpy(), sb["n_tokens"].to_numpy()):
        return None   # not the same sequences: no paired test
    return stats.paired_ratio_difference(sa[col].to_numpy(), sb[col].to_numpy(), sa["n_tokens"].to_numpy())


def _seed_averaged_rows(seq: pd.DataFrame, key: tuple, ref_key: tuple, col: str) -> stats.Diff | None:
    """Paired difference over the common test rows of the per-row bounds averaged over each
    method's seeds (None when the two did not score the same rows)."""
    sa, sb = _runs_of(seq, key), _runs_of(seq, ref_key)
    if sa.empty or sb.empty:
        return None
    ma = sa.groupby("index")[[col, "n_tokens"]].mean().sort_index()
    mb = sb.groupby("index")[[col, "n_tokens"]].mean().sort_index()
    if not ma.index.equals(mb.index) or not np.array_equal(ma["n_tokens"].to_numpy(), mb["n_tokens"].to_numpy()):
        return None
    return stats.paired_ratio_difference(ma[col].to_numpy(), mb[col].to_numpy(), ma["n_tokens"].to_numpy())


def _diff_text(d: stats.Diff | None, kind: str = "auto") -> str:
    if d is None or missing(d.estimate):
        return DASH
    sign = "+" if d.estimate > 0 else ""
    return f"{sign}{fmt(d.estimate, kind)} [{fmt(d.lo, kind)}, {fmt(d.hi, kind)}]" + (f" {MARK}" if d.significant else "")


def ppl_table(study: Study, config: dict | None) -> Table:
    ref = reference_methods(config)
    cols = ["nats_per_token", "ppl", "paper_nats_per_token", "paper_ppl", "low_slice_nats_per_token",
            "insertion_mass_at_t0_mean", "n_sequences", "n_tokens"]
    agg = aggregate(_ensure(study.ppl, cols), GROUP, cols, keep=("stderr", "paper_stderr"))
    agg = sort_rows(agg, config)
    agg.insert(3, "dataset", study.corpus or "")
    recs = agg.to_dict("records")
    agg["nats_per_token_err"] = [_err(r, "nats_per_token", "stderr") for r in recs]
    agg["paper_nats_per_token_err"] = [_err(r, "paper_nats_per_token", "paper_stderr") for r in recs]
    agg["err_kind"] = ["sd over seeds" if r["n_seeds"] > 1 else "stderr" for r in recs]
    diffs = [bound_difference(study, _key(r), _ref_key(r, ref)) if _ref_key(r, ref) else None for r in recs]
    fref = convergence.flops_reference(study, ref)
    diffs_f = [bound_difference(study, _key(r), _ref_key(r, fref)) if _ref_key(r, fref) else None for r in recs]
    agg["diff_vs_ref"] = [np.nan if d is None else d.estimate for d in diffs]
    agg["diff_lo"] = [np.nan if d is None else d.lo for d in diffs]
    agg["diff_hi"] = [np.nan if d is None else d.hi for d in diffs]
    agg["diff_significant"] = [None if d is None else d.significant for d in diffs]
    agg["reference"] = [ref.get(lay, "") for lay in agg["layout"]]
    agg["diff_vs_flops_ref"] = [np.nan if d is None else d.estimate for d in diffs_f]
    agg["diff_flops_significant"] = [None if d is None else d.significant for d in diffs_f]
    agg["flops_reference"] = [fref.get(lay, "") for lay in agg["layout"]]
    facts = facts_of(study, config)
    data = with_facts(agg[["method", "layout", "size", "dataset", "n_seeds", "nats_per_token", "nats_per_token_err",
                           "err_kind", "ppl", "ppl_sd", "diff_vs_ref", "diff_lo", "diff_hi", "diff_significant",
                           "reference", "diff_vs_flops_ref", "diff_flops_significant", "flops_reference",
                           "paper_nats_per_token", "paper_nats_per_token_err", "paper_ppl", "low_slice_nats_per_token",
                           "insertion_mass_at_t0_mean", "n_sequences", "n_tokens"]], facts)
    vs_f = {"vs DID-F (95%)": [_diff_text(d) for d in diffs_f]} if fref else {}
    disp = _disp(agg, {**_ident_display(agg, facts=facts), "Seeds": _f(agg, "n_seeds", "int"),
                       "NLL bound, strict (nats/token)": _pm(agg, "nats_per_token", "nats_per_token_err"),
                       "PPL bound": _pm(agg, "ppl"),
                       ("vs DID-S (nats/token, 95%)" if fref else "vs DID (nats/token, 95%)"): [_diff_text(d) for d in diffs],
                       **vs_f,
                       "Paper convention (nats/token)": _pm(agg, "paper_nats_per_token", "paper_nats_per_token_err"),
                       "PPL (paper conv.)": _f(agg, "paper_ppl"),
                       "of which t < 1e-3": _f(agg, "low_slice_nats_per_token"),
                       "Insertions as t→0": _f(agg, "insertion_mass_at_t0_mean"),
                       "Tokens": _f(agg, "n_tokens", "int")})
    title = f"Likelihood bound on the {study.corpus or 'test'} test split (lower is better)"
    return Table("ppl", title, data, disp, [
        "Strict: a valid upper bound on the NLL of the model its sampler runs, in nats per predicted token "
        "(exact for AR): the whole time range, the prior term included. PPL = exp(NLL).",
        "Paper convention: t >= 1e-3 and the prior term at t = 1 dropped, the truncation of the DID/RADD/MDLM "
        "papers' code, for every method (AR and ILM have nothing to truncate: the same value); it can fall below "
        "the true NLL, so only the strict column ranks methods.",
        "of which t < 1e-3: the part of DID's strict bound from times the paper convention never samples. "
        "Insertions as t→0: the insertion mass DID still predicts on a complete sequence at t = 1e-6 "
        "(0 for a model that knows the sequence is complete; c > 0 costs about 6.9 c nats per sequence).",
        "± is the standard error over sequences for one seed, the sd over seeds when there are several. "
        "vs DID: the difference from the reference row with its 95% interval. " + MARK_NOTE])


def lowest_seed_samples(per: pd.DataFrame, key: tuple, ref_key: tuple, steps,
                        pooled: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-sample rows at `steps` of `key` and of the reference, each of its lowest seed
    (the within-run bootstrap when a row has one seed), or of all its seeds (`pooled`: the
    sampling error of a several-seed comparison); empty frames when either has none."""
    if per.empty:
        return per, per
    sa, sb = (_runs_of(per, k) for k in (key, ref_key))
    sa, sb = sa[sa["steps"] == steps], sb[sb["steps"] == steps]
    if sa.empty or sb.empty:
        return sa.iloc[0:0], sb.iloc[0:0]
    if pooled:
        return sa, sb
    return sa[sa["seed"] == sa["seed"].min()], sb[sb["seed"] == sb["seed"].min()]


def with_sampling_error(seeds: stats.Diff, pooled: stats.Diff | None) -> stats.Diff:
    """Welch over seeds widened by the bootstrap over every seed's samples pooled: each run draws
    its samples with the same sampler seed, so a method's seeds share their sampling noise and
    their spread alone understates it (`stats.combined_difference`)."""
    return stats.combined_difference(seeds, pooled) if pooled is not None else seeds


def sample_differences(study: Study, key: tuple, ref_key: tuple, steps) -> dict[str, stats.Diff | None]:
    """Gen PPL (as log, token-weighted) and mean entropy of `key` minus the reference's at `steps`,
    two-sample bootstrap over samples (one seed: the lowest common one), or Welch over seeds."""
    out: dict[str, stats.Diff | None] = {"log_gen_ppl": None, "entropy_nats": None}
    a, b = _runs_of(study.genppl, key), _runs_of(study.genppl, ref_key)
    a, b = (x[x["steps"] == steps] if len(x) else x for x in (a, b))
    if a.empty or b.empty:
        return out
    several = a["seed"].nunique() > 1 and b["seed"].nunique() > 1
    sa, sb = lowest_seed_samples(study.genppl_samples, key, ref_key, steps, pooled=several)
    boot: dict[str, stats.Diff | None] = {"log_gen_ppl": None, "entropy_nats": None}
    if not (sa.empty or sb.empty):
        boot["log_gen_ppl"] = stats.bootstrap_difference(stats.log_token_ratio, sa[["nll", "n_targets"]].to_numpy(),
                                                         sb[["nll", "n_targets"]].to_numpy())
        ea, eb = sa["entropy_nats"].dropna().to_numpy()[:, None], sb["entropy_nats"].dropna().to_numpy()[:, None]
        boot["entropy_nats"] = stats.bootstrap_difference(stats.column_mean, ea, eb)
    if several:
        out["log_gen_ppl"] = with_sampling_error(stats.seed_difference(np.log(a["gen_ppl"]), np.log(b["gen_ppl"])),
                                                 boot["log_gen_ppl"])
        out["entropy_nats"] = with_sampling_error(stats.seed_difference(a["entropy_nats"], b["entropy_nats"]),
                                                  boot["entropy_nats"])
        return out
    return boot


def _marked(text: str, d: stats.Diff | None) -> str:
    return f"{text} {MARK}" if d is not None and d.significant and text != DASH else text


def genppl_table(study: Study, config: dict | None) -> Table:
    ref = reference_methods(config)
    cols = ["gen_ppl", "gen_ppl_mean_per_sample", "entropy_nats", "entropy_bits", "n", "lm_gen_ppl",
            "lm_entropy_nats", "lm_n_short"]
    keep = ("ci95_lo", "ci95_hi", "entropy_ci95_lo", "entropy_ci95_hi", "lm_ci95_lo", "lm_ci95_hi")
    agg = aggregate(_ensure(study.genppl, cols), GROUP + ["steps"], cols, keep=keep)
    ref_rows = data_rows(study.genppl_data, ["gen_ppl", "gen_ppl_mean_per_sample", "entropy_nats", "entropy_bits",
                                             "n", "ci95_lo", "ci95_hi", "entropy_ci95_lo", "entropy_ci95_hi"])
    rows = _ensure(_stack(config, agg, ref_rows.assign(steps=np.nan)), agg.columns)
    recs = rows.to_dict("records")
    diffs = [sample_differences(study, _key(r), _ref_key(r, ref), r["steps"])
             if r["method"] != "data" and _ref_key(r, ref) else {} for r in recs]
    rows["gen_ppl_ratio_vs_ref"] = [np.exp(d["log_gen_ppl"].estimate) if d.get("log_gen_ppl") else np.nan for d in diffs]
    rows["gen_ppl_significant"] = [d["log_gen_ppl"].significant if d.get("log_gen_ppl") else None for d in diffs]
    rows["entropy_diff_vs_ref"] = [d["entropy_nats"].estimate if d.get("entropy_nats") else np.nan for d in diffs]
    rows["entropy_significant"] = [d["entropy_nats"].significant if d.get("entropy_nats") else None for d in diffs]
    fref = convergence.flops_reference(study, ref)     # and against DID-F, where the study has one
    diffs_f = [sample_differences(study, _key(r), _ref_key(r, fref), r["steps"])
               if r["method"] != "data" and _ref_key(r, fref) else {} for r in recs]
    rows["gen_ppl_ratio_vs_flops_ref"] = [np.exp(d["log_gen_ppl"].estimate) if d.get("log_gen_ppl") else np.nan
                                          for d in diffs_f]
    rows["gen_ppl_flops_significant"] = [d["log_gen_ppl"].significant if d.get("log_gen_ppl") else None for d in diffs_f]
    facts = facts_of(study, config)
    data = with_facts(rows[["method", "layout", "size", "steps", "n_seeds", "gen_ppl", "gen_ppl_sd", "ci95_lo", "ci95_hi",
                            "gen_ppl_ratio_vs_ref", "gen_ppl_significant", "gen_ppl_ratio_vs_flops_ref",
                            "gen_ppl_flops_significant", "gen_ppl_mean_per_sample", "entropy_nats",
                            "entropy_nats_sd", "entropy_ci95_lo", "entropy_ci95_hi", "entropy_diff_vs_ref",
                            "entropy_significant", "entropy_bits", "lm_gen_ppl", "lm_ci95_lo", "lm_ci95_hi",
                            "lm_entropy_nats", "lm_n_short", "n"]], facts)

    def unc(r, col, lo, hi):
        if not missing(r.get(f"{col}_sd")):
            return pm(r[col], r[f"{col}_sd"])
        if missing(r[col]):
            return DASH
        return fmt(r[col]) + ("" if missing(r[lo]) or missing(r[hi]) else f" {ci_text(r[lo], r[hi])}")

    disp = _disp(rows, {**_ident_display(rows, steps=True, facts=facts),
                        "Gen PPL [95% CI]": [_marked(unc(r, "gen_ppl", "ci95_lo", "ci95_hi"), d.get("log_gen_ppl"))
                                             for r, d in zip(recs, diffs)],
                        "Entropy, nats [95% CI]": [_marked(unc(r, "entropy_nats", "entropy_ci95_lo", "entropy_ci95_hi"),
                                                           d.get("entropy_nats")) for r, d in zip(recs, diffs)],
                        "Data cut to same lengths: gen PPL": [DASH if missing(r["lm_gen_ppl"]) else
                                                              f"{fmt(r['lm_gen_ppl'])} {ci_text(r['lm_ci95_lo'], r['lm_ci95_hi'])}"
                                                              for r in recs],
                        "entropy": _f(rows, "lm_entropy_nats"),
                        "Samples": _f(rows, "n", "int")})
    return Table("genppl", "Generative perplexity and unigram entropy vs sampling steps", data, disp, [
        "Gen PPL: perplexity of the generated text under the evaluator LM (token-weighted; lower is better, "
        "but too low with low entropy means repetitive text). Entropy: unigram entropy of each sample's tokens "
        "in nats, averaged over samples. Data rows: the same statistics on held-out text.",
        "Data cut to same lengths: every sample is paired with a held-out text cut to the sample's length in "
        "evaluator tokens (entropy grows with length, so this is the fair reference for each row).",
        "[95% CI]: percentile bootstrap over samples for one seed; with several seeds ± sd over seeds. " + MARK_NOTE])


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


def mauve_text(value, sd, reason) -> str:
    """A MAUVE cell: the value (± sd), or why there is none ("n too small")."""
    if missing(value):
        return "n too small" if isinstance(reason, str) and reason.startswith("n too small") else DASH
    return pm(value, sd)


def mauve_table(study: Study, config: dict | None) -> Table:
    frame = _ensure(study.mauve, ["mauve", "mauve_sd", "n_p", "n_q", "reason"])
    rows = []
    for (m, lay, size, steps), g in frame.groupby(GROUP + ["steps"], sort=False, dropna=False):
        vals = g["mauve"].astype(float)
        seeds = g["seed"].nunique() if "seed" in g else len(g)
        sd = vals.std(ddof=1) if seeds > 1 else (g["mauve_sd"].iloc[0] if len(g) else np.nan)
        rows.append({"method": m, "layout": lay, "size": size, "steps": steps, "n_seeds": seeds,
                     "mauve": vals.mean() if vals.notna().all() else np.nan, "mauve_sd": sd,
                     "n_p": g["n_p"].min(), "n_q": g["n_q"].min(), "reason": g["reason"].dropna().iloc[0]
                     if g["reason"].notna().any() else None})
    data = sort_rows(pd.DataFrame(rows, columns=["method", "layout", "size", "steps", "n_seeds", "mauve", "mauve_sd",
                                                 "n_p", "n_q", "reason"]), config)
    steps = sorted(data["steps"].dropna().unique()) if len(data) else []
    disp_rows = []
    facts = facts_of(study, config)
    for (m, lay, size), g in data.groupby(GROUP, sort=False):
        ident = _ident_display(g.iloc[:1], facts=facts)
        row = {k: list(v)[0] for k, v in ident.items()}
        for k in steps:
            hit = g[g["steps"] == k]
            row[f"MAUVE ({fmt(k, 'int')} steps)"] = mauve_text(*hit.iloc[0][["mauve", "mauve_sd", "reason"]]) \
                if len(hit) else DASH
        row["n (human / samples)"] = f"{fmt(g['n_p'].min(), 'int')} / {fmt(g['n_q'].min(), 'int')}"
        disp_rows.append(row)
    disp = pd.DataFrame(disp_rows, columns=None if disp_rows else ["Method", "Layout", "Size"])
    return Table("mauve", "MAUVE of generated vs held-out text, by sampling steps (higher is better)",
                 with_facts(data, facts), disp,
                 ["MAUVE in [0, 1] (mauve-text; settings recorded in each mauve.json). ± is the sd over human "
                  "subsets for one seed, over seeds when there are several. \"n too small\": fewer texts than "
                  "evaluate.mauve.min_samples (default 256) on either side, where MAUVE is noise (faiss clusters a "
                  "few dozen points into 2 buckets), so no value is reported."])


def _ci_keep(cols) -> tuple[str, ...]:
    return tuple(x for c in cols for x in (f"{c}_ci95_lo", f"{c}_ci95_hi"))


def _with_ci(rows: pd.DataFrame, col: str) -> list[str]:
    """"value [lo, hi]" (the run's bootstrap CI, one seed) or "mean ± sd" (several seeds) per row."""
    out = []
    for r in rows.to_dict("records"):
        if missing(r.get(col)):
            out.append(DASH)
        elif not missing(r.get(f"{col}_sd")):
            out.append(pm(r[col], r[f"{col}_sd"]))
        elif not missing(r.get(f"{col}_ci95_lo")) and not missing(r.get(f"{col}_ci95_hi")):
            out.append(f"{fmt(r[col])} {ci_text(r[f'{col}_ci95_lo'], r[f'{col}_ci95_hi'])}")
        else:
            out.append(fmt(r[col]))
    return out


def diversity_table(study: Study, config: dict | None) -> Table:
    cols = ["entropy_nats", "entropy_bits", "distinct_1", "distinct_2", "distinct_3", "self_bleu"]
    keep = _ci_keep(["entropy_nats", "distinct_1", "distinct_2", "distinct_3", "self_bleu"])
    agg = aggregate(_ensure(study.diversity, keep), GROUP + ["steps"], cols, keep=keep)
    ref = data_rows(_ensure(study.diversity_data, keep), cols + list(keep)).assign(steps=np.nan)
    rows = _ensure(_stack(config, agg, ref), agg.columns)
    names = {"entropy_nats": "Entropy (nats)", "distinct_1": "Distinct-1", "distinct_2": "Distinct-2",
             "distinct_3": "Distinct-3", "self_bleu": "Self-BLEU"}
    facts = facts_of(study, config)
    disp = _disp(rows, {**_ident_display(rows, steps=True, facts=facts),
                        **{label: _with_ci(rows, c) for c, label in names.items()}})
    return Table("diversity", "Diversity of generated text vs sampling steps",
                 with_facts(rows[_steps_cols(cols) + list(keep)], facts), disp, [
        "Distinct-n: unique n-grams / all n-grams (higher = more diverse); Self-BLEU: mean BLEU of each "
        "sample against the others (lower = more diverse); entropy: unigram entropy in nats (bits in the CSV).",
        "[95% CI]: bootstrap over samples for one seed (distinct-n: each sample's share of the distinct n-grams "
        "resampled); ± sd over seeds when there are several."])


def lengths_table(study: Study, config: dict | None) -> Table:
    cols = ["mean", "sd", "q10", "q50", "q90", "w1", "ks", "empty_rate", "max_rate", "content_after_pad_rate"]
    keep = _ci_keep(["mean", "w1", "ks"])
    agg = aggregate(_ensure(study.lengths, keep), GROUP + ["steps"], cols, keep=keep)
    ref = data_rows(_ensure(study.lengths_data, keep[:2]), cols[:5] + list(keep[:2])).assign(steps=np.nan)
    rows = _ensure(_stack(config, agg, ref), agg.columns)
    pct = lambda v: DASH if missing(v) else f"{100 * v:.1f}%"   # noqa: E731
    quant = [DASH if missing(r["q50"]) else f"{fmt(r['q10'])} / {fmt(r['q50'])} / {fmt(r['q90'])}"
             for r in rows.to_dict("records")]
    facts = facts_of(study, config)
    disp = _disp(rows, {**_ident_display(rows, steps=True, facts=facts), "Mean length": _with_ci(rows, "mean"),
                        "SD": _f(rows, "sd"), "q10 / q50 / q90": quant, "W1 to data": _with_ci(rows, "w1"),
                        "KS to data": _with_ci(rows, "ks"), "Empty": rows["empty_rate"].map(pct),
                        "At max length": rows["max_rate"].map(pct),
                        "Content after PAD": rows["content_after_pad_rate"].map(pct)})
    return Table("lengths", "Generated sequence lengths vs the data (variable-length runs)",
                 with_facts(rows[_steps_cols(cols) + list(keep)], facts), disp, [
        "Lengths in tokens. W1: Wasserstein-1 distance (tokens) and KS: Kolmogorov-Smirnov statistic between "
        "the generated and the data length distributions (lower is closer); [95% CI]: bootstrap over samples "
        "(and data) for one seed, ± sd over seeds with several. Empty / at max length: share of samples with "
        "no content / hitting the length limit. Content after PAD (masked models on a PAD canvas): share of "
        "samples with tokens after their first PAD, which the cut at the first PAD drops."])


#: where a cost row's numbers come from (the `source` column of the cost tables)
COST_SOURCE = "interleaved cost job"
SPEED_SOURCE = "shared-machine per-run measurement"
_SOURCE_SHORT = {COST_SOURCE: "interleaved", SPEED_SOURCE: "per-run (shared machine)"}


def range_text(med, lo, hi, kind: str = "auto") -> str:
    """"median [min–max]" of a repeated measurement; just the median when the range is absent."""
    if missing(med):
        return DASH
    if missing(lo) or missing(hi):
        return fmt(med, kind)
    if kind == "ratio":
        return f"{float(med):.2f}× [{float(lo):.2f}–{float(hi):.2f}]"
    return f"{fmt(med, kind)} [{fmt(lo, kind)}–{fmt(hi, kind)}]"


def _measured(row: dict, col: str, kind: str = "auto") -> str:
    """A cost cell: median [min–max] for the interleaved job, mean ± sd over seeds for speed.json."""
    if row.get("source") == COST_SOURCE:
        return range_text(row.get(col), row.get(f"{col}_min"), row.get(f"{col}_max"), kind)
    return pm(row.get(col), row.get(f"{col}_sd"), kind)


def _source_suffix(sources: set) -> str:
    """" (interleaved cost job)" / " (shared-machine per-run measurement)" when a table has one source."""
    return f" ({next(iter(sources))})" if len(sources) == 1 and sources <= {COST_SOURCE, SPEED_SOURCE} else ""


def _inverse(x: pd.Series) -> pd.Series:
    x = pd.to_numeric(x, errors="coerce")
    return 1.0 / x.where(x != 0)


def _cost_layouts(frame: pd.DataFrame) -> set:
    return set(frame["layout"].dropna().astype(str)) if len(frame) and "layout" in frame else set()


def _ref_column(df: pd.DataFrame, ref: dict) -> pd.Series:
    given = df["reference"] if "reference" in df else pd.Series(np.nan, index=df.index)
    fallback = df["layout"].map(lambda lay: ref.get(lay, ""))
    return given.where(given.notna() & (given.astype(str) != ""), fallback)


def _cost_train_rows(study: Study, ref: dict) -> pd.DataFrame:
    """Training rows: the interleaved cost job per layout, speed.json (seed means) for layouts without one."""
    parts = []
    c = study.cost_train
    if len(c):
        c = c.drop_duplicates(GROUP, keep="last").reset_index(drop=True)
        parts.append(pd.DataFrame({
            **{k: c[k] for k in GROUP}, "source": COST_SOURCE, "n_seeds": 1.0, "params": c["params"],
            "repeats": c["repeats"],
            "s_per_step": c["s_per_step_median"], "s_per_step_min": c["s_per_step_min"],
            "s_per_step_max": c["s_per_step_max"], "s_per_step_sd": np.nan,
            "s_per_step_ratio": c["ratio_median"], "s_per_step_ratio_min": c["ratio_min"],
            "s_per_step_ratio_max": c["ratio_max"],
            "tokens_per_s": c["tokens_per_s_median"], "tokens_per_s_min": c["tokens_per_s_min"],
            "tokens_per_s_max": c["tokens_per_s_max"], "tokens_per_s_sd": np.nan,
            # tokens per step are equal within a layout: the tokens/s ratio is the inverse time ratio
            "tokens_per_s_ratio": _inverse(c["ratio_median"]), "tokens_per_s_ratio_min": _inverse(c["ratio_max"]),
            "tokens_per_s_ratio_max": _inverse(c["ratio_min"]),
            "dp_fraction": c["dp_fraction_median"], "flops_per_token": c["flops_per_token"],
            "peak_mem_mb": c["peak_mem_mb"], "reference": _ref_column(c, ref)}))
    speed = study.speed_train
    if len(speed):
        speed = speed[~speed["layout"].astype(str).isin(_cost_layouts(c))]
    if len(speed):
        b = aggregate(speed, GROUP, ["tokens_per_s", "s_per_step", "flops_per_token"])
        b["tokens_per_s_ratio"] = add_ratio(b, "tokens_per_s", ref)
        b["s_per_step_ratio"] = add_ratio(b, "s_per_step", ref)
        b["source"] = SPEED_SOURCE
        b["reference"] = [ref.get(lay, "") for lay in b["layout"]]
        parts.append(b)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=GROUP)


_COST_TRAIN_DATA = ["method", "layout", "size", "source", "n_seeds", "repeats", "params", "tokens_per_s",
                    "tokens_per_s_min", "tokens_per_s_max", "tokens_per_s_sd", "tokens_per_s_ratio",
                    "tokens_per_s_ratio_min", "tokens_per_s_ratio_max", "s_per_step", "s_per_step_min",
                    "s_per_step_max", "s_per_step_sd", "s_per_step_ratio", "s_per_step_ratio_min",
                    "s_per_step_ratio_max", "dp_fraction", "flops_per_token", "peak_mem_mb", "loop_tokens_per_s",
                    "reference"]


def cost_train_table(study: Study, config: dict | None) -> Table:
    ref = reference_methods(config)
    measured = _cost_train_rows(study, ref)
    loop = aggregate(study.runs, GROUP, ["tokens_per_s", "params"])[GROUP + ["tokens_per_s", "params"]]
    loop = loop.rename(columns={"tokens_per_s": "loop_tokens_per_s", "params": "loop_params"})
    agg = _ensure(loop.merge(measured, on=GROUP, how="outer"), _COST_TRAIN_DATA)   # a row per trained or measured model
    agg["params"] = agg["params"].combine_first(agg["loop_params"])
    agg = sort_rows(agg, config)
    rows = agg.to_dict("records")
    pct = lambda v: DASH if missing(v) else f"{100 * v:.1f}%"   # noqa: E731
    disp = _disp(agg, {**_ident_display(agg), "Params": _f(agg, "params", "int"),
                       "s/step": [_measured(r, "s_per_step") for r in rows],
                       "s/step vs ref": [_measured(r, "s_per_step_ratio", "ratio") for r in rows],
                       "Train tokens/s": [_measured(r, "tokens_per_s") for r in rows],
                       "tokens/s vs ref": [_measured(r, "tokens_per_s_ratio", "ratio") for r in rows],
                       "DP share": agg["dp_fraction"].map(pct),
                       "FLOPs/token": _f(agg, "flops_per_token", "sci"),
                       "Peak GPU MB": _f(agg, "peak_mem_mb"),
                       "Train-loop tokens/s": _f(agg, "loop_tokens_per_s"),
                       "Measured by": [_SOURCE_SHORT.get(r.get("source"), DASH) for r in rows],
                       "Reference": agg["reference"].fillna("")})
    sources = set(agg["source"].dropna())
    title = "Training cost and ratio to DID" + _source_suffix(sources)
    notes = [_ref_note(ref) + " s/step vs ref > 1: slower than the reference; tokens/s vs ref > 1: faster."]
    if COST_SOURCE in sources:
        notes.append("Interleaved: results/<study>/cost/<layout>.json, every method of the layout timed in one "
                     "process with the machine to itself, methods interleaved within each repeat, the same batch "
                     "of train.batch_size sequences and the same RNG seed in every repeat (identical work; the "
                     "spread is machine noise); median [min–max] over the repeats. The ratio is taken per repeat. "
                     "DP share: DID's part of the step spent in its alignment DP.")
    if SPEED_SOURCE in sources:
        notes.append("Per-run (shared machine): speed.json / history.csv of each run, timed while other workflow "
                     "jobs shared the machine and not interleaved with the reference; mean ± sd over seeds. "
                     "Only a rough guide: ratios mix method cost with machine load.")
    notes += ["Train-loop tokens/s: the mean throughput the training run itself logged (train.json), a separate, "
              "shared-machine measurement.",
              "FLOPs/token: the method's own estimate of training FLOPs per clean token."]
    return Table("cost_train", title, agg[_COST_TRAIN_DATA], disp, notes)


def _cost_sample_rows(study: Study, ref: dict) -> pd.DataFrame:
    keys = GROUP + ["steps"]
    parts = []
    c = study.cost_sample
    if len(c):
        c = c.drop_duplicates(keys, keep="last").reset_index(drop=True)
        parts.append(pd.DataFrame({
            **{k: c[k] for k in keys}, "source": COST_SOURCE, "n_seeds": 1.0, "n": c["n"], "repeats": c["repeats"],
            "s_per_sample": c["s_per_sample_median"], "s_per_sample_min": c["s_per_sample_min"],
            "s_per_sample_max": c["s_per_sample_max"], "s_per_sample_sd": np.nan,
            "s_per_sample_ratio": c["ratio_median"], "s_per_sample_ratio_min": c["ratio_min"],
            "s_per_sample_ratio_max": c["ratio_max"],
            "gen_tokens_per_s": c["gen_tokens_per_s_median"], "gen_tokens_per_s_min": c["gen_tokens_per_s_min"],
            "gen_tokens_per_s_max": c["gen_tokens_per_s_max"], "nfe": c["nfe"], "nfe_min": c["nfe_min"],
            "nfe_max": c["nfe_max"], "mean_length": c["mean_length"], "mean_length_min": c["mean_length_min"],
            "mean_length_max": c["mean_length_max"], "peak_mem_mb": c["peak_mem_mb"],
            "reference": _ref_column(c, ref)}))
    speed = study.speed_sample
    if len(speed):
        speed = speed[~speed["layout"].astype(str).isin(_cost_layouts(c))]
    if len(speed):
        b = aggregate(speed, keys, ["s_per_sample", "nfe", "peak_mem_mb"])
        b["s_per_sample_ratio"] = add_ratio(b, "s_per_sample", ref, match=("steps",))
        b["source"] = SPEED_SOURCE
        b["reference"] = [ref.get(lay, "") for lay in b["layout"]]
        parts.append(b)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=keys)


_COST_SAMPLE_DATA = ["method", "layout", "size", "steps", "source", "n_seeds", "n", "repeats", "s_per_sample",
                     "s_per_sample_min", "s_per_sample_max", "s_per_sample_sd", "s_per_sample_ratio",
                     "s_per_sample_ratio_min", "s_per_sample_ratio_max", "gen_tokens_per_s", "gen_tokens_per_s_min",
                     "gen_tokens_per_s_max", "nfe", "nfe_min", "nfe_max", "mean_length", "mean_length_min",
                     "mean_length_max", "peak_mem_mb", "reference"]


def cost_sample_table(study: Study, config: dict | None) -> Table:
    ref = reference_methods(config)
    keys = GROUP + ["steps"]
    measured = _ensure(_cost_sample_rows(study, ref), _COST_SAMPLE_DATA)
    gen = aggregate(study.samples, keys, ["nfe", "mean_length"])[keys + ["nfe", "mean_length"]]
    gen = gen.rename(columns={"nfe": "nfe_samples", "mean_length": "mean_length_samples"})
    agg = sort_rows(measured.merge(gen, on=keys, how="outer"), config)
    agg["nfe"] = agg["nfe"].combine_first(agg["nfe_samples"])          # NFE is a count: either file has it
    agg["mean_length"] = agg["mean_length"].combine_first(agg["mean_length_samples"])
    rows = agg.to_dict("records")

    def count_range(r, col):
        lo, hi = r.get(f"{col}_min"), r.get(f"{col}_max")
        if r.get("source") == COST_SOURCE and not missing(lo) and lo != hi:
            return range_text(r.get(col), lo, hi)
        return fmt(r.get(col), "int" if col == "nfe" else "auto")

    disp = _disp(agg, {**_ident_display(agg, steps=True),
                       "s/sample": [_measured(r, "s_per_sample") for r in rows],
                       "s/sample vs ref": [_measured(r, "s_per_sample_ratio", "ratio") for r in rows],
                       "Gen tokens/s": [_measured(r, "gen_tokens_per_s", "int") for r in rows],
                       "NFE": [count_range(r, "nfe") for r in rows],
                       "Mean length": [count_range(r, "mean_length") for r in rows],
                       "Samples/call": _f(agg, "n", "int"), "Peak GPU MB": _f(agg, "peak_mem_mb"),
                       "Measured by": [_SOURCE_SHORT.get(r.get("source"), DASH) for r in rows],
                       "Reference": agg["reference"].fillna("")})
    sources = set(agg["source"].dropna())
    title = "Inference cost per sample and ratio to DID" + _source_suffix(sources)
    notes = [_ref_note(ref) + " s/sample vs ref > 1: slower than the reference at the same number of steps."]
    if COST_SOURCE in sources:
        notes.append("Interleaved: results/<study>/cost/<layout>.json, the trained EMA weights of every method of "
                     "the layout sampled in one process with the machine to itself, methods interleaved within "
                     "each repeat, every call with a generator seeded identically (identical work; the spread is "
                     "machine noise); median [min–max] over repeats; the ratio is taken per repeat. Gen tokens/s: "
                     "generated content tokens per second; mean length in content tokens.")
    if SPEED_SOURCE in sources:
        notes.append("Per-run (shared machine): speed.json of each run (median of its own repeats, not reseeded), "
                     "timed while other workflow jobs shared the machine; mean ± sd over seeds.")
    notes.append("NFE: network forward calls for the whole batch of samples of one call (cost/speed file, else "
                 "samples.json); mean length from samples.json where the cost job has none.")
    return Table("cost_sample", title, agg[_COST_SAMPLE_DATA], disp, notes)


def jobs_table(study: Study, config: dict | None) -> Table:
    b = study.benchmarks
    if b.empty:
        data = pd.DataFrame(columns=["run", "rule", "s", "max_rss_mb"])
    else:
        data = b.groupby(["run", "method", "layout", "rule"], sort=False)[["s", "max_rss_mb"]].mean().reset_index()
        data = sort_rows(data, config)[["run", "rule", "s", "max_rss_mb"]]
    c = study.cost_train
    if len(c) and "wall_seconds" in c:                     # the study-level cost jobs, one per layout
        per = c.drop_duplicates("layout")
        cost = pd.DataFrame({"run": [f"(study) {lay}" for lay in per["layout"]], "rule": "cost",
                             "s": per["wall_seconds"].to_numpy(float), "max_rss_mb": np.nan})
        data = pd.concat([data, cost], ignore_index=True) if len(data) else cost
    disp = _disp(data, {"Run": data["run"], "Rule": data["rule"], "Wall time (s)": data["s"].map(fmt),
                        "Max RSS (MB)": data["max_rss_mb"].map(fmt)})
    return Table("jobs", "Workflow jobs (Snakemake benchmark files)", data, disp,
                 ["Whole-job wall time and peak resident memory as Snakemake's `benchmark:` recorded them "
                  "(includes start-up and I/O; mean over repeats). Rule cost: the study's cost job of a layout, "
                  "its own wall time as recorded in cost/<layout>.json."])


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


def _at_steps(df: pd.DataFrame, steps) -> pd.DataFrame:
    return df[df["steps"] == steps] if len(df) and "steps" in df else df.iloc[0:0]


def summary_table(study: Study, config: dict | None) -> Table:
    """The headline: one row per (method, layout, size), every number with its uncertainty and a
    mark where it differs significantly from DID. Built from the other tables' data (no metric is
    computed twice): ppl, genppl and mauve at the study's largest steps, and the interleaved cost job."""
    ref = reference_methods(config)
    groups = [df[GROUP] for df in (study.runs, study.ppl, study.genppl, study.mauve, study.cost_train,
                                   study.speed_train) if len(df)]
    if not groups:
        empty = pd.DataFrame(columns=GROUP)
        return Table("summary", "Headline results", empty, pd.DataFrame(columns=["Method", "Layout", "Size"]))
    t = sort_rows(pd.concat(groups).drop_duplicates().reset_index(drop=True), config)
    ppl = ppl_table(study, config).data
    gen = genppl_table(study, config).data
    gen = gen[gen["method"] != "data"]
    mau = mauve_table(study, config).data
    s_gen = gen["steps"].max() if len(gen) else np.nan
    s_mau = mau["steps"].max() if len(mau) else np.nan
    train = _cost_train_rows(study, ref)
    sample = _cost_sample_rows(study, ref)
    s_cost = sample["steps"].max() if len(sample) else np.nan

    def pick(frame, cols, steps=None):
        frame = _at_steps(frame, steps) if steps is not None else frame
        return _ensure(frame, cols)[GROUP + cols] if len(frame) else pd.DataFrame(columns=GROUP + cols)

    parts = [pick(ppl, ["nats_per_token", "nats_per_token_err", "ppl", "diff_vs_ref", "diff_significant",
                        "diff_vs_flops_ref", "diff_flops_significant", "paper_ppl"]),
             pick(gen, ["gen_ppl", "ci95_lo", "ci95_hi", "gen_ppl_significant", "gen_ppl_flops_significant",
                        "entropy_nats", "entropy_ci95_lo",
                        "entropy_ci95_hi", "entropy_significant", "lm_entropy_nats"], s_gen),
             pick(mau, ["mauve", "mauve_sd", "reason"], s_mau),
             pick(train, ["tokens_per_s_ratio", "tokens_per_s_ratio_min", "tokens_per_s_ratio_max", "source"])
             .rename(columns={"source": "train_source"}),
             pick(sample, ["s_per_sample_ratio", "s_per_sample_ratio_min", "s_per_sample_ratio_max"], s_cost)]
    for part in parts:
        t = t.merge(part.drop_duplicates(GROUP), on=GROUP, how="left")
    t = t.assign(gen_ppl_steps=s_gen, mauve_steps=s_mau, s_per_sample_steps=s_cost)
    recs = t.to_dict("records")

    facts = facts_of(study, config)
    # untrained reference rows are levels to read the others against: never marked, never a verdict
    reference_rows = {tuple(f[k] for k in GROUP) for f in facts.to_dict("records") if f["untrained"] is True}
    for col in ("diff_significant", "diff_flops_significant", "gen_ppl_significant", "gen_ppl_flops_significant",
                "entropy_significant"):
        t[col] = [None if _key(r) in reference_rows else r[col] for r in recs]
    recs = t.to_dict("records")

    def marks(r, flag, flops_flag=None):
        return ((f" {MARK}" if r[flag] is True else "")
                + (f" {FMARK}" if flops_flag and r.get(flops_flag) is True else ""))

    def bound_cell(r):
        if missing(r["nats_per_token"]):
            return DASH
        text = fmt(r["ppl"])
        if not missing(r["nats_per_token_err"]):
            lo, hi = (math.exp(min(r["nats_per_token"] + z * r["nats_per_token_err"], 700)) for z in (-Z95, Z95))
            text += f" [{fmt(lo)}, {fmt(hi)}]"
        return text + marks(r, "diff_significant", "diff_flops_significant")

    def ci_cell(r, col, lo, hi, flag, flops_flag=None):
        if missing(r[col]):
            return DASH
        ci = "" if missing(r[lo]) or missing(r[hi]) else f" {ci_text(r[lo], r[hi])}"
        return f"{fmt(r[col])}{ci}" + marks(r, flag, flops_flag)

    # each trained row's gen PPL next to its method's untrained network's (a 0-step reference run)
    init_of = {(f["base_method"], f["layout"], f["size"]): f["method"] for f in facts.to_dict("records")
               if f["untrained"] is True}
    base_of = {tuple(f[k] for k in GROUP): f["base_method"] for f in facts.to_dict("records")}
    gen_of = {tuple(r[k] for k in GROUP): r["gen_ppl"] for r in recs}

    def gen_cell(r):
        text = ci_cell(r, "gen_ppl", "ci95_lo", "ci95_hi", "gen_ppl_significant", "gen_ppl_flops_significant")
        init = init_of.get((base_of.get(_key(r)), r["layout"], r["size"]))
        level = gen_of.get((init, r["layout"], r["size"])) if init and init != r["method"] else None
        return text + (f" (init {fmt(level)})" if level is not None and not missing(level) and text != DASH else "")

    disp = _disp(t, {**_ident_display(t, facts=facts),
                     "PPL bound (strict) [95%]": [bound_cell(r) for r in recs],
                     "PPL, paper conv.": _f(t, "paper_ppl"),
                     f"Gen PPL @{fmt(s_gen, 'int')} [95%]": [gen_cell(r) for r in recs],
                     f"Entropy @{fmt(s_gen, 'int')} [95%]": [ci_cell(r, "entropy_nats", "entropy_ci95_lo",
                                                                     "entropy_ci95_hi", "entropy_significant")
                                                             for r in recs],
                     "Data entropy, same lengths": _f(t, "lm_entropy_nats"),
                     f"MAUVE @{fmt(s_mau, 'int')}": [mauve_text(r["mauve"], r["mauve_sd"], r["reason"]) for r in recs],
                     "Train tokens/s vs DID": [range_text(r["tokens_per_s_ratio"], r["tokens_per_s_ratio_min"],
                                                          r["tokens_per_s_ratio_max"], "ratio") for r in recs],
                     f"s/sample vs DID @{fmt(s_cost, 'int')}": [range_text(r["s_per_sample_ratio"],
                                                                           r["s_per_sample_ratio_min"],
                                                                           r["s_per_sample_ratio_max"], "ratio")
                                                                for r in recs]})
    data = with_facts(t[GROUP + ["ppl", "nats_per_token", "nats_per_token_err", "diff_vs_ref", "diff_significant",
                      "diff_vs_flops_ref", "diff_flops_significant", "paper_ppl",
                      "gen_ppl", "ci95_lo", "ci95_hi", "gen_ppl_significant", "gen_ppl_flops_significant", "entropy_nats", "entropy_ci95_lo",
                      "entropy_ci95_hi", "entropy_significant", "lm_entropy_nats", "gen_ppl_steps", "mauve", "mauve_sd",
                      "reason", "mauve_steps", "tokens_per_s_ratio", "tokens_per_s_ratio_min", "tokens_per_s_ratio_max",
                      "train_source", "s_per_sample_ratio", "s_per_sample_ratio_min", "s_per_sample_ratio_max",
                      "s_per_sample_steps"]], facts)
    return Table("summary", "Headline results", data, disp, [
        _ref_note(ref) + " PPL bound (strict): a valid upper bound for every method (exact for AR), 95% interval "
        "from the standard error over test sequences; paper conv.: t >= 1e-3 with the prior dropped (ppl table).",
        "@N: at the largest number of sampling steps; [95%]: bootstrap over samples (sd over seeds with several). "
        "Data entropy, same lengths: held-out text cut to each sample's length, the entropy to compare with.",
        "Cost: the interleaved cost job (methods in one process, the machine to itself, same seed every repeat), "
        "median [min–max] over repeats; tokens/s vs DID > 1: faster training than DID, s/sample vs DID > 1: "
        "slower sampling.", MARK_NOTE]
        + ([f"{FMARK}: differs from DID-F (the FLOPs-matched DID) the same way."]
           if t["diff_vs_flops_ref"].notna().any() else [])
        + (["Untrained reference rows (0 steps) are levels to read the others against, never compared."]
           if reference_rows else []))


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
        "×": r"$\times$", "≤": r"$\le$", "†": r"\textsuperscript{\dag}", "‡": r"\textsuperscript{\ddag}", "→": r"$\to$"}


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
