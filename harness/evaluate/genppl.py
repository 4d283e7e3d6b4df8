"""Generative perplexity and unigram entropy under the evaluator LM (baselines spec 6.3-6.4).

Per text: the document segments are retokenized with the evaluator tokenizer (no special
tokens added) and joined by the evaluator's document separator; the evaluator BOS is prepended
as unscored context; the sequence is truncated to `max_tokens` in total (BOS included). Every
token after BOS is a target except evaluator-EOS tokens, which stay in the context. fp32,
batched with right padding and an attention mask (sorted by length to pad little).

Aggregates: gen_ppl = exp(sum NLL / sum targets) over samples (primary, token-weighted);
gen_ppl_mean_per_sample = mean over samples of exp(mean NLL) (secondary); a 95% percentile
bootstrap CI of the primary over samples (fixed seed). Unigram entropy in nats of each sample's
scored evaluator ids, averaged over samples (bits = nats / ln 2). Samples with no target (empty
text) count in n and n_empty but have no per-sample PPL or entropy. No sample is ever filtered.

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

from harness.evaluate.diversity import LN2, unigram_entropy


@dataclass
class Scored:
    """One text scored by the evaluator."""

    nll: float  # summed over targets, nats
    n_targets: int
    targets: list[int]  # the scored evaluator ids, in order
    length: int  # evaluator tokens of the full text (BOS excluded, before truncation)
    truncated: bool
    feature: np.ndarray | None = None


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
    from harness.evaluate.common import progress

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
        nll = torch.where(keep, nll.double(), 0.0).sum(1).cpu()
        keep_cpu, tgt_cpu = keep.cpu(), tgt.cpu()
        hidden = res.hidden_states[-1].float() if feature_tokens is not None else None
        for r, i in enumerate(idx):
            feat = None
            if hidden is not None:
                pos = min(len(seqs[i]) - 1, int(feature_tokens))
                feat = hidden[r, pos].cpu().numpy().astype(np.float32)
            targets = tgt_cpu[r][keep_cpu[r]].tolist()
            out[i] = Scored(float(nll[r]), len(targets), targets, lengths[i], truncated[i], feat)
    return out  # type: ignore[return-value]


def bootstrap_ci(nll, n_targets, *, reps: int, seed: int, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap CI of exp(sum nll / sum n) with samples resampled with replacement."""
    nll, n = np.asarray(nll, np.float64), np.asarray(n_targets, np.float64)
    m = nll.size
    if m < 2 or reps <= 0 or n.sum() <= 0:
        return None
    rng = np.random.default_rng(int(seed))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    ratios = []
    for chunk in range(0, reps, 256):  # bounded memory for large m
        idx = rng.integers(0, m, size=(min(256, reps - chunk), m))
        num, den = nll[idx].sum(1), n[idx].sum(1)
        ratios.append(np.where(den > 0, num / np.maximum(den, 1), np.nan))
    r = np.concatenate(ratios)
    return [float(np.exp(np.nanpercentile(r, lo))), float(np.exp(np.nanpercentile(r, hi)))]


def summarize(scored: list[Scored], *, bootstrap: int = 1000, seed: int = 0, prefix: int = 128) -> dict:
    """Aggregate scored texts into the genppl values of one row (see the module docstring)."""
    nll = np.array([s.nll for s in scored], np.float64)
    n = np.array([s.n_targets for s in scored], np.float64)
    nonempty = n > 0
    total = float(n.sum())
    ent = np.array([unigram_entropy(s.targets) for s in scored if s.n_targets > 0])
    ent_prefix = np.array([unigram_entropy(s.targets[:prefix]) for s in scored if s.n_targets >= prefix])
    values = {
        "gen_ppl": math.exp(nll.sum() / total) if total > 0 else None,
        "gen_ppl_mean_per_sample": float(np.mean(np.exp(nll[nonempty] / n[nonempty]))) if nonempty.any() else None,
        "ci95": bootstrap_ci(nll, n, reps=bootstrap, seed=seed),
        "entropy_nats": float(ent.mean()) if ent.size else None,
        "entropy_bits": float(ent.mean() / LN2) if ent.size else None,
        "entropy_nats_prefix": float(ent_prefix.mean()) if ent_prefix.size else None,
        "n_prefix": int(ent_prefix.size),
        "nats_per_token": nll.sum() / total if total > 0 else None,
        "mean_length": float(np.mean([s.length for s in scored])) if scored else None,
        "truncation_rate": float(np.mean([s.truncated for s in scored])) if scored else None,
        "n": len(scored),
        "n_empty": int((~nonempty).sum()),
        "n_targets": int(total),
    }
    return values


