"""Tables of a study on a synthetic corpus (exact.json): the bound gap and the exact sample metrics.

Where the source's law is known, these replace gen PPL and MAUVE: the bound gap is how far a
method's likelihood bound sits above the true NLL of the same rows, and the samples are scored
by the source itself. Both tables are written for every study (empty without exact.json), so
the set of output files does not depend on the corpus.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.results.study import GROUP, Study
from analysis import convergence, plotting, stats
from analysis.frames import (DASH, Table, aggregate, ci_text, data_rows, display_columns, ensure_columns, facts_of,
                             fmt, fmt_column, ident_display, missing, pm, reference_key, reference_methods, row_key,
                             runs_of, sort_rows, stack_frames, with_facts)
from analysis.tables import FMARK, MARK, MARK_NOTE, bound_difference, lowest_seed_samples, with_sampling_error

GAP_COLS = ["strict_nats_per_token", "paper_nats_per_token", "exact_nats_per_token", "strict_negative_rows",
            "paper_negative_rows", "strict_n_sequences"]


def _gap_err(r: dict, col: str) -> float:
    sd = r.get(f"{col}_sd")
    return sd if not missing(sd) else r.get(col.replace("_nats_per_token", "_stderr"))


def bound_gap_table(study: Study, config: dict | None) -> Table:
    """Per method: strict and paper-convention bound minus the exact NLL of the same test rows."""
    ref = reference_methods()
    frame = ensure_columns(study.bound_gap, GAP_COLS + ["strict_stderr", "paper_stderr"])
    agg = sort_rows(aggregate(frame, GROUP, GAP_COLS, keep=("strict_stderr", "paper_stderr")), config)
    recs = agg.to_dict("records")
    # the gap difference between two methods IS their bound difference (the same rows, the exact
    # NLL cancels): the ppl table's test, paired over rows (one seed) or Welch over seeds
    diffs = [bound_difference(study, row_key(r), reference_key(r, ref)) if reference_key(r, ref) else None for r in recs]
    fref = convergence.flops_reference(study, ref)
    diffs_f = [bound_difference(study, row_key(r), reference_key(r, fref)) if reference_key(r, fref) else None for r in recs]
    agg["diff_vs_flops_ref"] = [np.nan if d is None else d.estimate for d in diffs_f]
    agg["diff_flops_lo"] = [np.nan if d is None else d.lo for d in diffs_f]
    agg["diff_flops_hi"] = [np.nan if d is None else d.hi for d in diffs_f]
    agg["diff_flops_significant"] = [None if d is None else d.significant for d in diffs_f]
    agg["strict_err"] = [_gap_err(r, "strict_nats_per_token") for r in recs]
    agg["paper_err"] = [_gap_err(r, "paper_nats_per_token") for r in recs]
    agg["err_kind"] = ["sd over seeds" if r["n_seeds"] > 1 else "stderr" for r in recs]
    agg["diff_vs_ref"] = [np.nan if d is None else d.estimate for d in diffs]
    agg["diff_lo"] = [np.nan if d is None else d.lo for d in diffs]
    agg["diff_hi"] = [np.nan if d is None else d.hi for d in diffs]
    agg["diff_significant"] = [None if d is None else d.significant for d in diffs]
    # a gap below zero beyond its error bar would be a bound that is not one
    agg["strict_below_zero"] = [bool(r["strict_nats_per_token"] + 1.96 * (r["strict_err"] or 0) < 0)
                                if not missing(r["strict_nats_per_token"]) and not missing(r["strict_err"]) else None
                                for r in agg.to_dict("records")]

    def diff_text(d):
        if d is None or missing(d.estimate):
            return DASH
        return (f"{'+' if d.estimate > 0 else ''}{fmt(d.estimate)} [{fmt(d.lo)}, {fmt(d.hi)}]"
                + (f" {MARK}" if d.significant else ""))

    facts = facts_of(study, config)
    vs_f = {"vs DID-F (95%)": [diff_text(d) for d in diffs_f]} if fref else {}
    disp = display_columns(agg, {**ident_display(agg, facts=facts), "Seeds": fmt_column(agg, "n_seeds", "int"),
                       "Bound gap, strict (nats/token)": [pm(r["strict_nats_per_token"], r["strict_err"])
                                                          for r in agg.to_dict("records")],
                       ("vs DID-S (95%)" if fref else "vs DID (95%)"): [diff_text(d) for d in diffs], **vs_f,
                       "Gap, paper conv.": [pm(r["paper_nats_per_token"], r["paper_err"])
                                            for r in agg.to_dict("records")],
                       "Exact NLL of the rows": fmt_column(agg, "exact_nats_per_token"),
                       "Rows": fmt_column(agg, "strict_n_sequences", "int")})
    data = with_facts(agg[GROUP + ["n_seeds", "strict_nats_per_token", "strict_err", "err_kind", "diff_vs_ref",
                                   "diff_lo", "diff_hi", "diff_significant", "diff_vs_flops_ref", "diff_flops_lo",
                                   "diff_flops_hi", "diff_flops_significant", "strict_below_zero",
                                   "paper_nats_per_token", "paper_err", "exact_nats_per_token",
                                   "strict_negative_rows", "paper_negative_rows", "strict_n_sequences"]], facts)
    return Table("bound_gap", "Bound gap: likelihood bound minus the exact NLL of the same test rows "
                 "(synthetic corpus; lower is better, 0 is a perfect model with a tight bound)", data, disp, [
        "Gap = (sum over test rows of the method's bound - the source's exact -log p) / sum of predicted tokens. "
        "Its expectation is KL(data || model) per token plus the looseness of the bound, so it is >= 0; the "
        "paper convention can go below 0 because it is not a bound. Exact NLL of the rows: the floor every "
        "method's bound sits above (the source's entropy rate on these rows).",
        "± is the standard error over rows for one seed, the sd over seeds with several. vs DID: the difference "
        "of gaps (= of bounds: same rows) from the reference row (DID-S: the same training sequences; DID-F: "
        "trained until its estimated FLOPs equal the most expensive baseline's). " + MARK_NOTE,
        convergence.NOTE])


_SAMPLE_COLS = ["nats_per_token", "invalid_fraction", "unigram_entropy_mean", "len_tv", "len_ks", "len_mean", "n",
                "doc_nats_per_token", "doc_invalid_fraction", "doc_n"]
_SAMPLE_KEEP = ("stderr", "invalid_ci95_lo", "invalid_ci95_hi", "len_null_tv_q95", "len_null_ks_q95", "len_tv_p",
                "len_ks_p", "doc_stderr", "doc_invalid_ci95_lo", "doc_invalid_ci95_hi")


def sample_differences(study: Study, key: tuple, ref_key: tuple, steps) -> dict[str, stats.Diff | None]:
    """Exact NLL per token and invalid fraction of `key` minus the reference's at `steps`: Welch
    over seeds widened by a bootstrap over all seeds' samples with several seeds, else a
    two-sample bootstrap over the samples of the lowest seed."""
    out: dict[str, stats.Diff | None] = {"nll": None, "invalid": None}
    a, b = (runs_of(study.exact, k) for k in (key, ref_key))
    a, b = (x[x["steps"] == steps] if len(x) else x for x in (a, b))
    if a.empty or b.empty:
        return out
    several = a["seed"].nunique() > 1 and b["seed"].nunique() > 1
    sa, sb = lowest_seed_samples(study.exact_samples, key, ref_key, steps, pooled=several)
    boot: dict[str, stats.Diff | None] = {"nll": None, "invalid": None}
    if not (sa.empty or sb.empty):
        va, vb = sa[sa["logp"].notna()], sb[sb["logp"].notna()]
        if len(va) >= 2 and len(vb) >= 2:
            boot["nll"] = stats.bootstrap_difference(stats.log_token_ratio, np.c_[-va["logp"], va["n_tokens"]],
                                                     np.c_[-vb["logp"], vb["n_tokens"]])
        boot["invalid"] = stats.bootstrap_difference(stats.column_mean, sa["logp"].isna().to_numpy(float)[:, None],
                                                     sb["logp"].isna().to_numpy(float)[:, None])
    if not several:
        return boot
    # Welch over seeds, widened by the bootstrap over all seeds' samples (shared sampler seed)
    out["nll"] = with_sampling_error(stats.seed_difference(a["nats_per_token"], b["nats_per_token"]), boot["nll"])
    out["invalid"] = with_sampling_error(stats.seed_difference(a["invalid_fraction"], b["invalid_fraction"]),
                                         boot["invalid"])
    if key[1] == "fixed":   # windows: the documents they hold whole (see exact.complete_documents)
        out["doc_nll"] = stats.seed_difference(a["doc_nats_per_token"], b["doc_nats_per_token"])
        out["doc_invalid"] = stats.seed_difference(a["doc_invalid_fraction"], b["doc_invalid_fraction"])
    return out


def exact_samples_table(study: Study, config: dict | None) -> Table:
    """Per method and sampling steps: the samples scored by the source itself, next to the data."""
    ref = reference_methods()
    frame = ensure_columns(study.exact, _SAMPLE_COLS + list(_SAMPLE_KEEP))
    agg = aggregate(frame, GROUP + ["steps"], _SAMPLE_COLS, keep=_SAMPLE_KEEP)
    data = data_rows(ensure_columns(study.exact_data, _SAMPLE_COLS + list(_SAMPLE_KEEP)),
                     _SAMPLE_COLS + list(_SAMPLE_KEEP)).assign(steps=np.nan)
    rows = ensure_columns(stack_frames(config, agg, data), agg.columns)
    recs = rows.to_dict("records")
    diffs = [sample_differences(study, row_key(r), reference_key(r, ref), r["steps"])
             if r["method"] != "data" and reference_key(r, ref) else {} for r in recs]
    rows["nll_diff_vs_ref"] = [d["nll"].estimate if d.get("nll") else np.nan for d in diffs]
    rows["nll_significant"] = [d["nll"].significant if d.get("nll") else None for d in diffs]
    rows["invalid_diff_vs_ref"] = [d["invalid"].estimate if d.get("invalid") else np.nan for d in diffs]
    rows["invalid_significant"] = [d["invalid"].significant if d.get("invalid") else None for d in diffs]
    rows["doc_nll_significant"] = [d["doc_nll"].significant if d.get("doc_nll") else None for d in diffs]
    rows["doc_invalid_significant"] = [d["doc_invalid"].significant if d.get("doc_invalid") else None for d in diffs]

    def mark(text, d):
        return f"{text} {MARK}" if d is not None and d.significant and text != DASH else text

    def nll_cell(r):
        err = r.get("nats_per_token_sd") if not missing(r.get("nats_per_token_sd")) else r.get("stderr")
        return pm(r["nats_per_token"], err)

    def nll_doc_cell(r):
        err = r.get("doc_nats_per_token_sd") if not missing(r.get("doc_nats_per_token_sd")) else r.get("doc_stderr")
        return pm(r["doc_nats_per_token"], err)

    def invalid_cell(r, p=""):
        if missing(r[f"{p}invalid_fraction"]):
            return DASH
        if not missing(r.get(f"{p}invalid_fraction_sd")):
            return f"{100 * r[f'{p}invalid_fraction']:.1f}% ± {100 * r[f'{p}invalid_fraction_sd']:.1f}"
        ci = "" if missing(r.get(f"{p}invalid_ci95_lo")) else \
            f" [{100 * r[f'{p}invalid_ci95_lo']:.1f}, {100 * r[f'{p}invalid_ci95_hi']:.1f}]"
        return f"{100 * r[f'{p}invalid_fraction']:.1f}%{ci}"

    def length_cell(r, col, null):
        if missing(r[col]):
            return DASH
        text = pm(r[col], r.get(f"{col}_sd"))
        return text + ("" if missing(r.get(null)) else f" (null q95 {fmt(r[null])})")

    facts = facts_of(study, config)
    disp = display_columns(rows, {**ident_display(rows, steps=True, facts=facts),
                        "Exact NLL (nats/token)": [mark(nll_cell(r), d.get("nll")) for r, d in zip(recs, diffs)],
                        "Invalid [95%]": [mark(invalid_cell(r), d.get("invalid")) for r, d in zip(recs, diffs)],
                        "Unigram entropy": fmt_column(rows, "unigram_entropy_mean"),
                        "Mean length": fmt_column(rows, "len_mean"),
                        "Length TV to the law": [length_cell(r, "len_tv", "len_null_tv_q95") for r in recs],
                        "Length KS": [length_cell(r, "len_ks", "len_null_ks_q95") for r in recs],
                        "Samples": fmt_column(rows, "n", "int"),
                        "Whole docs in windows: exact NLL": [mark(nll_doc_cell(r), d.get("doc_nll"))
                                                             for r, d in zip(recs, diffs)],
                        "invalid": [mark(invalid_cell(r, "doc_"), d.get("doc_invalid")) for r, d in zip(recs, diffs)],
                        "documents": fmt_column(rows, "doc_n", "int")})
    cols = ["method", "layout", "size", "steps", "n_seeds"] + [x for c in _SAMPLE_COLS for x in (c, f"{c}_sd")]
    out = with_facts(rows[cols + list(_SAMPLE_KEEP) + ["nll_diff_vs_ref", "nll_significant", "invalid_diff_vs_ref",
                                                       "invalid_significant", "doc_nll_significant",
                                                       "doc_invalid_significant"]], facts)
    return Table("exact_samples", "Samples scored by the source's exact law, by sampling steps (synthetic corpus)",
                 out, disp, [
        "Exact NLL: -log p(sample) under the source, per predicted token (varlen: symbols + 1; fixed: L-1), "
        "over the samples the source can emit; the data row is held-out data, i.e. what a perfect model scores "
        "(lower than the data means less diverse, higher means worse samples). Invalid: the share of samples "
        "the source gives probability 0 (e.g. a mismatched bracket), with a 95% Wilson interval.",
        "Length TV / KS: total variation and Kolmogorov-Smirnov distance between the generated lengths and the "
        "exact length law (varlen); null q95: the 95th percentile of the same distance for as many documents "
        "drawn from the source itself, so a value below it is indistinguishable from a perfect model.",
        "Whole docs in windows (fixed layout): a window of L-1 tokens is invalid if any token is, so the "
        "documents a window holds whole (between two EOS) are also scored by the document law; short documents "
        "fit whole more often, so compare these between methods, not with the length law.",
        "± is the standard error over samples for one seed (sd over seeds with several). " + MARK_NOTE])


def _untrained_levels(facts: pd.DataFrame) -> dict[tuple, str]:
    """(base method, layout, size) -> the label of its untrained (0-step) reference run."""
    u = facts[facts["untrained"] == True] if len(facts) else facts  # noqa: E712
    return {(r["base_method"], r["layout"], r["size"]): r["method"] for r in u.to_dict("records")}


def _past(value, err, level) -> bool:
    """Whether a trained row's value is clearly below its untrained level (by more than its 95% error)."""
    if missing(value) or missing(level):
        return False
    return bool(value + Z95 * (0 if missing(err) else err) < level)


