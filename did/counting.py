"""Exact insertion targets r[i, v] = N(Ins(x_t, i, v), x0) / N(x_t, x0) (spec §3.2, §5).

N(a, b) counts the embeddings of a into b as a (not necessarily contiguous) subsequence. All
n x V ratios of one pair come from one prefix and one suffix table (spec §5.2):

    N(Ins(x_t, i, v), x0) = sum_{p : x0[p] = v} P[p][i] * S[p + 1][i]

BOS anchoring (spec §12.15, the "correct variant"): the forward process never deletes x0[0],
so x_t[0] is always matched to x0[0]. We therefore run the DP on x0[1:] and x_t[1:]; slot i
(right after x_t[i]) is then column i of the tables, slot 0 included. This keeps the sum rule
sum_{i,v} r = |x0| - |x_t| even if the BOS id reappears inside x0. A protected prompt (never
deleted, spec §4.6) is anchored the same way: the DP runs after it, and the slots inside it
get no target.

Counts reach C(1023, 511) ~ 1e306, so the tables hold log-counts and the recurrence is a
logaddexp. One recurrence serves the whole batch: we loop only over the x0 index p, with the
prefix DP and the suffix DP (run backwards in p, with its q axis reversed so that both read
their left neighbour) stacked on one axis. Cost O(B * m * n) with n = the longest x_t. The
recurrence itself runs in did.dp_kernels (PyTorch, or one fused kernel: numba on a CPU,
Triton on CUDA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from did import dp_kernels

_PAD_A = -1  # filler in x0[1:] beyond a row's length: never equals a token
_PAD_B = -2  # filler in x_t[1:]: never equals a token, nor _PAD_A


@dataclass
class SparseTargets:
    """Nonzero targets of a packed batch, coalesced (one entry per (row, token)).

    rows index the packed slots of x_t (sequence b's slot i is row offset_b + i, the same order
    as did.process.Deleted.tokens). values are in the DP dtype.
    """

    rows: torch.LongTensor  # [K]
    tokens: torch.LongTensor  # [K]
    values: torch.Tensor  # [K]
    n_rows: int
    backend: str = "torch"  # the did.dp_kernels backend that ran the recurrence

    def to_dense(self, vocab_size: int, dtype=torch.float64) -> torch.Tensor:
        out = torch.zeros(self.n_rows, vocab_size, dtype=dtype, device=self.values.device)
        out[self.rows, self.tokens] = self.values.to(dtype)
        return out


@dataclass
class _Tables:
    log_pair: torch.Tensor  # [M, B, Q+1] log(P[p][q] * S[p+1][q]); one finite junk entry per row p >= m (dropped by entries)
    log_n: torch.Tensor  # [B] log N(x_t, x0), anchored
    a: torch.LongTensor  # [B, M] x0[anchor:], padded with _PAD_A (the token of table row p)
    m: torch.LongTensor  # [B] |x0| - anchor
    n: torch.LongTensor  # [B] |x_t| - anchor
    anchor: torch.LongTensor  # [B] anchored prefix length; table column q is slot anchor - 1 + q
    backend: str = "torch"  # which did.dp_kernels backend ran the recurrence

    def entries(self, log_floor: float = float("-inf")):
        """(p, b, q, C) for every term C = P[p][q] S[p+1][q] / N with log C >= log_floor (and > -inf)."""
        M = self.log_pair.shape[0]
        if log_floor == float("-inf"):
            sel = self.log_pair > log_floor
        else:
            sel = self.log_pair >= (self.log_n + log_floor)[None, :, None]
        if bool((self.m < M).any()):  # rows p >= m hold a finite S-init entry at q = n: not a term
            sel &= torch.arange(M, device=sel.device)[:, None, None] < self.m[None, :, None]
        p, b, q = torch.nonzero(sel, as_tuple=True)
        return p, b, q, (self.log_pair[p, b, q] - self.log_n[b]).exp()


def _anchor(protect, lengths: torch.Tensor) -> torch.Tensor:
    """Per-row number of anchored leading tokens (BOS, plus a protected prompt), in [1, length]."""
    if protect is None:
        protect = 1
    anchor = torch.as_tensor(protect, device=lengths.device).long().expand_as(lengths)
    return torch.minimum(anchor.clamp_min(1), lengths.clamp_min(1))


def _dp_inputs(x0: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor, anchor: torch.Tensor):
    """x0 and x_t after the anchored prefix, left-aligned and padded with sentinels."""
    B, L = x0.shape
    device = x0.device
    m = lengths - anchor
    M = int(m.max()) if B else 0
    pos = torch.arange(L, device=device)
    valid = pos[None, :] < lengths[:, None]
    kept = keep.to(device).bool() & valid & (pos[None, :] >= anchor[:, None])
    n = kept.sum(1)
    Q = int(n.max()) if B else 0
    j = torch.arange(M, device=device)
    src = (anchor[:, None] + j[None, :]).clamp_max(L - 1)
    a = torch.where(j[None, :] < m[:, None], x0.gather(1, src), _PAD_A)
    b = torch.full((B, Q), _PAD_B, dtype=torch.long, device=device)
    col = kept.cumsum(1) - 1
    rows = torch.arange(B, device=device)[:, None].expand(B, L)
    b[rows[kept], col[kept]] = x0[kept]
    return a, b, m, n


@torch.no_grad()
def _tables(x0, keep, lengths, dtype, protect=None, backend: str | None = None) -> _Tables:
    lengths = lengths.to(x0.device)
    anchor = _anchor(protect, lengths)
    a, b, m, n = _dp_inputs(x0, keep, lengths, anchor)
    B, M = a.shape
    Q = b.shape[1]
    device = a.device
    ninf = float("-inf")
    # Column c of the stacked state (c = 1..Q+1; column 0 is a permanent -inf left neighbour):
    #   half 0 (prefix): P[p][q], q = c - 1, matches x0 token against b[q - 1]
    #   half 1 (suffix): S[p][q], q = Q - (c - 1) (reversed), matches against b[q]
    # Step k reads x0 token a[k] (prefix) and a[M-1-k] (suffix): both halves then read their
    # left neighbour, X[c] <- X[c] + [match] X[c-1], one logaddexp for the whole batch.
    fill = torch.full((B, 1), _PAD_B, dtype=torch.long, device=device)
    b_prefix = torch.cat([fill, b], 1)  # [B, Q+1], entry q is b[q-1]
    b_suffix = torch.cat([b, fill], 1).flip(1)  # [B, Q+1], entry c-1 is b[Q-(c-1)]
    b_cols = torch.stack([b_prefix, b_suffix])  # [2, B, Q+1]
    a_steps = torch.stack([a, a.flip(1)]).permute(2, 0, 1)  # [M, 2, B]
    hist = torch.empty((M + 1, 2, B, Q + 2), dtype=dtype, device=device)
    hist[:, :, :, 0].fill_(ninf)  # (fill_, not `= ninf`: a strided copy_ is ~50x slower on CPU)
    hist[0, :, :, 1:].fill_(ninf)
    hist[0, 0, :, 1] = 0.0  # P[0][0] = 1 (the empty prefix embeds once)
    hist[0, 1, torch.arange(B, device=device), 1 + Q - n] = 0.0  # S[M][n] = 1
    # X[c] <- logaddexp(X[c], X[c-1]) where the x0 token matches column c's x_t token (did.dp_kernels)
    used = dp_kernels.recurrence(a_steps, b_cols, hist, backend)

    log_n = hist[M, 0, torch.arange(B, device=device), 1 + n]  # N(x_t, x0) after the anchor
    if not bool(torch.isfinite(log_n).all()):
        raise ValueError("x_t is not a subsequence of x0 (keep mask inconsistent with x0)")
    # P[p][q] + S[p+1][q] for p = 0..M-1: the suffix half is stored reversed in p and in q
    log_pair = hist[:M, 0, :, 1:] + hist[:M, 1, :, 1:].flip((0, 2))
    return _Tables(log_pair=log_pair, log_n=log_n, a=a, m=m, n=n, anchor=anchor, backend=used)


@torch.no_grad()
def dense_insertion_targets(
    x0: torch.LongTensor,
    keep: torch.BoolTensor,
    lengths: torch.LongTensor,
    vocab_size: int,
    *,
    dp_dtype: torch.dtype = torch.float64,
    out_dtype: torch.dtype = torch.float32,
    protect: torch.LongTensor | int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Targets r as a dense [B, L, vocab_size] tensor (L = x0.shape[1]), nothing dropped.

    x0 [B, L] with x0[:, 0] = BOS and anything beyond `lengths` (BOS included); keep [B, L]
    marks the survivors (keep[:, 0] is treated as True, entries beyond a row's length are
    ignored). Row j of sequence b is the slot right after its j-th kept token (row 0 = after
    BOS); rows j >= |x_t| are zero. For tests, oracles and small batches: training uses
    `sparse_insertion_targets`.

    `protect` [B] or int (default 1 = BOS): length of a prefix that the forward process never
    deletes (BOS plus a prompt); it is anchored like BOS, so slots inside it get no target.
    """
    B, L = x0.shape
    tab = _tables(x0, keep, lengths, dp_dtype, protect)
    p, bi, q, c = tab.entries()
    out = torch.zeros(B * L * vocab_size, dtype=dp_dtype, device=x0.device)
    flat = (bi * L + tab.anchor[bi] - 1 + q) * vocab_size + tab.a[bi, p]
    out.index_put_((flat,), c, accumulate=True)
    return out.view(B, L, vocab_size).to(out_dtype)


