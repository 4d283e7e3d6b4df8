"""The subsequence-count recurrence (did.dp_kernels) as one Triton kernel: one program per
(half, sequence) row, the M steps a loop inside it, the Q+1 columns one block.

Each step loads row k of the row's state, computes row k+1 (a logaddexp where the x0 token
matches the column's x_t token, a copy elsewhere) and stores it; a barrier then makes the stored
row visible to the whole program before the next step reads its left neighbours. Imported only
when the triton backend is used; tested on a CPU under TRITON_INTERPRET=1 against the PyTorch
path and the brute-force oracle (tests/test_dp_kernels.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _recurrence_kernel(hist_ptr, a_ptr, b_ptr, M, rows, Q1, BLOCK: tl.constexpr):
    row = tl.program_id(0)                       # h * B + b: the row of a [2, B] state
    cols = tl.arange(0, BLOCK)
    live = cols < Q1
    btok = tl.load(b_ptr + row * Q1 + cols, mask=live, other=-3)   # -3: never a token nor a sentinel
    step = rows * (Q1 + 1)                        # elements between hist[k] and hist[k + 1]
    base = hist_ptr + row * (Q1 + 1)
    for k in range(M):
        tok = tl.load(a_ptr + k * rows + row)
        here = base + k * step
        right = tl.load(here + 1 + cols, mask=live, other=float("-inf"))
        left = tl.load(here + cols, mask=live, other=float("-inf"))
        finite = left > float("-inf")
        left = tl.where(finite, left, 0.0)            # no -inf - -inf (NaN) where it is not used
        hi = tl.maximum(right, left)
        both = hi + tl.log(1.0 + tl.exp(-tl.abs(right - left)))
        new = tl.where((btok == tok) & finite, both, right)
        tl.store(here + step + 1 + cols, new, mask=live)
        tl.debug_barrier()


def recurrence(a_steps: torch.Tensor, b_cols: torch.Tensor, hist: torch.Tensor) -> None:
    """a_steps [M, 2, B], b_cols [2, B, Q+1], hist [M+1, 2, B, Q+2] (contiguous), in place."""
    M, H, B = a_steps.shape
    Q1 = b_cols.shape[2]
    if M == 0 or H * B == 0:
        return
    block = triton.next_power_of_2(Q1)
    _recurrence_kernel[(H * B,)](hist, a_steps, b_cols, M, H * B, Q1, BLOCK=block)