Z95 = 1.959963984540054


def _sample_err(r: dict, col: str) -> float:
    sd = r.get(f"{col}_sd")
    if not missing(sd):
        return sd
    if col == "invalid_fraction" and not missing(r.get("invalid_ci95_hi")):
        return (r["invalid_ci95_hi"] - r["invalid_ci95_lo"]) / (2 * Z95)
    return r.get("stderr") if col == "nats_per_token" else np.nan


def _fixed_as_documents(m: pd.DataFrame) -> pd.DataFrame:
    """Fixed-layout rows with their whole-document numbers in the sample columns."""
    m = m.copy()
    fixed = m["layout"] == "fixed"
    for col in ("nats_per_token", "invalid_fraction", "nll_significant", "invalid_significant"):
        src = {"nats_per_token": "doc_nats_per_token", "invalid_fraction": "doc_invalid_fraction"}.get(col, f"doc_{col}")
        m.loc[fixed, col] = m.loc[fixed, src]
    for col, src in (("nats_per_token_sd", "doc_nats_per_token_sd"), ("stderr", "doc_stderr"),
                     ("invalid_fraction_sd", "doc_invalid_fraction_sd"), ("invalid_ci95_lo", "doc_invalid_ci95_lo"),
                     ("invalid_ci95_hi", "doc_invalid_ci95_hi")):
        m.loc[fixed, col] = m.loc[fixed, src]
    return m


