"""Attention within packed sequences ([T, H, hd] with per-sequence lengths), no cross-sequence terms.

The packed layout is what makes DID cheap: its network sees only the tokens that survive deletion,
so every sequence in a batch has its own length. The attention must then cost what each sequence
costs alone (sum of n_i^2), not what a padded batch costs (B * max n^2). The strategy is chosen per
call:

* CUDA, half precision, no dropout: PyTorch's own `torch.nn.attention.varlen.varlen_attn` (a
  flash kernel over cumulative offsets; no extra package), else `flash_attn_varlen_func` when the
  optional flash-attn package is installed;
* all sequences equally long: one dense SDPA call (no mask);
* otherwise (CPU, or a GPU path that is unavailable): one SDPA call per sequence on head-major
  views, with no padding and no mask, so the CPU flash kernel runs on exactly n_i x n_i scores.

`bucketed_attention` is the previous CPU strategy (length buckets padded to their longest row,
with a mask), kept as the reference that `python -m harness bench attention` measures against.
All strategies agree with per-sequence attention to float tolerance, forward and backward
(tests/test_backbone.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional GPU fast path (an extra package)
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_varlen_func = None

try:  # PyTorch's own varlen kernel (CUDA only; present in torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn
except Exception:  # pragma: no cover - older torch
    varlen_attn = None


def cumulative_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """[0, n_0, n_0 + n_1, ...] as int32: the sequence boundaries varlen kernels take."""
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _gpu_varlen(q, k, v, lengths, causal: bool, dropout_p: float):
    """The CUDA kernels over cumulative offsets, or None when none applies to this call."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    cu = cumulative_offsets(lengths)
    max_len = int(lengths.max())
    if varlen_attn is not None and dropout_p == 0.0:
        try:
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0) if causal else (-1, -1))
        except (RuntimeError, NotImplementedError):  # e.g. a GPU generation the kernel does not support
            pass
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p, causal=causal)
    return None


def dense_attention(q, k, v, n: int, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """n sequences of equal length packed as [n * width, H, hd]: one SDPA call, no mask."""
    width = q.shape[0] // n
    qd, kd, vd = (t.view(n, width, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qd, kd, vd, dropout_p=dropout_p, is_causal=causal)
    return out.transpose(1, 2).reshape(q.shape)


def split_attention(q, k, v, lengths: torch.Tensor, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """One SDPA call per sequence on contiguous head-major slices: exact cost, no padding, no mask."""
    sizes = lengths.tolist()
    qh, kh, vh = (t.transpose(0, 1).contiguous() for t in (q, k, v))  # [H, T, hd]: slices are contiguous
    parts = [
        F.scaled_dot_product_attention(qs[None], ks[None], vs[None], dropout_p=dropout_p, is_causal=causal)[0]
        for qs, ks, vs in zip(qh.split(sizes, 1), kh.split(sizes, 1), vh.split(sizes, 1))
        if qs.shape[1]
    ]
    if not parts:  # every sequence is empty (e.g. DID deleted everything)
        return torch.empty_like(q)
    return torch.cat(parts, 1).transpose(0, 1)


def _length_buckets(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Group sequence indices whose lengths lie within a factor of two (padding waste < 2x)."""
    lens = lengths.clamp_min(1).to(torch.float64)
    cls = torch.ceil(torch.log2(lens)).to(torch.long)
    return [torch.nonzero(cls == c, as_tuple=False).flatten() for c in torch.unique(cls)]


def bucketed_attention(q, k, v, lengths: torch.Tensor, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """The previous CPU strategy: length buckets, each padded to its longest row and masked."""
    out = torch.empty_like(q)
    starts = torch.cumsum(lengths, 0) - lengths
    for idx in _length_buckets(lengths):
        lens = lengths[idx]
        width = int(lens.max())
        offs = torch.arange(width, device=q.device)
        valid = offs[None, :] < lens[:, None]  # [nb, width]
        gather = (starts[idx][:, None] + offs[None, :]).clamp_max(q.shape[0] - 1)
        gather = torch.where(valid, gather, starts[idx][:, None])  # padding reads a real token, is masked
        qb, kb, vb = (t[gather].transpose(1, 2) for t in (q, k, v))  # [nb, H, width, hd]
        mask = valid[:, None, None, :]
        if causal:
            mask = mask & torch.ones(width, width, dtype=torch.bool, device=q.device).tril()[None, None]
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p)
        ob = ob.transpose(1, 2)  # [nb, width, H, hd]
        out[gather[valid]] = ob[valid]
    return out


def packed_attention(q, k, v, lengths: torch.Tensor, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention within each packed sequence. q, k, v: [T, H, hd] -> [T, H, hd]."""
    out = _gpu_varlen(q, k, v, lengths, causal, dropout_p)
    if out is not None:
        return out
    if bool((lengths == lengths[0]).all()) and int(lengths[0]) > 0:
        return dense_attention(q, k, v, len(lengths), causal, dropout_p)
    return split_attention(q, k, v, lengths, causal, dropout_p)
