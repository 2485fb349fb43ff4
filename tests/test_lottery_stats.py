"""Seed-stability statistics (sparsebert.lottery.stats) against hand-computed values.

Every expected value here is computed independently of statsmodels: Fleiss' kappa from the
textbook formula (P_i, P_bar, P_e), Cochran's Q from its closed form with scipy's chi-square
tail, Jaccard and overlaps from Python sets.
"""

from __future__ import annotations

import json
import math
from itertools import combinations

import numpy as np
import pytest
import torch

pytest.importorskip("statsmodels")  # a core dependency; absent on bare GPU machines
from scipy.stats import chi2  # noqa: E402

from sparsebert.lottery.stats import (  # noqa: E402
    cochrans_q,
    fleiss_kappa,
    kept_in_at_least,
    krippendorff_alpha,
    mean_pairwise_jaccard,
    never_kept,
    overlap_matrix,
    pairwise_jaccard,
    stability_summary,
    super_survivor_controls,
    super_survivors,
    survivors,
)

# Degenerate cases are handled before statsmodels divides 0 by 0, so no warning may escape.
pytestmark = pytest.mark.filterwarnings("error")


def random_masks(seed: int, n_seeds: int = 5, shape: tuple[int, ...] = (12, 12), p: float = 0.6):
    rng = np.random.default_rng(seed)
    return (rng.random((n_seeds, *shape)) < p).astype(np.float32)


def textbook_fleiss(masks: np.ndarray) -> float:
    """Fleiss (1971): n raters (seeds), N subjects (components), categories pruned/kept."""
    ratings = masks.reshape(masks.shape[0], -1).T  # (N, n)
    n_subjects, n = ratings.shape
    counts = [[int(n - row.sum()), int(row.sum())] for row in ratings]  # n_ij
    p_i = [(sum(c * c for c in row) - n) / (n * (n - 1)) for row in counts]
    p_bar = sum(p_i) / n_subjects
    p_j = [sum(row[j] for row in counts) / (n_subjects * n) for j in range(2)]
    p_e = sum(p * p for p in p_j)
    return (p_bar - p_e) / (1 - p_e)


