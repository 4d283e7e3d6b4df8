"""The Method interface and the registry.

A method turns the shared backbone into a language model. The training loop, evaluation and
the workflow talk only to this interface, so adding a method is one new module plus one entry
point: methods are discovered through the entry-point group `didbench.methods` (ENTRY_POINT_GROUP)
of the installed packages, e.g. in the pyproject.toml of your own package

    [project.entry-points."didbench.methods"]
    mymethod = "mypkg.mymethod:MyMethod"

The entry point's name is the method's name in study configs; its object is a Method subclass
(registered under that name when it is loaded; `@register("mymethod")` on the class is optional
and must then give the same name) or a module whose import registers it. The shipped methods are
declared the same way in this project's pyproject.toml; from a plain checkout without installed
package metadata they are imported directly (checkout_entry_points). An entry point that fails to load
is one UserError line naming it, raised when its method is asked for (`get`); `available()`
lists only the methods that load.
"""
from __future__ import annotations

import importlib
import types
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, ClassVar

import torch
from torch import nn

from harness.core.batch import Batch, Vocab
from harness.core.errors import UserError  # re-exported: `from harness.core.methods import UserError` works
from harness.core.plugins import checkout_methods


@dataclass
class SampleResult:
    """What `Method.sample` returns.

    tokens: content token ids per sample (BOS removed, the method's own end-of-sequence cut
            applied: AR stops at EOS, masked models cut at the first PAD, ...).
    nfe:    number of network forward calls actually made for the whole batch of samples
            (a call over a batch of sequences counts once).
    trajectory: optional per-step sequence lengths [steps][n] (DID / ILM length growth).
    info:   facts about the sampling call (settings, and counts for this call only).
    per_sample: optional per-sample facts, {name: list of n JSON values} in sample order, e.g.
            the masked models' {"content_after_pad": [bool], "tokens_after_pad": [int]}.
            harness.metrics.samples copies each into its samples.jsonl row, so unlike `info`
            they stay correct when a sample set is drawn in several calls.
    """

    tokens: list[list[int]]
    nfe: int
    trajectory: list[list[int]] | None = None
    info: dict = field(default_factory=dict)
    per_sample: dict[str, list] = field(default_factory=dict)


