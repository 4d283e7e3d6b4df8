"""Helpers every evaluation shares: a plugin metric's settings, bootstrap intervals, step lists.

Settings live under `evaluate.<section>` in the study config; the shipped metrics read them
typed (harness.core.settings), and each result logs the whole section under "settings"
(`as_dict()`), so a result always names every setting that produced it.
"""
from __future__ import annotations

import copy

import numpy as np

from harness.core.errors import UserError
from harness.core.metric_registry import metrics, plugin_settings
from harness.core.settings import GenpplSettings


def settings(config: dict, section: str) -> dict:
    """A plugin metric's settings: `config["evaluate"][section]` over its settings dataclass's
    defaults (harness.core.metric_registry). The shipped metrics read their typed section
    instead (harness.core.settings, e.g. `PplSettings.of(config)`)."""
    given = ((config or {}).get("evaluate") or {}).get(section) or {}
    if not isinstance(given, dict):
        raise UserError(f"evaluate.{section} must be a mapping, got {type(given).__name__}")
    metric = metrics().get(section)
    if metric is None or not metric.plugin:
        raise UserError(f"evaluate.{section} is not a plugin metric's section (known: "
                        f"{', '.join(m.name for m in metrics().values() if m.plugin) or 'none'})")
    return plugin_settings(metric, copy.deepcopy(given))


def bootstrap_spec(genppl: GenpplSettings) -> dict:
    """Resamples and seed of every within-run bootstrap CI (`evaluate.genppl.bootstrap` / `seed`)."""
    return {"reps": int(genppl.bootstrap), "seed": int(genppl.seed)}


def percentile_ci(values, level: float = 0.95) -> list[float] | None:
    """[lo, hi] percentiles of bootstrap replicates (non-finite ones ignored; None if none)."""

    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    lo, hi = np.percentile(v, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return [float(lo), float(hi)]


def bootstrap_mean_ci(values, *, reps: int, seed: int, level: float = 0.95) -> list[float] | None:
    """95% percentile bootstrap CI of the mean of `values` (non-finite values dropped first).

    None with fewer than 2 values or reps = 0. Resampled in chunks of 256 replicates, so the
    memory stays bounded for long lists. The same seed gives the same interval.
    """

    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2 or reps <= 0:
        return None
    rng = np.random.default_rng(int(seed))
    means = [x[rng.integers(0, x.size, size=(min(256, reps - c), x.size))].mean(1) for c in range(0, reps, 256)]
    return percentile_ci(np.concatenate(means), level)


def bootstrap_ratio_ci(num, den, *, reps: int, seed: int, level: float = 0.95, transform=None) -> list[float] | None:
    """Percentile bootstrap CI of sum(num) / sum(den) with (num_i, den_i) pairs resampled together.

    `transform` (monotone increasing, e.g. math.exp) is applied to the two percentiles.
    Replicates with sum(den) = 0 are dropped. None with fewer than 2 pairs or reps = 0.
    """

    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    m = num.size
    if m < 2 or reps <= 0 or den.sum() <= 0:
        return None
    rng = np.random.default_rng(int(seed))
    out = []
    for c in range(0, reps, 256):
        idx = rng.integers(0, m, size=(min(256, reps - c), m))
        a, b = num[idx].sum(1), den[idx].sum(1)
        out.append(np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan))
    ci = percentile_ci(np.concatenate(out), level)
    return [float(transform(v)) for v in ci] if ci is not None and transform is not None else ci


def steps_list(values) -> list[int]:
    """The steps sweep as a list of positive ints (a single int is allowed)."""
    items = values if isinstance(values, (list, tuple)) else [values]
    try:
        out = [int(s) for s in items]
    except (TypeError, ValueError):
        raise UserError(f"evaluate.samples.steps must be integers, got {values!r}") from None
    if not out or any(s <= 0 for s in out):
        raise UserError(f"evaluate.samples.steps must be positive integers, got {values!r}")
    return out
