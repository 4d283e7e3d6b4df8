"""The study's figures (PNG): quality vs sampling steps, lengths vs data, training curves, cost.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so importing this module changes no global backend (safe in notebooks and workers).
Every figure is drawn inside one seaborn style (`STYLE`, applied with `matplotlib.rc_context`
for the duration of the figure only, so no global rcParams change) with one colour per method
across all figures and studies (`method_colors`: seaborn's colour-blind palette in a fixed
method order). Seeds are aggregated as mean ± sd; a single seed shows the run's own 95% CI
where the result file has one. Cost bars (seaborn.barplot, horizontal, grouped by case with a
legend per method) show the median with min–max whiskers over repeats for interleaved
measurements (cost/<layout>.json, bench/*.json), mean ± sd over seeds for the per-run speed.json
fallback. A figure with nothing to show is still written, with a "no results" note, so the
set of output files is the same for every study.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.core.atomic import atomic_write
from harness.results.study import GROUP, Study, num
from analysis.cost_tables import COST_SOURCE, SPEED_SOURCE, cost_sample_rows, cost_train_rows
from analysis.frames import aggregate, fmt, reference_methods, sort_rows

LINESTYLE = {"varlen": "-", "fixed": "--"}
MARKER = {"varlen": "o", "fixed": "s"}
#: the fixed method order of the palette: a method has the same colour in every figure and study
METHOD_ORDER = ("did", "did-fixed", "mdlm", "radd", "ilm", "ar")
#: seaborn palette of every figure (colour-blind safe); DID light/dark blue, then the baselines
PALETTE = "colorblind"
_SLOTS = {"did": 0, "did-fixed": 9, "mdlm": 1, "radd": 2, "ilm": 3, "ar": 4}


def _style() -> dict:
    """The seaborn style every figure is drawn in (rcParams, applied per figure)."""
    import seaborn as sns

    return {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.15),
            "axes.edgecolor": "0.3", "grid.color": "0.88", "legend.frameon": True}


def styled(fn):
    """Draw the figure inside the seaborn style (matplotlib.rc_context: nothing global changes)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(_style()):
            return fn(*args, **kwargs)

    return wrapper


# --- helpers -----------------------------------------------------------------------------------
def method_colors(methods) -> dict:
    """A stable colour per method: the same colour in every figure of every study.

    The shipped methods have fixed slots of seaborn's colour-blind palette (METHOD_ORDER: DID
    blue, DID-fixed light blue, MDLM orange, RADD green, ILM red, AR purple); other names take
    the remaining slots in sorted order.
    """
    import seaborn as sns

    pal = sns.color_palette(PALETTE, 10)
    names = {str(m) for m in methods}
    free = [i for i in range(10) if i not in _SLOTS.values()]
    extra = sorted(names - set(_SLOTS))
    colors = {m: pal[_SLOTS[m]] for m in names if m in _SLOTS}
    colors.update({m: pal[free[i % len(free)]] for i, m in enumerate(extra)})
    return colors


def ordered_methods(methods) -> list[str]:
    """Methods in METHOD_ORDER, other names after them (sorted)."""
    present = {str(m) for m in methods}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def study_colors(study: Study) -> dict:
    """Colours from every method in the study, so a method keeps its colour in every figure."""
    frames = (study.runs, study.ppl, study.genppl, study.mauve, study.speed_train, study.speed_sample,
              study.cost_train, study.cost_sample, study.history)
    return method_colors(m for f in frames if "method" in f.columns for m in f["method"].dropna())


def _log_y(ax) -> None:
    """Log y axis with plain-number tick labels (1, 2, 5 per decade) instead of 10^x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def log_x(ax) -> None:
    """Log x axis with plain-number tick labels (1, 2, 5 per decade)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _label(row, many_sizes: bool) -> str:
    return f"{row['method']} ({row['layout']}{', ' + str(row['size']) if many_sizes else ''})"


