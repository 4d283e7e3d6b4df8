"""ILM: the insertion language model of Patel et al. 2025 (baselines spec section 3).

A sequence is grown from [BOS] by one (slot, token) insertion per step; a stop head on the
BOS position says when it is complete. Training drops a uniform k-subset of the content
(k ~ U{0..L}), packs the survivors, and fits one joint softmax over all (slot, token) pairs to
the dropped tokens, each counted at its nearest survivor to the left. Our vocabulary has no CLS,
so BOS is both slot 0 and the input of the stop head.

The training loss is not an NLL. Spec 3.e turns it into an upper bound:
    -log p(x) <= (L+1) * E_{k ~ U{0..L}} E_D [CE + BCE] - log L!
which `nll_bound` estimates with k stratified per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from harness.core.backbone import Backbone, backbone_config
from harness.core.batch import Batch, Vocab, predicted_tokens
from harness.core.methods import Method, SampleResult, UserError, check_convention, register
from harness.core.sampling import exp_race, sample_categorical, uniform
from harness.core.schedule import stratified_uniform
from baselines.ar import on_generator_device, row_logsumexp, suppress

STOP, MORE = 0, 1  # stop-head classes: 0 = sequence complete, 1 = more to insert


# --- pure math -----------------------------------------------------------------------------
@dataclass
class DropPlan:
    """Survivors of one drop, packed, and where each dropped token must be inserted."""

    tokens: torch.Tensor  # [T] packed survivors, each sequence starting with its BOS
    lengths: torch.Tensor  # [B] survivors per sequence, BOS included
    seq: torch.Tensor  # [T] sequence index of each packed row
    starts: torch.Tensor  # [B] packed row of each sequence's BOS
    target_rows: torch.Tensor  # [M] packed row (slot) of each dropped token
    target_tokens: torch.Tensor  # [M] the dropped token ids
    target_seq: torch.Tensor  # [M] sequence index of each dropped token
    k: torch.Tensor  # [B] number of dropped tokens
    content: torch.Tensor  # [B] number of content tokens L (BOS excluded)


def drop_plan(x0: torch.Tensor, lengths: torch.Tensor, drop: torch.Tensor) -> DropPlan:
    """Apply a drop mask [B, Lmax] (True = dropped; BOS and padding are never dropped)."""
    pos = torch.arange(x0.shape[1], device=x0.device)
    valid = pos[None, :] < lengths[:, None]
    drop = drop & valid & (pos[None, :] > 0)
    keep = valid & ~drop
    n = keep.sum(1)
    starts = torch.cumsum(n, 0) - n
    slot = torch.cumsum(keep.long(), 1) - 1  # index in x_t of the nearest survivor at or left of j
    b_idx = torch.arange(x0.shape[0], device=x0.device)[:, None].expand_as(x0)
    return DropPlan(
        tokens=x0[keep],
        lengths=n,
        seq=b_idx[keep],
        starts=starts,
        target_rows=(starts[:, None] + slot)[drop],
        target_tokens=x0[drop],
        target_seq=b_idx[drop],
        k=drop.sum(1),
        content=lengths - 1,
    )


def random_drop(lengths: torch.Tensor, lmax: int, k: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random k_b-subset of the content positions 1..len_b-1 of each row [B, Lmax]."""
    dev = lengths.device
    pos = torch.arange(lmax, device=dev)
    content = (pos[None, :] >= 1) & (pos[None, :] < lengths[:, None])
    scores = uniform((len(lengths), lmax), generator, dev).masked_fill(~content, 2.0)
    rank = scores.argsort(1).argsort(1)  # content positions take ranks 0..L-1 in random order
    return rank < k[:, None]


