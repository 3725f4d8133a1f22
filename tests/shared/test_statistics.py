"""Tests of shared.statistics against hand examples, independent O(n²) DeLong, scikit-learn and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import brier_score_loss, roc_auc_score

from shared.calibration import brier_score, calibration_curve, expected_calibration_error
from shared.metric_names import (
    ACCURACY,
    AUC,
    BRIER,
    DICE,
    ECE,
    F1,
    HD95_MM,
    NPV,
    PPV,
    SENSITIVITY,
    SPECIFICITY,
)
from shared.metrics import binary_metrics
from shared.statistics import (
    Estimate,
    bootstrap_ci,
    classification_estimates,
    delong_auc,
    delong_test,
    paired_bootstrap,
    segmentation_estimates,
)


# ----------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_of_the_mean_covers_the_true_mean_about_95_percent() -> None:
    rng = np.random.default_rng(123)
    covered = 0
    for repetition in range(300):
        sample = rng.normal(loc=2.0, scale=1.5, size=60)
        estimate = bootstrap_ci(sample, n_boot=400, seed=repetition)
        covered += estimate.ci_low <= 2.0 <= estimate.ci_high
    assert 0.90 <= covered / 300 <= 0.99


def test_bootstrap_ci_is_deterministic_per_seed_and_brackets_the_value() -> None:
    values = np.random.default_rng(0).uniform(size=40)
    first, again = bootstrap_ci(values, seed=7), bootstrap_ci(values, seed=7)
    assert first == again
    assert bootstrap_ci(values, seed=8) != first
    assert first.value == pytest.approx(values.mean())
    assert first.ci_low < first.value < first.ci_high
    assert first.n == 40 and "bootstrap" in first.method


def test_bootstrap_ci_fast_path_matches_a_generic_statistic() -> None:
    values = np.random.default_rng(1).normal(size=30)
    fast = bootstrap_ci(values, np.mean, n_boot=300, seed=3)
    generic = bootstrap_ci(values, lambda v: float(np.mean(v)), n_boot=300, seed=3)
    assert (fast.ci_low, fast.ci_high) == pytest.approx((generic.ci_low, generic.ci_high))


def test_bootstrap_ci_resamples_rows_of_a_two_dimensional_array() -> None:
    rng = np.random.default_rng(2)
    pairs = np.column_stack([rng.uniform(1, 2, 50), rng.uniform(2, 4, 50)])
    ratio = bootstrap_ci(pairs, lambda v: v[:, 0].sum() / v[:, 1].sum(), n_boot=300)
    assert ratio.value == pytest.approx(pairs[:, 0].sum() / pairs[:, 1].sum())
    assert ratio.ci_low < ratio.value < ratio.ci_high


def test_bootstrap_ci_leaves_nan_values_to_the_statistic_and_notes_undefined_results() -> None:
    values = np.array([1.0, np.nan, 3.0, 5.0])
    assert bootstrap_ci(values, n_boot=200).value == pytest.approx(3.0)
    all_nan = bootstrap_ci(np.full(5, np.nan), n_boot=50)
    assert math.isnan(all_nan.value) and math.isnan(all_nan.ci_low) and all_nan.note
    sparse = bootstrap_ci(np.array([np.nan] * 5 + [1.0]), n_boot=200)
    assert sparse.value == 1.0 and "resamples undefined" in sparse.note


def test_stratified_bootstrap_keeps_stratum_sizes() -> None:
    labels = np.array([1] * 3 + [0] * 17)
    estimate = bootstrap_ci(labels, np.mean, n_boot=100, strata=labels)
    assert estimate.ci_low == estimate.ci_high == pytest.approx(0.15)
    assert estimate.method.startswith("stratified")


def test_paired_bootstrap_detects_a_real_shift_but_not_a_null_one() -> None:
    rng = np.random.default_rng(4)
    a = rng.uniform(0.5, 0.9, size=40)
    shifted = paired_bootstrap(a, a - 0.05 + rng.normal(0, 0.02, 40), n_boot=1000, seed=0)
    assert shifted.diff == pytest.approx(0.05, abs=0.01)
    assert shifted.ci_low > 0 and shifted.p_value == pytest.approx(2 / 1001)
    noise = rng.normal(0, 0.05, 40)
    null = paired_bootstrap(a, a + noise - noise.mean(), n_boot=1000, seed=0)
    assert null.diff == pytest.approx(0.0, abs=1e-12)
    assert null.ci_low < 0 < null.ci_high and null.p_value > 0.5


def test_paired_bootstrap_is_deterministic_and_antisymmetric() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=25), rng.normal(size=25)
    ab, ba = paired_bootstrap(a, b, n_boot=500, seed=1), paired_bootstrap(b, a, n_boot=500, seed=1)
    assert ab == paired_bootstrap(a, b, n_boot=500, seed=1)
    assert ab.diff == pytest.approx(-ba.diff) and ab.p_value == pytest.approx(ba.p_value)
    assert (ab.ci_low, ab.ci_high) == pytest.approx((-ba.ci_high, -ba.ci_low))
    with pytest.raises(ValueError, match="pair them"):
        paired_bootstrap(a, b[:-1])


# ------------------------------------------------------------------------------------------------- DeLong
def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _delong_by_definition(labels: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and DeLong covariance straight from DeLong et al. (1988), O(n_pos n_neg) per score."""
    v10, v01 = [], []
    for score in scores:
        pos, neg = score[labels == 1], score[labels == 0]
        kernel = np.array([[_psi(x, y) for y in neg] for x in pos])
        v10.append(kernel.mean(axis=1))
        v01.append(kernel.mean(axis=0))
    v10_arr, v01_arr = np.array(v10), np.array(v01)
    cov = np.cov(v10_arr) / v10_arr.shape[1] + np.cov(v01_arr) / v01_arr.shape[1]
    return v10_arr.mean(axis=1), np.atleast_2d(cov)


LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1])
SCORE_A = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.4, 0.1, 0.6, 0.2, 0.55, 0.5, 0.4])  # ties across classes
SCORE_B = np.array([0.6, 0.9, 0.3, 0.5, 0.4, 0.2, 0.35, 0.7, 0.1, 0.8, 0.45, 0.3])


@pytest.mark.parametrize("score", [SCORE_A, SCORE_B], ids=["a", "b"])
def test_delong_auc_matches_sklearn_and_the_quadratic_definition(score: np.ndarray) -> None:
    aucs, cov = _delong_by_definition(LABELS, [score])
    estimate = delong_auc(LABELS, score)
    assert estimate.value == pytest.approx(roc_auc_score(LABELS, score))
    assert estimate.value == pytest.approx(aucs[0])
    half = norm.ppf(0.975) * math.sqrt(cov[0, 0])
    expected = (max(0.0, aucs[0] - half), min(1.0, aucs[0] + half))
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx(expected)
    assert estimate.n == LABELS.size


def test_delong_auc_on_a_hand_example() -> None:
    # positives 0.8, 0.6; negatives 0.7, 0.2: three of four pairs ordered, AUC 3/4.
    # V10 = (1, 1/2), V01 = (1/2, 1): var = 1/8 / 2 + 1/8 / 2 = 1/8.
    estimate = delong_auc([1, 1, 0, 0], [0.8, 0.6, 0.7, 0.2], alpha=0.5)
    half = norm.ppf(0.75) * math.sqrt(1 / 8)
    assert estimate.value == 0.75
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx((0.75 - half, min(1.0, 0.75 + half)))


