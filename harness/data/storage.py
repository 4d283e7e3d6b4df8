"""The two storages of prepared tokens and their readers, behind one interface.

* `pt` (the default): one torch file per split and layout, read whole (`TokenData`);
* `shards`: memory-mapped numpy shards written in bounded memory by harness.data.shards
  (`ShardedTokenData`), the paper-scale path.

`load_split` returns either; training and evaluation index both into `Batch`es the same way.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from harness.core.atomic import atomic_write
from harness.core.batch import Batch, Vocab
from harness.core.errors import UserError
from harness.data.manifest import LAYOUTS, MANIFEST, SPLITS, check_files, load_manifest, need_file


class TokenData:
    """One prepared split in one layout, indexable into `Batch`es."""

    def __init__(self, payload: dict, source: str = "<memory>"):
        try:
            self.layout = payload["layout"]
            self.vocab = Vocab(**payload["vocab"])
            tokens = payload["tokens"]
            if self.layout == "fixed":
                if tokens.dim() != 2:
                    raise ValueError("fixed tokens must be [N, L]")
                self.max_len = int(payload["seq_len"])
                self.lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)
            elif self.layout == "varlen":
                self.max_len = int(payload["max_len"])
                self.lengths = payload["lengths"].long()
                if int(self.lengths.sum()) != tokens.numel():
                    raise ValueError("lengths do not add up to the packed tokens")
            else:
                raise ValueError(f"unknown layout {self.layout!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{source} is not a prepared data file ({e}): run `prepare` again") from None
        self.tokens = tokens.long()
        if self.tokens.numel() and (int(self.tokens.min()) < 0 or int(self.tokens.max()) >= self.vocab.size):
            raise UserError(f"{source} holds token ids outside the vocabulary [0, {self.vocab.size}) "
                            f"(min {int(self.tokens.min())}, max {int(self.tokens.max())}): run `prepare` again")
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])

    def __len__(self) -> int:
        return int(self.lengths.numel())

    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def row(self, i: int) -> torch.Tensor:
        if self.layout == "fixed":
            return self.tokens[i]
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def batch(self, indices) -> Batch:
        """Rows `indices` right-padded with PAD to the longest of them; lengths include BOS."""
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("empty batch")
        if self.layout == "fixed":
            return Batch(self.tokens[idx].clone(), self.lengths[idx].clone(), "fixed")
        lengths = self.lengths[idx]
        x0 = torch.full((len(idx), int(lengths.max())), self.vocab.pad, dtype=torch.long)
        for b, i in enumerate(idx):
            row = self.row(i)
            x0[b, : row.numel()] = row
        return Batch(x0, lengths.clone(), "varlen")


class ShardedTokenData:
    """One split in one layout of a `data.storage: shards` directory, read by memory map.

    The interface of `TokenData` (len, num_tokens, row, batch, lengths, offsets, vocab, layout,
    max_len) and the same rows and batches as the pt storage of the same documents; only the
    rows a batch asks for are read from disk. Shard files are opened on first use.
    """

    def __init__(self, data_dir, split: str, layout: str, manifest: dict):
        self.data_dir = Path(data_dir)
        try:
            self.layout = layout
            self.vocab = Vocab(**manifest["tokenizer"]["vocab"])
            self.max_len = int(manifest["seq_len"] if layout == "fixed" else manifest["max_len"])
            self._shards = list(manifest["shards"]["files"][f"{split}.{layout}"])
            self._dtype = np.dtype(manifest["shards"]["dtype"])
            rows = np.array([int(e["rows"]) for e in self._shards], dtype=np.int64)
            self._tokens_per_shard = np.array([int(e["tokens"]) for e in self._shards], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"data manifest in {data_dir} has no valid shard table ({e}): run `prepare` again") from None
        for e in self._shards:  # every file there before any is read
            for key in ("file", "lengths_file"):
                if key in e:
                    need_file(self.data_dir / e[key], "data file")
        self._row_start = np.concatenate([[0], np.cumsum(rows)])
        self._token_start = np.concatenate([[0], np.cumsum(self._tokens_per_shard)])
        self._n = int(self._row_start[-1])
        self._mm: dict[int, np.ndarray] = {}
        self._lengths = self._offsets = self._offsets_np = None
        _raise_open_file_limit(len(self._shards))

    # --- files ----------------------------------------------------------------------------
    def _open(self, k: int) -> np.ndarray:
        mm = self._mm.get(k)
        if mm is None:
            e = self._shards[k]
            path = self.data_dir / e["file"]
            try:
                mm = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise UserError(f"data file {path} is corrupt ({err.__class__.__name__}): run `prepare` again") from None
            want = (int(e["rows"]), self.max_len) if self.layout == "fixed" else (int(e["tokens"]),)
            if mm.dtype != self._dtype or mm.shape != want:
                raise UserError(f"data file {path} holds {mm.dtype} {mm.shape}, the manifest says {self._dtype} {want}: "
                                "run `prepare` again")
            self._mm[k] = mm
        return mm

    def _varlen_lengths(self) -> np.ndarray:
        parts = []
        for e in self._shards:
            path = self.data_dir / e["lengths_file"]
            try:
                a = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise UserError(f"data file {path} is corrupt ({err.__class__.__name__}): run `prepare` again") from None
            if a.shape != (int(e["rows"]),) or int(a.sum()) != int(e["tokens"]):
                raise UserError(f"data file {path} does not match its shard: run `prepare` again")
            parts.append(a.astype(np.int64))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    # --- the TokenData interface ------------------------------------------------------------
    @property
    def lengths(self) -> torch.Tensor:
        if self._lengths is None:
            if self.layout == "fixed":
                self._lengths = torch.full((self._n,), self.max_len, dtype=torch.long)
            else:
                self._lengths = torch.from_numpy(self._varlen_lengths())
        return self._lengths

    @property
    def offsets(self) -> torch.Tensor:
        if self._offsets is None:
            self._offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        return self._offsets

    def __len__(self) -> int:
        return self._n

    def num_tokens(self) -> int:
        return self._n * self.max_len if self.layout == "fixed" else int(self._tokens_per_shard.sum())

    def _locate(self, i: int) -> tuple[int, int]:
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"row {i} outside [0, {self._n})")
        k = int(np.searchsorted(self._row_start, i, side="right")) - 1
        return k, i - int(self._row_start[k])

    def _row_np(self, i: int) -> np.ndarray:
        k, j = self._locate(i)
        if self.layout == "fixed":
            return self._open(k)[j]
        if self._offsets_np is None:
            self._offsets_np = self.offsets.numpy()
        g, base = int(self._row_start[k]) + j, int(self._token_start[k])
        return self._open(k)[int(self._offsets_np[g]) - base : int(self._offsets_np[g + 1]) - base]

    def row(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._row_np(i), dtype=np.int64))

    def batch(self, indices) -> Batch:
        """Rows `indices` right-padded with PAD to the longest of them; lengths include BOS."""
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("empty batch")
        rows = [self._row_np(i) for i in idx]
        lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
        x0 = np.full((len(idx), int(lengths.max())), self.vocab.pad, dtype=np.int64)
        for b, r in enumerate(rows):
            x0[b, : r.shape[0]] = r
        return Batch(torch.from_numpy(x0), lengths, self.layout)

    def __repr__(self) -> str:
        return (f"ShardedTokenData({self.layout}, {self._n} rows in {len(self._shards)} shard(s), "
                f"{self.data_dir})")


def _raise_open_file_limit(n_files: int) -> None:
    """Each memory-mapped shard keeps a file descriptor: lift the soft limit towards the hard one
    when a split has many shards (best effort)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 4 * n_files + 256
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    except (ImportError, ValueError, OSError):
        pass