def texts_of(rows: list[dict]) -> list[list[str]]:
    """Segments of each samples/references row (a row without segments is one segment)."""
    return [list(r.get("segments") or [r["text"]]) for r in rows]


def features_path(out, given=None) -> Path:
    """--features, or features.npz next to the result."""
    return Path(given) if given else Path(out).with_name("features.npz")


def save_features(path, p: np.ndarray, q_by_steps: dict[int, np.ndarray]) -> None:
    """One npz: `p` (references) and `q_<steps>` (samples), float32 [n, d]; written atomically."""
    from harness.results import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, p=p, **{f"q_{k}": v for k, v in q_by_steps.items()})
    atomic_write_bytes(path, buf.getvalue())


def load_features(path) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    from harness.methods import UserError

    try:
        with np.load(path) as z:
            p = z["p"]
            q = {int(k[2:]): z[k] for k in z.files if k.startswith("q_")}
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"cannot read MAUVE features from {path}: {err}") from None
    return p, q


# --- CLI --------------------------------------------------------------------------------------
def run(args, config: dict) -> dict:
    """`evaluate genppl --config C --evaluator-dir DIR --out EVAL/genppl.json [--samples EVAL/samples.json]
    [--references EVAL/references.jsonl] [--features EVAL/features.npz]` (defaults: next to --out)."""
    from harness.evaluate.common import pick_device, settings
    from harness.evaluate.evaluator import load_evaluator
    from harness.evaluate.samples import load_samples
    from harness.results import header_of, read_jsonl, write_result

    s = settings(config, "genppl")
    feature_tokens = int(settings(config, "mauve")["max_text_length"])
    max_tokens = int(s["max_tokens"])
    device = pick_device(args.device)
    summary, groups = load_samples(args.samples)
    refs = read_jsonl(args.references)
    t0 = time.perf_counter()
    ev = load_evaluator(s["evaluator"], args.evaluator_dir, device=device)
    t_load = time.perf_counter() - t0
    common = dict(max_tokens=max_tokens, batch_size=int(s["batch_size"]), feature_tokens=feature_tokens)
    agg = dict(bootstrap=int(s["bootstrap"]), seed=int(s["seed"]), prefix=int(s["entropy_prefix"]))
    by_steps, q = [], {}
    for k, rows in groups.items():
        scored = score(ev, texts_of(rows), desc=f"genppl steps={k}", **common)
        by_steps.append({"steps": k, **summarize(scored, **agg)})
        q[k] = np.stack([x.feature for x in scored])
    scored_ref = score(ev, texts_of(refs), desc="genppl data", **common)
    data = summarize(scored_ref, **agg)
    save_features(features_path(args.out, args.features), np.stack([x.feature for x in scored_ref]), q)
    settings_out = {**s, "evaluator": ev.describe(), "feature_tokens": min(feature_tokens, max_tokens - 1),
                    "aggregation": "token-weighted exp(sum nll / sum targets); secondary mean of per-sample PPL",
                    "targets": "all retokenized tokens after the prepended BOS except evaluator EOS",
                    "entropy": "unigram entropy of scored evaluator ids per sample, mean over samples; nats (bits = /ln 2)",
                    "ci": "95% percentile bootstrap over samples", "filtering": "none",
                    "samples": str(args.samples), "references": str(args.references),
                    "features": features_path(args.out, args.features).name,
                    "evaluator_load_seconds": t_load, "seconds": time.perf_counter() - t0}
    write_result(args.out, "genppl", header_of(summary), settings_out, {"by_steps": by_steps, "data": data})
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"genppl {summary.get('run')} ({ev.name}): " + ", ".join(
        f"steps={e['steps']} {fmt(e['gen_ppl'])} H={fmt(e['entropy_nats'])}" for e in by_steps)
        + f"; data {fmt(data['gen_ppl'])} H={fmt(data['entropy_nats'])} -> {args.out}")
    return {"by_steps": by_steps, "data": data}
