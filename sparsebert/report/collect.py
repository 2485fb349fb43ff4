"""Aggregate lottery-search summaries over seeds, grouped by task (files are read and checked
by sparsebert.report.summaries).

Aggregation over seeds: mean and sample std (ddof=1, the paper's Bessel-corrected std; None with
one seed), and n.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from sparsebert.lottery.config import SCOPE_FIELDS
from sparsebert.report.paper import SUBNETS, TASKS, row_key
from sparsebert.report.summaries import (  # noqa: F401 (re-exported)
    KIND_RUN,
    KIND_SUPER,
    METHODS,
    NUMBER,
    SUMMARY_NAME,
    VERSION,
    ReportError,
    RunSummary,
    SuperSummary,
    find_summaries,
    find_summary_locations,
    load_summary,
    scores_of,
)
from sparsebert.train.config import NEW_FIELDS, RUNTIME_FIELDS, recorded

# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Mean, sample std (ddof=1; None for one value) and count of one quantity over seeds."""

    mean: float
    std: float | None
    n: int
    values: tuple[float, ...] = ()

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat | None:
        """Aggregate the non-None values; None when there are none."""
        vals = tuple(float(v) for v in values if v is not None)
        if not vals:
            return None
        arr = np.asarray(vals, dtype=np.float64)
        std = float(arr.std(ddof=1)) if len(vals) > 1 else None
        return cls(float(arr.mean()), std, len(vals), vals)


# ----------------------------------------------------------------------------- per task


@dataclass
class TaskResults:
    """Everything the report shows for one task, aggregated over its seeds.

    runs: sorted by seed. scores: table row label ("full model", "s good P", ...) -> Stat.
    sizes: (prefix, subnet, field) -> Stat, e.g. ("s", "good", "heads_kept"),
    ("m", "good", "fraction_kept"), ("super", "good", "heads_kept").
    head_masks: (n_seeds, L, H) bool and mlp_masks: (n_seeds, L) bool, stacked over the runs
    that have an s-pruning good mask (None if none do); mask_seeds: their seeds.
    """

    task: str
    runs: list[RunSummary]
    super: SuperSummary | None = None
    scores: dict[str, Stat] = field(default_factory=dict)
    sizes: dict[tuple[str, str, str], Stat] = field(default_factory=dict)
    head_masks: np.ndarray | None = None
    mlp_masks: np.ndarray | None = None
    mask_seeds: list[int] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def n_seeds(self) -> int:
        return len(self.runs)

    @property
    def report_metric(self) -> str:
        return self.runs[0].report_metric

    @property
    def metric(self) -> str:
        return self.runs[0].metric

    @property
    def threshold(self) -> float:
        return self.runs[0].threshold

    @property
    def num_layers(self) -> int | None:
        return next((r.num_layers for r in self.runs if r.num_layers is not None), None)

    @property
    def num_heads(self) -> int | None:
        return next((r.num_heads for r in self.runs if r.num_heads is not None), None)


# config.train fields that may differ between the seeds of one setting (the seed itself, where
# the data and the run lived, how it ran).
_TRAIN_NOT_SETTINGS = RUNTIME_FIELDS | {"seed", "task", "model"}
_SAME_ACROSS_SEEDS = ("model", "metric", "report_metric", "threshold", "num_layers", "num_heads",
                      "search_data", "importance_mode", "max_train_examples")


def _same_value(name: str, a: Any, b: Any) -> bool:
    """Equal; for the model, also a path relative to where a run started (as recorded before
    runs recorded absolute paths) and an absolute path that ends with it."""
    if a == b:
        return True
    if name != "model" or not isinstance(a, str) or not isinstance(b, str):
        return False
    (rel, full) = (a, b) if not Path(a).is_absolute() else (b, a)
    rel_parts = Path(os.path.normpath(rel)).parts
    return (not Path(rel).is_absolute() and Path(full).is_absolute() and ".." not in rel_parts
            and Path(full).parts[-len(rel_parts):] == rel_parts)


def task_models(results: dict[str, TaskResults]) -> dict[str, str | None]:
    """The model each task's runs started from, one spelling per model across tasks: a path
    recorded relative (as older runs did) and one recorded absolute that ends with it are the
    same model (_same_value), named by the absolute one. None where no run records it."""
    per_task = {}
    for task, res in results.items():
        values = [run.model for run in res.runs if run.model is not None]
        absolute = [value for value in values if Path(value).is_absolute()]
        per_task[task] = (absolute or values or [None])[0]
    known = sorted({value for value in per_task.values() if value is not None},
                   key=lambda value: (not Path(value).is_absolute(), value))
    return {task: None if value is None else
            next(name for name in known if _same_value("model", value, name))
            for task, value in per_task.items()}


