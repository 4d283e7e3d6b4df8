"""Result files: one JSON schema for every number `evaluate` produces, written atomically.

A result is only useful if it says where it came from, so every file carries its provenance
(study, run, config hash, git commit, device, library versions) next to the settings that
produced the values. Files are written to a temporary file in the same directory, fsync'ed and
renamed over the target, so a crash or a full disk never leaves a half-written result that a
later step (report, MLflow) would read as valid.

Schema `didbench.result/1` (one JSON object per file)::

    {
      "schema":      "didbench.result/1",
      "kind":        "ppl" | "samples" | "genppl" | "mauve" | "diversity" | "lengths" | "speed" | "exact"
                     | "zeroshot" | "cost" | ...,
      "study":       str,            # config["study"]
      "run":         str | null,     # "<method>-<layout>-<size>-s<seed>"; null for data-only results
      "method":      str | null,
      "layout":      str | null,     # "fixed" | "varlen"
      "size":        str | null,
      "seed":        int | null,     # training seed of the run
      "config_hash": str,            # sha256 (first 12 hex) of the canonical JSON of the study config
      "git_commit":  str,            # `git rev-parse HEAD` of the harness checkout, or "unknown"
      "device":      str,            # e.g. "cpu (x86_64)" or "cuda: NVIDIA H100 80GB HBM3"
      "versions":    {package: version, ...},   # python, torch, transformers, mauve-text, ...
      "created":     str,            # ISO-8601 UTC time of writing
      "settings":    {...},          # every setting that produced the values
      "values":      {...}           # the metric values (keys per kind: docs/architecture.md)
    }

Non-finite floats are stored as null (JSON has no NaN), and named in a top-level
`"nonfinite": {"values.<path>": "inf" | "-inf" | "nan"}` (absent when every number is finite), so
a reader restores them (harness.results.study) instead of taking null for "missing" and averaging it away.
A labelled run (a `runs` entry with its own `label`) also carries `"label"`.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from harness.core.atomic import atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported)
from harness.core.errors import UserError
from harness import __version__
from harness.core.config import config_hash as _hash

SCHEMA = "didbench.result/1"
HEADER_KEYS = ("study", "run", "method", "layout", "size", "seed", "config_hash", "git_commit", "device", "versions", "created")
REQUIRED_KEYS = ("schema", "kind", *HEADER_KEYS, "settings", "values")
#: distributions whose versions go into every result (missing ones are recorded as null)
VERSIONED = ("torch", "numpy", "transformers", "tokenizers", "mauve-text", "faiss-cpu", "nltk", "scipy", "gguf")


# --- provenance -------------------------------------------------------------------------------
def config_hash(config: dict) -> str:
    """Stable short hash of a config (harness.core.config.config_hash: sha256 of canonical JSON, 12 hex)."""
    return _hash(config)


def git_commit(path: str | os.PathLike | None = None) -> str:
    """HEAD commit of the checkout holding `path` (default: this package), or "unknown"."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


def versions() -> dict[str, str | None]:
    """Versions of Python, the harness and the libraries that shape the numbers (no imports)."""
    found: dict[str, str | None] = {"python": platform.python_version(), "harness": __version__}
    for dist in VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def device_name(device: Any = None) -> str:
    """Human-readable compute device; for CUDA the GPU model, which every timing must name."""
    dev = str(device) if device is not None else None
    if dev is None or dev.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                index = torch.device(dev).index if dev else None
                return f"cuda: {torch.cuda.get_device_name(index or 0)}"
        except Exception:  # no torch / broken driver: fall through to the CPU description
            pass
    return f"cpu ({platform.machine() or 'unknown'})"


