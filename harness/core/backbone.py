"""The shared transformer backbone: DiT-style pre-LN blocks with rotary positions.

Every method runs on this one network so that differences in the results come from the
method, not the architecture. It is bidirectional by default, causal for AR, and optionally
time-conditioned through adaLN-Zero (DID's variable-length model conditions on sigma_bar(t)).

Inputs come in two layouts:
* dense  `tokens [B, L]`: every row is a full sequence of length L (fixed-length data, masked canvases);
* packed `tokens [T]` + `lengths [B]` (sum = T): sequences concatenated with no padding. Attention
  never crosses sequences, rotary positions restart at 0 for every sequence, and the cost is per
  sequence (harness/core/attention.py chooses the kernel).

A causal dense backbone also decodes incrementally (`Backbone.decode` with a `KVCache`): new tokens
attend over the cached keys and values of the prefix, so an autoregressive step costs one token.

The backbone has no output head: methods put theirs on the returned hidden states.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.attention import packed_attention
from harness.core.methods import UserError

SIZES: dict[str, dict] = {
    # a few M parameters: trains in minutes on a laptop CPU
    "tiny": dict(n_layers=4, d_model=192, n_heads=4),
    # the paper's sizes (did-method.md section 6.4), head dim 64
    "small": dict(n_layers=12, d_model=768, n_heads=12),
    "medium": dict(n_layers=24, d_model=1024, n_heads=16),
    "large": dict(n_layers=36, d_model=1280, n_heads=20),
}


@dataclass(frozen=True)
class BackboneConfig:
    n_layers: int
    d_model: int
    n_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    time_cond: bool = False
    cond_dim: int = 128
    causal: bool = False
    max_len: int = 1024
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


def backbone_config(size: str, **overrides) -> BackboneConfig:
    """The named size with overrides (time_cond, causal, dropout, max_len, mlp_ratio, ...)."""
    if size not in SIZES:
        raise UserError(f"unknown model size {size!r}; available: {', '.join(SIZES)}")
    cfg = BackboneConfig(**SIZES[size])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = replace(cfg, **overrides)
    if cfg.d_model % cfg.n_heads:
        raise ValueError("d_model must be divisible by n_heads")
    return cfg


# --------------------------------------------------------------------------------------------
# packing helpers


def packed_positions(lengths: torch.Tensor) -> torch.Tensor:
    """Position of every packed token inside its own sequence: [T] (restarts at 0 per sequence)."""
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    return torch.arange(total, device=lengths.device) - torch.repeat_interleave(starts, lengths, output_size=total)


def sequence_ids(lengths: torch.Tensor) -> torch.Tensor:
    """Index of the sequence each packed token belongs to: [T]."""
    total = int(lengths.sum())
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths, output_size=total)


# --------------------------------------------------------------------------------------------
# rotary embeddings (NeoX style: rotate the two halves of the head dimension)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float, max_len: int):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_len = max_len

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., N, heads, hd] with cos/sin [N, hd] broadcast over heads."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------
# incremental decoding


class KVCache:
    """Keys and values of a dense causal prefix, for `Backbone.decode`.

    One buffer `kv [n_layers, 2, B, H, capacity, hd]` (k at index 0, v at 1) whose first `length`
    positions hold the prefix; `layer(i)` gives layer i's (k, v) [B, H, length, hd]. New tokens
    are written in place (the buffer doubles when full), so a decoding step copies only its own
    keys and values. `select(rows)` keeps some rows with one index_select. The buffer is allocated
    on the first write, in the dtype and on the device of the keys.
    """

    def __init__(self, n_layers: int, capacity: int = 0):
        self.n_layers = n_layers
        self.capacity = int(capacity)
        self.length = 0
        self.kv: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.length

    @property
    def batch_size(self) -> int | None:
        return None if self.kv is None else self.kv.shape[2]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of layer i, each [B, H, length, hd] (views into the buffer)."""
        if self.kv is None:
            raise ValueError("the cache is empty")
        return self.kv[i, 0, :, :, : self.length], self.kv[i, 1, :, :, : self.length]

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer i's keys/values of the new tokens (k, v [B, H, n, hd]) after the prefix and
        return layer i's keys/values over prefix + new tokens. `length` moves on only in
        `advance`, once every layer has written."""
        b, h, n, hd = k.shape
        end = self.length + n
        if self.kv is None:
            self.capacity = max(self.capacity, end)
            self.kv = k.new_empty((self.n_layers, 2, b, h, self.capacity, hd))
        elif self.kv.shape[2] != b:
            raise ValueError(f"cache holds {self.kv.shape[2]} rows but got {b}: use select() first")
        elif end > self.capacity:  # grow by doubling: amortised O(1) copies per token
            self.capacity = max(end, 2 * self.capacity)
            grown = self.kv.new_empty((*self.kv.shape[:4], self.capacity, hd))
            grown[..., : self.length, :] = self.kv[..., : self.length, :]
            self.kv = grown
        self.kv[i, 0, :, :, self.length : end] = k
        self.kv[i, 1, :, :, self.length : end] = v
        return self.kv[i, 0, :, :, :end], self.kv[i, 1, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += int(n)

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A cache of only these rows (indices [R] or a bool mask [B]), in their order."""
        rows = torch.as_tensor(rows)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(-1)
        out = KVCache(self.n_layers, self.capacity)
        out.length = self.length
        if self.kv is not None:
            out.kv = self.kv.index_select(2, rows.to(self.kv.device))
        return out


