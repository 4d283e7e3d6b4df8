"""The paper's Table 1: perplexity upper bounds, methods x datasets, in both conventions.

The columns are the zero-shot test sets of each run's `eval/zeroshot.json` when a run has one
(paper order), else one in-domain column from `eval/ppl.json`; pooled over seeds, with the
published rows beside the paper convention.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.results.rows import num
from harness.results.study import GROUP, Study, read_json
from analysis.frames import DASH, missing, sort_rows
from analysis.published import (DATASET_LABELS, MEASURED, PAPER_CITE, PAPER_DATASETS, PAPER_TABLE1, PUBLISHED,
                                PaperTable, alignment_text, budget_text, ci_cell, corpus_name, first_settings,
                                join_words, not_in_paper, paper_table, pool, published_text, safe_exp, seq_len,
                                study_run_rows, tokenizer_text)


IN_DOMAIN = "in_domain"


LAYOUT_WORDS = {"fixed": "fixed-length", "varlen": "variable-length"}


def zeroshot_frame(study: Study, runs: pd.DataFrame) -> tuple[pd.DataFrame, dict, dict, dict]:
    """Per-run rows (ID + dataset + both conventions) from eval/zeroshot.json; {run: {dataset: why
    missing}}; {dataset: {source, documents, detokenizer}} (the first run's description); the first
    file's settings."""
    rows, gaps, about, settings = [], {}, {}, {}
    for r in runs.to_dict("records"):
        obj = read_json(Path(study.root) / "runs" / r["run"] / "eval" / "zeroshot.json", study.problems)
        if obj is None:
            continue
        if not settings and isinstance(obj.get("settings"), dict):
            settings = obj["settings"]
        values = obj.get("values") if isinstance(obj.get("values"), dict) else {}
        miss = values.get("missing") if isinstance(values.get("missing"), dict) else {}
        if miss:
            gaps[r["run"]] = {str(k): str(v) for k, v in miss.items()}
        seq_len = num((obj.get("settings") or {}).get("seq_len")) if isinstance(obj.get("settings"), dict) else math.nan
        for name, d in (values.get("datasets") or {}).items():
            if not isinstance(d, dict):
                continue
            paper = d.get("paper_convention") if isinstance(d.get("paper_convention"), dict) else {}
            per_pos = paper.get("divided_by_seq_len") if isinstance(paper.get("divided_by_seq_len"), dict) else {}
            rows.append({**{k: r[k] for k in ("run", "method", "layout", "size", "seed")}, "dataset": str(name),
                         **{k: num(d.get(k)) for k in ("nats_per_token", "ppl", "stderr", "n_sequences", "n_tokens")},
                         **{f"paper_{k}": num(paper.get(k)) for k in ("nats_per_token", "ppl", "stderr")},
                         "per_position_nats": num(per_pos.get("nats_per_token")), "seq_len": seq_len})
            about.setdefault(str(name), {k: d.get(k) for k in ("source", "documents", "detokenizer")})
    return pd.DataFrame(rows), gaps, about, settings


def paper_keys() -> list[str]:
    return [k for k, _ in PAPER_DATASETS]


def dataset_order(names) -> list[str]:
    names = list(dict.fromkeys(names))
    known = [k for k, _ in PAPER_DATASETS if k in names]
    return ([IN_DOMAIN] if IN_DOMAIN in names else []) + known + sorted(n for n in names if n not in known
                                                                       and n != IN_DOMAIN)


def add_per_position(per_run: pd.DataFrame) -> pd.DataFrame:
    """`paperpos_nats_per_token` / `paperpos_stderr`: the paper convention divided by seq_len per row
    (the paper's denominator, BOS included) instead of the predicted tokens: zeroshot.json's
    `divided_by_seq_len` where it has one, else paper nats x n_tokens / (n_sequences x seq_len) (the
    same formula); NaN without a seq_len (variable-length rows have none)."""
    df = per_run.copy()
    for c in ("per_position_nats", "seq_len"):
        if c not in df.columns:
            df[c] = np.nan
    scale = df["n_tokens"] / (df["n_sequences"] * df["seq_len"])
    given = df["per_position_nats"]
    computed = df["paper_nats_per_token"] * scale
    df["paperpos_nats_per_token"] = given.where(given.notna(), computed)
    ratio = df["paperpos_nats_per_token"] / df["paper_nats_per_token"]
    df["paperpos_stderr"] = df["paper_stderr"] * ratio.where(ratio.notna(), scale)
    return df


CONVENTIONS = (("strict", ""), ("paper", "paper_"), ("paper_per_position", "paperpos_"))


def pooled_bounds(per_run: pd.DataFrame, config: dict | None) -> pd.DataFrame:
    """One row per (method, layout, size, dataset): every convention pooled over seeds (in nats)."""
    out = []
    for (m, lay, size, ds), g in per_run.groupby(GROUP + ["dataset"], sort=False, dropna=False):
        row = {"method": m, "layout": lay, "size": size, "dataset": ds}
        for conv, pre in CONVENTIONS:
            c, lo, hi, n, how = pool(g[f"{pre}nats_per_token"], errs=g[f"{pre}stderr"])
            row.update({f"{conv}_nats_per_token": c, f"{conv}_nats_lo": lo, f"{conv}_nats_hi": hi,
                        f"{conv}_ppl": safe_exp(c), f"{conv}_ppl_lo": safe_exp(lo), f"{conv}_ppl_hi": safe_exp(hi),
                        f"{conv}_interval": how, f"{conv}_n_seeds": n})
        row["n_sequences"] = g["n_sequences"].mean()
        row["n_tokens"] = g["n_tokens"].mean()
        row["seq_len"] = g["seq_len"].mean()
        out.append(row)
    return sort_rows(pd.DataFrame(out), config) if out else pd.DataFrame(columns=GROUP + ["dataset"])


def table1(study: Study, config: dict | None) -> PaperTable:
    """The paper's Table 1 for this study: per method the pooled bound on every column (zero-shot
    sets, else the in-domain test split), strict and paper convention, the published rows beside
    the latter. (Its notes are `table1_notes`; the body stays one function because every column
    choice, zero-shot or in-domain, fixed or varlen, decides the rows and the notes together.)"""
    fixed = study_run_rows(study, "fixed")
    layout = "fixed" if len(fixed) else "varlen"
    runs = fixed if len(fixed) else study_run_rows(study, "varlen")
    zs, gaps, about, zs_settings = zeroshot_frame(study, runs)
    zero_shot = len(zs) > 0
    L = seq_len(study, config, "seq_len") if layout == "fixed" else None
    if zero_shot:
        per_run = zs
        per_run["seq_len"] = per_run["seq_len"].fillna(L if L else np.nan)
    else:
        ppl = study.ppl[study.ppl["layout"] == layout] if len(study.ppl) else study.ppl
        per_run = ppl.assign(dataset=IN_DOMAIN, seq_len=L if L else np.nan) if len(ppl) else pd.DataFrame()
    needed = ["nats_per_token", "stderr", "paper_nats_per_token", "paper_stderr", "n_sequences", "n_tokens"]
    if len(per_run):
        per_run = add_per_position(per_run.assign(**{c: np.nan for c in needed if c not in per_run.columns}))
    pooled = pooled_bounds(per_run, config) if len(per_run) else pd.DataFrame(columns=GROUP + ["dataset"])
    # the paper convention as the paper divides it (per position, / seq_len) wherever every row has a seq_len
    per_position = bool(len(pooled)) and pooled["paper_per_position_nats_per_token"].notna().any()
    paper_conv = "paper_per_position" if per_position else "paper"
    measured_ds = dataset_order(pooled["dataset"]) if len(pooled) else ([] if zero_shot else [IN_DOMAIN])
    in_label = f"{corpus_name(study)} test (in-domain)"
    label = lambda ds: in_label if ds == IN_DOMAIN else DATASET_LABELS.get(ds, ds)   # noqa: E731
    groups = sort_rows(runs[GROUP].drop_duplicates().reset_index(drop=True), config) if len(runs) else runs
    seeds = runs.groupby(GROUP, sort=False)["seed"].nunique() if len(runs) else pd.Series(dtype=int)

    def measured_display(conv: str, datasets: list[str]) -> list[dict]:
        rows = []
        for g in groups.to_dict("records"):
            n = int(seeds.get((g["method"], g["layout"], g["size"]), 1))
            row = {"Source": MEASURED, "Method": g["method"], "Size": str(g["size"]), "Seeds": str(n)}
            for ds in datasets:
                hit = pooled[(pooled["method"] == g["method"]) & (pooled["layout"] == g["layout"])
                             & (pooled["size"] == g["size"]) & (pooled["dataset"] == ds)] if len(pooled) else pooled
                if len(hit):
                    h = hit.iloc[0]
                    k = h[f"{conv}_n_seeds"]
                    row[label(ds)] = ci_cell(h[f"{conv}_ppl"], h[f"{conv}_ppl_lo"], h[f"{conv}_ppl_hi"],
                                             f" ({k} of {n} seeds)" if 0 < k < n else "")
                else:
                    row[label(ds)] = DASH
            rows.append(row)
        return rows

    paper_ds = [k for k, _ in PAPER_DATASETS]
    union = dataset_order(measured_ds + paper_ds)
    strict_rows = measured_display("strict", measured_ds)
    paper_rows = measured_display(paper_conv, union)
    for size, model, vals in PAPER_TABLE1:
        row = {"Source": PUBLISHED, "Method": model, "Size": size, "Seeds": DASH}
        row.update({label(ds): DASH for ds in union})
        row.update({DATASET_LABELS[k]: published_text(v) for k, v in zip(paper_ds, vals)})
        paper_rows.append(row)
    cols_strict = ["Source", "Method", "Size", "Seeds"] + [label(d) for d in measured_ds]
    cols_paper = ["Source", "Method", "Size", "Seeds"] + [label(d) for d in union]
    what = "zero-shot" if zero_shot else "in-domain, NOT zero-shot"
    sec_strict = paper_table("table1_strict", f"Measured: strict upper bound per predicted token, PPL [95%] ({what})",
                        pd.DataFrame(strict_rows, columns=cols_strict))
    denom = "divided by the row length L, BOS included, as the paper" if per_position else \
        "per predicted token (no fixed row length to divide by)"
    sec_paper = paper_table("table1_paper", f"Paper convention (t >= 1e-3, prior dropped, {denom}), PPL [95%]: measured "
                       "rows and the published rows of the paper's Table 1", pd.DataFrame(paper_rows, columns=cols_paper))

    # the CSV: tidy, one row per (source, model, dataset, convention)
    recs = []
    for r in pooled.to_dict("records"):
        for conv, _ in CONVENTIONS:
            if missing(r[f"{conv}_nats_per_token"]):
                continue
            recs.append({"source": MEASURED, "method": r["method"], "layout": r["layout"], "size": r["size"],
                         "dataset": r["dataset"], "dataset_label": label(r["dataset"]),
                         "zero_shot": zero_shot, "convention": conv, "n_seeds": r[f"{conv}_n_seeds"],
                         "nats_per_token": r[f"{conv}_nats_per_token"], "nats_lo": r[f"{conv}_nats_lo"],
                         "nats_hi": r[f"{conv}_nats_hi"], "ppl": r[f"{conv}_ppl"], "ppl_lo": r[f"{conv}_ppl_lo"],
                         "ppl_hi": r[f"{conv}_ppl_hi"], "interval": r[f"{conv}_interval"],
                         "n_sequences": r["n_sequences"], "n_tokens": r["n_tokens"], "seq_len": r["seq_len"]})
    for size, model, vals in PAPER_TABLE1:
        for k, v in zip(paper_ds, vals):
            recs.append({"source": PUBLISHED, "method": model, "layout": "fixed", "size": size, "dataset": k,
                         "dataset_label": DATASET_LABELS[k], "zero_shot": True, "convention": "paper_per_position",
                         "ppl": v, "nats_per_token": math.log(v), "seq_len": 1024})
    data = pd.DataFrame(recs)

    intro = (f"Perplexity upper bounds of the study's {LAYOUT_WORDS.get(layout, layout)} runs (lower is better), "
             "seeds pooled"
             + ("; columns: the zero-shot test sets of each run's eval/zeroshot.json." if zero_shot else
                f". **No run has eval/zeroshot.json**, so the only column is the study's own held-out test split "
                f"of `{corpus_name(study)}` (eval/ppl.json): the models were trained on that corpus, so this is an "
                f"in-domain number, not a zero-shot one, and no column is comparable with the paper's."))
    notes = table1_notes(study, config, layout, runs, zero_shot, gaps, about, per_run, len(fixed) == 0,
                          zs_settings, pooled, per_position)
    return PaperTable("table1", "Table 1: perplexity upper bounds, methods x datasets", intro,
                      [sec_strict, sec_paper], notes, data)


def table1_notes(study, config, layout, runs, zero_shot, gaps, about, per_run, no_fixed, zs_settings, pooled,
                  per_position) -> list[str]:
    notes = []
    if no_fixed:
        notes.append("**Layout:** this study has no fixed-length runs, so the rows are its variable-length runs "
                     "(bounds per document, BOS-to-end); the paper's Table 1 is fixed-length (1024-token chunks) "
                     "only.")
    notes.append("**Strict vs paper convention:** strict = a valid upper bound on the NLL of the model its sampler "
                 "runs (the whole time range, the prior term included or zero by construction; exact for AR). "
                 "Paper convention = the papers' code: t >= 1e-3 and the prior term dropped, which can fall below "
                 "the true NLL; the published numbers are in this convention, so only the second table has them. "
                 "For AR and ILM the paper convention truncates nothing: only its denominator can differ.")
    sample = first_settings(study, runs, "ppl")
    L = seq_len(study, config, "seq_len" if layout == "fixed" else "max_len")
    denom = (zs_settings.get("denominator") if zero_shot else sample.get("denominator")) or "predicted tokens"
    counting = (f"**Token counting:** PPL = exp(NLL per token) in {tokenizer_text(study)}; "
                f"the strict table divides by `{denom}`")
    if per_position:
        lens = join_words(f"{v:.0f}" for v in sorted(pooled["seq_len"].dropna().unique()))
        counting += (f". A fixed row of L = {lens} tokens has L-1 predicted tokens (BOS is given); the paper divides "
                     "each 1024-token chunk's bound by 1024, BOS included, so the paper-convention table divides by L "
                     "too (nats x (L-1)/L"
                     + (f" = {(L - 1) / L:.4f} x" if L else "") + " the per-predicted-token value, which table1.csv "
                     "keeps as convention `paper`)")
    elif layout == "fixed":
        counting += "; the paper divides each 1024-token chunk's bound by 1024 (BOS included): no row length is known here"
    else:
        counting += ("; variable-length rows have no fixed length to divide by, so the paper-convention table is per "
                     "predicted token too; the paper divides each 1024-token chunk's bound by 1024 (BOS included)")
    notes.append(counting + ". The paper tokenises with GPT-2 (50257 ids): perplexities over different tokenizers are "
                 "not comparable.")
    if zero_shot:
        lines = []
        for ds in dataset_order(per_run["dataset"]):
            a = about.get(ds) or {}
            bits = [f"{k} {a[k]}" for k in ("source", "documents", "detokenizer") if a.get(k) not in (None, "")]
            lines.append(f"{DATASET_LABELS.get(ds, ds)}: " + ("; ".join(bits) if bits else "no description"))
        notes.append("**Data:** the models were trained on "
                     f"`{corpus_name(study)}` and scored on other corpora's test sets ("
                     + " | ".join(lines) + "). The paper trains on OpenWebText and scores the test splits of "
                     "the same seven sets, GPT-2-tokenised in 1024-token chunks with the SEDD/RADD detokenisers.")
        if gaps:
            scored = set(per_run["run"])
            by: dict[tuple, list] = {}
            for run, g in sorted(gaps.items()):
                for d, why in g.items():
                    by.setdefault((d, why), []).append(run)
            order = dataset_order(paper_keys() + [d for d, _ in by])
            notes.append("**Missing datasets** (in zeroshot.json `missing`): " + "; ".join(
                f"{DATASET_LABELS.get(d, d)}: {why} ("
                + ("every run" if set(rs) >= scored else ", ".join(f"`{r}`" for r in rs)) + ")"
                for (d, why), rs in sorted(by.items(), key=lambda kv: order.index(kv[0][0])))
                + ".")
        without = sorted(set(runs["run"]) - set(per_run["run"])) if len(runs) else []
        if without:
            notes.append("**Runs without eval/zeroshot.json** (– in every column): " + ", ".join(f"`{r}`" for r in without)
                         + ".")
    else:
        n_seq = sample.get("max_sequences")
        notes.append(f"**Data:** trained and tested on `{corpus_name(study)}` ({layout} layout"
                     + ((f", sequences of {L} tokens" if layout == "fixed" else f", documents of at most {L} tokens")
                        if L else "")
                     + (f"; the first {n_seq} test sequences, the same rows for every method" if n_seq else "")
                     + "). The paper trains on OpenWebText and reports zero-shot test sets of other corpora; a zero-shot "
                     "column here needs eval/zeroshot.json.")
    mc = (zs_settings if zero_shot else sample).get("mc")
    notes.append("**Monte Carlo:** "
                 + (f"{mc} draws of (t, x_t) per sequence" if mc else "the study's draws per sequence")
                 + (" (eval/zeroshot.json settings)" if zero_shot else " (eval/ppl.json settings)")
                 + "; the paper's code averages 1024 Monte-Carlo draws of (t, x_t).")
    notes.append(f"**Model size and budget:** this study: {budget_text(study, layout)}. The paper: small (162M "
                 "parameters) and medium (405M) models, RADD and DID-S 400K steps, DID-F 800K steps (about RADD's "
                 "FLOPs), global batch 512 x 1024 tokens. " + alignment_text(runs)
                 + not_in_paper(sort_rows(runs[GROUP + [c for c in ("base_method",) if c in runs]].drop_duplicates()
                                           .reset_index(drop=True), config)))
    notes.append("**[95%]:** one seed: exp(NLL ± 1.96 x its standard error over test sequences); several seeds: "
                 "exp of the mean NLL over seeds with a t interval for that mean (the sequence noise is in the seed "
                 "spread). The paper reports no uncertainty. \"(k of n seeds)\": only k seeds have that value.")
    notes.append(f"**Published rows:** {PAPER_CITE}.")
    return notes
