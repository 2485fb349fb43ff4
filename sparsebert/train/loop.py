"""Fine-tune and evaluate a (possibly patched / masked) model on one GLUE task.

The base recipe is the paper's (PAPER.md §0): AdamW, lr 2e-5, 3 epochs, batch 32, max length
128, linear decay, no warmup, no weight decay, gradient clipping at 1.0. Preset "paper" is that
recipe; preset "minilm" is the same with the learning rate measured to train the default model
(all-MiniLM-L6-v2) well. Preset "auto" (the default) picks "minilm" for the default model and
"paper" for any other model. bf16 autocast on GPU, fp32 on CPU.

A run directory holds: config.json, metrics.jsonl (train loss / throughput every `log_every`
steps, dev metrics after every epoch), checkpoint.pt while the run is unfinished, model/ (the
fine-tuned model and tokenizer) and results.json once it is done. Running again on the same
directory with the same config resumes from the checkpoint (or returns the finished results).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsebert.checkpoint import (
    CHECKPOINT_NAME, MetricsLog, WeightMasks, atomic_save_dir, atomic_write_json, load_checkpoint,
    rng_state, save_checkpoint, set_rng_state,
)
from sparsebert.glue import batching
from sparsebert.glue.loading import load_split
from sparsebert.glue.metrics import compute_metrics
from sparsebert.glue.tasks import GlueError, get_task
from sparsebert.models import (
    check_model_source, is_default_model, load_model, resolve_model, save_model,
)
from sparsebert.runtime import device_name, git_sha, versions
from sparsebert.train_step import (
    LinearSchedule, StepSettings, load_optimizer_state, make_adamw, make_train_step,
)

# The paper's learning rate, and the one measured for the default model (results/README.md).
PRESETS: dict[str, dict[str, Any]] = {"paper": {"lr": 2e-5}, "minilm": {"lr": 1e-4}}
# Fields that may differ when resuming a run (they do not change what is computed).
RUNTIME_FIELDS = frozenset({"glue_dir", "threads", "checkpoint_every", "log_every",
                            "stop_after_steps", "device", "eval_batch_size", "cuda_graphs"})
# With CUDA graphs, batch widths are rounded up to this multiple (one graph per shape).
GRAPH_PAD_MULTIPLE = 16


class TrainError(ValueError):
    """Bad training config or run directory."""


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """Everything that defines a fine-tuning run; round-trips to JSON and to CLI flags."""

    task: str = _help("GLUE task (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI)", "RTE")
    model: str = _help("'default' (all-MiniLM-L6-v2), a local model directory or a hub id",
                       "default")
    preset: str = _help("hyper-parameter preset: paper, minilm, or auto (minilm for the "
                        "default model, else paper); sets lr when --lr is not given", "auto")
    lr: float | None = _help("peak learning rate (default: from the preset)", None)
    epochs: int = _help("training epochs", 3)
    batch_size: int = _help("training batch size", 32)
    max_length: int = _help("max tokens per example (pairs truncated longest-first)", 128)
    seed: int = _help("seed of data order, subset, classifier init and dropout", 42)
    warmup_steps: int = _help("linear warmup steps", 0)
    weight_decay: float = _help("AdamW weight decay (not on biases / LayerNorm)", 0.0)
    adam_eps: float = _help("AdamW epsilon", 1e-8)
    grad_clip: float = _help("max gradient norm (0 = no clipping)", 1.0)
    max_train_examples: int | None = _help("train on a seeded random subset of N examples", None)
    bucket: bool = _help("length-bucketed batches (else plain shuffled batches)", True)
    padding: str = _help("dynamic (pad to the batch's longest) or max_length", "dynamic")
    precision: str = _help("auto (bf16 on GPU, fp32 on CPU), fp32 or bf16", "auto")
    device: str = _help("auto, cpu, cuda, cuda:N", "auto")
    cuda_graphs: str = _help("capture the training step as a CUDA graph per batch shape: "
                             "auto (on for CUDA devices), on or off", "auto")
    eval_batch_size: int = _help("evaluation batch size", 128)
    glue_dir: str | None = _help("GLUE download folder (default: $GLUE_DIR, else the hub)", None)
    checkpoint_every: int = _help("also checkpoint every N steps (0 = at epoch ends only)", 0)
    log_every: int = _help("log train loss / throughput every N steps", 20)
    threads: int | None = _help("torch CPU threads (default: torch's choice)", None)
    stop_after_steps: int | None = _help("checkpoint and stop after N steps (resume later)",
                                         None)

    def resolved(self) -> TrainConfig:
        """A copy with task canonical, preset chosen and lr filled in; checks values."""
        task = get_task(self.task).name
        preset = self.preset
        if preset == "auto":
            preset = "minilm" if is_default_model(self.model) else "paper"
        if preset not in PRESETS:
            raise TrainError(f"unknown preset {self.preset!r}; expected auto or one of "
                             f"{sorted(PRESETS)}")
        lr = self.lr if self.lr is not None else PRESETS[preset]["lr"]
        out = dataclasses.replace(self, task=task, preset=preset, lr=float(lr))
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            if getattr(out, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(out, name)}")
        if out.lr <= 0:
            raise TrainError(f"lr must be > 0, got {out.lr}")
        if out.padding not in ("dynamic", "max_length"):
            raise TrainError(f"padding must be dynamic or max_length, got {out.padding!r}")
        if out.precision not in ("auto", "fp32", "bf16"):
            raise TrainError(f"precision must be auto, fp32 or bf16, got {out.precision!r}")
        if out.cuda_graphs not in ("auto", "on", "off"):
            raise TrainError(f"cuda_graphs must be auto, on or off, got {out.cuda_graphs!r}")
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str, cache_enabled: bool = True):
    """bf16 autocast context for precision bf16 (auto: bf16 on CUDA), else a no-op.
    cache_enabled=False is needed inside CUDA graph capture."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


