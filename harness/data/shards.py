"""Streaming, sharded, resumable data preparation: `data.storage: shards` (the paper-scale path).

`harness.data.prepare.prepare` holds the whole corpus in memory and writes one torch file per split and
layout; that is fine for Shakespeare and impossible for OpenWebText (~9 B GPT-2 tokens). With
`data.storage: shards` the same config is prepared in bounded memory instead:

* documents are streamed from the corpus (`harness.data.corpora.iter_corpus`: local text files line by
  line, a `datasets` dataset batch by batch), never listed;
* each document goes to train/valid/test by its group alone (`harness.data.splits.split_of`: the same
  sha256(seed, group) order as `split_documents`, cut at fixed points of the hash range, so the
  fractions hold in expectation over groups rather than exactly in documents);
* the tokenizer is GPT-2's (fixed) or a BPE fitted on the first `tokenizer_documents` train
  documents of the stream (all of them when there are fewer);
* documents are tokenised in batches (in this process, or in `workers` processes with a bounded
  number of batches in flight), and the two layouts are built exactly as `build_fixed` and
  `build_varlen` build them, the fixed layout carrying its remainder across shard boundaries.

Shard k holds the rows made from corpus documents [D(k-1), D(k)) of the stream: a shard closes
after the document that brings its tokens (content + EOS, all splits together) to `shard_tokens`,
and at the end of the stream. Peak memory is set by `shard_tokens` (about 8 bytes a token for
uint16 ids), not by the corpus. Files under out_dir:

  tokenizer/                               as for storage pt
  shards/{split}.fixed.{k:05d}.npy         [rows, seq_len] uint16 (uint32 if the vocabulary > 65536)
  shards/{split}.varlen.{k:05d}.npy        [tokens] the varlen rows of shard k, packed
  shards/{split}.varlen.{k:05d}.lengths.npy [rows] int32, lengths including BOS
  shards/progress.json                     resumption state, rewritten after every shard
  manifest.json                            written last: "storage": "shards", the shard table
                                           ("shards") and the sha256 of every file ("files")

Every shard file is written atomically (harness.core.atomic) and hashed as it is written; after all
files of shard k the progress file records them, with the stream position D(k), a chained hash
of the documents read so far and the accumulators (fixed remainder, statistics). A killed prepare
started again with the same config checks the recorded files (size and sha256) and the corpus
(the documents of the finished shards are read again, not tokenised, and must hash the same),
then continues after the last finished shard. Any mismatch (another config, a changed corpus, a
damaged shard) starts over. `harness.data.storage.load_split` reads the shards by memory map
(`harness.data.storage.ShardedTokenData`, the same interface as `TokenData`).

Torch-free at import (the tokenizer worker processes import only this module, numpy and
`tokenizers`); `harness.data` is imported where needed.
"""
from __future__ import annotations

from collections import Counter, deque
from itertools import islice

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
from harness.core.atomic import atomic_write_text
from harness.core.errors import UserError
from harness.core.runtime import progress as progress_bar
from harness.data.corpora import iter_corpus, synthetic_source
from harness.data.manifest import LAYOUTS, MANIFEST, SCHEMA, SPLITS, TOKENIZER_DIR, file_sha256, forget_checks
from harness.data.settings import config_hash, hashed_config
from harness.data.shard_workers import encode, worker_encode, worker_init
from harness.data.splits import check_fractions, split_of
from harness.data.storage import SHARD_DIR, shard_names, token_dtype, write_array
from harness.data.tokenizer import TextTokenizer, build_tokenizer


PROGRESS = "progress.json"


PROGRESS_SCHEMA = "didbench.shards-progress/1"


#: distinct groups listed per split in the manifest; beyond this the names (and the group counts)
#: are not kept, so memory does not grow with a corpus whose every document is its own group
GROUP_LIST_LIMIT = 10_000


class ShardsInterrupted(RuntimeError):
    """Raised by `prepare_shards(stop_after_shards=k)` (tests, the benchmark) as if killed."""




def _batched(iterable, n: int):
    it = iter(iterable)
    while True:
        chunk = list(islice(it, n))
        if not chunk:
            return
        yield chunk


