"""Perplexity from each method's NLL upper bound on held-out data (baselines spec 6.1-6.2).

Every method reports B(x), an upper bound on -log p(x) in nats (exact for AR), and every method
divides by the same N(x) = `predicted_tokens(batch)`. The primary number is token-weighted,
sum B / sum N, and PPL = exp of it; the per-sequence mean of B/N is secondary.
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
        "ppl": math.exp(ratio),
        "stderr": stderr,
        "per_sequence_mean": float(np.mean(b / n_tok)),
        "n_sequences": n,
        "n_tokens": int(n_tok.sum()),
    }


def evaluate_ppl(method, batches, *, mc: int, seed: int, total: int | None = None) -> dict:
    """Run `method.nll_bound` over `batches` (an iterable of Batch) with one seeded generator.

    The generator lives on the method's device and is seeded once, so the same batches in the
    same order give the same Monte-Carlo draws.
    """
    from harness.evaluate.common import progress

    device = method.device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    bounds, tokens = [], []
    t0 = time.perf_counter()
    for batch in progress(batches, total=total, desc=f"ppl mc={mc}", unit="batch"):
        batch = batch.to(device)
        b = method.nll_bound(batch, mc, gen)
        bounds.append(b.detach().to("cpu", torch.float64))
        tokens.append(predicted_tokens(batch).to("cpu"))
    values = nll_statistics(torch.cat(bounds).numpy(), torch.cat(tokens).numpy())
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
    loaded = load_run(args.run, data_dir=args.data, device=device, ema=not args.no_ema)
    data = load_split(args.data, s["split"], loaded.info["layout"])
    n_seq = min(len(data), int(s["max_sequences"]))
    batches = eval_batches(data, int(s["batch_size"]), n_seq)
    values = evaluate_ppl(loaded.method, batches, mc=int(s["mc"]), seed=int(s["seed"]),
                          total=math.ceil(n_seq / int(s["batch_size"])))
    settings_out = {**s, "ema": not args.no_ema, "denominator": "predicted_tokens (fixed: L-1; varlen: content+1)",
                    "aggregation": "token-weighted sum B / sum N", "stderr": "ratio estimator across sequences"}
    write_result(args.out, "ppl", provenance(config, loaded.info, device), settings_out, values)
    print(f"ppl {loaded.info.get('run')}: {values['nats_per_token']:.4f} nats/token, PPL {values['ppl']:.2f} "
          f"(± {values['stderr'] or float('nan'):.4f}), {values['n_sequences']} sequences -> {args.out}")
    return values
