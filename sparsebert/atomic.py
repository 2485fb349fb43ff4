"""Atomic files and directories: written under a temporary name, moved into place with
os.replace, so an interrupted writer never leaves a half-written file behind.

The one implementation every layer uses (run directories, checkpoints, pruned-model
directories, benchmark results).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sparsebert.errors import RunDirError, SparsebertError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:  # nothing left behind when the write or the move fails
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """json.dumps(obj, indent=2) to `path`, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock (flock) on `path`, created if missing, for the block: other
    processes taking the same lock wait (read-modify-write of a file shared by parallel
    workers)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """The JSON value in `path` (which must exist). A damaged file (not UTF-8 text, or not JSON:
    a write cut off by a power loss, say) raises RunDirError naming it, with `fix`: what to do
    about it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        reason = f"not a text file: {error.reason}"
    except json.JSONDecodeError as error:
        reason = f"not valid JSON: {error}"
    raise RunDirError(f"{path}: damaged ({reason}); {fix}")


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Let write(tmp_path) produce a file, then move it onto `path` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Build a directory with write(tmp_dir) and move it into place at `path` atomically.

    write() gets a path that does not exist yet. An existing directory at `path` is moved
    aside first and removed only after the new one is in place; on failure (of write() or of
    a move) the previous directory is put back and the temporary one removed. `path` must name
    a directory that can be renamed: not ".", "..", a symbolic link or a mount point
    (SparsebertError naming it).
    """
    path = Path(path)
    what = ("not a named folder" if path.name in ("", ".", "..") else "a symbolic link"
            if path.is_symlink() else "a mount point" if path.is_mount() else None)
    if what is not None:
        raise SparsebertError(f"{str(path)!r} cannot be replaced as a whole ({what}); save "
                              "into a folder inside it")
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        write(tmp)
        moved_aside = path.exists()
        if moved_aside:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if moved_aside:
                os.replace(old, path)  # the previous directory back where it was
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
