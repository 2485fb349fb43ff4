"""What each stage file of a search holds, checked where it is read: a file that is valid JSON
but not what its stage writes (edited by hand, another program's, an object cut down) is a
RunDirError naming it, what is wrong and what to do, not a KeyError in a later stage.

    structured search   structured/search.json: curve, good masks, threshold, notes, sizes
    magnitude search    magnitude/search.json: curve, kept, good_step, threshold, notes
    structured masks    structured/masks/<subnet>.json: head_mask (L, H), mlp_mask (L,)
    magnitude masks     magnitude/masks/<subnet>.json: fraction_kept, layer_kept_fraction,
                        kept, total
    pruned              <method>/pruned/<subnet>.json, super/pruned/<subnet>/seed_<s>.json
    super masks         super/masks.json: head and MLP masks of every subnetwork
    object              any other JSON object (the full model's config.json)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsebert.atomic import read_json
from sparsebert.errors import RunDirError
from sparsebert.lottery.subnetworks import SUBNETWORKS

REDO_STAGE = "delete it to redo that stage"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_bit(value: Any) -> bool:
    return isinstance(value, numbers.Real) and value in (0, 1)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number" if _is_number(value) else
                                    type(value).__name__)


def mask_problem(found: dict[str, Any]) -> str | None:
    """What is wrong with `found`'s head_mask (L, H) and mlp_mask (L,) (lists of 0/1 values,
    one row of heads and one MLP per layer), or None when they are such masks."""
    heads, mlps = found.get("head_mask"), found.get("mlp_mask")
    if not isinstance(heads, list) or not heads or not all(
            isinstance(row, list) and row for row in heads):
        return (f"head_mask is {_type_name(heads)}, expected a list of layers' lists of head "
                f"values (L, H)")
    if len({len(row) for row in heads}) != 1:
        return "head_mask's layers have different numbers of heads"
    if not isinstance(mlps, list) or len(mlps) != len(heads):
        return (f"mlp_mask is {_type_name(mlps)}"
                + (f" of {len(mlps)}" if isinstance(mlps, list) else "")
                + f", expected a list of {len(heads)} values (one per layer of head_mask)")
    if not all(_is_bit(v) for row in heads for v in row) or not all(_is_bit(v) for v in mlps):
        return "a mask value is not 0 or 1"
    return None


def _list_of(kind: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(kind(v) for v in value)


_OBJECT = (lambda value: isinstance(value, dict), "an object")
_LIST = (lambda value: isinstance(value, list), "a list")
_NUMBER = (_is_number, "a number")
_COUNT = (lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 0,
          "a count")
_CURVE = (_list_of(lambda value: isinstance(value, dict)), "a list of objects")
_SIZES = (lambda value: isinstance(value, dict) and all(
    _COUNT[0](value.get(k)) for k in ("layers", "heads", "hidden", "head_dim", "intermediate")),
    "an object of counts: layers, heads, hidden, head_dim, intermediate")

# Each kind's fields and what each must be (a test, and what it says it expected).
FIELDS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "structured search": {"curve": _CURVE, "head_mask": _LIST, "mlp_mask": _LIST,
                          "fraction_kept": _NUMBER, "threshold_score": _NUMBER,
                          "notes": _LIST, "sizes": _SIZES},
    "magnitude search": {"curve": _CURVE, "kept": _COUNT, "good_step": _COUNT,
                         "fraction_kept": _NUMBER, "threshold_score": _NUMBER,
                         "notes": _LIST},
    "structured masks": {"head_mask": _LIST, "mlp_mask": _LIST},
    "magnitude masks": {"fraction_kept": _NUMBER,
                        "layer_kept_fraction": (_list_of(_is_number), "a list of numbers"),
                        "kept": _COUNT, "total": _COUNT},
    "pruned": {"metrics": _OBJECT},
    "super masks": {"masks": _OBJECT},
    "object": {},
}
_MASKS = frozenset({"structured search", "structured masks"})


def stage_problem(found: Any, kind: str) -> str | None:
    """What is wrong with `found` as a stage file of `kind` (see FIELDS), or None."""
    if not isinstance(found, dict):
        return f"expected a JSON object, found {_type_name(found)}"
    missing = [name for name in FIELDS[kind] if name not in found]
    if missing:
        return f"no {', '.join(repr(name) for name in missing)} in it"
    for name, (test, expected) in FIELDS[kind].items():
        if not test(found[name]):
            return f"{name!r} is {_type_name(found[name])}, expected {expected}"
    if kind in _MASKS and mask_problem(found) is not None:
        return mask_problem(found)
    if kind == "structured search":
        shape = (len(found["head_mask"]), len(found["head_mask"][0]))
        sizes = (found["sizes"]["layers"], found["sizes"]["heads"])
        if shape != sizes:
            return f"head_mask is {shape}, its sizes say (L, H) = {sizes}"

    if kind == "super masks":
        for name in SUBNETWORKS:
            masks = found["masks"].get(name)
            problem = (f"expected an object, found {_type_name(masks)}"
                       if not isinstance(masks, dict) else mask_problem(masks))
            if problem is not None:
                return f"masks {name!r}: {problem}"
    return None


def check_stage(path: Path, found: Any, kind: str, fix: str = REDO_STAGE) -> dict[str, Any]:
    """`found` (the JSON read from `path`) when it is a stage file of `kind`; else RunDirError
    naming `path`, what is wrong and `fix`."""
    problem = stage_problem(found, kind)
    if problem is not None:
        raise RunDirError(f"{path}: damaged ({problem}); {fix}")
    return found


def read_stage_file(path: Path, kind: str, fix: str = REDO_STAGE) -> dict[str, Any] | None:
    """The stage file `path` of `kind`, checked; None when it is missing."""
    if not path.is_file():
        return None
    return check_stage(path, read_json(path, fix), kind, fix)


def stage_masks(path: Path, found: dict[str, Any], shape: tuple[int, int] | None,
                fix: str = REDO_STAGE) -> dict[str, torch.Tensor]:
    """head_mask (L, H) and mlp_mask (L,) of a checked stage file's masks `found` (read from
    `path`) as float tensors (0/1 integers too), when of `shape` (L, H) (None: any)."""
    heads = torch.tensor(found["head_mask"], dtype=torch.float32)  # (L, H)
    mlps = torch.tensor(found["mlp_mask"], dtype=torch.float32)  # (L,)
    if shape is not None and tuple(heads.shape) != tuple(shape):
        raise RunDirError(f"{path}: damaged (head_mask is {tuple(heads.shape)}, the search's "
                          f"model has (L, H) = {tuple(shape)}); {fix}")
    return {"head_mask": heads, "mlp_mask": mlps}


def stage_metric(path: Path, metrics: dict[str, Any], metric: str,
                 fix: str = REDO_STAGE) -> float:
    """metrics[metric] of a pruned score read from `path`, as a float."""
    value = metrics.get(metric)
    if not _is_number(value):
        what = "missing" if metric not in metrics else f"{_type_name(value)}, expected a number"
        raise RunDirError(f"{path}: damaged (metrics {metric!r} is {what}); {fix}")
    return float(value)