class Method(nn.Module):
    """Base class. Subclasses set `name`, `layouts` and implement the four members below.

    Construction: `Method(vocab, size, layout, max_len, **options)` where `size` names a
    backbone size (harness.core.backbone.SIZES) and `max_len` is the longest sequence (BOS included)
    the data can contain. Options come from the study config (`methods.<name>.options`).
    """

    name: ClassVar[str] = ""
    layouts: ClassVar[tuple[str, ...]] = ("fixed", "varlen")
    #: whether the network needs a time input (affects FLOPs estimate and caching)
    time_conditioned: ClassVar[bool] = False
    #: True when the paper convention truncates nothing for this method (AR: exact NLL; ILM: no
    #: continuous time), so its paper-convention value IS the strict bound (computed once)
    paper_equals_strict: ClassVar[bool] = False
    #: True when the network runs on the dense [B, max_len] canvas (MDLM, RADD): `harness bench`
    #: then reports its ratio to DID against the bare dense network's (the zero-overhead limit)
    dense_canvas: ClassVar[bool] = False
    #: where the method's rows and lines sit in tables and figures (lower first; ties by name)
    display_order: ClassVar[int] = 100
    #: its colour: a slot of seaborn's 10-colour colour-blind palette, the same in every figure and
    #: study (None: a free slot, assigned in name order)
    palette_slot: ClassVar[int | None] = None
    #: the layouts in which this method is the reference the others are compared with and divided
    #: by (the ratio-to-DID columns, the significance marks, the cost ratios); one per layout
    reference_in: ClassVar[tuple[str, ...]] = ()
    #: the name the DID paper gives the method in its tables (None: not in the paper)
    paper_label: ClassVar[str | None] = None

    def __init__(self, vocab: Vocab, size: str, layout: str, max_len: int, **options):
        super().__init__()
        if layout not in self.layouts:
            raise UserError(
                f"method {self.name!r} does not support layout {layout!r} (supported: {', '.join(self.layouts)})"
            )
        self.vocab = vocab
        self.size_name = size
        self.layout = layout
        self.max_len = max_len
        self.options = dict(options)

    # --- the interface -------------------------------------------------------------------
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Training objective for a batch: (scalar to minimise, dict of float stats)."""
        raise NotImplementedError

    @torch.no_grad()
    def nll_bound(
        self, batch: Batch, mc: int, generator: torch.Generator | None = None, convention: str = "strict"
    ) -> torch.Tensor:
        """Per-sequence estimate of -log p(x) in nats, float64 [B] (exact for AR).

        `mc` Monte-Carlo samples per sequence, stratified per sequence. Divide by
        `harness.core.batch.predicted_tokens(batch)` for nats/token. `convention` (BOUND_CONVENTIONS):

        * "strict": an unbiased estimate of a valid upper bound on -log p(x) of the generative
          model the sampler runs: the whole time range, the prior term included (or zero by
          construction). This is the number every table reports first.
        * "paper": the convention of the DID/RADD/MDLM papers' code (t >= 1e-3, the prior term
          at t = 1 dropped), the same truncation for every method, only for comparison with
          published numbers. It is NOT guaranteed to be an upper bound.

        `bound_omits(convention)` says in one sentence what a value leaves out.
        """
        raise NotImplementedError

    def bound_omits(self, convention: str = "strict") -> str:
        """One sentence: what the `convention` value of `nll_bound` leaves out (for the result file)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int,
        *,
        generator: torch.Generator | None = None,
        top_p: float = 1.0,
        prompt: list[int] | None = None,
        length: int | None = None,
    ) -> SampleResult:
        """Draw `n` samples with `steps` sampling steps, probabilities sampled in float64.

        `prompt`: content token ids (no BOS) kept fixed at the start of every sample, for methods
        that support prompting. `length`: total length (BOS included) for fixed-length methods;
        defaults to `max_len`.
        """
        raise NotImplementedError

    def runtime_info(self) -> dict:
        """What this run's numbers depend on besides its recipe: implementation choices made at
        run time (e.g. DID's DP backend, did.dp_kernels), recorded in train.json. JSON values."""
        return {}

    # --- helpers shared by every method ---------------------------------------------------
    def flops_per_token(self, batch: Batch) -> float:
        """Estimated training FLOPs per clean token (forward+backward = 3x forward), for DID-F."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


#: the likelihood conventions every method reports (see Method.nll_bound)
BOUND_CONVENTIONS = ("strict", "paper")


def check_convention(convention: str) -> str:
    if convention not in BOUND_CONVENTIONS:
        raise UserError(f"unknown bound convention {convention!r} (known: {', '.join(BOUND_CONVENTIONS)})")
    return convention


_REGISTRY: dict[str, type[Method]] = {}

#: the entry-point group in which a package declares its methods (name = method name)
ENTRY_POINT_GROUP = "didbench.methods"


def checkout_entry_points() -> dict[str, str]:
    """{name: 'module:attr'}: the methods this checkout's pyproject.toml declares (the shipped
    ones), read without importing them. Imported directly when no installed entry point points
    into them (`python -m harness` from a plain checkout), so a shipped method, like any other,
    is one module plus one entry-point line: no list here names it."""
    return checkout_methods()


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _describe(ep: metadata.EntryPoint) -> str:
    """`'name = module:attr' (entry point of group didbench.methods, package dist 1.0)`."""
    dist = getattr(ep, "dist", None)
    where = f", package {dist.name} {dist.version}" if dist is not None else ""
    return f"'{ep.name} = {ep.value}' (entry point of group {ENTRY_POINT_GROUP}{where})"


def _declared() -> tuple[dict[str, metadata.EntryPoint], dict[str, list[metadata.EntryPoint]]]:
    """({name: entry point}, {name: [entry points]} of names declared by different objects)."""
    found: dict[str, metadata.EntryPoint] = {}
    clashes: dict[str, list[metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        prev = found.setdefault(ep.name, ep)
        # the same declaration seen twice (an editable install beside a stale copy) counts once
        if prev.value.replace(" ", "") != ep.value.replace(" ", ""):
            clashes.setdefault(ep.name, [prev]).append(ep)
    return found, clashes


def entry_points() -> dict[str, metadata.EntryPoint]:
    """The `didbench.methods` entry points of the installed packages, by method name (not loaded)."""
    return _declared()[0]


def _load_entry_point(ep: metadata.EntryPoint) -> type[Method]:
    """Import an entry point's object and register it under the entry point's name."""
    try:
        obj = ep.load()
    except BaseException as err:  # noqa: BLE001 (third-party code: even sys.exit / KeyboardInterrupt
        # raised by an import is the plugin's failure, never a silent exit 0 of the command)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"method {ep.name!r}: {_describe(ep)} failed to load: "
                        f"{type(err).__name__}{': ' + detail if detail else ''}") from None
    if isinstance(obj, types.ModuleType):          # a module whose import registers the method
        if ep.name not in _REGISTRY:
            raise UserError(f"method {ep.name!r}: {_describe(ep)} names a module that registers no method "
                            f"{ep.name!r} (registered: {', '.join(sorted(_REGISTRY)) or 'none'})")
        return _REGISTRY[ep.name]
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise UserError(f"method {ep.name!r}: {_describe(ep)} is {obj!r}, not a subclass of harness.core.methods.Method")
    if _REGISTRY.get(ep.name) is obj:
        return obj
    if obj.name and obj.name != ep.name and _REGISTRY.get(obj.name) is obj:
        raise UserError(f"method {ep.name!r}: {_describe(ep)} is registered as {obj.name!r}; "
                        "the entry point's name and the @register name must agree")
    if ep.name in _REGISTRY:
        raise UserError(f"method {ep.name!r}: {_describe(ep)} clashes with {_REGISTRY[ep.name].__module__}."
                        f"{_REGISTRY[ep.name].__qualname__}, already registered under that name")
    return register(ep.name)(obj)


def _load_builtin_methods() -> None:
    """Import the shipped methods that no installed entry point declares (a plain checkout)."""
    declared = {ep.module for ep in entry_points().values()}
    for module in dict.fromkeys(v.split(":")[0].strip() for v in checkout_entry_points().values()):
        if module in declared:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # a method package not present in this checkout
            if err.name and module.startswith(err.name):
                continue
            raise


def available() -> list[str]:
    """Every method that can be built: registered in this process, or declared by an entry point
    that loads. One that fails to load is left out here (so a broken third-party package does not
    stop commands that do not use it) and `get` of its name raises the one-line UserError."""
    _load_builtin_methods()
    eps, clashes = _declared()
    for name, ep in eps.items():
        if name not in _REGISTRY and name not in clashes:
            try:
                _load_entry_point(ep)
            except UserError:
                pass
    return sorted(_REGISTRY)


def declared() -> list[str]:
    """The method names known without importing any method: registered ones and every entry point."""
    return sorted(set(_REGISTRY) | set(entry_points()))


def get(name: str) -> type[Method]:
    """The Method class called `name`, loading its entry point on first use."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    eps, clashes = _declared()
    if name in clashes:
        raise UserError(f"method {name!r} is declared by more than one entry point: "
                        + " and ".join(_describe(ep) for ep in clashes[name]))
    if name in eps:
        return _load_entry_point(eps[name])
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; available: {', '.join(available())}") from None


