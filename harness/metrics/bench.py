"""Cost benchmark: DID vs the baselines side by side, interleaved in one process.

`python -m harness bench train` times full training steps (loss, backward, AdamW step) of each
method on IDENTICAL clean data (the same sequences every repeat), methods interleaved within
each repeat so that machine noise hits all of them alike, after warm-up. The global RNG is
reseeded with the same seed before every timed step, so every repeat does the same work. It
prints s/step, clean tokens/s, peak memory and each method's step time relative to DID with
min/median/max over repeats, and writes the rows as JSON (plotted by
`analysis.figures.bench_figure`).

The limit next to every ratio. Each case (size, layout, L, B) also times, in the same
interleaved loop, two bare networks (`BareBackbone`: the shared Backbone of that size,
bidirectional, no time input, + a linear output layer + cross-entropy on every input token,
AdamW step), each on its own fixed input:

* `backbone@L`   : the dense [B, L] input a masked baseline (RADD, MDLM) feeds its network; in
                   the varlen layout L is the canvas width they use (the split's max_len); the
                   output layer scores clean - kept positions, as many as RADD/MDLM mask;
* `backbone@kept`: the packed survivors DID's network sees in that very step: the tokens and
                   per-row lengths are read off DID's own backbone call (`network_input`: a
                   forward pre-hook on the DID method's backbone during `method.loss(batch)`
                   after `torch.manual_seed(seed)`, the call interrupted before the network
                   runs), so no line of DID's forward process is repeated here.

`limit` = t(backbone@L) / t(backbone@kept), per repeat: the ratio to a masked baseline that a
zero-overhead DID (nothing but the network on its survivors) would get. `achieved` is the
fraction of that limit reached (`achieved_fraction`): for radd/mdlm, (t_method / t_DID) /
limit; for the DID reference row, t(backbone@kept) / t_DID (its speed-up over the dense bare
network divided by the limit: 1 = DID has zero overhead beyond its network). Every other
method whose network takes a packed input (ILM, FlexMDM, a plugin's) gets its own bare network,
`own@<method>`, on the very input its network sees in that step (read the same way), and
`achieved` = t(own@<method>) / t_method: the share of its step that is its network. AR (a
causal network, unlike the bidirectional bare one) gets none. The methods timed by default are every registered method of the layout
(`default_methods`), so a new method is benchmarked without being named here. The case's kept fraction
(kept tokens / clean tokens, DID's `kept_fraction` loss stat) is printed, with a warning when
it is outside 0.45-0.55; `--balanced-seed` times each case at the seed in 0..9 whose kept
fraction is nearest 0.5 instead of `--seed`. `--no-limit` skips the two bare networks.

`python -m harness bench sample` times sampling (float64 probabilities included) of trained runs
of a study at several step counts: seconds per sample, generated tokens/s and NFE, with a
generator seeded identically for every repeat and method. Hooks on each method's backbone
(`NetworkProbe`) also count, in the timed calls, the network calls, the tokens the network
processes per call (dense [B, N] = B * N, packed = T) and the mean row length per call, and time
every call (synchronised on CUDA); hooks on its output layers (every other child module: DID's
insertion head, the baselines' vocabulary projections; `HeadTimer`) time those too. The network
is both, as in the training limit (backbone + output layer), and the rest of the wall time is
"outside the network": the sampler's own work (draws, splicing, bookkeeping, transfers). Each
row also gives the counted FLOPs per sample and per generated token (machine-independent).

The two timing loops, `interleaved_train` and `interleaved_sample`, are also what the study's
cost job (`python -m harness cost`, harness/metrics/cost.py) runs on a study's trained checkpoints.

Ratios are `method s/step / DID s/step` (> 1 means DID is faster), per repeat, measured in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


import torch
import torch.nn.functional as F
from torch import nn

from harness.core import methods
from harness.core.atomic import atomic_write_text
from harness.core.backbone import Backbone, SIZES, backbone_config
from harness.core.batch import Batch, Vocab
from harness.core.methods import UserError
from harness.data.batches import batch_indices
from harness.data.manifest import load_tokenizer
from harness.data.storage import load_split
from harness.metrics import bench_attention
from harness.metrics.timing import (call_inputs, default_methods, interleaved_sample, interleaved_train,
                                    ratio_summary, reference_method, summary, train_step)
from harness.run.recipe import load_run


#: the two bare-network entries of every `bench train` case (see the module docstring)
DENSE, KEPT = "backbone@L", "backbone@kept"


#: the kept-fraction range the issue asks the batch to fall in (a warning outside it)
KEPT_RANGE = (0.45, 0.55)


_summary = summary  # the old private name


_train_step = train_step


class BareBackbone(nn.Module):
    """The bare shared network timed as if it were a method: Backbone (bidirectional, no time
    input) + nn.Linear(d_model, vocab) + cross-entropy (target: the token) on the first
    `head_rows` positions (default: every input token).

    On the dense canvas `head_rows` is the number of positions RADD/MDLM score (the masked ones:
    as many as DID deletes, clean - kept), so `backbone@L` is a zero-overhead RADD step; on the
    kept tokens the head covers every slot, as DID's heads do.

    It runs on the fixed input given at construction, dense `tokens` [B, N] or packed `tokens`
    [T] + `lengths` [B], whatever batch `loss` is handed (so interleaved_train times it next to
    the methods on their shared batch): the least a step of any method feeding this input to the
    backbone and an output layer costs.
    """

    def __init__(self, vocab_size: int, size: str, max_len: int, tokens: torch.Tensor,
                 lengths: torch.Tensor | None = None, head_rows: int | None = None):
        super().__init__()
        self.head_rows = head_rows
        cfg = backbone_config(size, time_cond=False, causal=False, max_len=max_len)
        self.backbone = Backbone(cfg, vocab_size)
        self.head = nn.Linear(cfg.d_model, vocab_size)
        self.register_buffer("tokens", tokens.detach().clone(), persistent=False)
        self.register_buffer("lengths", None if lengths is None else lengths.detach().clone(), persistent=False)

    def loss(self, batch=None) -> tuple[torch.Tensor, dict]:
        hidden = self.backbone(self.tokens, self.lengths)
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), self.tokens.reshape(-1)
        if self.head_rows is not None:
            hidden, targets = hidden[: self.head_rows], targets[: self.head_rows]
        return F.cross_entropy(self.head(hidden).float(), targets), {}


class _Captured(Exception):
    """Raised by network_input's hook: the input is recorded, the network need not run."""