def save_figure(fig: Figure, path) -> Path:
    """Save as PNG via a temp file + rename (readers never see a partial image)."""
    return atomic_write(path, "wb", lambda fh: fig.savefig(fh, format="png", dpi=130, bbox_inches="tight"))


def new_figure(ncols: int = 1, title: str = "", height: float = 4.4, width: float = 6.2, sharey: bool = False) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, 1)]
    for i in range(1, ncols):
        axes.append(fig.add_subplot(1, ncols, i + 1, sharey=axes[0] if sharey else None))
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


@styled
def placeholder(path, title: str, reason: str = "no results for this figure in this study") -> Path:
    fig, (ax,) = new_figure(1, title)
    ax.axis("off")
    ax.text(0.5, 0.5, reason, ha="center", va="center", fontsize=12, color="0.4", transform=ax.transAxes)
    return save_figure(fig, path)


def layouts_present(df: pd.DataFrame) -> list[str]:
    order = ["varlen", "fixed"]
    present = [str(x) for x in df["layout"].dropna().unique()]
    return [x for x in order if x in present] + sorted(x for x in present if x not in order)


def steps_axis(ax, steps) -> None:
    steps = sorted({float(s) for s in steps if np.isfinite(s)})
    if len(steps) > 1 and min(steps) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(steps)
    ax.set_xticklabels([fmt(s, "int") for s in steps])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps")


