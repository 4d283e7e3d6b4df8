"""Length distribution of samples against held-out data (baselines spec 6.6; varlen data).

Length = model-tokenizer content tokens (no specials) after the method's own end-of-sequence
cut, as stored in samples.jsonl / references.jsonl. Primary distance: Wasserstein-1 in tokens
(the mean absolute difference of the quantile functions); also Kolmogorov-Smirnov
sup |F_gen - F_ref|, both from scipy. Rates: empty outputs and outputs at the maximum length.
"""
from __future__ import annotations

import numpy as np


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


def histogram_edges(max_length: int, bins: int) -> np.ndarray:
    """Integer-aligned bin edges covering 0..max_length (shared by every row, so rows compare)."""
    width = max(1, int(np.ceil((max_length + 1) / bins)))
    return np.arange(0, max_length + width + 1, width, dtype=np.float64)


def lengths_values(groups: dict[int, list[int]], ref: list[int], max_length: int, bins: int) -> dict:
    """Values of lengths.json: per-steps statistics and distances, the data row, a shared histogram.

    histogram = {"bins": edges (len = counts + 1), "samples": {str(steps): counts}, "data": counts};
    lengths above the last edge (none, normally) are counted in the last bin.
    """
    edges = histogram_edges(max_length, bins)
    hist = lambda x: np.histogram(np.minimum(np.asarray(x, np.float64), edges[-1] - 0.5), bins=edges)[0].tolist()  # noqa: E731
    by_steps = [{"steps": k, **length_stats(x, max_length), **distances(x, ref)} for k, x in groups.items()]
    return {"by_steps": by_steps, "data": length_stats(ref, max_length),
            "histogram": {"bins": edges.tolist(), "samples": {str(k): hist(x) for k, x in groups.items()},
                          "data": hist(ref)}}


def run(args, config: dict) -> dict:
    """`evaluate lengths --config C --samples samples.json --references references.jsonl --out lengths.json`."""
    from harness.evaluate.common import settings
    from harness.evaluate.samples import load_samples
    from harness.results import header_of, read_jsonl, write_result

    s = settings(config, "lengths")
    summary, groups = load_samples(args.samples)
    refs = read_jsonl(args.references)
    max_length = summary["settings"].get("max_length")
    if max_length is None:
        max_length = max([r["length"] for r in refs] + [r["length"] for g in groups.values() for r in g])
    values = lengths_values({k: [r["length"] for r in g] for k, g in groups.items()},
                            [r["length"] for r in refs], int(max_length), int(s["bins"]))
    settings_out = {**s, "length": "model-tokenizer content tokens after the method's end cut", "max_length": max_length,
                    "sd": "ddof=1", "quantiles": "numpy linear", "w1": "scipy.stats.wasserstein_distance (tokens)",
                    "ks": "scipy.stats.ks_2samp statistic", "samples": str(args.samples),
                    "references": str(args.references)}
    write_result(args.out, "lengths", header_of(summary), settings_out, values)
    d = values["data"]
    print(f"lengths {summary.get('run')}: " + ", ".join(
        f"steps={e['steps']} mean={e['mean']:.1f} W1={e['w1']:.2f} KS={e['ks']:.3f}" for e in values["by_steps"])
        + f"; data mean={d['mean']:.1f} -> {args.out}")
    return values