def coincidence_alpha(masks: np.ndarray) -> float:
    """Krippendorff (2011), nominal: the coincidence matrix built by enumerating, in each unit
    (component), every ordered pair of values from two different coders (seeds), each pair
    weighted 1 / (m_u - 1); alpha = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c n_k."""
    units = masks.reshape(masks.shape[0], -1).T.astype(int)  # (components, coders)
    o = np.zeros((2, 2))
    for values in units:
        m = len(values)
        for i in range(m):
            for j in range(m):
                if i != j:
                    o[values[i], values[j]] += 1.0 / (m - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    observed = o[0, 1] + o[1, 0]
    expected = (n_c[0] * n_c[1] + n_c[1] * n_c[0]) / (n - 1)
    return 1.0 - observed / expected


def textbook_cochran(masks: np.ndarray) -> tuple[float, float]:
    """Q = (k-1) [k sum_j C_j^2 - N^2] / [k N - sum_i R_i^2]; seeds j = 1..k, blocks i."""
    table = masks.reshape(masks.shape[0], -1).T  # (blocks, k)
    k = table.shape[1]
    col = table.sum(axis=0)  # C_j
    row = table.sum(axis=1)  # R_i
    total = table.sum()  # N
    q = (k - 1) * (k * float((col**2).sum()) - float(total) ** 2) / (
        k * float(total) - float((row**2).sum())
    )
    return q, float(chi2.sf(q, k - 1))


def kept_sets(masks: np.ndarray) -> list[set[int]]:
    return [set(np.flatnonzero(m.reshape(-1)).tolist()) for m in masks]


# ---- counts -----------------------------------------------------------------------------------


def test_survivors_super_and_never_kept_by_hand():
    masks = np.array([[[1, 1], [0, 0]], [[1, 0], [0, 1]], [[1, 1], [0, 0]]])  # (3 seeds, 2, 2)
    np.testing.assert_array_equal(survivors(masks), [2, 2, 2])
    np.testing.assert_array_equal(super_survivors(masks), [[True, False], [False, False]])
    np.testing.assert_array_equal(never_kept(masks), [[False, False], [True, False]])
    np.testing.assert_array_equal(kept_in_at_least(masks, 2), [[True, True], [False, False]])
    assert super_survivors(masks).dtype == bool


def test_counts_match_per_component_loop_on_random_masks():
    masks = random_masks(0)
    n = masks.shape[0]
    for k in range(1, n + 1):
        expected = np.array(
            [[sum(masks[s, i, j] for s in range(n)) >= k for j in range(12)] for i in range(12)]
        )
        np.testing.assert_array_equal(kept_in_at_least(masks, k), expected)
    np.testing.assert_array_equal(kept_in_at_least(masks, n), super_survivors(masks))
    np.testing.assert_array_equal(survivors(masks), [int(m.sum()) for m in masks])
    assert never_kept(masks).sum() == sum(1 - masks.max(axis=0).reshape(-1))


def test_accepts_lists_bool_and_torch_masks():
    masks = random_masks(1, shape=(12,))
    expected = super_survivors(masks)
    np.testing.assert_array_equal(super_survivors(list(masks)), expected)
    np.testing.assert_array_equal(super_survivors(masks.astype(bool)), expected)
    np.testing.assert_array_equal(super_survivors(torch.from_numpy(masks)), expected)
    np.testing.assert_array_equal(survivors(masks[:1]), [int(masks[0].sum())])  # one seed is fine


# ---- Jaccard ----------------------------------------------------------------------------------


def test_pairwise_jaccard_matches_sets():
    masks = random_masks(2, n_seeds=4)
    sets = kept_sets(masks)
    jac = pairwise_jaccard(masks)
    assert jac.shape == (4, 4)
    for i, j in combinations(range(4), 2):
        expected = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
        assert jac[i, j] == pytest.approx(expected) and jac[j, i] == pytest.approx(expected)
    np.testing.assert_allclose(np.diag(jac), 1.0)
    pairs = [len(a & b) / len(a | b) for a, b in combinations(sets, 2)]
    assert mean_pairwise_jaccard(masks) == pytest.approx(sum(pairs) / len(pairs))


def test_jaccard_small_hand_example_and_empty_sets():
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    # {0,1} vs {1,2}: 1/3; anything non-empty vs the empty set: 0; empty vs empty: 0/0, nan.
    nan = np.nan
    np.testing.assert_allclose(pairwise_jaccard(masks),
                               [[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, nan]])
    assert mean_pairwise_jaccard(masks) == pytest.approx(1 / 9)
    assert np.isnan(pairwise_jaccard(np.zeros((2, 5)))[0, 1])
    assert np.isnan(mean_pairwise_jaccard(np.zeros((3, 5))))  # every seed keeps nothing
    # Empty-empty pairs are left out of the mean: {0} with two empty seeds -> pairs 0, 0, nan.
    assert mean_pairwise_jaccard(np.array([[1, 0], [0, 0], [0, 0]])) == 0.0
    assert stability_summary(np.zeros((3, 6, 12)))["mean_jaccard"] is None


# ---- Fleiss' kappa ----------------------------------------------------------------------------


def test_fleiss_kappa_hand_examples():
    # 3 seeds x 4 components; kept counts 3, 2, 0, 1: P_i = 1, 1/3, 1, 1/3, P_bar = 2/3,
    # p_kept = 6/12 -> P_e = 1/2, kappa = (2/3 - 1/2) / (1/2) = 1/3.
    masks = np.array([[1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 0, 0]])
    assert fleiss_kappa(masks) == pytest.approx(1 / 3)
    # 4 seeds x 3 components; kept counts 4, 3, 0: P_bar = (1 + 1/2 + 1)/3 = 5/6,
    # p = (5/12, 7/12) -> P_e = 37/72, kappa = (60/72 - 37/72) / (35/72) = 23/35.
    masks = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0]])
    assert fleiss_kappa(masks) == pytest.approx(23 / 35)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_fleiss_kappa_matches_textbook_formula_on_random_masks(seed):
    masks = random_masks(seed, n_seeds=3 + seed % 3, p=0.3 + 0.1 * seed)
    assert fleiss_kappa(masks) == pytest.approx(textbook_fleiss(masks), abs=1e-12)


