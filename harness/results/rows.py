"""One result file -> rows of the study's tables.

Each loader reads one kind of result (`values` of genppl, lengths, speed, exact, zero-shot and the
per-kind keys of the others; a plugin metric's numbers, `registered_rows`; the study's cost
files) and appends tidy rows, identity columns
first, to the frames `harness.results.study.load_study` assembles. Missing keys give no row,
never a made-up number.
"""
from __future__ import annotations

import math
from pathlib import Path

from harness.core.config import parse_run_name
from harness.core.metric_registry import metrics


#: identity columns every per-run frame starts with
ID = ["run", "method", "layout", "size", "seed"]


#: study-level cost files: results/<study>/cost/<layout>.json (harness/metrics/cost.py)
COST_DIR = "cost"


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


def result_values(result: dict | None) -> dict:
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
    "flops_per_sample", "flops_per_gen_token", "repeats", "device", "threads", "file"]


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


def load_cost(path: Path, obj: dict, out: dict) -> None:
    """Rows of cost_train / cost_sample from one cost/<layout>.json (see docs/architecture.md)."""
    values = result_values(obj)
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
            "peak_mem_mb": num(r.get("peak_mem_mb")), "flops_per_sample": num(r.get("flops_per_sample")),
            "flops_per_gen_token": num(r.get("flops_per_gen_token")), "repeats": num(sample.get("repeats")), **common})


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


def _numbers(entry: dict, columns: tuple[str, ...]) -> dict:
    """The numbers of one values entry: `columns` (every number but steps and the _ci95 keys
    when empty), each with its `<key>_ci95` as `<key>_ci95_lo/_hi` where the entry has one."""
    keys = columns or tuple(k for k, v in entry.items() if k != "steps" and not k.endswith("_ci95")
                            and isinstance(v, (int, float)) and not isinstance(v, bool))
    row = {k: num(entry.get(k)) for k in keys}
    for k in keys:
        if entry.get(f"{k}_ci95") is not None:
            lo, hi = ci_bounds(entry.get(k), entry.get(f"{k}_ci95"))
            row.update({f"{k}_ci95_lo": lo, f"{k}_ci95_hi": hi})
    return row


def registered_rows(ident: dict, values: dict, columns: tuple[str, ...] = ()) -> list[dict]:
    """A plugin metric's rows (harness.core.metric_registry): one per `by_steps` entry (with its
    steps) when its values have by_steps, else one, each with the numbers `_numbers` picks."""
    if isinstance(values.get("by_steps"), list):
        return [{**ident, "steps": num(e.get("steps")), **_numbers(e, columns)}
                for e in values["by_steps"] if isinstance(e, dict)]
    return [{**ident, **_numbers(values, columns)}]


def load_eval(kind: str, ident: dict, values: dict, out: dict) -> None:
    metric = metrics().get(kind)
    if metric is not None and metric.plugin:
        out["extra"].setdefault(kind, []).extend(registered_rows(ident, values, metric.columns))
    elif kind == "ppl":
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