def network_input(method, batch, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens, lengths) of the first backbone call of `method.loss(batch)` after
    `torch.manual_seed(seed)`: exactly what interleaved_train's step at that seed feeds the
    network (for DID: the packed survivors and their per-row lengths). A forward pre-hook on
    `method.backbone` copies the input and interrupts the call, so the network does not run
    (the work before it, e.g. DID's DP, does, without gradients)."""
    got: dict = {}

    def hook(module, args, kwargs):
        tokens, lengths = call_inputs(args, kwargs)
        got["tokens"] = tokens.detach().clone()
        got["lengths"] = None if lengths is None else lengths.detach().clone()
        raise _Captured

    handle = method.backbone.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            method.loss(batch)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"{type(method).__name__}.loss made no backbone call")
    return got["tokens"], got["lengths"]


def dense_input(batch: Batch, width: int, pad: int) -> torch.Tensor:
    """[B, width] tokens of the dense canvas: the rows of the batch, PAD after each row's length
    (fixed rows are already `width` long; varlen: the masked baselines' canvas of max_len)."""
    x0 = batch.x0[:, :width]
    canvas = torch.full((x0.shape[0], width), pad, dtype=x0.dtype, device=x0.device)
    canvas[:, : x0.shape[1]] = torch.where(batch.valid_mask()[:, :width], x0, torch.full_like(x0, pad))
    return canvas


def own_entry(name: str) -> str:
    """The timing entry of a method's own bare network: the backbone + a vocabulary head on the
    very input the method's network sees in the timed step (read by `network_input`)."""
    return f"own@{name}"


def limit_ratio(timing: dict) -> dict | None:
    """{min, median, max} over repeats of t(backbone@L) / t(backbone@kept) (None without them)."""
    if DENSE not in timing or KEPT not in timing:
        return None
    return ratio_summary(timing[DENSE]["times"], timing[KEPT]["times"])