def provenance(config: dict, info: dict | None = None, device: Any = None) -> dict:
    """The header every result carries (see the module docstring).

    `info` is the run's info dict (run, method, layout, size, seed, config_hash, ...); pass
    None or {} for results that depend on the data only (e.g. the reference set).
    """
    info = dict(info or {})
    return {
        "study": config.get("study"),
        "run": info.get("run"),
        "method": info.get("method"),
        "label": info.get("label") or info.get("method"),  # the run's name in tables (written where it differs)
        "layout": info.get("layout"),
        "size": info.get("size"),
        "seed": info.get("seed"),
        "config_hash": info.get("config_hash") or config_hash(config),
        "git_commit": git_commit(),
        "device": device_name(device if device is not None else info.get("device")),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --- atomic writes ----------------------------------------------------------------------------
def nonfinite_paths(obj: Any, prefix: str = "") -> dict[str, str]:
    """{dotted path: "inf" | "-inf" | "nan"} of every non-finite float in `obj` (lists by index)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(nonfinite_paths(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(nonfinite_paths(v, f"{prefix}[{i}]"))
    elif hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        out.update(nonfinite_paths(obj.tolist(), prefix))
    elif isinstance(obj, float) and not math.isfinite(obj):
        out[prefix] = "nan" if obj != obj else ("inf" if obj > 0 else "-inf")
    return out


def _finite(obj: Any) -> Any:
    """A JSON-safe copy: NaN/inf -> None, numpy scalars/arrays -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy / torch scalars and arrays
        return _finite(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """One JSON object per line (non-finite floats as null), written atomically."""
    text = "".join(json.dumps(_finite(row), ensure_ascii=False) + "\n" for row in rows)
    atomic_write_text(path, text)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file; a missing or corrupt file is a UserError naming the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{i}: not valid JSON ({err.msg})") from None
    return rows


# --- result files -----------------------------------------------------------------------------
def write_result(path: str | os.PathLike, kind: str, header: dict, settings: dict, values: dict) -> dict:
    """Write one result file atomically and return the object written.

    `header` comes from `provenance` (or from another result's header); unknown header keys
    are ignored so a header can be copied from an existing result.
    """
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise ValueError(f"result header lacks {', '.join(missing)} (build it with harness.core.records.provenance)")
    obj = {"schema": SCHEMA, "kind": kind, **{k: header[k] for k in HEADER_KEYS}}
    if header.get("label") and header["label"] != header["method"]:   # a labelled run (DID-F, a sweep point)
        obj["label"] = header["label"]
    obj["settings"] = portable_paths(settings)
    obj["values"] = values
    bad = nonfinite_paths(values, "values")
    if bad:
        obj["nonfinite"] = bad
    obj = _finite(obj)
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    return obj


REPO_ROOT = Path(__file__).resolve().parents[2]


def portable_paths(obj: Any) -> Any:
    """A copy of `obj` whose absolute paths are relative: to the repository when they lie in it,
    else to the working directory when they lie below it (so committed results carry no machine
    paths); an absolute path elsewhere is kept, since nothing relative would name it."""
    if isinstance(obj, dict):
        return {k: portable_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable_paths(v) for v in obj]
    if isinstance(obj, Path):
        obj = str(obj)
    if isinstance(obj, str) and os.path.isabs(obj) and "\n" not in obj:
        path = os.path.normpath(obj)
        for root in (str(REPO_ROOT), os.getcwd()):
            if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                return os.path.relpath(path, root)
    return obj


def header_of(result: dict) -> dict:
    """The provenance part of a result, to reuse for a result derived from it."""
    return {k: result[k] for k in (*HEADER_KEYS, "label") if k in result}


#: (key, allowed types, in words) of every result key with a fixed type (schema didbench.result/1)
_RESULT_TYPES = (
    ("kind", (str,), "a string"), ("study", (str, type(None)), "a string"), ("run", (str, type(None)), "a string"),
    ("seed", (int, type(None)), "an integer"), ("config_hash", (str,), "a string"), ("git_commit", (str,), "a string"),
    ("versions", (dict,), "a mapping"), ("created", (str,), "a string"), ("settings", (dict,), "a mapping"),
    ("values", (dict,), "a mapping"),
)


def _parse_json(path: Path, what: str):
    """The JSON value in `path`; unreadable, not UTF-8 or not JSON: one UserError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not a valid {what}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not a valid {what}: not valid JSON ({err.msg} at line {err.lineno})") from None


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict:
    """A JSON object from `path` (e.g. train.json); missing, truncated or not an object: one UserError."""
    path = Path(path)
    obj = _parse_json(path, what)
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a valid {what}: a JSON {type(obj).__name__}, expected an object")
    return obj


def read_history(path: str | os.PathLike) -> list[dict]:
    """The rows of a training history.csv (harness.run.loop writes it whole, with a final newline).

    A file cut mid-row (no final newline, or a row with fewer fields than the header), a binary
    or non-UTF-8 file, or a non-numeric step is one UserError naming the file and line, instead
    of a curve that silently loses points.
    """
    import csv
    import io

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not a training history: not UTF-8 text (byte {err.start})") from None
    if "\x00" in text:
        raise UserError(f"{path} is not a training history: a binary file")
    if text and not text.endswith("\n"):
        raise UserError(f"{path} is truncated (its last line is cut off): rerun the training job to rewrite it")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    header = rows[0]
    if "step" not in header:
        raise UserError(f"{path} is not a training history: no 'step' column in its header")
    out = []
    for i, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(header):
            raise UserError(f"{path}:{i}: {len(row)} fields, the header has {len(header)} (truncated or corrupted)")
        rec = dict(zip(header, row))
        try:
            float(rec["step"])
        except ValueError:
            raise UserError(f"{path}:{i}: step {rec['step']!r} is not a number") from None
        out.append(rec)
    return out


def read_result(path: str | os.PathLike, kind: str | None = None) -> dict:
    """Load and validate a result file (schema tag, required keys, optionally its kind)."""
    path = Path(path)
    obj = _parse_json(path, "didbench result")
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
        found = obj.get("schema") if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path} is not a didbench result (schema {found!r}, expected {SCHEMA!r})")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise UserError(f"{path} lacks the result key(s) {', '.join(missing)}")
    wrong = [f"{k} is {type(obj[k]).__name__}, not {what}" for k, types, what in _RESULT_TYPES
             if not isinstance(obj[k], types) or isinstance(obj[k], bool) and bool not in types]
    if wrong:
        raise UserError(f"{path} is not a valid result: {'; '.join(wrong)}")
    if kind is not None and obj["kind"] != kind:
        raise UserError(f"{path} holds a {obj['kind']!r} result, expected {kind!r}")
    return obj


__all__ = [
    "SCHEMA", "provenance", "config_hash", "git_commit", "versions", "device_name", "write_result", "read_result",
    "header_of", "read_json_object", "read_history", "atomic_write_bytes", "atomic_write_text", "atomic_write_jsonl", "read_jsonl",
]
