"""The cost figures: horizontal bars of training and sampling time per method, grouped by case,
with the median and min–max whiskers over repeats for interleaved measurements (cost/<layout>.json,
bench/*.json) and mean ± sd over seeds for the per-run speed.json fallback.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.results.rows import num
from harness.results.study import Study
from analysis.cost_tables import COST_SOURCE, SPEED_SOURCE, cost_sample_rows, cost_train_rows
from analysis.frames import fmt, reference_methods, sort_rows
from analysis.plotting import (log_x, method_colors, new_figure, ordered_methods, placeholder, save_figure,
                               study_colors, styled)


def spread(df: pd.DataFrame, col: str, kind: str) -> pd.DataFrame:
    """{col}_lo / {col}_hi next to {col}: min–max (kind "range") or ± sd over seeds (kind "sd")."""
    df = df.copy()
    med = pd.to_numeric(df[col], errors="coerce")
    if kind == "range":
        lo = pd.to_numeric(df.get(f"{col}_min", med), errors="coerce").fillna(med)
        hi = pd.to_numeric(df.get(f"{col}_max", med), errors="coerce").fillna(med)
    else:
        sd = pd.to_numeric(df.get(f"{col}_sd", pd.Series(0.0, index=df.index)), errors="coerce").fillna(0.0)
        lo, hi = med - sd, med + sd
    df[f"{col}_lo"], df[f"{col}_hi"] = lo, hi
    return df


def hbar_panel(ax, df: pd.DataFrame, col: str, *, order: list[str], colors: dict, labels=None,
               logx: bool = False, ref_line: float | None = None, xlabel: str = "") -> None:
    """Horizontal bars of `col` per case (rows `case`), a bar per method (hue), min–max whiskers.

    `df` has columns case, method, `col`, `col`_lo, `col`_hi (see spread); seaborn.barplot
    draws the median of the three points (median, lo, hi) = `col` with the whisker lo–hi
    (errorbar=("pi", 100)). `labels` (a column name) is written right of each whisker.
    """
    import seaborn as sns

    df = df[pd.to_numeric(df[col], errors="coerce").notna()]
    if df.empty:
        ax.text(0.5, 0.5, "no measurements", ha="center", va="center", color="0.4", transform=ax.transAxes)
        return
    hue_order = ordered_methods(df["method"])
    long = pd.concat([df[["case", "method"]].assign(value=pd.to_numeric(df[c], errors="coerce"))
                      for c in (col, f"{col}_lo", f"{col}_hi")], ignore_index=True)
    sns.barplot(data=long, y="case", x="value", hue="method", order=order, hue_order=hue_order,
                palette={m: colors[m] for m in hue_order}, estimator="median", errorbar=("pi", 100),
                orient="h", ax=ax, capsize=0.25, err_kws={"linewidth": 1.0, "color": "0.25"}, edgecolor="0.25",
                linewidth=0.4, dodge=True)
    hi = {(r["case"], r["method"]): float(r[f"{col}_hi"]) for r in df.to_dict("records")}
    text = {(r["case"], r["method"]): r[labels] for r in df.to_dict("records")} if labels else {}
    top = float(np.nanmax(df[f"{col}_hi"].to_numpy(float)))
    if logx:
        log_x(ax)
        lo = float(np.nanmin(df[f"{col}_lo"].where(df[f"{col}_lo"] > 0, df[col]).to_numpy(float)))
        ax.set_xlim(lo / 1.6, top * (3.0 if labels else 1.5))
    else:
        ax.set_xlim(0, top * (1.3 if labels else 1.08))
    if labels:
        for h, cont in enumerate(ax.containers):
            method = hue_order[h] if h < len(hue_order) else None
            for patch in cont:
                case = order[int(round(patch.get_y() + patch.get_height() / 2))]
                key = (case, method)
                if key not in text or not isinstance(text[key], str):
                    continue
                x = hi.get(key, patch.get_width())
                x = x * 1.08 if logx else x + 0.012 * top
                ax.text(x, patch.get_y() + patch.get_height() / 2, text[key], va="center", ha="left", fontsize=7.5,
                        color="0.15")
    if ref_line is not None:
        ax.axvline(ref_line, color="0.3", ls=":", lw=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("")
    ax.grid(True, axis="x", alpha=0.6)
    ax.grid(False, axis="y")
    leg = ax.get_legend()
    if leg is not None:
        leg.remove()


def method_legend(fig: Figure, methods, colors: dict) -> None:
    from matplotlib.patches import Patch

    names = ordered_methods(methods)
    fig.legend(handles=[Patch(facecolor=colors[m], edgecolor="0.25", label=m) for m in names], loc="outside lower center",
               ncol=min(len(names), 6), fontsize=9, title="method", title_fontsize=9)


def bar_height(cases: int, bars: int) -> float:
    return max(3.2, 1.6 + 0.24 * bars + 0.15 * cases)


def ratio_label(v, what: str = "DID") -> str | None:
    return f"{float(v):.2f}× {what}" if not (v is None or (isinstance(v, float) and np.isnan(v))) else None


def cost_frames(study: Study, config: dict | None) -> tuple[pd.DataFrame, pd.DataFrame, set]:
    """(train rows, sample rows, sources): the interleaved cost job per layout, speed.json otherwise."""
    ref = reference_methods()
    tr = cost_train_rows(study, ref)
    sp = cost_sample_rows(study, ref)
    tr = sort_rows(tr[pd.to_numeric(tr.get("tokens_per_s"), errors="coerce").notna()], config) if len(tr) else tr
    sp = sort_rows(sp[pd.to_numeric(sp.get("s_per_sample"), errors="coerce").notna()], config) if len(sp) else sp
    out = []
    for df, col in ((tr, "tokens_per_s"), (sp, "s_per_sample")):
        if len(df):
            parts = [spread(g, col, "range" if src == COST_SOURCE else "sd") for src, g in df.groupby("source", sort=False)]
            df = pd.concat(parts).sort_index()
        out.append(df)
    sources = set(tr.get("source", pd.Series(dtype=object)).dropna()) | set(sp.get("source", pd.Series(dtype=object)).dropna())
    return out[0], out[1], sources & {COST_SOURCE, SPEED_SOURCE}


@styled
def cost_figure(study: Study, config: dict | None, path) -> Path:
    """Training throughput and inference time per sample at every steps value, a bar per method,
    with the ratio to DID written on each bar; the interleaved cost job where the study has one."""
    ref = reference_methods()
    tr, sp, sources = cost_frames(study, config)
    if tr.empty and sp.empty:
        return placeholder(path, "Cost", "no cost or speed measurements in this study")
    colors = study_colors(study)
    many = pd.concat([tr.get("size", pd.Series(dtype=object)), sp.get("size", pd.Series(dtype=object))]).nunique() > 1
    size = (lambda r: f" · {r['size']}") if many else (lambda r: "")
    if len(tr):
        tr = tr.assign(case=[f"{r['layout']}{size(r)}" for r in tr.to_dict("records")],
                       label=[ratio_label(v) for v in tr["tokens_per_s_ratio"]])
    if len(sp):
        sp = sp.assign(case=[f"{r['layout']}{size(r)} · {fmt(r['steps'], 'int')} steps" for r in sp.to_dict("records")],
                       label=[ratio_label(v) for v in sp["s_per_sample_ratio"]])
    if len(sources) > 1:                       # mixed: say which cases are the per-run fallback
        for df in (tr, sp):
            if len(df):
                df["case"] = [c + (" (per-run)" if src != COST_SOURCE else "") for c, src in zip(df["case"], df["source"])]
    refs = ", ".join(f"{m} ({lay})" for lay, m in sorted(ref.items()))
    how = ("interleaved cost job: median, whiskers min–max over repeats" if sources == {COST_SOURCE} else
           "shared-machine per-run measurement: mean, whiskers ± sd over seeds" if COST_SOURCE not in sources else
           "interleaved where available, else per-run speed.json")
    n_tr = len(tr) + 2 * tr["case"].nunique() if len(tr) else 1
    n_sp = len(sp) + 2 * sp["case"].nunique() if len(sp) else 1
    height = bar_height(0, max(n_tr, n_sp))
    fig, (a1, a2) = new_figure(2, f"Cost relative to DID (reference: {refs})\n{how}", height=height, width=6.4)
    if len(tr):
        hbar_panel(a1, tr, "tokens_per_s", order=list(dict.fromkeys(tr["case"])), colors=colors, labels="label",
                   xlabel="training throughput (clean tokens/s, higher is faster)")
    a1.set_title("training (label: tokens/s relative to the reference)", fontsize=9)
    if len(sp):
        hbar_panel(a2, sp, "s_per_sample", order=list(dict.fromkeys(sp["case"])), colors=colors, labels="label",
                   logx=bool(sp["s_per_sample"].max() / max(sp["s_per_sample"].min(), 1e-12) > 20),
                   xlabel="inference time (s per sample, lower is faster)")
    a2.set_title("sampling (label: s/sample relative to the reference)", fontsize=9)
    methods = list(tr.get("method", pd.Series(dtype=object)).dropna()) + list(sp.get("method", pd.Series(dtype=object)).dropna())
    method_legend(fig, methods, colors)
    return save_figure(fig, path)


def bench_rows(obj: dict) -> tuple[str, list[dict]]:
    """(kind, rows) of a `harness bench` JSON: "train" (bench-train) or "sample" (bench-sample)."""
    rows = [r for r in (obj.get("rows") or []) if isinstance(r, dict)]
    kind = str(obj.get("kind") or "")
    if kind == "bench-attention":
        return "attention", rows
    if kind == "bench-dp":
        return "dp", rows
    if kind.endswith("sample") or (not kind and any("s_per_sample" in r for r in rows)):
        return "sample", rows
    return "train", rows


@styled
def bench_figure(json_path, out_png) -> Path:
    """Plot a cost-benchmark JSON of `python -m harness bench train|sample` (see bench_plot);
    a placeholder for an unreadable or empty file."""
    json_path = Path(json_path)
    title = f"Cost benchmark: {json_path.stem}"
    try:
        obj = json.loads(json_path.read_text())
    except (OSError, ValueError):
        obj = None
    fig = bench_plot(obj, title) if isinstance(obj, dict) else None
    if fig is None:
        return placeholder(out_png, title, "no rows in the benchmark file")
    return save_figure(fig, out_png)


@styled
def bench_plot(obj: dict, title: str) -> Figure | None:
    """The figure of a `harness bench` result, told apart by its "kind": bench-train rows {method,
    layout, size, seq_len, batch_size, s_per_step, ratio_to_did}, bench-sample rows {run, method,
    layout, steps, n, s_per_sample, ratio_to_did}, each statistic {min, median, max}. Left:
    seconds per step / per sample, right: the ratio to DID; a horizontal bar per method grouped
    by case (size, layout, length / steps), min–max whiskers. None when there are no rows."""
    kind, rows = bench_rows(obj)
    if not rows:
        return None
    if kind == "attention":
        return attention_plot(obj, rows, title)
    if kind == "dp":
        return dp_plot(obj, rows, title)

    def stat(r, key):          # (median, min, max); a missing min/max falls back to the median
        d = r.get(key) if isinstance(r.get(key), dict) else {"median": r.get(key)}
        med = num(d.get("median"))
        lo, hi = num(d.get("min")), num(d.get("max"))
        return med, lo if np.isfinite(lo) else med, hi if np.isfinite(hi) else med

    if kind == "sample":
        value, what = "s_per_sample", "seconds per sample"
        sizes = {str(r.get("run", "")).rsplit("-", 2)[-2] if str(r.get("run", "")).count("-") >= 2 else "" for r in rows}

        def case(r):
            size = str(r.get("run", "")).rsplit("-", 2)[-2] if len(sizes) > 1 else ""
            return " · ".join(x for x in (size, str(r.get("layout", "")), f"{r.get('steps', '?')} steps") if x)
        detail = f"n = {rows[0].get('n', '?')} samples per call"
    else:
        value, what = "s_per_step", "seconds per training step"

        def case(r):
            parts = [str(r.get("size", "")), str(r.get("layout", "")), f"L={r.get('seq_len', '?')}"]
            if r.get("batch_size") is not None:
                parts.append(f"B={r['batch_size']}")
            return " · ".join(p for p in parts if p)
        detail = obj.get("precision", "")
    recs = []
    for r in rows:
        (m, lo, hi), (q, qlo, qhi) = stat(r, value), stat(r, "ratio_to_did" if "ratio_to_did" in r else "ratio")
        recs.append({"case": case(r), "method": str(r.get("method", "?")), value: m, f"{value}_lo": lo,
                     f"{value}_hi": hi, "ratio": q, "ratio_lo": qlo, "ratio_hi": qhi,
                     "v_label": (fmt(m) + " s") if np.isfinite(m) else None,
                     "r_label": f"{q:.2f}×" if np.isfinite(q) else None})
    df = pd.DataFrame(recs)
    order = list(dict.fromkeys(df["case"]))
    if kind == "sample":                       # layout by layout, steps increasing
        rank = {c: (str(r.get("layout", "")), num(r.get("steps"))) for c, r in zip(df["case"], rows)}
        order = sorted(order, key=lambda c: rank[c])
    colors = method_colors(df["method"])
    sub = ", ".join(x for x in (obj.get("device", ""), detail, f"{obj.get('repeats', '?')} repeats") if x)
    fig, (a1, a2) = new_figure(2, f"{title}\n{sub}; bars: median, whiskers: min–max over repeats",
                         height=bar_height(len(order), len(df) + len(order)), width=6.6, sharey=True)
    positive = df[value][df[value] > 0]
    logx = bool(len(positive) and positive.max() / positive.min() > 20)
    hbar_panel(a1, df, value, order=order, colors=colors, labels="v_label", logx=logx,
               xlabel=f"{what} (median, min–max{', log scale' if logx else ''})")
    hbar_panel(a2, df, "ratio", order=order, colors=colors, labels="r_label", ref_line=1.0,
               xlabel=f"{'s/sample' if kind == 'sample' else 's/step'} relative to DID (> 1: slower than DID)")
    a2.tick_params(axis="y", labelleft=False)
    method_legend(fig, df["method"], colors)
    return fig


def dp_plot(obj: dict, rows: list[dict], title: str) -> Figure | None:
    """`python -m did.bench_dp`: the insertion targets' time per sequence against L for each DP
    backend (left, log-log, with the L^2 slope of the recurrence for reference) and each backend's
    speed-up over the PyTorch path (right)."""
    df = pd.DataFrame([{"L": num(r.get("L")), "backend": str(r.get("backend")), "ms": num(r.get("ms_per_seq")),
                        "cpu_ms": num(r.get("cpu_ms_per_seq")), "speedup": num(r.get("speedup_vs_torch"))}
                       for r in rows]).dropna(subset=["L", "ms"])
    if df.empty:
        return None
    sub = (f"{obj.get('device', '')}, {obj.get('threads', '?')} threads, {obj.get('repeats', '?')} repeats (median); "
           f"copy bandwidth {num(obj.get('copy_bandwidth_gb_per_s')):.1f} GB/s")
    fig, (a1, a2) = new_figure(2, f"{title}\n{sub}", height=4.2, width=6.0)
    for i, (backend, g) in enumerate(df.groupby("backend", sort=False)):
        g = g.sort_values("L")
        color = f"C{i}"
        a1.plot(g["L"], g["ms"], "o-", color=color, label=f"{backend} (wall)")
        a1.plot(g["L"], g["cpu_ms"], "x:", color=color, alpha=0.7, label=f"{backend} (process CPU)")
        a2.plot(g["L"], g["speedup"], "o-", color=color, label=backend)
    first = df.sort_values("L").iloc[0]
    Ls = np.array(sorted(df["L"].unique()), dtype=float)
    a1.plot(Ls, first["ms"] * (Ls / first["L"]) ** 2, color="0.6", lw=0.8, ls="--", label="∝ L² (the recurrence)")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L (t = 0.5: about L/2 tokens kept)")
    a1.set_yscale("log")
    a1.set_ylabel("ms per sequence (insertion targets, float32 DP)")
    a2.set_ylabel("speed-up over the PyTorch path (wall)")
    a2.axhline(1.0, color="0.5", lw=0.8)
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    return fig


def attention_plot(obj: dict, rows: list[dict], title: str) -> Figure | None:
    """`bench attention`: forward + backward time of each packed-attention strategy per case (left)
    and relative to one dense call on [B, L] (right: < 1 = cheaper than what a padded canvas costs)."""
    recs = []
    for r in rows:
        secs = r.get("seconds") if isinstance(r.get("seconds"), dict) else {}
        dense = num((secs.get("dense@L") or {}).get("median"))
        case = f"L={r.get('L', '?')} · B={r.get('B', '?')} · kept {num(r.get('kept_fraction')):.2f}"
        for name, st in secs.items():
            m = num((st or {}).get("median"))
            lo, hi = num((st or {}).get("min")), num((st or {}).get("max"))
            q = m / dense if np.isfinite(dense) and dense > 0 else float("nan")
            recs.append({"case": case, "method": name, "ms": 1e3 * m, "ms_lo": 1e3 * lo, "ms_hi": 1e3 * hi,
                         "ratio": q, "ratio_lo": q, "ratio_hi": q,
                         "v_label": f"{1e3 * m:.1f} ms" if np.isfinite(m) else None,
                         "r_label": f"{q:.2f}×" if np.isfinite(q) else None})
    if not recs:
        return None
    df = pd.DataFrame(recs)
    order = list(dict.fromkeys(df["case"]))
    colors = method_colors(df["method"])
    sub = f"{obj.get('size', '')} heads, {obj.get('threads', '?')} threads; bars: median, whiskers: min–max"
    fig, (a1, a2) = new_figure(2, f"{title}\n{sub}", height=bar_height(len(order), len(df) + len(order)),
                         width=6.6, sharey=True)
    hbar_panel(a1, df, "ms", order=order, colors=colors, labels="v_label",
               xlabel="attention forward + backward (ms)")
    hbar_panel(a2, df, "ratio", order=order, colors=colors, labels="r_label", ref_line=1.0,
               xlabel="time relative to one dense call on [B, L]")
    a2.tick_params(axis="y", labelleft=False)
    method_legend(fig, df["method"], colors)
    return fig