def achieved_fraction(timing: dict, name: str, reference: str) -> dict | None:
    """{min, median, max} over repeats of the fraction of the limit a row reaches.

    Per repeat i, with limit_i = t(backbone@L)_i / t(backbone@kept)_i:
    * a dense-canvas baseline (radd, mdlm): (t_name_i / t_reference_i) / limit_i: its measured
      ratio to DID over the ratio a zero-overhead DID would get against the bare dense network;
    * the reference (DID) itself: t(backbone@kept)_i / t_reference_i, i.e. its speed-up over
      the bare dense network divided by the limit (1 = no cost beyond the network).
    * a method with its own bare network (`own_entry`: a packed-input method other than DID, e.g.
      ILM, FlexMDM): t(own@name)_i / t_name_i, 1 = no cost beyond its network on its own input.
    None for other methods (AR: causal), for a reference that is not a DID method, or without the
    bare-network timings.
    """
    own = own_entry(name)
    if own in timing and name in timing:
        return summary([o / m for o, m in zip(timing[own]["times"], timing[name]["times"])])
    if (DENSE not in timing or KEPT not in timing or reference not in timing
            or reference not in methods.reference_methods().values()):
        return None
    dense, kept, ref = timing[DENSE]["times"], timing[KEPT]["times"], timing[reference]["times"]
    if name == reference:
        return summary([k / r for k, r in zip(kept, ref)])
    if name in timing and name in methods.available() and methods.get(name).dense_canvas:
        return summary([(m / r) / (d / k) for m, r, d, k in zip(timing[name]["times"], ref, dense, kept)])
    return None


def fixed_batches(data_dir: str, seq_len: int, batch_size: int, vocab: Vocab) -> Batch:
    """Rows of exactly seq_len tokens ([BOS] + seq_len-1) re-chunked from the prepared train stream."""
    rows = load_split(data_dir, "train", "fixed")
    stream = rows.batch(list(range(len(rows)))).x0[:, 1:].reshape(-1)
    need = batch_size * (seq_len - 1)
    if stream.numel() < need:
        raise UserError(f"the train split has {stream.numel()} tokens, fewer than {need} needed for B={batch_size}, L={seq_len}")
    body = stream[:need].view(batch_size, seq_len - 1)
    x0 = torch.cat([torch.full((batch_size, 1), vocab.bos, dtype=torch.long), body], 1)
    return Batch(x0, torch.full((batch_size,), seq_len, dtype=torch.long), "fixed")


def varlen_batch(data_dir: str, batch_size: int, seed: int = 0) -> Batch:
    """A fixed random draw of natural documents of the default corpus (same for every method)."""
    docs = load_split(data_dir, "train", "varlen")
    idx = batch_indices(len(docs), batch_size, seed, 0)
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


def kept_fraction(tokens: torch.Tensor, batch: Batch) -> float:
    """Network tokens / clean tokens of one DID step (its loss stat `kept_fraction`)."""
    return float(tokens.numel()) / float(batch.lengths.sum())


def _case_seed(did_model, batch: Batch, args) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """(seed, kept tokens, kept lengths) of a case: `--seed`, or with `--balanced-seed` the seed
    in 0..9 whose kept fraction is nearest 0.5 (the smallest such seed on a tie)."""
    seeds = range(10) if args.balanced_seed else [args.seed]
    best = None
    for sd in seeds:
        tokens, lengths = network_input(did_model, batch, sd)
        gap = abs(kept_fraction(tokens, batch) - 0.5)
        if best is None or gap < best[0]:
            best = (gap, sd, tokens, lengths)
    return best[1], best[2], best[3]