def load_split(data_dir, split: str, layout: str) -> TokenData:
    """One split in one layout: a `TokenData` (storage pt) or a `ShardedTokenData` (storage
    shards, memory-mapped), the same interface either way."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    pt_path = Path(data_dir) / f"{split}.{layout}.pt"
    if (Path(data_dir) / MANIFEST).exists():
        check_files(data_dir)
    if not pt_path.exists() and (Path(data_dir) / MANIFEST).exists():
        manifest = load_manifest(data_dir)
        if manifest.get("storage") == "shards":
            return ShardedTokenData(data_dir, split, layout, manifest)
    path = need_file(pt_path, "data file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip / pickle errors of many types
        raise UserError(f"data file {path} is corrupt ({e.__class__.__name__}): run `prepare` again") from None
    if not isinstance(payload, dict) or payload.get("layout") != layout:
        raise UserError(f"data file {path} is not a {layout} split: run `prepare` again")
    return TokenData(payload, str(path))


SHARD_DIR = "shards"


STORAGE_KINDS = ("pt", "shards")


#: options of storage kind shards and their defaults. workers and batch_documents change how fast
#: the files are made, not what they hold, so they stay out of the data config hash
SHARD_DEFAULTS = {
    "shard_tokens": 1 << 25,        # 32 Mi tokens a shard: 64 MB uint16 files, ~0.5 GB peak memory
    "tokenizer_documents": 100_000,  # bpe: train documents the tokenizer is fitted on
    "workers": 1,                    # tokenizer processes (1: in this process, `tokenizers` threads)
    "batch_documents": 512,          # documents tokenised per batch
}


NOT_HASHED = ("workers", "batch_documents")


SHARD_MINIMUM = {"shard_tokens": 64, "tokenizer_documents": 1, "workers": 1, "batch_documents": 1}


def resolve_storage(value) -> dict:
    """`data.storage` as a mapping: {"kind": "pt"} or {"kind": "shards", **every option}.

    Accepts "pt", "shards", None (= pt) or a mapping {kind, **options}."""
    if value is None:
        value = "pt"
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise UserError(f"data.storage must be 'pt', 'shards' or a mapping {{kind: shards, ...}}, got {value!r}")
    options = dict(value)
    kind = options.pop("kind", None)
    if kind not in STORAGE_KINDS:
        raise UserError(f"data.storage.kind must be one of {', '.join(STORAGE_KINDS)}, got {kind!r}")
    if kind == "pt":
        if options:
            raise UserError(f"data.storage: option(s) {', '.join(sorted(options))} apply to kind shards only")
        return {"kind": "pt"}
    unknown = sorted(set(options) - set(SHARD_DEFAULTS))
    if unknown:
        raise UserError(f"unknown data.storage option(s): {', '.join(unknown)} (known: kind, {', '.join(SHARD_DEFAULTS)})")
    out = {"kind": "shards"}
    for key, default in SHARD_DEFAULTS.items():
        v = options.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < SHARD_MINIMUM[key]:
            raise UserError(f"data.storage.{key} must be an integer >= {SHARD_MINIMUM[key]}, got {v!r}")
        out[key] = v
    return out


def hashed_storage(storage: dict) -> dict | None:
    """What of a resolved `data.storage` names the data: None for pt (so the hash of every
    config written before the key existed is unchanged), the options minus NOT_HASHED else."""
    if storage["kind"] == "pt":
        return None
    return {k: v for k, v in storage.items() if k not in NOT_HASHED}


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def shard_names(split: str, layout: str, k: int) -> dict:
    """Relative paths of shard k of (split, layout): {"file": ..., "lengths_file": ... (varlen)}."""
    stem = f"{SHARD_DIR}/{split}.{layout}.{k:05d}"
    names = {"file": f"{stem}.npy"}
    if layout == "varlen":
        names["lengths_file"] = f"{stem}.lengths.npy"
    return names


class _HashingWriter:
    """File-like wrapper: np.save writes through it (in chunks), it hashes and counts the bytes."""

    def __init__(self, fh):
        self.fh, self.sha, self.bytes = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.sha.update(data)
        self.bytes += len(data)
        return self.fh.write(data)


def write_array(path: Path, array: np.ndarray) -> dict:
    """`array` as a .npy file, written atomically; returns {"bytes", "sha256"} of the file."""
    box = {}

    def write(fh):
        w = _HashingWriter(fh)
        np.save(w, np.ascontiguousarray(array), allow_pickle=False)
        box.update(bytes=w.bytes, sha256=w.sha.hexdigest())

    atomic_write(path, "wb", write)
    return box