# --- quality vs steps ---------------------------------------------------------------------------
@styled
def steps_figure(study: Study, config: dict | None, col: str, ylabel: str, title: str, path, *,
                 data_frame: pd.DataFrame | None = None, logy: bool = False, ci: bool = False) -> Path:
    """One panel per layout: `col` vs sampling steps, a line per method, a dashed data line."""
    frame = getattr(study, {"gen_ppl": "genppl", "entropy_nats": "genppl", "mauve": "mauve"}.get(col, col))
    if frame.empty or col not in frame.columns or frame[col].notna().sum() == 0:
        reasons = frame["reason"].dropna().astype(str) if "reason" in frame.columns else pd.Series(dtype=str)
        if len(reasons) and reasons.str.startswith("n too small").all():   # MAUVE below min_samples
            return placeholder(path, title, "no value: n too small\n" + reasons.iloc[0].removeprefix("n too small "))
        return placeholder(path, title)
    agg = sort_rows(aggregate(frame, GROUP + ["steps"], [col], keep=("ci95_lo", "ci95_hi") if ci else ()), config)
    colors = study_colors(study)
    many = agg["size"].nunique() > 1
    layouts = layouts_present(agg)
    fig, axes = new_figure(len(layouts), title)
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
        steps_axis(ax, sub["steps"])
        if logy:
            _log_y(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{layout} layout", fontsize=10)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# --- lengths -------------------------------------------------------------------------------------
@styled
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
    fig, (ax_h, ax_c) = new_figure(2, f"{title}, {fmt(smax, 'int')} sampling steps")

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
@styled
def training_figure(study: Study, config: dict | None, path) -> Path:
    """Training loss vs step and vs wall time, one line per run."""
    title = "Training loss (each method's own objective; values are not comparable across methods)"
    h = study.history
    if h.empty or "loss" not in h.columns or h["loss"].notna().sum() == 0:
        return placeholder(path, "Training loss", "no training histories in this study")
    colors = study_colors(study)
    has_wall = "wall_time" in h.columns and h["wall_time"].notna().any()
    fig, axes = new_figure(2 if has_wall else 1, title)
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


@styled
def validation_figure(study: Study, config: dict | None, path) -> Path:
    """Strict validation bound vs optimizer step, wall-clock training time and training FLOPs, one line per run."""
    title = ("Validation bound during training (strict, nats/token; band: ± stderr)\nthe same validation rows for "
             "every method of a layout; varlen (solid) and fixed (dashed) runs see different rows")
    h = study.history
    if h.empty or "valid_nats_per_token" not in h.columns or h["valid_nats_per_token"].notna().sum() == 0:
        return placeholder(path, "Validation bound during training",
                           "no validation points in the training histories\n(history.csv without valid_nats_per_token: "
                           "trained before train.valid_every existed)")
    v = h.dropna(subset=["valid_nats_per_token"])
    panels = [(c, label, log) for c, label, log in (
        ("step", "optimizer step", False),
        ("wall_time", "wall-clock training time (s, validation excluded)", False),
        ("train_flops", "training FLOPs (estimated, log scale)", True))
        if c in v.columns and v[c].notna().any() and (not log or (v[c] > 0).any())]
    colors = study_colors(study)
    fig, axes = new_figure(len(panels), title)
    runs = sort_rows(v[["run", "method", "layout", "size", "seed"]].drop_duplicates(), config)
    for _, r in runs.iterrows():
        g = v[v["run"] == r["run"]].sort_values("step" if "step" in v.columns else panels[0][0])
        kw = dict(color=colors[str(r["method"])], ls=LINESTYLE.get(r["layout"], "-"), lw=1.4)
        for ax, (col, _, log) in zip(axes, panels):
            p = g.dropna(subset=[col])
            if log:
                p = p[p[col] > 0]
            x, y = p[col].to_numpy(float), p["valid_nats_per_token"].to_numpy(float)
            ax.plot(x, y, marker=MARKER.get(r["layout"], "o"), ms=3.5, label=r["run"], **kw)
            if "valid_stderr" in p.columns:
                err = p["valid_stderr"].fillna(0).to_numpy(float)
                ax.fill_between(x, y - err, y + err, color=kw["color"], alpha=0.15, lw=0)
    for ax, (col, label, log) in zip(axes, panels):
        if log:
            log_x(ax)
        ax.set_xlabel(label)
        ax.set_ylabel("strict validation bound (nats/token)")
    axes[-1].legend(fontsize=7, ncol=1 + len(runs) // 10)
    return save_figure(fig, path)


# --- cost ------------------------------------------------------------------------------------------
def _spread(df: pd.DataFrame, col: str, kind: str) -> pd.DataFrame:
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

    `df` has columns case, method, `col`, `col`_lo, `col`_hi (see _spread); seaborn.barplot
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


def _method_legend(fig: Figure, methods, colors: dict) -> None:
    from matplotlib.patches import Patch

    names = ordered_methods(methods)
    fig.legend(handles=[Patch(facecolor=colors[m], edgecolor="0.25", label=m) for m in names], loc="outside lower center",
               ncol=min(len(names), 6), fontsize=9, title="method", title_fontsize=9)


def _bar_height(cases: int, bars: int) -> float:
    return max(3.2, 1.6 + 0.24 * bars + 0.15 * cases)


def _ratio_label(v, what: str = "DID") -> str | None:
    return f"{float(v):.2f}× {what}" if not (v is None or (isinstance(v, float) and np.isnan(v))) else None


def _cost_frames(study: Study, config: dict | None) -> tuple[pd.DataFrame, pd.DataFrame, set]:
    """(train rows, sample rows, sources): the interleaved cost job per layout, speed.json otherwise."""
    ref = reference_methods(config)
    tr = cost_train_rows(study, ref)
    sp = cost_sample_rows(study, ref)
    tr = sort_rows(tr[pd.to_numeric(tr.get("tokens_per_s"), errors="coerce").notna()], config) if len(tr) else tr
    sp = sort_rows(sp[pd.to_numeric(sp.get("s_per_sample"), errors="coerce").notna()], config) if len(sp) else sp
    out = []
    for df, col in ((tr, "tokens_per_s"), (sp, "s_per_sample")):
        if len(df):
            parts = [_spread(g, col, "range" if src == COST_SOURCE else "sd") for src, g in df.groupby("source", sort=False)]
            df = pd.concat(parts).sort_index()
        out.append(df)
    sources = set(tr.get("source", pd.Series(dtype=object)).dropna()) | set(sp.get("source", pd.Series(dtype=object)).dropna())
    return out[0], out[1], sources & {COST_SOURCE, SPEED_SOURCE}


@styled
def cost_figure(study: Study, config: dict | None, path) -> Path:
    """Training throughput and inference time per sample at every steps value, a bar per method,
    with the ratio to DID written on each bar; the interleaved cost job where the study has one."""
    ref = reference_methods(config)
    tr, sp, sources = _cost_frames(study, config)
    if tr.empty and sp.empty:
        return placeholder(path, "Cost", "no cost or speed measurements in this study")
    colors = study_colors(study)
    many = pd.concat([tr.get("size", pd.Series(dtype=object)), sp.get("size", pd.Series(dtype=object))]).nunique() > 1
    size = (lambda r: f" · {r['size']}") if many else (lambda r: "")
    if len(tr):
        tr = tr.assign(case=[f"{r['layout']}{size(r)}" for r in tr.to_dict("records")],
                       label=[_ratio_label(v) for v in tr["tokens_per_s_ratio"]])
    if len(sp):
        sp = sp.assign(case=[f"{r['layout']}{size(r)} · {fmt(r['steps'], 'int')} steps" for r in sp.to_dict("records")],
                       label=[_ratio_label(v) for v in sp["s_per_sample_ratio"]])
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
    height = _bar_height(0, max(n_tr, n_sp))
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
    _method_legend(fig, methods, colors)
    return save_figure(fig, path)


# --- the cost benchmark hook ------------------------------------------------------------------
def _bench_rows(obj: dict) -> tuple[str, list[dict]]:
    """(kind, rows) of a `harness bench` JSON: "train" (bench-train) or "sample" (bench-sample)."""
    rows = [r for r in (obj.get("rows") or []) if isinstance(r, dict)]
    kind = str(obj.get("kind") or "")
    if kind == "bench-attention":
        return "attention", rows
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
    kind, rows = _bench_rows(obj)
    if not rows:
        return None
    if kind == "attention":
        return _attention_plot(obj, rows, title)

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
                         height=_bar_height(len(order), len(df) + len(order)), width=6.6, sharey=True)
    positive = df[value][df[value] > 0]
    logx = bool(len(positive) and positive.max() / positive.min() > 20)
    hbar_panel(a1, df, value, order=order, colors=colors, labels="v_label", logx=logx,
               xlabel=f"{what} (median, min–max{', log scale' if logx else ''})")
    hbar_panel(a2, df, "ratio", order=order, colors=colors, labels="r_label", ref_line=1.0,
               xlabel=f"{'s/sample' if kind == 'sample' else 's/step'} relative to DID (> 1: slower than DID)")
    a2.tick_params(axis="y", labelleft=False)
    _method_legend(fig, df["method"], colors)
    return fig


def _attention_plot(obj: dict, rows: list[dict], title: str) -> Figure | None:
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
    fig, (a1, a2) = new_figure(2, f"{title}\n{sub}", height=_bar_height(len(order), len(df) + len(order)),
                         width=6.6, sharey=True)
    hbar_panel(a1, df, "ms", order=order, colors=colors, labels="v_label",
               xlabel="attention forward + backward (ms)")
    hbar_panel(a2, df, "ratio", order=order, colors=colors, labels="r_label", ref_line=1.0,
               xlabel="time relative to one dense call on [B, L]")
    a2.tick_params(axis="y", labelleft=False)
    _method_legend(fig, df["method"], colors)
    return fig


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
        validation_figure(study, config, out / "validation.png"),
        cost_figure(study, config, out / "cost.png"),
    ]
    bench_dir = Path(study.root) / "bench"
    if bench_dir.is_dir():
        files += [bench_figure(p, out / f"bench-{p.stem}.png") for p in sorted(bench_dir.glob("*.json"))]
    return files