def bench_train(args) -> dict:
    """`bench train`: every case (size x layout x length) timed in one process, methods interleaved,
    with the zero-overhead limits beside them (see the module docs); returns the bench-train result."""
    device = torch.device(args.device)
    use_bf16 = device.type == "cuda" and not args.fp32
    tokenizer = load_tokenizer(args.data)
    vocab = tokenizer.vocab
    rows = []
    cases = []
    for size in args.sizes:
        for L in args.fixed_lengths:
            cases.append((size, "fixed", L))
        if args.varlen:
            cases.append((size, "varlen", None))
    for size, layout, L in cases:
        names = [m for m in (args.methods or default_methods(layout)) if layout in methods.get(m).layouts]
        B = _batch_size(args, size, layout, L)
        batch = fixed_batches(args.data, L, B, vocab) if layout == "fixed" else varlen_batch(args.data, B)
        max_len = L if layout == "fixed" else int(load_split(args.data, "train", "varlen").max_len)
        batch = batch.to(device)
        models = {}
        for name in names:
            torch.manual_seed(0)
            model = methods.build(name, vocab, size, layout, max_len).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            models[name] = (model, opt)
        # DID's network input of this case: read off the DID method's own backbone call
        did_name = methods.reference_methods()[layout]
        if did_name in models:
            did_model = models[did_name][0]
        else:
            torch.manual_seed(0)
            did_model = methods.build(did_name, vocab, size, layout, max_len).to(device).train()
        seed, kept_tokens, kept_lengths = _case_seed(did_model, batch, args)
        if did_name not in models:
            del did_model
        kept = kept_fraction(kept_tokens, batch)
        dense = dense_input(batch, max_len, vocab.pad)
        print(f"\n[{size} {layout} L={max_len} B={B}: {batch.clean_tokens()} clean tokens per step; seed {seed}: "
              f"DID keeps {kept_tokens.numel()} ({kept:.1%})]", flush=True)
        if not KEPT_RANGE[0] <= kept <= KEPT_RANGE[1]:
            print(f"warning: the kept fraction {kept:.3f} is outside {KEPT_RANGE[0]}-{KEPT_RANGE[1]}: the limit and "
                  f"the ratios are for this draw (try --balanced-seed or another --batch-size)", flush=True)
        timed = dict(models)
        own_tokens: dict[str, int] = {}
        if args.limit:
            own_tokens = _add_limits(timed, models, did_name, batch, seed, (dense, kept_tokens, kept_lengths),
                                     vocab.size, size, max_len, device)
        timing = interleaved_train(timed, batch, device=device, use_bf16=use_bf16, warmup=args.warmup,
                                   repeats=args.repeats, seed=seed)
        ref = reference_method(layout) if reference_method(layout) in models else names[0]
        limit = limit_ratio(timing)
        bare_s = {e: summary(timing[e]["times"]) if e in timing else None for e in (DENSE, KEPT, *own_tokens)}
        for n in names:
            t = train_row(n, timing[n], timing[ref]["times"], batch.clean_tokens())
            row = {
                "method": n, "layout": layout, "size": size, "seq_len": max_len, "batch_size": B,
                "clean_tokens": batch.clean_tokens(), "s_per_step": t["s_per_step"], "tokens_per_s": t["tokens_per_s"],
                "ratio_to_did": t["ratio"], "reference": ref, "peak_mem_mb": t["peak_mem_mb"],
                "params": sum(p.numel() for p in models[n][0].parameters()), "seed": seed, "kept_fraction": kept,
                "kept_tokens": int(kept_tokens.numel()), "dense_tokens": int(dense.numel()),
                "backbone_dense_s_per_step": bare_s[DENSE], "backbone_kept_s_per_step": bare_s[KEPT],
                "backbone_own_s_per_step": bare_s.get(own_entry(n)), "own_tokens": own_tokens.get(own_entry(n)),
                "limit_ratio": limit, "achieved_fraction": achieved_fraction(timing, n, ref),
            }
            if "dp_seconds" in t:
                row["dp_seconds"] = t["dp_seconds"]
                row["dp_fraction_of_step"] = t["dp_fraction"]
            rows.append(row)
        _print_table([r for r in rows if r["size"] == size and r["layout"] == layout and r["seq_len"] == max_len],
                     {e: v for e, v in bare_s.items() if v is not None},
                     {DENSE: dense.numel(), KEPT: kept_tokens.numel(), **own_tokens})
        del models, timed
    return {"kind": "bench-train", "device": machine_description(device), "precision": "bf16" if use_bf16 else "float32",
            "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed, "balanced_seed": args.balanced_seed,
            "limit": args.limit, "threads": torch.get_num_threads(), "rows": rows}


def _add_limits(timed: dict, models: dict, did_name: str, batch: Batch, seed: int, inputs: tuple,
                vocab_size: int, size: str, max_len: int, device: torch.device) -> dict[str, int]:
    """Add the zero-overhead limits of a case to `timed`: the bare network on the dense input and on
    DID's kept input, and, for a packed-input method other than DID (ILM, FlexMDM), on its own
    input. Returns {own entry: its tokens}."""
    dense, kept_tokens, kept_lengths = inputs
    masked = batch.clean_tokens() - kept_tokens.numel()  # what RADD/MDLM score, in expectation
    for entry, (tokens, lengths, head_rows) in ((DENSE, (dense, None, masked)),
                                                (KEPT, (kept_tokens, kept_lengths, None))):
        torch.manual_seed(0)
        bare = BareBackbone(vocab_size, size, max_len, tokens, lengths, head_rows).to(device).train()
        timed[entry] = (bare, torch.optim.AdamW(bare.parameters(), lr=1e-4))
    own_tokens: dict[str, int] = {}
    for name, (model, _) in models.items():
        if name == did_name or model.dense_canvas or getattr(model.backbone.cfg, "causal", False):
            continue  # DID has backbone@kept; dense canvases have backbone@L; the bare network is bidirectional
        tokens, lengths = network_input(model, batch, seed)
        if lengths is None:  # a dense input: backbone@L already is its limit
            continue
        torch.manual_seed(0)
        bare = BareBackbone(vocab_size, size, max_len, tokens, lengths).to(device).train()
        timed[own_entry(name)] = (bare, torch.optim.AdamW(bare.parameters(), lr=1e-4))
        own_tokens[own_entry(name)] = int(tokens.numel())
    return own_tokens


