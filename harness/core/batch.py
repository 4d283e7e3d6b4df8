"""The clean-data batch every method receives, and the shared token accounting.

One format for every method keeps the comparison honest: all methods see the same clean
tokens at each step, and each method builds its own network input from them (DID packs the
survivors of deletion, MDLM/RADD build a masked canvas, AR shifts, ILM drops tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Vocab:
    """Token ids every method may need. `size` is the number of embedding rows.

    `bos` starts every sequence and is never predicted. `eos` terminates variable-length
    sequences for methods that need an explicit stop token (AR) and separates documents in the
    fixed layout. `pad` and `mask` are extra ids that only masked-diffusion baselines use.
    """

    size: int
    bos: int
    eos: int
    pad: int
    mask: int

    @property
    def specials(self) -> tuple[int, ...]:
        return tuple(sorted({self.bos, self.eos, self.pad, self.mask}))

    def to_dict(self) -> dict:
        return {"size": self.size, "bos": self.bos, "eos": self.eos, "pad": self.pad, "mask": self.mask}


@dataclass
class Batch:
    """Clean sequences, right-padded to the longest row.

    x0[b, 0] is BOS; x0[b, :lengths[b]] is the real sequence (BOS included); positions beyond
    a row's length hold `pad` and carry no information. In the `fixed` layout every length is L.
    """

    x0: torch.LongTensor  # [B, Lmax]
    lengths: torch.LongTensor  # [B], BOS included
    layout: str  # "fixed" | "varlen"

    def to(self, device) -> "Batch":
        return Batch(self.x0.to(device), self.lengths.to(device), self.layout)

    @property
    def size(self) -> int:
        return int(self.x0.shape[0])

    def valid_mask(self) -> torch.BoolTensor:
        """[B, Lmax] True on real tokens (BOS included)."""
        pos = torch.arange(self.x0.shape[1], device=self.x0.device)
        return pos[None, :] < self.lengths[:, None]

    def clean_tokens(self) -> int:
        """Number of real tokens in the batch (BOS included): the unit of throughput."""
        return int(self.lengths.sum())


def predicted_tokens(batch: Batch) -> torch.LongTensor:
    """Per-sequence token count N(x) that divides every method's NLL (baselines spec 6.1).

    fixed : L - 1 (BOS is given to every model; every other token is predicted).
    varlen: content + 1 = length (BOS excluded, plus one termination event: the AR's EOS,
            ILM's stop decision, the PAD block of masked models, DID's implicit length).
    """
    if batch.layout == "fixed":
        return batch.lengths - 1
    if batch.layout == "varlen":
        return batch.lengths.clone()
    raise ValueError(f"unknown layout {batch.layout!r}")
