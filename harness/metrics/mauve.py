"""MAUVE between held-out texts (p) and samples (q), on the evaluator's cached features.

mauve-text's own featurizer only loads GPT-2/BERT by hub name, which is impossible offline, so
features come from the genppl pass (see harness.metrics.genppl) and `compute_mauve` gets
`p_features` / `q_features`. Every MAUVE setting is pinned from the config and logged: scores
with another featurizer, truncation length, scaling factor or n are not comparable.

With `subsets` > 1 the references are split into that many disjoint human sets of
`human_samples` texts each (a seeded permutation) and MAUVE is reported as mean and sd over them
(baselines spec 6.5). q always holds every sample of the steps setting.

Enough samples (issue 11): a MAUVE value is computed only when the human set (n_p, the size of
one subset) and the sample set (n_q) both hold at least `min_samples` texts (default 256). Below
that, MAUVE of a few dozen points is noise (k-means on ~50 points makes 2 buckets), so the entry
is "mauve": null, "mauve_sd": null with a "reason", and mauve-text is not called at all. With one
human subset a computed value has no uncertainty estimate: "mauve_sd": null and "uncertainty"
says so.
"""
from __future__ import annotations

import numpy as np
from harness.core.records import header_of, read_result, write_result
from harness.core.runtime import progress
from harness.core.settings import MauveSettings
from harness.metrics.genppl import load_features

MAUVE_KEYS = ("num_buckets", "pca_max_data", "kmeans_explained_var", "kmeans_num_redo", "kmeans_max_iter",
              "divergence_curve_discretization_size", "mauve_scaling_factor")


def mauve_score(p: np.ndarray, q: np.ndarray, *, seed: int, **params) -> float:
    """`mauve.compute_mauve(p_features=p, q_features=q, ...)`.mauve with the given settings."""
    import mauve

    kw = {k: params[k] for k in MAUVE_KEYS if k in params}
    res = mauve.compute_mauve(p_features=np.asarray(p, np.float32), q_features=np.asarray(q, np.float32),
                              seed=int(seed), verbose=False, **kw)
    return float(res.mauve)


def human_subsets(n_p: int, size: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` disjoint index sets of `size` drawn from range(n_p) (fewer if n_p is too small)."""
    if n_p < 1 or size < 1:
        raise ValueError("MAUVE needs at least one reference feature")
    perm = np.random.default_rng(int(seed)).permutation(n_p)
    size = min(int(size), n_p)
    count = max(1, min(int(count), n_p // size))
    return [np.sort(perm[i * size : (i + 1) * size]) for i in range(count)]


def too_small(n_p: int, n_q: int, need: int) -> str | None:
    """The reason a MAUVE value is not computed, or None when both sets are large enough."""
    if n_p >= need and n_q >= need:
        return None
    return f"n too small (n_p={n_p}, n_q={n_q}, need >= {need} each)"


def evaluate_mauve(p: np.ndarray, q_by_steps: dict[int, np.ndarray], s: MauveSettings) -> list[dict]:
    """MAUVE per steps; `s` is the study's `evaluate.mauve`.

    Entry: steps, mauve (mean over human subsets, or null), mauve_sd (ddof=1; null with one
    subset or no value), mauve_subsets (one score per subset; [] when not computed), n_p (texts
    per human subset), n_q, n_subsets (subsets actually used: fewer than asked when the
    references run out), reason (null, or why there is no value) and uncertainty (what mauve_sd
    measures; null when there is no value).
    """
    subsets = human_subsets(len(p), s.human_samples, s.subsets, s.seed)
    params = {k: getattr(s, k) for k in MAUVE_KEYS}
    need = s.min_samples
    out = []
    for k in progress(sorted(q_by_steps), desc="mauve", unit="steps"):
        n_p, n_q = int(len(subsets[0])), int(len(q_by_steps[k]))
        entry = {"steps": k, "mauve": None, "mauve_sd": None, "mauve_subsets": [], "n_p": n_p, "n_q": n_q,
                 "n_subsets": len(subsets), "reason": too_small(n_p, n_q, need), "uncertainty": None}
        if entry["reason"] is None:
            scores = [mauve_score(p[idx], q_by_steps[k], seed=s.seed, **params) for idx in subsets]
            entry.update(mauve=float(np.mean(scores)), mauve_subsets=scores)
            if len(scores) > 1:
                entry.update(mauve_sd=float(np.std(scores, ddof=1)),
                             uncertainty=f"sd (ddof=1) over {len(scores)} disjoint human subsets")
            else:
                entry["uncertainty"] = "none (one human subset)"
        out.append(entry)
    return out


def run(args, config: dict) -> dict:
    """`evaluate mauve --config C --samples samples.json --features genppl_features.npz --out mauve.json`."""
    import time

    s = MauveSettings.of(config)
    header = header_of(read_result(args.samples, kind="samples"))
    p, q = load_features(args.features)
    t0 = time.perf_counter()
    by_steps = evaluate_mauve(p, q, s)
    settings_out = {**s.as_dict(), "features": str(args.features), "featurizer": "evaluator final hidden state (genppl pass)",
                    "p": "references (human)", "q": "samples", "seconds": time.perf_counter() - t0,
                    "n_references": int(len(p))}
    write_result(args.out, "mauve", header, settings_out, {"by_steps": by_steps})
    fmt = lambda e: "n too small" if e["mauve"] is None else f"{e['mauve']:.3f}"  # noqa: E731
    print(f"mauve {header.get('run')}: " + ", ".join(f"steps={e['steps']} {fmt(e)}" for e in by_steps)
          + f" -> {args.out}")
    return {"by_steps": by_steps}
