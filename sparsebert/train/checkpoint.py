"""Training checkpoints that load with `torch.load(weights_only=True)`, and RNG state.

A checkpoint holds tensors and plain JSON-able values only (model and optimizer state dicts,
schedule state, RNG states as tensors, counters), so resuming a run directory received from
someone else cannot run code. Writing is fail-safe:

  1. the new state goes to a temporary file, which is read back (weights_only) to verify it;
  2. the current checkpoint.pt becomes checkpoint.prev.pt;
  3. the verified file is moved onto checkpoint.pt.

A truncated or damaged checkpoint.pt is then never the only copy: loading falls back to
checkpoint.prev.pt (and says so) and sets the damaged file aside as checkpoint.damaged.pt, so
that the next write keeps the good previous one; when neither is usable the error names the
files.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsebert.atomic import fsync_folder, fsync_path, write_errors_named
from sparsebert.errors import RunDirError

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
DAMAGED_NAME = "checkpoint.damaged.pt"


# what resuming reads from a checkpoint (the loop's Step 3)
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "rng", "step", "elapsed_s")


class CheckpointError(RunDirError):
    """A checkpoint that cannot be read safely."""


def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """torch's CPU generator state, and the training device's when it is a GPU, as tensors (for
    exact resumption of dropout). Only that device's: a run resumed on another GPU, or with
    fewer GPUs visible, draws from its own device's generator what the run would have."""
    device = torch.device(device)
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str = "cpu") -> None:
    """Restore what rng_state() returned; the saved GPU state goes to `device`'s generator.
    (Checkpoints of earlier versions hold every visible GPU's state by index: `device`'s index
    is used when it is there.)"""
    device = torch.device(device)
    torch.set_rng_state(state["torch"])
    if device.type != "cuda":
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
        return
    saved = state.get("cuda") or []
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index < len(saved):
        torch.cuda.set_rng_state(saved[index], device)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:160] if lines else type(error).__name__


def _read(path: Path) -> dict[str, Any]:
    """torch.load(weights_only=True); CheckpointError for anything unreadable or unsafe,
    damaged bytes included (torch.load does not check the CRC-32 that torch.save writes for each
    record of its zip archive: zipfile does, at the cost of one more read of the file). A file
    saved with torch.serialization.set_crc32_options(False) has no CRCs (all 0) to check."""
    try:
        with zipfile.ZipFile(path) as archive:
            has_crcs = any(info.CRC for info in archive.infolist() if info.file_size)
            # the first record whose bytes fail its CRC-32, or None
            damaged = archive.testzip() if has_crcs else None
        state = (None if damaged is not None
                 else torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain values "
            f"({_first_line(error)}); only checkpoints written by sparsebert "
            f"resume. Delete it to start the run over") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"{path}: truncated or damaged "
                              f"({_first_line(error)[:80]})") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: truncated or damaged (its record {damaged!r} fails its "
                              f"CRC-32 check)")
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a sparsebert training checkpoint (no step/model)")
    return state


def save_checkpoint(out_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` as <out_dir>/checkpoint.pt, verified, keeping the previous one."""
    path = Path(out_dir) / CHECKPOINT_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    with write_errors_named(path):
        try:
            torch.save(state, tmp)
        except BaseException:  # a full disk: no half-written file left to fill it further
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
    _read(tmp)  # Step 1: the new file must load before it replaces anything
    with write_errors_named(path):
        fsync_path(tmp)  # (and be on the disk: the run's later files rely on it)
        if path.exists():
            os.replace(path, path.with_name(PREVIOUS_NAME))  # Step 2: keep the last good one
        os.replace(tmp, path)  # Step 3
    fsync_folder(path.parent)
    return path


def load_checkpoint(out_dir: str | os.PathLike,
                    foreign: Callable[[dict[str, Any]], str | None] | None = None
                    ) -> dict[str, Any] | None:
    """The latest readable checkpoint's state (CPU tensors), or None when there is none.

    Falls back to checkpoint.prev.pt when checkpoint.pt is damaged (a note on stderr), and then
    moves the damaged file to checkpoint.damaged.pt (else the next save would rotate it onto
    the good previous one); raises CheckpointError when checkpoints exist but none is usable.
    foreign(state): why a readable checkpoint is not this run's (e.g. its recorded settings
    differ), or None; such a checkpoint counts as unusable. The state's "path" entry names the
    file it came from.
    """
    out_dir = Path(out_dir)
    current, previous = out_dir / CHECKPOINT_NAME, out_dir / PREVIOUS_NAME
    if not current.exists() and not previous.exists():
        return None
    errors = []
    for path in (current, previous):
        if not path.exists():
            continue
        try:
            state = _read(path)
            missing = [key for key in REQUIRED_KEYS if key not in state]
            if missing:
                raise CheckpointError(f"{path}: damaged (no {', '.join(missing)} in it)")
            reason = foreign(state) if foreign is not None else None
            if reason:
                raise CheckpointError(f"{path}: not this run's checkpoint ({reason})")
        except CheckpointError as error:
            errors.append(str(error))
            continue
        state["path"] = str(path)
        if path == previous and errors:
            damaged = out_dir / DAMAGED_NAME
            if current.exists():
                os.replace(current, damaged)
            print(f"sparsebert: warning: {errors[0]}; resuming from the previous checkpoint "
                  f"{previous.name} (step {state['step']}); the damaged file is now "
                  f"{damaged.name}", file=sys.stderr)
        return state
    damaged = [name for name in (current.name, previous.name) if (out_dir / name).exists()]
    raise CheckpointError(f"{'; '.join(errors)}; no usable checkpoint. Delete "
                          f"{' and '.join(damaged)} in {out_dir} to start the run over")


def remove_checkpoints(out_dir: str | os.PathLike) -> None:
    """Drop checkpoint.pt, checkpoint.prev.pt, a damaged one set aside and an unfinished write's
    temporary file (the run has finished)."""
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME, DAMAGED_NAME, f".{CHECKPOINT_NAME}.tmp"):
        path = Path(out_dir) / name
        if path.exists() or path.is_symlink():  # (a read-only folder refuses even the unlink of
            path.unlink(missing_ok=True)  # a missing file)
