"""AR reference: a causal LM on the shared backbone (baselines spec section 4).

Fixed layout: input x[:, :-1] predicts x[:, 1:] (L-1 targets). Variable length: the input is
[BOS] content and the targets are content [EOS], so the EOS is the termination event and
N(x) = content + 1, as in `harness.core.batch.predicted_tokens`. The NLL is exact. BOS, PAD and MASK
are never valid outputs: their logits are -inf in the loss, the NLL and the sampler alike.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from harness.core.backbone import Backbone, backbone_config
from harness.core.batch import Batch, Vocab
from harness.core.methods import Method, SampleResult, UserError, check_convention, register
from harness.core.sampling import sample_categorical


# --- pure math (tested against the worked example of spec 4.d) ---------------------------
def suppressed_ids(vocab: Vocab) -> list[int]:
    """Ids the AR may never emit: BOS, PAD, MASK (EOS stays: it is a target)."""
    return sorted({vocab.bos, vocab.pad, vocab.mask} - {vocab.eos})


def suppress(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Set the columns `ids` of `logits` to -inf in place (no second [T, V] copy); returns it."""
    logits[..., ids] = float("-inf")
    return logits


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row ([T, V], [T] -> [T]), in the dtype of `logits`."""
    return F.cross_entropy(logits, targets, reduction="none")


def row_logsumexp(logits: torch.Tensor, dtype: torch.dtype = torch.float64, chunk: int = 4096) -> torch.Tensor:
    """logsumexp over the last dim of [T, V] in `dtype`, a chunk of rows at a time.

    Evaluation wants float64, but a float64 copy of all [T, V] logits can take gigabytes.
    """
    return torch.cat([torch.logsumexp(logits[i : i + chunk].to(dtype), -1) for i in range(0, logits.shape[0], chunk)])


def token_nll_float64(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """token_nll computed in float64 without a float64 copy of the whole logits tensor."""
    picked = logits.gather(-1, targets[:, None]).squeeze(-1).to(torch.float64)
    return row_logsumexp(logits) - picked


def causal_inputs(batch: Batch, eos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed (inputs [T], lengths [B], targets [T]) for a batch.

    fixed : inputs x[:, :L-1], targets x[:, 1:L].
    varlen: inputs x[:len] (BOS + content), targets x[1:len] + [EOS].
    Both give predicted_tokens(batch) targets per sequence.
    """
    x, lengths = batch.x0, batch.lengths
    pos = torch.arange(x.shape[1], device=x.device)
    if batch.layout == "fixed":
        n = lengths - 1
        valid = pos[None, :] < n[:, None]
        nxt = torch.cat([x[:, 1:], x[:, :1]], dim=1)
        return x[valid], n, nxt[valid]
    if batch.layout == "varlen":
        valid = pos[None, :] < lengths[:, None]
        shifted = torch.cat([x[:, 1:], torch.full_like(x[:, :1], eos)], dim=1)
        targets = torch.where(pos[None, :] == (lengths - 1)[:, None], torch.full_like(x, eos), shifted)
        return x[valid], lengths, targets[valid]
    raise ValueError(f"unknown layout {batch.layout!r}")


def per_sequence_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum packed per-row values [T] into one value per sequence [B]."""
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths)
    return torch.zeros(len(lengths), dtype=values.dtype, device=values.device).index_add_(0, seq, values)


def on_generator_device(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Move `t` to the generator's device: harness.core.sampling draws its noise next to the data."""
    return t if generator is None or t.device == generator.device else t.to(generator.device)