def _batch_size(args, size: str, layout: str, L: int | None) -> int:
    if args.batch_size:
        return args.batch_size
    if layout == "varlen":
        return 32 if size == "tiny" else 8
    tokens = 4096 if size == "tiny" else 2048  # CPU-friendly defaults; the GPU script sets --batch-size
    return max(1, tokens // L)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _print_table(rows: list[dict], bare: dict | None = None, bare_tokens: dict | None = None) -> None:
    """The rows of one case; `bare` {entry: s/step summary} adds the bare-network lines (tokens/s
    of those: the tokens of their own input, `bare_tokens`)."""
    def med(d, f):
        return format(d["median"], f) if d else "-"

    print(f"{'method':>13} {'s/step (med)':>13} {'min':>8} {'max':>8} {'tok/s':>10} {'x DID (min/med/max)':>22} "
          f"{'limit':>6} {'achieved':>9} {'DP share':>9} {'peak MB':>8}")
    for r in rows:
        s, q = r["s_per_step"], r["ratio_to_did"]
        dp = f"{r['dp_fraction_of_step']['median']:.1%}" if "dp_fraction_of_step" in r else "-"
        mem = r["peak_mem_mb"] if r["peak_mem_mb"] is not None else "-"
        ach = med(r.get("achieved_fraction"), ".1%")
        print(
            f"{r['method']:>13} {s['median']:13.4f} {s['min']:8.4f} {s['max']:8.4f} {r['tokens_per_s']['median']:10.0f} "
            f"{q['min']:6.2f} / {q['median']:5.2f} / {q['max']:5.2f} {med(r.get('limit_ratio'), '.2f'):>6} {ach:>9} "
            f"{dp:>9} {mem:>8}"
        )
    for entry, s in (bare or {}).items():
        tok = (bare_tokens or {}).get(entry)
        tps = f"{tok / s['median']:10.0f}" if tok else f"{'-':>10}"
        print(f"{entry:>13} {s['median']:13.4f} {s['min']:8.4f} {s['max']:8.4f} {tps} {'(bare network)':>22}")


def network_numbers(t: dict) -> dict:
    """The NetworkProbe numbers of one interleaved_sample entry as a bench-sample row's keys:
    network_calls (median over repeats), tokens_per_call and row_length_per_call (means over
    repeats of the per-call means), network_seconds and outside_fraction ({min, median, max});
    all None for a method without a backbone."""
    if not t.get("network_calls"):
        return dict.fromkeys(("network_calls", "tokens_per_call", "row_length_per_call", "network_seconds",
                              "outside_fraction"))
    return {"network_calls": statistics.median(t["network_calls"]),
            "tokens_per_call": statistics.mean(t["tokens_per_call"]),
            "row_length_per_call": statistics.mean(t["row_length_per_call"]),
            "network_seconds": summary(t["network_seconds"]), "outside_fraction": summary(t["outside_fraction"])}


def bench_sample(args) -> dict:
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
                   "peak_mem_mb": t["peak_mem_mb"], "flops_per_sample": t["flops"] / args.n,
                   "flops_per_gen_token": t["flops"] / t["flops_content_tokens"] if t["flops_content_tokens"] else None,
                   **network_numbers(t)}
            if ref:
                row["ratio_to_did"] = ratio_summary(t["times"], timing[(ref, steps)]["times"])
                row["reference"] = ref
            rows.append(row)
            q = row.get("ratio_to_did") or {"median": float("nan")}
            net = (f" tok/call={row['tokens_per_call']:.0f} len/call={row['row_length_per_call']:.1f} "
                   f"outside={row['outside_fraction']['median']:.1%}") if row["network_calls"] is not None else ""
            per_tok = row["flops_per_gen_token"]
            print(f"{name:>22} steps={steps:<5} s/sample={row['s_per_sample']['median']:.4f} NFE={row['nfe']:<6} "
                  f"len={row['mean_length']:.1f}{net} x DID={q['median']:.2f} "
                  f"GFLOP/sample={row['flops_per_sample'] / 1e9:.3f} "
                  f"MFLOP/token={'-' if per_tok is None else format(per_tok / 1e6, '.1f')}", flush=True)
    return {"kind": "bench-sample", "device": machine_description(device), "repeats": args.repeats, "warmup": args.warmup,
            "seed": args.seed, "threads": torch.get_num_threads(), "rows": rows}


