"""Generative perplexity and unigram entropy under the evaluator LM (baselines spec 6.3-6.4).

Per text: the document segments are retokenized with the evaluator tokenizer (no special
tokens added) and joined by the evaluator's document separator; the evaluator BOS is prepended
as unscored context; the sequence is truncated to `max_tokens` in total (BOS included). Every
token after BOS is a target except evaluator-EOS tokens, which stay in the context. fp32,
batched with right padding and an attention mask (sorted by length to pad little).

Aggregates: gen_ppl = exp(sum NLL / sum targets) over samples (primary, token-weighted);
gen_ppl_mean_per_sample = mean over samples of exp(mean NLL) (secondary). Unigram entropy in
nats of each sample's scored evaluator ids, averaged over samples (bits = nats / ln 2). Samples
with no target (empty text) count in n and n_empty but have no per-sample PPL or entropy. No
sample is ever filtered. Each of the three carries a 95% percentile bootstrap CI over samples
(fixed seed, `bootstrap` resamples): `ci95`, `gen_ppl_mean_per_sample_ci95`, `entropy_ci95`.
`per_sample` holds the per-sample nll / n_targets / entropy_nats lists (sample order) so a
two-sample test between rows needs no rescoring.

Length-matched data (baselines spec 6.4): entropy and gen PPL rise with length, so every steps
entry also gets `length_matched_data`: each non-empty sample (l_i scored targets) is paired with
its own reference text (seeded; references with >= l_i targets first, longest samples first,
which maximises the number of full matches; the rest take the longest references left and count
in `n_short`) and the reference is cut to its first l_i scored targets. The evaluator is causal,
so that is exact from the per-token NLLs of the one scoring pass (`Scored.token_nll`). References
are reused only when there are fewer non-empty references than samples (`note` says which).

The same forward pass yields the MAUVE features: the final-layer hidden state at the last
token of the first `feature_tokens` text tokens (what MAUVE takes from GPT-2 for a text truncated
to max_text_length). The evaluator is causal, so that state does not depend on later tokens.
Unlike MAUVE's featurizer the sequence starts with the evaluator BOS (an empty text's feature is
the BOS state).
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.core.methods import UserError
from harness.core.records import atomic_write_bytes, header_of, read_jsonl, write_result
from harness.core.runtime import pick_device, progress
from harness.core.settings import EvaluateSettings
from harness.metrics.common import bootstrap_mean_ci, bootstrap_ratio_ci
from harness.metrics.diversity import LN2, unigram_entropy
from harness.metrics.evaluator import load_evaluator
from harness.metrics.samples import load_samples


@dataclass
class Scored:
    """One text scored by the evaluator."""

    nll: float  # summed over targets, nats
    n_targets: int
    targets: list[int]  # the scored evaluator ids, in order
    length: int  # evaluator tokens of the full text (BOS excluded, before truncation)
    truncated: bool
    feature: np.ndarray | None = None
    token_nll: list[float] | None = None  # per target, aligned with `targets` (nats)


def evaluator_ids(ev, segments: list[str]) -> list[int]:
    """Evaluator ids of a text given as document segments, separators between them (no BOS)."""
    ids: list[int] = []
    for i, seg in enumerate(segments):
        if i:
            ids.append(ev.sep_id)
        ids.extend(ev.encode(seg))
    return ids


@torch.no_grad()
def score(ev, texts: list[list[str]], *, max_tokens: int, batch_size: int, feature_tokens: int | None = None,
          desc: str = "genppl") -> list[Scored]:
    """Score `texts` (each a list of segments); features too when `feature_tokens` is given."""
    if max_tokens < 2:
        raise ValueError("max_tokens must leave room for BOS and one token")
    seqs, lengths, truncated = [], [], []
    for segments in texts:
        ids = [ev.bos_id] + evaluator_ids(ev, segments)
        lengths.append(len(ids) - 1)
        truncated.append(len(ids) > max_tokens)
        seqs.append(ids[:max_tokens])
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[Scored | None] = [None] * len(seqs)
    device = ev.device
    eos = torch.tensor(sorted(ev.eos_ids), device=device, dtype=torch.long)
    starts = range(0, len(order), batch_size)
    for start in progress(starts, desc=desc, unit="batch"):
        idx = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        x = torch.full((len(idx), width), ev.pad_id, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, : len(seqs[i])] = torch.tensor(seqs[i])
            att[r, : len(seqs[i])] = 1
        x, att = x.to(device), att.to(device)
        res = ev.model(input_ids=x, attention_mask=att, output_hidden_states=feature_tokens is not None)
        logits = res.logits.float()
        tgt = x[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, reduction="none")
        keep = att[:, 1:].bool() & ~torch.isin(tgt, eos)
        tok_nll = torch.where(keep, nll.double(), 0.0)
        nll = tok_nll.sum(1).cpu()
        keep_cpu, tgt_cpu, tok_cpu = keep.cpu(), tgt.cpu(), tok_nll.cpu()
        hidden = res.hidden_states[-1].float() if feature_tokens is not None else None
        for r, i in enumerate(idx):
            feat = None
            if hidden is not None:
                pos = min(len(seqs[i]) - 1, int(feature_tokens))
                feat = hidden[r, pos].cpu().numpy().astype(np.float32)
            targets = tgt_cpu[r][keep_cpu[r]].tolist()
            out[i] = Scored(float(nll[r]), len(targets), targets, lengths[i], truncated[i], feat,
                            tok_cpu[r][keep_cpu[r]].tolist())
    return out  # type: ignore[return-value]


def bootstrap_ci(nll, n_targets, *, reps: int, seed: int, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap CI of exp(sum nll / sum n) with samples resampled with replacement."""
    return bootstrap_ratio_ci(nll, n_targets, reps=reps, seed=seed, level=level, transform=math.exp)


