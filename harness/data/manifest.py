"""A prepared data directory: its layout on disk, its manifest, and the checks that its
files are the ones the manifest records (a changed file is one UserError line, never silently
different numbers).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from harness.core.atomic import atomic_write_text
from harness.core.errors import UserError
from harness.data.tokenizer import TextTokenizer


SPLITS = ("train", "valid", "test")


LAYOUTS = ("fixed", "varlen")


MANIFEST = "manifest.json"


TOKENIZER_DIR = "tokenizer"


SCHEMA = "didbench.data/1"


def need_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} {path} is missing: run `python -m harness prepare` first")
    return path


def load_manifest(data_dir) -> dict:
    path = need_file(Path(data_dir) / MANIFEST, "data manifest")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("schema") != SCHEMA:
            raise ValueError(f"schema {manifest.get('schema')!r}, expected {SCHEMA!r}")
    except ValueError as e:
        raise UserError(f"data manifest {path} is corrupt ({e}): run `prepare` again") from None
    return manifest


def load_tokenizer(data_dir) -> TextTokenizer:
    need_file(Path(data_dir) / TOKENIZER_DIR, "tokenizer directory")
    if (Path(data_dir) / MANIFEST).exists():
        check_files(data_dir)
    return TextTokenizer.load(Path(data_dir) / TOKENIZER_DIR)


def verify(data_dir) -> None:
    """Check every file against the sha256 in the manifest (UserError on a mismatch)."""
    manifest = load_manifest(data_dir)
    for name, digest in manifest["files"].items():
        path = need_file(Path(data_dir) / name, "data file")
        if file_sha256(path) != digest:
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
        path = need_file(Path(data_dir) / name, "data file")
        st = path.stat()
        seen = stamp.get(name)
        if seen == [st.st_size, st.st_mtime_ns, digest]:
            fresh[name] = seen
            continue
        if file_sha256(path) != digest:
            raise UserError(f"data file {path} does not match the sha256 its manifest records (changed or damaged "
                            f"since `prepare`): prepare the data again")
        fresh[name], changed = [st.st_size, st.st_mtime_ns, digest], True
    if changed or set(fresh) != set(stamp):
        try:
            atomic_write_text(stamp_path, json.dumps(fresh, indent=0, sort_keys=True))
        except OSError:
            pass   # a read-only data directory: checked again next time, still correct
    _CHECKED.add(key)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
