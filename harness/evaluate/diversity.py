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
"""
from __future__ import annotations

import math

import numpy as np

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


def distinct_n(token_lists, n: int) -> float | None:
    """Distinct n-grams over all n-grams, pooled over the lists (None when there is no n-gram)."""
    grams = [tuple(t[i : i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def self_bleu(token_lists, order: int = 4, max_samples: int | None = None) -> tuple[float | None, int]:
    """(mean sentence BLEU of each list against all the others, number of lists used)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    lists = [list(t) for t in token_lists if len(t)]
    if max_samples is not None:
        lists = lists[: int(max_samples)]
    if len(lists) < 2:
        return None, len(lists)
    weights = (1.0 / order,) * order
    smooth = SmoothingFunction().method1
    from harness.evaluate.common import progress

    scores = [sentence_bleu(lists[:i] + lists[i + 1 :], hyp, weights=weights, smoothing_function=smooth)
              for i, hyp in enumerate(progress(lists, desc="self-BLEU", unit="sample"))]
    return float(np.mean(scores)), len(lists)


def diversity_values(rows: list[dict], *, self_bleu_samples: int, bleu_order: int = 4) -> dict:
    """All diversity values of one set of samples/references rows (token_ids, text)."""
    ids = [list(r["token_ids"]) for r in rows]
    toks = [words(r["text"]) for r in rows]
    h = mean_entropy(ids)
    sb, n_sb = self_bleu(toks, bleu_order, self_bleu_samples)
    return {
        "entropy_nats": h, "entropy_bits": h / LN2 if h is not None else None,
        "distinct_1": distinct_n(toks, 1), "distinct_2": distinct_n(toks, 2), "distinct_3": distinct_n(toks, 3),
        "self_bleu": sb, "n": len(rows), "n_self_bleu": n_sb,
        "mean_words": float(np.mean([len(t) for t in toks])) if toks else None,
    }


def _content_ids(rows, specials) -> list[dict]:
    return [{**r, "token_ids": [t for t in r["token_ids"] if t not in specials]} for r in rows]


def run(args, config: dict) -> dict:
    """`evaluate diversity --config C --samples samples.json --references references.jsonl --out diversity.json`."""
    from harness.evaluate.common import settings
    from harness.evaluate.samples import load_samples
    from harness.results import header_of, read_jsonl, write_result

    s = settings(config, "diversity")
    summary, groups = load_samples(args.samples)
    refs = read_jsonl(args.references)
    specials = set(summary["settings"].get("specials") or [])
    kw = dict(self_bleu_samples=int(s["self_bleu_samples"]), bleu_order=int(s["bleu_order"]))
    by_steps = [{"steps": k, **diversity_values(_content_ids(rows, specials), **kw)} for k, rows in groups.items()]
    n_match = max(len(rows) for rows in groups.values())
    data = diversity_values(_content_ids(refs[:n_match], specials), **kw)
    settings_out = {**s, "entropy": "per-sample unigram entropy of model content ids, mean over non-empty samples; "
                    "nats (bits = nats / ln 2)", "words": "nltk wordpunct_tokenize",
                    "distinct": "corpus-level distinct n-grams / n-grams on words",
                    "self_bleu": "nltk sentence_bleu vs all other samples, uniform weights, smoothing method1",
                    "n_references": len(refs[:n_match]), "samples": str(args.samples), "references": str(args.references)}
    write_result(args.out, "diversity", header_of(summary), settings_out, {"by_steps": by_steps, "data": data})
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"diversity {summary.get('run')}: " + ", ".join(
        f"steps={e['steps']} H={fmt(e['entropy_nats'])} d2={fmt(e['distinct_2'])} sBLEU={fmt(e['self_bleu'])}"
        for e in by_steps) + f"; data H={fmt(data['entropy_nats'])} d2={fmt(data['distinct_2'])} "
        f"sBLEU={fmt(data['self_bleu'])} -> {args.out}")
    return {"by_steps": by_steps, "data": data}
