"""The interleaved timing loops the cost job and `harness bench` share.

Methods are timed in one process, interleaved within each repeat, with the same seed in every
repeat (the same batch, noise draws and sampling generator seed), so every repeat is identical
work and the spread over repeats is machine noise. `NetworkProbe` times the network's own calls
inside a sampler, so the share spent outside the network (splicing, draws) is measured too.
"""
from __future__ import annotations

import statistics
import time

import contextlib

import torch
from torch import nn

from harness.core import methods


def default_methods(layout: str) -> list[str]:
    """Every registered method that supports `layout`, its reference (`Method.reference_in`) first:
    a new method (a plugin's included) is timed without being named anywhere here."""
    names = [m for m in methods.available() if layout in methods.get(m).layouts]
    ref = methods.reference_methods().get(layout)
    return ([ref] if ref in names else []) + [m for m in names if m != ref]


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def own_bytes(model, optimizer=None) -> int:
    """Bytes held by one method between steps: parameters, gradients, optimizer state."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")


def alone_peak_mb(device: torch.device, before: int, own: int) -> float | None:
    """Peak GPU memory of a call as if its method were alone on the device: the peak above what
    was allocated before the call (every method's weights are resident together) plus what the
    method itself held before it. None on CPU (process RSS is monotone: no per-method peak)."""
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(device) - before + own) / 2**20, 1)


def max_or_none(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def summary(values) -> dict | None:
    """{min, median, max} of a list of numbers (None for an empty list)."""
    values = [float(v) for v in values]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def ratio_summary(values, reference) -> dict | None:
    """{min, median, max} of the per-repeat ratios values[i] / reference[i] (repeat by repeat)."""
    pairs = [(a, b) for a, b in zip(values, reference) if b]
    return summary([a / b for a, b in pairs]) if pairs and len(pairs) == len(values) else None


def reference_method(layout: str) -> str:
    """The ratio denominator of a layout: the registry's reference (`Method.reference_in`: DID)."""
    return methods.reference_methods().get(layout, "")


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


def interleaved_train(models: dict, batch, *, device: torch.device, use_bf16: bool, warmup: int,
                      repeats: int, seed: int, grad_clip: float = 0.0) -> dict[str, dict]:
    """Time training steps of several methods on the same batch, methods interleaved per repeat.

    `models` maps a name to (model, optimizer). Each model first takes `warmup` untimed steps;
    then in each of `repeats` rounds every model takes one timed step, in order. The global RNG
    is reseeded with `seed` before every step, so every method and every round draws the same
    noise (t, deletions, masks): each round repeats the same work and the spread over rounds is
    machine noise. Returns {name: {"times": [s per round], "dp_seconds": [...] (when the loss
    stats have it), "peak_mem_mb": max over rounds of the step's peak GPU memory as if the method
    were alone on the device (see alone_peak_mb; None on CPU)}}.
    """
    for model, opt in models.values():
        for _ in range(int(warmup)):
            torch.manual_seed(seed)
            train_step(model, opt, batch, device, use_bf16, grad_clip)
    out = {name: {"times": [], "dp_seconds": [], "peak_mem_mb": None} for name in models}
    for _ in range(int(repeats)):
        for name, (model, opt) in models.items():
            sync_device(device)
            reset_peak(device)
            before, own = allocated_bytes(device), own_bytes(model, opt) if device.type == "cuda" else 0
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            stats = train_step(model, opt, batch, device, use_bf16, grad_clip)
            sync_device(device)
            out[name]["times"].append(time.perf_counter() - t0)
            if "dp_seconds" in stats:
                out[name]["dp_seconds"].append(float(stats["dp_seconds"]))
            out[name]["peak_mem_mb"] = max_or_none(out[name]["peak_mem_mb"], alone_peak_mb(device, before, own))
    return out


def call_inputs(args: tuple, kwargs: dict):
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
        sync_device(self.device)
        self._t0 = time.perf_counter()

    def _leave(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            sync_device(self.device)
            self.seconds += time.perf_counter() - self._t0

    def _pre(self, module, args, kwargs):
        self._enter(*call_inputs(args, kwargs))

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


class HeadTimer:
    """Times the calls of a method's output layers (every child module but the backbone: DID's
    insertion head, RADD's and AR's vocabulary projection, ILM's stop head...) inside a `with`, so
    "outside the network" counts neither the backbone nor the layer that turns its states into
    scores: only the sampler's own work (the draws, splicing, bookkeeping)."""

    def __init__(self, modules: list[nn.Module], device: torch.device):
        self.modules, self.device = modules, torch.device(device)
        self.seconds = 0.0
        self._t0: dict[int, float] = {}
        self._handles: list = []

    def _pre(self, module, args):
        sync_device(self.device)
        self._t0[id(module)] = time.perf_counter()

    def _post(self, module, args, output):
        sync_device(self.device)
        self.seconds += time.perf_counter() - self._t0.pop(id(module))

    def __enter__(self) -> "HeadTimer":
        for m in self.modules:
            self._handles += [m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def output_layers(method: nn.Module, backbone: nn.Module | None) -> list[nn.Module]:
    """The method's child modules other than its backbone (its output layers)."""
    return [m for m in method.children() if m is not backbone]


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of CPU SDPA (aten._scaled_dot_product_flash_attention_for_cpu), which FlopCounterMode
    does not count by itself: the same formula as its GPU kernels (QK^T and AV, full matrices)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def counted_flops(fn) -> tuple[object, float]:
    """(fn(), the FLOPs of its matmuls and attention): torch.utils.flop_counter.FlopCounterMode on
    the real code path, a count that does not depend on the machine (elementwise work, the float64
    draws and splicing are not FLOPs here; causal attention counts the whole matrix, as on GPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    extra = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        extra[cpu_sdpa] = _sdpa_cpu_flops                 # keyed by the op packet, as FlopCounterMode looks up
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        out = fn()
    return out, float(counter.get_total_flops())


def interleaved_sample(samplers: dict, steps: list[int], *, n: int, warmup: int, repeats: int, seed: int,
                       top_p: float = 1.0) -> dict[tuple[str, int], dict]:
    """Time `sample(n, k)` of several methods at each k of `steps`, methods interleaved per repeat.

    `samplers` maps a name to a Method (in eval mode). Each method first makes `warmup` untimed
    calls at the smallest k. Then, per k, in each of `repeats` rounds every method makes one
    timed call with a generator freshly seeded with `seed` (the same seed for every round and
    every method, so the rounds are identical work). Returns {(name, k): {"times": [s per call],
    "nfe": [...], "mean_length": [...], "content_tokens": [...], "peak_mem_mb", and, measured by
    a NetworkProbe on the method's `backbone` during the timed call (None for a method without
    one): "network_calls", "tokens_per_call", "row_length_per_call", "network_seconds" (the
    backbone's and the output layers' time: HeadTimer), "output_layer_seconds", "outside_fraction"
    (1 - network seconds / call seconds, clipped to [0, 1])}} (lists: one
    value per repeat), where the content tokens of a sample are its generated ids that are not
    BOS/EOS/PAD/MASK (the length `evaluate samples` reports), mean_length their mean over the
    call's samples. "flops" and "flops_content_tokens": the FLOPs (`counted_flops`) of one more,
    untimed call with the same seed (the same work as every timed call) and its content tokens.
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
                heads = HeadTimer(output_layers(method, net), device) if probe is not None else None
                sync_device(device)
                reset_peak(device)
                before, own = allocated_bytes(device), own_bytes(method) if device.type == "cuda" else 0
                with probe or contextlib.nullcontext(), heads or contextlib.nullcontext():
                    t0 = time.perf_counter()
                    res = call(method, k)
                    sync_device(device)
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
                e["peak_mem_mb"] = max_or_none(e["peak_mem_mb"], alone_peak_mb(device, before, own))
                if probe is None:
                    for key in ("network_calls", "tokens_per_call", "row_length_per_call", "network_seconds",
                                "outside_fraction"):
                        e[key] = None
                    continue
                e["network_calls"].append(probe.calls)
                e["tokens_per_call"].append(probe.tokens_per_call())
                e["row_length_per_call"].append(probe.row_length_per_call())
                e["network_seconds"].append(probe.seconds + heads.seconds)
                e.setdefault("output_layer_seconds", []).append(heads.seconds)
                e["outside_fraction"].append(min(1.0, max(0.0, 1.0 - (probe.seconds + heads.seconds) / dt))
                                             if dt > 0 else 0.0)
        for name, method in samplers.items():          # the machine-independent cost: one counted call
            res, flops = counted_flops(lambda: call(method, k))
            specials = set(method.vocab.specials)
            out[(name, k)]["flops"] = flops
            out[(name, k)]["flops_content_tokens"] = sum(1 for ids in res.tokens for t in ids if int(t) not in specials)
    return out
