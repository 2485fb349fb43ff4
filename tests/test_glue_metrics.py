"""GLUE metrics (plain numpy) against scikit-learn and scipy on random predictions."""

import numpy as np
import pytest

from sparsebert.glue import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 500))
    labels = rng.integers(0, 2, n)
    predictions = np.where(rng.random(n) < 0.7, labels, rng.integers(0, 2, n))
    assert metrics.accuracy(predictions, labels) == pytest.approx(
        sklearn_metrics.accuracy_score(labels, predictions), abs=1e-12)
    assert metrics.f1(predictions, labels) == pytest.approx(
        sklearn_metrics.f1_score(labels, predictions), abs=1e-12)
    assert metrics.matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(labels, predictions), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_mcc_matches_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    labels, predictions = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    assert metrics.matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(labels, predictions), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    labels = rng.uniform(0, 5, 200)
    predictions = labels + rng.normal(0, 1.5, 200)
    assert metrics.pearson(predictions, labels) == pytest.approx(
        stats.pearsonr(predictions, labels)[0], abs=1e-10)
    assert metrics.spearman(predictions, labels) == pytest.approx(
        stats.spearmanr(predictions, labels)[0], abs=1e-10)


def test_spearman_with_ties_matches_scipy():
    rng = np.random.default_rng(7)
    labels = np.round(rng.uniform(0, 5, 300) * 5) / 5  # STS-B-like scores: many ties
    predictions = np.round(labels + rng.normal(0, 1, 300))
    assert metrics.spearman(predictions, labels) == pytest.approx(
        stats.spearmanr(predictions, labels)[0], abs=1e-10)
    assert np.allclose(metrics.rankdata(labels), stats.rankdata(labels))


def test_degenerate_inputs_give_zero():
    assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0
    assert metrics.f1([0, 0], [0, 0]) == 0.0
    assert metrics.pearson([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]) == 0.0
    # A constant whose mean rounds (0.1 * 7 / 7 != 0.1) is still exactly 0, not -1.7e-16.
    assert metrics.pearson([0.1] * 7, [1, 2, 3, 4, 5, 6, 8]) == 0.0


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e-310])
def test_pearson_of_huge_and_tiny_values(scale):
    """The sums of squares of values near the float64 range's ends neither overflow nor
    underflow: a perfect correlation stays 1, as scipy computes it."""
    labels = [1.0, 2.0, 3.0, 5.0]
    predictions = [value * scale for value in labels]
    assert metrics.pearson(predictions, labels) == pytest.approx(1.0, abs=1e-12)
    assert metrics.pearson(labels, [-p for p in predictions]) == pytest.approx(-1.0, abs=1e-12)
    # A diverged regression run (nan or inf scores): every correlation is 0, not nan, and not
    # the row order's correlation with the labels (nan != nan gave each nan its own rank).
    labels = [0.0, 1.0, 2.0, 3.0, 4.0]
    for bad in ([float("nan")] * 5, [0.5, float("inf"), 1.0, 2.0, 3.0]):
        assert metrics.compute_metrics("STS-B", bad, labels) == {
            "pearson": 0.0, "spearman": 0.0, "corr": 0.0}
    with pytest.raises(ValueError, match="differ in length"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy([], [])


def test_compute_metrics_per_task():
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 2, 100), rng.integers(0, 2, 100)
    assert set(metrics.compute_metrics("MRPC", predictions, labels)) == {"acc", "f1"}
    cola = metrics.compute_metrics("cola", predictions, labels)
    assert metrics.threshold_score("CoLA", cola) == cola["mcc"]
    scores = rng.uniform(0, 5, 100)
    stsb = metrics.compute_metrics("STS-B", scores + rng.normal(0, 1, 100), scores)
    assert stsb["corr"] == pytest.approx((stsb["pearson"] + stsb["spearman"]) / 2)
    assert metrics.threshold_score("sts-b", stsb) == stsb["corr"]


def test_mrpc_qqp_f1_is_the_positive_class_f1_by_hand():
    """TP 2, FP 1, FN 1: F1 of class 1 = 4 / 6 (class 0's would be 0.5); accuracy 3 / 5."""
    predictions, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    for task in ("MRPC", "QQP"):
        out = metrics.compute_metrics(task, predictions, labels)
        assert out["f1"] == pytest.approx(2 / 3) and out["acc"] == pytest.approx(3 / 5)


def test_mcc_with_constant_labels_is_zero_not_nan():
    """sklearn's convention: 0 whenever either marginal is constant (here the labels)."""
    assert metrics.matthews_corrcoef([0, 1, 1], [1, 1, 1]) == 0.0


def test_correlations_with_constant_labels_are_zero_not_nan():
    """STS-B labels can be constant (a one-score dev subset): pearson, spearman and corr are 0,
    as for constant predictions, not the nan of a 0 / 0 (which would also fail every threshold
    comparison). A constant whose mean rounds (0.1 * 7 / 7 != 0.1) counts as constant too."""
    predictions = [0.1, 0.5, 0.9, 0.2, 0.7, 0.3, 0.4]
    for labels in ([2.0] * 7, [0.1] * 7):
        assert metrics.pearson(predictions, labels) == 0.0
        assert metrics.spearman(predictions, labels) == 0.0
        assert metrics.compute_metrics("STS-B", predictions, labels) == {
            "pearson": 0.0, "spearman": 0.0, "corr": 0.0}