def _check_consistent(task: str, runs: list[RunSummary]) -> None:
    """All seeds of a task must come from the same setting (else averaging mixes settings)."""
    seen: dict[int, Path] = {}
    for run in runs:
        if run.seed in seen:
            raise ReportError(f"two summaries for task {task} seed {run.seed}: {seen[run.seed]} "
                              f"and {run.path}; pass only one of them")
        seen[run.seed] = run.path
    first = runs[0]
    for run in runs[1:]:
        for name in _SAME_ACROSS_SEEDS:
            a, b = getattr(first, name), getattr(run, name)
            if a is not None and b is not None and not _same_value(name, a, b):
                raise ReportError(f"task {task}: field '{name}' is {a!r} in {first.path} but "
                                  f"{b!r} in {run.path}; report one setting at a time")
        for section, ignored in (("train", _TRAIN_NOT_SETTINGS), ("search", SCOPE_FIELDS)):
            a_config, b_config = first.config.get(section), run.config.get(section)
            if a_config is None or b_config is None:
                continue  # a summary written before it recorded its config
            # (settings only one of them records: added by a later version, not compared;
            # except training settings recorded only away from their default, NEW_FIELDS)
            names = set(a_config) & set(b_config)
            if section == "train":
                names |= (set(a_config) | set(b_config)) & set(NEW_FIELDS)
            for name in sorted(names - ignored):
                a, b = ((recorded(a_config, name), recorded(b_config, name))
                        if section == "train" else (a_config.get(name), b_config.get(name)))
                if a != b:
                    raise ReportError(
                        f"task {task}: field 'config.{section}.{name}' is {a!r} in "
                        f"{first.path} but {b!r} in {run.path}; report one setting at a time")


def _check_super(task: str, runs: list[RunSummary], sup: SuperSummary) -> None:
    """The super-survivors must come from exactly these runs: the same seeds, and heads kept
    in every one of their good masks."""
    seeds = sorted(run.seed for run in runs)
    if sup.seeds and sorted(sup.seeds) != seeds:
        extra = sorted(set(seeds) - set(sup.seeds))
        raise ReportError(
            f"{sup.path}: super-survivors of seeds {sorted(sup.seeds)}, but the {task} runs "
            f"among the inputs are seeds {seeds}; pass the runs of exactly those seeds (their "
            f"seed_<s> folders and {sup.path.parent.name}/)"
            + (f", or recompute the super-survivors over every seed (`sparsebert search` with "
               f"--seeds listing {', '.join(map(str, extra))} too)" if extra else ""))
    masks = [run.head_mask for run in runs]
    if masks and all(m is not None for m in masks):
        kept_in_every = np.logical_and.reduce(np.stack(masks))  # (L, H)
        if kept_in_every.shape == sup.head_mask.shape and not np.array_equal(
                kept_in_every, sup.head_mask):
            raise ReportError(f"{sup.path}: its 'head_mask' is not the heads kept in every "
                              f"good mask of the {task} runs among the inputs (from another "
                              "search?); pass the runs it was computed from")


def _aggregate(task: str, runs: list[RunSummary], sup: SuperSummary | None) -> TaskResults:
    res = TaskResults(task=task, runs=sorted(runs, key=lambda r: r.seed), super=sup)
    rs = res.runs
    # Step 1: scores of the paper's rows.
    for key, values in (("majority baseline", [r.majority for r in rs]),
                        ("full model", [r.full_score for r in rs])):
        if (stat := Stat.of(values)) is not None:
            res.scores[key] = stat
    for method in METHODS:
        for subnet in SUBNETS:
            entries = [r.subnetworks.get(method, {}).get(subnet) or {} for r in rs]
            for stage in ("pruned", "retrained"):
                vals = [s for e in entries for s in scores_of(e.get(stage))]
                if (stat := Stat.of(vals)) is not None:
                    res.scores[row_key(method, subnet, stage)] = stat
    if sup is not None:
        for subnet, entry in sup.subnetworks.items():
            for stage in ("pruned", "retrained"):
                if (stat := Stat.of(scores_of(entry.get(stage)))) is not None:
                    res.scores[row_key("super", subnet, stage)] = stat
    # Step 2: subnetwork sizes (entry fields, else counted from the good mask).
    for method, prefix in (("structured", "s"), ("magnitude", "m")):
        for subnet in SUBNETS:
            entries = [r.subnetworks.get(method, {}).get(subnet) for r in rs]
            for name in ("heads_kept", "mlps_kept", "fraction_kept"):
                vals = [e.get(name) if isinstance(e, dict) else None for e in entries]
                if method == "structured" and subnet == "good" and name != "fraction_kept":
                    masks = [r.head_mask if name == "heads_kept" else r.mlp_mask for r in rs]
                    vals = [v if v is not None else (None if m is None else int(m.sum()))
                            for v, m in zip(vals, masks, strict=True)]
                stat = Stat.of(v for v in vals if isinstance(v, NUMBER))
                if stat is not None:
                    res.sizes[(prefix, subnet, name)] = stat
    if sup is not None:
        res.sizes[("super", "good", "heads_kept")] = Stat.of([int(sup.head_mask.sum())])
        res.sizes[("super", "good", "mlps_kept")] = Stat.of([int(sup.mlp_mask.sum())])
        frac = (sup.subnetworks.get("good") or {}).get("fraction_kept")
        if isinstance(frac, NUMBER):
            res.sizes[("super", "good", "fraction_kept")] = Stat.of([frac])
    # Step 3: masks stacked over seeds.
    with_mask = [r for r in rs if r.head_mask is not None]
    if with_mask:
        res.head_masks = np.stack([r.head_mask for r in with_mask])  # (n_seeds, L, H)
        res.mlp_masks = np.stack([r.mlp_mask for r in with_mask])  # (n_seeds, L)
        res.mask_seeds = [r.seed for r in with_mask]
    return res