def test_fleiss_kappa_degenerate_cases():
    assert math.isnan(fleiss_kappa(np.ones((5, 12))))  # all kept: P_e = 1, kappa is 0/0
    assert math.isnan(fleiss_kappa(np.zeros((5, 12, 12))))
    # Every component unanimous but both categories used: perfect agreement.
    assert fleiss_kappa(np.array([[1, 0, 1], [1, 0, 1]])) == pytest.approx(1.0)


# ---- Krippendorff's alpha ---------------------------------------------------------------------


def test_krippendorff_alpha_hand_example_and_coincidence_matrix():
    # 3 seeds x 4 components, kept counts 3, 2, 0, 1: pairable values n = 12 (6 kept),
    # disagreeing coincidences 2*2*1/2 + 2*1*2/2 = 4, alpha = 1 - 11 * 4 / (2 * 6 * 6) = 7/18
    # (Fleiss' kappa of the same masks: 1/3).
    masks = np.array([[1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 0, 0]])
    assert krippendorff_alpha(masks) == pytest.approx(7 / 18)
    for seed in range(6):
        masks = random_masks(seed, n_seeds=2 + seed, shape=(3 + seed, 4), p=0.2 + 0.1 * seed)
        assert krippendorff_alpha(masks) == pytest.approx(coincidence_alpha(masks), abs=1e-12)


def test_krippendorff_alpha_degenerate_cases_and_summary():
    assert math.isnan(krippendorff_alpha(np.ones((5, 12))))  # one value only: 0/0
    assert math.isnan(krippendorff_alpha(np.zeros((3, 12, 12))))
    assert krippendorff_alpha(np.array([[1, 0, 1], [1, 0, 1]])) == pytest.approx(1.0)
    mlps = random_masks(9, shape=(12,))
    summary = stability_summary(mlps)
    assert summary["krippendorff_alpha"] == pytest.approx(krippendorff_alpha(mlps))
    assert stability_summary(np.ones((5, 12)))["krippendorff_alpha"] is None


# ---- Cochran's Q ------------------------------------------------------------------------------


def test_cochrans_q_hand_example():
    # 3 seeds x 4 components: C = (3, 1, 2), N = 6, R = (3, 2, 1, 0), sum R^2 = 14,
    # Q = 2 (3*14 - 36) / (18 - 14) = 3; chi-square with 2 df: p = exp(-3/2).
    masks = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    res = cochrans_q(masks)
    assert res["statistic"] == pytest.approx(3.0)
    assert res["pvalue"] == pytest.approx(math.exp(-1.5))
    assert res["df"] == 2


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_cochrans_q_matches_formula_and_chi2_on_random_masks(seed):
    masks = random_masks(seed, n_seeds=2 + seed % 4)
    q, p = textbook_cochran(masks)
    res = cochrans_q(masks)
    assert res["statistic"] == pytest.approx(q, rel=1e-12)
    assert res["pvalue"] == pytest.approx(p, rel=1e-9)
    assert res["df"] == masks.shape[0] - 1


def test_cochrans_q_two_seeds_is_mcnemar():
    masks = random_masks(9, n_seeds=2)
    a, b = masks.reshape(2, -1)
    only_a, only_b = float(((a == 1) & (b == 0)).sum()), float(((a == 0) & (b == 1)).sum())
    mcnemar = (only_a - only_b) ** 2 / (only_a + only_b)
    assert cochrans_q(masks)["statistic"] == pytest.approx(mcnemar)


def test_cochrans_q_degenerate_all_components_unanimous():
    for masks in (np.zeros((5, 12)), np.ones((5, 12)), np.tile([1, 0, 1], (4, 1))):
        res = cochrans_q(masks)
        assert math.isnan(res["statistic"]) and math.isnan(res["pvalue"])
        assert res["df"] == masks.shape[0] - 1


