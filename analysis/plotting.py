"""What every figure shares: one seaborn style applied per figure (no global rcParams change),
one colour per method across all figures and studies, the axes helpers, and saving.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so importing this module changes no global backend. A figure with nothing to show is
still written (`placeholder`), so the set of output files is the same for every study.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.core.atomic import atomic_write
from harness.core import methods as registry
from harness.results.study import Study
from analysis.frames import fmt


LINESTYLE = {"varlen": "-", "fixed": "--"}


MARKER = {"varlen": "o", "fixed": "s"}


#: seaborn palette of every figure (colour-blind safe); DID light/dark blue, then the baselines
PALETTE = "colorblind"


def figure_style() -> dict:
    """The seaborn style every figure is drawn in (rcParams, applied per figure)."""
    import seaborn as sns

    return {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.15),
            "axes.edgecolor": "0.3", "grid.color": "0.88", "legend.frameon": True}


def styled(fn):
    """Draw the figure inside the seaborn style (matplotlib.rc_context: nothing global changes)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(figure_style()):
            return fn(*args, **kwargs)

    return wrapper


def method_colors(methods) -> dict:
    """A stable colour per method: the same colour in every figure of every study.

    A method that fixes its slot of seaborn's colour-blind palette (`Method.palette_slot`: DID
    blue, DID-fixed light blue, MDLM orange, RADD green, ILM red, AR purple) has it; other names
    (run labels, other methods) take the remaining slots in sorted order.
    """
    import seaborn as sns

    pal = sns.color_palette(PALETTE, 10)
    names = {str(m) for m in methods}
    slots = registry.palette_slots()
    free = [i for i in range(10) if i not in slots.values()]
    extra = sorted(names - set(slots))
    colors = {m: pal[slots[m]] for m in names if m in slots}
    colors.update({m: pal[free[i % len(free)]] for i, m in enumerate(extra)})
    return colors


def ordered_methods(methods) -> list[str]:
    """Methods in their display order (`Method.display_order`), other names after them (sorted)."""
    return sorted({str(m) for m in methods}, key=registry.display_rank)


def study_colors(study: Study) -> dict:
    """Colours from every method in the study, so a method keeps its colour in every figure."""
    frames = (study.runs, study.ppl, study.genppl, study.mauve, study.speed_train, study.speed_sample,
              study.cost_train, study.cost_sample, study.history)
    return method_colors(m for f in frames if "method" in f.columns for m in f["method"].dropna())


def log_y(ax) -> None:
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


def run_label(row, many_sizes: bool) -> str:
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