def _encoded_batches(docs, tokenizer, dtype, batch_documents: int, workers: int, tokenizer_file: Path):
    """(documents, ids arrays) batch by batch, in stream order; at most 2 x workers batches in flight."""
    if workers <= 1:
        for batch in _batched(docs, batch_documents):
            yield batch, encode(tokenizer._tok, [d.text for d in batch], dtype)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork of a process holding torch / tokenizers threads
    with ctx.Pool(workers, initializer=worker_init, initargs=(str(tokenizer_file), np.dtype(dtype).str)) as pool:
        pending: deque = deque()
        for batch in _batched(docs, batch_documents):
            pending.append((batch, pool.apply_async(worker_encode, ([d.text for d in batch],))))
            if len(pending) >= 2 * workers:
                b, r = pending.popleft()
                yield b, r.get()
        while pending:
            b, r = pending.popleft()
            yield b, r.get()


def _doc_bytes(d) -> bytes:
    """A document as the pt path's corpus hash reads it."""
    return f"{d.id}\x00{d.group}\x00{d.text}\x01".encode()


def _chain(prev_hex: str, shard_digest: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hex) + shard_digest).hexdigest()


def quantiles_from_counts(counts: dict[int, int]) -> dict:
    """`harness.data.prepare._quantiles` of the values a histogram {value: count} describes (numpy's
    linear interpolation, to rounding)."""
    if not counts:
        return {}
    values = np.array(sorted(counts), dtype=np.float64)
    cum = np.cumsum([counts[int(v)] for v in values])
    n = int(cum[-1])
    out = {"mean": float(sum(v * counts[int(v)] for v in values) / n)}
    for name, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        h = (n - 1) * q
        lo = int(np.floor(h))
        hi = min(lo + 1, n - 1)
        a = values[np.searchsorted(cum, lo, side="right")]
        b = values[np.searchsorted(cum, hi, side="right")]
        out[name] = float(a + (b - a) * (h - lo))
    out["max"] = int(values[-1])
    return out


