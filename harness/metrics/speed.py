"""Cost: training throughput from the run's history, inference time and memory per steps.

Training: median tokens/s and s/step over history.csv rows after the first `skip_rows` (the
first logging interval includes start-up and compilation). s/step comes from consecutive rows,
d(wall_time) / d(step).

Inference: per steps setting, `warmup` untimed calls, then `repeats` timed calls of
`method.sample(n, steps)` (synchronised on GPU); s/sample is the median call time / n. Peak
memory: on GPU `torch.cuda.max_memory_allocated` since a reset before each steps setting; on
CPU the process's peak resident set (ru_maxrss), which only grows over the process, so it is
an upper bound for every steps setting.
"""
from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import torch

from harness.core.methods import UserError
from harness.core.records import provenance, write_result
from harness.core.runtime import pick_device, progress, synchronize
from harness.core.settings import EvaluateSettings
from harness.data.storage import load_split
from harness.metrics.common import steps_list
from harness.run.recipe import load_run


def train_throughput(history_csv, skip_rows: int = 1) -> dict:
    """{tokens_per_s, s_per_step, rows} from a training history (median over the kept rows)."""
    try:
        with open(history_csv, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise UserError(f"cannot read {history_csv}: {err.strerror or err}") from None

    def col(row, key):
        try:
            return float(row[key])
        except (KeyError, TypeError, ValueError):
            return None

    kept = rows[skip_rows:] if len(rows) > skip_rows else rows
    tps = [v for v in (col(r, "tokens_per_s") for r in kept) if v is not None and v > 0]
    per_step = []
    prev = rows[skip_rows - 1] if 0 < skip_rows < len(rows) else None
    for r in kept:
        if prev is not None:
            ds, dt = (col(r, "step") or 0) - (col(prev, "step") or 0), (col(r, "wall_time") or 0) - (col(prev, "wall_time") or 0)
            if ds > 0 and dt > 0:  # a resumed run restarts wall_time: skip that gap
                per_step.append(dt / ds)
        prev = r
    return {"tokens_per_s": statistics.median(tps) if tps else None,
            "s_per_step": statistics.median(per_step) if per_step else None, "rows": len(kept)}


def peak_memory_mb(device) -> tuple[float, str]:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS (ru_maxrss, whole process)"


def sample_cost(method, steps: list[int], *, n: int, warmup: int, repeats: int, seed: int = 0) -> list[dict]:
    """Time `method.sample(n, k)` for each k (see the module docstring)."""
    device = method.device
    out = []
    for k in progress(steps, desc="speed", unit="steps"):
        if str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        gen = torch.Generator(device=device).manual_seed(int(seed))
        for _ in range(int(warmup)):
            method.sample(n, k, generator=gen)
        times, nfe = [], None
        for _ in range(max(1, int(repeats))):
            synchronize(device)
            t0 = time.perf_counter()
            res = method.sample(n, k, generator=gen)
            synchronize(device)
            times.append(time.perf_counter() - t0)
            nfe = int(res.nfe)
        mem, mem_kind = peak_memory_mb(device)
        out.append({"steps": k, "s_per_sample": statistics.median(times) / n, "s_per_call": statistics.median(times),
                    "nfe": nfe, "peak_mem_mb": mem, "peak_mem_kind": mem_kind, "times": times})
    return out


def run(args, config: dict) -> dict:
    """`evaluate speed --config C --run RUN --data DATA --out speed.json`."""

    ev = EvaluateSettings.of(config)
    s, steps = ev.speed, steps_list(ev.samples.steps)
    device = pick_device(args.device)
    loaded = load_run(args.run, data_dir=args.data, device=device, ema=not args.no_ema, study_config=config)
    train = train_throughput(Path(args.run) / "history.csv", s.skip_rows)
    sample = sample_cost(loaded.method, steps, n=s.n, warmup=s.warmup, repeats=s.repeats)
    data = load_split(args.data, "test", loaded.info["layout"])
    batch = data.batch(list(range(min(len(data), s.n)))).to(device)
    flops = float(loaded.method.flops_per_token(batch))
    values = {"train": train, "sample": sample, "flops_per_token": flops}
    settings_out = {**s.as_dict(), "steps": steps, "device": str(device), "threads": torch.get_num_threads(),
                    "flops_batch": int(batch.size), "history": str(Path(args.run) / "history.csv")}
    write_result(args.out, "speed", provenance(config, loaded.info, device), settings_out, values)
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"speed {loaded.info.get('run')}: train {fmt(train['tokens_per_s'], '.0f')} tok/s, "
          + ", ".join(f"steps={e['steps']} {e['s_per_sample']:.4f}s/sample" for e in sample)
          + f", {flops:.3g} FLOPs/token -> {args.out}")
    return values
