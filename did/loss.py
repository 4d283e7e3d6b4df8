"""DISE and DICE (spec §4): per-sequence score-entropy losses on packed insertion scores.

For one sequence with time weight w (= 1/t for the log-linear schedule):

    DISE = w * sum_{i,v} [ s[i,v] - r[i,v] log s[i,v] + r[i,v] (log r[i,v] - 1) ]
    DICE = w * sum_{i,v} r[i,v] (log r[i,v] - log s[i,v])

Every DISE summand is >= 0 with minimum 0 at s = r, so DISE is a bound on -log p(x0) (after
the expectation over t and x_t). DICE drops the s term and the -r term, which is only valid
when the head fixes sum s = sum r = L - n (the seqnorm head); then DICE = DISE up to the
seqnorm fudge 1e-4 * w. The sums run over the slots and the vocabulary, so the value is the
sequence's NELBO contribution in nats; the caller averages over sequences.
"""
from __future__ import annotations

import torch

from did.counting import SparseTargets


def _target_terms(log_scores: torch.Tensor, targets: SparseTargets, acc_dtype: torch.dtype):
    r = targets.values.to(acc_dtype)
    log_s = log_scores[targets.rows, targets.tokens].to(acc_dtype)
    return r, log_s


def dise(
    log_scores: torch.Tensor,
    targets: SparseTargets,
    row_seq: torch.Tensor,
    weight: torch.Tensor,
    *,
    acc_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-sequence DISE [B]: log_scores [T, V] (packed slots), row_seq [T] sequence of each
    row, weight [B] (elbo_weight(t) = 1/t, or 1 for the 'simple' training loss)."""
    B = weight.shape[0]
    pos_row = torch.logsumexp(log_scores.to(torch.promote_types(log_scores.dtype, torch.float32)), dim=-1).exp().to(acc_dtype)  # sum_v s, 0 on blocked rows
    r, log_s = _target_terms(log_scores, targets, acc_dtype)
    const = r * (torch.log(r) - 1)
    per_seq = torch.zeros(B, dtype=acc_dtype, device=log_scores.device)
    per_seq = per_seq.index_add(0, row_seq, pos_row)
    per_seq = per_seq.index_add(0, row_seq[targets.rows], const - r * log_s)
    return weight.to(acc_dtype) * per_seq


def dice(
    log_scores: torch.Tensor,
    targets: SparseTargets,
    row_seq: torch.Tensor,
    weight: torch.Tensor,
    *,
    acc_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-sequence DICE [B] (fixed length, seqnorm head only: otherwise it is not a bound)."""
    B = weight.shape[0]
    r, log_s = _target_terms(log_scores, targets, acc_dtype)
    per_seq = torch.zeros(B, dtype=acc_dtype, device=log_scores.device)
    per_seq = per_seq.index_add(0, row_seq[targets.rows], r * (torch.log(r) - log_s))
    return weight.to(acc_dtype) * per_seq


LOSSES = {"dise": dise, "dice": dice}
