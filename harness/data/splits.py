"""The train/valid/test split, by group, deterministic in the seed.

`split_documents` deals whole groups (a play, a file, a document) in sha256(seed, group) order,
so the same text never lands in two splits; `split_of` is the same order for one document at a
time (the streaming shards path).
"""
from __future__ import annotations

import hashlib

from harness.core.errors import UserError
from harness.data.corpora import Document
from harness.data.manifest import SPLITS


def _group_key(group: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{group}".encode()).hexdigest()


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    for name, f in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f < 1:
            raise UserError(f"data.{name} must be a number in (0, 1), got {f!r}")
    if valid_fraction + test_fraction >= 1:
        raise UserError("data.valid_fraction + data.test_fraction must be < 1")


def split_documents(docs: list[Document], valid_fraction: float, test_fraction: float, seed: int) -> dict:
    """{"train","valid","test"} -> documents, split by group, deterministic.

    Groups are ordered by sha256(seed, group) and dealt in that order to test, then valid, until
    each holds its fraction of the documents (at least one group each); the rest is train. A new
    group only moves groups near a boundary, not the whole split. Document order is kept.
    This needs every group's size first; `split_of` is the per-document rule of the streaming path.
    """
    check_fractions(valid_fraction, test_fraction)
    sizes: dict[str, int] = {}
    for d in docs:
        sizes[d.group] = sizes.get(d.group, 0) + 1
    if len(sizes) < 3:
        raise UserError(
            f"cannot split {len(sizes)} group(s) into train/valid/test: need at least 3 "
            "(for local files, use one file per group or group_by: document)"
        )
    order = sorted(sizes, key=lambda g: _group_key(g, seed))
    total = len(docs)
    assign: dict[str, str] = {}
    pos = 0
    for split, frac, keep in (("test", test_fraction, 2), ("valid", valid_fraction, 1)):
        held = 0  # `keep` groups stay for the splits still to fill
        while pos < len(order) - keep and (held == 0 or held < frac * total):
            assign[order[pos]] = split
            held += sizes[order[pos]]
            pos += 1
    for g in order[pos:]:
        assign[g] = "train"
    out = {s: [d for d in docs if assign[d.group] == s] for s in SPLITS}
    empty = [s for s in SPLITS if not out[s]]
    if empty:
        raise UserError(f"the {'/'.join(empty)} split would be empty: lower the valid/test fractions or add groups")
    return out


def split_of(group: str, seed: int, valid_fraction: float, test_fraction: float) -> str:
    """The split of one document from its group alone (`data.storage: shards`, streaming).

    The same order as `split_documents` (sha256(seed, group), test first, then valid), cut at
    fixed points instead of by document counts: u = the first 64 bits of the hash / 2^64 goes to
    test if u < test_fraction, to valid if u < test_fraction + valid_fraction, else to train. So
    the fractions hold in expectation over groups, not exactly in documents, and a corpus of few
    groups can leave a split empty (prepare then says so). Where split_documents' cut points fall
    at those fractions, the two rules agree.
    """
    u = int(_group_key(group, seed)[:16], 16) / 2.0**64
    return "test" if u < test_fraction else "valid" if u < test_fraction + valid_fraction else "train"


def cap_documents(splits: dict, max_documents: int) -> dict:
    """Keep about `max_documents` in all, each split its share (>= 1), the first in order."""
    if not isinstance(max_documents, int) or max_documents < len(SPLITS):
        raise UserError(f"data.max_documents must be an integer >= 3, got {max_documents!r}")
    total = sum(len(v) for v in splits.values())
    if total <= max_documents:
        return splits
    return {s: v[: max(1, round(max_documents * len(v) / total))] for s, v in splits.items()}