def use_cuda_graphs(config: TrainConfig, device: torch.device) -> bool:
    """Whether the run captures its training step as CUDA graphs."""
    if config.cuda_graphs == "on" and device.type != "cuda":
        raise TrainError(f"cuda_graphs=on needs a CUDA device, got {device}")
    return config.cuda_graphs == "on" or (config.cuda_graphs == "auto" and device.type == "cuda")


def make_optimizer(model: torch.nn.Module, config: TrainConfig, total_steps: int,
                   capturable: bool = False) -> tuple[torch.optim.AdamW, LinearSchedule]:
    """AdamW (fused where possible) over trainable parameters (no decay on biases/LayerNorm)
    and a linear schedule with `warmup_steps` of linear warmup. capturable=True (CUDA) makes
    the step capturable in a CUDA graph (sparsebert.train_step.CudaGraphStep).

    Buffers (pruning gates, masks) are never handed to the optimizer.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_norm = param.ndim == 1 or "LayerNorm" in name or "layer_norm" in name
            (no_decay if is_norm else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    device = (decay + no_decay)[0].device if decay or no_decay else torch.device("cpu")
    optimizer = make_adamw(groups, config.lr, config.adam_eps, device, capturable)
    return optimizer, LinearSchedule(optimizer, config.lr, total_steps, config.warmup_steps)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs of a collated batch on `device` (the 'index' entry is dropped)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "index"}


@torch.no_grad()
def predict(model: torch.nn.Module, encoded: batching.Encoded, regression: bool,
            batch_size: int = 128, device: torch.device | None = None,
            precision: str = "auto") -> np.ndarray:
    """Predictions (N,) in example order: class indices, or scores for regression."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros(len(encoded), dtype=np.float32 if regression else np.int64)
    for indices in batching.eval_batches(encoded.lengths, batch_size):
        batch = to_device(batching.collate(encoded, indices), device)
        batch.pop("labels")
        with autocast(device, precision):
            logits = model(**batch).logits.float()  # (B, num_labels)
        values = logits[:, 0] if regression else logits.argmax(dim=-1)
        out[indices] = values.cpu().numpy()
    model.train(was_training)
    return out


def evaluate_model(model: torch.nn.Module, task: str, encoded: batching.Encoded,
                   batch_size: int = 128, precision: str = "auto") -> dict[str, float]:
    """Task metrics of `model` on one tokenized split."""
    glue_task = get_task(task)
    predictions = predict(model, encoded, glue_task.is_regression, batch_size,
                          precision=precision)
    return compute_metrics(glue_task, predictions, encoded.labels)


def load_dev_splits(config: TrainConfig, tokenizer) -> dict[str, batching.Encoded]:
    """Tokenized dev split(s); the first is required, later ones (MNLI mismatched) optional."""
    task = get_task(config.task)
    out: dict[str, batching.Encoded] = {}
    for i, split in enumerate(task.dev_splits):
        try:
            out[split] = batching.encode(load_split(task, split, config.glue_dir), tokenizer,
                                         config.max_length)
        except GlueError as error:
            if i == 0:
                raise
            tqdm.write(f"warning: skipping {task.name} {split}: {error}")
    return out


