"""Read and validate lottery-search summaries (`summary.json`), one file at a time.

Input contract (written by the search, one file per run directory = one task x one seed):
``{"version": 1, "kind": "sparsebert-search", "task", "seed", "metric", "report_metric",
"threshold", "num_layers", "num_heads", "full": {"score", ...}, "majority"?, "search_majority"?,
"search_data"?, "methods"?:
{"structured"?: {"curve"?, "good_mask"?, "subnetworks"?}, "magnitude"?: {"curve"?,
"layer_kept_fraction"?, "subnetworks"?}}}``, and optionally a multi-seed parent's
``super/summary.json`` with ``"kind": "sparsebert-super"``, "task", "seeds", "head_mask",
"mlp_mask", "subnetworks". Fields marked ? may be absent; a missing required field is a
ReportError naming the file and the field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsebert.errors import SparsebertError
from sparsebert.report.paper import SUBNETS, canonical_task
from sparsebert.train.rundir import is_search_dir

SUMMARY_NAME = "summary.json"
VERSION = 1
KIND_RUN = "sparsebert-search"
KIND_SUPER = "sparsebert-super"
METHODS: tuple[str, ...] = ("structured", "magnitude")


class ReportError(SparsebertError):
    """Report input that cannot be used: no summaries found, bad version/kind, missing field."""


class NoSummaryError(ReportError):
    """An input (or every input) holds no summary.json."""


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


NUMBER = (int, float)


def score_of(entry: Any) -> float | None:
    """The score of one evaluation entry {"score": x, "metrics": {...}}; None when not run."""
    if isinstance(entry, dict) and isinstance(entry.get("score"), NUMBER):
        return float(entry["score"])
    return None


def scores_of(entry: Any) -> list[float]:
    """Scores of an evaluation entry, or of a list of them (one per retraining seed)."""
    entries = entry if isinstance(entry, list) else [entry]
    return [s for s in (score_of(e) for e in entries) if s is not None]


def _array(value: Any, path: Path, name: str) -> np.ndarray:
    """A rectangular array of finite numbers; ReportError naming the field otherwise."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ReportError(f"{path}: field '{name}' is not a rectangular numeric array") from None
    if not np.isfinite(arr).all():
        raise ReportError(f"{path}: field '{name}' holds values that are not finite numbers")
    return arr


def _mask(value: Any, shape: tuple[int, ...], path: Path, name: str) -> np.ndarray:
    """A 0/1 mask as a bool array of `shape`; ReportError naming the field otherwise."""
    arr = _array(value, path, name)
    if arr.shape != shape:
        raise ReportError(f"{path}: field '{name}' has shape {arr.shape}, expected {shape}")
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ReportError(f"{path}: field '{name}' should hold only 0 and 1, found "
                          f"{arr[~np.isin(arr, (0.0, 1.0))].flat[0]:g}")
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
    majority: float | None = None  # dev, in report_metric
    search_majority: float | None = None  # the search set, in metric (newer summaries)
    model: str | None = None
    search_data: str | None = None
    importance_mode: str | None = None
    git_sha: str | None = None  # the commit of the code that wrote the summary, if recorded
    # the fine-tunes' training data: a cap on examples (a seeded subset), None for the full
    # set; train_data_known is False for summaries without a train config
    max_train_examples: int | None = None
    train_data_known: bool = False
    train_set_examples: int | None = None  # the size of the task's training split (newer)
    head_mask: np.ndarray | None = None
    mlp_mask: np.ndarray | None = None
    layer_kept_fraction: np.ndarray | None = None
    curves: dict[str, list[dict]] = field(default_factory=dict)
    good_steps: dict[str, int] = field(default_factory=dict)  # method -> the good mask's step
    subnetworks: dict[str, dict[str, dict]] = field(default_factory=dict)
    config: dict[str, dict] = field(default_factory=dict)  # "train" / "search" settings, if any
    # the paths the file was found under (a seed linked into a multi-seed run: the link's path
    # too; its timings may sit in either parent's speed/); () when loaded on its own
    locations: tuple[Path, ...] = ()

    @property
    def full_search_score(self) -> float:
        """The full model's score in `metric` (the thresholded one): the phase-0 / step-0 curve
        point if present, else full.metrics[metric], else the report score."""
        for curve in self.curves.values():
            if curve and isinstance(curve[0].get("search_score"), NUMBER):
                return float(curve[0]["search_score"])
        value = self.full_metrics.get(self.metric)
        return float(value) if isinstance(value, NUMBER) else self.full_score


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


