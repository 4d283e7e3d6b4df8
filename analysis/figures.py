"""The study's figures (PNG): quality vs sampling steps, lengths vs data, training curves, cost.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so importing this module changes no global backend (safe in notebooks and workers).
Seeds are aggregated as mean ± sd; a single seed shows the run's own 95% CI where the result
file has one. A figure with nothing to show is still written, with a "no results" note, so the
set of output files is the same for every study.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.collect import GROUP, Study, num
from analysis.tables import aggregate, add_ratio, fmt, reference_methods, sort_rows

LINESTYLE = {"varlen": "-", "fixed": "--"}
MARKER = {"varlen": "o", "fixed": "s"}


# --- helpers -----------------------------------------------------------------------------------
def method_colors(methods) -> dict:
    """A stable colour per method (same colour in every figure of a study)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(sorted({str(m) for m in methods}))}


def study_colors(study: Study) -> dict:
    """Colours from every method in the study, so a method keeps its colour in every figure."""
    frames = (study.runs, study.ppl, study.genppl, study.mauve, study.speed_train, study.speed_sample, study.history)
    return method_colors(m for f in frames if "method" in f.columns for m in f["method"].dropna())


def _log_y(ax) -> None:
    """Log y axis with plain-number tick labels (1, 2, 5 per decade) instead of 10^x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _label(row, many_sizes: bool) -> str:
    return f"{row['method']} ({row['layout']}{', ' + str(row['size']) if many_sizes else ''})"


def save_figure(fig: Figure, path) -> Path:
    """Save as PNG via a temp file + rename (readers never see a partial image)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _new(ncols: int = 1, title: str = "") -> tuple[Figure, list]:
    fig = Figure(figsize=(6.2 * ncols, 4.4), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def placeholder(path, title: str, reason: str = "no results for this figure in this study") -> Path:
    fig, (ax,) = _new(1, title)
    ax.axis("off")
    ax.text(0.5, 0.5, reason, ha="center", va="center", fontsize=12, color="0.4", transform=ax.transAxes)
    return save_figure(fig, path)


def _layouts(df: pd.DataFrame) -> list[str]:
    order = ["varlen", "fixed"]
    present = [str(x) for x in df["layout"].dropna().unique()]
    return [x for x in order if x in present] + sorted(x for x in present if x not in order)


def _steps_axis(ax, steps) -> None:
    steps = sorted({float(s) for s in steps if np.isfinite(s)})
    if len(steps) > 1 and min(steps) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(steps)
    ax.set_xticklabels([fmt(s, "int") for s in steps])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps")


# --- quality vs steps ---------------------------------------------------------------------------
def steps_figure(study: Study, config: dict | None, col: str, ylabel: str, title: str, path, *,
                 data_frame: pd.DataFrame | None = None, logy: bool = False, ci: bool = False) -> Path:
    """One panel per layout: `col` vs sampling steps, a line per method, a dashed data line."""
    frame = getattr(study, {"gen_ppl": "genppl", "entropy_nats": "genppl", "mauve": "mauve"}.get(col, col))
    if frame.empty or col not in frame.columns or frame[col].notna().sum() == 0:
        return placeholder(path, title)
    agg = sort_rows(aggregate(frame, GROUP + ["steps"], [col], keep=("ci95_lo", "ci95_hi") if ci else ()), config)
    colors = study_colors(study)
    many = agg["size"].nunique() > 1
    layouts = _layouts(agg)
    fig, axes = _new(len(layouts), title)
    for ax, layout in zip(axes, layouts):
        sub = agg[agg["layout"] == layout]
        for _, g in sub.groupby(GROUP, sort=False):
            g = g.sort_values("steps")
            r0 = g.iloc[0]
            y = g[col].to_numpy(float)
            if g["n_seeds"].max() > 1:
                yerr = g[f"{col}_sd"].fillna(0).to_numpy(float)
            elif ci and "ci95_lo" in g:
                yerr = np.vstack([y - g["ci95_lo"].to_numpy(float), g["ci95_hi"].to_numpy(float) - y])
                yerr = np.nan_to_num(np.clip(yerr, 0, None))
            else:
                yerr = None
            ax.errorbar(g["steps"], y, yerr=yerr, capsize=3, color=colors[str(r0["method"])],
                        ls=LINESTYLE.get(layout, "-"), marker=MARKER.get(layout, "o"), label=_label(r0, many))
        if data_frame is not None and len(data_frame) and col in data_frame.columns:
            ref = data_frame[data_frame["layout"] == layout][col].dropna()
            if len(ref):
                ax.axhline(ref.mean(), color="0.3", ls=":", lw=1.5, label="data (real text)")
        _steps_axis(ax, sub["steps"])
        if logy:
            _log_y(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{layout} layout", fontsize=10)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# --- lengths -------------------------------------------------------------------------------------
def lengths_figure(study: Study, config: dict | None, path) -> Path:
    """Length histogram and CDF of generated text vs data, at the largest number of steps."""
    title = "Generated length distribution vs data (variable-length runs)"
    h = study.length_hist
    if h.empty or not (h["source"] == "model").any():
        return placeholder(path, title, "no length histograms in this study")
    model = h[h["source"] == "model"]
    smax = model["steps"].max()
    model = model[model["steps"] == smax]
    colors = study_colors(study)
    many = model["size"].nunique() > 1
    fig, (ax_h, ax_c) = _new(2, f"{title}, {fmt(smax, 'int')} sampling steps")

    def draw(g, **kw):
        c = g.groupby(["bin_lo", "bin_hi"], sort=True)["count"].sum().reset_index()   # pool seeds
        total = c["count"].sum()
        if total <= 0:
            return
        width = (c["bin_hi"] - c["bin_lo"]).to_numpy(float)
        dens = c["count"].to_numpy(float) / total / width
        edges = np.append(c["bin_lo"].to_numpy(float), c["bin_hi"].iloc[-1])
        ax_h.stairs(dens, edges, **kw)
        cdf_kw = {k: v for k, v in kw.items() if k not in ("fill", "alpha")}
        if kw.get("fill"):                    # the data: a dark dashed line on the CDF panel
            cdf_kw.update(color="0.2", ls="--", lw=2.0)
        ax_c.plot(edges, np.concatenate([[0], np.cumsum(c["count"].to_numpy(float)) / total]), **cdf_kw)

    data = h[h["source"] == "data"]
    if len(data):
        first = data[data["run"] == data["run"].iloc[0]]   # every run stores the same data histogram
        draw(first, color="0.5", fill=True, alpha=0.35, label="data (real text)")
    order = sort_rows(model[GROUP].drop_duplicates(), config)
    for _, key in order.iterrows():
        g = model[(model[GROUP] == key[GROUP].to_numpy()).all(axis=1)]
        draw(g, color=colors[str(key["method"])], lw=1.8, label=_label(key, many))
    ax_h.set_xlabel("sequence length (tokens)")
    ax_h.set_ylabel("density (fraction per token of length)")
    ax_h.set_title("histogram", fontsize=10)
    ax_c.set_xlabel("sequence length (tokens)")
    ax_c.set_ylabel("cumulative fraction of samples")
    ax_c.set_ylim(0, 1.02)
    ax_c.set_title("CDF", fontsize=10)
    ax_h.legend(fontsize=8)
    ax_c.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


# --- training curves ------------------------------------------------------------------------------
def training_figure(study: Study, config: dict | None, path) -> Path:
    """Training loss vs step and vs wall time, one line per run."""
    title = "Training loss (each method's own objective; values are not comparable across methods)"
    h = study.history
    if h.empty or "loss" not in h.columns or h["loss"].notna().sum() == 0:
        return placeholder(path, "Training loss", "no training histories in this study")
    colors = study_colors(study)
    has_wall = "wall_time" in h.columns and h["wall_time"].notna().any()
    fig, axes = _new(2 if has_wall else 1, title)
    runs = sort_rows(h[["run", "method", "layout", "size", "seed"]].drop_duplicates(), config)
    for _, r in runs.iterrows():
        g = h[h["run"] == r["run"]].dropna(subset=["loss"]).sort_values("step" if "step" in h else "wall_time")
        kw = dict(color=colors[str(r["method"])], ls=LINESTYLE.get(r["layout"], "-"), lw=1.4, label=r["run"])
        if "step" in g:
            axes[0].plot(g["step"], g["loss"], **kw)
        if has_wall:
            axes[-1].plot(g["wall_time"], g["loss"], **kw)
    loss = h["loss"].dropna()
    positive = bool((loss > 0).all() and loss.max() / loss.min() > 10)   # log only for a wide range
    for ax in axes:
        if positive:
            _log_y(ax)
        ax.set_ylabel("training loss (log scale)" if positive else "training loss")
    axes[0].set_xlabel("optimizer step")
    if has_wall:
        axes[-1].set_xlabel("wall-clock time (s)")
    axes[-1].legend(fontsize=7, ncol=1 + len(runs) // 10)
    return save_figure(fig, path)


# --- cost ------------------------------------------------------------------------------------------
def _bars(ax, agg: pd.DataFrame, col: str, ratio: pd.Series, colors: dict, many: bool) -> None:
    x = np.arange(len(agg))
    y = agg[col].to_numpy(float)
    err = agg[f"{col}_sd"].to_numpy(float) if f"{col}_sd" in agg else np.full(len(agg), np.nan)
    ax.bar(x, y, color=[colors[str(m)] for m in agg["method"]], edgecolor="black", lw=0.5)
    has = np.isfinite(err)                       # sd over seeds, only where there are several
    if has.any():
        ax.errorbar(x[has], y[has], yerr=err[has], fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(x)
    ax.set_xticklabels([_label(r, many).replace(" (", "\n(") for _, r in agg.iterrows()], fontsize=8)
    top = np.nanmax(y + np.nan_to_num(err)) if np.isfinite(y).any() else 1.0
    for xi, yi, ei, ri in zip(x, y, np.nan_to_num(err), ratio):
        if np.isfinite(yi):
            ax.text(xi, yi + ei + 0.02 * top, fmt(ri, "ratio") + " DID" if np.isfinite(ri) else "no reference",
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, top * 1.15)


def cost_figure(study: Study, config: dict | None, path) -> Path:
    """Training throughput and inference time per sample, with the ratio to DID on each bar."""
    ref = reference_methods(config)
    tr = sort_rows(aggregate(study.speed_train, GROUP, ["tokens_per_s"]), config)
    tr = tr[tr["tokens_per_s"].notna()] if len(tr) else tr
    sp = aggregate(study.speed_sample, GROUP + ["steps"], ["s_per_sample"])
    smax = sp["steps"].max() if len(sp) else np.nan
    sp = sort_rows(sp[(sp["steps"] == smax) & sp["s_per_sample"].notna()], config) if len(sp) else sp
    if tr.empty and sp.empty:
        return placeholder(path, "Cost", "no speed measurements in this study")
    colors = study_colors(study)
    many = pd.concat([tr["size"], sp["size"]]).nunique() > 1
    refs = ", ".join(f"{m} ({lay})" for lay, m in sorted(ref.items()))
    fig, (a1, a2) = _new(2, f"Cost relative to DID (reference: {refs})")
    if len(tr):
        _bars(a1, tr.reset_index(drop=True), "tokens_per_s", add_ratio(tr.reset_index(drop=True), "tokens_per_s", ref),
              colors, many)
    a1.set_ylabel("training throughput (tokens/s, higher is faster)")
    a1.set_title("training", fontsize=10)
    if len(sp):
        sp = sp.reset_index(drop=True)
        _bars(a2, sp, "s_per_sample", add_ratio(sp, "s_per_sample", ref, match=("steps",)), colors, many)
    a2.set_ylabel("inference time (s per sample, lower is faster)")
    a2.set_title(f"sampling, {fmt(smax, 'int')} steps", fontsize=10)
    return save_figure(fig, path)


# --- the cost benchmark hook ------------------------------------------------------------------
def bench_figure(json_path, out_png) -> Path:
    """Plot a cost-benchmark JSON ({"rows": [{method, layout, size, seq_len, s_per_step: {min,
    median, max}, tokens_per_s, ratio_to_did, peak_mem_mb}]}): s/step and ratio-to-DID bars."""
    json_path = Path(json_path)
    title = f"Cost benchmark: {json_path.stem}"
    try:
        rows = json.loads(json_path.read_text()).get("rows") or []
    except (OSError, ValueError, AttributeError):
        rows = []
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return placeholder(out_png, title, "no rows in the benchmark file")

    def stat(r, key):          # (median, min, max); a missing min/max falls back to the median
        d = r.get(key) if isinstance(r.get(key), dict) else {}
        med = num(d.get("median"))
        lo, hi = num(d.get("min")), num(d.get("max"))
        return med, lo if np.isfinite(lo) else med, hi if np.isfinite(hi) else med

    colors = method_colors(r.get("method", "?") for r in rows)
    labels = [f"{r.get('method', '?')}\n{r.get('layout', '')} {r.get('size', '')}\nL={r.get('seq_len', '?')}"
              for r in rows]
    x = np.arange(len(rows))
    fig, axes = _new(2, title)
    for ax, key, ylabel in ((axes[0], "s_per_step", "seconds per training step (median, min–max)"),
                            (axes[1], "ratio_to_did", "ratio to DID as recorded (median, min–max)")):
        s = np.array([stat(r, key) for r in rows], dtype=float)
        med, lo, hi = s[:, 0], s[:, 1], s[:, 2]
        yerr = np.nan_to_num(np.clip(np.vstack([med - lo, hi - med]), 0, None))
        ax.bar(x, np.nan_to_num(med), yerr=yerr, capsize=3, edgecolor="black", lw=0.5,
               color=[colors[str(r.get("method", "?"))] for r in rows])
        top = np.nanmax(np.fmax(hi, med)) if np.isfinite(med).any() else 1.0
        for xi, m, h in zip(x, med, np.fmax(hi, med)):
            if np.isfinite(m):
                text = fmt(m, "ratio") if key == "ratio_to_did" else fmt(m) + " s"
                ax.text(xi, h + 0.02 * top, text, ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, 1.12 * top)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(ylabel)
    axes[1].axhline(1.0, color="0.3", ls=":", lw=1.2, label="DID (= 1)")
    axes[1].legend(fontsize=8)
    return save_figure(fig, out_png)


# --- all figures -------------------------------------------------------------------------------------
def all_figures(study: Study, config: dict | None, out_dir) -> list[Path]:
    out = Path(out_dir)
    files = [
        steps_figure(study, config, "gen_ppl", "generative perplexity (evaluator LM, log scale)",
                     "Generative perplexity vs sampling steps (lower is better; bars: 95% CI or sd over seeds)",
                     out / "genppl_steps.png", data_frame=study.genppl_data, logy=True, ci=True),
        steps_figure(study, config, "entropy_nats", "unigram entropy per sample (nats)",
                     "Unigram entropy of samples vs sampling steps (low = repetitive; bars: sd over seeds)",
                     out / "entropy_steps.png", data_frame=study.genppl_data),
        steps_figure(study, config, "mauve", "MAUVE (0–1, higher is better)",
                     "MAUVE vs sampling steps (bars: sd over seeds)", out / "mauve_steps.png"),
        lengths_figure(study, config, out / "lengths.png"),
        training_figure(study, config, out / "train_loss.png"),
        cost_figure(study, config, out / "cost.png"),
    ]
    bench_dir = Path(study.root) / "bench"
    if bench_dir.is_dir():
        files += [bench_figure(p, out / f"bench-{p.stem}.png") for p in sorted(bench_dir.glob("*.json"))]
    return files
