"""Batches as a pure function of (seed, step): a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import numpy as np
from harness.core.batch import Batch
from harness.core.errors import UserError
from harness.data.storage import TokenData


@lru_cache(maxsize=8)
def _permutation(n_items: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n_items)


def batch_indices(n_items: int, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1) -> list[int]:
    """Item indices of `rank`'s share of global batch `step`: a pure function of its arguments.

    Global position p = step * batch_size + j walks through one permutation per epoch
    (epoch = p // n_items, permutation seeded by (seed, epoch)). Rank r of W takes positions
    j in [r*B/W, (r+1)*B/W) of the global batch, so ranks are disjoint within an epoch.
    """
    if n_items <= 0:
        raise UserError("cannot draw batches from an empty data split")
    if batch_size <= 0 or batch_size % world != 0:
        raise UserError(f"batch_size {batch_size} must be a positive multiple of the world size {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of size {world}")
    per_rank = batch_size // world
    start = step * batch_size + rank * per_rank
    out = []
    for p in range(start, start + per_rank):
        epoch, k = divmod(p, n_items)
        out.append(int(_permutation(n_items, seed, epoch)[k]))
    return out


def iter_batches(
    data: TokenData, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1
) -> Iterator[tuple[int, Batch]]:
    """Endless (step, Batch) from `start_step` on; resuming at step k gives the same batches."""
    step = start_step
    while True:
        yield step, data.batch(batch_indices(len(data), batch_size, seed, step, rank, world))
        step += 1


def eval_batches(data: TokenData, batch_size: int, max_sequences: int | None = None) -> Iterator[Batch]:
    """The first `max_sequences` items (all if None), in order, in batches of `batch_size`."""
    n = len(data) if max_sequences is None else min(len(data), int(max_sequences))
    for start in range(0, n, batch_size):
        yield data.batch(range(start, min(n, start + batch_size)))
