"""Cost benchmark: DID vs the baselines side by side, interleaved in one process.

`python -m harness bench train` times full training steps (loss, backward, AdamW step) of each
method on IDENTICAL clean data (the same sequences every repeat), methods interleaved within
each repeat so that machine noise hits all of them alike, after warm-up. The global RNG is
reseeded with the same seed before every timed step, so every repeat does the same work. It
prints s/step, clean tokens/s, peak memory and each method's step time relative to DID with
min/median/max over repeats, and writes the rows as JSON (plotted by
`analysis.figures.bench_figure`).

`python -m harness bench sample` times sampling (float64 probabilities included) of trained runs
of a study at several step counts: seconds per sample, generated tokens/s and NFE, with a
generator seeded identically for every repeat and method.

The two timing loops, `interleaved_train` and `interleaved_sample`, are also what the study's
cost job (`python -m harness cost`, harness/cost.py) runs on a study's trained checkpoints.

Ratios are `method s/step / DID s/step` (> 1 means DID is faster), per repeat, measured in one run.
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


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _own_bytes(model, optimizer=None) -> int:
    """Bytes held by one method between steps: parameters, gradients, optimizer state."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")


def _alone_peak_mb(device: torch.device, before: int, own: int) -> float | None:
    """Peak GPU memory of a call as if its method were alone on the device: the peak above what
    was allocated before the call (every method's weights are resident together) plus what the
    method itself held before it. None on CPU (process RSS is monotone: no per-method peak)."""
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(device) - before + own) / 2**20, 1)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def summary(values) -> dict | None:
    """{min, median, max} of a list of numbers (None for an empty list)."""
    values = [float(v) for v in values]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


_summary = summary  # the old private name


def ratio_summary(values, reference) -> dict | None:
    """{min, median, max} of the per-repeat ratios values[i] / reference[i] (repeat by repeat)."""
    pairs = [(a, b) for a, b in zip(values, reference) if b]
    return summary([a / b for a, b in pairs]) if pairs and len(pairs) == len(values) else None


def reference_method(layout: str, config: dict | None = None) -> str:
    """The ratio denominator of a layout: did (varlen), did-fixed (fixed), or `report.reference`
    of the config (the same override as analysis.tables.reference_methods)."""
    override = ((config or {}).get("report") or {}).get("reference") or {}
    return override.get(layout, REFERENCE.get(layout, ""))


# --- the interleaved timing loops (shared by `bench train|sample` and `harness cost`) -----------
def train_step(model, optimizer, batch, device: torch.device, use_bf16: bool, grad_clip: float = 0.0) -> dict:
    """One training step: loss, backward, (gradient clipping,) AdamW step; returns the loss stats.

    `batch` is a Batch, or a list of micro-batches (gradient accumulation as in harness.train:
    each micro-batch's loss / len(list) is backpropagated, then one optimizer step); the stats
    are then summed over micro-batches for `*_seconds` keys and averaged for the others.
    """
    parts = batch if isinstance(batch, (list, tuple)) else [batch]
    optimizer.zero_grad(set_to_none=True)
    stats: dict = {}
    for part in parts:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, st = model.loss(part)
        (loss / len(parts)).backward()
        for k, v in st.items():
            w = 1.0 if k.endswith("_seconds") else 1.0 / len(parts)
            stats[k] = stats.get(k, 0.0) + float(v) * w
    if grad_clip and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return stats


_train_step = train_step


def interleaved_train(models: dict, batch, *, device: torch.device, use_bf16: bool, warmup: int,
                      repeats: int, seed: int, grad_clip: float = 0.0) -> dict[str, dict]:
    """Time training steps of several methods on the same batch, methods interleaved per repeat.

    `models` maps a name to (model, optimizer). Each model first takes `warmup` untimed steps;
    then in each of `repeats` rounds every model takes one timed step, in order. The global RNG
    is reseeded with `seed` before every step, so every method and every round draws the same
    noise (t, deletions, masks): each round repeats the same work and the spread over rounds is
    machine noise. Returns {name: {"times": [s per round], "dp_seconds": [...] (when the loss
    stats have it), "peak_mem_mb": max over rounds of the step's peak GPU memory as if the method
    were alone on the device (see _alone_peak_mb; None on CPU)}}.
    """
    for model, opt in models.values():
        for _ in range(int(warmup)):
            torch.manual_seed(seed)
            train_step(model, opt, batch, device, use_bf16, grad_clip)
    out = {name: {"times": [], "dp_seconds": [], "peak_mem_mb": None} for name in models}
    for _ in range(int(repeats)):
        for name, (model, opt) in models.items():
            _sync(device)
            _reset_peak(device)
            before, own = _allocated(device), _own_bytes(model, opt) if device.type == "cuda" else 0
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            stats = train_step(model, opt, batch, device, use_bf16, grad_clip)
            _sync(device)
            out[name]["times"].append(time.perf_counter() - t0)
            if "dp_seconds" in stats:
                out[name]["dp_seconds"].append(float(stats["dp_seconds"]))
            out[name]["peak_mem_mb"] = _max(out[name]["peak_mem_mb"], _alone_peak_mb(device, before, own))
    return out


