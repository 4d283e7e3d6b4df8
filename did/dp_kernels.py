"""The subsequence-count recurrence of did.counting as one kernel per device (issue 27).

The recurrence (spec §5.2, did.counting._tables) runs M steps over the stacked prefix/suffix
state; step k reads one x0 token per (half, sequence) and updates every column at once:

    hist[k+1, h, b, c+1] = logaddexp(hist[k, h, b, c+1], hist[k, h, b, c])   where b_cols[h, b, c] == tok
                         = hist[k, h, b, c+1]                                 elsewhere

The PyTorch path (`torch_recurrence`) runs it as two kernels per step (an add and a logaddexp
over every column): 2M launches, each over the whole [2, B, Q+1] state, which makes it
dispatch-bound on a CPU and launch-bound on a GPU. The kernels here run the whole loop in one
call, one program per (half, sequence), and do the logaddexp only where the token matches
(elsewhere the value is copied, as logaddexp(x, -inf) = x does exactly):

* `numba` (CPU): a compiled loop, (half, sequence) rows in parallel (`prange`);
* `triton` (CUDA): one program per row, the columns a block; correctness-tested on the CPU under
  Triton's interpreter (TRITON_INTERPRET=1, tests/test_dp_kernels.py).

They agree with the PyTorch path to the rounding of one logaddexp per matched cell (not
bitwise: the exp/log1p implementations differ), so the backend is recorded in a run's
train.json. `DIDBENCH_DP` picks it: `torch` (the default: the committed results were trained
with it), `numba`, `triton`, or `auto` (the fastest available for the tensors' device).
"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import torch

from harness.core.errors import UserError

#: environment variable that picks the backend (BACKENDS, or "auto")
ENV = "DIDBENCH_DP"
BACKENDS = ("torch", "numba", "triton")
DEFAULT = "torch"


def available(device: torch.device) -> list[str]:
    """The backends that can run on `device` in this installation."""
    out = ["torch"]
    if device.type == "cpu" and importlib.util.find_spec("numba") is not None:
        out.append("numba")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if (device.type == "cuda" or interpreted) and importlib.util.find_spec("triton") is not None:
        out.append("triton")
    return out


def choose(device: torch.device, requested: str | None = None) -> str:
    """The backend for tensors on `device`: `requested` (else $DIDBENCH_DP, else the default);
    `auto` takes triton on CUDA, numba on a CPU, torch otherwise. A backend that cannot run here
    is a UserError naming what is missing."""
    want = (requested or os.environ.get(ENV) or DEFAULT).strip().lower()
    have = available(device)
    if want == "auto":
        return next((b for b in ("triton", "numba") if b in have), "torch")
    if want not in BACKENDS:
        raise UserError(f"{ENV}={want!r}: the DP backend must be one of {', '.join(BACKENDS)} or auto")
    if want not in have:
        need = {"numba": "a CPU tensor and `pip install numba`", "triton": "a CUDA tensor and triton "
                "(installed with PyTorch's CUDA builds), or TRITON_INTERPRET=1"}[want]
        raise UserError(f"{ENV}={want}: not available for {device.type} tensors here (needs {need})")
    return want


def torch_recurrence(a_steps: torch.Tensor, b_cols: torch.Tensor, hist: torch.Tensor) -> None:
    """The reference: two PyTorch kernels per step, every column. a_steps [M, 2, B] (the token
    step k reads), b_cols [2, B, Q+1], hist [M+1, 2, B, Q+2] with row 0 and column 0 set."""
    M = a_steps.shape[0]
    gate = torch.zeros((M, *b_cols.shape), dtype=hist.dtype, device=hist.device)
    # 0 where the x0 token matches, -inf elsewhere: X[c] <- logaddexp(X[c], X[c-1] + gate) is the
    # recurrence (logaddexp(x, -inf) = x exactly), two kernels per step and no Python slicing
    gate.masked_fill_(a_steps[..., None] != b_cols[None], float("-inf"))
    lefts, rights, gates = hist[..., :-1].unbind(0), hist[..., 1:].unbind(0), gate.unbind(0)
    shifted = torch.empty(b_cols.shape, dtype=hist.dtype, device=hist.device)
    for k in range(M):
        torch.add(lefts[k], gates[k], out=shifted)
        torch.logaddexp(rights[k], shifted, out=rights[k + 1])


_NUMBA = None


def _numba_kernel():
    """The compiled CPU kernel (built on first use; numba caches it on disk next to this file)."""
    global _NUMBA
    if _NUMBA is None:
        import numba

        @numba.njit(parallel=True, cache=True, nogil=True)
        def recurrence(a_steps, b_cols, hist):  # pragma: no cover - compiled
            M, H, B = a_steps.shape
            Q1 = b_cols.shape[2]
            for row in numba.prange(H * B):
                h, b = row // B, row % B
                # the columns of each x_t token, sorted by token: a step touches only its token's
                order = np.argsort(b_cols[h, b], kind="mergesort")
                sorted_tokens = b_cols[h, b][order]
                for k in range(M):
                    tok = a_steps[k, h, b]
                    src, dst = hist[k, h, b], hist[k + 1, h, b]
                    dst[:] = src                        # no match: the value carries over
                    lo = np.searchsorted(sorted_tokens, tok, side="left")
                    hi = np.searchsorted(sorted_tokens, tok, side="right")
                    for i in range(lo, hi):             # a match: logaddexp with the left neighbour
                        c = order[i]
                        right, left = src[c + 1], src[c]
                        top = max(right, left)
                        if top != -math.inf:
                            dst[c + 1] = top + math.log1p(math.exp(-abs(right - left)))

        _NUMBA = recurrence
    return _NUMBA


def numba_recurrence(a_steps: torch.Tensor, b_cols: torch.Tensor, hist: torch.Tensor) -> None:
    """The recurrence in one compiled call on the CPU, in place on `hist` (shared memory)."""
    _numba_kernel()(a_steps.contiguous().numpy(), b_cols.contiguous().numpy(), hist.numpy())


def triton_recurrence(a_steps: torch.Tensor, b_cols: torch.Tensor, hist: torch.Tensor) -> None:
    """The recurrence in one launch: one program per (half, sequence), the columns one block."""
    from did import dp_triton

    dp_triton.recurrence(a_steps.contiguous(), b_cols.contiguous(), hist)


RECURRENCES = {"torch": torch_recurrence, "numba": numba_recurrence, "triton": triton_recurrence}


def recurrence(a_steps: torch.Tensor, b_cols: torch.Tensor, hist: torch.Tensor, backend: str | None = None) -> str:
    """Run the recurrence with the chosen backend (`choose`); returns its name."""
    name = choose(hist.device, backend)
    if not hist.is_contiguous():
        raise ValueError("hist must be contiguous")
    RECURRENCES[name](a_steps, b_cols, hist)
    return name
