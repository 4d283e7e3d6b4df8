"""Length distribution of samples against held-out data (baselines spec 6.6; varlen data).

Length = model-tokenizer content tokens (no specials) after the method's own end-of-sequence
cut, as stored in samples.jsonl / references.jsonl. Primary distance: Wasserstein-1 in tokens
(the mean absolute difference of the quantile functions); also Kolmogorov-Smirnov
sup |F_gen - F_ref|, both from scipy. Rates: empty outputs and outputs at the maximum length,
and (masked models, from samples.jsonl) content after the first PAD.

Uncertainty: 95% percentile bootstrap CIs (`evaluate.genppl.bootstrap` resamples, fixed seed):
mean_ci95 resamples the lengths; w1_ci95 and ks_ci95 resample the generated and the reference
lengths independently. Both distances are >= 0, so when the two laws are close their resampled
values sit above the point estimate (the percentile CI is then a statement of noise level, not
centred on the estimate). The lengths themselves are stored (`lengths`) for two-sample tests.
"""
from __future__ import annotations

import numpy as np
from harness.core.records import header_of, read_jsonl, write_result
from harness.core.settings import EvaluateSettings
from harness.metrics.common import bootstrap_mean_ci, bootstrap_spec, percentile_ci
from harness.metrics.samples import content_after_pad_summary, load_samples


def length_stats(lengths, max_length: int | None = None) -> dict:
    """mean, sd (ddof=1), 10/50/90% quantiles (linear interpolation), empty and max-length rates."""
    x = np.asarray(lengths, dtype=np.float64)
    if x.size == 0:
        return {"n": 0}
    q10, q50, q90 = np.quantile(x, [0.1, 0.5, 0.9])
    return {
        "n": int(x.size), "mean": float(x.mean()), "sd": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "q10": float(q10), "q50": float(q50), "q90": float(q90), "min": float(x.min()), "max": float(x.max()),
        "empty_rate": float(np.mean(x == 0)),
        "max_rate": float(np.mean(x >= max_length)) if max_length is not None else None,
    }


def distances(gen, ref) -> dict:
    """Wasserstein-1 and the two-sample KS statistic between two length samples."""
    from scipy.stats import ks_2samp, wasserstein_distance

    gen, ref = np.asarray(gen, np.float64), np.asarray(ref, np.float64)
    if gen.size == 0 or ref.size == 0:
        return {"w1": None, "ks": None}
    return {"w1": float(wasserstein_distance(gen, ref)), "ks": float(ks_2samp(gen, ref).statistic)}


def ecdf_distances(gen, ref) -> tuple[float, float]:
    """(Wasserstein-1, KS statistic) from the two empirical CDFs (= scipy's values, faster)."""
    a, b = np.sort(np.asarray(gen, np.float64)), np.sort(np.asarray(ref, np.float64))
    pts = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(a, pts, side="right") / a.size
    fb = np.searchsorted(b, pts, side="right") / b.size
    diff = np.abs(fa - fb)
    return float((diff[:-1] * np.diff(pts)).sum()), float(diff.max())


def distance_cis(gen, ref, *, reps: int, seed: int) -> dict:
    """w1_ci95 / ks_ci95: both samples resampled with replacement, `reps` times."""
    gen, ref = np.asarray(gen, np.float64), np.asarray(ref, np.float64)
    if gen.size < 2 or ref.size < 2 or reps <= 0:
        return {"w1_ci95": None, "ks_ci95": None}
    rng = np.random.default_rng(int(seed))
    w1, ks = np.empty(reps), np.empty(reps)
    for r in range(reps):
        w1[r], ks[r] = ecdf_distances(gen[rng.integers(0, gen.size, gen.size)], ref[rng.integers(0, ref.size, ref.size)])
    return {"w1_ci95": percentile_ci(w1), "ks_ci95": percentile_ci(ks)}


def histogram_edges(max_length: int, bins: int) -> np.ndarray:
    """Integer-aligned bin edges covering 0..max_length (shared by every row, so rows compare)."""
    width = max(1, int(np.ceil((max_length + 1) / bins)))
    return np.arange(0, max_length + width + 1, width, dtype=np.float64)


def lengths_values(groups: dict[int, list[int]], ref: list[int], max_length: int, bins: int, *,
                   bootstrap: int = 0, seed: int = 0) -> dict:
    """Values of lengths.json: per-steps statistics and distances, the data row, a shared histogram.

    Every row has mean_ci95 and `lengths` (the lengths themselves); by_steps entries also
    w1_ci95 and ks_ci95 (None when bootstrap = 0 or fewer than 2 lengths).
    histogram = {"bins": edges (len = counts + 1), "samples": {str(steps): counts}, "data": counts};
    lengths above the last edge (none, normally) are counted in the last bin.
    """
    edges = histogram_edges(max_length, bins)
    hist = lambda x: np.histogram(np.minimum(np.asarray(x, np.float64), edges[-1] - 0.5), bins=edges)[0].tolist()  # noqa: E731

    def row(x) -> dict:
        return {**length_stats(x, max_length), "mean_ci95": bootstrap_mean_ci(x, reps=bootstrap, seed=seed),
                "lengths": [int(v) for v in x]}

    by_steps = [{"steps": k, **row(x), **distances(x, ref), **distance_cis(x, ref, reps=bootstrap, seed=seed)}
                for k, x in groups.items()]
    return {"by_steps": by_steps, "data": row(ref),
            "histogram": {"bins": edges.tolist(), "samples": {str(k): hist(x) for k, x in groups.items()},
                          "data": hist(ref)}}


def run(args, config: dict) -> dict:
    """`evaluate lengths --config C --samples samples.json --references references.jsonl --out lengths.json`."""

    ev = EvaluateSettings.of(config)
    s, boot = ev.lengths, bootstrap_spec(ev.genppl)
    summary, groups = load_samples(args.samples)
    refs = read_jsonl(args.references)
    max_length = summary["settings"].get("max_length")
    if max_length is None:
        max_length = max([r["length"] for r in refs] + [r["length"] for g in groups.values() for r in g])
    values = lengths_values({k: [r["length"] for r in g] for k, g in groups.items()},
                            [r["length"] for r in refs], int(max_length), s.bins,
                            bootstrap=boot["reps"], seed=boot["seed"])
    for e in values["by_steps"]:
        e.update(content_after_pad_summary([r.get("content_after_pad") for r in groups[e["steps"]]]))
    settings_out = {**s.as_dict(), "length": "model-tokenizer content tokens after the method's end cut", "max_length": max_length,
                    "sd": "ddof=1", "quantiles": "numpy linear", "w1": "scipy.stats.wasserstein_distance (tokens)",
                    "ks": "scipy.stats.ks_2samp statistic", "bootstrap": boot["reps"], "bootstrap_seed": boot["seed"],
                    "ci": "95% percentile bootstrap (evaluate.genppl.bootstrap / seed); w1/ks: generated and "
                    "reference lengths resampled independently",
                    "content_after_pad": "masked models (varlen): samples with a non-PAD token after the first "
                    "PAD, dropped by the cut; null for methods without a PAD canvas",
                    "samples": str(args.samples),
                    "references": str(args.references)}
    write_result(args.out, "lengths", header_of(summary), settings_out, values)
    d = values["data"]
    print(f"lengths {summary.get('run')}: " + ", ".join(
        f"steps={e['steps']} mean={e['mean']:.1f} W1={e['w1']:.2f} KS={e['ks']:.3f}" for e in values["by_steps"])
        + f"; data mean={d['mean']:.1f} -> {args.out}")
    return values