def test_wnli_heads_reproduce_paper_kappa_and_rejection():
    """WNLI is the one task whose §5.1 statistics follow from PAPER.md alone: table §1.4 gives
    heads kept per seed 0, 0, 144, 0, 0 out of 144, which fixes every mask. Fleiss' kappa is
    -0.25 as in the paper (P_i = 12/20, P_e = 0.2^2 + 0.8^2), and Cochran's Q = 4 * 144 rejects.
    The other tasks' kappas and p-values (§5.1) need the authors' masks, which are not in this
    repository, so they are not tested here."""
    heads = np.zeros((5, 12, 12))
    heads[2] = 1
    assert fleiss_kappa(heads) == pytest.approx(-0.25)
    res = cochrans_q(heads)
    assert res["statistic"] == pytest.approx(576.0)
    assert res["pvalue"] < 1e-100
    assert super_survivors(heads).sum() == 0
    assert mean_pairwise_jaccard(heads) == 0.0  # 4 pairs empty vs all; 6 empty-empty left out
    mlps = np.zeros((5, 12))
    summary = stability_summary(mlps)
    assert summary["fleiss_kappa"] is None and summary["cochran_q_pvalue"] is None


# ---- overlap across tasks ---------------------------------------------------------------------


def test_overlap_matrix_matches_sets():
    tasks = {"mnli": random_masks(10, p=0.8), "rte": random_masks(11, p=0.8),
             "mrpc": random_masks(12, n_seeds=3, p=0.7)}
    names, mat = overlap_matrix(tasks)
    assert names == ["mnli", "rte", "mrpc"]
    supers = [set(np.flatnonzero(super_survivors(tasks[t]).reshape(-1)).tolist()) for t in names]
    for i, j in np.ndindex(3, 3):
        assert mat[i, j] == len(supers[i] & supers[j])
    assert mat[0, 0] == super_survivors(tasks["mnli"]).sum()
    assert np.issubdtype(mat.dtype, np.integer)


def test_overlap_matrix_bad_input():
    with pytest.raises(ValueError, match="task_masks"):
        overlap_matrix({})
    with pytest.raises(ValueError, match=r"task_masks\['mlp'\]"):
        overlap_matrix({"heads": random_masks(0), "mlp": random_masks(0, shape=(12,))})
    with pytest.raises(ValueError, match=r"task_masks\['rte'\].*at least 2 seeds"):
        overlap_matrix({"mnli": random_masks(0), "rte": random_masks(0, n_seeds=1)})


# ---- summary ----------------------------------------------------------------------------------


def test_stability_summary_values_and_json():
    masks = random_masks(13)
    s = stability_summary(masks)
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    n = masks.shape[0]
    q, p = textbook_cochran(masks)
    assert s["n_seeds"] == n and s["n_components"] == 144 and s["component_shape"] == [12, 12]
    assert s["survivors"] == [int(m.sum()) for m in masks]
    assert s["super_survivors"] == int(masks.min(axis=0).sum())
    assert s["never_kept"] == int((masks.max(axis=0) == 0).sum())
    assert s["kept_in_all_but_one"] == int((masks.sum(axis=0) >= n - 1).sum())
    assert s["mean_jaccard"] == pytest.approx(mean_pairwise_jaccard(masks))
    assert s["fleiss_kappa"] == pytest.approx(textbook_fleiss(masks))
    assert s["cochran_q_statistic"] == pytest.approx(q)
    assert s["cochran_q_pvalue"] == pytest.approx(p)
    assert s["cochran_q_df"] == n - 1


# ---- super-survivor controls ------------------------------------------------------------------


def pool_masks() -> np.ndarray:
    """5 seeds x 40 components: 0-7 kept everywhere (G = 8), 8-27 pruned everywhere (20),
    28-39 mixed (12)."""
    masks = np.zeros((5, 40))
    masks[:, :8] = 1
    for s in range(5):
        masks[s, 28 + s % 2 :: 2] = 1  # mixed: kept by seeds 0, 2, 4 or by seeds 1, 3
    return masks


def test_super_survivor_controls_sizes_and_pools():
    masks = pool_masks()
    good_set = set(range(8))
    bad_pool = set(np.flatnonzero(never_kept(masks)).tolist())
    mid_pool = set(range(40)) - good_set - bad_pool
    assert bad_pool == set(range(8, 28)) and mid_pool == set(range(28, 40))
    out = super_survivor_controls(masks, np.random.default_rng(0))
    for key in ("good", "bad", "random"):
        assert out[key].shape == (40,) and out[key].dtype == np.float64
        assert set(np.unique(out[key]).tolist()) <= {0.0, 1.0}
    assert set(np.flatnonzero(out["good"]).tolist()) == good_set
    bad, rand = (set(np.flatnonzero(out[k]).tolist()) for k in ("bad", "random"))
    assert len(bad) == len(rand) == 8
    assert bad <= bad_pool and rand <= mid_pool
    assert out["notes"] == []