def test_delong_auc_is_nan_with_a_note_when_undefined() -> None:
    one_class = delong_auc([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(one_class.value) and "one class" in one_class.note
    single_positive = delong_auc([1, 0, 0], [0.9, 0.2, 0.3])
    assert single_positive.value == 1.0 and math.isnan(single_positive.ci_low) and single_positive.note


def test_delong_test_matches_the_quadratic_definition() -> None:
    aucs, cov = _delong_by_definition(LABELS, [SCORE_A, SCORE_B])
    diff = aucs[0] - aucs[1]
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    result = delong_test(LABELS, SCORE_A, SCORE_B)
    assert result.diff == pytest.approx(roc_auc_score(LABELS, SCORE_A) - roc_auc_score(LABELS, SCORE_B))
    assert result.p_value == pytest.approx(2 * norm.sf(abs(diff) / se))
    assert (result.ci_low, result.ci_high) == pytest.approx((diff - 1.959964 * se, diff + 1.959964 * se))


def test_delong_test_is_symmetric_and_one_for_identical_scores() -> None:
    ab, ba = delong_test(LABELS, SCORE_A, SCORE_B), delong_test(LABELS, SCORE_B, SCORE_A)
    assert ab.diff == pytest.approx(-ba.diff) and ab.p_value == pytest.approx(ba.p_value)
    same = delong_test(LABELS, SCORE_A, SCORE_A)
    assert same.diff == 0 and same.p_value == pytest.approx(1.0)
    # a monotone transform keeps the ranks, hence the AUC components
    assert delong_test(LABELS, SCORE_A, SCORE_A**2).p_value == pytest.approx(1.0)


def test_delong_test_detects_a_much_better_model() -> None:
    rng = np.random.default_rng(6)
    labels = np.repeat([0, 1], 60)
    good = labels + rng.normal(0, 0.5, labels.size)
    poor = labels + rng.normal(0, 3.0, labels.size)
    result = delong_test(labels, good, poor)
    assert result.diff > 0.1 and result.p_value < 0.01 and result.ci_low > 0


def test_an_estimate_outside_its_percentile_interval_is_explained_in_the_note() -> None:
    # Binned ECE grows on resamples (duplicated cases sharpen the bins), so with 24 cases its percentile
    # interval can lie wholly above the estimate; the note must say so, and a mean never gets the note.
    rng = np.random.default_rng(20)
    labels = rng.integers(0, 2, 24)
    prob = np.clip(0.5 + (labels - 0.5) * 0.4 + rng.normal(0, 0.2, 24), 0, 1)
    estimates = classification_estimates(labels, prob, n_boot=200)
    ece = estimates[ECE]
    assert ece.value < ece.ci_low and "lies below its percentile interval" in ece.note
    assert "biased on resamples" in ece.note
    for name in (BRIER, ACCURACY):
        inside = estimates[name]
        assert inside.ci_low <= inside.value <= inside.ci_high and "biased" not in inside.note
    mean = bootstrap_ci(prob, np.mean, n_boot=200)
    assert mean.ci_low <= mean.value <= mean.ci_high and mean.note == ""


# -------------------------------------------------------------------------------------------- calibration
def test_brier_score_on_a_hand_example_and_against_sklearn() -> None:
    y, p = [0, 1, 1, 1], [0.1, 0.2, 0.8, 0.9]
    assert brier_score(y, p) == pytest.approx((0.01 + 0.64 + 0.04 + 0.01) / 4)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p))
    with pytest.raises(ValueError, match="probabilities"):
        brier_score([0, 1], [-0.5, 2.0])


def test_ece_is_zero_for_perfectly_calibrated_bins() -> None:
    prob = [0.25] * 4 + [0.5] * 2 + [0.75] * 4 + [1.0] * 3
    y = [1, 0, 0, 0] + [1, 0] + [1, 1, 1, 0] + [1, 1, 1]
    assert expected_calibration_error(y, prob) == pytest.approx(0.0, abs=1e-12)


def test_ece_and_calibration_curve_on_a_hand_example() -> None:
    y, prob = [0, 1, 1, 1, 0], [0.1, 0.2, 0.8, 0.9, 0.95]
    # two bins: [0, 0.5) mean prob 0.15, fraction 1/2; [0.5, 1] mean 2.65/3, fraction 2/3
    expected = 2 / 5 * abs(0.15 - 0.5) + 3 / 5 * abs(2.65 / 3 - 2 / 3)
    assert expected_calibration_error(y, prob, n_bins=2) == pytest.approx(expected)
    curve = calibration_curve(y, prob, n_bins=10)  # bins 1, 2, 8, 9 occupied, others skipped
    assert curve.bin_index.tolist() == [1, 2, 8, 9]
    assert curve.count.tolist() == [1, 1, 1, 2]
    assert curve.mean_predicted == pytest.approx([0.1, 0.2, 0.8, 0.925])
    assert curve.observed_fraction == pytest.approx([0.0, 1.0, 1.0, 0.5])


