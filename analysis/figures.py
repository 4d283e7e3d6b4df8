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

from pathlib import Path

import numpy as np
import pandas as pd

from harness.results.study import GROUP, Study
from analysis.cost_figures import bench_figure, cost_figure
from analysis.frames import aggregate, fmt, sort_rows
from analysis.plotting import (LINESTYLE, MARKER, layouts_present, log_x, log_y, new_figure, placeholder, run_label,
                               save_figure, steps_axis, study_colors, styled)


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
                        ls=LINESTYLE.get(layout, "-"), marker=MARKER.get(layout, "o"), label=run_label(r0, many))
        if data_frame is not None and len(data_frame) and col in data_frame.columns:
            ref = data_frame[data_frame["layout"] == layout][col].dropna()
            if len(ref):
                ax.axhline(ref.mean(), color="0.3", ls=":", lw=1.5, label="data (real text)")
        steps_axis(ax, sub["steps"])
        if logy:
            log_y(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{layout} layout", fontsize=10)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


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
        draw(g, color=colors[str(key["method"])], lw=1.8, label=run_label(key, many))
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
            log_y(ax)
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
