"""The data and scores a search works with: the search set (dev, or a train subset of dev
size), the dev set every reported score uses, the majority-class baseline, and the metric
names (PAPER.md §0: the search thresholds on CoLA MCC, STS-B (Pearson + Spearman) / 2 and
accuracy elsewhere; the paper's table reports CoLA MCC, STS-B Pearson and accuracy)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsebert.glue import batching
from sparsebert.glue.loading import load_split
from sparsebert.glue.metrics import compute_metrics
from sparsebert.glue.tasks import GlueTask
from sparsebert.train.config import TrainConfig
from sparsebert.train.evaluate import evaluate_model


def report_metric(task: GlueTask) -> str:
    """The metric of the paper's results table for `task`."""
    if task.name == "CoLA":
        return "mcc"
    if task.is_regression:
        return "pearson"
    return "acc"


@dataclass
class SearchData:
    """Tokenized sets of one search. search: importance and the stopping test; dev: reported
    scores (the same object when search_data is dev). importance_batches: sequential chunks
    of the search set, collated (dicts of (B, S) tensors with labels), as the authors' loop.
    majority / search_majority: the metrics of predicting the train set's majority class on dev
    / on the search set (the same numbers when the search set is dev)."""

    task: GlueTask
    search: batching.Encoded
    dev: batching.Encoded
    importance_batches: list[dict[str, torch.Tensor]]
    majority: dict[str, float]
    search_majority: dict[str, float]

    @property
    def same_sets(self) -> bool:
        return self.search is self.dev


def load_search_data(task: GlueTask, train: TrainConfig, tokenizer, search_data: str,
                     importance_batch_size: int) -> SearchData:
    """Tokenize dev (first dev split) and the search set; batch the importance pass."""
    dev_rows = load_split(task, task.dev_splits[0], train.glue_dir)
    dev = batching.encode(dev_rows, tokenizer, train.max_length)
    train_rows = load_split(task, "train", train.glue_dir)
    search = dev
    if search_data == "train":
        rng = np.random.default_rng([train.seed, 3])
        size = min(len(dev_rows), len(train_rows))
        subset = np.sort(rng.choice(len(train_rows), size, replace=False))
        search = batching.encode(train_rows.subset(subset), tokenizer, train.max_length)
    chunks = [np.arange(start, min(start + importance_batch_size, len(search)))
              for start in range(0, len(search), importance_batch_size)]
    batches = []
    for indices in chunks:
        batch = batching.collate(search, indices)
        batch.pop("index", None)
        batches.append(batch)
    majority = majority_baseline(task, train_rows.labels, dev)
    search_majority = majority if search is dev else majority_baseline(task, train_rows.labels,
                                                                       search)
    return SearchData(task, search, dev, batches, majority, search_majority)


def majority_baseline(task: GlueTask, train_labels: np.ndarray,
                      dev: batching.Encoded) -> dict[str, float]:
    """Metrics on `dev` (any labelled set) of predicting the train set's majority class
    (regression: its mean; correlations of a constant are undefined and reported as 0)."""
    if task.is_regression:
        predictions = np.full(len(dev), float(np.mean(train_labels)), dtype=np.float32)
        metrics = {name: 0.0 for name in task.metrics}
        metrics.update({k: v for k, v in _safe_metrics(task, predictions, dev.labels).items()
                        if np.isfinite(v)})
        return metrics
    values, counts = np.unique(np.asarray(train_labels, dtype=np.int64), return_counts=True)
    predictions = np.full(len(dev), int(values[np.argmax(counts)]), dtype=np.int64)
    return _safe_metrics(task, predictions, dev.labels)


def _safe_metrics(task: GlueTask, predictions: np.ndarray, labels) -> dict[str, float]:
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = compute_metrics(task, predictions, labels)
    return {k: (float(v) if np.isfinite(v) else 0.0) for k, v in metrics.items()}


def format_metrics(metrics: Mapping[str, float]) -> str:
    """{"acc": 0.8304, "f1": 0.86} -> "acc 0.8304, f1 0.8600" (for log lines)."""
    return ", ".join(f"{name} {float(value):.4f}" for name, value in metrics.items())


def score_model(model: torch.nn.Module, data: SearchData, train: TrainConfig,
                precision: str | None = None) -> tuple[float, dict[str, Any]]:
    """(search score, dev metrics) of `model` as it stands (masks included), in `precision`
    (default: train.precision)."""
    precision = train.precision if precision is None else precision
    dev_metrics = evaluate_model(model, data.task.name, data.dev, train.eval_batch_size,
                                 precision)
    if data.same_sets:
        search_metrics: Mapping[str, float] = dev_metrics
    else:
        search_metrics = evaluate_model(model, data.task.name, data.search,
                                        train.eval_batch_size, precision)
    return float(search_metrics[data.task.threshold_metric]), dev_metrics
