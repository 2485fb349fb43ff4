"""GLUE metrics in plain numpy: accuracy, F1, Matthews correlation, Pearson, Spearman.

Conventions match scikit-learn / scipy (the tests compare against them); where those return
nan or warn for undefined values (constant predictions, or non-finite scores from a run that
diverged), these return 0.0, so a degenerate model scores 0 instead of poisoning a pruning
threshold with nan.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparsebert.glue.tasks import GlueTask, get_task

ArrayLike = np.ndarray | Sequence[float] | Sequence[int]


def _pair(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = np.asarray(predictions), np.asarray(labels)
    for name, values in (("predictions", pred), ("labels", gold)):
        if values.ndim > 1 and values.size != len(values):  # e.g. (N, C) logits
            raise ValueError(f"{name} must be (N,) values, got shape {values.shape} (for "
                             f"logits, pass argmax(-1), or column 0 for a regression)")
    pred, gold = pred.reshape(-1), gold.reshape(-1)
    if pred.shape != gold.shape:
        raise ValueError(f"predictions {pred.shape} and labels {gold.shape} differ in length")
    if pred.size == 0:
        raise ValueError("metrics of an empty set are undefined")
    return pred, gold


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of exact matches; predictions, labels: (N,) class indices."""
    pred, gold = _pair(predictions, labels)
    return float(np.mean(pred == gold))


def f1(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """Binary F1 of class `positive` = 2 TP / (2 TP + FP + FN); 0 when undefined."""
    pred, gold = _pair(predictions, labels)
    tp = np.sum((pred == positive) & (gold == positive))
    fp = np.sum((pred == positive) & (gold != positive))
    fn = np.sum((pred != positive) & (gold == positive))
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K, as scikit-learn); 0 when undefined.

    With confusion matrix C (K, K): t_k = row sums (true), p_k = column sums (predicted),
    c = trace, s = N: MCC = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)).
    """
    pred, gold = _pair(predictions, labels)
    # Step 1: confusion matrix over the union of classes seen.
    classes, encoded = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    k = classes.size
    gold_idx, pred_idx = encoded[: gold.size], encoded[gold.size:]
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (gold_idx, pred_idx), 1.0)
    # Step 2: the closed form from the marginals.
    true_sum, pred_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), confusion.sum()
    cov_ytyp = correct * total - np.dot(true_sum, pred_sum)
    cov_ypyp = total**2 - np.dot(pred_sum, pred_sum)
    cov_ytyt = total**2 - np.dot(true_sum, true_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation of two (N,) real vectors (float64); 0 when either is constant or
    holds a non-finite value."""
    x, y = (a.astype(np.float64) for a in _pair(predictions, labels))
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return 0.0
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # constant (a mean's rounding leaves no residue)
        return 0.0
    # Scaled to a largest |value| of 1 before and after centring, so neither the mean nor the
    # sums of squares overflow or underflow whatever the inputs' magnitude.
    x, y = (a / np.abs(a).max() for a in (x, y))
    x, y = (a - a.mean() for a in (x, y))
    x, y = (a / np.abs(a).max() for a in (x, y))
    norm = np.sqrt(np.dot(x, x)) * np.sqrt(np.dot(y, y))
    return float(np.clip(np.dot(x, y) / norm, -1.0, 1.0))


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..N of a (N,) vector, ties get their average rank (scipy's 'average')."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Step 1: start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    # Step 2: every member of a run gets the mean of its 1-based positions.
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation: Pearson of the average ranks; 0 when either vector is constant
    or holds a non-finite value (nan has no rank)."""
    pred, gold = _pair(predictions, labels)
    if not all(np.isfinite(x.astype(np.float64)).all() for x in (pred, gold)):
        return 0.0
    return pearson(rankdata(pred), rankdata(gold))


def compute_metrics(task: str | GlueTask, predictions: ArrayLike, labels: ArrayLike,
                    ) -> dict[str, float]:
    """Every metric of `task` (see GlueTask.metrics).

    predictions: (N,) class indices (classification) or real scores (STS-B); labels: (N,).
    Returns e.g. {"acc": .., "f1": ..} for MRPC, {"pearson", "spearman", "corr"} for STS-B.
    """
    task = get_task(task)
    out: dict[str, float] = {}
    for name in task.metrics:
        if name == "acc":
            out[name] = accuracy(predictions, labels)
        elif name == "f1":
            out[name] = f1(predictions, labels)
        elif name == "mcc":
            out[name] = matthews_corrcoef(predictions, labels)
        elif name == "pearson":
            out[name] = pearson(predictions, labels)
        elif name == "spearman":
            out[name] = spearman(predictions, labels)
        elif name == "corr":
            out[name] = (pearson(predictions, labels) + spearman(predictions, labels)) / 2
        else:  # pragma: no cover - the registry only names the metrics above
            raise ValueError(f"unknown metric {name!r}")
    return out


def threshold_score(task: str | GlueTask, metrics: dict[str, float]) -> float:
    """The metric the paper's pruning threshold uses (CoLA mcc, STS-B corr, else acc)."""
    name = get_task(task).threshold_metric
    if name not in metrics:
        raise ValueError(f"threshold_score: 'metrics' has no {name!r} (the metric "
                         f"{get_task(task).name}'s threshold reads), got keys {sorted(metrics)}")
    return metrics[name]
