"""Zero-shot likelihood on the DID paper's Table 1 test sets (did-method.md 8.2; harness.data.zeroshot).

    zeroshot-data --config C --data DATA --out RESULTS/zeroshot/sets.pt
        every set of evaluate.zeroshot.datasets loaded (a local file of `files:`, else the hub),
        detokenised, tokenised with the study's tokenizer and cut into the study's fixed rows;
        a set that cannot be loaded is one log line and an entry in `missing` (an error with
        `required: true`). Writes sets.pt (the rows) and sets.json (what it holds, no tensors).
    zeroshot --config C --run RUN --data DATA --out RUN/eval/zeroshot.json [--sets sets.pt]
        both bounds of harness.metrics.ppl (strict and paper convention) on the first
        max_sequences rows of every prepared set (without --sets the sets are prepared here).

zeroshot.json `values`:
    {"datasets": {name: {nats_per_token, ppl, stderr, per_sequence_mean, n_sequences, n_tokens,
                         convention, omits, paper_convention: {nats_per_token, ppl, stderr,
                         per_sequence_mean, omits, same_as_strict, divided_by_seq_len: {nats_per_token,
                         ppl}}, conventions, seconds, [DID: low_slice_nats_per_token,
                         insertion_mass_at_t0_mean], source, documents, detokenizer, rows_available}},
     "missing": {name: reason}, "datasets_requested": [...]}
i.e. ppl.json's values without per_sequence, per set. `divided_by_seq_len` is the paper's own
denominator (sum of bounds / (rows x seq_len), BOS included: exp(loss / 1024) at seq_len 1024),
next to the harness's N(x) = seq_len - 1 predicted tokens; compare it, never mix the two.
"""
from __future__ import annotations

import math
from pathlib import Path

from harness.core.bounds import evaluate_ppl
from harness.core.errors import UserError
from harness.core.records import provenance, write_result
from harness.core.runtime import pick_device
from harness.data.batches import eval_batches
from harness.data.manifest import load_manifest, load_tokenizer
from harness.data.storage import TokenData
from harness.core.settings import ZeroshotSettings
from harness.data.zeroshot import load_prepared, prepare_sets, save_prepared, settings_of
from harness.run.recipe import load_run


def run_data(args, config: dict) -> dict:
    """CLI: `evaluate zeroshot-data --config C --data DATA --out sets.pt`."""

    s = settings_of(config)
    tokenizer = load_tokenizer(args.data)
    seq_len = int(load_manifest(args.data)["seq_len"])
    prepared = prepare_sets(s, tokenizer, seq_len)
    save_prepared(args.out, prepared)
    print(f"zeroshot-data: {len(prepared['datasets'])} of {len(s.datasets)} sets prepared"
          + (f", missing: {', '.join(prepared['missing'])}" if prepared["missing"] else "") + f" -> {args.out}")
    return prepared


def _per_set_values(method, rows, s: ZeroshotSettings, seq_len: int) -> dict:
    """ppl.json's values (harness.core.bounds.evaluate_ppl) of the first max_sequences rows."""

    data = TokenData({"layout": "fixed", "vocab": method.vocab.to_dict(), "tokens": rows.long(), "seq_len": seq_len},
                     "zero-shot rows")
    n_seq = len(data) if s.max_sequences is None else min(len(data), s.max_sequences)
    bs = s.batch_size
    values = evaluate_ppl(method, list(eval_batches(data, bs, n_seq)), mc=s.mc, seed=s.seed,
                          total=math.ceil(n_seq / bs))
    values.pop("per_sequence", None)
    pc = values["paper_convention"]
    per_position = pc["nats_per_token"] * values["n_tokens"] / (values["n_sequences"] * seq_len)
    pc["divided_by_seq_len"] = {"nats_per_token": per_position,
                                "ppl": math.exp(per_position) if per_position < 700 else float("inf")}
    return values


def run(args, config: dict) -> dict:
    """CLI: `evaluate zeroshot --config C --run RUN --data DATA --out zeroshot.json [--sets sets.pt]`."""

    s = settings_of(config)
    device = pick_device(args.device)
    loaded = load_run(args.run, data_dir=args.data, device=device, ema=not args.no_ema, study_config=config)
    if loaded.info["layout"] != "fixed":
        raise UserError(f"evaluate zeroshot scores fixed-length runs only (Table 1); {loaded.info.get('run')} is "
                        f"{loaded.info['layout']}")
    seq_len = int(load_manifest(args.data)["seq_len"])
    sets_path = getattr(args, "sets", None)
    if sets_path:
        prepared = load_prepared(sets_path, loaded.method.vocab, seq_len)
    else:
        prepared = prepare_sets(s, load_tokenizer(args.data), seq_len)
    lacking = [n for n in s.datasets if n not in prepared["datasets"] and n not in prepared["missing"]]
    if lacking:
        raise UserError(f"{sets_path} holds no entry for {', '.join(lacking)}: run `evaluate zeroshot-data` again")
    datasets, missing = {}, {}
    for name in s.datasets:
        if name in prepared["missing"]:
            missing[name] = prepared["missing"][name]
            continue
        entry = prepared["datasets"][name]
        values = _per_set_values(loaded.method, entry["tokens"], s, seq_len)
        values.update(source=entry["source"], documents=entry["documents"], detokenizer=entry["detokenizer"],
                      rows_available=entry["rows"])
        datasets[name] = values
        pc = values["paper_convention"]
        print(f"zeroshot {loaded.info.get('run')} {name}: strict {values['nats_per_token']:.4f} nats/token, "
              f"PPL {values['ppl']:.2f} (± {values['stderr'] or float('nan'):.4f}); paper convention PPL "
              f"{pc['ppl']:.2f} (/seq_len: {pc['divided_by_seq_len']['ppl']:.2f}); {values['n_sequences']} rows")
    if s.required and missing:
        raise UserError(f"zero-shot set(s) {', '.join(missing)} required (evaluate.zeroshot.required) but missing: "
                        + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    for name, reason in missing.items():
        print(f"zeroshot {loaded.info.get('run')} {name}: missing ({reason})")
    settings_out = {**s.as_dict(), "ema": not args.no_ema, "seq_len": seq_len,
                    "sets": str(Path(sets_path)) if sets_path else "prepared in this process",
                    "denominator": "predicted_tokens (seq_len - 1 per row); paper_convention.divided_by_seq_len: "
                                   "seq_len per row (the paper's exp(loss / 1024))",
                    "aggregation": "token-weighted sum B / sum N per set", "stderr": "ratio estimator across rows",
                    "chunking": "documents detokenised, tokenised with the study's tokenizer, each followed by EOS, "
                                "joined, cut into rows [BOS] + (seq_len - 1) tokens (harness.data.prepare.build_fixed)",
                    "sequences": "the first max_sequences rows of each set, in order (all if null)"}
    values = {"datasets": datasets, "missing": missing, "datasets_requested": list(s.datasets)}
    write_result(args.out, "zeroshot", provenance(config, loaded.info, device), settings_out, values)
    print(f"zeroshot {loaded.info.get('run')}: {len(datasets)} sets scored, {len(missing)} missing -> {args.out}")
    return values
