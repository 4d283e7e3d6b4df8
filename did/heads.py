"""Output heads: packed hidden states [T, d] -> insertion log-scores log s[i, v], [T, V] (spec §6.3).

Row i of a sequence is the slot right after its token i. Both heads factor the score as
(how many tokens go into the slot) x (which token): a softmax over the vocabulary times a
per-slot count. They differ in how the count is normalised:

* csoftmax (variable length): each slot predicts its own expected gap size, clamped at Lmax.
* seqnorm (fixed length L): the slot counts are a softmax over the slots of the same sequence
  times L - n, so the total mass is L - n (+1e-4) exactly, the fixed-length sum rule (spec §3.3).

Special tokens that are never insertion targets (BOS, PAD, MASK) get log-score -inf, so the
loss, the bound and the sampler all see the same suppressed columns.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from harness.core.backbone import packed_positions, sequence_ids
from harness.core.batch import Vocab

SEQNORM_FUDGE = 1e-4  # keeps log(L - n + fudge) finite once a sequence is full


def suppressed_tokens(vocab: Vocab) -> list[int]:
    """Token ids a DID model never inserts: BOS, PAD and MASK (EOS stays: fixed-length data use it)."""
    return sorted({vocab.bos, vocab.pad, vocab.mask} - {vocab.eos})


def segment_log_softmax(z: torch.Tensor, seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    """log_softmax of the scalars z [T] within each segment (seq [T] = segment id)."""
    zf = z.float()
    top = torch.full((n_seq,), float("-inf"), device=z.device).scatter_reduce(0, seq, zf, "amax", include_self=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    shifted = zf - top[seq]
    total = torch.zeros(n_seq, device=z.device).index_add(0, seq, shifted.exp())
    return shifted - total.log()[seq]


class _Head(nn.Module):
    def __init__(self, d_model: int, vocab: Vocab, token_bias: bool):
        super().__init__()
        self.vocab_size = vocab.size
        self.token = nn.Linear(d_model, vocab.size, bias=token_bias)
        self.count = nn.Linear(d_model, 1)
        for lin in (self.token, self.count):  # zero init: uniform tokens, unit counts at start
            nn.init.zeros_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.register_buffer("forbidden", torch.tensor(suppressed_tokens(vocab), dtype=torch.long), persistent=False)

    def token_log_probs(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.token(h).float()
        # in place on the fresh layer output (its backward does not need it): no second [T, V] copy
        logits.index_fill_(-1, self.forbidden, float("-inf"))
        return torch.log_softmax(logits, dim=-1)


class CSoftmaxHead(_Head):
    """log s[i, v] = log_softmax_v(W h_i + b) + min(w2 . h_i + b2, log Lmax)."""

    def __init__(self, d_model: int, vocab: Vocab, max_len: int):
        super().__init__(d_model, vocab, token_bias=True)
        self.log_max = math.log(max_len)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
        log_count = self.count(h).float().squeeze(-1).clamp_max(self.log_max)
        if blocked is not None:
            log_count = log_count.masked_fill(blocked, float("-inf"))
        return self.token_log_probs(h) + log_count[:, None]


class SeqNormHead(_Head):
    """log s[i, v] = log_softmax_v(W h_i) + log_softmax_{slots of the sequence}(w2 . h_i)
    + log(max(L - n, 0) + 1e-4): the total mass of a sequence of length n is L - n + 1e-4."""

    def __init__(self, d_model: int, vocab: Vocab, seq_len: int):
        super().__init__(d_model, vocab, token_bias=False)
        self.seq_len = seq_len

    def forward(
        self,
        h: torch.Tensor,
        lengths: torch.Tensor,
        blocked: torch.Tensor | None = None,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        L = self.seq_len if seq_len is None else seq_len
        seq = sequence_ids(lengths)
        slot_logit = self.count(h).float().squeeze(-1)
        if blocked is not None:  # prompt slots: the mass goes to the slots after the prompt
            slot_logit = slot_logit.masked_fill(blocked, float("-inf"))
        log_slot = segment_log_softmax(slot_logit, seq, len(lengths))
        log_mass = torch.log((L - lengths).clamp_min(0).float() + SEQNORM_FUDGE)
        return self.token_log_probs(h) + (log_slot + log_mass[seq])[:, None]


def prompt_blocked_slots(lengths: torch.Tensor, prompt_len: torch.Tensor | int) -> torch.Tensor:
    """[T] True on the slots inside a prompt: slot i < prompt_len - 1 (prompt_len counts BOS)."""
    pos = packed_positions(lengths)
    plen = torch.as_tensor(prompt_len, device=lengths.device).expand_as(lengths)
    return pos < (plen - 1)[sequence_ids(lengths)]