def uniform_k(content: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Map u in [0, 1) to k in {0..L} uniformly (stratified u gives stratified k)."""
    return torch.minimum((u * (content + 1).to(u.dtype)).floor().long(), content)


def segment_logsumexp(values: torch.Tensor, seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    """logsumexp of `values` [T] within each sequence id of `seq` [T] -> [n_seq]."""
    m = torch.full((n_seq,), float("-inf"), dtype=values.dtype, device=values.device)
    m = m.scatter_reduce(0, seq, values.detach(), "amax", include_self=True)
    s = torch.zeros(n_seq, dtype=values.dtype, device=values.device).index_add(0, seq, torch.exp(values - m[seq]))
    return m + torch.log(s)


def ilm_terms(logits: torch.Tensor, stop_logits: torch.Tensor, plan: DropPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (CE, BCE) of spec 3.d from slot logits [T, V] and stop logits [B, 2].

    Computed in the dtype of `stop_logits` (float64 for the bound) without copying `logits`.

    CE = -sum_{i,v} q[i,v] log pi[i,v] with q = counts / k and pi ONE softmax over all (n x V)
    pairs of the sequence (0 when k = 0); BCE = -log softmax(stop)[1 if k > 0 else 0].
    """
    b, dtype = len(plan.lengths), stop_logits.dtype
    seq_lse = segment_logsumexp(row_logsumexp(logits, dtype), plan.seq, b)
    picked = logits[plan.target_rows, plan.target_tokens].to(dtype)
    picked_sum = torch.zeros(b, dtype=dtype, device=logits.device).index_add(0, plan.target_seq, picked)
    has = plan.k > 0
    ce = torch.where(has, seq_lse - picked_sum / plan.k.clamp_min(1).to(dtype), torch.zeros_like(seq_lse))
    target = torch.where(has, MORE, STOP)
    bce = -F.log_softmax(stop_logits, -1).gather(-1, target[:, None]).squeeze(-1)
    return ce, bce


def bound_from_terms(mean_terms: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """(L+1) * mean_j (CE + BCE) - log L! (spec 3.e), float64."""
    length = content.to(torch.float64)
    return (length + 1) * mean_terms.to(torch.float64) - torch.lgamma(length + 1)


def insert_tokens(x: torch.Tensor, slot: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Insert token[b] right after position slot[b] of each row of x [B, n] -> [B, n+1]."""
    b, n = x.shape
    pos = torch.arange(n, device=x.device)
    new_pos = pos[None, :] + (pos[None, :] > slot[:, None]).long()
    out = torch.empty(b, n + 1, dtype=x.dtype, device=x.device)
    out.scatter_(1, new_pos, x)
    out.scatter_(1, (slot + 1)[:, None], token[:, None])
    return out


# --- the method ------------------------------------------------------------------------------
@register("ilm")
class ILM(Method):
    """Bidirectional backbone + an insertion head [n, V] + a 2-class stop head on BOS.

    Options:
      slot_policy    'joint' (default: slot from the marginal of the joint softmax, token given
                     the slot; unbiased at top_p = 1) | 'argmax' (most likely slot, spec 3.f stories)
      stop_policy    'sample' (default: stop with probability p_stop, the ancestral sampler
                     whose law is the model's, the one the bound of spec 3.e bounds) |
                     'threshold' (stop when p_stop >= stop_threshold, spec 3.f stories)
      stop_threshold 0.5 (used by stop_policy 'threshold' only)
      dropout        backbone dropout, 0.0
    """

    layouts = ("varlen",)
    display_order, palette_slot, paper_label = 4, 3, "ILM"
    time_conditioned = False
    paper_equals_strict = True  # no time variable to truncate, no prior term
    OPTIONS = {"slot_policy": "joint", "stop_policy": "sample", "stop_threshold": 0.5, "dropout": 0.0}

    def __init__(self, vocab: Vocab, size: str, layout: str, max_len: int, **options):
        super().__init__(vocab, size, layout, max_len, **options)
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise UserError(f"unknown option(s) for ilm: {', '.join(sorted(unknown))} (known: {', '.join(self.OPTIONS)})")
        opts = {**self.OPTIONS, **options}
        if opts["slot_policy"] not in ("joint", "argmax"):
            raise UserError(f"ilm slot_policy must be 'joint' or 'argmax', got {opts['slot_policy']!r}")
        if opts["stop_policy"] not in ("threshold", "sample"):
            raise UserError(f"ilm stop_policy must be 'threshold' or 'sample', got {opts['stop_policy']!r}")
        if not 0.0 < float(opts["stop_threshold"]) <= 1.0:
            raise UserError("ilm stop_threshold must be in (0, 1]")
        self.slot_policy = opts["slot_policy"]
        self.stop_policy = opts["stop_policy"]
        self.stop_threshold = float(opts["stop_threshold"])

        cfg = backbone_config(size, time_cond=False, causal=False, dropout=float(opts["dropout"]), max_len=max_len)
        self.backbone = Backbone(cfg, vocab.size)
        self.head = nn.Linear(cfg.d_model, vocab.size)
        self.stop_head = nn.Linear(cfg.d_model, 2)
        # identical suppression in loss, bound and sampler (spec 3.i)
        self.suppressed = sorted(set(vocab.specials))

    # --- network ---
    def _heads(self, hidden: torch.Tensor, bos_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = suppress(self.head(hidden).float(), self.suppressed)
        bos_hidden = hidden[:, 0] if bos_rows is None else hidden[bos_rows]
        return logits, self.stop_head(bos_hidden).float()

    def _check(self, batch: Batch) -> None:
        if batch.layout != "varlen":
            raise UserError(f"ilm needs the varlen layout, got a {batch.layout!r} batch")
        content = batch.x0[:, 1:][batch.valid_mask()[:, 1:]]
        bad = torch.isin(content, torch.tensor(self.suppressed, device=content.device))
        if bool(bad.any()):
            raise UserError(f"ilm data contain special ids {sorted(set(content[bad].tolist()))} inside sequences")

    def _terms(self, batch: Batch, k: torch.Tensor, generator: torch.Generator | None, dtype) -> tuple[torch.Tensor, torch.Tensor, DropPlan]:
        drop = random_drop(batch.lengths, batch.x0.shape[1], k, generator)
        plan = drop_plan(batch.x0, batch.lengths, drop)
        hidden = self.backbone(plan.tokens, plan.lengths)
        logits, stop = self._heads(hidden, plan.starts)
        ce, bce = ilm_terms(logits, stop.to(dtype), plan)
        return ce, bce, plan

    # --- interface ---
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        self._check(batch)
        content = batch.lengths - 1
        k = uniform_k(content, uniform(content.shape, None, content.device))
        ce, bce, plan = self._terms(batch, k, None, torch.float32)
        # this draw's bound (L+1)(CE+BCE) - log L! per predicted token N(x), as every method's objective
        # (the constant log L! has no gradient; the (L+1) weight makes it the NELBO, not a mean per slot)
        loss = bound_from_terms(ce + bce, content).sum() / predicted_tokens(batch).sum()
        stats = {
            "ce": float(ce.detach().mean()),
            "bce": float(bce.detach().mean()),
            "drop_fraction": float((k.float() / content.clamp_min(1).float()).mean()),
            "survivor_tokens": float(plan.lengths.sum()),
            "nats_per_token": float(loss.detach()),
        }
        return loss.float(), stats

    @torch.no_grad()
    def nll_bound(self, batch: Batch, mc: int, generator: torch.Generator | None = None,
                  convention: str = "strict") -> torch.Tensor:
        """(L+1) * mean_j (CE + BCE)(k_j, D_j) - lgamma(L+1), k_j stratified over {0..L}, float64.

        Both conventions are this value: the bound has no continuous time to truncate and no
        prior term (every trajectory starts at [BOS] and the stop head ends it), so the ELBO of
        spec 3.e is strict as it stands.
        """
        check_convention(convention)
        self._check(batch)
        if mc < 1:
            raise UserError("mc must be >= 1")
        content = batch.lengths - 1
        u = torch.stack([stratified_uniform(mc, generator) for _ in range(batch.size)]).to(content.device)  # [B, mc]
        total = torch.zeros(batch.size, dtype=torch.float64, device=content.device)
        for j in range(mc):
            ce, bce, _ = self._terms(batch, uniform_k(content, u[:, j]), generator, torch.float64)
            total += ce + bce
        return bound_from_terms(total / mc, content)

    def bound_omits(self, convention: str = "strict") -> str:
        check_convention(convention)
        return ("nothing beyond the ELBO's own gap: uniform insertion orders as the variational posterior "
                "(spec 3.e; no time truncation, no prior term; both conventions)")

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
        """Ancestral insertion sampling in float64: one (slot, token) insertion per network call.

        (Long on purpose: the whole ancestral loop, stop decision included, in one place to read
        against the ILM paper's procedure.)

        Each call on the still-active sequences gives p_stop; with stop_policy 'sample' (the
        default) a sequence stops with probability p_stop, so the length law is the model's (given
        its trajectory x^0 = [BOS], x^1, ...):
            P(length = l | x^0..x^l) = prod_{j<l} (1 - p_stop(x^j)) * p_stop(x^l)
        ('threshold': stop when p_stop >= stop_threshold). The only cap is the model length: a
        sample that reaches max_len - 1 content tokens (max_len counts BOS) stops there, i.e. the
        model is forced to stop at the cap (p_stop := 1 at max_len - 1 content tokens, no call is
        made for that decision). Counted in info as stopped_by_head / stopped_at_max_len.

        `steps` is ignored: ILM inserts one token per network call by construction, so it has no
        step budget to trade (spec 3.f, 3.g: report ILM against NFE). It is recorded in
        info['requested_steps']. NFE = network forward calls made for the batch = longest sample
        + 1 if that sample stopped via its head, max_len - 1 if it hit the cap.
        `length` is ignored (varlen only).
        """
        if prompt:
            raise UserError("ilm does not support prompts")
        if n < 1:
            raise UserError("ilm sample needs n >= 1")
        dev = self.device
        x = torch.full((n, 1), self.vocab.bos, dtype=torch.long, device=dev)
        active = torch.ones(n, dtype=torch.bool, device=dev)
        final: list[torch.Tensor | None] = [None] * n
        trajectory: list[list[int]] = []
        nfe = 0
        stopped_by_head = 0
        # all active rows have the same length (one insertion each per call); x.shape[1] counts BOS
        while active.any() and x.shape[1] < self.max_len:
            logits, stop = self._heads(self.backbone(x), None)  # [A, n, V], [A, 2]
            nfe += 1
            p_stop = torch.softmax(stop.double(), -1)[:, STOP]
            if self.stop_policy == "threshold":
                halt = p_stop >= self.stop_threshold
            else:
                halt = uniform(p_stop.shape, generator, dev) < p_stop
            rows = active.nonzero().squeeze(-1)
            for i in halt.nonzero().squeeze(-1).tolist():
                final[int(rows[i])] = x[i, 1:].clone()
            stopped_by_head += int(halt.sum())
            go = ~halt
            active[rows] = go
            if not go.any():
                break
            logits, x = logits[go], x[go]
            a, n_slots, v = logits.shape
            # slot from the marginal of the joint (slot, token) softmax, token given the slot
            slot_lse = row_logsumexp(logits.reshape(a * n_slots, v)).view(a, n_slots)  # float64
            if self.slot_policy == "joint":
                slot_p = torch.softmax(slot_lse, -1)
                slot = exp_race(on_generator_device(slot_p, generator), generator).to(dev)
            else:
                slot = slot_lse.argmax(-1)
            token_p = torch.softmax(logits[torch.arange(a, device=dev), slot].double(), -1)
            token = sample_categorical(on_generator_device(token_p, generator), generator, top_p).to(dev)
            x = insert_tokens(x, slot, token)
            trajectory.append([x.shape[1] - 1 if on else -1 for on in active.tolist()])  # -1: done
        capped = active.nonzero().squeeze(-1).tolist()  # still running: reached max_len - 1 content tokens
        for i, row in enumerate(capped):
            final[row] = x[i, 1:].clone()
        lengths_now = [len(t) for t in final]
        trajectory = [[lengths_now[j] if v < 0 else v for j, v in enumerate(step)] for step in trajectory]
        info = {
            "sampler": "insertion",
            "slot_policy": self.slot_policy,
            "stop_policy": self.stop_policy,
            "stop_threshold": self.stop_threshold if self.stop_policy == "threshold" else None,
            "top_p": float(top_p),
            "float64": True,
            "steps_ignored": True,
            "requested_steps": int(steps),
            "steps_note": "ilm inserts one token per network call; only max_len - 1 content tokens cap it",
            "max_content_tokens": self.max_len - 1,
            "stopped_by_head": stopped_by_head,
            "stopped_at_max_len": len(capped),
            "mean_generated_tokens": sum(lengths_now) / n,
        }
        return SampleResult(tokens=[t.tolist() for t in final], nfe=nfe, trajectory=trajectory, info=info)

    def flops_per_token(self, batch: Batch) -> float:
        """3 x expected forward FLOPs on the survivors (k ~ U{0..L}: about half), per clean token."""
        d, v = self.backbone.cfg.d_model, self.vocab.size
        total = 0.0
        for length, count in zip(*torch.unique(batch.lengths.cpu(), return_counts=True)):
            survivors = torch.arange(1, int(length) + 1)  # k = L..0 leaves 1..L+1 tokens
            flops = float(self.backbone.forward_flops(survivors)) + 2 * d * v * float(survivors.sum())
            total += int(count) * flops / len(survivors)
        return 3.0 * total / batch.clean_tokens()
