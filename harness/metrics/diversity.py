"""Diversity of a sample set: unigram entropy, distinct-n and self-BLEU.

* Entropy: per sample, of the empirical unigram distribution of the method's token ids (content
  ids, specials excluded), natural log; the mean over non-empty samples in nats, and in bits
  (nats / ln 2). genppl reports the same statistic on evaluator ids (the spec's primary).
* distinct-n: distinct n-grams / all n-grams, pooled over the whole set (corpus level), on words
  from nltk's `wordpunct_tokenize` (regex only, no data download). It depends on the set size,
  so the data row uses as many references as there are samples per steps.
* Self-BLEU: for each sample, sentence BLEU-`order` against all other samples as references
  (nltk, uniform weights, smoothing method1), averaged. It costs O(n^2), so only the first
  `self_bleu_samples` non-empty samples are used. 1 means every sample repeats the others.

Uncertainty: 95% percentile bootstrap CIs over samples (`bootstrap` resamples, fixed seed):
* entropy_ci95 and self_bleu_ci95 resample the per-sample values (self-BLEU: each sample's BLEU
  against the others, computed once; re-running self-BLEU per resample would cost O(n^2) each).
* distinct_<n>_ci95: distinct-n = sum_i w_i / sum_i g_i, where g_i is the number of n-grams of
  sample i and w_i = sum over them of 1 / (pooled count of that n-gram), so that sum_i w_i is
  the number of distinct n-grams. The CI resamples the (w_i, g_i) pairs. Recomputing distinct-n
  on a with-replacement resample instead would count a sample drawn twice as repeated n-grams
  and bias every replicate low; this form keeps the pooled counts fixed (it does not reflect
  their own sampling noise).
"""
from __future__ import annotations

import math

import numpy as np
from harness.core.records import header_of, read_jsonl, write_result
from harness.core.runtime import progress
from harness.core.settings import EvaluateSettings
from harness.metrics.common import bootstrap_mean_ci, bootstrap_ratio_ci, bootstrap_spec
from harness.metrics.samples import load_samples

LN2 = math.log(2.0)


def unigram_entropy(ids) -> float:
    """Entropy in nats of the empirical unigram distribution of `ids` (nan when empty)."""
    _, counts = np.unique(np.asarray(list(ids), dtype=np.int64), return_counts=True)
    if counts.size == 0:
        return float("nan")
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mean_entropy(id_lists) -> float | None:
    """Mean per-sample unigram entropy (nats) over non-empty samples."""
    h = [unigram_entropy(ids) for ids in id_lists if len(ids)]
    return float(np.mean(h)) if h else None


def words(text: str) -> list[str]:
    from nltk.tokenize import wordpunct_tokenize

    return wordpunct_tokenize(text)


