"""The zero-shot test sets of the DID paper's Table 1: loaders, detokenisers, chunking.

Table 1 (did-method.md sections 8.2 and 10) scores OpenWebText-trained fixed-length models on
the test splits of seven other corpora. Each set here has a name, a loader and a detokeniser:

=============  ===============================================  ===========
name           test split                                       detokeniser
=============  ===============================================  ===========
wikitext103    WikiText-103 (`wikitext-103-raw-v1`), one line   wikitext
ptb            Penn Treebank (`ptb_text_only`), one sentence    ptb
lambada        OpenAI `lambada_test.jsonl`, one passage         lambada
lm1b           One Billion Word benchmark, one sentence         lm1b
ag_news        AG News, title + " " + description               none
pubmed         `scientific_papers` pubmed, one abstract         none
arxiv          `scientific_papers` arxiv, one abstract          none
=============  ===============================================  ===========

Documents come either from a local file or directory (the offline path, `files:` in the config;
formats below) or from the Hugging Face hub (`datasets.load_dataset`, needs the network or a
filled HF cache). A document is what the paper's code lineage (SEDD, RADD, MDLM) treats as one:
a row of the hub dataset. So a WikiText line is a document, empty lines included (they only add
their EOS), as the lineage does.

Local formats, imitating each set's own distribution:
* wikitext103: the raw text (`wiki.test.raw`: ` = Heading = ` lines, ` @-@ ` tokens); a
  directory is searched for `wiki.test.raw`. Lines become rows as the hub has them (a non-empty
  line keeps its newline, a blank line is "").
* ptb: `ptb.test.txt`, one sentence per line (`<unk>`, the number placeholder `N`).
* lambada: `lambada_test.jsonl`, one JSON object per line with a "text" field.
* lm1b: one sentence per line (the benchmark's held-out shards; a directory = all its files).
* ag_news: `test.csv` (class index, title, description; no header, or a header naming them) or
  JSON lines with "text", or "title" and "description".
* pubmed, arxiv: JSON lines (`test.txt` or `*.jsonl`) with an "abstract" string, or the original
  release's "abstract_text" list of `<S> ... </S>` sentences (joined by newlines, tags dropped).
Any set also reads JSON lines with the field its hub rows have ("text"; ptb: "sentence").

Chunking is the study's own (`harness.data.prepare.build_fixed`): detokenised documents tokenised with
the study's tokenizer, each followed by EOS, joined, cut into rows [BOS] + (seq_len - 1)
tokens, the last partial row dropped. `prepare_sets` does this for every requested set and
records a set it cannot load as one line in `missing` (or raises with `required: true`).
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from harness.core.atomic import atomic_write, atomic_write_text
from harness.core.settings import ZeroshotSettings
from harness.core.errors import UserError
from harness.data.corpora import read_utf8
from harness.data.prepare import build_fixed

#: the file written by `evaluate zeroshot-data`: the tokenised rows of every set
SCHEMA = "didbench.zeroshot/1"
#: keys a hub source may set (evaluate.zeroshot.hub.<name> overrides the built-in one key by key)
HUB_KEYS = ("dataset", "config", "split", "field", "revision", "data_files")
LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"


# ============================================================================================
# Detokenisers: undo the tokenisation of a set's distribution before the study's tokenizer
# sees it, as the paper's code lineage does (SEDD -> RADD -> DID; MDLM adds lm1b and lambada).
# Each is an ordered list of rewrites; the order matters (e.g. " @-@ " before " - " spacing).
# ============================================================================================
def _apply(rules, text: str) -> str:
    for pattern, repl in rules:
        text = pattern.sub(repl, text) if isinstance(pattern, re.Pattern) else text.replace(pattern, repl)
    return text


_WIKITEXT_RULES = [
    # a plural possessive split from its apostrophe: "players ' union" -> "players' union"
    ("s '", "s'"),
    # numbers split by the WikiText tokeniser: "1 @,@ 000", "3 @.@ 5", "state @-@ of"
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    # punctuation followed by a space loses the space before it
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    # no space inside brackets and double quotes: "( born 1960 )" -> "(born 1960)"
    (re.compile(r"\(\s*([^)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r'"\s*([^"]*?)\s*"'), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    # heading markers: "= = Career = =" -> "== Career ==" (longest first)
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
    # a degree sign hugs its number and unit: "20 ° C" -> "20°C"
    (" \u00b0 ", "\u00b0"),
    # no space at either side of a line break
    (" \n", "\n"), ("\n ", "\n"),
    # the number placeholder, and the possessive split off its word
    (" N ", " 1 "), (" 's", "'s"),
]


def wikitext_detokenizer(text: str) -> str:
    """WikiText-103's tokenisation undone: ` @-@ `/` @,@ `/` @.@ ` joined, no space before
    `: ; . ! ? ,`, none inside brackets and quotes, heading markers `= = x = =` -> `== x ==`,
    ` ° ` joined, no space around newlines, ` N ` -> ` 1 `, ` 's` -> `'s`, `s '` -> `s'`."""
    return _apply(_WIKITEXT_RULES, text)


_PTB_RULES = [
    # clitics and possessives split from their word: "it 's", "they 're", "workers '"
    (" '", "'"),
    # no space at either side of a line break
    (" \n", "\n"), ("\n ", "\n"),
    # the negation clitic: "is n't" -> "isn't"
    (" n't", "n't"),
    # the number placeholder N becomes a digit; like the lineage, the space before it goes too,
    # so "$ N million" -> "$1 million" (and, a quirk kept for comparability, "the N" -> "the1")
    (" N ", "1 "),
    # currency and number signs hug the digit that now follows them
    ("$ 1", "$1"), ("# 1", "#1"),
]


def ptb_detokenizer(text: str) -> str:
    """Penn Treebank's tokenisation undone as the lineage does: ` 's`/` 're`/` '` and ` n't`
    joined to their word, no space around newlines, the placeholder ` N ` -> `1 `, `$ 1` and
    `# 1` joined. `<unk>` (the PTB's out-of-vocabulary word) is kept as the literal text, as the
    lineage keeps it (a hub row and a local line give the same string)."""
    return _apply(_PTB_RULES, text)


_LM1B_RULES = [
    # URLs the tokeniser split at every punctuation mark
    ("http : / / ", "http://"), ("https : / / ", "https://"),
    # a clitic split from its word: "they 've" -> "they've", "John 's" -> "John's"
    (re.compile(r" '(\w+)"), r"'\1"),
    # a full stop after a word, inside a sentence and at its end
    (re.compile(r" (\w+) \. "), r" \1. "), (re.compile(r" (\w+) \.$"), r" \1."),
    # question and exclamation marks, inside and at the end
    (" ? ", "? "), (re.compile(r" \?$"), "?"), (" ! ", "! "), (re.compile(r" !$"), "!"),
    # other punctuation loses the space before it; a slash loses both
    (" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/"),
    # no space inside quotes and brackets
    (re.compile(r'" ([^"]+) "'), r'"\1"'), (re.compile(r"' ([^']+) '"), r"'\1'"),
    (re.compile(r"\( ([^()]+) \)"), r"(\1)"), (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    # currency signs hug their amount
    ("$ ", "$"), ("\u00a3 ", "\u00a3"),
]


def lm1b_detokenizer(text: str) -> str:
    """The One Billion Word benchmark's tokenisation undone (MDLM's rules): `http : / /` joined,
    clitics ` 've`/` 's` joined, no space before `. ? ! , : ;`, none around `/`, none inside
    quotes and brackets, `$ 5`/`£ 5` joined."""
    return _apply(_LM1B_RULES, text)


def lambada_detokenizer(text: str) -> str:
    """LAMBADA (MDLM's rule): typographic double quotes made plain, the passage stripped and
    started on a new line (the lineage's "\\n" + text.strip())."""
    text = text.replace("\u201c", '"').replace("\u201d", '"')
    return "\n" + text.strip()


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenizer,
    "ptb": ptb_detokenizer,
    "lm1b": lm1b_detokenizer,
    "lambada": lambada_detokenizer,
}


def detokenize(name: str | None, texts: list[str]) -> list[str]:
    """`texts` through the detokeniser `name` (None: unchanged)."""
    if name is None:
        return list(texts)
    if name not in DETOKENIZERS:
        raise UserError(f"unknown detokenizer {name!r} (known: {', '.join(DETOKENIZERS)})")
    fn = DETOKENIZERS[name]
    return [fn(t) for t in texts]


# ============================================================================================
# Loaders
# ============================================================================================
def _read_text(path: Path) -> str:
    """A local test-set file as text: the corpus reader's checks (UTF-8, not binary, universal newlines)."""
    return read_utf8(path)


def _json_lines(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{i}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i}: a JSON {type(row).__name__}, expected an object")
        rows.append(row)
    return rows


def _field(row: dict, path: Path, i: int, *names: str) -> str:
    for name in names:
        if isinstance(row.get(name), str):
            return row[name]
    raise UserError(f"{path}:{i}: no string field {' or '.join(repr(n) for n in names)}")


def _lines(text: str) -> list[str]:
    """Non-blank lines, stripped (PTB, LM1B: one sentence per line)."""
    return [line.strip() for line in text.split("\n") if line.strip()]


def _wikitext_rows(text: str) -> list[str]:
    """The hub's rows of a raw WikiText file: a line with its newline, a blank line as ""."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def _abstract(row: dict, path: Path, i: int) -> str:
    if isinstance(row.get("abstract"), str):
        return row["abstract"]
    sents = row.get("abstract_text")
    if isinstance(sents, list) and all(isinstance(s, str) for s in sents):
        return "\n".join(s.replace("<S>", "").replace("</S>", "").strip() for s in sents)
    raise UserError(f"{path}:{i}: no 'abstract' string or 'abstract_text' list")


def _ag_news_csv(text: str, path: Path) -> list[str]:
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows:
        return []
    head = [c.strip().lower() for c in rows[0]]
    if "title" in head and "description" in head:           # a header row names the columns
        t, d = head.index("title"), head.index("description")
        rows = rows[1:]
    else:                                                      # the original: class, title, description
        t, d = 1, 2
    out = []
    for i, r in enumerate(rows, 1):
        if len(r) <= max(t, d):
            raise UserError(f"{path}: row {i} has {len(r)} columns, expected class, title, description")
        out.append(f"{r[t]} {r[d]}")
    return out


@dataclass(frozen=True)
class ZeroShotSet:
    """One test set: its hub source, detokeniser and how a local file of it is read."""

    name: str
    title: str
    detokenizer: str | None
    hub: dict
    #: names looked for inside a directory given as the local path (lm1b: every file)
    local_names: tuple[str, ...]

    def read_local(self, path: Path) -> list[str]:
        """The documents of a local file or directory of this set."""
        if path.is_dir():
            files = [path / n for n in self.local_names if (path / n).is_file()][:1]
            if not files and self.name == "lm1b":       # the benchmark's held-out shards
                files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise UserError(f"{self.name}: {path} holds none of {', '.join(self.local_names) or 'its files'}")
            return [doc for f in files for doc in self.read_local(f)]
        if path.suffix == ".jsonl" or self.name in ("pubmed", "arxiv"):
            return self._from_rows(_json_lines(path), path)
        text = _read_text(path)
        if self.name == "wikitext103":
            return _wikitext_rows(text)
        if self.name == "ag_news":
            return _ag_news_csv(text, path)
        return _lines(text)                           # ptb, lm1b, lambada as plain text

    def _from_rows(self, rows: list[dict], path: Path) -> list[str]:
        out = []
        for i, row in enumerate(rows, 1):
            if self.name in ("pubmed", "arxiv"):
                out.append(_abstract(row, path, i))
            elif self.name == "ag_news" and not isinstance(row.get("text"), str):
                out.append(f"{_field(row, path, i, 'title')} {_field(row, path, i, 'description')}")
            elif self.name == "ptb":
                out.append(_field(row, path, i, "sentence", "text"))
            else:
                out.append(_field(row, path, i, "text"))
        return out


def _hub(dataset, config=None, split="test", field="text", revision=None, data_files=None) -> dict:
    return {"dataset": dataset, "config": config, "split": split, "field": field, "revision": revision,
            "data_files": data_files}


#: the seven sets, in Table 1's column order. Hub sources as of writing (datasets >= 4 runs no
#: loading scripts, so script-only datasets are read from the hub's parquet export,
#: refs/convert/parquet); evaluate.zeroshot.hub.<name> overrides any key where a repository moves.
SETS: dict[str, ZeroShotSet] = {s.name: s for s in (
    ZeroShotSet("wikitext103", "WikiText-103", "wikitext",
                _hub("Salesforce/wikitext", "wikitext-103-raw-v1"), ("wiki.test.raw", "test.jsonl")),
    ZeroShotSet("lambada", "LAMBADA", "lambada",
                _hub("json", split="train", data_files=LAMBADA_URL), ("lambada_test.jsonl", "test.jsonl")),
    ZeroShotSet("pubmed", "PubMed", None,
                _hub("armanc/scientific_papers", "pubmed", field="abstract", revision="refs/convert/parquet"),
                ("test.txt", "test.jsonl")),
    ZeroShotSet("ag_news", "AG News", None, _hub("fancyzhx/ag_news"), ("test.csv", "test.jsonl")),
    ZeroShotSet("lm1b", "LM1B", "lm1b", _hub("dvruette/lm1b"), ("test.txt", "test.jsonl")),
    ZeroShotSet("arxiv", "ArXiv", None,
                _hub("armanc/scientific_papers", "arxiv", field="abstract", revision="refs/convert/parquet"),
                ("test.txt", "test.jsonl")),
    ZeroShotSet("ptb", "PTB", "ptb",
                _hub("ptb-text-only/ptb_text_only", "penn_treebank", field="sentence",
                     revision="refs/convert/parquet"), ("ptb.test.txt", "test.jsonl")),
)}


def get_set(name: str) -> ZeroShotSet:
    if name not in SETS:
        raise UserError(f"unknown zero-shot set {name!r} (known: {', '.join(SETS)})")
    return SETS[name]


def hub_source(name: str, override: dict | None = None) -> dict:
    """The hub source of set `name`: the built-in one with `override`'s keys replaced."""
    override = dict(override or {})
    unknown = sorted(set(override) - set(HUB_KEYS))
    if unknown:
        raise UserError(f"evaluate.zeroshot.hub.{name}: unknown key(s) {', '.join(unknown)} (known: {', '.join(HUB_KEYS)})")
    return {**get_set(name).hub, **override}


def describe_hub(src: dict) -> str:
    """A hub source in one string: `dataset[/config]:split[@revision]` (the data files for `json`)."""
    where = src["data_files"] if src.get("data_files") else src["dataset"] + (f"/{src['config']}" if src.get("config") else "")
    return f"{where}:{src['split']}" + (f"@{src['revision']}" if src.get("revision") else "")


def hub_documents(name: str, override: dict | None = None) -> tuple[list[str], str]:
    """(documents, source) of set `name` from the Hugging Face hub (or a filled HF cache).

    Offline, or when the repository cannot be read, one UserError line says why."""
    src = hub_source(name, override)
    where = describe_hub(src)
    try:
        import datasets
    except ImportError:
        raise UserError(f"{name}: loading {where} needs the `datasets` package") from None
    kwargs = {"split": src["split"]}
    for key in ("revision", "data_files"):
        if src.get(key) is not None:
            kwargs[key] = src[key]
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(src["dataset"], src.get("config"), **kwargs)
    except Exception as err:  # the hub client, the builders and fsspec raise many unrelated types
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f"{err.__class__.__name__}: {first}"[:300]
        offline = isinstance(err, (ConnectionError, TimeoutError)) or any(
            w in reason.lower() for w in ("offline", "couldn't reach", "connection"))
        raise UserError(f"{where} {'is not available offline' if offline else 'could not be loaded'} ({reason})") from None
    if src["field"] not in ds.column_names:
        raise UserError(f"{where} has no column {src['field']!r} (columns: {', '.join(ds.column_names)})")
    return [t if isinstance(t, str) else "" for t in ds[src["field"]]], where


def load_documents(name: str, path: str | None = None, hub: dict | None = None) -> tuple[list[str], str]:
    """(documents, source) of the test split of set `name`: from the local file or directory
    `path` when given, else from the hub (`hub` overrides keys of the built-in source)."""
    spec = get_set(name)
    if path is None:
        return hub_documents(name, hub)
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"no such file or directory: {path}")
    return spec.read_local(p), str(path)