@torch.no_grad()
def sparse_insertion_targets(
    x0: torch.LongTensor,
    keep: torch.BoolTensor,
    lengths: torch.LongTensor,
    vocab_size: int,
    *,
    dp_dtype: torch.dtype = torch.float32,
    threshold: float = 1e-6,
    protect: torch.LongTensor | int | None = None,
    backend: str | None = None,
) -> SparseTargets:
    """Targets of a batch in packed-row sparse form: the training path (spec §5.3).

    Same inputs as `dense_insertion_targets`. Entries r < threshold are dropped (spec
    §12.13). Terms of one (slot, token) sum below threshold / |x0| are dropped before
    coalescing, so a kept entry is off by less than `threshold` in absolute value.
    """
    tab = _tables(x0, keep, lengths, dp_dtype, protect, backend)
    M = tab.log_pair.shape[0]
    n_rows_seq = tab.anchor + tab.n  # slots per sequence = |x_t|
    offset = torch.cumsum(n_rows_seq, 0) - n_rows_seq
    p, bi, q, c = tab.entries(math.log(threshold / max(M, 1)) if threshold > 0 else float("-inf"))
    rows = offset[bi] + tab.anchor[bi] - 1 + q
    keys = rows * vocab_size + tab.a[bi, p]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    values = torch.zeros(uniq.shape[0], dtype=dp_dtype, device=x0.device)
    values.index_add_(0, inverse, c)
    big = values >= threshold
    uniq, values = uniq[big], values[big]
    return SparseTargets(
        rows=uniq // vocab_size, tokens=uniq % vocab_size, values=values, n_rows=int(n_rows_seq.sum()),
        backend=tab.backend,
    )