# --------------------------------------------------------------------------------------------
# blocks


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (stable under bf16/fp16 autocast)."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(x.float(), (self.dim,), self.weight, self.bias, 1e-5)
        return y.to(x.dtype)


class TimeEmbedding(nn.Module):
    """c = SiLU(MLP(sinusoidal_256(sigma))): the adaLN conditioning vector per sequence."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
        args = sigma.to(torch.float32)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.silu(self.mlp(emb))


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.norm1 = LayerNorm(d, bias=not cfg.time_cond)
        self.norm2 = LayerNorm(d, bias=not cfg.time_cond)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        hidden = int(cfg.mlp_ratio * d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.time_cond:
            self.ada = nn.Linear(cfg.cond_dim, 6 * d)
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)

    def forward(self, x, cos, sin, lengths, cond, rows, kv=None):
        """x: [B, L, d] dense or [T, d] packed; cond: per-token-broadcastable modulation or None;
        kv: (KVCache, layer index) when decoding dense causal input incrementally."""
        if self.cfg.time_cond:
            mod = self.ada(cond)
            if rows is not None:  # packed: one modulation row per token
                mod = mod[rows]
            else:
                mod = mod[:, None, :]
            sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
            h = self.norm1(x) * (1 + sc1) + sh1
            x = x + g1 * self.drop(self._attention(h, cos, sin, lengths, kv))
            h = self.norm2(x) * (1 + sc2) + sh2
            return x + g2 * self.drop(self.mlp(h))
        x = x + self.drop(self._attention(self.norm1(x), cos, sin, lengths, kv))
        return x + self.drop(self.mlp(self.norm2(x)))

    def _attention(self, h, cos, sin, lengths, kv=None):
        cfg = self.cfg
        shape = h.shape[:-1]
        qkv = self.qkv(h).view(*shape, 3, cfg.n_heads, cfg.head_dim)
        q, k, v = qkv.unbind(dim=-3)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = cfg.dropout if self.training else 0.0
        if kv is not None:  # dense decoding: the new tokens attend over the cached prefix and themselves
            cache, layer = kv
            past, n = cache.length, shape[1]
            keys, values = cache.append(layer, k.transpose(1, 2), v.transpose(1, 2))
            mask = None  # one new token sees every key
            if n > 1:  # causal among the new tokens: new token i sees keys 0 .. past + i
                mask = torch.ones(n, past + n, dtype=torch.bool, device=h.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, dropout_p=p)
            out = out.transpose(1, 2)
        elif lengths is None:  # dense [B, L, H, hd]
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, is_causal=cfg.causal
            ).transpose(1, 2)
        else:
            out = packed_attention(q, k, v, lengths, causal=cfg.causal, dropout_p=p)
        return self.proj(out.reshape(*shape, cfg.d_model))


class Backbone(nn.Module):
    def __init__(self, cfg: BackboneConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        nn.init.kaiming_uniform_(self.embed.weight, a=math.sqrt(5))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base, cfg.max_len)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = LayerNorm(cfg.d_model, bias=not cfg.time_cond)
        if cfg.time_cond:
            self.time_embed = TimeEmbedding(cfg.cond_dim)
            self.final_ada = nn.Linear(cfg.cond_dim, 2 * cfg.d_model)
            nn.init.zeros_(self.final_ada.weight)
            nn.init.zeros_(self.final_ada.bias)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, sigma: torch.Tensor | None = None):
        """Hidden states: dense [B, L] -> [B, L, d]; packed [T] + lengths [B] -> [T, d]."""
        cfg = self.cfg
        if cfg.time_cond and sigma is None:
            raise ValueError("this backbone is time-conditioned: pass sigma (one value per sequence)")
        if lengths is not None:
            if tokens.dim() != 1:
                raise ValueError("packed input must be 1-D tokens [T] with lengths [B]")
            if int(lengths.sum()) != tokens.shape[0]:
                raise ValueError("lengths must sum to the number of packed tokens")
            positions = packed_positions(lengths)
            rows = sequence_ids(lengths)
        else:
            if tokens.dim() != 2:
                raise ValueError("dense input must be tokens [B, L]")
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            rows = None
        cos, sin = self.rotary.cos_sin(positions)
        cond = self.time_embed(sigma) if cfg.time_cond else None
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, lengths, cond, rows)
        x = self.norm(x)
        if cfg.time_cond:
            mod = self.final_ada(cond)
            mod = mod[rows] if rows is not None else mod[:, None, :]
            shift, scale = mod.chunk(2, dim=-1)
            x = x * (1 + scale) + shift
        return x

    def decode(self, tokens: torch.Tensor, cache: KVCache | None = None, *,
               capacity: int | None = None) -> tuple[torch.Tensor, KVCache]:
        """Incremental decoding of dense causal input: hidden states of the new tokens and the cache.

        tokens [B, n_new] continue the cached prefix (none: a new cache, positions from 0); their
        positions continue from len(cache), and they attend over prefix + themselves, causally
        among themselves. Returns (hidden [B, n_new, d], the cache updated in place with them),
        equal to forward(prefix + tokens)[:, -n_new:] up to float rounding. `capacity` sizes a new
        cache's buffer (tokens it holds before growing; default cfg.max_len).
        """
        cfg = self.cfg
        if not cfg.causal or cfg.time_cond:
            raise ValueError("decode needs a causal backbone without time conditioning")
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError("decode takes dense new tokens [B, n_new] with n_new >= 1")
        if cache is None:
            cache = KVCache(cfg.n_layers, cfg.max_len if capacity is None else capacity)
        elif cache.batch_size is not None and cache.batch_size != tokens.shape[0]:
            raise ValueError(f"cache holds {cache.batch_size} rows but got {tokens.shape[0]}: use select() first")
        n = tokens.shape[1]
        positions = torch.arange(cache.length, cache.length + n, device=tokens.device)
        cos, sin = self.rotary.cos_sin(positions)
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None, None, None, kv=(cache, i))
        cache.advance(n)
        return self.norm(x), cache

    # ------------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def linear_params(self) -> int:
        """Parameters used in per-token matrix multiplies (blocks only)."""
        return sum(m.weight.numel() for b in self.blocks for m in b.modules() if isinstance(m, nn.Linear) and m is not getattr(b, "ada", None))

    def forward_flops(self, lengths) -> float:
        """Forward FLOPs for a batch of sequences with these lengths (2 per multiply-add).

        Linear layers: 2 * params * tokens. Attention: 4 * d * n^2 per sequence per layer
        (QK^T and AV), halved when causal. The method's output head is not included.
        """
        lengths = torch.as_tensor(lengths, dtype=torch.float64)
        tokens = float(lengths.sum())
        attn = 4.0 * self.cfg.d_model * float((lengths**2).sum()) * self.cfg.n_layers
        if self.cfg.causal:
            attn /= 2
        return 2.0 * self.linear_params() * tokens + attn