def _entropy_or_none(s: Scored) -> float | None:
    return unigram_entropy(s.targets) if s.n_targets > 0 else None


def summarize(scored: list[Scored], *, bootstrap: int = 1000, seed: int = 0, prefix: int = 128) -> dict:
    """Aggregate scored texts into the genppl values of one row (see the module docstring)."""
    nll = np.array([s.nll for s in scored], np.float64)
    n = np.array([s.n_targets for s in scored], np.float64)
    nonempty = n > 0
    total = float(n.sum())
    ent = np.array([unigram_entropy(s.targets) for s in scored if s.n_targets > 0])
    ent_prefix = np.array([unigram_entropy(s.targets[:prefix]) for s in scored if s.n_targets >= prefix])
    ppl_i = np.exp(nll[nonempty] / n[nonempty])
    values = {
        "gen_ppl": math.exp(nll.sum() / total) if total > 0 else None,
        "gen_ppl_mean_per_sample": float(np.mean(ppl_i)) if nonempty.any() else None,
        "ci95": bootstrap_ci(nll, n, reps=bootstrap, seed=seed),
        "gen_ppl_mean_per_sample_ci95": bootstrap_mean_ci(ppl_i, reps=bootstrap, seed=seed),
        "entropy_nats": float(ent.mean()) if ent.size else None,
        "entropy_ci95": bootstrap_mean_ci(ent, reps=bootstrap, seed=seed),
        "entropy_bits": float(ent.mean() / LN2) if ent.size else None,
        "entropy_nats_prefix": float(ent_prefix.mean()) if ent_prefix.size else None,
        "n_prefix": int(ent_prefix.size),
        "nats_per_token": nll.sum() / total if total > 0 else None,
        "mean_length": float(np.mean([s.length for s in scored])) if scored else None,
        "truncation_rate": float(np.mean([s.truncated for s in scored])) if scored else None,
        "n": len(scored),
        "n_empty": int((~nonempty).sum()),
        "n_targets": int(total),
        "per_sample": {"nll": nll.tolist(), "n_targets": [int(s.n_targets) for s in scored],
                       "entropy_nats": [_entropy_or_none(s) for s in scored]},
    }
    return values


