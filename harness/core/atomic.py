"""All-or-nothing file writes, shared by every module that writes an output.

`write(fh)` goes into a temp file in the target's directory, is fsynced and renamed over the
target, so a reader (or Snakemake) never sees half a file. Whatever interrupts the write (disk
full, an exception inside torch.save, Ctrl-C, a kill) leaves an existing target untouched and no
temp file behind (a SIGKILL can leave a hidden `.name.*.tmp`, never a partial target); an
OSError becomes one UserError line. Torch-free, so the workflow and analysis import it cheaply.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from harness.core.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def os_error_behind(err: BaseException | None) -> OSError | None:
    """The OSError behind `err`, if any: torch.save reports a failed write (e.g. a full disk)
    as a RuntimeError of its zip writer whose context is the OSError."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def atomic_write(path: str | os.PathLike, mode: str, write: Callable) -> Path:
    """Call `write(fh)` on a temp file opened with `mode` ("w" or "wb"), then rename it to `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except Exception as err:
        cause = os_error_behind(err)
        if cause is None:
            raise
        raise UserError(f"could not write {path}: {cause.strerror or cause}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, "wb", lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, "w", lambda fh: fh.write(text))


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: not every filesystem allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_directory(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Call `fill(tmp_dir)` on a fresh hidden directory beside `path`, fsync its files, then rename
    it to `path` (replacing an earlier incomplete one): a reader sees the whole directory or none.
    For outputs that are directories, e.g. an evaluator model saved by a library by path."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as err:
        cause = os_error_behind(err)
        if cause is None:
            raise
        raise UserError(f"could not write {path}: {cause.strerror or cause}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
