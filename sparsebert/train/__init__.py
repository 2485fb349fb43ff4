"""Fine-tuning: run config, the training loop, evaluation, one training step, run directories.

    from sparsebert.train import TrainConfig, finetune, evaluate
    result = finetune(TrainConfig(task="RTE", seed=42), "runs/rte")   # RunResult
    evaluate("runs/rte")["metrics"]

Modules: config (TrainConfig, presets, device and precision), loop (finetune), resume (what a
run directory holds before a run starts or resumes), evaluate (predict, evaluate_model,
evaluate a run directory), step (one training step, eager or as a CUDA graph), optim (AdamW +
linear schedule), checkpoint (weights-only checkpoints, RNG state), metrics_log
(metrics.jsonl), rundir (RunResult, masks.json, the saved model).
"""

from sparsebert.precision import autocast
from sparsebert.train.config import (
    PRESETS,
    RUNTIME_FIELDS,
    TrainConfig,
    TrainError,
    resolve_device,
    use_cuda_graphs,
)
from sparsebert.train.evaluate import evaluate, evaluate_model, load_dev_splits, predict, to_device
from sparsebert.train.loop import finetune
from sparsebert.train.optim import make_optimizer
from sparsebert.train.rundir import RunResult, load_run_model

__all__ = [
    "PRESETS",
    "RUNTIME_FIELDS",
    "RunResult",
    "TrainConfig",
    "TrainError",
    "autocast",
    "evaluate",
    "evaluate_model",
    "finetune",
    "load_dev_splits",
    "load_run_model",
    "make_optimizer",
    "predict",
    "resolve_device",
    "to_device",
    "use_cuda_graphs",
]
