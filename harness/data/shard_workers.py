"""The tokenizer processes of the shards writer (harness.data.shards).

Spawned workers import this module only, with numpy and `tokenizers`: no torch, so a worker
starts in a fraction of a second.
"""
from __future__ import annotations

import os

import numpy as np

_WORKER: dict = {}


def worker_init(tokenizer_file: str, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread each: the processes are the parallelism
    from tokenizers import Tokenizer

    _WORKER["tok"] = Tokenizer.from_file(tokenizer_file)
    _WORKER["dtype"] = np.dtype(dtype)


def encode(tok, texts: list[str], dtype) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=dtype) for e in tok.encode_batch(texts, add_special_tokens=False)]


def worker_encode(texts: list[str]) -> list[np.ndarray]:
    return encode(_WORKER["tok"], texts, _WORKER["dtype"])
