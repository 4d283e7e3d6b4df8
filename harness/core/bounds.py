"""The NLL upper bound every method reports, aggregated the same way for all of them.

`evaluate_ppl` draws `Method.nll_bound` over batches in both conventions (strict and paper) and
`nll_statistics` aggregates per-sequence bounds token-weighted (sum B / sum N) with the standard
error of that ratio. The ppl metric and the training loop's validation curve both use it.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from harness.core.batch import predicted_tokens
from harness.core.methods import BOUND_CONVENTIONS
from harness.core.runtime import progress


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