def path_list(function: str, paths: object) -> list[str]:
    """`paths` (a path, or any iterable of paths: a list, a glob's generator) as a list, each
    with a leading ~ expanded; ReportError naming `function` for anything else."""
    listed = [paths] if isinstance(paths, (str, os.PathLike)) else (
        list(paths) if isinstance(paths, Iterable) else paths)
    if not isinstance(listed, list) or not all(isinstance(p, (str, os.PathLike))
                                               for p in listed):
        raise ReportError(f"{function}: 'paths' must be a path or a list of paths (run "
                          f"directories, their parents, or summary.json files), got {paths!r}")
    return [os.path.expanduser(p) for p in listed]


def collect(paths: str | Path | Sequence[str | Path]) -> dict[str, TaskResults]:
    """Find, load, validate and aggregate every summary under `paths`.

    Returns {task: TaskResults}, the paper's tasks in its order, then others by name. A super
    summary for a task with no search run is an error (nothing to compare it with).
    """
    paths = path_list("collect", paths)
    runs: dict[str, list[RunSummary]] = {}
    supers: dict[str, SuperSummary] = {}
    for file, locations in find_summary_locations(list(paths)).items():
        try:
            summary = load_summary(file)
        except ReportError as error:  # found through a link: name the path the user has too
            if Path(os.path.abspath(locations[0])) == file:  # (no link on the way)
                raise
            raise ReportError(f"{locations[0]} (-> {file}): "
                              f"{str(error).removeprefix(f'{file}: ')}") from None
        if isinstance(summary, RunSummary):
            summary.locations = tuple(locations)
        if isinstance(summary, SuperSummary):
            if summary.task in supers:
                raise ReportError(f"two super-survivor summaries for task {summary.task}: "
                                  f"{supers[summary.task].path} and {file}; pass only one")
            supers[summary.task] = summary
        else:
            runs.setdefault(summary.task, []).append(summary)
    for task, sup in supers.items():
        if task not in runs:
            raise ReportError(f"{sup.path}: super-survivor summary for task {task} but no "
                              f"search run of {task} among the inputs")
    results = {}
    for task in sorted(runs, key=task_order):
        task_runs = runs[task]
        _check_consistent(task, task_runs)
        res = _aggregate(task, task_runs, supers.get(task))
        shape = (res.num_layers, res.num_heads)
        if res.super is not None and None not in shape and res.super.head_mask.shape != shape:
            raise ReportError(f"{res.super.path}: field 'head_mask' has shape "
                              f"{res.super.head_mask.shape}, but the {task} runs have "
                              f"{shape[0]} layers x {shape[1]} heads")
        if res.super is not None:
            _check_super(task, task_runs, res.super)
        results[task] = res
    return results


def task_order(task: str) -> tuple[int, str]:
    """Sort key: the paper's tasks in its column order, then any other task by name."""
    return (TASKS.index(task), "") if task in TASKS else (len(TASKS), task)


# ----------------------------------------------------------------------------- stability


def stats_module() -> tuple[ModuleType | None, str]:
    """(sparsebert.lottery.stats, "") or (None, why it cannot be imported)."""
    try:
        module = importlib.import_module("sparsebert.lottery.stats")
        getattr(module, "require_statsmodels", lambda: None)()  # statsmodels is imported lazily
        return module, ""
    except ImportError as err:
        return None, f"sparsebert.lottery.stats cannot be imported ({err})"


def stability(res: TaskResults) -> dict[str, dict] | None:
    """Stability of the good s-pruning masks across seeds (PAPER.md §5.1).

    Returns {"heads": stability_summary((n_seeds, L, H)), "mlps": stability_summary((n_seeds,
    L))}, or None with fewer than 2 seeds of masks or without the stats module.
    """
    stats, _ = stats_module()
    if stats is None or res.head_masks is None or len(res.head_masks) < 2:
        return None
    return {"heads": stats.stability_summary(res.head_masks),
            "mlps": stats.stability_summary(res.mlp_masks)}


def cochran_pvalue(summary: dict) -> float | None:
    """Cochran's Q p-value of a stability summary ("cochran_q_pvalue" or "cochran_q.pvalue")."""
    value = summary.get("cochran_q_pvalue")
    if value is None and isinstance(summary.get("cochran_q"), dict):
        value = summary["cochran_q"].get("pvalue")
    return None if value is None else float(value)
