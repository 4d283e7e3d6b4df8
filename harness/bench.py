"""Cost benchmark: DID vs the baselines side by side, interleaved in one process.

`python -m harness bench train` times full training steps (loss, backward, AdamW step) of each
method on IDENTICAL clean data (the same sequences every repeat), methods interleaved within
each repeat so that machine noise hits all of them alike, after warm-up. It prints s/step,
clean tokens/s, peak memory and each method's step time relative to DID with min/median/max over
repeats, and writes the rows as JSON (plotted by `analysis.figures.bench_figure`).

`python -m harness bench sample` times sampling (float64 probabilities included) of trained runs
of a study at several step counts: seconds per sample and NFE.

Ratios are `method s/step / DID s/step` (> 1 means DID is faster), measured in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from harness import data as data_lib
from harness import methods
from harness.batch import Batch, Vocab
from harness.methods import UserError

FIXED_METHODS = ["did-fixed", "radd", "mdlm", "ar"]
VARLEN_METHODS = ["did", "radd", "mdlm", "ilm", "ar"]
REFERENCE = {"fixed": "did-fixed", "varlen": "did"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return None  # no per-method peak on CPU (process RSS is monotone); reported as null


def _summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def fixed_batches(data_dir: str, seq_len: int, batch_size: int, vocab: Vocab) -> Batch:
    """Rows of exactly seq_len tokens ([BOS] + seq_len-1) re-chunked from the prepared train stream."""
    rows = data_lib.load_split(data_dir, "train", "fixed")
    stream = rows.batch(list(range(len(rows)))).x0[:, 1:].reshape(-1)
    need = batch_size * (seq_len - 1)
    if stream.numel() < need:
        raise UserError(f"the train split has {stream.numel()} tokens, fewer than {need} needed for B={batch_size}, L={seq_len}")
    body = stream[:need].view(batch_size, seq_len - 1)
    x0 = torch.cat([torch.full((batch_size, 1), vocab.bos, dtype=torch.long), body], 1)
    return Batch(x0, torch.full((batch_size,), seq_len, dtype=torch.long), "fixed")


def varlen_batch(data_dir: str, batch_size: int, seed: int = 0) -> Batch:
    """A fixed random draw of natural documents of the default corpus (same for every method)."""
    docs = data_lib.load_split(data_dir, "train", "varlen")
    idx = data_lib.batch_indices(len(docs), batch_size, seed, 0)
    return docs.batch(idx)


def _train_step(model, optimizer, batch, device, use_bf16) -> dict:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        loss, stats = model.loss(batch)
    loss.backward()
    optimizer.step()
    return stats


def bench_train(args) -> dict:
    device = torch.device(args.device)
    use_bf16 = device.type == "cuda" and not args.fp32
    tokenizer = data_lib.load_tokenizer(args.data)
    vocab = tokenizer.vocab
    rows = []
    cases = []
    for size in args.sizes:
        for L in args.fixed_lengths:
            cases.append((size, "fixed", L))
        if args.varlen:
            cases.append((size, "varlen", None))
    for size, layout, L in cases:
        names = [m for m in (args.methods or (FIXED_METHODS if layout == "fixed" else VARLEN_METHODS))]
        names = [m for m in names if layout in methods.get(m).layouts]
        B = _batch_size(args, size, layout, L)
        batch = fixed_batches(args.data, L, B, vocab) if layout == "fixed" else varlen_batch(args.data, B)
        max_len = L if layout == "fixed" else int(data_lib.load_split(args.data, "train", "varlen").max_len)
        batch = batch.to(device)
        print(f"\n[{size} {layout} L={max_len} B={B}: {batch.clean_tokens()} clean tokens per step]", flush=True)
        models = {}
        for name in names:
            torch.manual_seed(0)
            model = methods.build(name, vocab, size, layout, max_len).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            models[name] = (model, opt)
        times = {n: [] for n in names}
        dp = {n: [] for n in names}
        for n, (model, opt) in models.items():  # warm-up (allocator, kernels, caches)
            for _ in range(args.warmup):
                _train_step(model, opt, batch, device, use_bf16)
        for r in range(args.repeats):
            for n, (model, opt) in models.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                torch.manual_seed(1000 + r)  # same noise draw per repeat for every method
                _sync(device)
                t0 = time.perf_counter()
                stats = _train_step(model, opt, batch, device, use_bf16)
                _sync(device)
                times[n].append(time.perf_counter() - t0)
                if "dp_seconds" in stats:
                    dp[n].append(float(stats["dp_seconds"]))
        ref = REFERENCE[layout] if REFERENCE[layout] in times else names[0]
        for n in names:
            ratio = [t / d for t, d in zip(times[n], times[ref])]
            row = {
                "method": n,
                "layout": layout,
                "size": size,
                "seq_len": max_len,
                "batch_size": B,
                "clean_tokens": batch.clean_tokens(),
                "s_per_step": _summary(times[n]),
                "tokens_per_s": _summary([batch.clean_tokens() / t for t in times[n]]),
                "ratio_to_did": _summary(ratio),
                "reference": ref,
                "peak_mem_mb": _peak_mb(device),
                "params": sum(p.numel() for p in models[n][0].parameters()),
            }
            if dp[n]:
                row["dp_seconds"] = _summary(dp[n])
                row["dp_fraction_of_step"] = _summary([a / b for a, b in zip(dp[n], times[n])])
            rows.append(row)
        _print_table([r for r in rows if r["size"] == size and r["layout"] == layout and r["seq_len"] == max_len])
        del models
    return {"kind": "bench-train", "device": _device_name(device), "precision": "bf16" if use_bf16 else "float32",
            "warmup": args.warmup, "repeats": args.repeats, "threads": torch.get_num_threads(), "rows": rows}


def _batch_size(args, size: str, layout: str, L: int | None) -> int:
    if args.batch_size:
        return args.batch_size
    if layout == "varlen":
        return 32 if size == "tiny" else 8
    tokens = 4096 if size == "tiny" else 2048  # CPU-friendly defaults; the GPU script sets --batch-size
    return max(1, tokens // L)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _print_table(rows: list[dict]) -> None:
    print(f"{'method':>10} {'s/step (med)':>13} {'min':>8} {'max':>8} {'tok/s':>10} {'x DID (min/med/max)':>22} {'DP share':>9} {'peak MB':>8}")
    for r in rows:
        s, q = r["s_per_step"], r["ratio_to_did"]
        dp = f"{r['dp_fraction_of_step']['median']:.1%}" if "dp_fraction_of_step" in r else "-"
        mem = r["peak_mem_mb"] if r["peak_mem_mb"] is not None else "-"
        print(
            f"{r['method']:>10} {s['median']:13.4f} {s['min']:8.4f} {s['max']:8.4f} {r['tokens_per_s']['median']:10.0f} "
            f"{q['min']:6.2f} / {q['median']:5.2f} / {q['max']:5.2f} {dp:>9} {mem:>8}"
        )


def bench_sample(args) -> dict:
    from harness.runs import load_run

    device = torch.device(args.device)
    runs_dir = os.path.join(args.study_dir, "runs")
    if not os.path.isdir(runs_dir):
        raise UserError(f"no trained runs under {runs_dir}: run the study first (make study)")
    rows = []
    loaded = []
    for name in sorted(os.listdir(runs_dir)):
        if not os.path.exists(os.path.join(runs_dir, name, "checkpoint.pt")):
            continue
        run = load_run(os.path.join(runs_dir, name), device=device)
        if args.methods and run.info["method"] not in args.methods:
            continue
        loaded.append(run)
    if not loaded:
        raise UserError(f"no trained runs found under {runs_dir}")
    for steps in args.steps:
        per = {}
        for run in loaded:  # warm-up
            run.method.sample(args.n, steps, generator=torch.Generator().manual_seed(0))
        for r in range(args.repeats):
            for run in loaded:
                gen = torch.Generator().manual_seed(r)
                _sync(device)
                t0 = time.perf_counter()
                out = run.method.sample(args.n, steps, generator=gen)
                _sync(device)
                per.setdefault(run.info["run"], []).append((time.perf_counter() - t0, out.nfe, out))
        for run in loaded:
            name, layout = run.info["run"], run.info["layout"]
            ref = next((x.info["run"] for x in loaded if x.info["method"] == REFERENCE[layout] and x.info["layout"] == layout), None)
            secs = [t / args.n for t, _, _ in per[name]]
            row = {"run": name, "method": run.info["method"], "layout": layout, "steps": steps, "n": args.n,
                   "s_per_sample": _summary(secs), "nfe": statistics.median([nfe for _, nfe, _ in per[name]]),
                   "mean_length": statistics.mean(len(t) for _, _, o in per[name] for t in o.tokens)}
            if ref:
                row["ratio_to_did"] = _summary([a / b for (a, _, _), (b, _, _) in zip(per[name], per[ref])])
                row["reference"] = ref
            rows.append(row)
            q = row.get("ratio_to_did", {"median": float("nan")})
            print(f"{name:>22} steps={steps:<5} s/sample={row['s_per_sample']['median']:.4f} NFE={row['nfe']:<6} "
                  f"len={row['mean_length']:.1f} x DID={q['median']:.2f}", flush=True)
    return {"kind": "bench-sample", "device": _device_name(device), "repeats": args.repeats, "rows": rows}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m harness bench")
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="training step cost, methods interleaved on identical data")
    t.add_argument("--data", default="results/default/data", help="a prepared data directory (make study / harness prepare)")
    t.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    t.add_argument("--fixed-lengths", nargs="*", type=int, default=[128, 1024])
    t.add_argument("--no-varlen", dest="varlen", action="store_false")
    t.add_argument("--methods", nargs="*", default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--out", default=None)
    s = sub.add_parser("sample", help="sampling cost of a study's trained runs at several step counts")
    s.add_argument("--study-dir", default="results/default")
    s.add_argument("--steps", nargs="+", type=int, default=[16, 64])
    s.add_argument("--n", type=int, default=16)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--methods", nargs="*", default=None)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.what == "train" and not os.path.exists(os.path.join(args.data, "manifest.json")):
        raise UserError(f"no prepared data in {args.data}: run `python -m harness prepare --config config/default.yaml --out {args.data}`")
    result = bench_train(args) if args.what == "train" else bench_sample(args)
    result["argv"] = argv
    if args.out:
        from harness.train import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
