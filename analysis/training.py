"""The training table: how every row of a study was trained and how its training went (issue 23).

Per (method, layout, size): the budget (steps x batch), learning rate, matching, the share of
steps whose gradient was clipped and the median pre-clip gradient norm (a recipe whose clipping
acts on one method and not another shows here), the final validation bound and whether the
validation curve plateaued. From train.json and history.csv only, so every study has it.
"""
from __future__ import annotations

import numpy as np

from harness.results.study import GROUP, Study
from analysis import convergence
from analysis.frames import (Table, aggregate, display_columns, ensure_columns, facts_of, fmt_column, ident_display,
                             pm, sort_rows, with_facts)

COLS = ["lr", "clipped_fraction", "grad_norm_median", "valid_nats_per_token", "train_flops", "wall_seconds"]


def training_table(study: Study, config: dict | None) -> Table:
    runs = ensure_columns(study.runs, ["lr", "clipped_fraction", "grad_norm_median", "valid_nats_per_token", "flops_per_step",
                                "wall_seconds", "steps"])
    runs = runs.assign(train_flops=runs["flops_per_step"].astype(float) * runs["steps"].astype(float))
    agg = sort_rows(aggregate(runs, GROUP, COLS), config)
    facts = facts_of(study, config)
    plateaus = convergence.plateau_frame(study)
    imp = aggregate(plateaus.assign(improvement=plateaus["improvement"].astype(float)), GROUP, ["improvement"]) \
        if len(plateaus) else None
    if imp is not None:
        agg = agg.merge(imp[GROUP + ["improvement"]], on=GROUP, how="left")
    else:
        agg["improvement"] = np.nan
    pct = lambda v: "–" if v != v else f"{100 * v:.0f}%"   # noqa: E731
    disp = display_columns(agg, {**ident_display(agg, facts=facts), "Seeds": fmt_column(agg, "n_seeds", "int"),
                       "LR": fmt_column(agg, "lr"),
                       "Clipped steps": [pct(v) for v in agg["clipped_fraction"]],
                       "Grad norm (median, pre-clip)": fmt_column(agg, "grad_norm_median"),
                       "Valid bound (nats/token)": [pm(r["valid_nats_per_token"], r["valid_nats_per_token_sd"])
                                                    for r in agg.to_dict("records")],
                       "Train FLOPs": ["–" if v != v else f"{v:.3g}" for v in agg["train_flops"]],
                       "Train s": fmt_column(agg, "wall_seconds", "int")})
    data = with_facts(agg[GROUP + ["n_seeds"] + [x for c in COLS for x in (c, f"{c}_sd")] + ["improvement"]], facts)
    return Table("training", "How each row was trained: budget, clipping, validation bound and plateau", data, disp, [
        "Clipped steps: the share of optimizer steps whose gradient norm exceeded train.grad_clip (every method's "
        "loss is its objective per predicted token, so one clip acts alike on all); grad norm: the median of the "
        "logged pre-clip norms. Valid bound: the strict bound of the EMA weights on the validation rows at the "
        "end (mean ± sd over seeds). Train FLOPs: estimated FLOPs per step x steps. Train s: training wall time "
        "(the machine may have been shared: the cost tables time methods fairly).",
        convergence.NOTE])

