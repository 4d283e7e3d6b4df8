"""Exact metrics of a study on a synthetic corpus, from the source's known law (harness.data.synthetic).

They replace the evaluator-LM metrics (gen PPL, MAUVE) where the truth is known:

* bound gap: per held-out row, the method's bound (ppl.json per_sequence, both conventions)
  minus the exact -log p of the same row, aggregated as sum / sum N with the ratio standard
  error of ppl.json. Its expectation is KL(data || model) plus the looseness of the bound, so it
  is >= 0: a gap below zero beyond its error bar means a bound that is not a bound. Also the
  exact NLL of the first train.valid_sequences validation rows (the rows of the training
  curves), so curves of the bound can be drawn as gaps.
* samples, per steps: the exact NLL per token under the source (samples it can emit), the
  fraction it cannot emit (invalid: probability zero, e.g. a mismatched bracket), the mean
  unigram entropy of a sample, and (varlen) the length law against the exact one: total
  variation and Kolmogorov-Smirnov distance, each next to its null distribution (the same
  number of documents drawn from the source itself), so a distance can be read against noise.
  The held-out references get the same numbers (the "data" row: what a perfect model scores).
  Fixed layout: also `documents`, the same numbers for the documents a window holds whole (between
  two EOS), since one bad token makes a whole window invalid.

Rows and denominators follow ppl.json: varlen rows are documents, N = symbols + 1 (the end);
fixed rows are stream windows (documents joined by EOS), N = L - 1, scored from the exact
state distribution at the row's stream position. Samples of the fixed layout are scored from
the stationary distribution (a window at a random position of the stream).
"""
from __future__ import annotations

import math

import numpy as np

from harness.core.bounds import nll_statistics
from harness.core.methods import UserError
from harness.core.records import header_of, read_jsonl, read_result, write_result
from harness.data.manifest import load_manifest, load_tokenizer
from harness.data.storage import load_split
from harness.data.synthetic import is_synthetic, source_from_spec
from harness.core.settings import SamplesSettings
from harness.metrics.samples import load_samples

#: simulated null draws of the length distances
NULL_DRAWS = 400


def to_source_ids(ids, vocab, n_symbols: int) -> np.ndarray:
    """Token ids -> source ids: symbols keep their id, EOS -> the source's EOS (n_symbols),
    any other special -> -1 (impossible)."""
    out = np.asarray([int(t) for t in ids], np.int64)
    special = out >= n_symbols
    mapped = np.where(out == vocab.eos, n_symbols, -1)
    return np.where(special, mapped, out)


def document_of(ids, vocab) -> list[int]:
    """A varlen sample's document: a leading BOS dropped, cut at the first EOS or PAD (the
    methods' own end cut); any other special left inside makes it invalid downstream."""
    ids = [int(t) for t in ids]
    if ids and ids[0] == vocab.bos:
        ids = ids[1:]
    for j, t in enumerate(ids):
        if t in (vocab.eos, vocab.pad):
            return ids[:j]
    return ids


def unigram_entropy(ids) -> float:
    """Shannon entropy (nats) of one sequence's token counts (0 for an empty one)."""
    ids = np.asarray(ids, np.int64)
    if ids.size == 0:
        return 0.0
    p = np.bincount(ids - ids.min()).astype(np.float64)
    p = p[p > 0] / ids.size
    return float(-(p * np.log(p)).sum())


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def length_distances(lengths, pmf: np.ndarray) -> tuple[float, float]:
    """(total variation, KS) between the empirical law of `lengths` and the exact pmf."""
    x = np.asarray(lengths, np.int64)
    top = max(int(x.max()) if x.size else 0, pmf.size - 1)
    emp = np.bincount(x, minlength=top + 1) / max(1, x.size)
    ref = np.zeros(top + 1)
    ref[: pmf.size] = pmf
    return float(0.5 * np.abs(emp - ref).sum()), float(np.abs(np.cumsum(emp) - np.cumsum(ref)).max())


def length_null(n: int, pmf: np.ndarray, seed: int, draws: int = NULL_DRAWS) -> dict:
    """The distances of `n` lengths drawn from the exact law itself: mean and 95th percentile."""
    rng = np.random.default_rng(seed)
    p = pmf / pmf.sum()
    sims = np.array([length_distances(rng.choice(p.size, size=n, p=p), pmf) for _ in range(draws)])
    return {"tv_mean": float(sims[:, 0].mean()), "tv_q95": float(np.quantile(sims[:, 0], 0.95)),
            "ks_mean": float(sims[:, 1].mean()), "ks_q95": float(np.quantile(sims[:, 1], 0.95)),
            "_tv": sims[:, 0], "_ks": sims[:, 1]}