def _ngrams(tokens, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(token_lists, n: int) -> float | None:
    """Distinct n-grams over all n-grams, pooled over the lists (None when there is no n-gram)."""
    grams = [g for t in token_lists for g in _ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else None


def distinct_contributions(token_lists, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(w, g) per list: sum(w) / sum(g) = distinct_n (see the module docstring)."""
    from collections import Counter

    grams = [_ngrams(t, n) for t in token_lists]
    counts = Counter(g for gs in grams for g in gs)
    w = np.array([sum(1.0 / counts[g] for g in gs) for gs in grams], np.float64)
    return w, np.array([len(gs) for gs in grams], np.float64)


def self_bleu_scores(token_lists, order: int = 4, max_samples: int | None = None) -> list[float]:
    """Sentence BLEU of each non-empty list (the first `max_samples`) against all the others."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    lists = [list(t) for t in token_lists if len(t)]
    if max_samples is not None:
        lists = lists[: int(max_samples)]
    if len(lists) < 2:
        return []
    weights = (1.0 / order,) * order
    smooth = SmoothingFunction().method1

    return [float(sentence_bleu(lists[:i] + lists[i + 1 :], hyp, weights=weights, smoothing_function=smooth))
            for i, hyp in enumerate(progress(lists, desc="self-BLEU", unit="sample"))]


def self_bleu(token_lists, order: int = 4, max_samples: int | None = None) -> tuple[float | None, int]:
    """(mean sentence BLEU of each list against all the others, number of lists used)."""
    lists = [t for t in token_lists if len(t)]
    n_used = len(lists) if max_samples is None else min(len(lists), int(max_samples))
    scores = self_bleu_scores(lists, order, max_samples)
    return (float(np.mean(scores)) if scores else None), n_used


def diversity_values(rows: list[dict], *, self_bleu_samples: int, bleu_order: int = 4, bootstrap: int = 0,
                     seed: int = 0) -> dict:
    """All diversity values of one set of samples/references rows (token_ids, text).

    With `bootstrap` > 0 every value but mean_words gets a `<name>_ci95` (module docstring).
    `per_sample`: entropy_nats per row (null for an empty row) and self_bleu per sample used
    (the first n_self_bleu non-empty rows).
    """
    ids = [list(r["token_ids"]) for r in rows]
    toks = [words(r["text"]) for r in rows]
    ent = [unigram_entropy(t) if len(t) else None for t in ids]
    h_list = [h for h in ent if h is not None]
    h = float(np.mean(h_list)) if h_list else None
    sb_scores = self_bleu_scores(toks, bleu_order, self_bleu_samples)
    sb = float(np.mean(sb_scores)) if sb_scores else None
    out = {"entropy_nats": h, "entropy_ci95": bootstrap_mean_ci(h_list, reps=bootstrap, seed=seed),
           "entropy_bits": h / LN2 if h is not None else None}
    for k in (1, 2, 3):
        out[f"distinct_{k}"] = distinct_n(toks, k)
        w, g = distinct_contributions(toks, k)
        out[f"distinct_{k}_ci95"] = bootstrap_ratio_ci(w, g, reps=bootstrap, seed=seed)
    out.update({
        "self_bleu": sb, "self_bleu_ci95": bootstrap_mean_ci(sb_scores, reps=bootstrap, seed=seed),
        "n": len(rows), "n_self_bleu": min(sum(1 for t in toks if len(t)), int(self_bleu_samples)),
        "mean_words": float(np.mean([len(t) for t in toks])) if toks else None,
        "per_sample": {"entropy_nats": ent, "self_bleu": sb_scores},
    })
    return out


def _content_ids(rows, specials) -> list[dict]:
    return [{**r, "token_ids": [t for t in r["token_ids"] if t not in specials]} for r in rows]


def run(args, config: dict) -> dict:
    """`evaluate diversity --config C --samples samples.json --references references.jsonl --out diversity.json`."""

    ev = EvaluateSettings.of(config)
    s, boot = ev.diversity, bootstrap_spec(ev.genppl)
    summary, groups = load_samples(args.samples)
    refs = read_jsonl(args.references)
    specials = set(summary["settings"].get("specials") or [])
    kw = dict(self_bleu_samples=s.self_bleu_samples, bleu_order=s.bleu_order,
              bootstrap=boot["reps"], seed=boot["seed"])
    by_steps = [{"steps": k, **diversity_values(_content_ids(rows, specials), **kw)} for k, rows in groups.items()]
    n_match = max(len(rows) for rows in groups.values())
    data = diversity_values(_content_ids(refs[:n_match], specials), **kw)
    settings_out = {**s.as_dict(), "entropy": "per-sample unigram entropy of model content ids, mean over non-empty samples; "
                    "nats (bits = nats / ln 2)", "words": "nltk wordpunct_tokenize",
                    "distinct": "corpus-level distinct n-grams / n-grams on words",
                    "self_bleu": "nltk sentence_bleu vs all other samples, uniform weights, smoothing method1",
                    "bootstrap": boot["reps"], "bootstrap_seed": boot["seed"],
                    "ci": "95% percentile bootstrap over samples (evaluate.genppl.bootstrap / seed); entropy and "
                    "self-BLEU: per-sample values resampled; distinct-n: per-sample shares of the distinct "
                    "n-grams, pooled counts fixed",
                    "n_references": len(refs[:n_match]), "samples": str(args.samples), "references": str(args.references)}
    write_result(args.out, "diversity", header_of(summary), settings_out, {"by_steps": by_steps, "data": data})
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"diversity {summary.get('run')}: " + ", ".join(
        f"steps={e['steps']} H={fmt(e['entropy_nats'])} d2={fmt(e['distinct_2'])} sBLEU={fmt(e['self_bleu'])}"
        for e in by_steps) + f"; data H={fmt(data['entropy_nats'])} d2={fmt(data['distinct_2'])} "
        f"sBLEU={fmt(data['self_bleu'])} -> {args.out}")
    return {"by_steps": by_steps, "data": data}