# ============================================================================================
# Chunking and the prepared file
# ============================================================================================
def chunk(documents: list[str], tokenizer, seq_len: int, detokenizer: str | None):
    """(rows [N, seq_len] int64, content tokens): detokenised documents tokenised with the study's
    tokenizer and cut as the study's fixed layout (harness.data.prepare.build_fixed)."""
    encoded = tokenizer.encode_batch(detokenize(detokenizer, documents))
    return build_fixed(encoded, tokenizer.vocab, int(seq_len)), sum(len(e) for e in encoded)


def settings_of(config: dict) -> ZeroshotSettings:
    """The study's evaluate.zeroshot, each of its datasets a known set (else a UserError)."""
    s = ZeroshotSettings.of(config)
    for name in s.datasets:
        get_set(name)
    return s


def prepare_sets(settings: ZeroshotSettings, tokenizer, seq_len: int, log=print) -> dict:
    """Every requested set loaded, detokenised, tokenised and chunked.

    Returns {"schema", "tokenizer", "vocab", "seq_len", "requested", "datasets": {name: {tokens
    (int32 [N, seq_len]), rows, documents, content_tokens, source, detokenizer}}, "missing":
    {name: reason}}. A set that cannot be loaded, or is too short for one row, is one line in
    `log` and in `missing`; with settings.required it is a UserError instead.
    """
    import torch

    out = {"schema": SCHEMA, "tokenizer": tokenizer.name, "vocab": tokenizer.vocab.to_dict(), "seq_len": int(seq_len),
           "requested": list(settings.datasets), "datasets": {}, "missing": {}}
    files = settings.files or {}
    for name in settings.datasets:
        spec = get_set(name)
        try:
            docs, source = load_documents(name, files.get(name), (settings.hub or {}).get(name))
            rows, content = chunk(docs, tokenizer, seq_len, spec.detokenizer)
            if rows.shape[0] == 0:
                raise UserError(f"{content + len(docs)} tokens from {source}, too few for one row of seq_len={seq_len}")
        except UserError as err:
            reason = str(err)
            if settings.required:
                raise UserError(f"zero-shot set {name} is required (evaluate.zeroshot.required) but missing: {reason}") from None
            out["missing"][name] = reason
            log(f"zeroshot: {name} missing: {reason}")
            continue
        out["datasets"][name] = {"tokens": rows.to(torch.int32), "rows": int(rows.shape[0]), "documents": len(docs),
                                 "content_tokens": int(content), "source": source, "detokenizer": spec.detokenizer}
        log(f"zeroshot: {name}: {len(docs)} documents, {content} tokens, {rows.shape[0]} rows of {seq_len} "
            f"(detokenizer {spec.detokenizer or 'none'}) from {source}")
    return out


