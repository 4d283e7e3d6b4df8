"""Unconditional samples per steps setting, and the held-out reference texts they are compared to.

Samples are drawn once and written to a JSON-lines file; genppl, mauve, diversity and lengths
all read that file, so every metric sees the same samples. Seeds are fixed per (seed, steps,
batch), so a rerun reproduces the file and adding a steps value leaves the others unchanged.

The reference set ("data" row, baselines spec 6.3.2) is held-out data passed through the same
path as samples: content ids (BOS removed) -> `render` (decode without specials; segments split
at EOS). It depends on the data only, so one file serves every run of a layout.

Per-sample facts a method returns in `SampleResult.per_sample` (e.g. the masked models'
`content_after_pad` / `tokens_after_pad`, baselines spec 6.6) are copied into each row; every
row has `content_after_pad` (null for methods without a PAD canvas), and the summary gives its
count and rate per steps. A sample set is drawn in several calls: `sampler_info` keeps the first
call's settings, with the per-call counts in COUNT_KEYS summed over calls.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from harness.core.methods import UserError
from harness.core.records import atomic_write_jsonl, provenance, read_jsonl, read_result, write_result
from harness.core.runtime import pick_device, progress, synchronize
from harness.core.settings import EvaluateSettings
from harness.data.manifest import load_tokenizer
from harness.data.storage import load_split
from harness.data.tokenizer import render
from harness.metrics.common import steps_list
from harness.run.recipe import load_run


def batch_seed(seed: int, steps: int, batch_index: int) -> int:
    """A 63-bit seed for one sampling call, distinct for every (seed, steps, batch)."""
    state = np.random.SeedSequence([int(seed), int(steps), int(batch_index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


#: per-call counts some methods put in SampleResult.info; summed over the calls of a steps setting
COUNT_KEYS = ("sequence_evaluations", "reached_length_cap", "insertions_dropped_by_cap", "stopped_by_head",
              "stopped_at_max_len", "truncated_budget", "truncated_max_len", "truncated")


#: samples.jsonl fields a method's per_sample entries may not overwrite
RESERVED_ROW_KEYS = ("steps", "index", "token_ids", "text", "segments", "length", "nfe", "batch_size", "seconds",
                     "seed", "top_p", "trajectory")


def merge_info(infos: list[dict]) -> dict:
    """One sampler_info for the calls of a steps setting (see the module docstring).

    Keys in COUNT_KEYS holding numbers are summed; any other key whose value differs between
    calls is listed per call under "varies_by_call", so nothing is silently taken from call 1.
    """
    if not infos:
        return {}
    out = dict(infos[0])
    varies = {}
    for key in set().union(*infos):
        vals = [i.get(key) for i in infos]
        if key in COUNT_KEYS and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[key] = sum(vals)
        elif any(v != vals[0] for v in vals):
            varies[key] = vals
    if varies:
        out["varies_by_call"] = varies
    return out


def content_after_pad_summary(flags: list) -> dict:
    """{"content_after_pad_count", "content_after_pad_rate"} of per-sample flags (None = not reported).

    Both null when no sample reports the flag (methods without a PAD canvas).
    """
    known = [bool(f) for f in flags if f is not None]
    if not known:
        return {"content_after_pad_count": None, "content_after_pad_rate": None}
    return {"content_after_pad_count": int(sum(known)), "content_after_pad_rate": sum(known) / len(known)}


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except (TypeError, ValueError):
        return repr(obj)


def generate(method, tokenizer, *, steps: list[int], n: int, batch_size: int, seed: int, top_p: float = 1.0,
             trajectory: bool = True) -> tuple[list[dict], list[dict]]:
    """Draw `n` samples for each steps value; return (rows for samples.jsonl, summary per steps).

    Each sampling call draws `batch_size` samples (the last call fewer) from a fresh generator
    seeded with `batch_seed`. `nfe` is what the method reports for the call (network calls for
    the whole batch); `seconds` is the call's wall time divided by the samples it drew.
    """
    device = method.device
    rows: list[dict] = []
    summary: list[dict] = []
    for k in steps:
        t_all, nfes, lengths, infos, flags = 0.0, [], [], [], []
        starts = list(range(0, n, batch_size))
        for b, start in enumerate(progress(starts, desc=f"samples steps={k}", unit="batch")):
            size = min(batch_size, n - start)
            s = batch_seed(seed, k, b)
            gen = torch.Generator(device=device).manual_seed(s)
            synchronize(device)
            t0 = time.perf_counter()
            res = method.sample(size, k, generator=gen, top_p=top_p)
            synchronize(device)
            dt = time.perf_counter() - t0
            t_all += dt
            nfes.append(int(res.nfe))
            infos.append(_jsonable(dict(res.info or {})))
            if len(res.tokens) != size:
                raise RuntimeError(f"{type(method).__name__}.sample returned {len(res.tokens)} samples, asked {size}")
            per_sample = dict(getattr(res, "per_sample", None) or {})
            for key, vals in per_sample.items():
                if key in RESERVED_ROW_KEYS:
                    raise RuntimeError(f"{type(method).__name__}.sample: per_sample key {key!r} is a samples.jsonl field")
                if len(vals) != size:
                    raise RuntimeError(f"{type(method).__name__}.sample returned {len(vals)} values of "
                                       f"per_sample[{key!r}] for {size} samples")
            for i, ids in enumerate(res.tokens):
                row = {"steps": k, "index": start + i, "token_ids": [int(t) for t in ids], **render(ids, tokenizer),
                       "nfe": int(res.nfe), "batch_size": size, "seconds": dt / size, "seed": s, "top_p": top_p,
                       "content_after_pad": None, **{key: _jsonable(vals[i]) for key, vals in per_sample.items()}}
                flags.append(row["content_after_pad"])
                if trajectory and res.trajectory is not None:
                    row["trajectory"] = [int(step[i]) for step in res.trajectory]
                lengths.append(row["length"])
                rows.append(row)
        summary.append({
            "steps": k, "n": n, "mean_length": float(np.mean(lengths)) if lengths else None,
            "nfe": float(np.mean(nfes)), "nfe_total": int(sum(nfes)), "batches": len(nfes),
            "seconds_per_sample": t_all / n if n else None, **content_after_pad_summary(flags),
            "sampler_info": merge_info(infos),
        })
    return rows, summary


def reference_rows(data, tokenizer, n: int, seed: int) -> list[dict]:
    """`n` held-out sequences in a seeded random order, rendered like samples.

    `data` is a `harness.data.storage.TokenData` (len, batch(indices) -> Batch). Content = the ids
    after BOS up to the sequence length (varlen: a document; fixed: a chunk).
    """
    order = np.random.default_rng(int(seed)).permutation(len(data))[: int(n)].tolist()
    rows = []
    for start in range(0, len(order), 256):
        idx = order[start : start + 256]
        batch = data.batch(idx)
        for j, i in enumerate(idx):
            ids = batch.x0[j, 1 : int(batch.lengths[j])].tolist()
            rows.append({"index": int(i), "token_ids": ids, **render(ids, tokenizer)})
    return rows


def jsonl_path(summary_path, summary: dict) -> Path:
    """The samples.jsonl named by a samples summary (stored relative to the summary's folder)."""
    return Path(summary_path).parent / summary["settings"]["jsonl"]


def load_samples(summary_path) -> tuple[dict, dict[int, list[dict]]]:
    """A samples summary and its rows grouped by steps (each group ordered by index)."""

    summary = read_result(summary_path, kind="samples")
    rows = read_jsonl(jsonl_path(summary_path, summary))
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(int(row["steps"]), []).append(row)
    for g in groups.values():
        g.sort(key=lambda r: r["index"])
    expected = [int(e["steps"]) for e in summary["values"]["by_steps"]]
    if sorted(groups) != sorted(expected):
        raise UserError(f"{summary_path}: samples file holds steps {sorted(groups)}, summary says {expected}")
    return summary, groups


# --- CLI --------------------------------------------------------------------------------------
def _write_references(ev: EvaluateSettings, data_dir, layout: str, tokenizer, out) -> list[dict]:
    s, n = ev.references, ev.reference_count()
    rows = reference_rows(load_split(data_dir, s.split, layout), tokenizer, n, s.seed)
    if len(rows) < n:
        print(f"warning: the {s.split} split has only {len(rows)} sequences; {n} references were asked for")
    for r in rows:
        r.update(split=s.split, layout=layout)
    atomic_write_jsonl(out, rows)
    return rows


def run(args, config: dict) -> dict:
    """`evaluate samples --config C --run RUN --data DATA --out EVAL/samples.json`
    [--jsonl EVAL/samples.jsonl] [--references EVAL/references.jsonl]."""

    ev = EvaluateSettings.of(config)
    s = ev.samples
    out = Path(args.out)
    jsonl = Path(args.jsonl) if args.jsonl else out.with_suffix(".jsonl")
    if jsonl.resolve().parent != out.resolve().parent:
        raise UserError(f"--jsonl must be in the same folder as --out ({out.parent}), got {jsonl}")
    device = pick_device(args.device)
    loaded = load_run(args.run, data_dir=args.data, device=device, ema=not args.no_ema, study_config=config)
    refs = _write_references(ev, args.data, loaded.info["layout"], loaded.tokenizer, args.references)
    rows, by_steps = generate(loaded.method, loaded.tokenizer, steps=steps_list(s.steps), n=s.n,
                              batch_size=s.batch_size, seed=s.seed, top_p=float(s.top_p), trajectory=s.trajectory)
    atomic_write_jsonl(jsonl, rows)
    settings_out = {**s.as_dict(), "steps": steps_list(s.steps), "jsonl": jsonl.name, "ema": not args.no_ema,
                    "float64_sampling": True, "seeding": "SeedSequence([seed, steps, batch])",
                    "max_length": int(loaded.method.max_len) - 1, "tokenizer": getattr(loaded.tokenizer, "name", None),
                    "specials": list(loaded.tokenizer.vocab.specials), "references": str(args.references),
                    "n_references": len(refs),
                    "content_after_pad": "varlen masked models: samples with a non-PAD token after the first PAD "
                    "(dropped by the cut at the first PAD); null for methods without a PAD canvas",
                    "sampler_info": f"first call's info, {', '.join(COUNT_KEYS)} summed over calls"}
    write_result(out, "samples", provenance(config, loaded.info, device), settings_out, {"by_steps": by_steps})
    print(f"samples {loaded.info.get('run')}: " + ", ".join(
        f"steps={e['steps']} n={e['n']} len={e['mean_length']:.1f} nfe={e['nfe']:.0f} {e['seconds_per_sample']:.3f}s/sample"
        for e in by_steps) + f"; {len(refs)} references -> {out}")
    return {"by_steps": by_steps}


def run_references(args, config: dict) -> list[dict]:
    """`evaluate references --config C --data DATA --layout L --out references.jsonl`."""

    if not args.layout:
        raise UserError("evaluate references needs --layout fixed|varlen")
    rows = _write_references(EvaluateSettings.of(config), args.data, args.layout, load_tokenizer(args.data), args.out)
    print(f"references: {len(rows)} {args.layout} texts, mean length "
          f"{np.mean([r['length'] for r in rows]) if rows else 0:.1f} -> {args.out}")
    return rows