class _SplitState:
    """What one split has accumulated: statistics, the fixed layout's remainder, and the rows of
    the shard being built (not persisted: a shard is rebuilt from its documents on resume)."""

    def __init__(self, vocab, dtype, cfg: dict, saved: dict | None = None):
        self.vocab, self.dtype = vocab, dtype
        self.seq_len, self.max_len, self.min_tokens = cfg["seq_len"], cfg["max_len"], cfg["min_tokens"]
        s = saved or {}
        self.documents = int(s.get("documents", 0))
        self.content_tokens = int(s.get("content_tokens", 0))
        self.lengths_hist = Counter({int(k): int(v) for k, v in s.get("lengths_hist", {}).items()})
        self.truncated = int(s.get("truncated", 0))
        self.dropped = int(s.get("dropped_short", 0))
        self.fixed_rows = int(s.get("fixed_rows", 0))
        self.varlen_rows = int(s.get("varlen_rows", 0))
        self.varlen_tokens = int(s.get("varlen_tokens", 0))
        groups = s.get("groups", [])
        self.groups: set | None = None if groups is None else set(groups)
        self.carry = np.asarray(s.get("carry", []), dtype=dtype)
        self._eos = np.array([vocab.eos], dtype=dtype)
        self._reset_pending()

    def _reset_pending(self):
        self.fixed_parts: list[np.ndarray] = [self.carry]
        self.rows: list[np.ndarray] = []
        self.row_lengths: list[int] = []

    def add(self, group: str, ids: np.ndarray) -> None:
        """One document: as build_fixed (ids, EOS into the stream) and build_varlen (one row)."""
        n = int(ids.shape[0])
        self.documents += 1
        self.content_tokens += n
        self.lengths_hist[n] += 1
        if self.groups is not None:
            self.groups.add(group)
            if len(self.groups) > GROUP_LIST_LIMIT:
                self.groups = None
        self.fixed_parts.append(ids)
        self.fixed_parts.append(self._eos)
        length = min(n + 1, self.max_len)
        if n + 1 > self.max_len:
            self.truncated += 1
        if length < self.min_tokens:
            self.dropped += 1
            return
        row = np.empty(length, dtype=self.dtype)
        row[0] = self.vocab.bos
        row[1:] = ids[: length - 1]
        self.rows.append(row)
        self.row_lengths.append(length)

    def build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fixed rows [n, seq_len], varlen tokens, varlen lengths) of the pending shard; the
        fixed remainder stays for the next shard (and is dropped at the end, as build_fixed does)."""
        body = self.seq_len - 1
        stream = np.concatenate(self.fixed_parts) if len(self.fixed_parts) > 1 else self.carry
        n = stream.shape[0] // body
        fixed = np.empty((n, self.seq_len), dtype=self.dtype)
        fixed[:, 0] = self.vocab.bos
        fixed[:, 1:] = stream[: n * body].reshape(n, body)
        self.carry = stream[n * body :].copy()
        tokens = np.concatenate(self.rows) if self.rows else np.empty(0, dtype=self.dtype)
        lengths = np.asarray(self.row_lengths, dtype=np.int32)
        self.fixed_rows += n
        self.varlen_rows += int(lengths.shape[0])
        self.varlen_tokens += int(tokens.shape[0])
        self._reset_pending()
        return fixed, tokens, lengths

    def saved(self) -> dict:
        return {
            "documents": self.documents, "content_tokens": self.content_tokens,
            "lengths_hist": {str(k): v for k, v in sorted(self.lengths_hist.items())},
            "truncated": self.truncated, "dropped_short": self.dropped, "fixed_rows": self.fixed_rows,
            "varlen_rows": self.varlen_rows, "varlen_tokens": self.varlen_tokens,
            "groups": None if self.groups is None else sorted(self.groups), "carry": self.carry.tolist(),
        }

    def info(self) -> dict:
        """The manifest's per-split block, as the pt path writes it."""
        return {
            "groups": None if self.groups is None else len(self.groups),
            "documents": self.documents,
            "content_tokens": self.content_tokens,
            "document_tokens": quantiles_from_counts(self.lengths_hist),
            "fixed": {"sequences": self.fixed_rows, "tokens": self.fixed_rows * self.seq_len},
            "varlen": {"sequences": self.varlen_rows, "tokens": self.varlen_tokens,
                       "truncated": self.truncated, "dropped_short": self.dropped},
        }


def _note(msg: str) -> None:
    print(f"prepare: {msg}", file=sys.stderr, flush=True)


def _read_progress(path: Path, chash: str) -> dict | None:
    """The progress of an earlier prepare of the same config, or None (absent, other, corrupt)."""
    if not path.exists():
        return None
    try:
        p = json.loads(path.read_text())
        ok = p.get("schema") == PROGRESS_SCHEMA and p.get("config_hash") == chash
    except (ValueError, OSError):
        ok = False
    if not ok:
        _note(f"{path} belongs to another config or is unreadable: starting over")
        return None
    return p


def _files_intact(out: Path, files: dict) -> str | None:
    """None if every recorded file has its size and sha256, else the first one that does not."""
    for name, rec in files.items():
        path = out / name
        if not path.is_file() or path.stat().st_size != rec["bytes"] or file_sha256(path) != rec["sha256"]:
            return name
    return None


def _clear(out: Path) -> None:
    """Remove what an earlier prepare left: pt files, shards, tokenizer (never the manifest's
    neighbours that are not ours)."""
    for s in SPLITS:
        for lay in LAYOUTS:
            (out / f"{s}.{lay}.pt").unlink(missing_ok=True)
    shard_dir = out / SHARD_DIR
    if shard_dir.is_dir():
        for f in shard_dir.iterdir():
            if f.is_file() and (f.suffix == ".npy" or f.name == PROGRESS or f.name.endswith(".tmp")):
                f.unlink()
    tok_dir = out / TOKENIZER_DIR
    if tok_dir.is_dir():
        for f in tok_dir.iterdir():
            if f.is_file():
                f.unlink()