def test_super_survivor_controls_reproducible_with_seeded_rng():
    masks = random_masks(14, p=0.75).reshape(5, 12, 12)
    a = super_survivor_controls(masks, np.random.default_rng(123))
    b = super_survivor_controls(masks, np.random.default_rng(123))
    c = super_survivor_controls(masks, np.random.default_rng(124))
    for key in ("good", "bad", "random"):
        np.testing.assert_array_equal(a[key], b[key])
        assert a[key].shape == (12, 12)
    assert not np.array_equal(a["random"], c["random"])  # C(many, G) draws: equal by chance ~0


def test_super_survivor_controls_small_pool_takes_whole_pool_and_notes_it():
    masks = np.zeros((3, 10))
    masks[:, :6] = 1  # G = 6
    masks[:, 6:8] = [[1, 0], [0, 1], [1, 1]]  # mixed: 2
    # components 8, 9 pruned everywhere: bad pool of 2
    out = super_survivor_controls(masks, np.random.default_rng(0))
    np.testing.assert_array_equal(out["bad"], [0] * 8 + [1, 1])
    np.testing.assert_array_equal(out["random"], [0] * 6 + [1, 1, 0, 0])
    assert len(out["notes"]) == 2
    assert "bad" in out["notes"][0] and "2 components" in out["notes"][0]
    assert "random" in out["notes"][1]
    empty = super_survivor_controls(np.zeros((5, 12)), np.random.default_rng(0))
    assert all(empty[k].sum() == 0 for k in ("good", "bad", "random"))
    assert "no super-survivors" in empty["notes"][0]


def test_super_survivor_controls_pool_boundaries():
    # G = 3; bad pool exactly G + 1 (resampled to G), random pool exactly G (taken, no note).
    masks = np.zeros((2, 10))
    masks[:, :3] = 1
    masks[:, 3:6] = [[1, 0, 1], [0, 1, 0]]
    out = super_survivor_controls(masks, np.random.default_rng(5))
    assert out["bad"].sum() == 3 and out["bad"][6:].sum() == 3
    np.testing.assert_array_equal(out["random"], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0])
    assert out["notes"] == []


def test_super_survivor_controls_rejects_non_generator_rng():
    with pytest.raises(ValueError, match="rng"):
        super_survivor_controls(random_masks(0), np.random.RandomState(0))
    with pytest.raises(ValueError, match="rng"):
        super_survivor_controls(random_masks(0), 0)


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "masks, match",
    [
        ([np.ones((12, 12)), np.ones((12, 11))], "different shapes"),
        ([[[1, 0], [1]], [[1, 0], [1]]], "ragged"),
        (np.ones((1, 12, 12)), "at least 2 seeds"),
        (np.ones(12), r"shape \(n_seeds, \*component_shape\)"),
        (np.full((3, 4), 2.0), "only 0 and 1"),
        (np.array([[0, 0.5], [1, 1]]), "only 0 and 1"),
        (np.array([[0, np.nan], [1, 1]]), "only 0 and 1"),
        (np.array([["1", "0"], ["0", "1"]]), "dtype"),
        (np.ones((3, 0)), "no components"),
    ],
)
@pytest.mark.parametrize(
    "fn", [super_survivors, never_kept, pairwise_jaccard, mean_pairwise_jaccard, fleiss_kappa,
           cochrans_q, stability_summary]
)
def test_bad_masks_raise_value_error_naming_masks(fn, masks, match):
    with pytest.raises(ValueError, match=match) as info:
        fn(masks)
    assert "masks" in str(info.value)


@pytest.mark.parametrize("k", [0, 6, 1.5, True, "2"])
def test_kept_in_at_least_rejects_bad_k(k):
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, n_seeds=5\]"):
        kept_in_at_least(random_masks(0), k)
