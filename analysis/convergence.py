"""What each row of a table was trained as: its matching (DID-S / DID-F), its budget, and whether it
converged (issue 23).

A verdict on the paper may only rest on runs that have converged and are compared at a stated
matching, so every table says, per row:

* **Matching**: `DID-F` for a run with `match: flops` (trained until its estimated training FLOPs
  equal those of the most expensive other run of its layout, `matched_to`), `DID-S` for the
  reference method's run beside it (the same training sequences as the baselines), `–` for the
  baselines themselves;
* **Plateau**: from the validation curve (history.csv, the strict bound of the EMA weights on the
  same rows at every point): the bound's improvement over the last quarter of training,
  v(step <= 3T/4) - v(T). Below PLATEAU_NATS nats/token the run has plateaued ("yes"; "yes, rising"
  when the bound got worse by more than that: converged at this learning rate, or overfitting);
  otherwise "no" (not converged: the run says nothing final about its method). A row of several seeds has
  plateaued only if every seed has. A run without a curve cannot say ("–"); an untrained
  reference run (0 steps) is "untrained".
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from harness.results.study import GROUP, Study

#: the plateau criterion: the validation bound improved by less than this over the last quarter
PLATEAU_NATS = 0.01
#: the share of training the criterion looks back over
LAST_FRACTION = 0.25
NOTE = (f"Steps x batch: the run's training budget. Matching: DID-S (the same training sequences as the baselines) "
        f"or DID-F (estimated training FLOPs matched to the most expensive baseline of its layout). Plateau: the "
        f"validation bound's improvement over the last quarter of training (worst seed); yes when below "
        f"{PLATEAU_NATS} nats/token for every seed. A row that has not plateaued is not converged: no verdict "
        f"rests on it.")


def last_quarter_improvement(curve: pd.DataFrame) -> float:
    """v(last point at or before (1 - LAST_FRACTION) T) - v(T) of one run's validation curve
    (columns step, valid_nats_per_token); NaN with fewer than two points or none that early."""
    c = curve.dropna(subset=["valid_nats_per_token"]).sort_values("step")
    if len(c) < 2:
        return math.nan
    end = float(c["step"].iloc[-1])
    early = c[c["step"] <= (1 - LAST_FRACTION) * end]
    if early.empty:
        return math.nan
    return float(early["valid_nats_per_token"].iloc[-1] - c["valid_nats_per_token"].iloc[-1])


def plateau_frame(study: Study) -> pd.DataFrame:
    """One row per run: GROUP, seed, steps, improvement (last quarter), plateau (True/False/None)."""
    runs = study.runs
    cols = GROUP + ["run", "seed", "steps", "improvement", "plateau"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    h = study.history
    rows = []
    for r in runs.to_dict("records"):
        curve = h[h["run"] == r["run"]] if len(h) and "valid_nats_per_token" in h.columns else pd.DataFrame()
        imp = last_quarter_improvement(curve) if len(curve) else math.nan
        untrained = r.get("steps") == 0
        plateau = None if untrained or math.isnan(imp) else bool(imp < PLATEAU_NATS)
        rows.append({**{k: r.get(k) for k in GROUP}, "run": r["run"], "seed": r.get("seed"), "steps": r.get("steps"),
                     "improvement": imp, "plateau": plateau})
    return pd.DataFrame(rows, columns=cols)


def _plateau_text(group: pd.DataFrame) -> str:
    if (group["steps"] == 0).all():
        return "untrained"
    known = group.dropna(subset=["improvement"])
    if known.empty:
        return "–"
    worst = float(known["improvement"].max())
    ok = bool((known["plateau"] == True).all()) and len(known) == len(group)  # noqa: E712
    if ok and float(known["improvement"].min()) < -PLATEAU_NATS:   # flat or worse: a bound that rose
        return f"yes, rising ({float(known['improvement'].min()):+.3f})"
    return f"yes ({worst:+.3f})" if ok else f"no ({worst:+.3f})"


def run_facts(study: Study, references: dict[str, str]) -> pd.DataFrame:
    """Per table row (GROUP): matching (DID-S / DID-F / –), matched_to, budget (steps x batch),
    plateau text and `converged` (every seed plateaued), `untrained` (a 0-step reference run)."""
    cols = GROUP + ["matching", "matched_to", "budget", "plateau_text", "converged", "untrained", "base_method"]
    runs = study.runs
    if runs.empty:
        return pd.DataFrame(columns=cols)
    runs = runs.assign(**{c: np.nan for c in ("match", "matched_to", "batch_size", "base_method") if c not in runs})
    plateaus = plateau_frame(study)
    flops_layouts = {(r["layout"], r["base_method"]) for r in runs.to_dict("records") if r.get("match") == "flops"}
    rows = []
    for key, g in runs.groupby(GROUP, sort=False, dropna=False):
        first = g.iloc[0].to_dict()
        method, layout = key[0], key[1]
        base = first.get("base_method") if isinstance(first.get("base_method"), str) else method
        if first.get("match") == "flops":
            matching = "DID-F"
        elif method == references.get(layout) and (layout, base) in flops_layouts:
            matching = "DID-S"
        else:
            matching = "–"
        steps = sorted({int(s) for s in g["steps"].dropna()})
        batch = sorted({int(b) for b in g["batch_size"].dropna()})
        budget = (f"{'/'.join(map(str, steps))} x {'/'.join(map(str, batch))}" if steps and batch else "–")
        p = plateaus[plateaus["run"].isin(g["run"])]
        untrained = bool(steps == [0])
        converged = (not untrained and len(p) == len(g) and bool((p["plateau"] == True).all()))  # noqa: E712
        matched = first.get("matched_to")
        rows.append({**dict(zip(GROUP, key)), "matching": matching,
                     "matched_to": matched if isinstance(matched, str) else "",
                     "budget": budget, "plateau_text": _plateau_text(p) if len(p) else "–",
                     "converged": converged, "untrained": untrained, "base_method": base})
    return pd.DataFrame(rows, columns=cols)


def flops_reference(study: Study, references: dict[str, str]) -> dict[str, str]:
    """Per layout, the label of the FLOPs-matched run of the reference method (DID-F), if any."""
    runs = study.runs
    if runs.empty or "match" not in runs.columns:
        return {}
    out = {}
    for r in runs.to_dict("records"):
        ref = references.get(r["layout"])
        if r.get("match") == "flops" and ref is not None and r.get("base_method") == _base(runs, ref, r["layout"]):
            out.setdefault(r["layout"], r["method"])
    return out


def _base(runs: pd.DataFrame, label: str, layout: str):
    hit = runs[(runs["method"] == label) & (runs["layout"] == layout)]
    if hit.empty:
        return label
    b = hit.iloc[0].get("base_method")
    return b if isinstance(b, str) else label


def untrained_labels(study: Study) -> set[str]:
    """The rows (labels) that are untrained reference runs (0 steps): figures draw them as levels."""
    runs = study.runs
    if runs.empty or "steps" not in runs.columns:
        return set()
    return set(runs.loc[runs["steps"] == 0, "method"].astype(str))