def ratio(nll, tokens) -> dict:
    """sum / sum N with its standard error (harness.core.bounds.nll_statistics)."""
    if len(nll) == 0:
        return {"nats_per_token": None, "stderr": None, "n_sequences": 0, "n_tokens": 0}
    s = nll_statistics(nll, tokens)
    return {k: s[k] for k in ("nats_per_token", "stderr", "per_sequence_mean", "n_sequences", "n_tokens")}


# --- scoring ------------------------------------------------------------------------------------
def score_rows(source, data, indices, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(exact log p, N) of held-out rows `indices` of a TokenData split, aligned with ppl.json."""
    vocab = data.vocab
    indices = [int(i) for i in indices]
    if layout == "varlen":
        docs = [data.row(i)[1:].tolist() for i in indices]
        logp = np.array([source.log_prob(to_source_ids(d, vocab, source.n_symbols)) for d in docs])
        return logp, np.array([len(d) + 1 for d in docs], np.int64)
    width = int(data.max_len) - 1
    windows = np.stack([to_source_ids(data.row(i)[1:].tolist(), vocab, source.n_symbols) for i in indices])
    start = source.stream_start([i * width for i in indices])
    return source.stream_log_prob(windows, start), np.full(len(indices), width, np.int64)


def score_samples(source, rows: list[dict], vocab, layout: str, stationary=None) -> dict:
    """Exact log p, N, length and unigram entropy of generated (or reference) rows."""
    if layout == "varlen":
        docs = [document_of(r["token_ids"], vocab) for r in rows]
        ids = [to_source_ids(d, vocab, source.n_symbols) for d in docs]
        logp = np.array([source.log_prob(d) for d in ids])
        tokens = np.array([len(d) + 1 for d in docs], np.int64)
        lengths = np.array([len(d) for d in docs], np.int64)
    else:
        ids = [to_source_ids([t for j, t in enumerate(r["token_ids"]) if not (j == 0 and t == vocab.bos)], vocab,
                             source.n_symbols) for r in rows]
        logp = np.zeros(len(ids))
        for width in {len(x) for x in ids}:  # a fixed-length sampler may stop short (DID-fixed): by width
            pick = [i for i, x in enumerate(ids) if len(x) == width]
            logp[pick] = source.stream_log_prob(np.stack([ids[i] for i in pick]), stationary)
        tokens = np.array([len(x) for x in ids], np.int64)
        lengths = None
    return {"logp": logp, "tokens": tokens, "lengths": lengths, "entropy": np.array([unigram_entropy(x) for x in ids]),
            **({"documents": complete_documents(source, ids)} if layout == "fixed" else {})}


def complete_documents(source, windows) -> dict:
    """The documents a fixed-layout window holds whole (between two EOS), scored by the document
    law: one invalid token anywhere makes a whole 63-token window invalid, so this per-document
    view is what separates methods on the fixed layout. Short documents fit whole more often, so
    these are length-biased: compare them between methods, not with the length law."""
    logp, tokens = [], []
    for w in windows:
        eos = np.flatnonzero(np.asarray(w) == source.eos)
        for a, b in zip(eos[:-1], eos[1:]):
            doc = np.asarray(w[a + 1 : b])
            logp.append(source.log_prob(doc))
            tokens.append(doc.size + 1)
    return {"logp": np.asarray(logp, np.float64), "tokens": np.asarray(tokens, np.int64)}


def summarise(scored: dict, pmf: np.ndarray | None, seed: int) -> dict:
    """One row of exact.json (a steps value, or the data): NLL, invalid fraction, entropy, lengths."""
    logp, tokens = scored["logp"], scored["tokens"]
    valid = np.isfinite(logp)
    n, bad = int(logp.size), int((~valid).sum())
    out = {"n": n, **ratio(-logp[valid], tokens[valid]), "invalid": bad, "invalid_fraction": bad / n if n else None,
           "invalid_ci95": wilson(bad, n), "unigram_entropy_mean": float(scored["entropy"].mean()) if n else None,
           "logp": [float(v) if math.isfinite(v) else None for v in logp], "n_tokens_per_sample": tokens.tolist()}
    if "documents" in scored:
        d = scored["documents"]
        ok, m = np.isfinite(d["logp"]), int(d["logp"].size)
        out["documents"] = {"n": m, **ratio(-d["logp"][ok], d["tokens"][ok]), "invalid": int(m - ok.sum()),
                            "invalid_fraction": (m - ok.sum()) / m if m else None,
                            "invalid_ci95": wilson(int(m - ok.sum()), m)}
    if pmf is not None and scored["lengths"] is not None and n:
        tv, ks = length_distances(scored["lengths"], pmf)
        null = length_null(n, pmf, seed)
        out["lengths"] = {"mean": float(scored["lengths"].mean()), "tv": tv, "ks": ks,
                          "tv_p": float(np.mean(null.pop("_tv") >= tv)), "ks_p": float(np.mean(null.pop("_ks") >= ks)),
                          "null": null, "values": scored["lengths"].tolist()}
    return out


def bound_gaps(ppl_values: dict, exact_logp: np.ndarray, tokens: np.ndarray) -> dict:
    """Per convention: sum (bound - exact NLL) / sum N, with se; and the exact NLL of the rows."""
    per = ppl_values["per_sequence"]
    exact_nll = -exact_logp
    out = {"exact": ratio(exact_nll, tokens)}
    for conv in ("strict", "paper"):
        gap = np.asarray(per[conv], np.float64) - exact_nll
        out[conv] = {**ratio(gap, tokens), "negative_rows": int((gap < 0).sum())}
    out["per_sequence"] = {"index": list(per["index"]), "exact_nll": [float(v) for v in exact_nll]}
    return out


# --- CLI ------------------------------------------------------------------------------------------
def source_of(manifest: dict):
    corpus = manifest.get("config", {}).get("corpus")
    if not is_synthetic(corpus):
        raise UserError("evaluate exact needs data prepared from a synthetic corpus (data.corpus.name: synthetic)")
    return source_from_spec(corpus)


def run(args, config: dict) -> dict:
    """`evaluate exact --config C --data DATA --out EVAL/exact.json [--ppl EVAL/ppl.json]
    [--samples EVAL/samples.json] [--references EVAL/references.jsonl]`."""

    manifest = load_manifest(args.data)
    source = source_of(manifest)
    vocab = load_tokenizer(args.data).vocab
    ppl = read_result(args.ppl, kind="ppl")
    summary, groups = load_samples(args.samples)
    layout = ppl.get("layout") or summary.get("layout")
    if layout not in ("fixed", "varlen"):
        raise UserError(f"{args.ppl}: no layout in its provenance")
    seed = SamplesSettings.of(config).seed

    # bound gap on the rows of ppl.json, and the exact NLL of the training curves' rows
    pv = ppl["values"]
    split = ppl["settings"]["split"]
    logp, tokens = score_rows(source, load_split(args.data, split, layout), pv["per_sequence"]["index"], layout)
    if list(tokens) != list(pv["per_sequence"]["n_tokens"]):
        raise UserError(f"{args.ppl}: its token counts do not match the {split} rows of {args.data} "
                        "(evaluated on other data?)")
    values = {"source": manifest.get("synthetic") or source.describe(), "layout": layout,
              "bound_gap": bound_gaps(pv, logp, tokens)}
    valid = load_split(args.data, "valid", layout)
    n_valid = min(len(valid), int(config.get("train", {}).get("valid_sequences", 64)))
    vlogp, vtok = score_rows(source, valid, range(n_valid), layout)
    values["valid_subset"] = ratio(-vlogp, vtok)

    # samples and references
    pmf = source.length_pmf() if layout == "varlen" else None
    stationary = source.stationary() if layout == "fixed" else None
    refs = read_jsonl(args.references)
    if layout == "fixed":  # references are rows of the split: score them at their own position
        split_data = load_split(args.data, refs[0].get("split", "test"), layout) if refs else None
        rl, rt = score_rows(source, split_data, [r["index"] for r in refs], layout) if refs else (np.zeros(0), np.zeros(0))
        ref_ids = [to_source_ids(r["token_ids"], vocab, source.n_symbols) for r in refs]
        ref_scored = {"logp": rl, "tokens": rt, "lengths": None, "entropy": np.array([unigram_entropy(x) for x in ref_ids]),
                      "documents": complete_documents(source, ref_ids)}
    else:
        ref_scored = score_samples(source, refs, vocab, layout)
    values["data"] = summarise(ref_scored, pmf, seed)
    values["by_steps"] = [{"steps": k, **summarise(score_samples(source, rows, vocab, layout, stationary), pmf,
                                                   seed + k)} for k, rows in sorted(groups.items())]
    if pmf is not None:
        values["length_pmf"] = pmf.tolist()
    settings_out = {"ppl": str(args.ppl), "samples": str(args.samples), "references": str(args.references),
                    "split": split, "valid_sequences": n_valid, "null_draws": NULL_DRAWS,
                    "denominator": "as ppl.json (fixed: L-1; varlen: symbols+1)",
                    "fixed_samples": "scored from the stream's stationary state distribution",
                    "nats_per_token": "over the samples the source can emit (invalid ones counted apart)"}
    write_result(args.out, "exact", header_of(ppl), settings_out, values)
    g = values["bound_gap"]
    print(f"exact {ppl.get('run')}: bound gap strict {g['strict']['nats_per_token']:.4f} "
          f"(± {g['strict']['stderr'] or float('nan'):.4f}) nats/token over exact {g['exact']['nats_per_token']:.4f}; "
          + ", ".join(f"steps={e['steps']} NLL={e['nats_per_token'] if e['nats_per_token'] is not None else float('nan'):.3f}"
                      f" invalid={e['invalid_fraction']:.2f}" for e in values["by_steps"]) + f" -> {args.out}")
    return values