def synthetic_summary(study: Study, config: dict | None) -> Table:
    """The headline of a synthetic study, the table the verdicts are drawn from: per trained row its
    budget, matching and plateau; the bound gap and its difference from DID-S and DID-F; and at the
    fewest and the most sampling steps the exact sample NLL and invalid fraction, each invalid
    fraction next to the method's untrained level. A difference is marked only where both rows
    converged (and, for samples, both are clearly past their untrained levels).

    Long on purpose: the cells of each column share the same convergence and untrained-level
    rules (closures over one set of facts), so the rule a mark follows is written once, here."""
    ref = reference_methods()
    fref = convergence.flops_reference(study, ref)
    facts = facts_of(study, config)
    conv = {tuple(r[k] for k in GROUP): bool(r["converged"]) for r in facts.to_dict("records")}
    untrained = _untrained_levels(facts)
    gap = bound_gap_table(study, config).data
    samples = exact_samples_table(study, config).data
    model = samples[samples["method"] != "data"]
    steps = sorted(model["steps"].dropna().unique()) if len(model) else []
    trained = gap.merge(facts[GROUP + ["untrained", "base_method"]], on=GROUP, how="left")
    trained = trained[trained["untrained"] != True].reset_index(drop=True)  # noqa: E712 (NaN: no facts)
    recs = trained.to_dict("records")

    def both_converged(r, refs) -> bool:
        other = refs.get(r["layout"])
        return conv.get(row_key(r), False) and conv.get((other, r["layout"], r["size"]), False)

    def diff_cell(r, col, lo, hi, sig, refs, mark=MARK):
        if missing(r.get(col)):
            return DASH
        text = f"{'+' if r[col] > 0 else ''}{fmt(r[col])} [{fmt(r[lo])}, {fmt(r[hi])}]"
        if not both_converged(r, refs):
            return text + " (n.c.)"
        return text + (f" {mark}" if r.get(sig) is True else "")

    cols = {**ident_display(trained, facts=facts), "Seeds": fmt_column(trained, "n_seeds", "int"),
            "Bound gap (nats/token)": [pm(r["strict_nats_per_token"], r["strict_err"]) for r in recs],
            ("vs DID-S [95%]" if fref else "vs DID [95%]"): [diff_cell(r, "diff_vs_ref", "diff_lo", "diff_hi",
                                                                      "diff_significant", ref) for r in recs]}
    if fref:
        cols["vs DID-F [95%]"] = [diff_cell(r, "diff_vs_flops_ref", "diff_flops_lo", "diff_flops_hi",
                                            "diff_flops_significant", fref, FMARK) for r in recs]
    data = trained[GROUP + ["n_seeds", "matching", "budget", "plateau", "converged", "strict_nats_per_token",
                            "strict_err", "diff_vs_ref", "diff_lo", "diff_hi", "diff_significant", "diff_vs_flops_ref",
                            "diff_flops_lo", "diff_flops_hi", "diff_flops_significant", "exact_nats_per_token"]].copy()
    # the *_significant columns hold the marks shown (a verdict: both rows converged); the raw tests stay in bound_gap
    data["diff_significant"] = [r.get("diff_significant") is True and both_converged(r, ref) for r in recs]
    data["diff_flops_significant"] = [r.get("diff_flops_significant") is True and both_converged(r, fref) for r in recs]
    for k in ([steps[0], steps[-1]] if len(steps) > 1 else steps):
        at = _fixed_as_documents(model[model["steps"] == k].drop_duplicates(GROUP))
        m = trained[GROUP + ["base_method"]].merge(at, on=GROUP, how="left")
        levels = {}
        for key, label in untrained.items():
            hit = at[(at["method"] == label) & (at["layout"] == key[1]) & (at["size"] == key[2])]
            if len(hit):
                levels[key] = hit.iloc[0].to_dict()
        mrecs = m.to_dict("records")
        init = [levels.get((r["base_method"], r["layout"], r["size"])) for r in mrecs]
        past = {row_key(r): _past(r["invalid_fraction"], _sample_err(r, "invalid_fraction"),
                               None if lv is None else lv["invalid_fraction"]) for r, lv in zip(mrecs, init)}

        def comparable(r, refs) -> bool:
            other = (refs.get(r["layout"]), r["layout"], r["size"])
            return both_converged(r, refs) and past.get(row_key(r), False) and past.get(other, False)

        def mark(r, significant, refs, sign):
            if significant is not True:
                return ""
            return f" {sign}" if comparable(r, refs) else f" ({sign} n.c.)" if not both_converged(r, refs) else \
                f" ({sign} not past untrained)"

        f_sig = {}
        if fref:   # the same tests against DID-F
            for r in mrecs:
                fk = (fref.get(r["layout"]), r["layout"], r["size"])
                if fk[0] and fk[0] != r["method"]:
                    d = sample_differences(study, row_key(r), fk, k)
                    lay_doc = r["layout"] == "fixed"
                    f_sig[row_key(r)] = (d.get("doc_nll" if lay_doc else "nll"), d.get("doc_invalid" if lay_doc else "invalid"))
        kk = fmt(k, "int")

        def nll_text(r):
            text = pm(r["nats_per_token"], _sample_err(r, "nats_per_token"))
            if text == DASH:
                return text
            text += mark(r, r["nll_significant"], ref, MARK)
            fs = f_sig.get(row_key(r), (None, None))[0]
            return text + (mark(r, fs.significant, fref, FMARK) if fs is not None else "")

        def invalid_text(r, lv):
            if missing(r["invalid_fraction"]):
                return DASH
            text = f"{100 * r['invalid_fraction']:.1f}%"
            if lv is not None and not missing(lv.get("invalid_fraction")):
                text += f" (init {100 * lv['invalid_fraction']:.0f}%)"
            text += mark(r, r["invalid_significant"], ref, MARK)
            fs = f_sig.get(row_key(r), (None, None))[1]
            return text + (mark(r, fs.significant, fref, FMARK) if fs is not None else "")

        cols[f"Exact NLL @{kk}"] = [nll_text(r) for r in mrecs]
        cols[f"Invalid @{kk}"] = [invalid_text(r, lv) for r, lv in zip(mrecs, init)]
        data[f"exact_nll_{int(k)}"] = m["nats_per_token"].to_numpy()
        data[f"invalid_{int(k)}"] = m["invalid_fraction"].to_numpy()
        data[f"invalid_{int(k)}_untrained"] = [np.nan if lv is None else lv.get("invalid_fraction") for lv in init]
        data[f"invalid_{int(k)}_past_untrained"] = [past.get(row_key(r)) for r in mrecs]
        shown = lambda r, sig, refs: sig is True and comparable(r, refs)   # noqa: E731
        fsig = lambda r, i: getattr(f_sig.get(row_key(r), (None, None))[i], "significant", None)   # noqa: E731
        data[f"nll_{int(k)}_significant"] = [shown(r, r["nll_significant"], ref) for r in mrecs]
        data[f"invalid_{int(k)}_significant"] = [shown(r, r["invalid_significant"], ref) for r in mrecs]
        data[f"nll_{int(k)}_flops_significant"] = [shown(r, fsig(r, 0), fref) for r in mrecs]
        data[f"invalid_{int(k)}_flops_significant"] = [shown(r, fsig(r, 1), fref) for r in mrecs]
    ref_data = samples[samples["method"] == "data"]
    note = "" if ref_data.empty else " Data: " + ", ".join(
        f"{r['layout']} {fmt(r['doc_nats_per_token'] if r['layout'] == 'fixed' else r['nats_per_token'])} nats/token"
        for r in ref_data.to_dict("records")) + "."
    marks = (f"{MARK}: differs from DID-S at 95%" + (f", {FMARK}: from DID-F" if fref else "")
             + " (Welch's t over seeds with several, else paired over test rows for bounds and a bootstrap over "
               "samples), shown only where both rows converged (n.c.: not converged) and, for samples, both are "
               "clearly below their untrained invalid level.")
    return Table("summary", "Headline results (synthetic corpus: exact metrics)", data, display_columns(trained, cols), [
        "Bound gap: strict bound minus the exact NLL of the same test rows (bound_gap table). Exact NLL @N: "
        "samples at N sampling steps scored by the source (exact_samples table), to compare with the data's "
        "exact NLL; fixed-layout rows score the documents their windows hold whole." + note,
        "Invalid: samples the source cannot emit; init: the same method's untrained network (its initial "
        "weights), the level a trained model must clearly beat before it is compared. " + marks,
        convergence.NOTE,
        "Reference (\"DID\") per layout: " + ", ".join(f"{m} for {lay}" for lay, m in sorted(ref.items()))
        + ("; DID-F: " + ", ".join(f"{m} for {lay}" for lay, m in sorted(fref.items())) if fref else "") + "."])