def prepare_shards(cfg: dict, out_dir, *, workers: int | None = None, show_progress: bool = False,
                   stop_after_shards: int | None = None) -> dict:
    """Prepare the resolved data config `cfg` (storage kind shards) into `out_dir`; returns the
    manifest (written last). Resumes an interrupted prepare of the same config.

    `workers` overrides data.storage.workers. `stop_after_shards` (tests, fault injection) raises
    ShardsInterrupted after that many shards were committed by this call, as if killed.
    """
    st = cfg["storage"]
    workers = st["workers"] if workers is None else int(workers)
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    source = synthetic_source(cfg)
    check_fractions(cfg["valid_fraction"], cfg["test_fraction"])
    if cfg["max_documents"] is not None and (not isinstance(cfg["max_documents"], int) or cfg["max_documents"] < 3):
        raise UserError(f"data.max_documents must be an integer >= 3, got {cfg['max_documents']!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the new manifest is written
    forget_checks(out)
    progress, tokenizer = _open(cfg, out, source)
    writer = _ShardWriter(cfg, out, progress, tokenizer, stop_after_shards,
                          progress_bar(desc=f"prepare {cfg['corpus']['name']}", unit=" doc") if show_progress else None)
    docs = iter(_stream(cfg))
    why = writer.verify_finished(docs)
    if why is not None:
        writer.close_bar()
        _note(f"{why}: starting over")
        (out / SHARD_DIR / PROGRESS).unlink(missing_ok=True)
        return prepare_shards(cfg, out, workers=workers, show_progress=show_progress,
                              stop_after_shards=stop_after_shards)
    try:
        if not progress["done"]:
            writer.write_rest(docs, workers)
    finally:
        writer.close_bar()
    return _finish(cfg, out, progress, writer.splits, writer.chain, tokenizer, source)


def _stream(cfg: dict):
    """The corpus's documents in order, the first `max_documents` of them when that is set."""
    docs = iter_corpus(cfg["corpus"])
    return docs if cfg["max_documents"] is None else islice(docs, cfg["max_documents"])


def _split_for(cfg: dict, d) -> str:
    return split_of(d.group, cfg["seed"], cfg["valid_fraction"], cfg["test_fraction"])


def _open(cfg: dict, out: Path, source) -> tuple[dict, TextTokenizer]:
    """(progress, tokenizer): the progress of an interrupted prepare of the same config whose files
    are intact, or a fresh start: the directory cleared, the tokenizer made (GPT-2's, or a BPE
    fitted on the first `tokenizer_documents` train documents of the stream) and recorded."""
    progress_path = out / SHARD_DIR / PROGRESS
    chash = config_hash(cfg)
    progress = _read_progress(progress_path, chash)
    if progress is not None:
        bad = _files_intact(out, progress["tokenizer_files"]) or _files_intact(
            out, {n: r for s in progress["shards"] for n, r in s["files"].items()})
        if bad is None:
            return progress, TextTokenizer.load(out / TOKENIZER_DIR)
        _note(f"{bad} is missing or does not match the progress file: starting over")
    _clear(out)
    sample = []   # the corpus is read for a tokenizer sample only when the tokenizer is fitted (BPE)
    if cfg["tokenizer"].get("kind", "bpe") == "bpe":
        train = (d.text for d in _stream(cfg) if _split_for(cfg, d) == "train")
        sample = islice(train, cfg["storage"]["tokenizer_documents"])
    tokenizer = build_tokenizer(cfg["tokenizer"], sample, symbols=source.symbols if source is not None else None)
    tokenizer.save(out / TOKENIZER_DIR)
    tok_files = {}
    for f in sorted(os.listdir(out / TOKENIZER_DIR)):
        p = out / TOKENIZER_DIR / f
        if not f.endswith(".tmp"):
            tok_files[f"{TOKENIZER_DIR}/{f}"] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    progress = {"schema": PROGRESS_SCHEMA, "config_hash": chash, "tokenizer_files": tok_files,
                "shards": [], "state": None, "done": False}
    atomic_write_text(progress_path, json.dumps(progress) + "\n")
    return progress, tokenizer


class _ShardWriter:
    """The stream of documents into shards: what is pending in the current shard, the chained
    hash of the documents read so far, and the progress file rewritten after every shard."""

    def __init__(self, cfg: dict, out: Path, progress: dict, tokenizer, stop_after: int | None, bar):
        self.cfg, self.out, self.progress, self.tokenizer, self.stop_after, self.bar = (
            cfg, out, progress, tokenizer, stop_after, bar)
        self.dtype = token_dtype(tokenizer.vocab.size)
        saved = progress["state"] or {}
        self.splits = {s: _SplitState(tokenizer.vocab, self.dtype, cfg, saved.get(s)) for s in SPLITS}
        self.shards: list[dict] = list(progress["shards"])
        self.chain, self.position, self.committed = "", 0, 0
        self.shard_hash = hashlib.sha256()
        self.pending_docs = self.pending_tokens = 0

    def verify_finished(self, docs) -> str | None:
        """Read the finished shards' documents again (not tokenised) and check their chained hash;
        the reason to start over, or None."""
        for entry in self.shards:
            start = self.position
            h = hashlib.sha256()
            for d in islice(docs, entry["documents_end"] - self.position):
                h.update(_doc_bytes(d))
                self.position += 1
            self.chain = _chain(self.chain, h.digest())
            if self.position != entry["documents_end"] or self.chain != entry["chain"]:
                return f"the corpus differs from the one shard {entry['index']} was made of"
            if self.bar is not None:
                self.bar.update(self.position - start)
        if self.progress["done"] and next(docs, None) is not None:
            return "the corpus has more documents than when it was prepared"
        if self.shards:
            what = "complete" if self.progress["done"] else f"resuming after shard {len(self.shards) - 1}"
            _note(f"{what}: {len(self.shards)} shard(s) of {self.position} documents verified")
        return None

    def write_rest(self, docs, workers: int) -> None:
        """Tokenise the rest of the stream into shards, a shard closing at `shard_tokens`."""
        st = self.cfg["storage"]
        for batch, encoded in _encoded_batches(docs, self.tokenizer, self.dtype, st["batch_documents"], workers,
                                               self.out / TOKENIZER_DIR / "tokenizer.json"):
            for d, ids in zip(batch, encoded):
                self.splits[_split_for(self.cfg, d)].add(d.group, ids)
                self.shard_hash.update(_doc_bytes(d))
                self.position += 1
                self.pending_docs += 1
                self.pending_tokens += int(ids.shape[0]) + 1
                if self.pending_tokens >= st["shard_tokens"]:
                    self.commit()
            if self.bar is not None:
                self.bar.update(len(batch))
        if self.pending_docs:
            self.commit()
        self.progress["done"] = True
        atomic_write_text(self.out / SHARD_DIR / PROGRESS, json.dumps(self.progress) + "\n")

    def commit(self) -> None:
        """Write shard k's files (every split, both layouts), then record them in the progress file."""
        k = len(self.shards)
        files: dict[str, dict] = {}
        table: dict[str, dict] = {}
        for s, state in self.splits.items():
            fixed, tokens, lengths = state.build()
            names = shard_names(s, "fixed", k)
            files[names["file"]] = write_array(self.out / names["file"], fixed)
            table[f"{s}.fixed"] = {"rows": int(fixed.shape[0]), "tokens": int(fixed.size)}
            names = shard_names(s, "varlen", k)
            files[names["file"]] = write_array(self.out / names["file"], tokens)
            files[names["lengths_file"]] = write_array(self.out / names["lengths_file"], lengths)
            table[f"{s}.varlen"] = {"rows": int(lengths.shape[0]), "tokens": int(tokens.shape[0])}
        self.chain = _chain(self.chain, self.shard_hash.digest())
        self.shards.append({"index": k, "documents_end": self.position, "chain": self.chain, "files": files,
                            "table": table})
        self.progress.update(shards=self.shards, state={s: state.saved() for s, state in self.splits.items()})
        atomic_write_text(self.out / SHARD_DIR / PROGRESS, json.dumps(self.progress) + "\n")
        self.shard_hash = hashlib.sha256()
        self.pending_docs = self.pending_tokens = 0
        self.committed += 1
        if self.bar is not None:
            self.bar.set_postfix(shards=len(self.shards), refresh=False)
        if self.stop_after is not None and self.committed >= self.stop_after:
            raise ShardsInterrupted(f"stopped after {self.committed} shard(s), as asked")

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _more_groups(corpus: dict) -> str:
    """What gives this corpus more split groups (each corpus groups its documents its own way)."""
    name = corpus.get("name")
    if name == "text-files":
        return "set data.corpus.group_by: document (every document its own group)"
    if name == "hf":
        return "set data.corpus.group_field: null (every document its own group)"
    return (f"use data.storage pt (its {name} groups are dealt to the splits in order, at least one each)"
            if name else "use data.storage pt")


def _finish(cfg, out: Path, progress: dict, splits: dict, chain: str, tokenizer, source) -> dict:
    """Checks the pt path makes up front, then stale files out, then the manifest (last)."""

    if position_total(progress) == 0:
        raise UserError(f"corpus {cfg['corpus']['name']!r} has no documents")
    empty = [s for s in SPLITS if splits[s].documents == 0]
    if empty:
        raise UserError(
            f"the {'/'.join(empty)} split is empty: with data.storage shards a group goes to test, valid or train "
            "by its hash alone (test_fraction, valid_fraction of the hash range), so a corpus of few groups can "
            f"leave a split empty: raise the fractions, change data.seed, or {_more_groups(cfg['corpus'])}")
    for s, state in splits.items():
        if state.fixed_rows == 0:
            raise UserError(
                f"the {s} split has {state.content_tokens + state.documents} tokens, too few for one fixed chunk of "
                f"seq_len={cfg['seq_len']}: use more documents or a shorter seq_len")
        if state.varlen_rows == 0:
            raise UserError(f"the {s} split has no document with at least min_tokens={cfg['min_tokens']} tokens")
    shards = progress["shards"]
    listed = {n for s in shards for n in s["files"]}
    for f in (out / SHARD_DIR).iterdir():  # shards of an earlier, longer prepare
        if f.suffix == ".npy" and f"{SHARD_DIR}/{f.name}" not in listed:
            f.unlink()
    table = {}
    for s in SPLITS:
        for lay in LAYOUTS:
            key = f"{s}.{lay}"
            table[key] = [{**shard_names(s, lay, e["index"]), **e["table"][key]} for e in shards]
    files = {n: r["sha256"] for n, r in progress["tokenizer_files"].items()}
    files.update({n: r["sha256"] for e in shards for n, r in e["files"].items()})
    vocab = tokenizer.vocab
    groups = {s: None if splits[s].groups is None else sorted(splits[s].groups) for s in SPLITS}
    manifest = {
        "schema": SCHEMA,
        "storage": "shards",
        "config_hash": config_hash(cfg),
        "config": hashed_config(cfg),
        "corpus": cfg["corpus"]["name"],
        "options": {k: v for k, v in cfg["corpus"].items() if k != "name"},
        "corpus_documents": position_total(progress),
        "corpus_groups": None if None in groups.values() else sum(len(g) for g in groups.values()),
        # sha256 chained over the shards (sha256(previous + sha256(documents of shard k))): the pt
        # path's corpus_sha256 cannot be resumed, so the two differ for the same corpus
        "corpus_chain_sha256": chain,
        "split": "hash",
        "split_groups": groups,
        "tokenizer": {"name": tokenizer.name, "vocab": vocab.to_dict()},
        "seq_len": cfg["seq_len"],
        "max_len": cfg["max_len"],
        "min_tokens": cfg["min_tokens"],
        "splits": {s: splits[s].info() for s in SPLITS},
        "shards": {"count": len(shards), "dtype": np.dtype(token_dtype(vocab.size)).name,
                   "shard_tokens": cfg["storage"]["shard_tokens"], "files": table},
        "files": dict(sorted(files.items())),
    }
    if source is not None:
        manifest["synthetic"] = {**source.describe(), "entropy": source.entropy()}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def position_total(progress: dict) -> int:
    return progress["shards"][-1]["documents_end"] if progress["shards"] else 0