def match_lengths(sample_lengths, ref_lengths, seed) -> tuple[list[tuple[int, int]], int, int]:
    """Pair every sample with l_i > 0 targets with a reference; returns (pairs, n_short, uses).

    pairs = (sample index, reference index) in sample order. References with 0 targets are
    never used. Each reference is used at most `uses` = ceil(M / R) times (M samples to match,
    R usable references): once each when R >= M. Pass 1 takes the samples longest first and
    gives each a uniformly drawn (seeded) unused reference with >= l_i targets; the eligible sets
    are nested, so this maximises the full matches whatever the draws. Pass 2 gives each sample
    left over (longest first) the longest reference left; those count in n_short.
    """
    lens = np.asarray(sample_lengths, np.int64)
    rlen = np.asarray(ref_lengths, np.int64)
    todo = np.flatnonzero(lens > 0)
    usable = np.flatnonzero(rlen > 0)
    if todo.size == 0 or usable.size == 0:
        return [], 0, 0
    rng = np.random.default_rng(seed)
    uses = -(-todo.size // usable.size)
    pool = np.tile(usable, uses)  # reference index per slot
    plen = rlen[pool]
    free = np.ones(pool.size, bool)
    tie = rng.permutation(todo.size)  # seeded order among samples of equal length
    order = todo[np.lexsort((tie, -lens[todo]))]
    match: dict[int, int] = {}
    for i in order:
        ok = np.flatnonzero(free & (plen >= lens[i]))
        if ok.size:
            slot = ok[rng.integers(ok.size)]
            free[slot] = False
            match[int(i)] = int(pool[slot])
    short = [int(i) for i in order if int(i) not in match]
    for i in short:
        left = np.flatnonzero(free)
        slot = left[np.argmax(plen[left])]
        free[slot] = False
        match[i] = int(pool[slot])
    return sorted(match.items()), len(short), uses


def _prefix(s: Scored, k: int) -> tuple[float, int, list[int]]:
    """(NLL, targets, target ids) of the first k scored targets of `s` (exact: causal evaluator)."""
    if k >= s.n_targets:
        return s.nll, s.n_targets, list(s.targets)
    if s.token_nll is None:
        raise ValueError("length matching needs per-token NLLs (Scored.token_nll)")
    return math.fsum(s.token_nll[:k]), k, list(s.targets[:k])


def length_matched(samples: list[Scored], refs: list[Scored], *, bootstrap: int = 1000, seed: int = 0,
                   key: int = 0) -> dict | None:
    """Reference texts cut to the samples' lengths (see the module docstring); None if nothing to pair.

    The pairing draws from default_rng([seed, key]) (key = the steps value), the bootstrap
    from `seed`, like every other CI of the row.
    """
    pairs, n_short, uses = match_lengths([s.n_targets for s in samples], [r.n_targets for r in refs],
                                         [int(seed), int(key)])
    if not pairs:
        return None
    cut = [_prefix(refs[j], samples[i].n_targets) for i, j in pairs]
    nll = np.array([c[0] for c in cut], np.float64)
    n = np.array([c[1] for c in cut], np.float64)
    ent = np.array([unigram_entropy(c[2]) for c in cut], np.float64)
    usable = sum(r.n_targets > 0 for r in refs)
    note = ("distinct references" if uses <= 1 else
            f"references reused: {usable} non-empty references for {len(pairs)} samples (each used at most {uses} times)")
    return {
        "gen_ppl": math.exp(nll.sum() / n.sum()),
        "ci95": bootstrap_ci(nll, n, reps=bootstrap, seed=seed),
        "entropy_nats": float(ent.mean()),
        "entropy_ci95": bootstrap_mean_ci(ent, reps=bootstrap, seed=seed),
        "n": len(pairs), "n_short": int(n_short), "n_targets": int(n.sum()), "note": note,
        "per_sample": {"sample_index": [i for i, _ in pairs], "reference_index": [j for _, j in pairs],
                       "nll": nll.tolist(), "n_targets": n.astype(int).tolist(), "entropy_nats": ent.tolist()},
    }


def texts_of(rows: list[dict]) -> list[list[str]]:
    """Segments of each samples/references row (a row without segments is one segment)."""
    return [list(r.get("segments") or [r["text"]]) for r in rows]


def features_path(out, given=None) -> Path:
    """--features, or features.npz next to the result."""
    return Path(given) if given else Path(out).with_name("features.npz")


def save_features(path, p: np.ndarray, q_by_steps: dict[int, np.ndarray]) -> None:
    """One npz: `p` (references) and `q_<steps>` (samples), float32 [n, d]; written atomically."""
    buf = io.BytesIO()
    np.savez(buf, p=p, **{f"q_{k}": v for k, v in q_by_steps.items()})
    atomic_write_bytes(path, buf.getvalue())


def load_features(path) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            p = np.asarray(z["p"])
            q = {int(k[2:]): np.asarray(z[k]) for k in z.files if k.startswith("q_")}
    except FileNotFoundError:
        raise UserError(f"cannot read MAUVE features from {path}: no such file (run genppl first)") from None
    except Exception as err:  # a truncated zip fails in many ways (BadZipFile, EOFError, zlib.error, ...)
        detail = (str(err).splitlines() or [""])[0] or type(err).__name__
        raise UserError(f"cannot read MAUVE features from {path}: truncated or corrupted ({detail}); "
                        "rerun genppl") from None
    return p, q


# --- CLI --------------------------------------------------------------------------------------
def run(args, config: dict) -> dict:
    """`evaluate genppl --config C --evaluator-dir DIR --out EVAL/genppl.json [--samples EVAL/samples.json]
    [--references EVAL/references.jsonl] [--features EVAL/features.npz]` (defaults: next to --out)."""

    evaluate = EvaluateSettings.of(config)
    s = evaluate.genppl
    feature_tokens, max_tokens = evaluate.mauve.max_text_length, s.max_tokens
    device = pick_device(args.device)
    summary, groups = load_samples(args.samples)
    refs = read_jsonl(args.references)
    t0 = time.perf_counter()
    ev = load_evaluator(s.evaluator, args.evaluator_dir, device=device)
    t_load = time.perf_counter() - t0
    common = dict(max_tokens=max_tokens, batch_size=s.batch_size, feature_tokens=feature_tokens)
    agg = dict(bootstrap=s.bootstrap, seed=s.seed, prefix=s.entropy_prefix)
    scored_ref = score(ev, texts_of(refs), desc="genppl data", **common)
    data = summarize(scored_ref, **agg)
    by_steps, q = [], {}
    for k, rows in groups.items():
        scored = score(ev, texts_of(rows), desc=f"genppl steps={k}", **common)
        matched = length_matched(scored, scored_ref, bootstrap=agg["bootstrap"], seed=agg["seed"], key=int(k))
        by_steps.append({"steps": k, **summarize(scored, **agg), "length_matched_data": matched})
        q[k] = np.stack([x.feature for x in scored])
    save_features(features_path(args.out, args.features), np.stack([x.feature for x in scored_ref]), q)
    settings_out = {**s.as_dict(), "evaluator": ev.describe(), "feature_tokens": min(feature_tokens, max_tokens - 1),
                    "aggregation": "token-weighted exp(sum nll / sum targets); secondary mean of per-sample PPL",
                    "targets": "all retokenized tokens after the prepended BOS except evaluator EOS",
                    "entropy": "unigram entropy of scored evaluator ids per sample, mean over samples; nats (bits = /ln 2)",
                    "ci": "95% percentile bootstrap over samples (ci95: gen_ppl; *_ci95: the named value)",
                    "filtering": "none",
                    "length_matched_data": "each non-empty sample paired with its own reference (seed [seed, steps]; "
                    ">= its length first, n_short otherwise), the reference cut to the sample's number of "
                    "scored targets; exact from per-token NLLs (causal evaluator)",
                    "samples": str(args.samples), "references": str(args.references),
                    "features": features_path(args.out, args.features).name,
                    "evaluator_load_seconds": t_load, "seconds": time.perf_counter() - t0}
    write_result(args.out, "genppl", header_of(summary), settings_out, {"by_steps": by_steps, "data": data})
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"genppl {summary.get('run')} ({ev.name}): " + ", ".join(
        f"steps={e['steps']} {fmt(e['gen_ppl'])} H={fmt(e['entropy_nats'])} (data cut to length: "
        f"{fmt((e['length_matched_data'] or {}).get('gen_ppl'))} H={fmt((e['length_matched_data'] or {}).get('entropy_nats'))})"
        for e in by_steps)
        + f"; data {fmt(data['gen_ppl'])} H={fmt(data['entropy_nats'])} -> {args.out}")
    return {"by_steps": by_steps, "data": data}