__all__ = ["bound_gap_table", "exact_samples_table", "synthetic_summary", "ci_text"]


# --- figures ------------------------------------------------------------------------------------
def _gap_curves(study: Study) -> pd.DataFrame:
    """Validation-curve points as gaps: the strict bound minus the exact NLL of the same valid rows."""
    h = study.history
    if h.empty or "valid_nats_per_token" not in h.columns or study.bound_gap.empty:
        return pd.DataFrame()
    floor = study.bound_gap.set_index("run")["valid_exact_nats_per_token"]
    v = h.dropna(subset=["valid_nats_per_token"]).copy()
    v["floor"] = v["run"].map(floor)
    v = v.dropna(subset=["floor"])
    v["gap"] = v["valid_nats_per_token"] - v["floor"]
    return v


def gap_curve_figure(study: Study, config: dict | None, path):
    """Bound gap on the validation rows vs optimizer step and vs training FLOPs, mean ± sd over seeds."""
    title = ("Bound gap during training: strict validation bound minus the exact NLL of the same rows\n"
             "(synthetic corpus; mean ± sd over seeds; 0 = the true law with a tight bound)")
    v = _gap_curves(study)
    if v.empty:
        return plotting.placeholder(path, "Bound gap during training", "no synthetic study with validation curves")

    @plotting.styled
    def draw():
        panels = [(c, lab, log) for c, lab, log in (("step", "optimizer step", False),
                                                    ("train_flops", "training FLOPs (estimated, log scale)", True))
                  if c in v.columns and v[c].notna().any()]
        colors = plotting.study_colors(study)
        fig, axes = plotting.new_figure(len(panels), title)
        for (m, lay, size), g in sort_rows(v, config).groupby(GROUP, sort=False):
            kw = dict(color=colors[str(m)], ls=plotting.LINESTYLE.get(lay, "-"), marker=plotting.MARKER.get(lay, "o"), ms=3.5)
            for ax, (col, _, log) in zip(axes, panels):
                a = g.groupby("step").agg(x=(col, "mean"), y=("gap", "mean"), sd=("gap", "std")).reset_index()
                a = a[a["x"] > 0] if log else a
                ax.plot(a["x"], a["y"], label=f"{m} ({lay})", **kw)
                sd = a["sd"].fillna(0).to_numpy(float)
                ax.fill_between(a["x"], a["y"] - sd, a["y"] + sd, color=kw["color"], alpha=0.15, lw=0)
        for ax, (col, lab, log) in zip(axes, panels):
            if log:
                plotting.log_x(ax)
            ax.axhline(0, color="0.3", lw=1, ls=":")
            ax.set_xlabel(lab)
            ax.set_ylabel("bound gap (nats/token)")
            ax.set_ylim(bottom=min(0, float(v["gap"].min())) - 0.05, top=float(v["gap"].quantile(0.97)) * 1.1 + 0.1)
        axes[-1].legend(fontsize=8)
        return plotting.save_figure(fig, path)

    return draw()


