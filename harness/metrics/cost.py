"""The study's cost measurement: one job per layout, methods interleaved, the machine to itself.

`python -m harness cost --config C --study-dir results/<study> --layout L --out results/<study>/cost/<L>.json`

Why a study-level job instead of per-run timings: a run's own timings (history.csv, the opt-in
`evaluate speed`) are taken while other workflow jobs share the machine, one method at a time,
so a ratio between two methods mixes method cost with machine load. This job measures every
method of one layout in ONE process, interleaved within each repeat (machine noise hits all
methods alike), after warm-up, with the same seeds in every repeat (every repeat is identical
work, so the spread over repeats is machine noise). The workflow runs it after every run of the
layout is trained, with all of the job's cores (`threads: workflow.cores`), so locally nothing
else runs beside it; on SLURM it is one job with its own allocation (see docs/architecture.md).

For each method of the layout (one trained run per method: the first seed of the study that
has a checkpoint), using the shared loops of harness.metrics.bench:

* training (`interleaved_train`): the method rebuilt from the checkpoint's config and method
  options at the study's size and max_len, with the trained (non-EMA) weights and a fresh AdamW
  (the study's lr, betas, weight decay), takes `warmup` untimed and `train_repeats` timed steps
  (loss + backward + gradient clipping as in training + AdamW step; `train.accumulate`
  micro-batches per step, bf16 autocast as `train.precision` says) on ONE batch of the study's
  prepared train data at `train.batch_size` (the same clean sequences for every method), with
  torch.manual_seed(seed) before every step. Reported: s/step, clean tokens/s, the per-repeat
  ratio of s/step to the layout's reference method (did for varlen, did-fixed for fixed;
  `report.reference` overrides), DID's share of the step spent in its DP (loss stat
  dp_seconds), FLOPs per token (method.flops_per_token) and peak GPU memory (CUDA only).
* sampling (`interleaved_sample`): the run's EMA weights (harness.run.recipe.load_run), `warmup`
  untimed calls at the smallest steps value, then per steps value of evaluate.samples.steps
  `repeats` rounds of one call of `sample(n, steps)` per method, each with a generator seeded
  with `seed`. Reported: s/sample, s/call, generated content tokens/s, NFE, mean generated
  length and the per-repeat ratio of s/sample to the reference method.

Every statistic is {min, median, max} over the repeats; the raw per-repeat seconds are kept
too. The file is a result file (`didbench.result/1`, kind "cost"); `values` is documented in
docs/architecture.md.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from harness.core.config import load_config, study_runs
from harness.core.methods import UserError
from harness.core.records import provenance, write_result
from harness.core.runtime import pick_device
from harness.core.settings import CostSettings, EvaluateSettings, SamplesSettings, TrainSettings
from harness.data.batches import batch_indices
from harness.data.manifest import load_manifest, load_tokenizer
from harness.data.storage import load_split
from harness.metrics import bench, timing
from harness.metrics.common import steps_list
from harness.run.recipe import build_method, load_checkpoint, load_run


def chosen_runs(config: dict, study_dir: str, layout: str) -> tuple[list[dict], list[str]]:
    """One run per method of `layout` (config order; the first seed with a checkpoint), and the
    methods of that layout that have no trained checkpoint at all."""
    runs = [r for r in study_runs(config) if r["layout"] == layout]
    if not runs:
        raise UserError(f"the study {config.get('study')!r} has no {layout} runs")
    chosen: dict[str, dict] = {}
    for r in runs:
        path = os.path.join(study_dir, "runs", r["name"], "checkpoint.pt")
        if r["method"] not in chosen and os.path.exists(path):
            chosen[r["method"]] = {**r, "dir": os.path.dirname(path)}
    missing = sorted({r["method"] for r in runs} - set(chosen))
    if not chosen:
        raise UserError(f"no trained {layout} run under {os.path.join(study_dir, 'runs')} (train the study first)")
    return list(chosen.values()), missing


def _train_models(chosen: list[dict], data_dir: str, device: torch.device, settings) -> dict:
    """{method: (model in train mode with the trained weights, AdamW)} built from each checkpoint."""

    manifest = load_manifest(data_dir)
    vocab = load_tokenizer(data_dir).vocab
    models = {}
    for r in chosen:
        state = load_checkpoint(os.path.join(r["dir"], "checkpoint.pt"))
        info = state["info"]
        model = build_method(state["config"], info["method"], info["layout"], manifest, vocab, settings.dropout,
                             options=info.get("options"))
        model.load_state_dict(state["model"])
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=1e-8)
        models[r["method"]] = (model, opt)
    return models


def measure_train(ts: TrainSettings, chosen: list[dict], data_dir: str, layout: str, device: torch.device,
                  s: CostSettings, reference: str) -> dict:
    """Every chosen run's training step timed interleaved on one batch, under the study's `train:`."""
    use_bf16 = ts.precision == "bf16" or (ts.precision == "auto" and device.type == "cuda")
    split = load_split(data_dir, "train", layout)
    if len(split) < ts.batch_size:
        raise UserError(f"the {layout} train split has {len(split)} sequences, fewer than train.batch_size={ts.batch_size}")
    idx = batch_indices(len(split), ts.batch_size, s.seed, 0)
    accumulate = max(1, int(ts.accumulate))
    batch = split.batch(idx).to(device)
    micro = [split.batch(idx[i::accumulate]).to(device) for i in range(accumulate)] if accumulate > 1 else batch
    models = _train_models(chosen, data_dir, device, ts)
    timings = timing.interleaved_train(models, micro, device=device, use_bf16=use_bf16, warmup=s.warmup,
                                     repeats=s.train_repeats, seed=s.seed, grad_clip=ts.grad_clip)
    ref_times = timings[reference]["times"] if reference in timings else None
    rows = []
    for r in chosen:
        model = models[r["method"]][0]
        t = bench.train_row(r["method"], timings[r["method"]], ref_times, batch.clean_tokens())
        rows.append({"method": r["method"], "run": r["name"], "size": r["size"],
                     "params": sum(p.numel() for p in model.parameters()),
                     "s_per_step": t["s_per_step"], "tokens_per_s": t["tokens_per_s"], "ratio": t["ratio"],
                     "dp_seconds": t.get("dp_seconds"), "dp_fraction": t.get("dp_fraction"),
                     "flops_per_token": float(model.flops_per_token(batch)), "peak_mem_mb": t["peak_mem_mb"],
                     "times": timings[r["method"]]["times"]})
    del models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"batch_size": ts.batch_size, "accumulate": accumulate, "clean_tokens": batch.clean_tokens(),
            "max_len": int(batch.x0.shape[1]), "precision": "bf16" if use_bf16 else "float32",
            "grad_clip": ts.grad_clip, "repeats": s.train_repeats, "warmup": s.warmup, "rows": rows}


def measure_sample(samples: SamplesSettings, chosen: list[dict], data_dir: str, device: torch.device,
                   s: CostSettings, reference: str) -> dict:
    """Every chosen run's sampler timed interleaved, at each of the study's sampling steps."""
    steps = steps_list(samples.steps)
    top_p = float(samples.top_p)
    n = s.n
    loaded = {r["method"]: load_run(r["dir"], data_dir=data_dir, device=device, ema=True).method for r in chosen}
    timings = timing.interleaved_sample(loaded, steps, n=n, warmup=s.warmup, repeats=s.repeats, seed=s.seed,
                                      top_p=top_p)
    rows = []
    for k in steps:
        ref = timings.get((reference, k))
        for r in chosen:
            t = timings[(r["method"], k)]
            rows.append({"method": r["method"], "run": r["name"], "size": r["size"], "steps": k, "n": n,
                         "s_per_sample": timing.summary([x / n for x in t["times"]]),
                         "s_per_call": timing.summary(t["times"]),
                         "gen_tokens_per_s": timing.summary([c / x for c, x in zip(t["content_tokens"], t["times"])]),
                         "nfe": timing.summary(t["nfe"]), "mean_length": timing.summary(t["mean_length"]),
                         "ratio": timing.ratio_summary(t["times"], ref["times"]) if ref else None,
                         "flops_per_sample": t["flops"] / n,
                         "flops_per_gen_token": t["flops"] / t["flops_content_tokens"] if t["flops_content_tokens"]
                         else None,
                         "peak_mem_mb": t["peak_mem_mb"], "times": t["times"]})
    del loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"n": n, "steps": steps, "top_p": top_p, "repeats": s.repeats, "warmup": s.warmup, "rows": rows}


def run(args) -> dict:

    t_start = time.perf_counter()
    config = load_config(args.config)
    if args.threads:
        torch.set_num_threads(int(args.threads))
    ev = EvaluateSettings.of(config)
    s = ev.cost
    if s.repeats < 1 or s.train_repeats < 1:
        raise UserError("evaluate.cost.repeats and train_repeats must be >= 1")
    layout = args.layout
    data_dir = args.data or os.path.join(args.study_dir, "data")
    if not os.path.exists(os.path.join(data_dir, "manifest.json")):
        raise UserError(f"no prepared data in {data_dir} (run `python -m harness prepare` first)")
    device = torch.device(pick_device(args.device))
    reference = timing.reference_method(layout)
    chosen, missing = chosen_runs(config, args.study_dir, layout)
    names = [r["method"] for r in chosen]
    print(f"cost {layout}: {', '.join(names)} on {bench.machine_description(device)}, {torch.get_num_threads()} threads"
          + (f"; no checkpoint for {', '.join(missing)}" if missing else ""), flush=True)
    train = measure_train(TrainSettings.of(config), chosen, data_dir, layout, device, s, reference)
    sample = measure_sample(ev.samples, chosen, data_dir, device, s, reference)
    values = {"layout": layout, "size": config.get("size"), "reference": reference if reference in names else None,
              "methods": names, "missing": missing, "device": bench.machine_description(device),
              "threads": torch.get_num_threads(), "train": train, "sample": sample,
              "wall_seconds": round(time.perf_counter() - t_start, 3)}
    settings_out = {**s.as_dict(), "device": str(device), "threads": torch.get_num_threads(),
                    "train_batch_size": train["batch_size"], "accumulate": train["accumulate"],
                    "precision": train["precision"], "grad_clip": train["grad_clip"],
                    "steps": sample["steps"], "top_p": sample["top_p"]}
    header = provenance(config, {"layout": layout, "size": config.get("size")}, device)
    write_result(args.out, "cost", header, settings_out, values)
    _print(values)
    print(f"cost {layout}: {values['wall_seconds']:.1f} s -> {args.out}", flush=True)
    return values


def _print(values: dict) -> None:
    def med(d, f=".4f"):
        return "-" if not d else format(d["median"], f)

    def rng(d):
        return "-" if not d else f"{d['min']:.2f}/{d['median']:.2f}/{d['max']:.2f}"

    print(f"{'method':>10} {'s/step':>9} {'tok/s':>9} {'x ref (min/med/max)':>20} {'DP share':>9}")
    for r in values["train"]["rows"]:
        dp = f"{r['dp_fraction']['median']:.1%}" if r.get("dp_fraction") else "-"
        print(f"{r['method']:>10} {med(r['s_per_step']):>9} {med(r['tokens_per_s'], '.0f'):>9} "
              f"{rng(r['ratio']):>20} {dp:>9}")
    print(f"{'method':>10} {'steps':>6} {'s/sample':>9} {'gen tok/s':>9} {'NFE':>6} {'length':>7} {'x ref':>20}")
    for r in values["sample"]["rows"]:
        print(f"{r['method']:>10} {r['steps']:>6} {med(r['s_per_sample']):>9} {med(r['gen_tokens_per_s'], '.0f'):>9} "
              f"{med(r['nfe'], '.0f'):>6} {med(r['mean_length'], '.1f'):>7} {rng(r['ratio']):>20}")


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m harness cost", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the study config")
    p.add_argument("--study-dir", required=True, help="results/<study> (its runs/ and data/ are read)")
    p.add_argument("--layout", required=True, choices=["fixed", "varlen"],
                   help="the layout whose trained runs are timed (one run per method of that layout)")
    p.add_argument("--out", required=True, help="the result file, e.g. results/<study>/cost/<layout>.json")
    p.add_argument("--data", default=None, help="prepared data directory (default: <study-dir>/data)")
    p.add_argument("--device", default="auto", help="auto (cuda when visible, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, i.e. OMP_NUM_THREADS)")
    return p
