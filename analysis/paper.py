"""The DID paper's tables and figure in the paper's own layout, next to its published numbers.

`python -m analysis paper results/<study>` writes results/<study>/paper/:

* `table1.md/.csv`: perplexity upper bounds, methods x datasets (the paper's Table 1). The
  columns are the zero-shot test sets of each run's `eval/zeroshot.json` when a run has one
  (paper order: WikiText, LAMBADA, PubMed, AG News, LM1B, ArXiv, PTB), else ONE column, the
  study's own held-out test split from `eval/ppl.json`, labelled in-domain (not zero-shot). One
  table for the strict bound and one for the paper convention (t >= 1e-3, prior dropped), the
  latter with the published rows.
* `genppl_steps.md/.csv`: generative perplexity vs sampling steps of the variable-length runs
  (`eval/genppl.json` `by_steps`), token-weighted (this project's primary number) and as the mean
  of per-sample PPL (the paper's aggregation), the latter with the published rows.
* `length_cdf.png/.csv`: the empirical CDF of generated lengths per variable-length method against
  the data's lengths (the paper's Figure 2), from `eval/lengths.json` (else samples.jsonl and
  references.jsonl).
* `speed.md/.csv`: DID's training and inference speedup over every other method per layout, from
  the study's cost job files `cost/<layout>.json` (median [min–max] over repeats), with the
  published speedups.
* `README.md`: links to all of them.

Every table has a notes block on each convention that differs from the paper's (evaluator LM,
tokenizer and token counting, data, steps, model size and training budget), written from the
study's own files (manifest, configs, result settings), so it is true for the study it sits in.
Nothing here computes a metric: the numbers are read through harness.results.study (`load_study`) and
pooled over seeds. No timestamps go into the files, so the output is deterministic.

Published numbers (`PAPER_*` below) are the paper's (Ding et al., "Beyond Masks", ICLR 2026) as
transcribed by third-party notes of the paper; they have not been checked against the PDF.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.core.atomic import atomic_write_text
from harness.core.errors import UserError
from harness.core.records import read_jsonl
from harness.metrics.lengths import ecdf_distances
from harness.results.rows import ci_bounds, num
from harness.results.study import GROUP, Study, load_study, read_json, run_dirs
from analysis import plotting
from analysis.cost_tables import COST_SOURCE, SPEED_SOURCE, cost_sample_rows, cost_train_rows, range_text
from analysis.frames import DASH, fmt, missing, reference_methods, sort_rows, to_markdown
from analysis.paper_table1 import table1
from analysis.published import (MEASURED, PAPER_CITE, PAPER_GENPPL, PAPER_GENPPL_STEPS, PAPER_SPEED, PUBLISHED,
                                PaperTable, budget_text, ci_cell, corpus_name, eval_values, first_settings,
                                join_words, paper_table, pool, published_text, result_settings, seq_len,
                                study_run_rows, tokenizer_text)


def _genppl_frame(study: Study) -> pd.DataFrame:
    """study.genppl of the varlen runs plus the mean-per-sample CI (read from each genppl.json)."""
    g = study.genppl
    if g.empty or "gen_ppl" not in g.columns:
        return pd.DataFrame()
    g = g[g["layout"] == "varlen"].copy()
    lo, hi = [], []
    cache: dict[str, dict] = {}
    for r in g.to_dict("records"):
        v = cache.setdefault(r["run"], eval_values(study, r["run"], "genppl"))
        entry = next((e for e in v.get("by_steps") or [] if isinstance(e, dict) and num(e.get("steps")) == r["steps"]), {})
        a, b = ci_bounds(entry.get("gen_ppl_mean_per_sample"), entry.get("gen_ppl_mean_per_sample_ci95")) \
            if entry.get("gen_ppl_mean_per_sample_ci95") is not None else (math.nan, math.nan)
        lo.append(a)
        hi.append(b)
    return g.assign(mps_lo=lo, mps_hi=hi)


def _data_genppl(study: Study, config: dict | None) -> tuple[dict | None, bool]:
    """The held-out text row (the first varlen run's: every run scores the same references) and
    whether every run's data row agrees."""
    d = study.genppl_data
    if d.empty:
        return None, True
    d = sort_rows(d[d["layout"] == "varlen"].reset_index(drop=True), config)
    if d.empty:
        return None, True
    first = d.iloc[0].to_dict()
    v = eval_values(study, first["run"], "genppl").get("data") or {}
    a, b = ci_bounds(v.get("gen_ppl_mean_per_sample"), v.get("gen_ppl_mean_per_sample_ci95")) \
        if v.get("gen_ppl_mean_per_sample_ci95") is not None else (math.nan, math.nan)
    first.update(mps_lo=a, mps_hi=b)
    same = bool(np.allclose(d["gen_ppl"].to_numpy(float), first["gen_ppl"], equal_nan=True))
    return first, same


def genppl_steps_table(study: Study, config: dict | None) -> PaperTable:
    g = _genppl_frame(study)
    steps = sorted(g["steps"].dropna().unique()) if len(g) else []
    recs = []
    for (m, lay, size), grp in (g.groupby(GROUP, sort=False) if len(g) else []):
        for s in steps:
            h = grp[grp["steps"] == s]
            if h.empty:
                continue
            tw = pool(h["gen_ppl"], los=h["ci95_lo"], his=h["ci95_hi"], log=True)
            mp = pool(h["gen_ppl_mean_per_sample"], los=h["mps_lo"], his=h["mps_hi"], log=True)
            recs.append({"source": MEASURED, "method": m, "layout": lay, "size": size, "steps": s, "n_seeds": tw[3],
                         "n_samples": h["n"].mean(), "gen_ppl": tw[0], "gen_ppl_lo": tw[1], "gen_ppl_hi": tw[2],
                         "gen_ppl_interval": tw[4], "mean_per_sample_ppl": mp[0], "mean_per_sample_lo": mp[1],
                         "mean_per_sample_hi": mp[2], "mean_per_sample_interval": mp[4]})
    measured = sort_rows(pd.DataFrame(recs), config) if recs else pd.DataFrame()
    data_row, same = _data_genppl(study, config)
    seeds = study_run_rows(study, "varlen").groupby(GROUP, sort=False)["seed"].nunique() if len(study_run_rows(study, "varlen")) else {}
    union = sorted(set(steps) | set(float(s) for s in PAPER_GENPPL_STEPS))

    def display(col: str, lo: str, hi: str, cols: list, with_paper: bool) -> pd.DataFrame:
        rows = []
        keys = measured[GROUP].drop_duplicates().to_dict("records") if len(measured) else []
        for k in keys:
            sub = measured[(measured["method"] == k["method"]) & (measured["size"] == k["size"])]
            row = {"Source": MEASURED, "Method": k["method"], "Size": str(k["size"]),
                   "Seeds": str(int(seeds.get((k["method"], k["layout"], k["size"]), 1)))}
            for s in cols:
                h = sub[sub["steps"] == s]
                row[f"{fmt(s, 'int')} steps"] = ci_cell(h.iloc[0][col], h.iloc[0][lo], h.iloc[0][hi]) if len(h) else DASH
            rows.append(row)
        if data_row is not None:
            key = "gen_ppl" if col == "gen_ppl" else "gen_ppl_mean_per_sample"
            dl, dh = ("ci95_lo", "ci95_hi") if col == "gen_ppl" else ("mps_lo", "mps_hi")
            cell = ci_cell(data_row.get(key), data_row.get(dl), data_row.get(dh))
            rows.append({"Source": MEASURED, "Method": "held-out text (data)", "Size": "", "Seeds": DASH,
                         **{f"{fmt(s, 'int')} steps": cell if s in steps else DASH for s in cols}})
        if with_paper:
            for model, vals in PAPER_GENPPL:
                by = dict(zip((float(s) for s in PAPER_GENPPL_STEPS), vals))
                rows.append({"Source": PUBLISHED, "Method": model, "Size": "small", "Seeds": DASH,
                             **{f"{fmt(s, 'int')} steps": published_text(by[s]) if s in by else DASH for s in cols}})
        return pd.DataFrame(rows, columns=["Source", "Method", "Size", "Seeds"] + [f"{fmt(s, 'int')} steps" for s in cols])

    sec_tw = paper_table("genppl_tw", "Measured: gen PPL, token-weighted exp(sum NLL / sum tokens) [95%]",
                    display("gen_ppl", "gen_ppl_lo", "gen_ppl_hi", steps, False))
    sec_mp = paper_table("genppl_mps", "Paper aggregation: mean over samples of per-sample PPL [95%]: measured rows and "
                    "the published rows", display("mean_per_sample_ppl", "mean_per_sample_lo", "mean_per_sample_hi",
                                                  union, True))
    recs_out = list(measured.to_dict("records")) if len(measured) else []
    if data_row is not None:
        for s in steps:
            recs_out.append({"source": MEASURED, "method": "data", "layout": "varlen", "size": "", "steps": s,
                             "n_samples": data_row.get("n"), "gen_ppl": data_row.get("gen_ppl"),
                             "gen_ppl_lo": data_row.get("ci95_lo"), "gen_ppl_hi": data_row.get("ci95_hi"),
                             "gen_ppl_interval": "file CI", "mean_per_sample_ppl": data_row.get("gen_ppl_mean_per_sample"),
                             "mean_per_sample_lo": data_row.get("mps_lo"), "mean_per_sample_hi": data_row.get("mps_hi"),
                             "mean_per_sample_interval": "file CI"})
    for model, vals in PAPER_GENPPL:
        for s, v in zip(PAPER_GENPPL_STEPS, vals):
            recs_out.append({"source": PUBLISHED, "method": model, "layout": "varlen", "size": "small",
                             "steps": float(s), "mean_per_sample_ppl": v})
    data = pd.DataFrame(recs_out)
    if len(g):
        intro = ("Generative perplexity of the study's variable-length samples vs sampling steps (lower is better, "
                 "but read it with the entropy in tables/genppl.md), seeds pooled.")
    elif len(study.exact):
        intro = ("**This study has no gen PPL:** its corpus is synthetic, so samples are scored exactly under the "
                 "source instead of by an evaluator LM (tables/exact_samples.md). Only the published rows are shown.")
    else:
        intro = "**This study has no variable-length gen PPL (eval/genppl.json).** Only the published rows are shown."
    notes = _genppl_notes(study, config, g, steps, same)
    return PaperTable("genppl_steps", "Variable-length generation: gen PPL vs sampling steps", intro,
                      [sec_tw, sec_mp], notes, data)


def _genppl_notes(study: Study, config, g: pd.DataFrame, steps, same: bool) -> list[str]:
    runs = study_run_rows(study, "varlen")
    notes = []
    if len(g):
        gs = first_settings(study, runs, "genppl")
        evs = [(result_settings(study, r, "genppl").get("evaluator") or {}) for r in runs["run"]]
        names = join_words(e.get("name") for e in evs if isinstance(e, dict))
        srcs = join_words(e.get("source") for e in evs if isinstance(e, dict))
        notes.append(f"**Evaluator LM:** `{names}` ({srcs}, as genppl.json records it), offline; the paper scores with "
                     "GPT-2-large. Perplexities under different evaluators are not comparable: the held-out-text row is "
                     "the reference to read the measured rows against.")
        notes.append(f"**Tokenizer and token counting:** samples are decoded from {tokenizer_text(study)} and "
                     f"re-tokenised by the evaluator's tokenizer, truncated to {gs.get('max_tokens', '?')} evaluator "
                     "tokens; every token after the evaluator BOS is a target except its EOS. The paper re-tokenises "
                     "with GPT-2 and truncates to 1024 tokens.")
        notes.append("**Aggregation:** the first table is this project's primary number (token-weighted, "
                     "exp(sum NLL / sum tokens)); the paper reports the mean over samples of exp(mean NLL per "
                     "sample), which short samples dominate (compare the held-out-text row in the two tables), so "
                     "only the second table has the published rows.")
        ss = first_settings(study, runs, "samples")
        n = join_words(f"{v:.0f}" for v in sorted(g["n"].dropna().unique()))
        notes.append(f"**Samples and steps:** {n} unconditional samples per method and step count (top-p "
                     f"{ss.get('top_p', '?')}, float64 sampling) at {join_words(fmt(s, 'int') for s in steps)} steps; "
                     "the paper: 64 / 128 / 256 / 512 steps (64 samples per setting in the official protocol). A "
                     "column with – was not run. ILM inserts one token per network call whatever the steps.")
        if not same:
            notes.append("**Held-out text:** the runs' data rows differ; the first run's is shown.")
    L = seq_len(study, config, "max_len")
    notes.append(f"**Data:** `{corpus_name(study)}` documents of at most {L if L else '?'} tokens (BOS included); the "
                 "paper: tiny ROC stories (bert-base-uncased tokens, about 213 on average, up to 1023). The "
                 "paper's RADD is padded to its maximum length; here the masked models sample on a canvas of the "
                 "study's max_len and cut at the first PAD.")
    notes.append(f"**Model size and budget:** this study: {budget_text(study, 'varlen')}. The paper: small models "
                 "(132M parameters for DID), 60K steps of batch 512 stories.")
    if len(g):
        notes.append("**[95%]:** one seed: the 95% percentile bootstrap over samples from genppl.json; several "
                     "seeds: the geometric mean over seeds with a t interval on the log scale. The paper reports no "
                     "uncertainty.")
    notes.append(f"**Published rows:** {PAPER_CITE}.")
    return notes


def length_samples(study: Study) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(generated lengths: ID + steps + length, data lengths: ID + length, what a length counts) of the
    varlen runs: lengths.json's stored lengths, else samples.jsonl / references.jsonl."""
    gen, ref, unit = [], [], ""
    for r in study_run_rows(study, "varlen").to_dict("records"):
        ident = {k: r[k] for k in ("run", "method", "layout", "size", "seed")}
        obj = read_json(Path(study.root) / "runs" / r["run"] / "eval" / "lengths.json", []) or {}
        v = obj.get("values") if isinstance(obj.get("values"), dict) else {}
        unit = unit or ((obj.get("settings") or {}).get("length") or "")
        got = False
        for e in v.get("by_steps") or []:
            if isinstance(e, dict) and isinstance(e.get("lengths"), list):
                gen += [{**ident, "steps": num(e.get("steps")), "length": num(x)} for x in e["lengths"]]
                got = True
        data = v.get("data") if isinstance(v.get("data"), dict) else {}
        if isinstance(data.get("lengths"), list):
            ref += [{**ident, "length": num(x)} for x in data["lengths"]]
        ev = Path(study.root) / "runs" / r["run"] / "eval"
        try:
            if not got and (ev / "samples.jsonl").is_file():
                gen += [{**ident, "steps": num(x.get("steps")), "length": num(x.get("length"))}
                        for x in read_jsonl(ev / "samples.jsonl") if "length" in x]
            if not isinstance(data.get("lengths"), list) and (ev / "references.jsonl").is_file():
                ref += [{**ident, "length": num(x.get("length"))} for x in read_jsonl(ev / "references.jsonl")
                        if "length" in x]
        except UserError as exc:
            study.problems.append(str(exc))
    cols = ["run", "method", "layout", "size", "seed"]
    gen_df = pd.DataFrame(gen, columns=cols + ["steps", "length"]).dropna(subset=["length"])
    ref_df = pd.DataFrame(ref, columns=cols + ["length"]).dropna(subset=["length"])
    # runs that scored the same references store the same data lengths: keep each distinct set once
    seen, keep = set(), []
    for run, g in ref_df.groupby("run", sort=True):
        key = tuple(g["length"])
        if key not in seen:
            seen.add(key)
            keep.append(run)
    ref_df = ref_df[ref_df["run"].isin(keep)].reset_index(drop=True)
    return gen_df, ref_df, unit


def length_cdf(study: Study, config: dict | None, out_dir: Path) -> tuple[Path, Path, pd.DataFrame, str]:
    """paper/length_cdf.png (a panel per steps count) and length_cdf.csv (n, mean, quantiles, KS and
    W1 to the data per row). Returns the paths, the CSV frame and the length unit."""

    gen, ref, unit = length_samples(study)
    png, csv = out_dir / "length_cdf.png", out_dir / "length_cdf.csv"
    steps = sorted(gen["steps"].dropna().unique()) if len(gen) else []
    ref_len = np.sort(ref["length"].to_numpy(float)) if len(ref) else np.array([])
    rows = []
    for (m, lay, size, s), g in (gen.groupby(GROUP + ["steps"], sort=False) if len(gen) else []):
        x = g["length"].to_numpy(float)
        w1, ks = ecdf_distances(x, ref_len) if ref_len.size and x.size else (math.nan, math.nan)
        q10, q50, q90 = np.quantile(x, [0.1, 0.5, 0.9])
        rows.append({"method": m, "layout": lay, "size": size, "steps": s, "n_seeds": g["seed"].nunique(),
                     "n": x.size, "mean": x.mean(), "q10": q10, "q50": q50, "q90": q90, "ks_to_data": ks,
                     "w1_to_data": w1})
    if ref_len.size:
        q10, q50, q90 = np.quantile(ref_len, [0.1, 0.5, 0.9])
        rows.append({"method": "data", "layout": "varlen", "size": "", "steps": math.nan, "n_seeds": math.nan,
                     "n": ref_len.size, "mean": ref_len.mean(), "q10": q10, "q50": q50, "q90": q90})
    table = sort_rows(pd.DataFrame(rows), config) if rows else pd.DataFrame(
        columns=GROUP + ["steps", "n", "mean", "q10", "q50", "q90", "ks_to_data", "w1_to_data"])
    atomic_write_text(csv, table.to_csv(index=False, na_rep=""))
    title = "Generated length CDF vs the data (variable-length runs; the paper's Figure 2)"
    if gen.empty:
        return plotting.placeholder(png, title, "no generated lengths (variable-length runs) in this study"), csv, table, unit

    @plotting.styled
    def draw():
        import seaborn as sns

        shown = steps if len(steps) <= 4 else [steps[i] for i in np.linspace(0, len(steps) - 1, 4).round().astype(int)]
        colors = plotting.study_colors(study)
        fig, axes = plotting.new_figure(len(shown), title, width=5.4, sharey=True)
        pmf = np.asarray(study.length_pmf, float) if study.length_pmf else None
        for ax, s in zip(axes, shown):
            if ref_len.size:
                sns.ecdfplot(x=ref_len, ax=ax, color="0.15", lw=2.2, ls="--", label=f"data (n={ref_len.size})")
            if pmf is not None and pmf.size:
                ax.step(np.arange(pmf.size), np.cumsum(pmf), where="post", color="0.55", lw=1.6, ls=":",
                        label="exact length law")
            sub = sort_rows(gen[gen["steps"] == s].reset_index(drop=True), config)
            many = sub["size"].nunique() > 1
            for (m, lay, size), g in sub.groupby(GROUP, sort=False):
                name = f"{m}, {size}" if many else str(m)
                sns.ecdfplot(x=g["length"].to_numpy(float), ax=ax, color=colors[str(m)], lw=1.6,
                             label=f"{name} (n={len(g)})")
            ax.set_title(f"{fmt(s, 'int')} sampling steps", fontsize=10)
            ax.set_xlabel("generated length (tokens)")
            ax.set_xlim(left=0)
            ax.set_ylim(0, 1.02)
        for ax in axes[1:]:
            ax.set_ylabel("")
        axes[0].set_ylabel("cumulative fraction of samples")
        axes[-1].legend(fontsize=8, loc="lower right")
        return plotting.save_figure(fig, png)

    return draw(), csv, table, unit


def speed_table(study: Study, config: dict | None) -> PaperTable:
    ref = reference_methods()
    train = cost_train_rows(study, ref)
    sample = cost_sample_rows(study, ref)
    steps = sorted(sample["steps"].dropna().unique()) if len(sample) and "steps" in sample else []
    keys = pd.concat([f[GROUP] for f in (train, sample) if len(f)]).drop_duplicates() if len(train) or len(sample) \
        else pd.DataFrame(columns=GROUP)
    keys = sort_rows(keys.reset_index(drop=True), config) if len(keys) else keys
    layouts = [lay for lay in ("fixed", "varlen") if lay in set(keys["layout"])] + sorted(
        set(keys["layout"]) - {"fixed", "varlen"}) if len(keys) else []

    def cell(row, col):
        if row is None or missing(row.get(col)):
            return DASH
        if row.get("source") == COST_SOURCE:
            return range_text(row.get(col), row.get(f"{col}_min"), row.get(f"{col}_max"), "ratio")
        sd = row.get(f"{col}_sd")
        return f"{float(row[col]):.2f}×" + ("" if missing(sd) else f" ± {float(sd):.2f}")

    step_cols = [f"Inference @{fmt(s, 'int')} steps" for s in steps]
    cols = ["Layout", "DID vs", "Size", "Source", "Training speedup"] + step_cols + ["Inference (paper's setting)"]
    rows, recs = [], []
    for lay in layouts:
        for k in keys[keys["layout"] == lay].to_dict("records"):
            if ref.get(lay) == k["method"]:
                continue
            sel = lambda f: f[(f["method"] == k["method"]) & (f["layout"] == lay) & (f["size"] == k["size"])] \
                if len(f) else f   # noqa: E731
            t = sel(train)
            trow = t.iloc[0].to_dict() if len(t) else None
            src = (trow or {}).get("source")
            row = {"Layout": lay, "DID vs": k["method"], "Size": str(k["size"]),
                   "Training speedup": cell(trow, "s_per_step_ratio")}
            rec = {"source": MEASURED, "layout": lay, "method": k["method"], "size": k["size"], "reference": ref.get(lay),
                   "measured_by": src, "steps": math.nan,
                   **{f"train_speedup{x}": (trow or {}).get(f"s_per_step_ratio{x}", math.nan)
                      for x in ("", "_min", "_max")},
                   "train_s_per_step": (trow or {}).get("s_per_step", math.nan)}
            recs.append(rec)
            for s, c in zip(steps, step_cols):
                sm = sel(sample)
                sm = sm[sm["steps"] == s] if len(sm) else sm
                srow = sm.iloc[0].to_dict() if len(sm) else None
                src = src or (srow or {}).get("source")
                row[c] = cell(srow, "s_per_sample_ratio")
                recs.append({"source": MEASURED, "layout": lay, "method": k["method"], "size": k["size"],
                             "reference": ref.get(lay), "measured_by": (srow or {}).get("source"), "steps": s,
                             **{f"inference_speedup{x}": (srow or {}).get(f"s_per_sample_ratio{x}", math.nan)
                                for x in ("", "_min", "_max")},
                             "s_per_sample": (srow or {}).get("s_per_sample", math.nan)})
            row["Source"] = {COST_SOURCE: "this study (interleaved cost job)",
                             SPEED_SOURCE: "this study (per-run, shared machine)"}.get(src, MEASURED)
            row["Inference (paper's setting)"] = DASH
            rows.append(row)
        if lay in PAPER_SPEED:
            rows.append(_paper_speed_row(lay, step_cols))
    for lay in ("fixed", "varlen"):
        if lay not in layouts:
            rows.append(_paper_speed_row(lay, step_cols))
    for lay, (lo, hi, _, inf, _) in PAPER_SPEED.items():
        recs.append({"source": PUBLISHED, "layout": lay, "method": "RADD", "size": "small", "reference": "DID",
                     "train_speedup": lo})
        recs.append({"source": PUBLISHED, "layout": lay, "method": "RADD", "size": "large", "reference": "DID",
                     "train_speedup": hi})
        recs.append({"source": PUBLISHED, "layout": lay, "method": "RADD", "size": "best reported", "reference": "DID",
                     "inference_speedup": inf})
    sec = paper_table("speed", "DID's speedup over each method (x: the method's time / DID's; > 1: DID is faster)",
                 pd.DataFrame(rows, columns=cols))
    if len(keys):
        intro = ("DID's training and inference speedups per layout, from the study's cost job files "
                 "(results/<study>/cost/<layout>.json) where they exist.")
    else:
        intro = ("**This study has no cost measurements** (no cost/<layout>.json and no per-run speed.json): only "
                 "the published rows are shown.")
    return PaperTable("speed", "Speed: training and inference speedups of DID", intro, [sec],
                      _speed_notes(study, ref, train, sample, steps), pd.DataFrame(recs))


def _paper_speed_row(layout: str, step_cols: list[str]) -> dict:
    _, _, text, _, inf = PAPER_SPEED[layout]
    return {"Layout": layout, "DID vs": "RADD", "Size": "small → large", "Source": PUBLISHED,
            "Training speedup": text, **{c: DASH for c in step_cols}, "Inference (paper's setting)": inf}


def _speed_notes(study: Study, ref: dict, train: pd.DataFrame, sample: pd.DataFrame, steps) -> list[str]:
    notes = []
    c = study.cost_train
    if len(c):
        for lay, g in c.groupby("layout", sort=True):
            r0 = g.iloc[0]
            refm = ref.get(lay)
            dt = g[g["method"] == refm]
            ds = study.cost_sample[(study.cost_sample["layout"] == lay) & (study.cost_sample["method"] == refm)]
            rng = lambda x, c: range_text(x[f"{c}_median"], x[f"{c}_min"], x[f"{c}_max"])   # noqa: E731
            did = (f"DID (`{refm}`) takes {rng(dt.iloc[0], 's_per_step')} s/step" if len(dt) else f"no `{refm}` row")
            if len(ds):
                did += " and " + ", ".join(f"{rng(x, 's_per_sample')} s/sample @{fmt(x['steps'], 'int')}"
                                           for x in ds.to_dict("records"))
            ns = study.cost_sample[study.cost_sample["layout"] == lay]["n"].dropna()
            notes.append(f"**{lay}:** cost/{lay}.json on `{r0['device']}` ({fmt(r0['threads'], 'int')} threads), "
                         f"{fmt(r0['repeats'], 'int')} training repeats of a batch of {fmt(r0['batch_size'], 'int')} "
                         f"sequences ({fmt(r0['clean_tokens'], 'int')} clean tokens, {r0['precision']})"
                         + (f", {fmt(ns.iloc[0], 'int')} samples per call" if len(ns) else "")
                         + f"; {did}.")
        notes.append("**How measured:** every method of a layout in one process with the machine to itself, methods "
                     "interleaved within each repeat on identical work (the same batch, the same seeds); speedup = "
                     "the method's s/step (training) or s/sample (inference, same number of steps) over DID's, "
                     "taken repeat by repeat; median [min–max] over repeats.")
    if SPEED_SOURCE in set(train.get("source", pd.Series(dtype=str))) | set(sample.get("source", pd.Series(dtype=str))):
        notes.append("**Per-run (shared machine):** a layout without a cost file uses each run's speed.json, timed "
                     "while other jobs shared the machine; mean ± sd over seeds; a rough guide only.")
    measured = len(train) > 0 or len(sample) > 0
    sizes = join_words(sorted(study.runs["size"].dropna().astype(str).unique())) if len(study.runs) else "?"
    notes.append("**Model size and budget:** "
                 + (f"this study times its own trained `{sizes}` models on a batch of the study's train split; "
                    "per-step Python overheads are a large share of a small model's step, so the ratios need not carry "
                    "over to large models. " if measured else "")
                 + "The paper: small to large models "
                 "(162M-837M parameters), equal global batch 512 (throughput ratios), GPUs (8 per node; the exact "
                 "hardware is not stated); its inference speedups do not state the number of steps, so they sit in "
                 "their own column.")
    slower = list(dict.fromkeys([f"{r['method']} ({r['layout']}, " + ("training" if missing(r.get("steps")) else
                                                          f"inference @{fmt(r['steps'], 'int')}") + ")"
                     for f, col in ((train, "s_per_step_ratio"), (sample, "s_per_sample_ratio")) if len(f) and col in f
                     for r in f.to_dict("records") if not missing(r.get(col)) and r[col] < 1]))
    notes.append("**Speedup convention:** the paper's speedups are DID over RADD (throughput ratios); the other "
                 "methods' rows are this study's additions. A value below 1× means the method is faster than DID"
                 + (f" (here: {', '.join(slower)})." if slower else "."))
    if steps:
        notes.append(f"**Steps:** inference at {join_words(fmt(s, 'int') for s in steps)} sampling steps.")
    notes.append(f"**Published rows:** {PAPER_CITE}.")
    return notes


def render(pt: PaperTable, study: Study) -> str:
    lines = [f"# {pt.title}", "", f"Study `{study.name}`. {pt.intro}", ""]
    for t in pt.sections:
        lines.append(to_markdown(t, heading="##").rstrip("\n"))
        lines.append("")
    lines += ["## Notes: how this differs from the paper", ""] + [f"- {n}" for n in pt.notes] + [""]
    return "\n".join(lines)


def _readme(study: Study, t1: PaperTable, gen: PaperTable, speed: PaperTable, cdf: pd.DataFrame, unit: str) -> str:
    zero = bool(len(t1.data)) and bool(t1.data[t1.data["source"] == MEASURED]["zero_shot"].any()) \
        if "zero_shot" in t1.data else False
    lines = [f"# Study `{study.name}` in the paper's layout", "",
             "Written by `python -m analysis paper " + f"results/{Path(study.root).name}`" + " from the study's result "
             "files; each table sits next to the paper's published numbers (clearly labelled reference rows) and "
             "says under it every convention that differs from the paper's. The published numbers come from "
             f"{PAPER_CITE}.", "",
             f"- [Table 1: perplexity upper bounds, methods x datasets](table1.md) ([CSV](table1.csv)): "
             + ("zero-shot test sets." if zero else "**in-domain only** (no run has eval/zeroshot.json): the study's "
                "own test split, not comparable with the paper's zero-shot columns."),
             "- [Gen PPL vs sampling steps, variable length](genppl_steps.md) ([CSV](genppl_steps.csv))"
             + ("." if len(gen.data) and (gen.data["source"] == MEASURED).any() else ": no measured rows in this study."),
             "- [Generated-length CDF vs the data (Figure 2)](length_cdf.png) ([CSV](length_cdf.csv): n, mean, "
             "quantiles, KS and W1 to the data per row)"
             + ("." if len(cdf) else ": no variable-length samples in this study."),
             "- [Speed: DID's training and inference speedups](speed.md) ([CSV](speed.csv))"
             + ("." if len(speed.data) and (speed.data["source"] == MEASURED).any() else ": no cost measurements in "
                "this study."), ""]
    if len(cdf):
        lines += ["## Figure: generated-length CDF", "",
                  "![generated-length CDF](length_cdf.png)", "",
                  "Empirical CDF of the lengths of each variable-length method's samples (seeds pooled), one panel per "
                  "number of sampling steps, against the held-out documents' lengths (dashed"
                  + (", and the source's exact length law, dotted" if study.length_pmf else "") + "). Lengths: "
                  + (unit or "content tokens") + " (eval/lengths.json); the paper counts GPT-2 tokens of "
                  "stories. KS and W1 to the data are in length_cdf.csv.", ""]
    if study.problems:
        lines += ["## Unreadable files", ""] + [f"- {p}" for p in sorted(set(study.problems))] + [""]
    return "\n".join(lines)


def write_paper(pt: PaperTable, study: Study, out_dir: Path) -> list[Path]:
    return [atomic_write_text(out_dir / f"{pt.name}.md", render(pt, study)),
            atomic_write_text(out_dir / f"{pt.name}.csv", pt.data.to_csv(index=False, na_rep=""))]


def main(study_dir, config: dict | None = None, out_dir=None) -> list[Path]:
    """Write results/<study>/paper/ (or `out_dir`); return the paths. A missing study directory or
    one without runs is a UserError (one line)."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise UserError(f"study directory {study_dir} does not exist (run the workflow first)")
    if not run_dirs(study_dir):
        raise UserError(f"study directory {study_dir} has no runs (no runs/<run>/ with train.json, eval/ or "
                        "history.csv): run the workflow first")
    study = load_study(study_dir, config)
    out = Path(out_dir) if out_dir is not None else study_dir / "paper"
    out.mkdir(parents=True, exist_ok=True)
    t1, gen, speed = table1(study, config), genppl_steps_table(study, config), speed_table(study, config)
    png, csv, cdf, unit = length_cdf(study, config, out)
    files = write_paper(t1, study, out) + write_paper(gen, study, out) + [png, csv] + write_paper(speed, study, out)
    files.append(atomic_write_text(out / "README.md", _readme(study, t1, gen, speed, cdf, unit)))
    return files
