"""What a run directory holds, checked before `finetune` (sparsebert.train.loop) starts,
resumes or returns a run: the saved settings against the requested ones, files that are not a
run's, a checkpoint that is not this run's, a finished run (its model/ still there), and the
precision a resumed run keeps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsebert.atomic import read_json
from sparsebert.precision import resolve as resolve_precision
from sparsebert.train.checkpoint import (
    PREVIOUS_NAME,
    CheckpointError,
    remove_checkpoints,
    set_rng_state,
)
from sparsebert.train.config import (
    RUNTIME_FIELDS,
    TrainConfig,
    TrainError,
    compared_settings,
    recorded,
    same_setting,
)
from sparsebert.train.data_identity import DATA_FILE
from sparsebert.train.model_identity import MODEL_FILE
from sparsebert.train.rundir import (
    MASKS_NAME,
    RunResult,
    foreign_entries,
    is_search_dir,
    listed,
    model_missing,
)
from sparsebert.train.step import load_optimizer_state

# What a run directory holds before its config.json (written once its inputs are checked): a
# run killed in between resumes there.
_BEFORE_CONFIG = frozenset({DATA_FILE, MODEL_FILE, MASKS_NAME, "config.json"})


def check_config(out_dir: Path, config: TrainConfig) -> RunResult | None:
    """Existing finished result or None; raises if the directory holds another run, or
    something other than a run (files that fine-tuning would overwrite or mix with its own)."""
    saved_path = out_dir / "config.json"
    if not saved_path.is_file():
        check_no_foreign_files(out_dir)
        return None
    saved = read_json(saved_path, "restore it, or delete that run directory to fine-tune again")
    if is_search_dir(out_dir):
        raise TrainError(f"--out {out_dir}: holds a lottery search (sparsebert search), not a "
                         "fine-tuning run; use another --out")
    if not isinstance(saved, dict) or "task" not in saved or "model_type" in saved:
        what = ("a model's folder (its config.json is a model configuration)"
                if isinstance(saved, dict) and "model_type" in saved
                else "a config.json that is not a run's")
        raise TrainError(f"--out {out_dir}: holds {what}, not a fine-tuning run; use another "
                         f"--out (to fine-tune that model, pass it as --model)")
    diff = settings_diff(saved, config)
    if diff:
        raise TrainError(f"{out_dir} holds a run with a different config ({diff}, as "
                         f"saved vs requested); use another --out or delete that directory")
    return RunResult.load(out_dir)


def settings_diff(saved: dict[str, Any], config: TrainConfig) -> dict[str, tuple]:
    """{setting: (saved, requested)} for each training setting a record (a config.json or a
    checkpoint's "config") has other than `config`; runtime fields may differ."""
    mine = config.to_json()
    return {k: (recorded(saved, k), recorded(mine, k)) for k in compared_settings(saved, mine)
            if k not in RUNTIME_FIELDS and not same_setting(k, saved.get(k), mine.get(k))}


def foreign_checkpoint(config: TrainConfig) -> Callable[[dict[str, Any]], str | None]:
    """load_checkpoint's test: a checkpoint written with other settings (one copied in from
    another run) is not this run's."""
    def reason(state: dict[str, Any]) -> str | None:
        saved = state.get("config")
        if saved is None:  # (not recorded: nothing to compare)
            return None
        if not isinstance(saved, dict):
            return "its recorded settings are not an object"
        diff = settings_diff(saved, config)
        return f"written with other settings: {diff}, as saved vs this run's" if diff else None

    return reason


def restore_checkpoint(state: dict[str, Any], model: torch.nn.Module, optimizer, scheduler,
             device: torch.device) -> None:
    """Load a checkpoint's model, optimizer, schedule and RNG states; CheckpointError naming
    the file when they do not fit this run (another model's weights, a damaged entry)."""
    try:
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], device)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as error:
        first = " ".join(str(error).split())[:200] or type(error).__name__
        where = state.get("path", "the checkpoint")
        raise CheckpointError(f"{where}: does not fit this run's model or optimizer ({first}); "
                              f"delete it (and {PREVIOUS_NAME} beside it) to start the run "
                              "over") from None


def check_no_foreign_files(out_dir: Path) -> None:
    """Refuse an --out without a run's config.json that holds anything but what a run writes
    before it (fine-tuning would replace its model/ folder, append to its metrics.jsonl, or
    take over a run whose config.json was lost)."""
    foreign = foreign_entries(out_dir, _BEFORE_CONFIG.__contains__)
    if not foreign:
        return
    lost = ("; it looks like a run whose config.json is missing: restore it to resume or "
            "reuse that run" if {"results.json", "checkpoint.pt", "model"} & set(foreign)
            else "")
    raise TrainError(f"--out {out_dir}: holds files that are not a fine-tuning run's "
                     f"({listed(foreign)}) "
                     f"and no run config.json{lost}; use another (or an empty) --out")


def finished_run(run_dir: Path) -> RunResult | None:
    """The finished result in `run_dir`, else None; checkpoints a kill left behind between its
    results.json and their removal are removed (for callers that skip finished runs without
    calling finetune, which does the same). A run whose model/ folder is gone or incomplete
    is not finished: finetune trains it again."""
    done = RunResult.load(run_dir)
    if done is None or not done.finished or model_missing(run_dir) is not None:
        return None
    remove_checkpoints(run_dir)
    return done



def run_precision(config: TrainConfig, device: torch.device, state: dict | None) -> str:
    """fp32 or bf16 for this run. A resumed run keeps the precision it started with (its
    checkpoint's): with precision "auto" a resume on another kind of device (the device is a
    runtime setting) would otherwise switch fp32 and bf16 half-way, with a warning."""
    precision = resolve_precision(config.precision, device)
    started = state.get("precision") if state is not None else None
    if config.precision == "auto" and started in ("fp32", "bf16") and started != precision:
        warnings.warn(f"precision auto: the run started in {started} and resumes on {device} "
                      f"in {started} as well (auto would pick {precision} there)", stacklevel=3)
        return started
    return precision
