"""`finetune`: fine-tune a (possibly patched, masked or pruned) model on one GLUE task into a
resumable run directory (layout: sparsebert.train.rundir).

Running again on the same directory with the same config and masks resumes from the last
checkpoint (or returns the finished result); a different config or different masks are
refused. Batch order is a function of (seed, epoch), the RNG state and the running loss
window are checkpointed, so a resumed run logs and computes what an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsebert.atomic import atomic_write_json, read_json, run_lock
from sparsebert.errors import SparsebertError
from sparsebert.glue import batching
from sparsebert.glue.loading import load_split
from sparsebert.glue.tasks import get_task
from sparsebert.hf.loading import check_max_length, load_model, preflight_model
from sparsebert.hf.readout import first_token_readout
from sparsebert.precision import autocast, outside_autocast
from sparsebert.precision import resolve as resolve_precision
from sparsebert.pruning.weight_masks import WeightMasks
from sparsebert.runtime import device_name, git_sha, versions
from sparsebert.train import data_cache
from sparsebert.train.checkpoint import (
    PREVIOUS_NAME,
    CheckpointError,
    load_checkpoint,
    remove_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from sparsebert.train.config import (
    GRAPH_PAD_MULTIPLE,
    RUNTIME_FIELDS,
    TrainConfig,
    TrainError,
    compared_settings,
    recorded,
    resolve_device,
    same_setting,
    use_cuda_graphs,
)
from sparsebert.train.data_identity import DATA_FILE, check_data, data_fingerprint
from sparsebert.train.evaluate import data_source, evaluate_model, load_dev_splits
from sparsebert.train.metrics_log import MetricsLog
from sparsebert.train.model_identity import MODEL_FILE, check_model
from sparsebert.train.optim import make_optimizer
from sparsebert.train.rundir import (
    MASKS_NAME,
    PLAIN_MASKS,
    RunResult,
    check_masks,
    check_out_dir,
    describe_masks,
    foreign_entries,
    is_search_dir,
    listed,
    make_out_dir,
    model_missing,
    now,
    save_run_model,
)
from sparsebert.train.step import StepSettings, load_optimizer_state, make_train_step

# What a run directory holds before its config.json (written once its inputs are checked): a
# run killed in between resumes there.
_BEFORE_CONFIG = frozenset({DATA_FILE, MODEL_FILE, MASKS_NAME, "config.json"})


def check_config(out_dir: Path, config: TrainConfig) -> RunResult | None:
    """Existing finished result or None; raises if the directory holds another run, or
    something other than a run (files that fine-tuning would overwrite or mix with its own)."""
    saved_path = out_dir / "config.json"
    if not saved_path.is_file():
        _check_no_foreign_files(out_dir)
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


def _foreign_checkpoint(config: TrainConfig) -> Callable[[dict[str, Any]], str | None]:
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


def _restore(state: dict[str, Any], model: torch.nn.Module, optimizer, scheduler,
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


def _check_no_foreign_files(out_dir: Path) -> None:
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


def finetune(config: TrainConfig, out_dir: str | os.PathLike, *,
             model: torch.nn.Module | None = None, tokenizer=None,
             weight_masks: Sequence[tuple[torch.nn.Parameter, torch.Tensor]] | None = None,
             on_step: Callable[[int, float], None] | None = None,
             progress: bool = True) -> RunResult:
    """Fine-tune on config.task and write the run directory; returns its RunResult.

    model/tokenizer: a pre-built (e.g. patched, masked or physically pruned) model to train
    instead of loading config.model; its masks are saved with the run and reloaded by
    `evaluate`. weight_masks: (parameter, 0/1 mask) pairs held fixed (masked weights stay
    exactly zero). on_step(step, loss) is called after every optimizer step.
    If the run stops early (stop_after_steps) the result has status "stopped".
    config.threads applies for the duration of the call only.
    """
    if not isinstance(config, TrainConfig):
        raise TrainError(f"finetune: 'config' must be a TrainConfig (e.g. TrainConfig(task="
                         f"'RTE')), got {type(config).__name__}")
    config.check_values()  # (--threads among them) before anything else
    out_dir = Path(out_dir).expanduser()  # (the model is later loaded from it, ~ expanded)
    threads = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        with run_lock(out_dir, "fine-tune"), contextlib.ExitStack() as cleanup:
            # (cleanup: hooks put on a caller's model come off)
            return _finetune(config, out_dir, model, tokenizer, weight_masks, on_step,
                             progress, cleanup)
    finally:
        torch.set_num_threads(threads)


def _finetune(config: TrainConfig, out_dir: Path, model, tokenizer, weight_masks, on_step,
              progress: bool, cleanup: contextlib.ExitStack) -> RunResult:
    start_wall = time.perf_counter()
    config = config.resolved()
    task = get_task(config.task)
    # Step 0: cheap checks before any data or model is loaded.
    check_out_dir(out_dir)
    device = resolve_device(config.device)
    graphs = use_cuda_graphs(config, device)  # --cuda-graphs on without CUDA: refused here
    data = data_source(config.glue_dir)
    config.glue_dir = data.get("path")  # the run remembers where its data came from
    if model is not None and tokenizer is None:
        raise TrainError("finetune(model=...) needs the tokenizer too")
    if model is not None and tokenizer.pad_token_id is None:  # batches are padded
        raise TrainError("finetune(tokenizer=...): the tokenizer has no padding token; set "
                         "tokenizer.pad_token (e.g. to its eos_token) and "
                         "model.config.pad_token_id to its id")
    if model is not None:  # half-precision master weights lose updates (load_model: fp32)
        half = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                       if p.dtype in (torch.float16, torch.bfloat16)})
        if half:
            raise TrainError(f"finetune(model=...): the model has {' and '.join(half)} "
                             f"parameters; pass it in float32 (model.float()): --precision "
                             f"bf16 trains under bf16 autocast over float32 weights")
    masks = WeightMasks(weight_masks or [])
    if weight_masks and model is None:
        raise TrainError("finetune(weight_masks=...) needs the model the masks belong to")
    mask_info = describe_masks(model, masks) if model is not None else PLAIN_MASKS
    finished = check_config(out_dir, config)
    if (out_dir / "config.json").is_file():  # a run (finished or not) on other data or
        check_data(out_dir, task, config.glue_dir)  # model files is refused before anything
        check_model(out_dir, config.model)  # is loaded
    gone = model_missing(out_dir) if finished is not None and finished.finished else None
    if finished is not None and finished.finished:
        check_masks(out_dir, mask_info)  # a finished run with other masks is another run
        if gone is None:
            remove_checkpoints(out_dir)  # left by a kill between results.json and their removal
            return finished
        # Its model/ is gone (deleted, or emptied by hand): the run is trained again (the same
        # result on the CPU); results.json is replaced when it finishes.
        warnings.warn(f"{out_dir}: the run finished, but its model is gone ({gone}): "
                      "fine-tuning it again", stacklevel=3)
    try:
        if model is None:
            preflight_model(config.model, max_length=config.max_length)
        else:
            check_max_length(model.config, config.max_length, model)
    except SparsebertError as error:
        if gone is None:
            raise
        raise TrainError(f"{out_dir}: the run finished, but its model is gone ({gone}), and "
                         f"it cannot be fine-tuned again: {error}; restore its model/, or "
                         f"delete the run directory {out_dir} to redo it") from None
    state = (load_checkpoint(out_dir, _foreign_checkpoint(config)) if out_dir.is_dir()
             else None)  # a bad one fails here

    # Step 1: data (train subset drawn with the run's seed), then model and tokenizer.
    train_data = load_split(task, "train", config.glue_dir)
    train_set_examples = len(train_data)
    if config.max_train_examples is not None and config.max_train_examples < len(train_data):
        rng = np.random.default_rng([config.seed, 1])
        train_data = train_data.subset(np.sort(rng.choice(
            len(train_data), config.max_train_examples, replace=False)))
    if model is None:
        model, tokenizer = load_model(config.model, task.num_labels, labels=task.labels,
                                      seed=config.seed)
        check_max_length(model.config, config.max_length, model)  # (a type the config alone
        # does not tell starts positions after its padding index: before the first batch)
    # Tokenized once per process when data_cache is enabled (a sweep's workers), else now.
    subset = None if config.max_train_examples is None else (config.seed,
                                                              config.max_train_examples)
    data_key = (task.name, config.glue_dir,
                tuple(sorted(data_fingerprint(task, config.glue_dir).items())),  # the contents
                data_cache.tokenizer_key(tokenizer), config.max_length)
    train = data_cache.cached(("train", subset, *data_key),
                              lambda: batching.encode(train_data, tokenizer, config.max_length))
    dev = data_cache.cached(("dev", *data_key), lambda: load_dev_splits(config, tokenizer))
    make_out_dir(out_dir, TrainError)
    check_data(out_dir, task, config.glue_dir)  # refuses other data; writes data.json if new
    check_model(out_dir, config.model)  # the same for the model's files (model.json)
    check_masks(out_dir, mask_info)  # refuses other masks; writes masks.json for a new run
    atomic_write_json(out_dir / "config.json", config.to_json())  # inputs are good: a run
    model.to(device).train()

    # Step 2: optimizer, schedule, fixed weight masks.
    steps_per_epoch = batching.num_batches(len(train), config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer, scheduler = make_optimizer(model, config, total_steps, capturable=graphs)
    optimizer.zero_grad(set_to_none=True)  # gradients a caller's model holds are not this run's
    if len(masks):
        cleanup.callback(masks.attach(optimizer).remove)

    # Step 3: resume from the checkpoint, if any; else seed dropout.
    step, elapsed = 0, 0.0
    window: dict[str, Any] = {"loss": 0.0, "n": 0, "examples": 0}
    if state is not None:
        _restore(state, model, optimizer, scheduler, device)
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        window.update(state.get("log_window", {}))
        masks.apply()
    else:
        torch.manual_seed(config.seed)
    precision = _run_precision(config, device, state)
    # The log window's clock: its examples before a resume came in its recorded seconds.
    window["t"] = time.perf_counter() - float(window.pop("seconds", 0.0))
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", keep_until_step=step)
    settings = StepSettings(config.grad_clip,
                            lambda: autocast(device, precision, cache_enabled=not graphs))
    # The run's precision alone, also in a caller's own autocast region: its backward (and the
    # optimizer step) would otherwise run in the region's dtype.
    cleanup.enter_context(outside_autocast(device))
    # The classifier reads the last layer at [CLS] only: that layer's FFN runs on that row.
    cleanup.enter_context(first_token_readout(model))
    train_step = make_train_step(model, optimizer, settings, device, graphs)
    pad_multiple = GRAPH_PAD_MULTIPLE if graphs else None
    pin = device.type == "cuda"

    saved_at = [step]  # the step of the newest checkpoint on disk

    def checkpoint() -> None:
        if saved_at[0] == step:
            return  # already checkpointed at this step
        saved_at[0] = step
        save_checkpoint(out_dir, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(device), "step": step,
            "elapsed_s": elapsed + time.perf_counter() - t0, "config": config.to_json(),
            "precision": precision,
            "log_window": {"loss": float(window["loss"]), "n": window["n"],
                           "examples": window["examples"],
                           "seconds": time.perf_counter() - window["t"]}})

    # Step 4: the loop; batch order is a function of (seed, epoch), so resuming skips batches.
    bar = tqdm(total=total_steps, initial=step, disable=not progress, unit="step",
               desc=f"{task.name} {out_dir.name}", mininterval=1.0, dynamic_ncols=True)
    t0 = time.perf_counter()
    dev_metrics: dict[str, dict[str, float]] = {}
    stop = config.stop_after_steps

    def stopped() -> RunResult:
        bar.close()
        return RunResult(status="stopped", task=task.name, run=str(out_dir), step=step,
                         config=config.to_json(), data=data, masks=_summary(mask_info))

    if stop is not None and stop <= step < total_steps:
        return stopped()  # resumed at or past the stop: its checkpoint is on disk already
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        order = batching.train_batches(train.lengths, config.batch_size, config.seed, epoch,
                                       bucket=config.bucket)
        for indices in order[first:]:
            micro = []  # the batch, or its micro-batches (--grad-accum)
            for part in _micro_batches(indices, config.grad_accum):
                batch = batching.collate(train, part, config.padding, pad_multiple)
                batch.pop("index")
                micro.append({k: v.pin_memory() for k, v in batch.items()} if pin else batch)
            # forward(s), backward(s), clip, optimizer step
            loss = train_step(micro if len(micro) > 1 else micro[0])
            step_lr = scheduler.get_last_lr()[0]  # the rate this step used, logged below
            scheduler.step()
            step += 1
            # On the GPU the loss stays there until logged: no host sync per step.
            window["loss"] = window["loss"] + (loss if pin else float(loss))
            window["n"] += 1
            window["examples"] += len(indices)
            if step % config.log_every == 0 or step == total_steps:
                window["loss"] = float(window["loss"])
                rate = window["examples"] / max(time.perf_counter() - window["t"], 1e-9)
                metrics_log.write({"step": step, "epoch": step / steps_per_epoch,
                                   "loss": window["loss"] / window["n"],
                                   "lr": step_lr, "examples_per_s": rate})
                bar.set_postfix(loss=f"{window['loss'] / window['n']:.4f}", ex_s=f"{rate:.1f}")
                window = {"loss": 0.0, "n": 0, "examples": 0, "t": time.perf_counter()}
            bar.update(1)
            if on_step is not None:
                on_step(step, float(loss))
            if step % steps_per_epoch == 0:  # epoch end: dev metrics, then a checkpoint
                for split, encoded in dev.items():
                    dev_metrics[split] = evaluate_model(
                        model, task.name, encoded, config.eval_batch_size, precision,
                        progress=f"{task.name} {split}" if progress else None)
                    metrics_log.write({"step": step, "epoch": step // steps_per_epoch,
                                       "split": split, **dev_metrics[split]})
                if step < total_steps:  # the last epoch's state is the final model, saved next
                    checkpoint()
            elif config.checkpoint_every and step % config.checkpoint_every == 0:
                checkpoint()
            if stop is not None and stop <= step < total_steps:
                if step % steps_per_epoch:
                    checkpoint()
                return stopped()
    bar.close()
    train_time = elapsed + time.perf_counter() - t0
    if not dev_metrics:  # resumed a run whose last epoch had ended: evaluate now
        dev_metrics = {s: evaluate_model(model, task.name, e, config.eval_batch_size,
                                         precision) for s, e in dev.items()}

    # Step 5: final model (masks included), results.json, drop the checkpoints.
    save_run_model(out_dir, model, tokenizer, masks)
    efficiency = batching.padding_stats(
        train, [part for b in batching.train_batches(train.lengths, config.batch_size,
                                                     config.seed, 0, config.bucket)
                for part in _micro_batches(b, config.grad_accum)], config.padding,
        pad_multiple)["efficiency"]  # as trained (CUDA graphs pad widths to a multiple)
    first_split = task.dev_splits[0]
    result = RunResult(
        status="finished", task=task.name, run=str(out_dir), step=step,
        config=config.to_json(), metrics=dev_metrics, threshold_metric=task.threshold_metric,
        score=dev_metrics[first_split][task.threshold_metric], data=data,
        masks=_summary(mask_info), train_examples=len(train),
        train_set_examples=train_set_examples, train_time_s=train_time,
        train_examples_per_s=len(train) * config.epochs / max(train_time, 1e-9),
        padding_efficiency=efficiency,
        wall_time_s=time.perf_counter() - start_wall + (elapsed if state else 0.0),
        device=str(device), device_name=device_name(device), precision=precision,
        threads=torch.get_num_threads(),
        versions=versions(), git_sha=git_sha(), finished_at=now())
    result.save(out_dir)
    remove_checkpoints(out_dir)
    return result


def _micro_batches(indices: np.ndarray, count: int) -> list[np.ndarray]:
    """A batch's indices (B,) as `count` micro-batches of near-equal size, in order (fewer
    when B < count: none is empty)."""
    if count == 1:
        return [indices]
    return [part for part in np.array_split(indices, count) if len(part)]


def _run_precision(config: TrainConfig, device: torch.device, state: dict | None) -> str:
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


def _summary(mask_info: dict[str, Any]) -> dict[str, Any]:
    """The masks.json fields worth repeating in results.json (no full masks)."""
    keys = ("patched", "pruned", "heads_kept", "mlps_kept", "neurons_kept", "weight_masks")
    return {k: mask_info[k] for k in keys if k in mask_info}