def summary(prepared: dict) -> dict:
    """The prepared file without its tensors (what the JSON next to it holds)."""
    return {**{k: v for k, v in prepared.items() if k != "datasets"},
            "datasets": {n: {k: v for k, v in d.items() if k != "tokens"} for n, d in prepared["datasets"].items()}}


def save_prepared(path, prepared: dict) -> None:
    """The prepared sets (torch) at `path` and their summary (JSON) at `path` with suffix .json."""
    import torch


    path = Path(path)
    atomic_write(path, "wb", lambda fh: torch.save(prepared, fh))
    atomic_write_text(path.with_suffix(".json"), json.dumps(summary(prepared), indent=1) + "\n")


def load_prepared(path, vocab, seq_len: int) -> dict:
    """The prepared sets of `path`, checked against the study's vocabulary and row length."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"prepared zero-shot sets {path} are missing: run `python -m harness evaluate zeroshot-data`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip / pickle errors of many types
        raise UserError(f"{path} is corrupt ({err.__class__.__name__}): run `evaluate zeroshot-data` again") from None
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a prepared zero-shot file (schema {SCHEMA})")
    if obj.get("vocab") != vocab.to_dict() or int(obj.get("seq_len", -1)) != int(seq_len):
        raise UserError(f"{path} was prepared for another tokenizer or seq_len than the study's data: "
                        "run `evaluate zeroshot-data` again")
    return obj
