"""Find, validate and aggregate lottery-search summaries (`summary.json`), grouped by task.

Input contract (written by the search, one file per run directory = one task x one seed):
``{"version": 1, "kind": "sparsebert-search", "task", "seed", "metric", "report_metric",
"threshold", "num_layers", "num_heads", "full": {"score", ...}, "majority"?, "methods"?:
{"structured"?: {"curve"?, "good_mask"?, "subnetworks"?}, "magnitude"?: {"curve"?,
"layer_kept_fraction"?, "subnetworks"?}}}``, and optionally a multi-seed parent's
``super/summary.json`` with ``"kind": "sparsebert-super"``, "task", "seeds", "head_mask",
"mlp_mask", "subnetworks". Fields marked ? may be absent; a missing required field is a
ReportError naming the file and the field.

Aggregation over seeds: mean and sample std (ddof=1, the paper's Bessel-corrected std; None with
one seed), and n.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from sparsebert.errors import SparsebertError
from sparsebert.report.paper import SUBNETS, TASKS, canonical_task, row_key

SUMMARY_NAME = "summary.json"
VERSION = 1
KIND_RUN = "sparsebert-search"
KIND_SUPER = "sparsebert-super"
METHODS: tuple[str, ...] = ("structured", "magnitude")


class ReportError(SparsebertError):
    """Report input that cannot be used: no summaries found, bad version/kind, missing field."""


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


# ----------------------------------------------------------------------------- one file


def _get(data: dict, dotted: str, path: Path, *, required: bool = True, kind: type | tuple = ()):
    """Look up `dotted` ("full.score") in `data`; ReportError naming the file and the field when
    required and missing, or when present with the wrong type."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            if required:
                raise ReportError(f"{path}: missing required field '{dotted}'")
            return None
        node = node[part]
    if kind and (not isinstance(node, kind) or isinstance(node, bool) and bool not in _tuple(kind)):
        names = "/".join(k.__name__ for k in _tuple(kind))
        raise ReportError(f"{path}: field '{dotted}' should be {names}, got {node!r:.60}")
    return node


