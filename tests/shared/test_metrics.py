"""Tests of shared.metrics against scikit-learn and MONAI on known inputs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance, compute_iou
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

from shared.metric_names import (
    OVERLAP_NAMES,
    dice_click_key,
    dice_click_name,
    first_click_name,
    metric_direction,
    metric_key,
)
from shared.metrics import (
    Overlap,
    _bootstrap_aucs,
    auc_with_ci,
    binary_metrics,
    classification_metrics_dict,
    dice,
    dice_vs_clicks,
    hd95_mm,
    lesion_volume_cm3,
    overlap_metrics,
    segmentation_metrics_dict,
    stratified_metrics_dict,
    stratify,
    volume_bin,
)


def _random_masks(seed: int, shape: tuple[int, ...] = (12, 14, 10)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, dtype=bool)
    gt[2:9, 3:11, 2:8] = True
    pred = np.roll(gt, shift=(1, 2, -1), axis=(0, 1, 2)) ^ (rng.random(shape) < 0.05)
    return pred, gt


def _monai_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    return float(metric(torch.from_numpy(pred[None, None]), torch.from_numpy(gt[None, None])).item())


def _monai_hd95(pred: np.ndarray, gt: np.ndarray, spacing: list[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI passes a deprecated argument to itself
        value = compute_hausdorff_distance(
            pred[None, None], gt[None, None], include_background=True, percentile=95, spacing=spacing
        )
    return float(value.item())


# ------------------------------------------------------------------------------------------- Dice
@pytest.mark.parametrize("seed", range(4))
def test_dice_agrees_with_monai(seed: int) -> None:
    pred, gt = _random_masks(seed)
    assert dice(pred, gt) == pytest.approx(_monai_dice(pred, gt), abs=1e-6)
    assert dice(torch.from_numpy(pred).float(), torch.from_numpy(gt)) == pytest.approx(dice(pred, gt))


def test_dice_of_empty_masks() -> None:
    empty = np.zeros((4, 4, 4), dtype=bool)
    full = np.ones_like(empty)
    assert dice(empty, empty) == 1.0 == _monai_dice(empty, empty)
    assert dice(empty, full) == 0.0
    assert dice(full, full) == 1.0


def test_overlap_metrics_on_a_hand_example() -> None:
    # |P| = 4, |G| = 6, |P∩G| = 3, |P∪G| = 7
    pred = np.zeros(10, dtype=bool)
    gt = np.zeros(10, dtype=bool)
    pred[[0, 1, 2, 9]] = True
    gt[[0, 1, 2, 3, 4, 5]] = True
    overlap = overlap_metrics(pred, gt)
    assert overlap == Overlap(dice=6 / 10, iou=3 / 7, precision=3 / 4, recall=3 / 6)
    assert overlap.named() == {"iou": 3 / 7, "seg_precision": 3 / 4, "seg_recall": 3 / 6}
    assert set(overlap.named(first_click_name)) == {"iou_1click", "seg_precision_1click", "seg_recall_1click"}
    assert {**overlap.named(first_click_name), **overlap.named()}.keys() == set(OVERLAP_NAMES)


@pytest.mark.parametrize("seed", range(3))
def test_overlap_metrics_agree_with_monai(seed: int) -> None:
    pred, gt = _random_masks(seed)
    overlap = overlap_metrics(pred, gt)
    iou = compute_iou(torch.from_numpy(pred[None, None]), torch.from_numpy(gt[None, None]))
    assert overlap.iou == pytest.approx(float(iou.item()), abs=1e-6)
    assert overlap.dice == pytest.approx(_monai_dice(pred, gt), abs=1e-6) and overlap.dice == dice(pred, gt)
    assert overlap.precision == pytest.approx(precision_score(gt.ravel(), pred.ravel()))
    assert overlap.recall == pytest.approx(recall_score(gt.ravel(), pred.ravel()))
    # Dice and IoU are one monotone function of each other: D = 2J / (1 + J)
    assert overlap.dice == pytest.approx(2 * overlap.iou / (1 + overlap.iou))


def test_overlap_metrics_of_empty_masks_follow_dice() -> None:
    empty = np.zeros((4, 4, 4), dtype=bool)
    full = np.ones_like(empty)
    assert overlap_metrics(empty, empty) == Overlap(1.0, 1.0, 1.0, 1.0)
    assert overlap_metrics(empty, full) == Overlap(0.0, 0.0, 0.0, 0.0)  # missed lesion
    assert overlap_metrics(full, empty) == Overlap(0.0, 0.0, 0.0, 0.0)  # lesion where there is none


def test_dice_refuses_probabilities_and_shape_mismatch() -> None:
    pred, gt = _random_masks(0)
    with pytest.raises(ValueError, match="pred: expected only values 0 and 1"):
        dice(pred * 0.5, gt)
    with pytest.raises(ValueError, match="differs from gt shape"):
        dice(pred[1:], gt)


# ------------------------------------------------------------------------------------------- HD95
@pytest.mark.parametrize(
    ("axis", "spacing", "expected_mm"),
    [
        (0, (2.0, 1.0, 1.0), 6.0),
        (0, (1.0, 2.0, 1.0), 3.0),
        (2, (2.0, 1.0, 0.5), 1.5),
        (1, (1.0, 0.2, 1.0), 0.6),
    ],
)
def test_hd95_of_plates_offset_along_one_axis(
    axis: int, spacing: tuple[float, ...], expected_mm: float
) -> None:
    """Two parallel one-voxel plates 3 voxels apart: every surface distance is 3 × that axis's spacing."""
    gt = np.zeros((12, 12, 12), dtype=bool)
    index = [slice(3, 9)] * 3
    index[axis] = slice(2, 3)
    gt[tuple(index)] = True
    pred = np.roll(gt, 3, axis=axis)
    assert hd95_mm(pred, gt, spacing) == pytest.approx(expected_mm, abs=1e-5)
    assert hd95_mm(gt, pred, spacing) == pytest.approx(expected_mm, abs=1e-5)


