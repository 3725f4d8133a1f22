"""The metrics of fedabus: segmentation and classification values, and the flat dicts they are logged as.

Just over 500 lines on purpose: the one metrics module (an engineering rule); names and directions live in
:mod:`shared.metric_names`, statistics in :mod:`shared.statistics`.

Segmentation (seed 000): Dice, the voxel overlap (Jaccard/IoU, precision, recall), HD95 in millimetres (MONAI, with the voxel spacing), lesion volume in cm³, the
volume bins 0–5, 5–20 and 20–100 cm³, per-group summaries (BI-RADS category or volume bin, Tables 4–5) and the
Dice-vs-clicks curve. Classification (seed 003): ROC AUC with a 95% confidence interval, sensitivity,
specificity, PPV, NPV, accuracy and F1 at a threshold.

Masks are binary arrays of one volume in array order ``(z, y, x) = (D, H, W)``; spacings are in millimetres in
the same order. Functions accept numpy arrays or torch tensors (converted to numpy at the boundary) and return
plain Python floats, so their results go straight into JSON, MLflow and Flower ``MetricRecord`` s.

Metric names: the ``*_metrics_dict`` functions return flat keys ``"{split}/{name}"`` such as
``test/dice_1click``, ``test/hd95_mm`` or ``test/auc``, built by :mod:`shared.metric_names`, which also declares
whether each metric is better high or low (:func:`shared.metric_names.metric_direction`).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from shared.metric_names import (
    ACCURACY,
    AUC,
    AUC_CI_HIGH,
    AUC_CI_LOW,
    DICE,
    F1,
    HD95_MM,
    HD95_UNDEFINED,
    IOU,
    N_CASES_CLS,
    N_CASES_SEG,
    NPV,
    PPV,
    SEG_PRECISION,
    SEG_RECALL,
    SENSITIVITY,
    SPECIFICITY,
    dice_click_key,
    metric_key,
)

__all__ = [
    "AucResult",
    "BinaryMetrics",
    "GroupStats",
    "Overlap",
    "VOLUME_BIN_EDGES_CM3",
    "VOLUME_BIN_LABELS",
    "as_binary_mask",
    "auc_with_ci",
    "binary_metrics",
    "classification_metrics_dict",
    "dice",
    "dice_vs_clicks",
    "hd95_mm",
    "lesion_volume_cm3",
    "overlap_metrics",
    "padded_dice_curves",
    "segmentation_metrics_dict",
    "stratified_metrics_dict",
    "stratify",
    "volume_bin",
]

# ---------------------------------------------------------------------------------------------- segmentation
#: Lower edges (cm³) of the seed-000 lesion-volume bins; each bin is ``[edge, next edge)``, the last is open.
VOLUME_BIN_EDGES_CM3: tuple[float, ...] = (0.0, 5.0, 20.0)
#: Labels of those bins, as in seed 000 Tables 2, 4 and 5.
VOLUME_BIN_LABELS: tuple[str, ...] = ("0-5", "5-20", "20-100")


def as_binary_mask(mask: np.ndarray | torch.Tensor | Sequence[Any], *, name: str = "mask") -> np.ndarray:
    """Return ``mask`` as a numpy bool array of the same shape.

    Accepts numpy arrays, torch tensors (any device) or sequences, of dtype bool or with values in {0, 1};
    anything else (probabilities, logits, label maps) raises a ValueError naming ``name``, because silently
    thresholding them would hide a bug in the caller.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.number)):
        raise ValueError(f"{name}: expected a bool or 0/1 numeric array, got dtype {array.dtype}")
    nonzero = array != 0
    if np.any(nonzero & (array != 1)):
        raise ValueError(f"{name}: expected only values 0 and 1 (threshold probabilities before calling)")
    return nonzero


