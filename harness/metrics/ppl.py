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

from harness.core.bounds import evaluate_ppl
from harness.core.records import provenance, write_result
from harness.core.runtime import pick_device
from harness.core.settings import PplSettings
from harness.data.batches import eval_batches
from harness.data.storage import load_split
from harness.run.recipe import load_run


def run(args, config: dict) -> dict:
    """CLI: `evaluate ppl --config C --run RUN --data DATA --out ppl.json`."""

    s = PplSettings.of(config)
    device = pick_device(args.device)
    loaded = load_run(args.run, data_dir=args.data, device=device, ema=not args.no_ema, study_config=config)
    data = load_split(args.data, s.split, loaded.info["layout"])
    n_seq = len(data) if s.max_sequences is None else min(len(data), s.max_sequences)   # null: every sequence
    batches = eval_batches(data, s.batch_size, n_seq)
    values = evaluate_ppl(loaded.method, batches, mc=s.mc, seed=s.seed, total=math.ceil(n_seq / s.batch_size))
    settings_out = {**s.as_dict(), "ema": not args.no_ema,
                    "denominator": "predicted_tokens (fixed: L-1; varlen: content+1)",
                    "aggregation": "token-weighted sum B / sum N", "stderr": "ratio estimator across sequences",
                    "sequences": f"the first {n_seq} of the {s.split} split, in order (the same for every method)"}
    write_result(args.out, "ppl", provenance(config, loaded.info, device), settings_out, values)
    pc = values["paper_convention"]
    print(f"ppl {loaded.info.get('run')}: strict {values['nats_per_token']:.4f} nats/token, PPL {values['ppl']:.2f} "
          f"(± {values['stderr'] or float('nan'):.4f}); paper convention {pc['nats_per_token']:.4f} "
          f"(PPL {pc['ppl']:.2f}); {values['n_sequences']} sequences -> {args.out}")
    return values