def test_hd95_emits_no_warning() -> None:
    pred, gt = _random_masks(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hd95_mm(pred, gt, (1.0, 1.0, 1.0))


@pytest.mark.parametrize("seed", range(3))
def test_hd95_agrees_with_monai_with_anisotropic_spacing(seed: int) -> None:
    pred, gt = _random_masks(seed)
    spacing = [0.476, 0.2, 0.073]
    expected = _monai_hd95(pred, gt, spacing)
    assert expected > 0
    assert hd95_mm(pred, gt, spacing) == pytest.approx(expected, abs=1e-5)
    assert hd95_mm(torch.from_numpy(pred), torch.from_numpy(gt), tuple(spacing)) == pytest.approx(
        expected, abs=1e-5
    )


def test_hd95_of_empty_masks() -> None:
    _, gt = _random_masks(0)
    empty = np.zeros_like(gt)
    assert math.isnan(hd95_mm(empty, gt, (1.0, 1.0, 1.0)))  # empty prediction: undefined, not a penalty
    assert math.isnan(hd95_mm(gt, empty, (1.0, 1.0, 1.0)))
    assert hd95_mm(empty, empty, (1.0, 1.0, 1.0)) == 0.0
    assert hd95_mm(gt, gt, (1.0, 1.0, 1.0)) == 0.0


def test_hd95_refuses_bad_spacing() -> None:
    pred, gt = _random_masks(0)
    with pytest.raises(ValueError, match="must hold 3 positive values"):
        hd95_mm(pred, gt, (1.0, 1.0))
    with pytest.raises(ValueError, match="must hold 3 positive values"):
        hd95_mm(pred, gt, (1.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------------- volume
def test_lesion_volume_cm3() -> None:
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[0:10, 0:10, 0:10] = 1  # 1000 voxels of 2 × 1 × 0.5 = 1 mm³
    assert lesion_volume_cm3(mask, (2.0, 1.0, 0.5)) == pytest.approx(1.0)
    assert lesion_volume_cm3(np.zeros_like(mask), (1.0, 1.0, 1.0)) == 0.0


@pytest.mark.parametrize(
    ("volume", "label"),
    [
        (0.0, "0-5"),
        (4.999, "0-5"),
        (5.0, "5-20"),
        (19.999, "5-20"),
        (20.0, "20-100"),
        (100.0, "20-100"),
        (100.03, "20-100"),  # seed 000's largest lesion is counted in 20-100
    ],
)
def test_volume_bin_edges(volume: float, label: str) -> None:
    assert volume_bin(volume) == label


@pytest.mark.parametrize("volume", [-0.1, math.nan, math.inf])
def test_volume_bin_refuses_impossible_volumes(volume: float) -> None:
    with pytest.raises(ValueError, match="finite value >= 0"):
        volume_bin(volume)


# ------------------------------------------------------------------------------------------- stratification
_RECORDS = [
    {"birads": "4C", "volume_cm3": 3.0, "dice": 0.8, "hd95_mm": 10.0},
    {"birads": "3", "volume_cm3": 25.0, "dice": 0.6, "hd95_mm": 30.0},
    {"birads": "4C", "volume_cm3": 7.0, "dice": 0.6, "hd95_mm": math.nan},
    {"birads": "4A", "volume_cm3": 4.0, "dice": 0.7, "hd95_mm": 20.0},
    {"birads": "4C", "volume_cm3": 12.0, "dice": 0.4, "hd95_mm": 40.0},
    {"birads": None, "volume_cm3": 1.0, "dice": 0.9, "hd95_mm": 5.0},
]


def test_stratify_by_birads() -> None:
    strata = stratify(_RECORDS, "birads")
    assert list(strata) == ["3", "4A", "4C", "unknown"]
    dice_4c = strata["4C"]["dice"]
    assert dice_4c.mean == pytest.approx(0.6)
    assert dice_4c.std == pytest.approx(np.std([0.8, 0.6, 0.4], ddof=1))
    assert (dice_4c.count, dice_4c.n_undefined) == (3, 0)
    hd_4c = strata["4C"]["hd95_mm"]
    assert (hd_4c.mean, hd_4c.count, hd_4c.n_undefined) == (25.0, 2, 1)
    assert math.isnan(strata["3"]["dice"].std)  # one case: no ± in seed 000's tables


def test_stratify_by_volume_bin_in_bin_order() -> None:
    strata = stratify(_RECORDS, lambda record: volume_bin(record["volume_cm3"]), metrics=["dice"])
    assert list(strata) == ["0-5", "5-20", "20-100"]
    assert [strata[group]["dice"].count for group in strata] == [3, 2, 1]
    assert strata["0-5"]["dice"].mean == pytest.approx(0.8)


def test_stratify_names_missing_fields() -> None:
    with pytest.raises(KeyError, match="record 0 has no key 'site'"):
        stratify(_RECORDS, "site")
    with pytest.raises(KeyError, match="no metric 'hd95_mm'"):
        stratify([{"birads": "3", "dice": 0.5}], "birads")


def test_dice_vs_clicks_carries_last_value_forward() -> None:
    curve = dice_vs_clicks([[0.2, 0.4, 0.6], [0.5, 1.0], [0.3, 0.5, 0.7]])
    assert curve.tolist() == pytest.approx(
        [(0.2 + 0.5 + 0.3) / 3, (0.4 + 1.0 + 0.5) / 3, (0.6 + 1.0 + 0.7) / 3]
    )
    with pytest.raises(ValueError, match="at least one case"):
        dice_vs_clicks([])


# ------------------------------------------------------------------------------------------- AUC
def _classifier_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = np.arange(n) % 2
    y_score = np.round(1 / (1 + np.exp(-(1.2 * (2 * y_true - 1) + rng.normal(size=n)))), 2)  # with ties
    return y_true, y_score


@pytest.mark.parametrize("seed", range(3))
def test_auc_agrees_with_sklearn_and_ci_contains_it(seed: int) -> None:
    y_true, y_score = _classifier_scores(60, seed)
    result = auc_with_ci(y_true, y_score, n_boot=500, seed=seed)
    assert result.auc == pytest.approx(roc_auc_score(y_true, y_score), abs=1e-12)
    assert result.ci_low < result.auc < result.ci_high
    assert result.undefined_reason == ""
    again = auc_with_ci(torch.from_numpy(y_true), torch.from_numpy(y_score), n_boot=500, seed=seed)
    assert again == result


def test_bootstrap_resample_aucs_equal_sklearn_on_each_resample() -> None:
    y_true, y_score = _classifier_scores(30, 0)
    pos, neg = y_score[y_true == 1], y_score[y_true == 0]
    aucs = _bootstrap_aucs(pos, neg, 5, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    boot_pos = pos[rng.integers(0, pos.size, size=(5, pos.size))]
    boot_neg = neg[rng.integers(0, neg.size, size=(5, neg.size))]
    for b in range(5):
        scores = np.concatenate([boot_pos[b], boot_neg[b]])
        labels = np.r_[np.ones(pos.size), np.zeros(neg.size)]
        assert aucs[b] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_ci_narrows_with_more_samples() -> None:
    small = auc_with_ci(*_classifier_scores(40, 1), n_boot=400, seed=0)
    large = auc_with_ci(*_classifier_scores(640, 1), n_boot=400, seed=0)
    assert (large.ci_high - large.ci_low) < 0.5 * (small.ci_high - small.ci_low)


def test_auc_ci_is_deterministic_per_seed() -> None:
    y_true, y_score = _classifier_scores(50, 2)
    assert auc_with_ci(y_true, y_score, n_boot=300, seed=5) == auc_with_ci(
        y_true, y_score, n_boot=300, seed=5
    )
    assert auc_with_ci(y_true, y_score, n_boot=300, seed=5) != auc_with_ci(
        y_true, y_score, n_boot=300, seed=6
    )


def test_auc_of_one_class_is_nan_with_a_reason() -> None:
    result = auc_with_ci([0, 0, 0], [0.1, 0.4, 0.8])
    assert math.isnan(result.auc) and math.isnan(result.ci_low) and math.isnan(result.ci_high)
    assert "only one class" in result.undefined_reason and "benign" in result.undefined_reason


def test_auc_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="y_score shape"):
        auc_with_ci([0, 1], [0.5])
    with pytest.raises(ValueError, match="NaN"):
        auc_with_ci([0, 1], [0.5, math.nan])
    with pytest.raises(ValueError, match="y_true: expected only values 0 and 1"):
        auc_with_ci([0, 2], [0.5, 0.6])


# ------------------------------------------------------------------------------------------- binary metrics
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_binary_metrics_agree_with_sklearn(threshold: float) -> None:
    y_true, y_score = _classifier_scores(80, 4)
    result = binary_metrics(y_true, y_score, threshold)
    y_pred = (y_score > threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    assert (result.tp, result.fp, result.tn, result.fn) == (tp, fp, tn, fn)
    assert result.sensitivity == pytest.approx(tp / (tp + fn))
    assert result.specificity == pytest.approx(tn / (tn + fp))
    assert result.ppv == pytest.approx(tp / (tp + fp))
    assert result.npv == pytest.approx(tn / (tn + fn))
    assert result.accuracy == pytest.approx((tp + tn) / 80)
    assert result.f1 == pytest.approx(f1_score(y_true, y_pred))


def test_binary_metrics_threshold_is_strict_and_undefined_is_nan() -> None:
    result = binary_metrics([0, 0, 0], [0.5, 0.2, 0.9])  # 0.5 is not above the threshold
    assert (result.tp, result.fp, result.tn, result.fn) == (0, 1, 2, 0)
    assert math.isnan(result.sensitivity) and math.isnan(result.npv) is False
    assert result.ppv == 0.0 and result.npv == 1.0 and result.specificity == pytest.approx(2 / 3)
    assert result.f1 == 0.0
    none_predicted = binary_metrics([0, 0], [0.1, 0.2])
    assert math.isnan(none_predicted.ppv) and math.isnan(none_predicted.f1)


# ------------------------------------------------------------------------------------------- names
def test_metric_names() -> None:
    assert metric_key("auc") == "test/auc"
    assert dice_click_key(5) == "test/dice_5click"
    assert dice_click_key(1, split="val") == "val/dice_1click"
    with pytest.raises(ValueError, match="split"):
        metric_key("auc", split="te/st")
    with pytest.raises(ValueError, match="n_clicks"):
        dice_click_key(0)
    assert first_click_name("iou") == "iou_1click" and first_click_name("dice") == dice_click_name(1)
    for name in ("iou", "seg_precision_1click", "seg_recall", "iou_1click"):
        assert metric_direction(f"val/{name}") == "higher"
        assert metric_direction(f"global/test/{name}_mean") == "higher"
    assert metric_direction("test/iou_1click_ci_low") is None


def test_segmentation_metrics_dict() -> None:
    overlaps = {"iou_1click": [0.2, 0.4], "iou": [0.5, 0.9]}
    out = segmentation_metrics_dict([[0.5, 0.7], [0.3, 0.9]], [10.0, math.nan], overlaps=overlaps)
    assert out == {
        "test/iou_1click": pytest.approx(0.3),
        "test/iou": pytest.approx(0.7),
        "test/dice_1click": pytest.approx(0.4),
        "test/dice_2click": pytest.approx(0.8),
        "test/dice": pytest.approx(0.8),
        "test/hd95_mm": 10.0,
        "test/hd95_undefined": 1.0,
        "test/n_cases_seg": 2.0,
    }
    with pytest.raises(ValueError, match="overlap"):
        segmentation_metrics_dict([[0.5]], [1.0], overlaps={"iou": [0.5, 0.6]})


def test_classification_and_stratified_dicts() -> None:
    y_true, y_score = _classifier_scores(20, 0)
    out = classification_metrics_dict(
        auc_with_ci(y_true, y_score, n_boot=50), binary_metrics(y_true, y_score), suffix="_gt_planes"
    )
    assert set(out) == {
        f"test/{name}_gt_planes"
        for name in ("auc", "auc_ci_low", "auc_ci_high", "sensitivity", "specificity", "ppv", "npv")
        + ("accuracy", "f1", "n_cases_cls")
    }
    assert out["test/auc_gt_planes"] == pytest.approx(roc_auc_score(y_true, y_score))
    flat = stratified_metrics_dict(stratify(_RECORDS, "birads", metrics=["dice"]), by="birads")
    assert flat["test/birads/4C/dice_mean"] == pytest.approx(0.6)
    assert flat["test/birads/4C/dice_count"] == 3.0
    assert "test/birads/unknown/dice_std" in flat
