"""The study's tables: numbers as CSV (full precision), and Markdown + LaTeX for reading.

Each table function takes a loaded `Study` and returns a `Table`; nothing here computes a
metric, it only aggregates seeds (mean, and sd when there are several) and divides by the
reference method (the ratio-to-DID columns). A missing value is an empty CSV cell and "–" in
Markdown/LaTeX. LaTeX is written by hand (no jinja2 dependency) and needs `booktabs`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from harness.core.metric_registry import plugin_metrics
from harness.results.study import GROUP, Study
from analysis import convergence, stats
from analysis.cost_tables import (cost_sample_rows, cost_sample_table, cost_train_rows, cost_train_table, jobs_table,
                                  range_text)
from analysis.frames import (DASH, Table, aggregate, ci_text, data_rows, display_columns, ensure_columns, error_of,
                             facts_of, fmt, fmt_column, ident_display, missing, pm, pm_column, reference_key,
                             reference_methods, reference_note, row_key, runs_of, sort_rows, stack_frames,
                             steps_columns, with_facts)


MARK = "†"


FMARK = "‡"   # differs from DID-F (the FLOPs-matched DID row)


Z95 = stats.Z95


MARK_NOTE = (f"{MARK}: differs from the reference (DID) row at 95%: paired over the same test sequences for "
             "bounds, a two-sample bootstrap over samples for gen PPL and entropy, Welch's t over seeds "
             "when both rows have several seeds.")


def bound_difference(study: Study, key: tuple, ref_key: tuple, col: str = "strict") -> stats.Diff | None:
    """Bound of `key` minus the reference's (nats/token).

    Both with >= 2 seeds: Welch over seeds, widened by the evaluation's own error. Every seed of
    every method is scored on the same test rows with the same Monte-Carlo draws, so the seed
    spread leaves out the error of those rows and draws (shared by a method's seeds); it is the
    paired test over rows of the seed-averaged per-row bounds (`stats.combined_difference`).
    Otherwise paired over the common test sequences of one common seed (the lowest)."""
    a, b = runs_of(study.ppl, key), runs_of(study.ppl, ref_key)
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
    sa, sb = runs_of(seq, key), runs_of(seq, ref_key)
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
    sa, sb = runs_of(seq, key), runs_of(seq, ref_key)
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
    ref = reference_methods()
    cols = ["nats_per_token", "ppl", "paper_nats_per_token", "paper_ppl", "low_slice_nats_per_token",
            "insertion_mass_at_t0_mean", "n_sequences", "n_tokens"]
    agg = aggregate(ensure_columns(study.ppl, cols), GROUP, cols, keep=("stderr", "paper_stderr"))
    agg = sort_rows(agg, config)
    agg.insert(3, "dataset", study.corpus or "")
    recs = agg.to_dict("records")
    agg["nats_per_token_err"] = [error_of(r, "nats_per_token", "stderr") for r in recs]
    agg["paper_nats_per_token_err"] = [error_of(r, "paper_nats_per_token", "paper_stderr") for r in recs]
    agg["err_kind"] = ["sd over seeds" if r["n_seeds"] > 1 else "stderr" for r in recs]
    diffs = [bound_difference(study, row_key(r), reference_key(r, ref)) if reference_key(r, ref) else None for r in recs]
    fref = convergence.flops_reference(study, ref)
    diffs_f = [bound_difference(study, row_key(r), reference_key(r, fref)) if reference_key(r, fref) else None for r in recs]
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
    disp = display_columns(agg, {**ident_display(agg, facts=facts), "Seeds": fmt_column(agg, "n_seeds", "int"),
                       "NLL bound, strict (nats/token)": pm_column(agg, "nats_per_token", "nats_per_token_err"),
                       "PPL bound": pm_column(agg, "ppl"),
                       ("vs DID-S (nats/token, 95%)" if fref else "vs DID (nats/token, 95%)"): [_diff_text(d) for d in diffs],
                       **vs_f,
                       "Paper convention (nats/token)": pm_column(agg, "paper_nats_per_token", "paper_nats_per_token_err"),
                       "PPL (paper conv.)": fmt_column(agg, "paper_ppl"),
                       "of which t < 1e-3": fmt_column(agg, "low_slice_nats_per_token"),
                       "Insertions as t→0": fmt_column(agg, "insertion_mass_at_t0_mean"),
                       "Tokens": fmt_column(agg, "n_tokens", "int")})
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
    sa, sb = (runs_of(per, k) for k in (key, ref_key))
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
    a, b = runs_of(study.genppl, key), runs_of(study.genppl, ref_key)
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
    ref = reference_methods()
    cols = ["gen_ppl", "gen_ppl_mean_per_sample", "entropy_nats", "entropy_bits", "n", "lm_gen_ppl",
            "lm_entropy_nats", "lm_n_short"]
    keep = ("ci95_lo", "ci95_hi", "entropy_ci95_lo", "entropy_ci95_hi", "lm_ci95_lo", "lm_ci95_hi")
    agg = aggregate(ensure_columns(study.genppl, cols), GROUP + ["steps"], cols, keep=keep)
    ref_rows = data_rows(study.genppl_data, ["gen_ppl", "gen_ppl_mean_per_sample", "entropy_nats", "entropy_bits",
                                             "n", "ci95_lo", "ci95_hi", "entropy_ci95_lo", "entropy_ci95_hi"])
    rows = ensure_columns(stack_frames(config, agg, ref_rows.assign(steps=np.nan)), agg.columns)
    recs = rows.to_dict("records")
    diffs = [sample_differences(study, row_key(r), reference_key(r, ref), r["steps"])
             if r["method"] != "data" and reference_key(r, ref) else {} for r in recs]
    rows["gen_ppl_ratio_vs_ref"] = [np.exp(d["log_gen_ppl"].estimate) if d.get("log_gen_ppl") else np.nan for d in diffs]
    rows["gen_ppl_significant"] = [d["log_gen_ppl"].significant if d.get("log_gen_ppl") else None for d in diffs]
    rows["entropy_diff_vs_ref"] = [d["entropy_nats"].estimate if d.get("entropy_nats") else np.nan for d in diffs]
    rows["entropy_significant"] = [d["entropy_nats"].significant if d.get("entropy_nats") else None for d in diffs]
    fref = convergence.flops_reference(study, ref)     # and against DID-F, where the study has one
    diffs_f = [sample_differences(study, row_key(r), reference_key(r, fref), r["steps"])
               if r["method"] != "data" and reference_key(r, fref) else {} for r in recs]
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

    disp = display_columns(rows, {**ident_display(rows, steps=True, facts=facts),
                        "Gen PPL [95% CI]": [_marked(unc(r, "gen_ppl", "ci95_lo", "ci95_hi"), d.get("log_gen_ppl"))
                                             for r, d in zip(recs, diffs)],
                        "Entropy, nats [95% CI]": [_marked(unc(r, "entropy_nats", "entropy_ci95_lo", "entropy_ci95_hi"),
                                                           d.get("entropy_nats")) for r, d in zip(recs, diffs)],
                        "Data cut to same lengths: gen PPL": [DASH if missing(r["lm_gen_ppl"]) else
                                                              f"{fmt(r['lm_gen_ppl'])} {ci_text(r['lm_ci95_lo'], r['lm_ci95_hi'])}"
                                                              for r in recs],
                        "entropy": fmt_column(rows, "lm_entropy_nats"),
                        "Samples": fmt_column(rows, "n", "int")})
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
    frame = ensure_columns(study.mauve, ["mauve", "mauve_sd", "n_p", "n_q", "reason"])
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
        ident = ident_display(g.iloc[:1], facts=facts)
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
    agg = aggregate(ensure_columns(study.diversity, keep), GROUP + ["steps"], cols, keep=keep)
    ref = data_rows(ensure_columns(study.diversity_data, keep), cols + list(keep)).assign(steps=np.nan)
    rows = ensure_columns(stack_frames(config, agg, ref), agg.columns)
    names = {"entropy_nats": "Entropy (nats)", "distinct_1": "Distinct-1", "distinct_2": "Distinct-2",
             "distinct_3": "Distinct-3", "self_bleu": "Self-BLEU"}
    facts = facts_of(study, config)
    disp = display_columns(rows, {**ident_display(rows, steps=True, facts=facts),
                        **{label: _with_ci(rows, c) for c, label in names.items()}})
    return Table("diversity", "Diversity of generated text vs sampling steps",
                 with_facts(rows[steps_columns(cols) + list(keep)], facts), disp, [
        "Distinct-n: unique n-grams / all n-grams (higher = more diverse); Self-BLEU: mean BLEU of each "
        "sample against the others (lower = more diverse); entropy: unigram entropy in nats (bits in the CSV).",
        "[95% CI]: bootstrap over samples for one seed (distinct-n: each sample's share of the distinct n-grams "
        "resampled); ± sd over seeds when there are several."])


def lengths_table(study: Study, config: dict | None) -> Table:
    cols = ["mean", "sd", "q10", "q50", "q90", "w1", "ks", "empty_rate", "max_rate", "content_after_pad_rate"]
    keep = _ci_keep(["mean", "w1", "ks"])
    agg = aggregate(ensure_columns(study.lengths, keep), GROUP + ["steps"], cols, keep=keep)
    ref = data_rows(ensure_columns(study.lengths_data, keep[:2]), cols[:5] + list(keep[:2])).assign(steps=np.nan)
    rows = ensure_columns(stack_frames(config, agg, ref), agg.columns)
    pct = lambda v: DASH if missing(v) else f"{100 * v:.1f}%"   # noqa: E731
    quant = [DASH if missing(r["q50"]) else f"{fmt(r['q10'])} / {fmt(r['q50'])} / {fmt(r['q90'])}"
             for r in rows.to_dict("records")]
    facts = facts_of(study, config)
    disp = display_columns(rows, {**ident_display(rows, steps=True, facts=facts), "Mean length": _with_ci(rows, "mean"),
                        "SD": fmt_column(rows, "sd"), "q10 / q50 / q90": quant, "W1 to data": _with_ci(rows, "w1"),
                        "KS to data": _with_ci(rows, "ks"), "Empty": rows["empty_rate"].map(pct),
                        "At max length": rows["max_rate"].map(pct),
                        "Content after PAD": rows["content_after_pad_rate"].map(pct)})
    return Table("lengths", "Generated sequence lengths vs the data (variable-length runs)",
                 with_facts(rows[steps_columns(cols) + list(keep)], facts), disp, [
        "Lengths in tokens. W1: Wasserstein-1 distance (tokens) and KS: Kolmogorov-Smirnov statistic between "
        "the generated and the data length distributions (lower is closer); [95% CI]: bootstrap over samples "
        "(and data) for one seed, ± sd over seeds with several. Empty / at max length: share of samples with "
        "no content / hitting the length limit. Content after PAD (masked models on a PAD canvas): share of "
        "samples with tokens after their first PAD, which the cut at the first PAD drops."])


def plugin_table(study: Study, config: dict | None, metric) -> Table:
    """The table of a plugin metric (harness.core.metric_registry): its numbers per run, averaged
    over seeds per method (and sampling steps, when its values have them), each with its 95% CI
    (one seed) or ± sd over seeds, and each row's budget, matching and plateau."""
    frame = study.extra.get(metric.name, pd.DataFrame(columns=GROUP + ["seed"]))
    cols = [c for c in frame.columns if c not in GROUP + ["run", "seed", "base_method", "steps", "nonfinite"]
            and not c.endswith(("_ci95_lo", "_ci95_hi"))]
    keep = tuple(x for x in _ci_keep(cols) if x in frame.columns)
    per_steps = "steps" in frame.columns
    rows = sort_rows(aggregate(frame, GROUP + (["steps"] if per_steps else []), cols, keep=keep), config)
    facts = facts_of(study, config)
    disp = display_columns(rows, {**ident_display(rows, steps=per_steps, facts=facts),
                                  **{c: _with_ci(rows, c) for c in cols}})
    data = rows[(steps_columns(cols) if per_steps else [x for x in steps_columns(cols) if x != "steps"]) + list(keep)]
    return Table(metric.name, metric.title or metric.help, with_facts(data, facts), disp, [
        f"Plugin metric {metric.name!r} ({metric.module}); columns are its result keys. [95% CI]: the metric's own "
        "interval for one seed; ± sd over seeds when there are several."])


def plugin_tables(study: Study, config: dict | None) -> list[Table]:
    """One table per plugin metric the study has results of."""
    return [plugin_table(study, config, m) for m in plugin_metrics() if m.name in study.extra]


TABLES = (ppl_table, genppl_table, mauve_table, diversity_table, lengths_table, cost_train_table,
          cost_sample_table, jobs_table)


def all_tables(study: Study, config: dict | None) -> list[Table]:
    return [f(study, config) for f in TABLES] + plugin_tables(study, config)


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
    ref = reference_methods()
    t, steps = _headline_frame(study, config, ref)
    if t is None:
        empty = pd.DataFrame(columns=GROUP)
        return Table("summary", "Headline results", empty, pd.DataFrame(columns=["Method", "Layout", "Size"]))
    facts = facts_of(study, config)
    # untrained reference rows are levels to read the others against: never marked, never a verdict
    reference_rows = {tuple(f[k] for k in GROUP) for f in facts.to_dict("records") if f["untrained"] is True}
    recs = t.to_dict("records")
    for col in ("diff_significant", "diff_flops_significant", "gen_ppl_significant", "gen_ppl_flops_significant",
                "entropy_significant"):
        t[col] = [None if row_key(r) in reference_rows else r[col] for r in recs]
    disp = _headline_display(t, facts, steps)
    data = with_facts(t[GROUP + ["ppl", "nats_per_token", "nats_per_token_err", "diff_vs_ref", "diff_significant",
                      "diff_vs_flops_ref", "diff_flops_significant", "paper_ppl",
                      "gen_ppl", "ci95_lo", "ci95_hi", "gen_ppl_significant", "gen_ppl_flops_significant", "entropy_nats", "entropy_ci95_lo",
                      "entropy_ci95_hi", "entropy_significant", "lm_entropy_nats", "gen_ppl_steps", "mauve", "mauve_sd",
                      "reason", "mauve_steps", "tokens_per_s_ratio", "tokens_per_s_ratio_min", "tokens_per_s_ratio_max",
                      "train_source", "s_per_sample_ratio", "s_per_sample_ratio_min", "s_per_sample_ratio_max",
                      "s_per_sample_steps"]], facts)
    return Table("summary", "Headline results", data, disp, [
        reference_note(ref) + " PPL bound (strict): a valid upper bound for every method (exact for AR), 95% interval "
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


def _headline_frame(study: Study, config: dict | None, ref: dict) -> tuple[pd.DataFrame | None, dict]:
    """The headline's rows: every (method, layout, size) with the other tables' columns merged in
    (gen PPL and MAUVE at their largest steps, sampling cost at its largest steps); None without rows.
    Returns it with {"gen": steps, "mauve": steps, "cost": steps}."""
    groups = [df[GROUP] for df in (study.runs, study.ppl, study.genppl, study.mauve, study.cost_train,
                                   study.speed_train) if len(df)]
    if not groups:
        return None, {}
    t = sort_rows(pd.concat(groups).drop_duplicates().reset_index(drop=True), config)
    ppl = ppl_table(study, config).data
    gen = genppl_table(study, config).data
    gen = gen[gen["method"] != "data"]
    mau = mauve_table(study, config).data
    s_gen = gen["steps"].max() if len(gen) else np.nan
    s_mau = mau["steps"].max() if len(mau) else np.nan
    train = cost_train_rows(study, ref)
    sample = cost_sample_rows(study, ref)
    s_cost = sample["steps"].max() if len(sample) else np.nan

    def pick(frame, cols, steps=None):
        frame = _at_steps(frame, steps) if steps is not None else frame
        return ensure_columns(frame, cols)[GROUP + cols] if len(frame) else pd.DataFrame(columns=GROUP + cols)

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
    return t, {"gen": s_gen, "mauve": s_mau, "cost": s_cost}


def _headline_display(t: pd.DataFrame, facts: pd.DataFrame, steps: dict) -> pd.DataFrame:
    """The headline's display cells: each number with its interval and its significance marks,
    each trained row's gen PPL next to its method's untrained network's (a 0-step reference run)."""
    recs = t.to_dict("records")
    s_gen, s_mau, s_cost = steps["gen"], steps["mauve"], steps["cost"]

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

    init_of = {(f["base_method"], f["layout"], f["size"]): f["method"] for f in facts.to_dict("records")
               if f["untrained"] is True}
    base_of = {tuple(f[k] for k in GROUP): f["base_method"] for f in facts.to_dict("records")}
    gen_of = {tuple(r[k] for k in GROUP): r["gen_ppl"] for r in recs}

    def gen_cell(r):
        text = ci_cell(r, "gen_ppl", "ci95_lo", "ci95_hi", "gen_ppl_significant", "gen_ppl_flops_significant")
        init = init_of.get((base_of.get(row_key(r)), r["layout"], r["size"]))
        level = gen_of.get((init, r["layout"], r["size"])) if init and init != r["method"] else None
        return text + (f" (init {fmt(level)})" if level is not None and not missing(level) and text != DASH else "")

    return display_columns(t, {**ident_display(t, facts=facts),
                     "PPL bound (strict) [95%]": [bound_cell(r) for r in recs],
                     "PPL, paper conv.": fmt_column(t, "paper_ppl"),
                     f"Gen PPL @{fmt(s_gen, 'int')} [95%]": [gen_cell(r) for r in recs],
                     f"Entropy @{fmt(s_gen, 'int')} [95%]": [ci_cell(r, "entropy_nats", "entropy_ci95_lo",
                                                                     "entropy_ci95_hi", "entropy_significant")
                                                             for r in recs],
                     "Data entropy, same lengths": fmt_column(t, "lm_entropy_nats"),
                     f"MAUVE @{fmt(s_mau, 'int')}": [mauve_text(r["mauve"], r["mauve_sd"], r["reason"]) for r in recs],
                     "Train tokens/s vs DID": [range_text(r["tokens_per_s_ratio"], r["tokens_per_s_ratio_min"],
                                                          r["tokens_per_s_ratio_max"], "ratio") for r in recs],
                     f"s/sample vs DID @{fmt(s_cost, 'int')}": [range_text(r["s_per_sample_ratio"],
                                                                           r["s_per_sample_ratio_min"],
                                                                           r["s_per_sample_ratio_max"], "ratio")
                                                                for r in recs]})