def _whole_documents_for_fixed(frame: pd.DataFrame) -> pd.DataFrame:
    """Fixed-layout rows with their whole-document numbers in the sample columns (a window is
    invalid if any of its L-1 tokens is, so the documents it holds whole are what compares)."""
    f = frame.copy()
    fixed = f["layout"] == "fixed"
    for col in ("nats_per_token", "stderr", "invalid_fraction", "invalid_ci95_lo", "invalid_ci95_hi"):
        if f"doc_{col}" in f.columns:
            f.loc[fixed, col] = f.loc[fixed, f"doc_{col}"]
    return f


def exact_steps_figure(study: Study, config: dict | None, path):
    """Exact sample NLL and invalid fraction vs sampling steps, per layout, with the data's value."""
    title = "Samples scored by the source vs sampling steps (synthetic corpus; bars: sd over seeds or 95% CI)"
    frame = study.exact
    if frame.empty or frame["nats_per_token"].notna().sum() == 0:
        return plotting.placeholder(path, "Exact sample NLL vs sampling steps", "no synthetic study (exact.json)")

    @plotting.styled
    def draw():
        f = _whole_documents_for_fixed(frame)
        agg = sort_rows(aggregate(f, GROUP + ["steps"], ["nats_per_token", "invalid_fraction"],
                                  keep=("stderr", "invalid_ci95_lo", "invalid_ci95_hi")), config)
        layouts = plotting.layouts_present(agg)
        colors = plotting.study_colors(study)
        untrained = convergence.untrained_labels(study)
        fig = Figure(figsize=(6.2 * len(layouts), 8.2), layout="constrained")
        fig.suptitle(title, fontsize=12, fontweight="bold")
        for j, layout in enumerate(layouts):
            ax_n, ax_i = fig.add_subplot(2, len(layouts), j + 1), fig.add_subplot(2, len(layouts), len(layouts) + j + 1)
            sub = agg[agg["layout"] == layout]
            for (m, lay, size), g in sub.groupby(GROUP, sort=False):
                g = g.sort_values("steps")
                kw = dict(color=colors[str(m)], ls=plotting.LINESTYLE.get(lay, "-"), marker=plotting.MARKER.get(lay, "o"),
                          capsize=3, label=str(m))
                if str(m) in untrained:   # a reference level, not a competitor
                    kw.update(color="0.6", ls=":", marker="x", label=f"{m} (untrained)")
                several = g["n_seeds"].max() > 1
                err_n = g["nats_per_token_sd"] if several else 1.96 * g["stderr"]
                ax_n.errorbar(g["steps"], g["nats_per_token"], yerr=err_n.fillna(0).to_numpy(float), **kw)
                y = 100 * g["invalid_fraction"].to_numpy(float)
                if several:
                    err_i = 100 * g["invalid_fraction_sd"].fillna(0).to_numpy(float)
                else:
                    err_i = np.clip(np.vstack([y - 100 * g["invalid_ci95_lo"].to_numpy(float),
                                               100 * g["invalid_ci95_hi"].to_numpy(float) - y]), 0, None)
                ax_i.errorbar(g["steps"], y, yerr=np.nan_to_num(err_i), **kw)
            data = _whole_documents_for_fixed(study.exact_data) if len(study.exact_data) else study.exact_data
            ref = data[data["layout"] == layout] if len(data) else data
            if len(ref):
                ax_n.axhline(ref["nats_per_token"].mean(), color="0.3", ls=":", lw=1.5, label="data (held out)")
            for ax in (ax_n, ax_i):
                plotting.steps_axis(ax, sub["steps"])
                ax.grid(True, alpha=0.3)
            ax_n.set_title(f"{layout} layout" + (": the documents windows hold whole" if layout == "fixed" else ""),
                           fontsize=10)
            ax_n.set_ylabel("exact NLL of samples (nats/token)")
            ax_i.set_ylabel("invalid samples (%)")
            ax_i.set_xlabel("sampling steps")
            ax_n.legend(fontsize=8)
        return plotting.save_figure(fig, path)

    return draw()