def interleaved_sample(samplers: dict, steps: list[int], *, n: int, warmup: int, repeats: int, seed: int,
                       top_p: float = 1.0) -> dict[tuple[str, int], dict]:
    """Time `sample(n, k)` of several methods at each k of `steps`, methods interleaved per repeat.

    `samplers` maps a name to a Method (in eval mode). Each method first makes `warmup` untimed
    calls at the smallest k. Then, per k, in each of `repeats` rounds every method makes one
    timed call with a generator freshly seeded with `seed` (the same seed for every round and
    every method, so the rounds are identical work). Returns {(name, k): {"times": [s per call],
    "nfe": [...], "mean_length": [...], "content_tokens": [...], "peak_mem_mb"}} where the
    content tokens of a sample are its generated ids that are not BOS/EOS/PAD/MASK (the length
    `evaluate samples` reports), mean_length their mean over the call's samples.
    """
    def call(method, k):
        gen = torch.Generator(device=method.device).manual_seed(int(seed))
        return method.sample(int(n), int(k), generator=gen, top_p=top_p)

    for method in samplers.values():
        for _ in range(int(warmup)):
            call(method, min(steps))
    out = {}
    for k in steps:
        for _ in range(int(repeats)):
            for name, method in samplers.items():
                device = method.device
                _sync(device)
                _reset_peak(device)
                before, own = _allocated(device), _own_bytes(method) if device.type == "cuda" else 0
                t0 = time.perf_counter()
                res = call(method, k)
                _sync(device)
                dt = time.perf_counter() - t0
                specials = set(method.vocab.specials)
                lengths = [sum(1 for t in ids if int(t) not in specials) for ids in res.tokens]
                e = out.setdefault((name, k), {"times": [], "nfe": [], "mean_length": [], "content_tokens": [],
                                              "peak_mem_mb": None})
                e["times"].append(dt)
                e["nfe"].append(int(res.nfe))
                e["mean_length"].append(statistics.mean(lengths) if lengths else 0.0)
                e["content_tokens"].append(sum(lengths))
                e["peak_mem_mb"] = _max(e["peak_mem_mb"], _alone_peak_mb(device, before, own))
    return out


# --- `bench train` / `bench sample` ---------------------------------------------------------------
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


def train_row(name: str, timing: dict, ref_times: list[float] | None, clean_tokens: int) -> dict:
    """The per-method numbers of `interleaved_train`: s/step, tokens/s, ratio, DP share."""
    times = timing["times"]
    row = {"s_per_step": summary(times), "tokens_per_s": summary([clean_tokens / t for t in times]),
           "ratio": ratio_summary(times, ref_times) if ref_times else None, "peak_mem_mb": timing["peak_mem_mb"]}
    dp = timing.get("dp_seconds") or []
    if dp:
        row["dp_seconds"] = summary(dp)
        row["dp_fraction"] = summary([a / b for a, b in zip(dp, times)])
    return row


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
        timing = interleaved_train(models, batch, device=device, use_bf16=use_bf16, warmup=args.warmup,
                                   repeats=args.repeats, seed=args.seed)
        ref = reference_method(layout) if reference_method(layout) in timing else names[0]
        for n in names:
            t = train_row(n, timing[n], timing[ref]["times"], batch.clean_tokens())
            row = {
                "method": n,
                "layout": layout,
                "size": size,
                "seq_len": max_len,
                "batch_size": B,
                "clean_tokens": batch.clean_tokens(),
                "s_per_step": t["s_per_step"],
                "tokens_per_s": t["tokens_per_s"],
                "ratio_to_did": t["ratio"],
                "reference": ref,
                "peak_mem_mb": t["peak_mem_mb"],
                "params": sum(p.numel() for p in models[n][0].parameters()),
            }
            if "dp_seconds" in t:
                row["dp_seconds"] = t["dp_seconds"]
                row["dp_fraction_of_step"] = t["dp_fraction"]
            rows.append(row)
        _print_table([r for r in rows if r["size"] == size and r["layout"] == layout and r["seq_len"] == max_len])
        del models
    return {"kind": "bench-train", "device": _device_name(device), "precision": "bf16" if use_bf16 else "float32",
            "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed, "threads": torch.get_num_threads(),
            "rows": rows}


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
    timing = interleaved_sample({run.info["run"]: run.method for run in loaded}, args.steps, n=args.n,
                                warmup=args.warmup, repeats=args.repeats, seed=args.seed)
    for steps in args.steps:
        for run in loaded:
            name, layout = run.info["run"], run.info["layout"]
            ref = next((x.info["run"] for x in loaded
                        if x.info["method"] == reference_method(layout) and x.info["layout"] == layout), None)
            t = timing[(name, steps)]
            row = {"run": name, "method": run.info["method"], "layout": layout, "steps": steps, "n": args.n,
                   "s_per_sample": summary([s / args.n for s in t["times"]]),
                   "gen_tokens_per_s": summary([c / s for c, s in zip(t["content_tokens"], t["times"])]),
                   "nfe": statistics.median(t["nfe"]), "mean_length": statistics.mean(t["mean_length"]),
                   "peak_mem_mb": t["peak_mem_mb"]}
            if ref:
                row["ratio_to_did"] = ratio_summary(t["times"], timing[(ref, steps)]["times"])
                row["reference"] = ref
            rows.append(row)
            q = row.get("ratio_to_did") or {"median": float("nan")}
            print(f"{name:>22} steps={steps:<5} s/sample={row['s_per_sample']['median']:.4f} NFE={row['nfe']:<6} "
                  f"len={row['mean_length']:.1f} x DID={q['median']:.2f}", flush=True)
    return {"kind": "bench-sample", "device": _device_name(device), "repeats": args.repeats, "warmup": args.warmup,
            "seed": args.seed, "threads": torch.get_num_threads(), "rows": rows}


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
    t.add_argument("--seed", type=int, default=0, help="global RNG seed before every timed step (same work every repeat)")
    t.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--out", default=None)
    s = sub.add_parser("sample", help="sampling cost of a study's trained runs at several step counts")
    s.add_argument("--study-dir", default="results/default")
    s.add_argument("--steps", nargs="+", type=int, default=[16, 64])
    s.add_argument("--n", type=int, default=16)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--seed", type=int, default=0, help="generator seed of every timed call (same work every repeat)")
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
