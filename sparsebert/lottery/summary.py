"""summary.json of a search directory, assembled from its stage files.

This is the contract `sparsebert.report` reads (version 1, kind "sparsebert-search"): task,
seed, metrics, the majority baseline, the full model, and per method the search curve, the
good mask and every subnetwork's pruned and retrained scores (None when not run yet).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsebert.lottery.scoring import report_metric
from sparsebert.lottery.structured import kept_fraction
from sparsebert.runtime import device_name, git_sha, versions
from sparsebert.train.rundir import RunResult, now

SUMMARY_VERSION = 1


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _scored(metrics: dict[str, Any] | None, metric: str) -> dict[str, Any] | None:
    return None if metrics is None else {"score": float(metrics[metric]), "metrics": metrics}


def _subnetwork(root: Path, name: str, metric: str, first_split: str) -> dict[str, Any]:
    pruned = _json(root / "pruned" / f"{name}.json")
    retrained = RunResult.load(root / "retrained" / name)
    return {
        "pruned": _scored(pruned["metrics"], metric) if pruned else None,
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
    methods: dict[str, Any] = {}
    structured = _json(out / "structured" / "search.json")
    if structured is not None:
        subnets = {}
        for name in search.config.subnet_list():
            masks = _json(out / "structured" / "masks" / f"{name}.json")
            if masks is None:
                continue
            heads = sum(sum(1 for v in row if v) for row in masks["head_mask"])
            mlps = sum(1 for v in masks["mlp_mask"] if v)
            subnets[name] = {"heads_kept": heads, "mlps_kept": mlps,
                             "fraction_kept": kept_fraction(heads, mlps, structured["sizes"]),
                             "head_mask": masks["head_mask"], "mlp_mask": masks["mlp_mask"],
                             **_subnetwork(out / "structured", name, metric, first)}
        methods["structured"] = {
            "curve": structured["curve"], "threshold_score": structured["threshold_score"],
            "good_mask": {"head_mask": structured["head_mask"],
                          "mlp_mask": structured["mlp_mask"]},
            "notes": structured["notes"], "search_time_s": structured.get("search_time_s"),
            "subnetworks": subnets}
    magnitude = _json(out / "magnitude" / "search.json")
    if magnitude is not None:
        subnets = {}
        for name in search.config.subnet_list():
            info = _json(out / "magnitude" / "masks" / f"{name}.json")
            if info is None:
                continue
            subnets[name] = {"fraction_kept": info["fraction_kept"],
                             "layer_kept_fraction": info["layer_kept_fraction"],
                             **_subnetwork(out / "magnitude", name, metric, first)}
        good = _json(out / "magnitude" / "masks" / "good.json")
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
        "num_layers": _layers(out), "num_heads": _heads(out),
        "majority": float(search.data.majority[metric]),
        "full": {"score": float(full.metrics[first][metric]), "metrics": full.metrics[first],
                 "train_time_s": full.train_time_s},
        "methods": methods,
        "config": {"search": search.config.to_json(), "train": train.to_json()},
        "device": str(search.device), "device_name": device_name(search.device),
        "versions": versions(), "git_sha": git_sha(), "written_at": now(),
    }


def _layers(out: Path) -> int | None:
    structured = _json(out / "structured" / "search.json")
    if structured:
        return structured["sizes"]["layers"]
    config = _json(out / "full" / "model" / "config.json") or {}
    return config.get("num_hidden_layers")


def _heads(out: Path) -> int | None:
    structured = _json(out / "structured" / "search.json")
    if structured:
        return structured["sizes"]["heads"]
    config = _json(out / "full" / "model" / "config.json") or {}
    return config.get("num_attention_heads")
