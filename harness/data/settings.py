"""The `data:` section: its defaults, validation, and the hash that names the prepared data.
"""
from __future__ import annotations

import hashlib
import json

from harness.core.errors import UserError
from harness.data.storage import hashed_storage, resolve_storage


DATA_DEFAULTS = {
    "corpus": {"name": "shakespeare"},
    "tokenizer": {"kind": "bpe", "vocab_size": 2048},
    "seq_len": 128,
    "max_len": 128,
    "min_tokens": 4,
    "valid_fraction": 0.05,
    "test_fraction": 0.05,
    "seed": 1234,
    "max_documents": None,
    # pt: one torch file per split and layout, built in memory; shards: harness.data.shards. Left out
    # of config_hash when pt, so the hash of every config from before the key is unchanged
    "storage": "pt",
}


def resolve_data_config(data_cfg: dict | None) -> dict:
    """`data_cfg` with defaults filled in; unknown keys and bad values raise UserError."""
    cfg = dict(data_cfg or {})
    unknown = sorted(set(cfg) - set(DATA_DEFAULTS))
    if unknown:
        raise UserError(f"unknown data key(s): {', '.join(unknown)} (known: {', '.join(DATA_DEFAULTS)})")
    out = {k: cfg.get(k, v) for k, v in DATA_DEFAULTS.items()}
    if isinstance(out["corpus"], str):
        out["corpus"] = {"name": out["corpus"]}
    for key in ("seq_len", "max_len", "min_tokens", "seed"):
        if not isinstance(out[key], int) or isinstance(out[key], bool):
            raise UserError(f"data.{key} must be an integer, got {out[key]!r}")
    if out["seq_len"] < 2:
        raise UserError(f"data.seq_len must be >= 2 (BOS + one token), got {out['seq_len']}")
    if out["max_len"] < 2:
        raise UserError(f"data.max_len must be >= 2 (BOS + one token), got {out['max_len']}")
    if not 1 <= out["min_tokens"] <= out["max_len"]:
        raise UserError(f"data.min_tokens must be in [1, max_len={out['max_len']}], got {out['min_tokens']}")
    out["storage"] = resolve_storage(out["storage"])
    return out


def hashed_config(data_cfg: dict) -> dict:
    """The resolved data config as it names the data (config_hash, the manifest's "config"):
    `storage` left out when it is pt, and its speed-only options (workers, batch_documents)
    always, so every config written before the key existed keeps its hash."""
    cfg = resolve_data_config(data_cfg)
    storage = hashed_storage(cfg.pop("storage"))
    if storage is not None:
        cfg["storage"] = storage
    return cfg


def config_hash(data_cfg: dict) -> str:
    """sha256 of the resolved data config (canonical JSON, `hashed_config`): names the prepared data."""
    text = json.dumps(hashed_config(data_cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