def _tuple(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


_NUM = (int, float)


def _score(entry: Any) -> float | None:
    """The score of one evaluation entry {"score": x, "metrics": {...}}; None when not run."""
    if isinstance(entry, dict) and isinstance(entry.get("score"), _NUM):
        return float(entry["score"])
    return None


def _scores(entry: Any) -> list[float]:
    """Scores of an evaluation entry, or of a list of them (one per retraining seed)."""
    entries = entry if isinstance(entry, list) else [entry]
    return [s for s in (_score(e) for e in entries) if s is not None]


def _mask(value: Any, shape: tuple[int, ...], path: Path, name: str) -> np.ndarray:
    """A 0/1 mask as a bool array of `shape`; ReportError naming the field otherwise."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ReportError(f"{path}: field '{name}' is not a numeric array") from None
    if arr.shape != shape:
        raise ReportError(f"{path}: field '{name}' has shape {arr.shape}, expected {shape}")
    return arr > 0.5


@dataclass
class RunSummary:
    """One search run (one task x one seed).

    head_mask: (num_layers, num_heads) bool, mlp_mask: (num_layers,) bool, the s-pruning good
    mask (None if absent); curves: method -> list of curve points (dicts as in the file);
    subnetworks: method -> subnet -> entry dict; layer_kept_fraction: (num_layers,) m-pruning.
    """

    path: Path
    task: str
    seed: int
    metric: str
    report_metric: str
    threshold: float
    num_layers: int | None  # None only when absent from the file and there is no head mask
    num_heads: int | None
    full_score: float
    full_metrics: dict[str, float]
    majority: float | None = None
    model: str | None = None
    search_data: str | None = None
    importance_mode: str | None = None
    head_mask: np.ndarray | None = None
    mlp_mask: np.ndarray | None = None
    layer_kept_fraction: np.ndarray | None = None
    curves: dict[str, list[dict]] = field(default_factory=dict)
    subnetworks: dict[str, dict[str, dict]] = field(default_factory=dict)

    @property
    def full_search_score(self) -> float:
        """The full model's score in `metric` (the thresholded one): the phase-0 / step-0 curve
        point if present, else full.metrics[metric], else the report score."""
        for curve in self.curves.values():
            if curve and isinstance(curve[0].get("search_score"), _NUM):
                return float(curve[0]["search_score"])
        value = self.full_metrics.get(self.metric)
        return float(value) if isinstance(value, _NUM) else self.full_score


@dataclass
class SuperSummary:
    """The super-survivor evaluation of one task: head_mask (L, H) and mlp_mask (L,) bool kept
    in every seed; subnetworks: subnet -> entry (random = the paper's "middling", bad =
    "bizarro")."""

    path: Path
    task: str
    seeds: list[int]
    head_mask: np.ndarray
    mlp_mask: np.ndarray
    subnetworks: dict[str, dict]


def _subnetworks(value: Any, path: Path, name: str) -> dict[str, dict]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReportError(f"{path}: field '{name}' should be an object of good/random/bad")
    return {k: v for k, v in value.items() if k in SUBNETS and isinstance(v, dict)}


def _task(data: dict, path: Path) -> str:
    """The task name, in the paper's spelling when it is one of its tasks ("sst2" -> "SST-2")."""
    name = _get(data, "task", path, kind=str)
    return canonical_task(name) or name


def _parse_run(data: dict, path: Path) -> RunSummary:
    task = _task(data, path)
    metrics = _get(data, "full.metrics", path, required=False, kind=dict) or {}
    # num_layers / num_heads: needed for the masks; taken from the mask when absent.
    num_layers = _get(data, "num_layers", path, required=False, kind=int)
    num_heads = _get(data, "num_heads", path, required=False, kind=int)
    good = _get(data, "methods.structured.good_mask", path, required=False, kind=dict)
    if good is not None and (num_layers is None or num_heads is None):
        shape = np.shape(good.get("head_mask"))
        if len(shape) != 2:
            raise ReportError(f"{path}: missing required field 'num_layers'/'num_heads' (the "
                              "good head mask does not give them either)")
        num_layers, num_heads = num_layers or shape[0], num_heads or shape[1]
    run = RunSummary(
        path=path, task=task,
        seed=_get(data, "seed", path, kind=int),
        metric=_get(data, "metric", path, kind=str),
        report_metric=_get(data, "report_metric", path, kind=str),
        threshold=float(_get(data, "threshold", path, kind=_NUM)),
        num_layers=num_layers, num_heads=num_heads,
        full_score=float(_get(data, "full.score", path, kind=_NUM)),
        full_metrics={k: float(v) for k, v in metrics.items() if isinstance(v, _NUM)},
        majority=_get(data, "majority", path, required=False, kind=_NUM),
        model=_get(data, "model", path, required=False, kind=str),
        search_data=_get(data, "search_data", path, required=False, kind=str),
        importance_mode=_get(data, "importance_mode", path, required=False, kind=str),
    )
    methods = _get(data, "methods", path, required=False, kind=dict) or {}
    for method in METHODS:
        block = methods.get(method)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ReportError(f"{path}: field 'methods.{method}' should be an object")
        curve = block.get("curve") or []
        if not isinstance(curve, list) or not all(isinstance(p, dict) for p in curve):
            raise ReportError(f"{path}: field 'methods.{method}.curve' should be a list of objects")
        run.curves[method] = curve
        run.subnetworks[method] = _subnetworks(
            block.get("subnetworks"), path, f"methods.{method}.subnetworks"
        )
    if good is not None:
        run.head_mask = _mask(good.get("head_mask"), (num_layers, num_heads), path,
                              "methods.structured.good_mask.head_mask")
        run.mlp_mask = _mask(good.get("mlp_mask"), (num_layers,), path,
                             "methods.structured.good_mask.mlp_mask")
    lkf = _get(data, "methods.magnitude.layer_kept_fraction", path, required=False, kind=list)
    if lkf is not None:
        run.layer_kept_fraction = np.asarray(lkf, dtype=np.float64)
    return run


def _parse_super(data: dict, path: Path) -> SuperSummary:
    task = _task(data, path)
    head = np.asarray(_get(data, "head_mask", path, kind=list), dtype=np.float64)
    if head.ndim != 2:
        raise ReportError(f"{path}: field 'head_mask' should be (num_layers, num_heads), "
                          f"got shape {head.shape}")
    return SuperSummary(
        path=path, task=task,
        seeds=[int(s) for s in _get(data, "seeds", path, required=False, kind=list) or []],
        head_mask=head > 0.5,
        mlp_mask=_mask(_get(data, "mlp_mask", path, kind=list), head.shape[:1], path, "mlp_mask"),
        subnetworks=_subnetworks(data.get("subnetworks"), path, "subnetworks"),
    )


def load_summary(path: str | Path) -> RunSummary | SuperSummary:
    """Load and validate one summary.json (a search run or a super-survivor summary)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: cannot read summary ({err})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    if data.get("version") != VERSION:
        raise ReportError(f"{path}: unsupported summary version {data.get('version')!r} "
                          f"(this report reads version {VERSION})")
    kind = data.get("kind")
    if kind == KIND_RUN:
        return _parse_run(data, path)
    if kind == KIND_SUPER:
        return _parse_super(data, path)
    raise ReportError(f"{path}: field 'kind' is {kind!r}, expected {KIND_RUN!r} or {KIND_SUPER!r}")


def find_summaries(paths: Sequence[str | Path]) -> list[Path]:
    """Every summary.json under `paths` (a run dir, a parent of many, or the file itself),
    sorted and without duplicates; ReportError naming the paths when there is none."""
    found: dict[Path, None] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            found[p.resolve()] = None
        elif p.is_dir():
            for f in sorted(p.rglob(SUMMARY_NAME)):
                found[f.resolve()] = None
        else:
            raise ReportError(f"report input {str(p)!r} does not exist")
    if not found:
        names = ", ".join(repr(str(p)) for p in paths) or "(no paths given)"
        raise ReportError(f"no {SUMMARY_NAME} found under {names}: pass search run "
                          "directories or their parent")
    return sorted(found)


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


_SAME_ACROSS_SEEDS = ("model", "metric", "report_metric", "threshold", "num_layers", "num_heads",
                      "search_data", "importance_mode")


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
            if a is not None and b is not None and a != b:
                raise ReportError(f"task {task}: field '{name}' is {a!r} in {first.path} but "
                                  f"{b!r} in {run.path}; report one setting at a time")


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
                vals = [s for e in entries for s in _scores(e.get(stage))]
                if (stat := Stat.of(vals)) is not None:
                    res.scores[row_key(method, subnet, stage)] = stat
    if sup is not None:
        for subnet, entry in sup.subnetworks.items():
            for stage in ("pruned", "retrained"):
                if (stat := Stat.of(_scores(entry.get(stage)))) is not None:
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
                stat = Stat.of(v for v in vals if isinstance(v, _NUM))
                if stat is not None:
                    res.sizes[(prefix, subnet, name)] = stat
    if sup is not None:
        res.sizes[("super", "good", "heads_kept")] = Stat.of([int(sup.head_mask.sum())])
        res.sizes[("super", "good", "mlps_kept")] = Stat.of([int(sup.mlp_mask.sum())])
        frac = (sup.subnetworks.get("good") or {}).get("fraction_kept")
        if isinstance(frac, _NUM):
            res.sizes[("super", "good", "fraction_kept")] = Stat.of([frac])
    # Step 3: masks stacked over seeds.
    with_mask = [r for r in rs if r.head_mask is not None]
    if with_mask:
        res.head_masks = np.stack([r.head_mask for r in with_mask])  # (n_seeds, L, H)
        res.mlp_masks = np.stack([r.mlp_mask for r in with_mask])  # (n_seeds, L)
        res.mask_seeds = [r.seed for r in with_mask]
    return res


def collect(paths: str | Path | Sequence[str | Path]) -> dict[str, TaskResults]:
    """Find, load, validate and aggregate every summary under `paths`.

    Returns {task: TaskResults}, the paper's tasks in its order, then others by name. A super
    summary for a task with no search run is an error (nothing to compare it with).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs: dict[str, list[RunSummary]] = {}
    supers: dict[str, SuperSummary] = {}
    for file in find_summaries(list(paths)):
        summary = load_summary(file)
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
        results[task] = res
    return results


def task_order(task: str) -> tuple[int, str]:
    """Sort key: the paper's tasks in its column order, then any other task by name."""
    return (TASKS.index(task), "") if task in TASKS else (len(TASKS), task)


# ----------------------------------------------------------------------------- stability


def stats_module() -> tuple[ModuleType | None, str]:
    """(sparsebert.lottery.stats, "") or (None, why it cannot be imported)."""
    try:
        return importlib.import_module("sparsebert.lottery.stats"), ""
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