# --- what the harness and the analysis need to know about the methods, from their classes ---------
def reference_methods() -> dict[str, str]:
    """{layout: the method every other one of that layout is compared with} (`Method.reference_in`)."""
    out: dict[str, str] = {}
    for name in available():
        for layout in get(name).reference_in:
            if layout in out and out[layout] != name:
                raise UserError(f"methods {out[layout]!r} and {name!r} both claim to be the {layout} reference")
            out[layout] = name
    return out


def display_rank(name: str) -> tuple[int, str]:
    """The sort key of a method name in tables and figures; a name the registry does not know (a
    run label, a method of a package not installed here) sorts after the known ones."""
    known = name in available()
    return (get(name).display_order if known else 10**6, name)


def palette_slots() -> dict[str, int]:
    """{method: palette slot} of the methods that fix their colour (`Method.palette_slot`)."""
    return {n: get(n).palette_slot for n in available() if get(n).palette_slot is not None}


def paper_labels() -> dict[str, str]:
    """{method: the DID paper's name for it} of the methods the paper reports."""
    return {n: get(n).paper_label for n in available() if get(n).paper_label}


def build(name: str, vocab: Vocab, size: str, layout: str, max_len: int, **options) -> Method:
    return get(name)(vocab, size, layout, max_len, **options)
