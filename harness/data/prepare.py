"""Prepare a study's data: Corpora (real text offline by default, or a synthetic source), a split by group, two layouts,
loading and batching.

`prepare(data_cfg, out_dir)` turns the `data:` section of a study config into
  out_dir/{train,valid,test}.{fixed,varlen}.pt, out_dir/tokenizer/, out_dir/manifest.json
(`data.storage: pt`, the default: the corpus in memory), or, with `data.storage: shards`, into
memory-mapped token shards made in bounded memory, resumably (harness.data.shards: the paper-scale path).
Training and evaluation read either back with `load_split` and draw batches with `batch_indices`,
a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.

Layouts (see docs/architecture.md):
* fixed : the split's documents in order, each followed by EOS, cut into rows [BOS] + (L-1) tokens.
* varlen: one document per row, [BOS] + tokens truncated to max_len, stored packed (no padding).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from harness.core.atomic import atomic_write, atomic_write_text
from harness.core.batch import Vocab
from harness.core.errors import UserError
from harness.data.corpora import load_corpus, synthetic_source
from harness.data.manifest import LAYOUTS, MANIFEST, SCHEMA, SPLITS, TOKENIZER_DIR, file_sha256, forget_checks
from harness.data.settings import config_hash, hashed_config, resolve_data_config
from harness.data.shards import prepare_shards
from harness.data.splits import cap_documents, split_documents
from harness.data.storage import SHARD_DIR
from harness.data.tokenizer import build_tokenizer


def build_fixed(encoded: list[list[int]], vocab: Vocab, seq_len: int) -> torch.Tensor:
    """[N, seq_len] int64: documents joined, each followed by EOS, rows = [BOS] + seq_len-1 tokens.

    The last partial chunk is dropped.
    """
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(vocab.eos)
    body = seq_len - 1
    n = len(stream) // body
    if n == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    chunks = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.full((n, 1), vocab.bos, dtype=torch.long), chunks], dim=1)


def build_varlen(encoded: list[list[int]], vocab: Vocab, max_len: int, min_tokens: int):
    """Packed documents: (flat tokens int64, lengths int64, n_truncated, n_dropped_short).

    Row = [BOS] + tokens truncated to `max_len` in total; rows shorter than `min_tokens`
    (BOS included) are dropped and counted.
    """
    flat: list[int] = []
    lengths: list[int] = []
    truncated = dropped = 0
    for ids in encoded:
        row = [vocab.bos] + list(ids)
        if len(row) > max_len:
            row = row[:max_len]
            truncated += 1
        if len(row) < min_tokens:
            dropped += 1
            continue
        flat.extend(row)
        lengths.append(len(row))
    return (
        torch.tensor(flat, dtype=torch.long),
        torch.tensor(lengths, dtype=torch.long),
        truncated,
        dropped,
    )


def _quantiles(values: list[int]) -> dict:
    if not values:
        return {}
    q = np.quantile(np.asarray(values, dtype=np.float64), [0.1, 0.5, 0.9, 0.99])
    return {
        "mean": float(np.mean(values)),
        "p10": float(q[0]),
        "p50": float(q[1]),
        "p90": float(q[2]),
        "p99": float(q[3]),
        "max": int(max(values)),
    }


def prepare(data_cfg: dict, out_dir, *, workers: int | None = None, progress: bool = False,
            stop_after_shards: int | None = None) -> dict:
    """Corpus -> split -> tokenizer (fit on train) -> both layouts per split -> manifest.

    Returns the manifest (also written to out_dir/manifest.json, last, so its presence means
    the directory is complete). With `data.storage: shards` this is harness.data.shards.prepare_shards
    (streaming, bounded memory, resumable); `workers` (tokenizer processes, overriding
    data.storage.workers), `progress` (a progress bar on stderr) and `stop_after_shards` (tests)
    apply to it only.
    """
    cfg = resolve_data_config(data_cfg)
    out = Path(out_dir)
    if cfg["storage"]["kind"] == "shards":
        return prepare_shards(cfg, out, workers=workers, show_progress=progress, stop_after_shards=stop_after_shards)
    if workers is not None:
        raise UserError("workers apply to data.storage: shards only (storage pt tokenises in one process)")

    source = synthetic_source(cfg)
    docs = load_corpus(cfg["corpus"])
    if not docs:
        raise UserError(f"corpus {cfg['corpus']['name']!r} has no documents")
    splits = split_documents(docs, cfg["valid_fraction"], cfg["test_fraction"], cfg["seed"])
    if cfg["max_documents"] is not None:
        splits = cap_documents(splits, cfg["max_documents"])

    tokenizer = build_tokenizer(cfg["tokenizer"], [d.text for d in splits["train"]],
                                symbols=source.symbols if source is not None else None)
    vocab = tokenizer.vocab

    # everything is built and checked before anything is written, so a user error leaves no
    # half-prepared directory behind (and never next to the manifest of an earlier prepare)
    info: dict[str, dict] = {}
    payloads: dict[str, dict] = {}
    for split in SPLITS:
        info[split] = _build_split(cfg, split, splits[split], tokenizer, payloads)

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the new one is written
    forget_checks(out)
    if (out / SHARD_DIR).is_dir():  # the shards of an earlier storage: shards prepare
        shutil.rmtree(out / SHARD_DIR)
    tokenizer.save(out / TOKENIZER_DIR)
    for name, payload in payloads.items():
        atomic_write(out / name, "wb", lambda fh: torch.save(payload, fh))

    files = sorted([f"{s}.{l}.pt" for s in SPLITS for l in LAYOUTS]) + [
        f"{TOKENIZER_DIR}/{n}" for n in sorted(os.listdir(out / TOKENIZER_DIR)) if not n.endswith(".tmp")
    ]
    corpus_hash = hashlib.sha256()
    for d in docs:
        corpus_hash.update(f"{d.id}\x00{d.group}\x00{d.text}\x01".encode())
    manifest = {
        "schema": SCHEMA,
        "config_hash": config_hash(cfg),
        "config": hashed_config(cfg),
        "corpus": cfg["corpus"]["name"],
        "options": {k: v for k, v in cfg["corpus"].items() if k != "name"},
        "corpus_documents": len(docs),
        "corpus_groups": len({d.group for d in docs}),
        "corpus_sha256": corpus_hash.hexdigest(),
        "split_groups": {s: sorted({d.group for d in splits[s]}) for s in SPLITS},
        "tokenizer": {"name": tokenizer.name, "vocab": vocab.to_dict()},
        "seq_len": cfg["seq_len"],
        "max_len": cfg["max_len"],
        "min_tokens": cfg["min_tokens"],
        "splits": info,
        "files": {f: file_sha256(out / f) for f in files},
    }
    if source is not None:  # the exact law behind the data (harness.data.synthetic)
        manifest["synthetic"] = {**source.describe(), "entropy": source.entropy()}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _build_split(cfg: dict, split: str, docs: list, tokenizer, payloads: dict) -> dict:
    """One split in both layouts: its two torch payloads go into `payloads`; returns its manifest
    entry. A split too small for one fixed chunk or one varlen row is one UserError line."""
    vocab = tokenizer.vocab
    encoded = tokenizer.encode_batch([d.text for d in docs])
    fixed = build_fixed(encoded, vocab, cfg["seq_len"])
    if fixed.shape[0] == 0:
        raise UserError(
            f"the {split} split has {sum(len(e) + 1 for e in encoded)} tokens, too few for one fixed "
            f"chunk of seq_len={cfg['seq_len']}: use more documents or a shorter seq_len"
        )
    tokens, lengths, truncated, dropped = build_varlen(encoded, vocab, cfg["max_len"], cfg["min_tokens"])
    if lengths.numel() == 0:
        raise UserError(f"the {split} split has no document with at least min_tokens={cfg['min_tokens']} tokens")
    common = {"schema": SCHEMA, "split": split, "vocab": vocab.to_dict()}
    payloads[f"{split}.fixed.pt"] = {**common, "layout": "fixed", "seq_len": cfg["seq_len"], "tokens": fixed}
    payloads[f"{split}.varlen.pt"] = {**common, "layout": "varlen", "max_len": cfg["max_len"], "tokens": tokens,
                                      "lengths": lengths}
    doc_tokens = [len(e) for e in encoded]
    return {
        "groups": len({d.group for d in docs}),
        "documents": len(docs),
        "content_tokens": int(sum(doc_tokens)),
        "document_tokens": _quantiles(doc_tokens),
        "fixed": {"sequences": int(fixed.shape[0]), "tokens": int(fixed.numel())},
        "varlen": {
            "sequences": int(lengths.numel()),
            "tokens": int(tokens.numel()),
            "truncated": truncated,
            "dropped_short": dropped,
        },
    }
