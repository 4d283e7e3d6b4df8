"""The forward deletion process (spec §2): every non-BOS token disappears independently.

With the log-linear schedule a token survives to time t with probability alpha(t) =
1 - (1 - eps) t, so x_t is x0 with each deletable token dropped with probability (1 - eps) t.
The survivors are packed (concatenated without padding): the network never sees a MASK or a
PAD, which is where DID saves its compute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.core import schedule
from harness.core.sampling import uniform


@dataclass
class Deleted:
    """One draw x_t ~ p_t(. | x0) for a batch.

    tokens : [T] survivors of all sequences, packed in batch order (BOS first in each).
    lengths: [B] survivor count n per sequence (BOS included), sum = T.
    keep   : [B, Lmax] True where x0 survived (False beyond a row's length).
    t      : [B] float64 time of each sequence.
    """

    tokens: torch.LongTensor
    lengths: torch.LongTensor
    keep: torch.BoolTensor
    t: torch.Tensor

    def row_sequence(self) -> torch.LongTensor:
        """[T] index of the sequence each packed row belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=self.lengths.device), self.lengths)


def delete(
    x0: torch.LongTensor,
    lengths: torch.LongTensor,
    t: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    protect: torch.LongTensor | int | None = None,
    eps: float = schedule.EPS,
) -> Deleted:
    """Draw x_t for every row of the padded batch `x0` [B, Lmax] (x0[:, 0] = BOS).

    `t` [B]: times; by default stratified over the batch in [1e-3, 1] (harness.core.schedule).
    `protect`: per-row (or shared) number of leading tokens that are never deleted, BOS
    included (a prompt of P content tokens is protect = P + 1). Default 1 (BOS only).
    """
    B, L = x0.shape
    device = x0.device
    if t is None:
        t = schedule.stratified_t(B, generator, device=device)
    t = t.to(device=device, dtype=torch.float64)
    delete_prob = (1 - eps) * t  # = 1 - alpha(t)
    pos = torch.arange(L, device=device)
    valid = pos[None, :] < lengths.to(device)[:, None]
    keep = uniform((B, L), generator, device) >= delete_prob[:, None]
    if protect is None:
        protect = 1
    protect_t = torch.as_tensor(protect, device=device).clamp_min(1)
    protected = pos[None, :] < protect_t.reshape(-1, 1)
    keep = (keep | protected) & valid
    return from_keep(x0, keep, t)


def from_keep(x0: torch.LongTensor, keep: torch.BoolTensor, t: torch.Tensor) -> Deleted:
    """The Deleted record of a given survival mask [B, Lmax] (False beyond each row's length)."""
    return Deleted(tokens=x0[keep], lengths=keep.sum(1), keep=keep, t=t.to(device=x0.device, dtype=torch.float64))


def deletable(lengths: torch.LongTensor, width: int, protect: int = 1) -> torch.BoolTensor:
    """[B, width] True on the positions the forward process may delete (not BOS / a prompt)."""
    pos = torch.arange(width, device=lengths.device)
    return (pos[None, :] >= protect) & (pos[None, :] < lengths[:, None])
