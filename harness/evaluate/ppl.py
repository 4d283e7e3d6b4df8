"""Perplexity from each method's NLL upper bound on held-out data (baselines spec 6.1-6.2).

Every method reports two numbers per sequence (Method.nll_bound), both divided by the same
N(x) = `predicted_tokens(batch)`:

* the strict bound (primary: `values.nats_per_token`, `ppl`, `stderr`): a valid upper bound
  on -log p(x) of the model its sampler runs, the whole time range and the prior term included;
* the paper convention (`values.paper_convention`): t >= 1e-3 and the prior term dropped, the
  same truncation for every method, only to compare with published numbers.

Aggregates are token-weighted, sum B / sum N, PPL = exp of it; the per-sequence mean of B/N is
secondary. `values.per_sequence` keeps every sequence's two bounds (the same rows for every
method, so differences between methods can be tested pairwise), and `omits` says in one
sentence what each number leaves out.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from harness.batch import predicted_tokens


def nll_statistics(bounds, tokens) -> dict:
    """Aggregate per-sequence bounds B_i (nats) and token counts N_i.

    stderr is the standard error of the ratio estimator R = sum B / sum N across sequences
    (delta method): sqrt( sum (B_i - R N_i)^2 / (n (n-1)) ) / mean N. It covers the spread
    across sequences and the Monte-Carlo noise of the bound together.
    """
    b = np.asarray(bounds, dtype=np.float64)
    n_tok = np.asarray(tokens, dtype=np.float64)
    n = int(b.size)
    if n == 0 or n_tok.sum() <= 0:
        raise ValueError("no sequences / no predicted tokens to evaluate")
    ratio = float(b.sum() / n_tok.sum())
    stderr = None
    if n > 1:
        resid = b - ratio * n_tok
        stderr = float(math.sqrt((resid**2).sum() / (n * (n - 1))) / n_tok.mean())
    return {
        "nats_per_token": ratio,
        "ppl": math.exp(ratio) if ratio < 700 else float("inf"),
        "stderr": stderr,
        "per_sequence_mean": float(np.mean(b / n_tok)),
        "n_sequences": n,
        "n_tokens": int(n_tok.sum()),
    }


def _draw(method, batches, *, mc: int, seed: int, convention: str, total: int | None):
    from harness.evaluate.common import progress

    gen = torch.Generator(device=method.device).manual_seed(int(seed))
    bounds, tokens, stats = [], [], []
    for batch in progress(batches, total=total, desc=f"ppl {convention} mc={mc}", unit="batch"):
        batch = batch.to(method.device)
        bounds.append(method.nll_bound(batch, mc, gen, convention=convention).detach().to("cpu", torch.float64))
        tokens.append(predicted_tokens(batch).to("cpu"))
        stats.append(dict(getattr(method, "last_bound_stats", {}) or {}))
    return torch.cat(bounds).numpy(), torch.cat(tokens).numpy(), stats


def _diagnostics(stats: list[dict], tokens) -> dict:
    """Per-sequence diagnostics a method reported (DID: the low slice, the insertion mass at t -> 0)."""
    out = {}
    for key, label in (("low_slice_per_sequence", "low_slice_nats_per_token"),
                       ("insertion_mass_at_t0", "insertion_mass_at_t0_mean")):
        values = [v for s in stats for v in (s.get(key) or [])]
        if len(values) == len(tokens):
            v = np.asarray(values, np.float64)
            out[label] = float(v.sum() / np.sum(tokens)) if key.startswith("low") else float(v.mean())
    return out


def evaluate_ppl(method, batches, *, mc: int, seed: int, total: int | None = None) -> dict:
    """Both conventions of `method.nll_bound` over `batches` (a re-iterable of Batch).

    Each convention has its own generator on the method's device, seeded once, so the same
    batches in the same order give the same Monte-Carlo draws, and one number does not depend
    on whether the other was computed. Methods whose paper convention truncates nothing
    (`paper_equals_strict`: AR, ILM) compute it once.
    """
    from harness.methods import BOUND_CONVENTIONS

    t0 = time.perf_counter()
    batches = list(batches)
    strict, tokens, stats = _draw(method, batches, mc=mc, seed=seed, convention="strict", total=total)
    values = nll_statistics(strict, tokens)
    values.update(convention="strict", omits=method.bound_omits("strict"), **_diagnostics(stats, tokens))
    if method.paper_equals_strict:
        paper = strict
    else:
        paper, _, _ = _draw(method, batches, mc=mc, seed=int(seed) + 1, convention="paper", total=total)
    pc = nll_statistics(paper, tokens)
    values["paper_convention"] = {k: pc[k] for k in ("nats_per_token", "ppl", "stderr", "per_sequence_mean")}
    values["paper_convention"]["omits"] = method.bound_omits("paper")
    values["paper_convention"]["same_as_strict"] = bool(method.paper_equals_strict)
    values["per_sequence"] = {"index": list(range(len(tokens))), "n_tokens": [int(n) for n in tokens],
                              "strict": [float(b) for b in strict], "paper": [float(b) for b in paper]}
    values["conventions"] = list(BOUND_CONVENTIONS)
    values["seconds"] = time.perf_counter() - t0
    return values


def run(args, config: dict) -> dict:
    """CLI: `evaluate ppl --config C --run RUN --data DATA --out ppl.json`."""
    from harness.data import eval_batches, load_split
    from harness.evaluate.common import pick_device, settings
    from harness.results import provenance, write_result
    from harness.runs import load_run

    s = settings(config, "ppl")
    device = pick_device(args.device)
    loaded = load_run(args.run, data_dir=args.data, device=device, ema=not args.no_ema, study_config=config)
    data = load_split(args.data, s["split"], loaded.info["layout"])
    n_seq = min(len(data), int(s["max_sequences"]))
    batches = eval_batches(data, int(s["batch_size"]), n_seq)
    values = evaluate_ppl(loaded.method, batches, mc=int(s["mc"]), seed=int(s["seed"]),
                          total=math.ceil(n_seq / int(s["batch_size"])))
    settings_out = {**s, "ema": not args.no_ema, "denominator": "predicted_tokens (fixed: L-1; varlen: content+1)",
                    "aggregation": "token-weighted sum B / sum N", "stderr": "ratio estimator across sequences",
                    "sequences": f"the first {n_seq} of the {s['split']} split, in order (the same for every method)"}
    write_result(args.out, "ppl", provenance(config, loaded.info, device), settings_out, values)
    pc = values["paper_convention"]
    print(f"ppl {loaded.info.get('run')}: strict {values['nats_per_token']:.4f} nats/token, PPL {values['ppl']:.2f} "
          f"(± {values['stderr'] or float('nan'):.4f}); paper convention {pc['nats_per_token']:.4f} "
          f"(PPL {pc['ppl']:.2f}); {values['n_sequences']} sequences -> {args.out}")
    return values
