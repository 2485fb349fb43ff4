"""Atomic files and directories: written under a temporary name, flushed to the disk (fsync)
and moved into place with os.replace (the folder flushed after it), so neither an interrupted
writer nor a power loss leaves a half-written or empty file behind.

The one implementation every layer uses (run directories, checkpoints, pruned-model
directories, benchmark results).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sparsebert.errors import RunDirError, SparsebertError, WriteError


def write_failure(path: Path, error: BaseException) -> WriteError | None:
    """A WriteError (a RunDirError and an OSError) naming `path` for a write that failed
    because of the file system (an OSError: a full disk, a read-only or unwritable folder),
    also when a library reports it without an errno (torch.save: "unexpected pos",
    safetensors: "os error 28") on a disk that is full; None for any other error (a bug: its
    traceback is kept)."""
    if isinstance(error, WriteError):
        return error  # already named
    if isinstance(error, OSError):
        reason, errno = error.strerror or str(error) or type(error).__name__, error.errno
    else:
        text = str(error)
        reason = ("No space left on device" if "os error 28" in text
                  or "No space left" in text or _nearly_full(path) else None)
        if reason is None:
            return None
        errno = _errno.ENOSPC
    advice = ("; free some space, then rerun the same command" if errno in _FULL else
              "; make the folder writable, then rerun the same command" if errno in _DENIED
              else "")
    return WriteError(f"{path}: cannot write it ({reason}){advice}", errno)


_FULL = {_errno.ENOSPC, _errno.EDQUOT}  # the disk (or the user's quota) is full
_DENIED = {_errno.EROFS, _errno.EACCES, _errno.EPERM}  # the folder may not be written


def temp_sibling(path: Path, suffix: str) -> Path:
    """`.NAME.suffix` beside `path`, where a write goes before it is moved onto `path`; for a
    name too long for that (file systems allow names of 255 bytes), a hash of the name."""
    name = f".{path.name}.{suffix}"
    if len(name.encode()) > 255:
        name = f".{hashlib.sha256(path.name.encode()).hexdigest()[:32]}.{suffix}"
    return path.with_name(name)


@contextlib.contextmanager
def write_errors_named(path: Path) -> Iterator[None]:
    """Within the block, an error of writing `path` that write_failure recognises is raised as
    its WriteError; any other error as it is."""
    try:
        yield
    except Exception as error:
        failure = write_failure(path, error)
        if failure is None or failure is error:
            raise
        raise failure from None


def _nearly_full(path: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system holding `path` has less than `margin` bytes free."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def fsync_path(path: Path) -> None:
    """Flush `path` to the disk: a file's data, or a folder's files (recursively) and the
    folder's entries, so that a rename that publishes it is not followed, after a power loss, by
    empty files. A file system that cannot fsync a folder is let be."""
    if path.is_dir():
        for entry in path.iterdir():
            if not entry.is_symlink():
                fsync_path(entry)
        fsync_folder(path)
        return
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to the disk, where the file system can."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. EINVAL: not supported there
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, os.replace); a
    file-system failure raises RunDirError naming `path`."""
    path = Path(path)
    tmp = temp_sibling(path, "tmp")
    try:
        with write_errors_named(path):
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:  # nothing left behind when the write or the move fails
        with contextlib.suppress(OSError):
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


def lock_root() -> Path:
    """Where run locks live: $SPARSEBERT_LOCK_DIR, else /tmp (the machine's, not $TMPDIR: a
    job scheduler gives each job its own TMPDIR, and two jobs on one run would not see each
    other's locks), else the temp directory. Locks hold between the processes of one machine."""
    configured = os.environ.get("SPARSEBERT_LOCK_DIR", "").strip()
    if configured:
        return Path(configured).expanduser()
    shared = Path("/tmp")
    if shared.is_dir() and os.access(shared, os.W_OK | os.X_OK):
        return shared
    return Path(tempfile.gettempdir())


def _lock_path(directory: Path) -> Path:
    """The lock file of `directory`: in a per-user folder under lock_root(), named by a hash
    of the resolved path (the run directory itself stays untouched, even before it exists;
    links and relative spellings of one folder share a lock)."""
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:32]
    folder = lock_root() / f"sparsebert-locks-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirError(f"{folder}: cannot create the run locks' folder "
                          f"({error.strerror or error}); set SPARSEBERT_LOCK_DIR to a "
                          f"writable folder") from None
    return folder / f"{key}.lock"


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold `directory`'s exclusive lock for the block, or raise RunDirError at once when
    another process holds it (two commands writing one run would race on its files). `what`
    names the work in the message ("search", "fine-tune"). Released when the block ends or
    the process dies; the lock file is removed by its last holder."""
    directory = Path(directory)
    path = _lock_path(directory)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, holder_what = _holder(fd)
            os.close(fd)
            running = (f"another {what}" if holder_what in (None, what)
                       else f"a {holder_what}")  # (a search's lock seen by a fine-tune, ...)
            then = (", then rerun (it resumes)" if holder_what in (None, what) else "")
            raise RunDirError(
                f"{directory}: {running} is running on this directory"
                f"{f' (process {holder})' if holder else ''}; wait for it to finish "
                f"or stop it{then}") from None
        try:  # a holder may have removed the file between our open and flock: take the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {what}\n".encode())  # who holds it, for the others
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still held: a waiting opener re-checks the inode
        os.close(fd)


def lock_holder(directory: str | os.PathLike) -> int | None:
    """The pid of the process holding `directory`'s run lock (0 when it did not write one yet),
    or None when none does (looked at without taking it)."""
    path = _lock_path(Path(directory))
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # held
        return _holder(fd)[0]
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder(fd: int) -> tuple[int, str | None]:
    """(pid, work) a run lock's holder wrote into its file (`fd`): (0, None) before it did."""
    pid, _, what = os.pread(fd, 128, 0).decode(errors="replace").strip().partition(" ")
    return (int(pid), what or None) if pid.isdigit() else (0, None)


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
    tmp = temp_sibling(path, "tmp")
    try:
        with write_errors_named(path):
            tmp.unlink(missing_ok=True)  # (a read-only folder fails here: named as the write)
            write(tmp)
            fsync_path(tmp)  # on the disk before the rename publishes it
            os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        with contextlib.suppress(OSError):
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
    tmp, old = temp_sibling(path, "tmp"), temp_sibling(path, "old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        with write_errors_named(path):
            write(tmp)
            fsync_path(tmp)  # on the disk before the rename publishes it
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
    fsync_folder(path.parent)
    shutil.rmtree(old, ignore_errors=True)