# --------------------------------------------------------------------------------------- per-split tables
def test_classification_estimates_uses_metric_names_and_agrees_with_binary_metrics() -> None:
    rng = np.random.default_rng(8)
    y = np.repeat([0, 1], 30)
    prob = np.clip(0.5 * y + rng.uniform(0, 0.5, y.size) + 0.1 * rng.normal(size=y.size), 0, 1)
    table = classification_estimates(y, prob, n_boot=300, seed=1)
    assert set(table) == {AUC, SENSITIVITY, SPECIFICITY, PPV, NPV, F1, ACCURACY, BRIER, ECE}
    point = binary_metrics(y, prob)
    for name in (SENSITIVITY, SPECIFICITY, PPV, NPV, F1, ACCURACY):
        assert table[name].value == pytest.approx(getattr(point, name))
        assert table[name].ci_low <= table[name].value <= table[name].ci_high
    assert table[AUC].value == pytest.approx(roc_auc_score(y, prob)) and "DeLong" in table[AUC].method
    assert table[BRIER].value == pytest.approx(brier_score(y, prob))
    assert table[ECE].value == pytest.approx(expected_calibration_error(y, prob))
    assert table == classification_estimates(y, prob, n_boot=300, seed=1)


def test_classification_estimates_with_one_class_gives_nan_with_notes() -> None:
    table = classification_estimates([0, 0, 0, 0, 0], [0.1, 0.7, 0.2, 0.3, 0.4], n_boot=100)
    assert math.isnan(table[AUC].value) and "one class" in table[AUC].note
    assert math.isnan(table[SENSITIVITY].value) and "no malignant" in table[SENSITIVITY].note
    assert table[SPECIFICITY].value == pytest.approx(0.8)
    assert isinstance(table[BRIER], Estimate) and math.isfinite(table[BRIER].ci_high)


def test_segmentation_estimates_pads_curves_and_skips_undefined_hd95() -> None:
    curves = [[0.5, 0.7, 0.8], [0.6, 0.9], [0.4]]
    hd95 = [4.0, float("nan"), 8.0]
    table = segmentation_estimates(curves, hd95, n_boot=200)
    assert set(table) == {"dice_1click", "dice_2click", "dice_3click", DICE, HD95_MM}
    assert table["dice_1click"].value == pytest.approx(0.5)
    assert table["dice_2click"].value == pytest.approx((0.7 + 0.9 + 0.4) / 3)
    assert table["dice_3click"].value == pytest.approx((0.8 + 0.9 + 0.4) / 3)
    assert table[DICE] == table["dice_3click"]
    assert table[HD95_MM].value == pytest.approx(6.0) and "1 of 3" in table[HD95_MM].note
    with pytest.raises(ValueError, match="one per case"):
        segmentation_estimates(curves, [1.0], n_boot=10)


def test_segmentation_estimates_of_overlaps_share_the_resamples() -> None:
    curves = [[0.5], [0.6], [0.4], [0.9]]
    overlaps = {"iou_1click": [0.3, 0.4, 0.2, 0.8], "seg_recall": [0.6, 0.7, 0.5, 1.0]}
    table = segmentation_estimates(curves, [4.0, 5.0, 6.0, 7.0], overlaps=overlaps, n_boot=300, seed=3)
    assert table["iou_1click"].value == pytest.approx(0.425) and table["seg_recall"].value == pytest.approx(
        0.7
    )
    assert table["iou_1click"].ci_low < 0.425 < table["iou_1click"].ci_high
    # seg_recall = iou_1click + 0.3 case by case, so the same resamples give bounds shifted by 0.3
    assert table["seg_recall"].ci_low == pytest.approx(table["iou_1click"].ci_low + 0.3)
    with pytest.raises(ValueError, match="iou"):
        segmentation_estimates(curves, [4.0] * 4, overlaps={"iou": [0.5]}, n_boot=10)