# --- the method ------------------------------------------------------------------------------
@register("ar")
class AR(Method):
    """Causal transformer LM with an untied output layer over the vocabulary.

    Options: `temperature` (sampling, default 1.0), `dropout` (backbone, default 0.0), `kv_cache`
    (sampling, default true: after one call on BOS + prompt, each step feeds only the new token
    against the cached keys and values; false recomputes the whole prefix every step). Either
    way NFE = forward calls, and the logits agree to float rounding (so a seed gives the same
    samples unless rounding flips a draw).
    """

    layouts = ("fixed", "varlen")
    display_order, palette_slot, paper_label = 5, 4, "AR"
    time_conditioned = False
    paper_equals_strict = True  # the NLL is exact: nothing to truncate
    OPTIONS = {"temperature": 1.0, "dropout": 0.0, "kv_cache": True}

    def __init__(self, vocab: Vocab, size: str, layout: str, max_len: int, **options):
        super().__init__(vocab, size, layout, max_len, **options)
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise UserError(f"unknown option(s) for ar: {', '.join(sorted(unknown))} (known: {', '.join(self.OPTIONS)})")
        opts = {**self.OPTIONS, **options}
        self.temperature = float(opts["temperature"])
        if self.temperature <= 0:
            raise UserError("ar option temperature must be > 0")
        if not isinstance(opts["kv_cache"], bool):
            raise UserError(f"ar option kv_cache must be true or false, got {opts['kv_cache']!r}")
        self.kv_cache = opts["kv_cache"]

        cfg = backbone_config(size, time_cond=False, causal=True, dropout=float(opts["dropout"]), max_len=max_len)
        self.backbone = Backbone(cfg, vocab.size)
        self.head = nn.Linear(cfg.d_model, vocab.size)
        self.suppressed = suppressed_ids(vocab)

    def logits(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Output logits (float32, suppressed ids at -inf) for packed or dense causal input."""
        return suppress(self.head(self.backbone(tokens, lengths)).float(), self.suppressed)

    def _check(self, batch: Batch) -> None:
        if batch.layout != self.layout:
            raise UserError(f"ar was built for layout {self.layout!r} but got a {batch.layout!r} batch")

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        self._check(batch)
        inputs, lengths, targets = causal_inputs(batch, self.vocab.eos)
        nll = token_nll(self.logits(inputs, lengths), targets)
        loss = nll.mean()
        return loss, {"nll": float(loss.detach()), "tokens": float(len(targets)), "nats_per_token": float(loss.detach())}

    @torch.no_grad()
    def nll_bound(self, batch: Batch, mc: int = 1, generator: torch.Generator | None = None,
                  convention: str = "strict") -> torch.Tensor:
        """Exact -log p(x) per sequence, float64 (`mc`, `generator` and `convention` are ignored:
        both conventions are the exact NLL)."""
        check_convention(convention)
        self._check(batch)
        inputs, lengths, targets = causal_inputs(batch, self.vocab.eos)
        nll = token_nll_float64(self.logits(inputs, lengths), targets)
        return per_sequence_sum(nll, lengths)

    def bound_omits(self, convention: str = "strict") -> str:
        check_convention(convention)
        return "nothing: the exact NLL of the model (both conventions)"

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
        """Ancestral sampling in float64 with temperature and top-p; `steps` is ignored.

        fixed : exactly length-1 content tokens (default length = max_len); EOS may occur inside
                (it separates documents) and does not stop.
        varlen: stops at EOS (not returned); a sequence still running at max_len-1 content
                tokens is cut there and counted in info['truncated'].
        With the `kv_cache` option (default) the first call reads BOS + prompt and every later
        call one new token per running row; rows that stop leave the cache (KVCache.select).
        """
        if n < 1:
            raise UserError("number of samples must be >= 1")
        prompt = list(prompt or [])
        total = self.max_len if length is None or self.layout == "varlen" else int(length)
        if total > self.max_len:
            raise UserError(f"length {total} exceeds max_len {self.max_len}")
        if total < 2 or len(prompt) > total - 1:
            raise UserError(f"prompt of {len(prompt)} tokens does not fit in length {total} (BOS included)")
        dev = self.device
        x = torch.tensor([self.vocab.bos, *prompt], dtype=torch.long, device=dev).repeat(n, 1)
        # fixed: grow to `total` tokens; varlen: the input may hold at most max_len tokens
        active = torch.ones(n, dtype=torch.bool, device=dev)
        done_len = torch.full((n,), -1, dtype=torch.long, device=dev)  # sequence length incl. BOS at stop
        nfe = 0
        cache, cached_rows = None, None  # the KV cache and the rows of x it holds, in order
        while active.any() and x.shape[1] < total:
            rows = active.nonzero().squeeze(-1)
            if not self.kv_cache:
                last = self.backbone(x[rows])[:, -1]  # the whole prefix again
            elif cache is None:  # BOS + prompt in one call; the cache holds at most total-1 inputs
                hidden, cache = self.backbone.decode(x[rows], capacity=total - 1)
                last, cached_rows = hidden[:, -1], rows
            else:
                if len(rows) < len(cached_rows):  # rows that stopped at EOS leave the cache
                    cache = cache.select(active[cached_rows].nonzero().squeeze(-1))
                    cached_rows = rows
                last = self.backbone.decode(x[rows, -1:], cache)[0][:, -1]  # the new token only
            logits = suppress(self.head(last).float(), self.suppressed).double() / self.temperature
            probs = on_generator_device(torch.softmax(logits, dim=-1), generator)
            nxt = torch.full((n,), self.vocab.pad, dtype=torch.long, device=dev)
            nxt[rows] = sample_categorical(probs, generator, top_p).to(dev)
            nfe += 1
            if self.layout == "varlen":
                hit = active & (nxt == self.vocab.eos)
                done_len[hit] = x.shape[1]
                active &= ~hit
            x = torch.cat([x, nxt[:, None]], dim=1)
        truncated = int(active.sum()) if self.layout == "varlen" else 0
        done_len[done_len < 0] = x.shape[1]
        x, done_len = x.cpu(), done_len.tolist()
        tokens = [x[i, 1 : done_len[i]].tolist() for i in range(n)]
        info = {
            "sampler": "ancestral",
            "kv_cache": self.kv_cache,
            "steps_ignored": True,
            "requested_steps": int(steps),
            "temperature": self.temperature,
            "top_p": float(top_p),
            "float64": True,
            "max_len": total,
            "truncated": truncated,
        }
        return SampleResult(tokens=tokens, nfe=nfe, trajectory=None, info=info)

    def flops_per_token(self, batch: Batch) -> float:
        """3 x forward FLOPs of backbone + output layer on the causal inputs, per clean token."""
        _, lengths, _ = causal_inputs(batch, self.vocab.eos)
        head = 2 * self.backbone.cfg.d_model * self.vocab.size * int(lengths.sum())
        return 3.0 * (float(self.backbone.forward_flops(lengths)) + head) / batch.clean_tokens()