def length_cdf_figure(study: Study, config: dict | None, path):
    """Generated length CDF per method (pooled over seeds) against the source's exact length law."""
    per = study.exact_samples
    title = "Generated length CDF vs the exact length law (synthetic corpus, variable-length runs)"
    if per.empty or "length" not in per.columns or per["length"].notna().sum() == 0 or not study.length_pmf:
        return plotting.placeholder(path, "Generated length CDF", "no synthetic variable-length study (exact.json)")

    @plotting.styled
    def draw():
        p = per.dropna(subset=["length"])
        steps = sorted(p["steps"].dropna().unique())
        shown = [steps[0], steps[-1]] if len(steps) > 1 else steps
        colors = plotting.study_colors(study)
        fig, axes = plotting.new_figure(len(shown), title, sharey=True)
        pmf = np.asarray(study.length_pmf, float)
        law = np.cumsum(pmf)
        for ax, k in zip(axes, shown):
            ax.step(np.arange(law.size), law, where="post", color="0.1", lw=2.2, label="exact law")
            for (m, lay, size), g in sort_rows(p[p["steps"] == k], config).groupby(GROUP, sort=False):
                if str(m) in convergence.untrained_labels(study):
                    continue   # an untrained network's lengths only say where its sampler stops
                x = np.sort(g["length"].to_numpy(float))
                ax.step(np.r_[0, x], np.r_[0, np.arange(1, x.size + 1) / x.size], where="post", color=colors[str(m)],
                        lw=1.4, label=f"{m} (n={x.size})")
            ax.set_title(f"{fmt(k, 'int')} sampling steps", fontsize=10)
            ax.set_xlabel("length (symbols)")
            ax.set_xlim(0, law.size)
        axes[0].set_ylabel("cumulative fraction")
        axes[-1].legend(fontsize=8, loc="lower right")
        return plotting.save_figure(fig, path)

    return draw()


def synthetic_figures(study: Study, config: dict | None, out_dir) -> list:
    from pathlib import Path

    out = Path(out_dir)
    return [gap_curve_figure(study, config, out / "bound_gap_curves.png"),
            exact_steps_figure(study, config, out / "exact_steps.png"),
            length_cdf_figure(study, config, out / "length_cdf.png")]
