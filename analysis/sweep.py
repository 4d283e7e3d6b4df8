"""The hyper-parameter sweep table (a study with a `sweep:` grid, issue 23).

Every method is trained at every (learning rate, batch) point of the grid on the same number of
training sequences, and each point is scored by its final validation bound (train.json
`valid_nats_per_token`: the strict bound of the EMA weights on the validation rows, never the test
rows, so choosing the best point does not leak into the test numbers). Per method the table gives
the best point, and its sensitivity: how much worse the median and the worst point of the grid are
than the best. A method that needs no tuning has a small sensitivity; the paper's "no
hyper-parameter tuning" claim for DID is a claim about this spread compared with the baselines'.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from harness.results.study import Study
from analysis import plotting
from analysis.frames import DASH, Table, display_columns, fmt, missing


def sweep_points(study: Study) -> pd.DataFrame:
    """One row per grid point and seed: base_method, layout, lr, batch_size, steps, valid bound."""
    cols = ["base_method", "layout", "lr", "batch_size", "steps", "seed", "valid_nats_per_token", "valid_stderr"]
    runs = study.runs
    if runs.empty or "lr" not in runs.columns:
        return pd.DataFrame(columns=cols)
    runs = runs.assign(**{c: np.nan for c in cols if c not in runs.columns})
    return runs[cols].dropna(subset=["lr", "batch_size", "valid_nats_per_token"]).reset_index(drop=True)


def sweep_summary(points: pd.DataFrame) -> pd.DataFrame:
    """Per (base_method, layout): the best point, its bound, and the median / worst gap to it."""
    cols = ["base_method", "layout", "points", "best_lr", "best_batch_size", "best_nats_per_token",
            "median_minus_best", "worst_minus_best"]
    if points.empty:
        return pd.DataFrame(columns=cols)
    per_point = points.groupby(["base_method", "layout", "lr", "batch_size"], sort=False)["valid_nats_per_token"].mean()
    rows = []
    for (method, layout), g in per_point.groupby(level=["base_method", "layout"], sort=False):
        values = g.droplevel(["base_method", "layout"])
        best = values.idxmin()
        rows.append({"base_method": method, "layout": layout, "points": len(values), "best_lr": best[0],
                     "best_batch_size": int(best[1]), "best_nats_per_token": float(values.min()),
                     "median_minus_best": float(values.median() - values.min()),
                     "worst_minus_best": float(values.max() - values.min())})
    return pd.DataFrame(rows, columns=cols)


def sweep_table(study: Study, config: dict | None) -> Table:
    """Each method's grid: final validation bound per (lr, batch), its best point and sensitivity."""
    points = sweep_points(study)
    summary = sweep_summary(points)
    grid = (config or {}).get("sweep") or {}
    lrs = sorted(points["lr"].unique()) if len(points) else list(grid.get("lr", []))
    batches = sorted(points["batch_size"].unique()) if len(points) else list(grid.get("batch_size", []))
    rows = []
    mean = points.groupby(["base_method", "layout", "lr", "batch_size"], sort=False)["valid_nats_per_token"].mean() \
        if len(points) else pd.Series(dtype=float)
    # a point's standard error: the validation estimate's (rows and draws), pooled over seeds
    stderr = (points.groupby(["base_method", "layout", "lr", "batch_size"], sort=False)["valid_stderr"]
              .apply(lambda v: float(np.sqrt((v.astype(float) ** 2).sum()) / len(v))) if len(points)
              else pd.Series(dtype=float))
    for r in summary.to_dict("records"):
        row = {"Method": r["base_method"], "Layout": r["layout"]}
        for b in batches:
            for lr in lrs:
                v = mean.get((r["base_method"], r["layout"], lr, b), np.nan)
                best = lr == r["best_lr"] and b == r["best_batch_size"]
                row[f"lr {lr:g}, b {int(b)}"] = DASH if missing(v) else fmt(v) + (" *" if best else "")
        row["Best (lr, batch)"] = f"{r['best_lr']:g}, {r['best_batch_size']}"
        se = stderr.get((r["base_method"], r["layout"], r["best_lr"], r["best_batch_size"]), np.nan)
        row["Std. error at best"] = DASH if missing(se) else fmt(se)
        row["Median - best"] = fmt(r["median_minus_best"])
        row["Worst - best"] = fmt(r["worst_minus_best"])
        rows.append(row)
    disp = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["Method", "Layout"])
    steps = sorted(points["steps"].dropna().unique()) if len(points) else []
    budget = (f" Every point saw the same training sequences ({', '.join(fmt(s, 'int') for s in steps)} steps by "
              "batch)." if steps else "")
    return Table("sweep", "Learning-rate x batch sweep: final validation bound (nats/token; lower is better)",
                 summary, display_columns(disp, {c: disp[c] for c in disp.columns}) if len(disp) else disp, [
        "Each cell: the strict validation bound of the EMA weights at the end of training (train.json), mean over "
        "seeds; * marks the method's best point, which the headline runs use." + budget,
        "Std. error at best: the standard error of the best point's validation estimate (its rows and Monte-Carlo "
        "draws, pooled over seeds); cells of one method closer than about two of it are not told apart.",
        "Median - best / worst - best: how much the method loses at the grid's median / worst point, its "
        "sensitivity to the learning rate and batch (nats/token). A small value is what \"no tuning needed\" "
        "means; compare it between methods."])


def sweep_figure(study: Study, config: dict | None, path):
    """Per method, the validation curve of every grid point against the training sequences seen
    (steps x batch: the grid's common budget), colour by learning rate, line style by batch."""
    from matplotlib import colormaps


    h = study.history
    runs = study.runs
    title = "Sweep: validation bound vs training sequences (colour: learning rate; solid: batch 32, dashed: 128)"
    if h.empty or runs.empty or "valid_nats_per_token" not in h.columns or "lr" not in runs.columns:
        return plotting.placeholder(path, "Sweep", "no sweep in this study")
    facts = runs.set_index("run")[["base_method", "lr", "batch_size"]]
    v = h.dropna(subset=["valid_nats_per_token"]).join(facts, on="run", rsuffix="_run")
    v = v.dropna(subset=["lr", "batch_size"])
    v["sequences"] = v["step"].astype(float) * v["batch_size"].astype(float)
    methods = sorted(v["base_method"].dropna().unique())
    lrs = sorted(v["lr"].unique())
    batches = sorted(v["batch_size"].unique())
    cmap = colormaps["viridis"]
    color = {lr: cmap(i / max(1, len(lrs) - 1)) for i, lr in enumerate(lrs)}
    styles = ["-", "--", ":", "-."]

    @plotting.styled
    def draw():
        fig, axes = plotting.new_figure(len(methods), title, width=4.6, sharey=True)
        for ax, m in zip(axes, methods):
            for (lr, b), g in v[v["base_method"] == m].groupby(["lr", "batch_size"]):
                g = g.sort_values("sequences")
                ax.plot(g["sequences"], g["valid_nats_per_token"], color=color[lr],
                        ls=styles[batches.index(b) % len(styles)], marker="o", ms=2.5, label=f"lr {lr:g}, b {int(b)}")
            ax.set_title(m, fontsize=11)
            ax.set_xlabel("training sequences")
        axes[0].set_ylabel("strict validation bound (nats/token)")
        axes[-1].legend(fontsize=7, ncol=2)
        lo = float(v["valid_nats_per_token"].min())
        axes[0].set_ylim(lo - 0.02, min(float(v["valid_nats_per_token"].quantile(0.9)) + 0.1, lo + 0.8))
        return plotting.save_figure(fig, path)

    return draw()
