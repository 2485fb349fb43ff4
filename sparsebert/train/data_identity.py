"""data.json: what the GLUE files a run (or search) started with contained, so that a resume
on other data (another --glue-dir or $GLUE_DIR) is refused instead of silently mixing two
datasets. A copy of the same files in another folder resumes as before; a switch between a
local folder and the hub is refused too.

    {"task": "SST-2", "source": "glue_dir", "files": {"train": "<sha256>", "dev": "<sha256>"}}
    {"task": "SST-2", "source": "hub", "files": {}}        (hub data: nothing to fingerprint)

Records written before "source" existed are read as "glue_dir" when they list files.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from sparsebert.atomic import atomic_write_json, read_json
from sparsebert.errors import RunDirError
from sparsebert.glue.loading import find_split_file, resolve_glue_dir
from sparsebert.glue.tasks import GlueTask, SplitNotFoundError

DATA_FILE = "data.json"


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file (cached per process while its size and mtime are unchanged)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of the file at `path` (computed once per process while it is unchanged)."""
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def data_fingerprint(task: GlueTask, glue_dir: str | os.PathLike | None) -> dict[str, str]:
    """{split: sha256 of its file} for `task`'s train and dev splits under `glue_dir` (else
    $GLUE_DIR); {} for hub data. A missing optional dev split (MNLI mismatched) is left out."""
    if resolve_glue_dir(glue_dir) is None:
        return {}
    out = {}
    for i, split in enumerate(("train", *task.dev_splits)):
        try:
            path = find_split_file(task, split, glue_dir)
        except SplitNotFoundError:
            if i <= 1:  # train and the first dev split are required
                raise
            continue
        out[split] = file_sha256(path)
    return out


def _describe(source: str, glue_dir: str | os.PathLike | None) -> str:
    return ("the hub's GLUE data (no --glue-dir, no $GLUE_DIR)" if source == "hub"
            else f"the GLUE folder {resolve_glue_dir(glue_dir)}")


def read_record(path: Path, what: str) -> dict | None:
    """A data.json / model.json record with its "files" dict; None when there is none (a new
    directory, or one from before these records). A damaged record raises RunDirError naming it:
    rewriting it from `what` is in use now would accept exactly the change it guards against."""
    if not path.is_file():
        return None
    fix = (f"restore it, or delete it to go on with {what} now in use (they are then recorded "
           f"again)")
    saved = read_json(path, fix)
    if not isinstance(saved, dict) or not isinstance(saved.get("files"), dict):
        raise RunDirError(f"{path}: damaged (expected a JSON object with a \"files\" object); "
                          f"{fix}")
    return saved


def check_data(out_dir: Path, task: GlueTask, glue_dir: str | os.PathLike | None) -> None:
    """Refuse to go on in `out_dir` with data other than it started with; record the data of a
    new (or older, unrecorded) directory. `out_dir` must exist."""
    files = data_fingerprint(task, glue_dir)
    source = "glue_dir" if files else "hub"  # hub data: nothing local to fingerprint
    path = out_dir / DATA_FILE
    saved = read_record(path, "the GLUE data")
    if saved is not None:
        theirs = saved["files"]
        their_source = saved.get("source", "glue_dir" if theirs else "hub")
        if their_source != source:
            where = "the hub's GLUE data" if their_source == "hub" else "a local GLUE folder"
            raise RunDirError(
                f"{out_dir} was started on {where} ({path}) and would go on with "
                f"{_describe(source, glue_dir)}. Resume with the data it used (--glue-dir or "
                f"$GLUE_DIR for a folder, neither for the hub), or use another --out")
        changed = sorted(k for k in set(theirs) | set(files) if theirs.get(k) != files.get(k))
        if changed:
            raise RunDirError(
                f"{out_dir} was started on other {task.name} data: the {', '.join(changed)} "
                f"data under {resolve_glue_dir(glue_dir)} differ from what it began with "
                f"({path}). Resume with the GLUE folder it used (--glue-dir or $GLUE_DIR), or "
                f"use another --out")
        return
    atomic_write_json(path, {"task": task.name, "source": source, "files": files})
