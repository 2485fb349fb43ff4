"""GLUE tasks, data loading, metrics and batching (see sparsebert.train for fine-tuning)."""

from sparsebert.glue.batching import Encoded, collate, encode, eval_batches, train_batches
from sparsebert.glue.loading import GLUE_DIR_ENV, GlueData, load_split, read_jsonl, read_tsv
from sparsebert.glue.metrics import compute_metrics, threshold_score
from sparsebert.glue.tasks import (
    TASKS,
    GlueError,
    GlueTask,
    SplitNotFoundError,
    get_task,
    task_names,
)

__all__ = [
    "GLUE_DIR_ENV", "TASKS", "Encoded", "GlueData", "GlueError", "GlueTask", "collate",
    "compute_metrics", "encode", "eval_batches", "get_task", "load_split", "read_jsonl",
    "read_tsv", "SplitNotFoundError", "task_names", "threshold_score", "train_batches",
]
