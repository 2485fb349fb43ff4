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

from sparsebert.atomic import atomic_write_json, run_lock
from sparsebert.errors import SparsebertError
from sparsebert.glue import batching
from sparsebert.glue.loading import load_split
from sparsebert.glue.tasks import get_task
from sparsebert.hf.loading import check_max_length, load_model, preflight_model
from sparsebert.hf.readout import first_token_readout
from sparsebert.precision import autocast, outside_autocast
from sparsebert.pruning.weight_masks import WeightMasks
from sparsebert.runtime import device_name, git_sha, versions
from sparsebert.train import data_cache
from sparsebert.train.checkpoint import (
    load_checkpoint,
    remove_checkpoints,
    rng_state,
    save_checkpoint,
)
from sparsebert.train.config import (
    GRAPH_PAD_MULTIPLE,
    TrainConfig,
    TrainError,
    resolve_device,
    use_cuda_graphs,
)
from sparsebert.train.data_identity import check_data, data_fingerprint
from sparsebert.train.evaluate import data_source, evaluate_model, load_dev_splits
from sparsebert.train.metrics_log import MetricsLog
from sparsebert.train.model_identity import check_model
from sparsebert.train.optim import make_optimizer
from sparsebert.train.resume import (
    check_config,
    finished_run,  # noqa: F401 (also imported from here by callers that skip finished runs)
    foreign_checkpoint,
    restore_checkpoint,
    run_precision,
)
from sparsebert.train.rundir import (
    PLAIN_MASKS,
    RunResult,
    check_masks,
    check_out_dir,
    describe_masks,
    make_out_dir,
    model_missing,
    now,
    save_run_model,
)
from sparsebert.train.step import StepSettings, make_train_step


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
    state = (load_checkpoint(out_dir, foreign_checkpoint(config)) if out_dir.is_dir()
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
        restore_checkpoint(state, model, optimizer, scheduler, device)
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        window.update(state.get("log_window", {}))
        masks.apply()
    else:
        torch.manual_seed(config.seed)
    precision = run_precision(config, device, state)
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


def _summary(mask_info: dict[str, Any]) -> dict[str, Any]:
    """The masks.json fields worth repeating in results.json (no full masks)."""
    keys = ("patched", "pruned", "heads_kept", "mlps_kept", "neurons_kept", "weight_masks")
    return {k: mask_info[k] for k in keys if k in mask_info}
