"""Atomic files, training checkpoints and fixed weight masks for the fine-tuning loop.

Everything written here is written to a temporary name first and moved into place with
os.replace, so an interrupted run never leaves a half-written checkpoint or result.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """json.dumps(obj, indent=2) to `path`, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_dir(path: str | os.PathLike, write) -> None:
    """Build a directory with write(tmp_dir) and move it into place at `path` atomically.

    An existing directory at `path` is replaced (moved aside first, removed after).
    """
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    write(tmp)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA) generator states, for exact resumption of dropout."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned (CUDA states only when CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """torch.save(state) to <out_dir>/checkpoint.pt atomically; returns the path."""
    path = Path(out_dir) / CHECKPOINT_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The state saved by save_checkpoint, on CPU, or None when there is none."""
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


class WeightMasks:
    """Fixed 0/1 masks on parameters (magnitude pruning), enforced around optimizer steps.

    masks: (parameter, mask) pairs; each mask has the parameter's shape (bool or 0/1 float).
    `apply()` multiplies every parameter by its mask in place; `attach(optimizer)` registers
    apply() as an optimizer step post-hook (never patching optimizer.step), so weights that
    start at zero stay exactly zero whatever AdamW's moments or weight decay do.
    """

    def __init__(self, masks: Sequence[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        self.masks: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for i, (param, mask) in enumerate(masks):
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(f"weight mask {i}: shape {tuple(mask.shape)} does not match "
                                 f"its parameter {tuple(param.shape)}")
            self.masks.append((param, mask.detach()))

    def __len__(self) -> int:
        return len(self.masks)

    @torch.no_grad()
    def apply(self) -> None:
        """param *= mask for every pair (mask cast to the parameter's device and dtype)."""
        for i, (param, mask) in enumerate(self.masks):
            if mask.device != param.device or mask.dtype != param.dtype:
                mask = mask.to(device=param.device, dtype=param.dtype)
                self.masks[i] = (param, mask)
            param.mul_(mask)

    def attach(self, optimizer: torch.optim.Optimizer):
        """Zero the masked weights now and after every optimizer.step(); returns the handle."""
        self.apply()
        return optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: self.apply())


class MetricsLog:
    """Append-only metrics.jsonl; on resume, drops records written after the checkpoint."""

    def __init__(self, path: Path, keep_until_step: int) -> None:
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        record = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                  for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