def _check_run_dir(out_dir: Path, config: TrainConfig) -> dict[str, Any] | None:
    """Existing results (finished run) or None; raises if the directory holds another run."""
    saved_path = out_dir / "config.json"
    if not saved_path.is_file():
        return None
    saved = json.loads(saved_path.read_text())
    mine = config.to_json()
    diff = {k: (saved.get(k), mine[k]) for k in mine
            if k not in RUNTIME_FIELDS and saved.get(k) != mine[k]}
    if diff:
        raise TrainError(f"{out_dir} holds a run with a different config ({diff}, as "
                         f"saved vs requested); use another --out or delete that directory")
    results = out_dir / "results.json"
    return json.loads(results.read_text()) if results.is_file() else None


def finetune(config: TrainConfig, out_dir: str | os.PathLike, *,
             model: torch.nn.Module | None = None, tokenizer=None,
             weight_masks: Sequence[tuple[torch.nn.Parameter, torch.Tensor]] | None = None,
             on_step: Callable[[int, float], None] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Fine-tune on config.task and write the run directory; returns results.json's content.

    model/tokenizer: a pre-built (e.g. patched) model to train instead of loading
    config.model. weight_masks: (parameter, 0/1 mask) pairs held fixed (masked weights stay
    exactly zero). on_step(step, loss) is called after every optimizer step.
    If the run stops early (stop_after_steps) the result has "status": "stopped".
    config.threads applies for the duration of the call only.
    """
    threads = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        return _finetune(config, out_dir, model, tokenizer, weight_masks, on_step, progress)
    finally:
        torch.set_num_threads(threads)


def _finetune(config: TrainConfig, out_dir: str | os.PathLike, model, tokenizer,
              weight_masks, on_step, progress: bool) -> dict[str, Any]:
    start_wall = time.perf_counter()
    config = config.resolved()
    task = get_task(config.task)
    out_dir = Path(out_dir)
    finished = _check_run_dir(out_dir, config)
    if finished is not None:
        return finished
    if model is None:
        check_model_source(resolve_model(config.model))  # fail before loading any data
    device = resolve_device(config.device)

    # Step 1: data (train subset drawn with the run's seed), then model and tokenizer.
    train_data = load_split(task, "train", config.glue_dir)
    if config.max_train_examples is not None and config.max_train_examples < len(train_data):
        if config.max_train_examples < 1:
            raise TrainError(f"max_train_examples must be >= 1, got {config.max_train_examples}")
        rng = np.random.default_rng([config.seed, 1])
        train_data = train_data.subset(np.sort(rng.choice(
            len(train_data), config.max_train_examples, replace=False)))
    if model is None:
        model, tokenizer = load_model(config.model, task.num_labels, labels=task.labels,
                                      seed=config.seed)
    elif tokenizer is None:
        raise TrainError("finetune(model=...) needs the tokenizer too")
    train = batching.encode(train_data, tokenizer, config.max_length)
    dev = load_dev_splits(config, tokenizer)
    model.to(device).train()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "config.json", config.to_json())  # inputs are good: a run

    # Step 2: optimizer, schedule, fixed weight masks.
    steps_per_epoch = batching.num_batches(len(train), config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    graphs = use_cuda_graphs(config, device)
    optimizer, scheduler = make_optimizer(model, config, total_steps, capturable=graphs)
    masks = WeightMasks(weight_masks or [])
    if len(masks):
        masks.attach(optimizer)

    # Step 3: resume from the checkpoint, if any; else seed dropout.
    step, elapsed = 0, 0.0
    state = load_checkpoint(out_dir)
    if state is not None:
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed_s"]
        masks.apply()
    else:
        torch.manual_seed(config.seed)
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", keep_until_step=step)
    settings = StepSettings(config.grad_clip,
                            lambda: autocast(device, config.precision, cache_enabled=not graphs))
    train_step = make_train_step(model, optimizer, settings, device, graphs)
    pad_multiple = GRAPH_PAD_MULTIPLE if graphs else None
    pin = device.type == "cuda"

    def checkpoint() -> None:
        save_checkpoint(out_dir, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step,
            "elapsed_s": elapsed + time.perf_counter() - t0, "config": config.to_json()})

    # Step 4: the loop; batch order is a function of (seed, epoch), so resuming skips batches.
    bar = tqdm(total=total_steps, initial=step, disable=not progress, unit="step",
               desc=f"{task.name} {out_dir.name}", mininterval=1.0, dynamic_ncols=True)
    t0 = time.perf_counter()
    window: dict[str, Any] = {"loss": 0.0, "n": 0, "examples": 0, "t": time.perf_counter()}
    dev_metrics: dict[str, dict[str, float]] = {}
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        order = batching.train_batches(train.lengths, config.batch_size, config.seed, epoch,
                                       bucket=config.bucket)
        for indices in order[first:]:
            batch = batching.collate(train, indices, config.padding, pad_multiple)
            batch.pop("index")
            if pin:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            loss = train_step(batch)  # forward, backward, clip, optimizer step
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
                                   "lr": scheduler.get_last_lr()[0], "examples_per_s": rate})
                bar.set_postfix(loss=f"{window['loss'] / window['n']:.4f}", ex_s=f"{rate:.1f}")
                window = {"loss": 0.0, "n": 0, "examples": 0, "t": time.perf_counter()}
            bar.update(1)
            if on_step is not None:
                on_step(step, float(loss))
            if step % steps_per_epoch == 0:  # epoch end: dev metrics, then a checkpoint
                for split, encoded in dev.items():
                    dev_metrics[split] = evaluate_model(model, task.name, encoded,
                                                        config.eval_batch_size, config.precision)
                    metrics_log.write({"step": step, "epoch": step // steps_per_epoch,
                                       "split": split, **dev_metrics[split]})
                checkpoint()
            elif config.checkpoint_every and step % config.checkpoint_every == 0:
                checkpoint()
            stop = config.stop_after_steps
            if stop is not None and stop <= step < total_steps:
                if step % steps_per_epoch:
                    checkpoint()
                bar.close()
                return {"status": "stopped", "step": step, "run": str(out_dir)}
    bar.close()
    train_time = elapsed + time.perf_counter() - t0
    if not dev_metrics:  # resumed a run whose last epoch had ended: evaluate now
        dev_metrics = {s: evaluate_model(model, task.name, e, config.eval_batch_size,
                                         config.precision) for s, e in dev.items()}

    # Step 5: final model, results.json, drop the checkpoint.
    atomic_save_dir(out_dir / "model", lambda path: save_model(model, tokenizer, path))
    first_split = task.dev_splits[0]
    efficiency = batching.padding_stats(
        train, batching.train_batches(train.lengths, config.batch_size, config.seed, 0,
                                      config.bucket), config.padding)["efficiency"]
    results = {
        "status": "finished", "task": task.name, "run": str(out_dir), "config": config.to_json(),
        "metrics": dev_metrics, "threshold_metric": task.threshold_metric,
        "score": dev_metrics[first_split][task.threshold_metric],
        "train_examples": len(train), "steps": step, "train_time_s": train_time,
        "train_examples_per_s": len(train) * config.epochs / max(train_time, 1e-9),
        "padding_efficiency": efficiency,
        "wall_time_s": time.perf_counter() - start_wall + (elapsed if state else 0.0),
        "device": str(device), "device_name": device_name(device),
        "threads": torch.get_num_threads(), "versions": versions(), "git_sha": git_sha(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(out_dir / "results.json", results)
    (out_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
    return results


def evaluate(run_dir: str | os.PathLike, glue_dir: str | None = None,
             batch_size: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Dev metrics of a finished run's model/: {"task", "metrics": {split: {...}}, ...}."""
    run_dir = Path(run_dir)
    config_path, model_dir = run_dir / "config.json", run_dir / "model"
    if not config_path.is_file():
        raise TrainError(f"{run_dir} is not a run directory (no config.json); run "
                         f"`sparsebert finetune --out {run_dir}` first")
    if not (model_dir / "config.json").is_file():
        raise TrainError(f"{run_dir} has no finished model ({model_dir}); the run is "
                         f"unfinished: rerun the same finetune command to resume it")
    config = TrainConfig.from_json(json.loads(config_path.read_text()))
    if glue_dir is not None:
        config.glue_dir = glue_dir
    task = get_task(config.task)
    model, tokenizer = load_model(model_dir, task.num_labels, labels=task.labels)
    target = resolve_device(device)
    model.to(target)
    metrics = {split: evaluate_model(model, task.name, encoded,
                                     batch_size or config.eval_batch_size, config.precision)
               for split, encoded in load_dev_splits(config, tokenizer).items()}
    first = task.dev_splits[0]
    return {"task": task.name, "run": str(run_dir), "metrics": metrics,
            "threshold_metric": task.threshold_metric,
            "score": metrics[first][task.threshold_metric], "device": str(target)}