_SIZE_FIELDS = ("heads_kept", "mlps_kept", "fraction_kept")


def _check_number(value: Any, path: Path, name: str) -> None:
    """None (not there: not run yet) or a finite number (not a bool); ReportError naming the
    field otherwise."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, NUMBER) or not math.isfinite(value):
        raise ReportError(f"{path}: field '{name}' should be a finite number, got {value!r:.60}")


def _optional_finite(data: dict, name: str, path: Path) -> float | None:
    """An optional top-level number: None when absent, else finite (a NaN majority would
    silently switch the weak-threshold notes off)."""
    value = _get(data, name, path, required=False, kind=NUMBER)
    _check_number(value, path, name)
    return value


def _finite(value: float, path: Path, name: str) -> float:
    _check_number(value, path, name)
    return float(value)


def _subnetworks(value: Any, path: Path, name: str) -> dict[str, dict]:
    """good/random/bad entries, their scores ("pruned"/"retrained": an entry or a list of them,
    each {"score", ...}) and sizes checked to be finite numbers where present."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReportError(f"{path}: field '{name}' should be an object of good/random/bad")
    found = {k: v for k, v in value.items() if k in SUBNETS and isinstance(v, dict)}
    for subnet, entry in found.items():
        for size in _SIZE_FIELDS:
            _check_number(entry.get(size), path, f"{name}.{subnet}.{size}")
        for stage in ("pruned", "retrained"):
            evaluations = entry.get(stage)
            listed = evaluations if isinstance(evaluations, list) else [evaluations]
            for i, evaluation in enumerate(listed):
                where = f"{name}.{subnet}.{stage}" + (f"[{i}]" if isinstance(evaluations, list)
                                                      else "")
                if isinstance(evaluation, dict):
                    _check_number(evaluation.get("score"), path, f"{where}.score")
    return found


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
    if good is not None:  # both masks, or neither (not "values that are not finite")
        good = {name: _get(data, f"methods.structured.good_mask.{name}", path, kind=list)
                for name in ("head_mask", "mlp_mask")}
    if good is not None and (num_layers is None or num_heads is None):
        shape = _array(good.get("head_mask"), path,
                       "methods.structured.good_mask.head_mask").shape
        if len(shape) != 2:
            raise ReportError(f"{path}: missing required field 'num_layers'/'num_heads' (the "
                              "good head mask does not give them either)")
        num_layers, num_heads = num_layers or shape[0], num_heads or shape[1]
    run = RunSummary(
        path=path, task=task,
        seed=_get(data, "seed", path, kind=int),
        metric=_get(data, "metric", path, kind=str),
        report_metric=_get(data, "report_metric", path, kind=str),
        threshold=float(_get(data, "threshold", path, kind=NUMBER)),
        num_layers=num_layers, num_heads=num_heads,
        full_score=_finite(_get(data, "full.score", path, kind=NUMBER), path, "full.score"),
        full_metrics={k: float(v) for k, v in metrics.items() if isinstance(v, NUMBER)},
        majority=_optional_finite(data, "majority", path),
        search_majority=_optional_finite(data, "search_majority", path),
        model=_get(data, "model", path, required=False, kind=str),
        search_data=_get(data, "search_data", path, required=False, kind=str),
        importance_mode=_get(data, "importance_mode", path, required=False, kind=str),
        git_sha=_get(data, "git_sha", path, required=False, kind=str),
    )
    for section in ("train", "search"):
        settings = _get(data, f"config.{section}", path, required=False, kind=dict)
        if settings is not None:
            run.config[section] = settings
    if _get(data, "config.train", path, required=False, kind=dict) is not None:
        run.train_data_known = True
        run.max_train_examples = _get(data, "config.train.max_train_examples", path,
                                      required=False, kind=int)
        run.train_set_examples = _get(data, "full.train_set_examples", path, required=False,
                                      kind=int)
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
        step = block.get("good_step")
        if isinstance(step, int) and not isinstance(step, bool):
            run.good_steps[method] = step
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
        run.layer_kept_fraction = _array(lkf, path, "methods.magnitude.layer_kept_fraction")
    return run


