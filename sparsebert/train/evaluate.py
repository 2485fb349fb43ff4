"""Predictions and dev metrics of a model, and `evaluate` of a finished run directory."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsebert.checks import is_integer
from sparsebert.errors import RunDirError, SparsebertError
from sparsebert.glue import batching
from sparsebert.glue.loading import GLUE_DIR_ENV, find_split_file, load_split, resolve_glue_dir
from sparsebert.glue.metrics import compute_metrics
from sparsebert.glue.tasks import SplitNotFoundError, get_task
from sparsebert.hf.readout import first_token_readout
from sparsebert.nn.common import eval_mode
from sparsebert.precision import autocast, weights_cast_once
from sparsebert.precision import resolve as resolve_precision
from sparsebert.train.config import TrainConfig, TrainError, resolve_device
from sparsebert.train.rundir import load_run_model, require_finished


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs of a collated batch on `device` (the 'index' entry is dropped)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "index"}


@torch.no_grad()
def predict(model: torch.nn.Module, encoded: batching.Encoded, regression: bool,
            batch_size: int = 128, device: torch.device | str | None = None,
            precision: str = "auto", progress: str | None = None) -> np.ndarray:
    """Predictions (N,) in example order: class indices, or scores for regression.
    progress: a label for a progress bar on stderr over the examples (None: no bar)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out = np.zeros(len(encoded), dtype=np.float32 if regression else np.int64)
    # Each submodule's mode restored afterwards; the last layer at [CLS] only where the
    # classifier reads nothing else; under bf16 the linears' weights cast once, not per batch.
    with (eval_mode(model), first_token_readout(model),
          weights_cast_once(model, precision, device),
          tqdm(total=len(encoded), desc=progress, unit="ex", disable=progress is None,
               leave=False, file=sys.stderr, dynamic_ncols=True) as bar):
        for indices in batching.eval_batches(encoded.lengths, batch_size):
            batch = to_device(batching.collate(encoded, indices), device)
            batch.pop("labels")
            with autocast(device, precision):
                logits = model(**batch).logits.float()  # (B, num_labels)
            values = logits[:, 0] if regression else logits.argmax(dim=-1)
            out[indices] = values.cpu().numpy()
            bar.update(len(indices))
    return out


def evaluate_model(model: torch.nn.Module, task: str, encoded: batching.Encoded,
                   batch_size: int = 128, precision: str = "auto",
                   progress: str | None = None) -> dict[str, float]:
    """Task metrics of `model` on one tokenized split (progress: a bar's label, or None)."""
    glue_task = get_task(task)
    outputs = getattr(getattr(model, "config", None), "num_labels", None)
    if outputs is not None and outputs != glue_task.num_labels:  # else a metric of the wrong
        # head: argmax over another task's classes, or a regression read off logit 0
        raise TrainError(f"evaluate_model: the model has {outputs} output(s) "
                         f"(config.num_labels), {glue_task.name} needs {glue_task.num_labels}")
    predictions = predict(model, encoded, glue_task.is_regression, batch_size,
                          precision=precision, progress=progress)
    return compute_metrics(glue_task, predictions, encoded.labels)


def load_dev_splits(config: TrainConfig, tokenizer, origin: str | None = None,
                    ) -> dict[str, batching.Encoded]:
    """Tokenized dev split(s); the first is required, later ones (MNLI mismatched) optional.
    origin: where config.glue_dir came from, for the error of a missing file (load_split)."""
    task = get_task(config.task)
    out: dict[str, batching.Encoded] = {}
    for i, split in enumerate(task.dev_splits):
        try:
            out[split] = batching.encode(load_split(task, split, config.glue_dir, origin=origin),
                                         tokenizer, config.max_length)
        except SplitNotFoundError as error:  # a broken file is an error, a missing one not
            if i == 0:
                raise
            tqdm.write(f"warning: skipping {task.name} {split}: {error}", file=sys.stderr)
    return out


