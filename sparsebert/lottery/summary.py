"""summary.json of a search directory, assembled from its stage files.

This is the contract `sparsebert.report` reads (version 1, kind "sparsebert-search"): task,
seed, metrics, the majority baseline, the full model, and per method the search curve, the
good mask and every subnetwork's pruned and retrained scores (None when not run yet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsebert.lottery.scoring import report_metric
from sparsebert.lottery.stage_files import stage_metric
from sparsebert.lottery.structured import kept_fraction
from sparsebert.lottery.subnetworks import SUBNETWORKS
from sparsebert.runtime import device_name, git_sha, versions
from sparsebert.train.rundir import RunResult, now

SUMMARY_VERSION = 1


def _scored(metrics: dict[str, Any] | None, metric: str) -> dict[str, Any] | None:
    return None if metrics is None else {"score": float(metrics[metric]), "metrics": metrics}


def _pruned(read, path: Path, metric: str) -> dict[str, Any] | None:
    """The pruned score in `path` (a checked stage file), or None when it is missing."""
    pruned = read(path, "pruned")
    if pruned is None:
        return None
    return {"score": stage_metric(path, pruned["metrics"], metric), "metrics": pruned["metrics"]}


def _subnetwork(read, root: Path, name: str, metric: str, first_split: str,
                ) -> dict[str, Any]:
    retrained = RunResult.load(root / "retrained" / name)
    return {
        "pruned": _pruned(read, root / "pruned" / f"{name}.json", metric),
        "retrained": _scored(retrained.metrics[first_split], metric)
        if retrained is not None and retrained.finished else None,
        "retrain_time_s": retrained.train_time_s if retrained is not None else None,
    }


def build_summary(search) -> dict[str, Any]:
    """summary.json's content for a `sparsebert.lottery.search.Search` after its stages."""
    out, task, train = search.out, search.task, search.train
    metric = report_metric(task)
    first = task.dev_splits[0]
    full = search.full
    read = search.read_stage  # stage files: None when missing, a clear error when damaged
    methods: dict[str, Any] = {}
    structured = read(out / "structured" / "search.json", "structured search")
    if structured is not None:
        subnets = {}
        for name in SUBNETWORKS:  # every one built here (a rerun may ask for fewer)
            masks = read(out / "structured" / "masks" / f"{name}.json", "structured masks")
            if masks is None:
                continue
            heads = sum(sum(1 for v in row if v) for row in masks["head_mask"])
            mlps = sum(1 for v in masks["mlp_mask"] if v)
            subnets[name] = {"heads_kept": heads, "mlps_kept": mlps,
                             "fraction_kept": kept_fraction(heads, mlps, structured["sizes"]),
                             "head_mask": masks["head_mask"], "mlp_mask": masks["mlp_mask"],
                             **_subnetwork(read, out / "structured", name, metric, first)}
        methods["structured"] = {
            "curve": structured["curve"], "threshold_score": structured["threshold_score"],
            "good_mask": {"head_mask": structured["head_mask"],
                          "mlp_mask": structured["mlp_mask"]},
            "notes": structured["notes"], "search_time_s": structured.get("search_time_s"),
            "subnetworks": subnets}
    magnitude = read(out / "magnitude" / "search.json", "magnitude search")
    if magnitude is not None:
        subnets = {}
        for name in SUBNETWORKS:  # every one built here (a rerun may ask for fewer)
            info = read(out / "magnitude" / "masks" / f"{name}.json", "magnitude masks")
            if info is None:
                continue
            subnets[name] = {"fraction_kept": info["fraction_kept"],
                             "layer_kept_fraction": info["layer_kept_fraction"],
                             **_subnetwork(read, out / "magnitude", name, metric, first)}
        good = read(out / "magnitude" / "masks" / "good.json", "magnitude masks")
        methods["magnitude"] = {
            "curve": magnitude["curve"], "threshold_score": magnitude["threshold_score"],
            "good_step": magnitude["good_step"],
            "layer_kept_fraction": good["layer_kept_fraction"] if good else None,
            "notes": magnitude["notes"], "search_time_s": magnitude.get("search_time_s"),
            "subnetworks": subnets}
    return {
        "version": SUMMARY_VERSION, "kind": "sparsebert-search",
        "task": task.name, "seed": train.seed, "model": train.model,
        "metric": task.threshold_metric, "report_metric": metric,
        "threshold": search.config.threshold, "search_data": search.config.search_data,
        "importance_mode": search.config.importance_mode,
        **_model_shape(structured, read(out / "full" / "model" / "config.json", "object") or {}),
        "majority": float(search.data.majority[metric]),
        "search_majority": float(search.data.search_majority[task.threshold_metric]),
        "full": {"score": float(full.metrics[first][metric]), "metrics": full.metrics[first],
                 "train_examples": full.train_examples,
                 "train_set_examples": full.train_set_examples,
                 "train_time_s": full.train_time_s},
        "methods": methods,
        "config": {"search": search.config.to_json(), "train": train.to_json()},
        "device": str(search.device), "device_name": device_name(search.device),
        "versions": versions(), "git_sha": git_sha(), "written_at": now(),
    }


def _model_shape(structured: dict[str, Any] | None, model_config: dict[str, Any],
                 ) -> dict[str, int | None]:
    """num_layers / num_heads from the s-pruning search's sizes, else the model's config."""
    if structured:
        return {"num_layers": structured["sizes"]["layers"],
                "num_heads": structured["sizes"]["heads"]}
    return {"num_layers": model_config.get("num_hidden_layers"),
            "num_heads": model_config.get("num_attention_heads")}
