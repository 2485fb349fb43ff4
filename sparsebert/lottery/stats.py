"""Stability of pruning masks across fine-tuning seeds, and overlap across tasks (PAPER.md §5).

Every function takes 0/1 (or bool) masks stacked as (n_seeds, *component_shape): heads
(n_seeds, layers, heads) or MLPs (n_seeds, layers). 1 = kept, 0 = pruned. A list of per-seed
masks, or torch tensors, are accepted too. Nothing here touches a model.

* survivors: per-seed count of kept components (PAPER.md §1.4 "heads kept per seed").
* super-survivors: components kept in every seed (§5.1); never-kept: pruned in every seed.
* Jaccard: |A ∩ B| / |A ∪ B| of two seeds' kept sets; the mean is over seed pairs i < j.
* Fleiss' kappa: agreement of seeds (raters) on kept/pruned (categories) per component
  (subjects), corrected for chance from the pooled kept rate (§5.1, statistics_on_pruning).
* Krippendorff's alpha (nominal): the same agreement from the coincidence of values within each
  component (§5.1 uses it for the MLPs); every component is rated by every seed here.
* Cochran's Q: test that all seeds keep components at the same rate, with components as blocks
  and seeds as treatments; chi-square with n_seeds - 1 df (§5.1).
* overlap matrix: task x task count of shared super-survivors (§5.2, task_v_task figures).
* super-survivor controls: the good / bad ("bizzaro") / random ("midling") masks of the
  super-survivor row of the PAPER.md §3 table (authors' src/compute_super_masks.py).

Caution: a single (layers, heads) mask passed where stacked masks are expected is read as
`layers` seeds of `heads` components; stack seed masks along a new axis 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

from sparsebert.checks import is_integer
from sparsebert.errors import SparsebertError

# statsmodels (with scipy.stats) takes about a second to import: it is imported where used, so
# `import sparsebert` and every sweep worker start without it.


def require_statsmodels() -> None:
    """Import what the tests below need; raises ImportError when statsmodels is missing."""
    import statsmodels.stats.contingency_tables  # noqa: F401, PLC0415
    import statsmodels.stats.inter_rater  # noqa: F401, PLC0415

__all__ = [
    "survivors", "super_survivors", "never_kept", "kept_in_at_least", "pairwise_jaccard",
    "mean_pairwise_jaccard", "fleiss_kappa", "krippendorff_alpha", "cochrans_q", "overlap_matrix",
    "stability_summary", "SuperSurvivorControls", "super_survivor_controls",
]  # fmt: skip


def _to_numpy(x: Any, name: str = "masks") -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except ValueError:  # ragged nested lists (numpy: "inhomogeneous shape")
        raise SparsebertError(f"{name}: a mask is ragged (rows of different lengths); every "
                              f"seed's mask must be a full array, e.g. (layers, heads)") from None


def _as_masks(masks: npt.ArrayLike, name: str = "masks", min_seeds: int = 2) -> np.ndarray:
    """Validate and return masks as bool (n_seeds, *component_shape)."""
    if isinstance(masks, (list, tuple)):
        arrays = [_to_numpy(m, name) for m in masks]
        shapes = [a.shape for a in arrays]
        if len(set(shapes)) > 1:
            raise SparsebertError(
                f"{name}: per-seed masks have different shapes {shapes}; "
                "every seed must mask the same components"
            )
        arr = np.stack(arrays) if arrays else np.zeros((0, 0))
    else:
        arr = _to_numpy(masks, name)
    if arr.ndim < 2:
        raise SparsebertError(
            f"{name} must have shape (n_seeds, *component_shape), e.g. (n_seeds, layers, heads) "
            f"or (n_seeds, layers); got shape {arr.shape}"
        )
    if arr.shape[0] < min_seeds:
        raise SparsebertError(
            f"{name} needs at least {min_seeds} seeds along axis 0; got {arr.shape[0]} "
            f"(shape {arr.shape})"
        )
    if arr.size == 0:
        raise SparsebertError(f"{name} has no components (shape {arr.shape})")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise SparsebertError(f"{name} must be a 0/1 or bool array; got dtype {arr.dtype}")
    bad = arr[(arr != 0) & (arr != 1)]
    if bad.size:
        raise SparsebertError(
            f"{name} must contain only 0 and 1 (kept = 1); found {bad.size} other values, "
            f"e.g. {np.unique(bad)[:5].tolist()}"
        )
    return arr.astype(bool)


def _flat(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(arr.shape[0], -1)  # (n_seeds, n_components)


def survivors(masks: npt.ArrayLike) -> np.ndarray:
    """Kept components per seed. masks (n_seeds, *shape), one seed allowed -> int (n_seeds,)."""
    return _flat(_as_masks(masks, min_seeds=1)).sum(axis=1)


def super_survivors(masks: npt.ArrayLike) -> np.ndarray:
    """Kept in every seed. masks (n_seeds >= 2, *shape) -> bool (*shape)."""
    return _as_masks(masks).all(axis=0)


def never_kept(masks: npt.ArrayLike) -> np.ndarray:
    """Pruned in every seed. masks (n_seeds >= 2, *shape) -> bool (*shape)."""
    return (~_as_masks(masks)).all(axis=0)


def kept_in_at_least(masks: npt.ArrayLike, k: int) -> np.ndarray:
    """Kept in at least k seeds, 1 <= k <= n_seeds. masks (n_seeds, *shape) -> bool (*shape)."""
    arr = _as_masks(masks)
    n = arr.shape[0]
    if not is_integer(k) or not 1 <= k <= n:
        raise SparsebertError(f"k must be an integer in [1, n_seeds={n}]; got {k!r}")
    return arr.sum(axis=0) >= k


def pairwise_jaccard(masks: npt.ArrayLike) -> np.ndarray:
    """Jaccard index of every pair of seeds' kept sets. masks (n_seeds, *shape) -> float
    (n_seeds, n_seeds), symmetric, diagonal 1 for non-empty sets. J of two empty kept sets is
    0/0: nan (undefined; counting it as 1 would make seeds that prune everything look like the
    most stable ones)."""
    flat = _flat(_as_masks(masks)).astype(np.int64)  # (n, m)
    inter = flat @ flat.T  # (n, n)
    sizes = flat.sum(axis=1)  # (n,)
    union = sizes[:, None] + sizes[None, :] - inter  # (n, n)
    return np.where(union == 0, np.nan, inter / np.maximum(union, 1))


def mean_pairwise_jaccard(masks: npt.ArrayLike) -> float:
    """Mean Jaccard index over seed pairs i < j whose union is not empty (see pairwise_jaccard).
    masks (n_seeds >= 2, *shape) -> float; nan when every seed keeps nothing."""
    jac = pairwise_jaccard(masks)
    pairs = jac[np.triu_indices(jac.shape[0], k=1)]  # (n (n - 1) / 2,)
    defined = pairs[~np.isnan(pairs)]
    return float(defined.mean()) if defined.size else float("nan")


def fleiss_kappa(masks: npt.ArrayLike) -> float:
    """Fleiss' kappa, seeds as raters, components as subjects, {pruned, kept} as categories.

    masks (n_seeds >= 2, *shape) -> float in [-1, 1]. When every seed keeps every component,
    or prunes every component, chance agreement is 1 and kappa is 0/0: returns nan.
    """
    flat = _flat(_as_masks(masks))
    if flat.all() or not flat.any():
        return float("nan")
    # Step 1: (components, seeds) ratings -> (components, 2) counts of [pruned, kept].
    from statsmodels.stats.inter_rater import aggregate_raters  # noqa: PLC0415
    from statsmodels.stats.inter_rater import fleiss_kappa as _sm_fleiss_kappa  # noqa: PLC0415

    table, _ = aggregate_raters(flat.T.astype(np.int64), n_cat=2)
    # Step 2: statsmodels' kappa with the pooled category margin (method="fleiss").
    return float(_sm_fleiss_kappa(table, method="fleiss"))


def krippendorff_alpha(masks: npt.ArrayLike) -> float:
    """Krippendorff's alpha for nominal data: seeds as coders, components as units, {pruned,
    kept} as values, every unit coded by every seed (the paper's MLP statistic, PAPER.md §5.1).

    masks (n_seeds >= 2, *shape) -> float <= 1 (1 = identical masks, about 0 = chance).
    alpha = 1 - (n - 1) * (o_pk + o_kp) / (2 n_p n_k): n = n_seeds * components pairable
    values, n_p / n_k of them pruned / kept, and o_pk + o_kp = sum over components of
    2 k (m - k) / (m - 1), the coincidences of a kept and a pruned value within a component
    (k of its m = n_seeds values kept). When every value is the same (all kept or all pruned)
    the expected disagreement is 0 and alpha is 0/0: returns nan.
    """
    flat = _flat(_as_masks(masks))  # (m, components)
    m = flat.shape[0]
    kept = flat.sum(axis=0).astype(np.float64)  # (components,) kept count per component
    n = float(flat.size)
    n_kept = float(kept.sum())
    n_pruned = n - n_kept
    if n_kept == 0 or n_pruned == 0:
        return float("nan")
    disagreeing = float((2.0 * kept * (m - kept) / (m - 1)).sum())  # o_pk + o_kp
    return 1.0 - (n - 1.0) * disagreeing / (2.0 * n_pruned * n_kept)


def cochrans_q(masks: npt.ArrayLike) -> dict[str, float | int]:
    """Cochran's Q test that every seed keeps components with the same probability.

    masks (n_seeds >= 2, *shape) -> {"statistic", "pvalue", "df" = n_seeds - 1}. Components
    are blocks, seeds are treatments. Components on which all seeds agree add nothing; when
    every component is unanimous (e.g. identical seeds) Q is 0/0: statistic and pvalue are nan.
    """
    flat = _flat(_as_masks(masks))
    n_seeds = flat.shape[0]
    per_component = flat.sum(axis=0)  # (n_components,)
    if np.all((per_component == 0) | (per_component == n_seeds)):
        return {"statistic": float("nan"), "pvalue": float("nan"), "df": n_seeds - 1}
    from statsmodels.stats.contingency_tables import cochrans_q as _sm_cochrans_q  # noqa: PLC0415

    res = _sm_cochrans_q(flat.T.astype(np.float64))  # (components, seeds)
    return {"statistic": float(res.statistic), "pvalue": float(res.pvalue), "df": int(res.df)}


def overlap_matrix(task_masks: Mapping[str, npt.ArrayLike]) -> tuple[list[str], np.ndarray]:
    """Task x task count of components that are super-survivors in both tasks.

    task_masks: {task: masks (n_seeds >= 2, *shape)}; seed counts may differ, component shapes
    may not. Returns (task names in the mapping's order, int (n_tasks, n_tasks)); the diagonal
    is each task's own super-survivor count.
    """
    if not isinstance(task_masks, Mapping) or not task_masks:
        raise SparsebertError("task_masks must be a non-empty mapping {task name: masks}")
    names = list(task_masks)
    supers = [super_survivors(_as_masks(task_masks[t], name=f"task_masks[{t!r}]")) for t in names]
    for name, sup in zip(names, supers):
        if sup.shape != supers[0].shape:
            raise SparsebertError(
                f"task_masks[{name!r}] masks components of shape {sup.shape}, but "
                f"task_masks[{names[0]!r}] masks {supers[0].shape}; compare one component kind"
            )
    flat = np.stack([s.reshape(-1) for s in supers]).astype(np.int64)  # (n_tasks, m)
    return names, flat @ flat.T


def _json_float(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def stability_summary(masks: npt.ArrayLike) -> dict[str, Any]:
    """All stability statistics for one task and one component kind, JSON-serialisable.

    masks (n_seeds >= 2, *shape). "kept_in_all_but_one" counts components kept in at least
    n_seeds - 1 seeds (so it includes the super-survivors). nan statistics become None.
    """
    arr = _as_masks(masks)
    n = arr.shape[0]
    q = cochrans_q(arr)
    return {
        "n_seeds": int(n),
        "component_shape": list(arr.shape[1:]),
        "n_components": int(arr[0].size),
        "survivors": [int(s) for s in survivors(arr)],
        "super_survivors": int(super_survivors(arr).sum()),
        "never_kept": int(never_kept(arr).sum()),
        "kept_in_all_but_one": int(kept_in_at_least(arr, n - 1).sum()),
        "mean_jaccard": _json_float(mean_pairwise_jaccard(arr)),
        "fleiss_kappa": _json_float(fleiss_kappa(arr)),
        "krippendorff_alpha": _json_float(krippendorff_alpha(arr)),
        "cochran_q_statistic": _json_float(float(q["statistic"])),
        "cochran_q_pvalue": _json_float(float(q["pvalue"])),
        "cochran_q_df": int(q["df"]),
    }


class SuperSurvivorControls(TypedDict):
    """float64 0/1 masks of the component shape, and notes on pools too small to resample."""

    good: np.ndarray
    bad: np.ndarray
    random: np.ndarray
    notes: list[str]


def super_survivor_controls(
    masks: npt.ArrayLike, rng: np.random.Generator
) -> SuperSurvivorControls:
    """Good, bad and random masks for the super-survivor experiment (PAPER.md §3, last row).

    masks (n_seeds >= 2, *shape) -> masks of shape (*shape):
    * good: kept in every seed (the super-survivors), size G;
    * bad ("bizzaro"): G components drawn without replacement from those pruned in every seed;
    * random ("midling"): G components drawn from those in neither set.
    Rule for a pool smaller than G: the whole pool is taken (no top-up), so the control is
    smaller than good, and "notes" says so. This keeps bad within never-kept and random within
    neither set. (The authors' script instead tops bad up from the middle pool and draws
    midling from everything outside good and the resampled bad, so its sizes always match.
    It also draws a fresh midling mask for each seed's run, where one draw here serves every
    seed: the random row's spread over seeds leaves out the spread between draws.)
    Draws come from rng in a fixed order (bad, then random), so a seeded rng reproduces them.
    """
    if not isinstance(rng, np.random.Generator):
        raise SparsebertError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); got {type(rng)}"
        )
    arr = _as_masks(masks)
    shape = arr.shape[1:]
    # Step 1: the three disjoint pools, flattened to (n_components,).
    good = arr.all(axis=0).reshape(-1)
    bad_pool = (~arr).all(axis=0).reshape(-1)
    mid_pool = ~good & ~bad_pool
    size = int(good.sum())
    notes: list[str] = []
    if size == 0:
        notes.append("no super-survivors: good, bad and random are all empty")

    # Step 2: resample each control pool to the good size.
    def draw(pool: np.ndarray, label: str) -> np.ndarray:
        idx = np.flatnonzero(pool)
        if idx.size > size:
            idx = np.sort(rng.choice(idx, size=size, replace=False))
        elif idx.size < size:
            notes.append(
                f"{label}: pool has {idx.size} components, fewer than the {size} "
                f"super-survivors; took the whole pool"
            )
        out = np.zeros(good.size, dtype=np.float64)
        out[idx] = 1.0
        return out.reshape(shape)

    bad = draw(bad_pool, "bad (pruned in every seed)")
    rand = draw(mid_pool, "random (neither kept in every seed nor pruned in every seed)")
    good_mask = good.astype(np.float64).reshape(shape)
    return {"good": good_mask, "bad": bad, "random": rand, "notes": notes}