def main(argv: list[str]) -> int:
    """`python -m harness bench train|sample|attention ...`."""
    if argv[:1] == ["attention"]:  # its own parser: attention strategies alone, no data needed

        return bench_attention.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.what == "train" and not os.path.exists(os.path.join(args.data, "manifest.json")):
        raise UserError(f"no prepared data in {args.data}: run `python -m harness prepare --config config/default.yaml --out {args.data}`")
    result = bench_train(args) if args.what == "train" else bench_sample(args)
    result["argv"] = argv
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """`bench train|sample` options (`bench attention` has its own: harness.metrics.bench_attention)."""
    sizes = ", ".join(SIZES)
    p = argparse.ArgumentParser(prog="python -m harness bench",
                                description="Cost benchmarks: methods interleaved in one process on identical work.")
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("attention", help="packed-attention strategies alone on DID-like length mixes "
                                     "(`bench attention --help`)", add_help=False)
    train_help = ("training step cost, methods interleaved on identical data; columns 'limit' (bare backbone on "
                  "dense L / on DID's kept tokens: the ratio a zero-overhead DID would get) and 'achieved' (the "
                  "fraction of it reached), and the case's kept fraction")
    t = sub.add_parser("train", help=train_help, description=train_help)
    t.add_argument("--data", default="results/default/data", help="a prepared data directory (make study / harness prepare)")
    t.add_argument("--sizes", nargs="+", default=["tiny", "small"], help=f"model sizes ({sizes}; default: %(default)s)")
    t.add_argument("--fixed-lengths", nargs="*", type=int, default=[128, 1024],
                   help="fixed-layout sequence lengths L, one case each (default: %(default)s)")
    t.add_argument("--no-varlen", dest="varlen", action="store_false", help="skip the variable-length case")
    t.add_argument("--methods", nargs="*", default=None,
                   help="methods to time (default: every registered method of the layout, DID first)")
    t.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step (default: 4096 tokens / L at tiny, 2048 / L at small; varlen 32 / 8)")
    t.add_argument("--warmup", type=int, default=1, help="untimed steps per method first (default: 1)")
    t.add_argument("--repeats", type=int, default=3, help="timed rounds, methods interleaved in each (default: 3)")
    t.add_argument("--seed", type=int, default=0, help="global RNG seed before every timed step (same work every repeat)")
    t.add_argument("--balanced-seed", action="store_true",
                   help="time each case at the seed in 0..9 whose DID kept fraction is nearest 0.5 (instead of --seed)")
    t.add_argument("--no-limit", dest="limit", action="store_false",
                   help="do not time the bare backbone on dense L and on DID's kept tokens (no limit/achieved columns)")
    t.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    t.add_argument("--out", default=None, help="write the rows as JSON here")
    sample_help = ("sampling cost of a study's trained runs at several step counts, with NFE, the tokens and the "
                   "mean row length per network call and the fraction of the time spent outside the network")
    s = sub.add_parser("sample", help=sample_help, description=sample_help)
    s.add_argument("--study-dir", default="results/default", help="a study with trained runs (default: %(default)s)")
    s.add_argument("--steps", nargs="+", type=int, default=[16, 64], help="sampling step counts (default: %(default)s)")
    s.add_argument("--n", type=int, default=16, help="samples per timed call (default: 16)")
    s.add_argument("--repeats", type=int, default=3, help="timed rounds, methods interleaved in each (default: 3)")
    s.add_argument("--warmup", type=int, default=1, help="untimed calls per method first (default: 1)")
    s.add_argument("--seed", type=int, default=0, help="generator seed of every timed call (same work every repeat)")
    s.add_argument("--methods", nargs="*", default=None, help="only the runs of these methods (default: all)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    s.add_argument("--out", default=None, help="write the rows as JSON here")
    return p


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
