"""The cost tables: training and sampling time, throughput and memory per method, from the
interleaved cost job (harness.metrics.cost) where it ran and the per-run measurements otherwise,
each with its source named; and the jobs table (Snakemake's benchmark files).
"""
from __future__ import annotations


import numpy as np
import pandas as pd

from harness.results.study import GROUP, Study
from analysis.frames import (DASH, Table, add_ratio, aggregate, display_columns, ensure_columns, fmt, fmt_column,
                             ident_display, missing, pm, reference_methods, reference_note, sort_rows)


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


def cost_train_rows(study: Study, ref: dict) -> pd.DataFrame:
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
    ref = reference_methods()
    measured = cost_train_rows(study, ref)
    loop = aggregate(study.runs, GROUP, ["tokens_per_s", "params"])[GROUP + ["tokens_per_s", "params"]]
    loop = loop.rename(columns={"tokens_per_s": "loop_tokens_per_s", "params": "loop_params"})
    agg = ensure_columns(loop.merge(measured, on=GROUP, how="outer"), _COST_TRAIN_DATA)   # a row per trained or measured model
    agg["params"] = agg["params"].combine_first(agg["loop_params"])
    agg = sort_rows(agg, config)
    rows = agg.to_dict("records")
    pct = lambda v: DASH if missing(v) else f"{100 * v:.1f}%"   # noqa: E731
    disp = display_columns(agg, {**ident_display(agg), "Params": fmt_column(agg, "params", "int"),
                       "s/step": [_measured(r, "s_per_step") for r in rows],
                       "s/step vs ref": [_measured(r, "s_per_step_ratio", "ratio") for r in rows],
                       "Train tokens/s": [_measured(r, "tokens_per_s") for r in rows],
                       "tokens/s vs ref": [_measured(r, "tokens_per_s_ratio", "ratio") for r in rows],
                       "DP share": agg["dp_fraction"].map(pct),
                       "FLOPs/token": fmt_column(agg, "flops_per_token", "sci"),
                       "Peak GPU MB": fmt_column(agg, "peak_mem_mb"),
                       "Train-loop tokens/s": fmt_column(agg, "loop_tokens_per_s"),
                       "Measured by": [_SOURCE_SHORT.get(r.get("source"), DASH) for r in rows],
                       "Reference": agg["reference"].fillna("")})
    sources = set(agg["source"].dropna())
    title = "Training cost and ratio to DID" + _source_suffix(sources)
    notes = [reference_note(ref) + " s/step vs ref > 1: slower than the reference; tokens/s vs ref > 1: faster."]
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


def cost_sample_rows(study: Study, ref: dict) -> pd.DataFrame:
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
            "flops_per_sample": c["flops_per_sample"], "flops_per_gen_token": c["flops_per_gen_token"],
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
                     "mean_length_max", "peak_mem_mb", "flops_per_sample", "flops_per_gen_token", "reference"]


def cost_sample_table(study: Study, config: dict | None) -> Table:
    ref = reference_methods()
    keys = GROUP + ["steps"]
    measured = ensure_columns(cost_sample_rows(study, ref), _COST_SAMPLE_DATA)
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

    disp = display_columns(agg, {**ident_display(agg, steps=True),
                       "s/sample": [_measured(r, "s_per_sample") for r in rows],
                       "s/sample vs ref": [_measured(r, "s_per_sample_ratio", "ratio") for r in rows],
                       "Gen tokens/s": [_measured(r, "gen_tokens_per_s", "int") for r in rows],
                       "NFE": [count_range(r, "nfe") for r in rows],
                       "Mean length": [count_range(r, "mean_length") for r in rows],
                       "GFLOPs/sample": [fmt(v / 1e9) if not missing(v) else DASH for v in agg["flops_per_sample"]],
                       "MFLOPs/gen token": [fmt(v / 1e6) if not missing(v) else DASH
                                            for v in agg["flops_per_gen_token"]],
                       "Samples/call": fmt_column(agg, "n", "int"), "Peak GPU MB": fmt_column(agg, "peak_mem_mb"),
                       "Measured by": [_SOURCE_SHORT.get(r.get("source"), DASH) for r in rows],
                       "Reference": agg["reference"].fillna("")})
    sources = set(agg["source"].dropna())
    title = "Inference cost per sample and ratio to DID" + _source_suffix(sources)
    notes = [reference_note(ref) + " s/sample vs ref > 1: slower than the reference at the same number of steps."]
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
    notes.append("FLOPs (machine-independent): matmul and attention FLOPs of one sampling call counted by "
                 "torch.utils.flop_counter.FlopCounterMode on the real sampler (the cost job; causal attention "
                 "counted whole, elementwise work and the draws not counted), per sample and per generated content "
                 "token; \"–\" for a cost file written before they were counted.")
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
    disp = display_columns(data, {"Run": data["run"], "Rule": data["rule"], "Wall time (s)": data["s"].map(fmt),
                        "Max RSS (MB)": data["max_rss_mb"].map(fmt)})
    return Table("jobs", "Workflow jobs (Snakemake benchmark files)", data, disp,
                 ["Whole-job wall time and peak resident memory as Snakemake's `benchmark:` recorded them "
                  "(includes start-up and I/O; mean over repeats). Rule cost: the study's cost job of a layout, "
                  "its own wall time as recorded in cost/<layout>.json."])