def data_source(glue_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Where a run's data comes from: the resolved local GLUE folder, or the hub."""
    resolved = resolve_glue_dir(glue_dir)
    if resolved is None:
        return {"source": "hub"}
    return {"source": "glue_dir", "path": str(Path(resolved).resolve())}


def choose_data(recorded: str | None, glue_dir: str | None, run_config: Path | None = None,
                ) -> tuple[str | None, str, str | None]:
    """(glue_dir to use, why, origin) for evaluating a run: --glue-dir, else $GLUE_DIR, else
    the folder the run recorded (in `run_config`), else the hub. origin: where the folder came
    from, for the error of a missing file (find_split_file's origin; None for the hub)."""
    if glue_dir is not None and str(glue_dir).strip():
        return glue_dir, f"--glue-dir {glue_dir}", "--glue-dir"
    env = os.environ.get(GLUE_DIR_ENV, "").strip()
    if env:
        origin = (f"${GLUE_DIR_ENV}, which evaluate uses before the run's recorded data folder"
                  if recorded else f"${GLUE_DIR_ENV}")
        return env, f"${GLUE_DIR_ENV} ({env})", origin
    if recorded:
        where = f"recorded in {run_config}" if run_config is not None else "recorded by the run"
        return (recorded, f"the run's data folder ({recorded})",
                f"the run's recorded data folder, {where}")
    return None, "the hub (the run was trained on hub data)", None


def read_run_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig of a run directory's config.json; RunDirError naming the file when it
    is damaged (not JSON, or not a run's config)."""
    path = run_dir / "config.json"
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError as error:
        raise RunDirError(f"{path}: damaged, not a text file ({error.reason}); restore it or "
                          f"rerun the same finetune command into a new --out") from None
    except json.JSONDecodeError as error:
        raise RunDirError(f"{path}: damaged, not valid JSON ({error}); restore it or rerun the "
                          f"same finetune command into a new --out") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: damaged, expected a JSON object of the run's settings, "
                          f"found {type(data).__name__}")
    if not isinstance(data.get("task"), str):  # (a default would evaluate another task)
        raise RunDirError(f"{path}: not a run's config (no task); restore it or rerun the "
                          f"same finetune command into a new --out")
    try:
        return TrainConfig.from_json(data)
    except (TypeError, SparsebertError) as error:
        raise RunDirError(f"{path}: not a run's config ({error})") from None


def _warn_if_other_dev_data(run_dir: Path, task, glue_dir: str | None) -> None:
    """A warning when a dev file under `glue_dir` differs from the one the run was scored on
    (its data.json): the metrics then describe other data."""
    from sparsebert.train.data_identity import DATA_FILE, file_sha256, read_record  # noqa: PLC0415

    try:
        saved = read_record(run_dir / DATA_FILE, "the GLUE data")
    except RunDirError as error:  # evaluating writes nothing: say what cannot be checked
        warnings.warn(f"{error}. The dev data scored now cannot be checked against those the run "
                      f"was scored on", stacklevel=3)
        return
    if saved is None or not saved["files"]:
        return
    changed = []
    for split in task.dev_splits:
        try:
            path = find_split_file(task, split, glue_dir)
        except SplitNotFoundError:
            continue
        if saved["files"].get(split) not in (None, file_sha256(path)):
            changed.append(split)
    if changed:
        warnings.warn(f"the {', '.join(changed)} data under {resolve_glue_dir(glue_dir)} differ "
                      f"from those {run_dir} was scored on ({run_dir / DATA_FILE}): these "
                      f"metrics are on other data", stacklevel=3)


def trained_precision(run_dir: Path, config: TrainConfig) -> str:
    """The precision the run was trained and scored with. "auto" depends on the device (bf16 on
    CUDA, fp32 elsewhere): results.json records the one it ran in (older ones: resolved on the
    device the run finished on, not on the one evaluating now); "auto" again when unknown."""
    if config.precision != "auto":
        return config.precision
    try:
        results = json.loads((run_dir / "results.json").read_text())
        trained_on, recorded = results.get("device"), results.get("precision")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        trained_on = recorded = None
    if recorded in ("fp32", "bf16"):
        return recorded
    trained_on = trained_on if isinstance(trained_on, str) else config.device
    try:
        kind = torch.device(trained_on).type if trained_on not in (None, "auto") else None
    except (RuntimeError, TypeError):
        kind = None
    return "auto" if kind is None else "bf16" if kind == "cuda" else "fp32"


def evaluate(run_dir: str | os.PathLike, glue_dir: str | None = None,
             batch_size: int | None = None, device: str = "auto",
             verbose: bool = False) -> dict[str, Any]:
    """Dev metrics of a finished run's model, exactly as trained (gates, physical pruning and
    weight masks restored): {"task", "run", "metrics": {split: {...}}, "score", "data", ...}.

    Data: --glue-dir, else $GLUE_DIR, else the folder recorded by the run, else the hub.
    """
    if batch_size is not None and (not is_integer(batch_size) or batch_size < 1):
        raise TrainError(f"--batch-size {batch_size!r}: expected an integer >= 1")
    run_dir = Path(run_dir).expanduser()
    require_finished(run_dir)
    config = read_run_config(run_dir)
    config.glue_dir, why, origin = choose_data(config.glue_dir, glue_dir,
                                               run_dir / "config.json")
    task = get_task(config.task)
    if resolve_glue_dir(config.glue_dir) is not None:  # a missing file: one error, at once
        find_split_file(task, task.dev_splits[0], config.glue_dir, origin=origin)
        _warn_if_other_dev_data(run_dir, task, config.glue_dir)
    model, tokenizer = load_run_model(run_dir, task.num_labels, task.labels)
    if verbose:
        print(f"data: {why}", file=sys.stderr)
    target = resolve_device(device)
    model.to(target)
    precision = trained_precision(run_dir, config)
    ran_in = resolve_precision(precision, target)  # ("auto": the run's is not recorded)
    if verbose:
        print(f"precision: {ran_in} on {target}", file=sys.stderr)
    metrics = {split: evaluate_model(model, task.name, encoded,
                                     batch_size or config.eval_batch_size, precision,
                                     progress=f"{task.name} {split}" if verbose else None)
               for split, encoded in load_dev_splits(config, tokenizer, origin).items()}
    first = task.dev_splits[0]
    return {"task": task.name, "run": str(run_dir), "metrics": metrics,
            "threshold_metric": task.threshold_metric,
            "score": metrics[first][task.threshold_metric], "device": str(target),
            "precision": ran_in,
            "data": {**data_source(config.glue_dir), "chosen_by": why}}
