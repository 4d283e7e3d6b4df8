"""Packed-attention benchmark: the strategies of harness.core.attention on DID-like length mixes.

`python -m harness bench attention` draws, per case (L, B), the lengths DID's network sees at
fixed length L (each row keeps a Binomial(L - 1, 1 - t) share of its tokens plus BOS, t ~ U(0, 1),
seeded), and times forward + backward of attention alone for each strategy, interleaved over
repeats (median):

* `split`    : one SDPA call per sequence (the CPU default),
* `bucketed` : length buckets padded to their longest row, with a mask (the previous default),
* `padded`   : one dense call on [B, max n] with a key-padding mask (what a padded batch costs),
* `dense@L`  : one dense call on [B, L] without a mask (what RADD/MDLM pay at fixed length),
* `packed`   : (CUDA only) `packed_attention` itself, i.e. the varlen kernel.

Next to each it prints the kernel efficiency: (useful FLOPs / s) / (FLOPs / s of `dense@L`),
where useful FLOPs are 4 * H * hd * sum n_i^2 (QK^T and AV, forward; the backward is timed too
but counted at the same ratio). 1.0 means the strategy runs the useful work as fast as the dense
kernel runs its own: that is the physical limit on this machine; the ratio `dense@L / split` is
the attention speed-up DID can get from its shorter sequences.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from harness.core import attention
from harness.core.atomic import atomic_write_text
from harness.core.backbone import backbone_config


def did_like_lengths(L: int, B: int, seed: int) -> torch.Tensor:
    """Per-row network lengths at fixed length L: BOS + Binomial(L - 1, 1 - t), t ~ U(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(B, generator=gen, dtype=torch.float64)
    kept = torch.binomial(torch.full((B,), float(L - 1), dtype=torch.float64), 1 - t, generator=gen)
    return (kept + 1).to(torch.long)


def _padded(q, k, v, lengths, causal=False):
    """One call on [B, max n] with a key-padding mask (causal adds the triangle)."""
    B, width = len(lengths), int(lengths.max())
    starts = torch.cumsum(lengths, 0) - lengths
    offs = torch.arange(width, device=q.device)
    valid = offs[None, :] < lengths[:, None]
    idx = torch.where(valid, starts[:, None] + offs[None, :], starts[:, None])
    qb, kb, vb = (t[idx].transpose(1, 2) for t in (q, k, v))
    mask = valid[:, None, None, :]
    if causal:
        mask = mask & torch.ones(width, width, dtype=torch.bool, device=q.device).tril()[None, None]
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask).transpose(1, 2)
    return out[valid]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, q, k, v, grad) -> float:
    _sync(q.device)
    t0 = time.perf_counter()
    out = fn(q, k, v)
    torch.autograd.grad(out, (q, k, v), grad[: out.shape[0]])
    _sync(q.device)
    return time.perf_counter() - t0


def bench_case(L: int, B: int, heads: int, head_dim: int, causal: bool, repeats: int, seed: int,
               device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    lengths = did_like_lengths(L, B, seed).to(device)
    T = int(lengths.sum())
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = (randn(T, heads, head_dim).requires_grad_() for _ in range(3))
    qd, kd, vd = (randn(B * L, heads, head_dim).requires_grad_() for _ in range(3))
    grad, grad_dense = randn(T, heads, head_dim), randn(B * L, heads, head_dim)
    fns = {
        "split": lambda a, b, c: attention.split_attention(a, b, c, lengths, causal),
        "bucketed": lambda a, b, c: attention.bucketed_attention(a, b, c, lengths, causal),
        "padded": lambda a, b, c: _padded(a, b, c, lengths, causal),
    }
    if lengths.is_cuda:  # the default path there is a varlen kernel (harness.core.attention._gpu_varlen)
        fns["packed"] = lambda a, b, c: attention.packed_attention(a, b, c, lengths, causal)
    times: dict[str, list[float]] = {name: [] for name in [*fns, "dense@L"]}
    for r in range(repeats + 1):  # the first round warms up
        for name, fn in fns.items():
            dt = _time(fn, q, k, v, grad)
            if r:
                times[name].append(dt)
        dt = _time(lambda a, b, c: attention.dense_attention(a, b, c, B, causal), qd, kd, vd, grad_dense)
        if r:
            times["dense@L"].append(dt)
    useful = 4.0 * heads * head_dim * float((lengths.double() ** 2).sum())
    dense = 4.0 * heads * head_dim * B * L * L
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rate = dense / med["dense@L"]
    return {
        "L": L, "B": B, "heads": heads, "head_dim": head_dim, "causal": causal, "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "kept_fraction": float(lengths.sum()) / (B * L), "lengths": lengths.tolist(),
        "seconds": {name: summary_of(ts) for name, ts in times.items()},
        "efficiency": {name: (useful if name != "dense@L" else dense) / med[name] / rate for name in med},
        "speedup_vs_dense": {name: med["dense@L"] / med[name] for name in fns},
    }


def summary_of(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness bench attention",
                                description="Time the packed-attention strategies on DID-like length mixes "
                                            "(forward + backward, interleaved, median of --repeats).")
    p.add_argument("--cases", nargs="+", default=["1024x4", "1024x8", "128x32"],
                   help="LxB pairs: fixed length L and batch size B (default: %(default)s)")
    p.add_argument("--size", default="tiny", help="the backbone size whose heads and head dim are used (default: tiny)")
    p.add_argument("--causal", action="store_true", help="causal attention (AR) instead of bidirectional")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the lengths and the inputs (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 on CPU, bfloat16 on CUDA (where the varlen kernels need half precision)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    cfg = backbone_config(args.size)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    rows = []
    names = ["split", "bucketed", "padded", "dense@L"] + (["packed"] if args.device.startswith("cuda") else [])
    print(f"{'case':>10} {'kept':>6} " + " ".join(f"{n + ' ms':>12}" for n in names)
          + f" {'eff split':>10} {'eff bucket':>10} {'dense/split':>12}")
    for case in args.cases:
        L, B = (int(x) for x in case.lower().split("x"))
        row = bench_case(L, B, cfg.n_heads, cfg.head_dim, args.causal, args.repeats, args.seed, args.device, dtype)
        rows.append(row)
        s, e = row["seconds"], row["efficiency"]
        print(f"{case:>10} {row['kept_fraction']:6.2f} "
              + " ".join(f"{s[n]['median'] * 1e3:12.1f}" for n in names)
              + f" {e['split']:10.2f} {e['bucketed']:10.2f} {row['speedup_vs_dense']['split']:12.2f}", flush=True)
    print("eff = (useful FLOPs/s) / (FLOPs/s of dense@L): 1.0 is the dense kernel's own rate on this machine")
    if args.out:
        atomic_write_text(args.out, json.dumps({"kind": "bench-attention", "threads": torch.get_num_threads(),
                                                "size": args.size, "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0
