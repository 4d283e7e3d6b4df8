"""How the DP's cost grows with the sequence length, per backend (issue 27): `python -m did.bench_dp`.

For each length L (fixed layout: x0 of L tokens, BOS first) it draws a batch of about `--tokens`
tokens (B = tokens // L sequences), deletes each row at t = 0.5 (the middle of the deletion
schedule: |x_t| ~ L/2), and times the insertion targets of the training path
(`sparse_insertion_targets`, float32 DP, threshold 1e-6) with each available backend of
did.dp_kernels, interleaved over repeats (median). It prints, per L and backend:

* ms per sequence (wall) and the process CPU time beside it (numba runs rows on every core: a
  faster wall time must not hide more CPU), the speed-up over the PyTorch path;
* the DP table's traffic: bytes of the [L, 2, B, L/2] log-count table written per second. The
  recurrence writes every cell once and reads two, so this is the memory-bound limit's unit:
  a kernel near the machine's copy bandwidth (printed first, measured with a large tensor copy)
  has no headroom left.

Every backend's targets are checked against the PyTorch path's on the first repeat.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from did import counting, dp_kernels, process
from harness.core.atomic import atomic_write_text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, mb: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large float32 tensor copy (read + write counted once): the machine's
    memory-bound limit for a kernel that streams a table."""
    src = torch.ones(mb * (1 << 20) // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return src.numel() * 4 / statistics.median(times)


def case(L: int, tokens: int, vocab: int, seed: int, device: torch.device):
    """x0 [B, L] (BOS = 0, content 4..vocab-1), its lengths and a t = 0.5 deletion's keep mask, on `device`."""
    B = max(1, tokens // L)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(4, vocab, (B, L), generator=g)
    x0[:, 0] = 0
    lengths = torch.full((B,), L)
    d = process.delete(x0, lengths, t=torch.full((B,), 0.5, dtype=torch.float64), generator=g)
    return x0.to(device), lengths.to(device), d.keep.to(device)


def time_backend(backend: str, x0, lengths, keep, vocab: int) -> tuple[float, float, counting.SparseTargets]:
    """(wall seconds, process CPU seconds, targets) of one call."""
    _sync(x0.device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = counting.sparse_insertion_targets(x0, keep, lengths, vocab, dp_dtype=torch.float32, threshold=1e-6,
                                            backend=backend)
    _sync(x0.device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def run(lengths: list[int], tokens: int, vocab: int, repeats: int, backends: list[str], seed: int,
        device: torch.device) -> dict:
    bandwidth = copy_bandwidth(device)
    print(f"DP cost per sequence on {device.type} ({torch.get_num_threads()} torch threads; float32 DP, t = 0.5; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s = the memory-bound limit of the table's traffic)")
    print(f"{'L':>6} {'B':>4} {'backend':>8} {'ms/seq':>9} {'cpu ms/seq':>10} {'x torch':>8} {'table GB/s':>10}")
    rows = []
    for L in lengths:
        x0, lens, keep = case(L, tokens, vocab, seed, device)
        B = x0.shape[0]
        for name in backends:                       # warm-up: compile the kernel, fault the pages in
            time_backend(name, x0[:1], lens[:1], keep[:1], vocab)
        wall = {b: [] for b in backends}
        cpu = {b: [] for b in backends}
        for r in range(repeats):
            ref = None
            for name in backends:
                w, c, out = time_backend(name, x0, lens, keep, vocab)
                wall[name].append(w)
                cpu[name].append(c)
                if r == 0:
                    if ref is None:
                        ref = out
                    elif not (torch.equal(out.rows, ref.rows) and torch.equal(out.tokens, ref.tokens)
                              and torch.allclose(out.values, ref.values, rtol=1e-4, atol=1e-6)):
                        raise SystemExit(f"L={L}: backend {name}'s targets differ from {backends[0]}'s")
        n = int(keep.sum(1).max())
        table_bytes = L * 2 * B * (n + 1) * 4
        base = statistics.median(wall[backends[0]])
        for name in backends:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            row = {"L": L, "B": B, "backend": name, "ms_per_seq": 1e3 * w / B, "cpu_ms_per_seq": 1e3 * c / B,
                   "speedup_vs_torch": base / w, "table_gb_per_s": table_bytes / w / 1e9, "times": wall[name]}
            rows.append(row)
            print(f"{L:>6} {B:>4} {name:>8} {row['ms_per_seq']:>9.3f} {row['cpu_ms_per_seq']:>10.3f} "
                  f"{row['speedup_vs_torch']:>8.2f} {row['table_gb_per_s']:>10.2f}")
    return {"kind": "bench-dp", "device": str(device), "threads": torch.get_num_threads(), "copy_bandwidth_gb_per_s": bandwidth / 1e9,
            "tokens": tokens,
            "vocab": vocab, "repeats": repeats, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m did.bench_dp", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", nargs="+", type=int, default=[64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per batch (B = tokens // L; default 8192)")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default: the default study's 2048)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", nargs="+", default=None,
                   help="did.dp_kernels backends, the reference first (default: every one available here)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backends or dp_kernels.available(device)
    result = run(args.lengths, args.tokens, args.vocab, args.repeats, backends, args.seed, device)
    if args.out:
        atomic_write_text(args.out, json.dumps({**result, "argv": sys.argv[1:] if argv is None else argv}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