def _parse_super(data: dict, path: Path) -> SuperSummary:
    task = _task(data, path)
    head = _array(_get(data, "head_mask", path, kind=list), path, "head_mask")
    if head.ndim != 2:
        raise ReportError(f"{path}: field 'head_mask' should be (num_layers, num_heads), "
                          f"got shape {head.shape}")
    seeds = _get(data, "seeds", path, required=False, kind=list) or []
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ReportError(f"{path}: field 'seeds' should be a list of integers, got "
                          f"{seeds!r:.60}")
    return SuperSummary(
        path=path, task=task, seeds=seeds,
        head_mask=_mask(head, head.shape, path, "head_mask"),
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


def _walk(root: str | Path, seen: set[str]) -> Iterator[tuple[Path, list[str], bool]]:
    """(folder, its file names, first) for every folder under `root`, hidden folders
    (.sweep/superseded/) skipped. Symlinked folders are followed, each real folder's contents
    once: a folder reached again (a second link to it, a link back up) comes with first=False
    and is not walked again. `seen`: the real folders walked so far (shared across calls)."""
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        first = real not in seen
        yield Path(folder), files, first
        if not first:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))


def _summaries_under(root: Path) -> Iterator[Path]:
    """The summary.json files under `root` as found (links kept in the path), walked by _walk:
    a multi-seed run may link a seed searched on its own (runs/mrpc-seeds/seed_42 -> ../mrpc);
    a folder reached again still yields its summary under that path."""
    for folder, files, _ in _walk(root, set()):
        if SUMMARY_NAME in files:
            yield folder / SUMMARY_NAME


def unfinished_searches(paths: Sequence[str | Path]) -> list[Path]:
    """Search directories under `paths` (a config.json with the search's settings) that hold no
    summary.json yet: searches still running or cut short, which a report cannot include.
    Each real folder is looked at once (see _walk)."""
    seen: set[str] = set()
    return [folder for raw in paths if Path(raw).is_dir()
            for folder, files, first in _walk(raw, seen)
            if first and "config.json" in files and SUMMARY_NAME not in files
            and is_search_dir(folder)]


def find_summary_locations(paths: Sequence[str | Path]) -> dict[Path, list[Path]]:
    """Every summary.json under `paths` (a run dir, a parent of many, or the file itself; hidden
    folders such as a sweep's .sweep/ skipped): {resolved file: the paths it was found under},
    sorted by file; ReportError naming the paths when there is none, or naming a path that holds
    none among others (a fine-tuning run or a typo would otherwise drop out of the report)."""
    found: dict[Path, list[Path]] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = list(_summaries_under(p))
        else:
            raise ReportError(f"report input {str(p)!r} does not exist")
        if not files and len(paths) > 1:
            raise NoSummaryError(f"no {SUMMARY_NAME} found under {str(p)!r} (one of the report's "
                              "inputs): pass search run directories or their parent")
        for file in files:
            places = found.setdefault(file.resolve(), [])
            if file not in places:
                places.append(file)
    if not found:
        names = ", ".join(repr(str(p)) for p in paths) or "(no paths given)"
        raise NoSummaryError(f"no {SUMMARY_NAME} found under {names}: pass search run "
                          "directories or their parent")
    return dict(sorted(found.items()))


def find_summaries(paths: Sequence[str | Path]) -> list[Path]:
    """The resolved summary.json files of find_summary_locations, sorted, each once."""
    return list(find_summary_locations(paths))