def _same_shape_masks(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    pred_b = as_binary_mask(pred, name="pred")
    gt_b = as_binary_mask(gt, name="gt")
    if pred_b.shape != gt_b.shape:
        raise ValueError(f"pred shape {pred_b.shape} differs from gt shape {gt_b.shape}")
    return pred_b, gt_b


@dataclass(frozen=True)
class Overlap:
    """Voxel overlap of a predicted mask P with the ground truth G (fractions in [0, 1]).

    dice = 2|P∩G| / (|P| + |G|), iou = |P∩G| / |P∪G| (Jaccard), precision = |P∩G| / |P|, recall = |P∩G| / |G|.
    Empty masks: both empty is a perfect prediction, every value 1.0 (as MONAI's ``DiceMetric(ignore_empty=
    False)``); exactly one empty (an empty prediction of a lesion, or a prediction where there is none) is a
    failure, every value 0.0. So every value is finite and the four agree on both conventions.
    """

    dice: float
    iou: float
    precision: float
    recall: float

    def named(self, rename: Callable[[str], str] = str) -> dict[str, float]:
        """``{iou, seg_precision, seg_recall}`` (the metric names of :mod:`shared.metric_names`) passed
        through ``rename``, e.g. :func:`shared.metric_names.first_click_name`; Dice has its own curve."""
        values = {IOU: self.iou, SEG_PRECISION: self.precision, SEG_RECALL: self.recall}
        return {rename(name): value for name, value in values.items()}


def overlap_metrics(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> Overlap:
    """Dice, IoU, precision and recall of two binary masks of the same shape (all voxels pooled; see
    :class:`Overlap` for the formulas and the empty-mask conventions)."""
    pred_b, gt_b = _same_shape_masks(pred, gt)
    tp = int(np.logical_and(pred_b, gt_b).sum())
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    if n_pred == 0 and n_gt == 0:
        return Overlap(1.0, 1.0, 1.0, 1.0)
    if n_pred == 0 or n_gt == 0:
        return Overlap(0.0, 0.0, 0.0, 0.0)
    return Overlap(2.0 * tp / (n_pred + n_gt), tp / (n_pred + n_gt - tp), tp / n_pred, tp / n_gt)


def dice(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> float:
    """Dice coefficient ``2|P∩G| / (|P| + |G|)`` of two binary masks of the same shape (all voxels pooled).

    When both masks are empty the prediction is perfect and the Dice is defined as 1.0 (as MONAI's
    ``DiceMetric(ignore_empty=False)``); an empty prediction of a non-empty lesion gives 0.0
    (:func:`overlap_metrics`).
    """
    return overlap_metrics(pred, gt).dice


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> list[float]:
    spacing = [float(s) for s in spacing_mm]
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm {tuple(spacing_mm)} must hold {ndim} positive values (mm, array order)")
    return spacing


def hd95_mm(
    pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor, spacing_mm: Sequence[float]
) -> float:
    """95th-percentile symmetric Hausdorff distance in millimetres between two binary masks.

    Computed by MONAI's ``compute_hausdorff_distance(percentile=95, spacing=spacing_mm)`` on the mask
    surfaces; ``spacing_mm`` is the voxel size per array axis, e.g. ``(z, y, x)`` for a ``(D, H, W)`` volume.

    Empty masks: when both are empty the distance is 0.0 (nothing to find, nothing found, consistent with
    :func:`dice` = 1.0). When exactly one is empty, for instance an empty prediction, the distance is
    undefined and the function returns NaN rather than an arbitrary penalty; such a case still counts as a
    failure through its Dice of 0.0, and the aggregates report how many NaNs were left out
    (:data:`HD95_UNDEFINED`, :attr:`GroupStats.n_undefined`).
    """
    pred_b, gt_b = _same_shape_masks(pred, gt)
    spacing = _check_spacing(spacing_mm, pred_b.ndim)
    pred_any, gt_any = bool(pred_b.any()), bool(gt_b.any())
    if not pred_any and not gt_any:
        return 0.0
    if not pred_any or not gt_any:
        return math.nan
    # Imported here: importing MONAI costs seconds, and most users of this module (clicks, the CLI) never
    # compute a Hausdorff distance.
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        # MONAI 1.5+ passes a deprecated argument to itself internally; nothing for our callers to act on.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        distance = compute_hausdorff_distance(
            pred_b[None, None], gt_b[None, None], include_background=True, percentile=95, spacing=spacing
        )
    return float(distance.reshape(-1)[0])


def lesion_volume_cm3(mask: np.ndarray | torch.Tensor, spacing_mm: Sequence[float]) -> float:
    """Volume of a binary mask in cm³: voxel count × product of ``spacing_mm`` (mm³) / 1000."""
    mask_b = as_binary_mask(mask)
    spacing = _check_spacing(spacing_mm, mask_b.ndim)
    return int(mask_b.sum()) * math.prod(spacing) / 1000.0


def volume_bin(volume_cm3: float) -> str:
    """Label of the seed-000 volume bin of a lesion volume in cm³: ``"0-5"``, ``"5-20"`` or ``"20-100"``.

    Bins include their lower edge: 5.0 cm³ is ``"5-20"`` and 20.0 cm³ is ``"20-100"``. The last bin is open
    above, as in seed 000, whose largest lesion (100.03 cm³) is counted in 20–100 cm³.
    """
    if not math.isfinite(volume_cm3) or volume_cm3 < 0:
        raise ValueError(f"lesion volume must be a finite value >= 0 cm³, got {volume_cm3!r}")
    index = int(np.searchsorted(VOLUME_BIN_EDGES_CM3, volume_cm3, side="right")) - 1
    return VOLUME_BIN_LABELS[index]


@dataclass(frozen=True)
class GroupStats:
    """Summary of one metric over the cases of one group.

    ``count`` values were finite and enter ``mean`` and ``std`` (sample standard deviation, ddof=1, NaN for a
    single case: seed 000 prints no ± for such groups); ``n_undefined`` cases had NaN (e.g. HD95 of an empty
    prediction) and are left out.
    """

    mean: float
    std: float
    count: int
    n_undefined: int


def _group_stats(values: Sequence[float]) -> GroupStats:
    array = np.asarray(values, dtype=np.float64)
    finite = array[~np.isnan(array)]
    n = int(finite.size)
    mean = float(finite.mean()) if n else math.nan
    std = float(finite.std(ddof=1)) if n > 1 else math.nan
    return GroupStats(mean=mean, std=std, count=n, n_undefined=int(array.size - n))


def _natural_key(label: str) -> list[tuple[int, Any]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", label)]


def _group_label(record: Mapping[str, Any], key: str | Callable[[Mapping[str, Any]], Any], index: int) -> str:
    if callable(key):
        value = key(record)
    elif key in record:
        value = record[key]
    else:
        raise KeyError(f"record {index} has no key {key!r} to stratify by (keys: {sorted(record)})")
    return "unknown" if value is None or value == "" else str(value)


def stratify(
    records: Sequence[Mapping[str, Any]],
    key: str | Callable[[Mapping[str, Any]], Any],
    *,
    metrics: Sequence[str] = (DICE, HD95_MM),
) -> dict[str, dict[str, GroupStats]]:
    """Group per-case records and summarise each metric per group (seed 000 Tables 4–5).

    ``records`` hold one case each, e.g. ``{"dice": 0.8, "hd95_mm": 12.3, "birads": "4A", "volume_cm3": 3}``.
    ``key`` names the field to group by, or is a function of a record returning the group, e.g.
    ``lambda r: volume_bin(r["volume_cm3"])``. A group value of None or "" becomes ``"unknown"``.

    Returns ``{group: {metric: GroupStats}}`` with groups in natural order ("3", "4A", "4B", "4C", "5", "6";
    "0-5", "5-20", "20-100"). Raises KeyError naming the record and key when a field is missing.
    """
    grouped: dict[str, dict[str, list[float]]] = {}
    for index, record in enumerate(records):
        group = _group_label(record, key, index)
        for metric in metrics:
            if metric not in record:
                raise KeyError(f"record {index} (group {group!r}) has no metric {metric!r}")
            grouped.setdefault(group, {m: [] for m in metrics})[metric].append(float(record[metric]))
    return {
        group: {metric: _group_stats(values) for metric, values in grouped[group].items()}
        for group in sorted(grouped, key=_natural_key)
    }


def padded_dice_curves(curves: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-case Dice-vs-clicks curves as one array of shape ``(n_cases, R)``, ``R`` the longest curve.

    ``curves[c][r]`` is case ``c``'s Dice after click round ``r + 1``. A shorter curve (a case whose
    clicking stopped early, e.g. because its prediction became exact) keeps its last Dice for the remaining
    rounds.
    """
    if len(curves) == 0 or any(len(curve) == 0 for curve in curves):
        raise ValueError("Dice-vs-clicks needs at least one case, each with at least one Dice value")
    rounds = max(len(curve) for curve in curves)
    return np.array([list(curve) + [curve[-1]] * (rounds - len(curve)) for curve in curves], dtype=np.float64)


def dice_vs_clicks(curves: Sequence[Sequence[float]]) -> np.ndarray:
    """Mean Dice at each click round over cases: the Dice-vs-clicks curve, shape ``(R,)``.

    ``curves[c][r]`` is case ``c``'s Dice after click round ``r + 1``; shorter curves are padded with their
    last Dice (:func:`padded_dice_curves`), so every round averages over all cases.
    """
    return padded_dice_curves(curves).mean(axis=0)


# -------------------------------------------------------------------------------------------- classification
@dataclass(frozen=True)
class AucResult:
    """ROC AUC with a ``1 - alpha`` confidence interval.

    ``auc`` is scikit-learn's ``roc_auc_score``; ``ci_low``/``ci_high`` are percentiles of a stratified
    bootstrap. All three are NaN when the AUC is undefined, and ``undefined_reason`` then says why.
    """

    auc: float
    ci_low: float
    ci_high: float
    n_boot: int
    alpha: float
    undefined_reason: str = ""


def _binary_labels(y_true: Any) -> np.ndarray:
    labels = as_binary_mask(y_true, name="y_true")
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array of 0/1 labels, got shape {labels.shape}")
    return labels


def _scores(y_score: Any, n: int) -> np.ndarray:
    scores = np.asarray(y_score.detach().cpu() if isinstance(y_score, torch.Tensor) else y_score, dtype=float)
    if scores.shape != (n,):
        raise ValueError(f"y_score shape {scores.shape} must be ({n},), one score per label")
    if not np.all(np.isfinite(scores)):
        raise ValueError("y_score contains NaN or infinite values")
    return scores


def _auc_from_ranks(ranks: np.ndarray, n_pos: int) -> np.ndarray:
    """Mann–Whitney AUC from the mid-ranks (ties averaged) of ``[positives..., negatives...]`` on the last axis.

    ``(rank sum of positives - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``, which equals ``roc_auc_score``.
    """
    n_neg = ranks.shape[-1] - n_pos
    return (ranks[..., :n_pos].sum(axis=-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _one_class_reason(labels: np.ndarray) -> str:
    """Why the ROC AUC of 0/1 ``labels`` is undefined (only one class present), or "" when it is defined."""
    n_pos = int(labels.sum())
    if n_pos not in (0, labels.size):
        return ""
    only = "malignant (1)" if n_pos else "benign (0)"
    return f"only one class present: all {labels.size} labels are {only}; ROC AUC needs both"


def _bootstrap_aucs(pos: np.ndarray, neg: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """AUCs of ``n_boot`` stratified resamples (positives and negatives drawn apart), shape ``(n_boot,)``.

    Uses the Mann–Whitney form of :func:`_auc_from_ranks`, which equals ``roc_auc_score`` on each resample.
    """
    boot_pos = pos[rng.integers(0, pos.size, size=(n_boot, pos.size))]
    boot_neg = neg[rng.integers(0, neg.size, size=(n_boot, neg.size))]
    ranks = rankdata(np.concatenate([boot_pos, boot_neg], axis=1), axis=1)
    return _auc_from_ranks(ranks, pos.size)


def auc_with_ci(
    y_true: Sequence[int] | np.ndarray | torch.Tensor,
    y_score: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> AucResult:
    """ROC AUC of ``y_score`` (malignancy probability) against ``y_true`` (1 = malignant), with a CI.

    The interval is the ``alpha/2`` and ``1 - alpha/2`` percentiles of the AUC over ``n_boot`` stratified
    bootstrap resamples (positives and negatives resampled separately, keeping their counts, so every
    resample has both classes), drawn from ``numpy.random.default_rng(seed)``: the same inputs and seed give
    the same interval. With only one class present the AUC is undefined: the result holds NaN and says so
    in ``undefined_reason`` (a site whose test split has only benign lesions, for instance).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    labels = _binary_labels(y_true)
    scores = _scores(y_score, labels.size)
    if reason := _one_class_reason(labels):
        return AucResult(math.nan, math.nan, math.nan, n_boot, alpha, undefined_reason=reason)
    boot = _bootstrap_aucs(scores[labels], scores[~labels], n_boot, np.random.default_rng(seed))
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return AucResult(float(roc_auc_score(labels, scores)), float(low), float(high), n_boot, alpha)


@dataclass(frozen=True)
class BinaryMetrics:
    """Diagnostic metrics at one threshold (fractions in [0, 1]); NaN where a denominator is zero.

    sensitivity = TP/(TP+FN), specificity = TN/(TN+FP), ppv = TP/(TP+FP), npv = TN/(TN+FN),
    accuracy = (TP+TN)/N, f1 = 2TP/(2TP+FP+FN) (harmonic mean of sensitivity and PPV).
    """

    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    accuracy: float
    f1: float
    tp: int
    fp: int
    tn: int
    fn: int
    threshold: float


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def binary_metrics(
    y_true: Sequence[int] | np.ndarray | torch.Tensor,
    y_score: Sequence[float] | np.ndarray | torch.Tensor,
    threshold: float = 0.5,
) -> BinaryMetrics:
    """Sensitivity, specificity, PPV, NPV, accuracy and F1 of ``y_score > threshold`` against ``y_true``.

    A lesion is called malignant when its probability strictly exceeds ``threshold`` (seed 003: "exceeds
    0.5"). Undefined ratios (e.g. specificity without benign lesions) are NaN, never a ZeroDivisionError.
    """
    labels = _binary_labels(y_true)
    predicted = _scores(y_score, labels.size) > threshold
    tp = int(np.sum(predicted & labels))
    fp = int(np.sum(predicted & ~labels))
    tn = int(np.sum(~predicted & ~labels))
    fn = int(np.sum(~predicted & labels))
    return BinaryMetrics(
        sensitivity=_ratio(tp, tp + fn),
        specificity=_ratio(tn, tn + fp),
        ppv=_ratio(tp, tp + fp),
        npv=_ratio(tn, tn + fn),
        accuracy=_ratio(tp + tn, labels.size),
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        threshold=float(threshold),
    )


# ---------------------------------------------------------------------------------------------- flat dicts
def segmentation_metrics_dict(
    dice_curves: Sequence[Sequence[float]],
    hd95_values_mm: Sequence[float],
    *,
    overlaps: Mapping[str, Sequence[float]] | None = None,
    split: str = "test",
) -> dict[str, float]:
    """Flat segmentation metrics of one split for logging.

    ``dice_curves[c]`` is case ``c``'s Dice after each click round; ``hd95_values_mm[c]`` its final HD95
    (NaN when undefined); ``overlaps[name][c]`` its value of an overlap metric such as ``iou`` or
    ``iou_1click`` (:meth:`Overlap.named`). Keys: ``{split}/dice_{n}click`` for every round n (see
    :func:`dice_vs_clicks`), ``{split}/dice`` (last round), ``{split}/{name}`` (mean over cases) for each
    overlap, ``{split}/hd95_mm`` (mean over defined values, NaN if none), ``{split}/hd95_undefined`` and
    ``{split}/n_cases_seg``.
    """
    overlaps = dict(overlaps or {})
    lengths = {len(hd95_values_mm), *(len(values) for values in overlaps.values())}
    if lengths != {len(dice_curves)}:
        raise ValueError(f"{len(dice_curves)} Dice curves but {sorted(lengths)} HD95 / overlap values")
    curve = dice_vs_clicks(dice_curves)
    hd95 = _group_stats(hd95_values_mm)
    out = {dice_click_key(r + 1, split=split): float(value) for r, value in enumerate(curve)}
    out[metric_key(DICE, split=split)] = float(curve[-1])
    out.update({metric_key(name, split=split): float(np.mean(v)) for name, v in overlaps.items()})
    out[metric_key(HD95_MM, split=split)] = hd95.mean
    out[metric_key(HD95_UNDEFINED, split=split)] = float(hd95.n_undefined)
    out[metric_key(N_CASES_SEG, split=split)] = float(len(dice_curves))
    return out


def classification_metrics_dict(
    auc: AucResult, binary: BinaryMetrics, *, split: str = "test", suffix: str = ""
) -> dict[str, float]:
    """Flat classification metrics of one split for logging: ``{split}/auc{suffix}``, ``.../auc_ci_low``, ...

    ``suffix`` tells variants apart, e.g. ``"_gt_planes"`` for planes cut from the ground-truth mask next to
    the end-to-end (predicted-mask) result without suffix.
    """
    values = {
        AUC: auc.auc,
        AUC_CI_LOW: auc.ci_low,
        AUC_CI_HIGH: auc.ci_high,
        SENSITIVITY: binary.sensitivity,
        SPECIFICITY: binary.specificity,
        PPV: binary.ppv,
        NPV: binary.npv,
        ACCURACY: binary.accuracy,
        F1: binary.f1,
        N_CASES_CLS: float(binary.tp + binary.fp + binary.tn + binary.fn),
    }
    return {metric_key(name + suffix, split=split): float(value) for name, value in values.items()}


def _safe_group(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", group)


def stratified_metrics_dict(
    strata: Mapping[str, Mapping[str, GroupStats]], *, by: str, split: str = "test"
) -> dict[str, float]:
    """Flatten :func:`stratify` output: ``{split}/{by}/{group}/{metric}_mean`` (also ``_std``, ``_count``).

    Example: ``test/birads/4A/dice_mean``, ``test/volume/0-5/hd95_mm_std``. Characters other than letters,
    digits, ``_ . -`` in group labels become ``_`` (MLflow's rule for metric names).
    """
    stratum = metric_key(by, split=split)
    out: dict[str, float] = {}
    for group, per_metric in strata.items():
        prefix = f"{stratum}/{_safe_group(group)}"
        for metric, stats in per_metric.items():
            out[f"{prefix}/{metric}_mean"] = stats.mean
            out[f"{prefix}/{metric}_std"] = stats.std
            out[f"{prefix}/{metric}_count"] = float(stats.count)
    return out
