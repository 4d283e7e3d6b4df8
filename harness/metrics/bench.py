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
every call (synchronised on CUDA), giving the fraction of the wall time spent outside the network
(sampling, bookkeeping, transfers).

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
import time

import contextlib

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
from harness.run.recipe import load_run

REFERENCE = {"fixed": "did-fixed", "varlen": "did"}
#: the two bare-network entries of every `bench train` case (see the module docstring)
DENSE, KEPT = "backbone@L", "backbone@kept"
#: the kept-fraction range the issue asks the batch to fall in (a warning outside it)
KEPT_RANGE = (0.45, 0.55)


def default_methods(layout: str) -> list[str]:
    """Every registered method that supports `layout`, its DID reference first: a new method (a
    plugin's included) is timed without being named anywhere here."""
    names = [m for m in methods.available() if layout in methods.get(m).layouts]
    ref = REFERENCE[layout]
    return ([ref] if ref in names else []) + [m for m in names if m != ref]


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

    `batch` is a Batch, or a list of micro-batches (gradient accumulation as in harness.run.loop:
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


def _call_inputs(args: tuple, kwargs: dict):
    """(tokens, lengths or None) of a Backbone.forward(tokens, lengths=None, sigma=None) call."""
    tokens = args[0] if args else kwargs["tokens"]
    lengths = args[1] if len(args) > 1 else kwargs.get("lengths")
    return tokens, lengths


class NetworkProbe:
    """Counts, sizes and times the calls of one module (a method's backbone) inside a `with`.

    Calls are the module's forward (hooks) and its `decode` entry point when it has one (the KV-
    cached incremental path of a causal Backbone, which bypasses forward; wrapped by an instance
    attribute for the duration of the block). Each call records its input tokens
    (`tokens.numel()`: B * N for a dense [B, N] input, T for a packed [T] one, the new tokens
    only for decode) and its rows (B, or len(lengths) when packed), both read off the shapes (no
    device transfer), and the time inside it (time.perf_counter() at both ends, after
    torch.cuda.synchronize on CUDA, so a call's time is its GPU work). A call made inside another
    counts once. Everything is undone on leaving the block, also on an error.
    """

    ENTRY_POINTS = ("decode",)

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, torch.device(device)
        self.tokens: list[int] = []
        self.rows: list[int] = []
        self.seconds = 0.0
        self._t0 = 0.0
        self._depth = 0
        self._handles: list = []
        self._wrapped: list[str] = []

    def _enter(self, tokens: torch.Tensor, lengths: torch.Tensor | None) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        self.tokens.append(int(tokens.numel()))
        self.rows.append(int(lengths.shape[0]) if lengths is not None else int(tokens.shape[0]))
        _sync(self.device)
        self._t0 = time.perf_counter()

    def _leave(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            _sync(self.device)
            self.seconds += time.perf_counter() - self._t0

    def _pre(self, module, args, kwargs):
        self._enter(*_call_inputs(args, kwargs))

    def _post(self, module, args, output):
        self._leave()

    def _wrap(self, name: str) -> None:
        original = getattr(self.module, name)

        def wrapper(*args, **kwargs):
            self._enter(args[0] if args else kwargs["tokens"], None)
            try:
                return original(*args, **kwargs)
            finally:
                self._leave()

        setattr(self.module, name, wrapper)  # an instance attribute shadows the class method
        self._wrapped.append(name)

    def __enter__(self) -> "NetworkProbe":
        self._depth = 0
        self._handles = [self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.module.register_forward_hook(self._post)]
        for name in self.ENTRY_POINTS:
            if callable(getattr(type(self.module), name, None)) and name not in vars(self.module):
                self._wrap(name)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for name in self._wrapped:
            delattr(self.module, name)
        self._handles, self._wrapped = [], []

    @property
    def calls(self) -> int:
        return len(self.tokens)

    def tokens_per_call(self) -> float:
        """Tokens the network processed per call, averaged over the calls (0 without calls)."""
        return statistics.mean(self.tokens) if self.tokens else 0.0

    def row_length_per_call(self) -> float:
        """Per call tokens / rows (the mean sequence length the network saw), averaged over calls."""
        return statistics.mean(t / r for t, r in zip(self.tokens, self.rows)) if self.tokens else 0.0


def interleaved_sample(samplers: dict, steps: list[int], *, n: int, warmup: int, repeats: int, seed: int,
                       top_p: float = 1.0) -> dict[tuple[str, int], dict]:
    """Time `sample(n, k)` of several methods at each k of `steps`, methods interleaved per repeat.

    `samplers` maps a name to a Method (in eval mode). Each method first makes `warmup` untimed
    calls at the smallest k. Then, per k, in each of `repeats` rounds every method makes one
    timed call with a generator freshly seeded with `seed` (the same seed for every round and
    every method, so the rounds are identical work). Returns {(name, k): {"times": [s per call],
    "nfe": [...], "mean_length": [...], "content_tokens": [...], "peak_mem_mb", and, measured by
    a NetworkProbe on the method's `backbone` during the timed call (None for a method without
    one): "network_calls", "tokens_per_call", "row_length_per_call", "network_seconds",
    "outside_fraction" (1 - network seconds / call seconds, clipped to [0, 1])}} (lists: one
    value per repeat), where the content tokens of a sample are its generated ids that are not
    BOS/EOS/PAD/MASK (the length `evaluate samples` reports), mean_length their mean over the
    call's samples.
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
                net = getattr(method, "backbone", None)
                probe = NetworkProbe(net, device) if isinstance(net, nn.Module) else None
                _sync(device)
                _reset_peak(device)
                before, own = _allocated(device), _own_bytes(method) if device.type == "cuda" else 0
                with probe or contextlib.nullcontext():
                    t0 = time.perf_counter()
                    res = call(method, k)
                    _sync(device)
                    dt = time.perf_counter() - t0
                specials = set(method.vocab.specials)
                lengths = [sum(1 for t in ids if int(t) not in specials) for ids in res.tokens]
                e = out.setdefault((name, k), {"times": [], "nfe": [], "mean_length": [], "content_tokens": [],
                                              "peak_mem_mb": None, "network_calls": [], "tokens_per_call": [],
                                              "row_length_per_call": [], "network_seconds": [],
                                              "outside_fraction": []})
                e["times"].append(dt)
                e["nfe"].append(int(res.nfe))
                e["mean_length"].append(statistics.mean(lengths) if lengths else 0.0)
                e["content_tokens"].append(sum(lengths))
                e["peak_mem_mb"] = _max(e["peak_mem_mb"], _alone_peak_mb(device, before, own))
                if probe is None:
                    for key in ("network_calls", "tokens_per_call", "row_length_per_call", "network_seconds",
                                "outside_fraction"):
                        e[key] = None
                    continue
                e["network_calls"].append(probe.calls)
                e["tokens_per_call"].append(probe.tokens_per_call())
                e["row_length_per_call"].append(probe.row_length_per_call())
                e["network_seconds"].append(probe.seconds)
                e["outside_fraction"].append(min(1.0, max(0.0, 1.0 - probe.seconds / dt)) if dt > 0 else 0.0)
    return out


# --- the limit of a zero-overhead DID: the bare network on the dense and on the kept input ----
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
        tokens, lengths = _call_inputs(args, kwargs)
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
    if DENSE not in timing or KEPT not in timing or reference not in timing or reference not in REFERENCE.values():
        return None
    dense, kept, ref = timing[DENSE]["times"], timing[KEPT]["times"], timing[reference]["times"]
    if name == reference:
        return summary([k / r for k, r in zip(kept, ref)])
    if name in timing and name in methods.available() and methods.get(name).dense_canvas:
        return summary([(m / r) / (d / k) for m, r, d, k in zip(timing[name]["times"], ref, dense, kept)])
    return None


# --- `bench train` / `bench sample` ---------------------------------------------------------------
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
        did_name = REFERENCE[layout]
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
            masked = batch.clean_tokens() - kept_tokens.numel()  # what RADD/MDLM score, in expectation
            for entry, (tokens, lengths, head_rows) in ((DENSE, (dense, None, masked)),
                                                        (KEPT, (kept_tokens, kept_lengths, None))):
                torch.manual_seed(0)
                bare = BareBackbone(vocab.size, size, max_len, tokens, lengths, head_rows).to(device).train()
                timed[entry] = (bare, torch.optim.AdamW(bare.parameters(), lr=1e-4))
            # a packed-input method other than DID (ILM, FlexMDM) gets its own zero-overhead limit
            for name in names:
                model = models[name][0]
                if name == did_name or model.dense_canvas or getattr(model.backbone.cfg, "causal", False):
                    continue  # DID has backbone@kept; dense canvases have backbone@L; the bare network is bidirectional
                tokens, lengths = network_input(model, batch, seed)
                if lengths is None:  # a dense input: backbone@L already is its limit
                    continue
                torch.manual_seed(0)
                bare = BareBackbone(vocab.size, size, max_len, tokens, lengths).to(device).train()
                timed[own_entry(name)] = (bare, torch.optim.AdamW(bare.parameters(), lr=1e-4))
                own_tokens[own_entry(name)] = int(tokens.numel())
        timing = interleaved_train(timed, batch, device=device, use_bf16=use_bf16, warmup=args.warmup,
                                   repeats=args.repeats, seed=seed)
        ref = reference_method(layout) if reference_method(layout) in models else names[0]
        limit = limit_ratio(timing)
        bare_s = {e: summary(timing[e]["times"]) if e in timing else None for e in (DENSE, KEPT, *own_tokens)}
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
                "seed": seed,
                "kept_fraction": kept,
                "kept_tokens": int(kept_tokens.numel()),
                "dense_tokens": int(dense.numel()),
                "backbone_dense_s_per_step": bare_s[DENSE],
                "backbone_kept_s_per_step": bare_s[KEPT],
                "backbone_own_s_per_step": bare_s.get(own_entry(n)),
                "own_tokens": own_tokens.get(own_entry(n)),
                "limit_ratio": limit,
                "achieved_fraction": achieved_fraction(timing, n, ref),
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
                   "peak_mem_mb": t["peak_mem_mb"], **network_numbers(t)}
            if ref:
                row["ratio_to_did"] = ratio_summary(t["times"], timing[(ref, steps)]["times"])
                row["reference"] = ref
            rows.append(row)
            q = row.get("ratio_to_did") or {"median": float("nan")}
            net = (f" tok/call={row['tokens_per_call']:.0f} len/call={row['row_length_per_call']:.1f} "
                   f"outside={row['outside_fraction']['median']:.1%}") if row["network_calls"] is not None else ""
            print(f"{name:>22} steps={steps:<5} s/sample={row['s_per_sample']['median']:.4f} NFE={row['nfe']:<6} "
                  f"len={row['mean_length']:.1f}{net} x DID={q['median']:.2f}", flush=True)
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
