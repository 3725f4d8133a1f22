"""How sure each number of a cross-site study is (issue 13): confidence intervals and paired tests.

Builds on :mod:`shared.metrics` and :mod:`shared.calibration`: case bootstrap (:func:`bootstrap_ci`,
:func:`paired_bootstrap`), DeLong (:func:`delong_auc`, :func:`delong_test`; mid-rank algorithm of Sun & Xu,
2014), and whole-split tables (:func:`classification_estimates`,
:func:`segmentation_estimates`) keyed by the metric names of :mod:`shared.metric_names`. The unit of resampling is the case (lesion / patient): per-case values are
rows of an ``(n_cases,)`` or ``(n_cases, k)`` array; resamples come from ``numpy.random.default_rng(seed)``.
Undefined results are NaN with a ``note`` saying why, not exceptions: a small site's test split may lack a
class or a defined HD95.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import norm, rankdata

from shared.calibration import brier_score, expected_calibration_error, labels_and_probabilities
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
    dice_click_name,
)
from shared.metrics import (
    _auc_from_ranks,
    _binary_labels,
    _one_class_reason,
    _scores,
    binary_metrics,
    padded_dice_curves,
)

__all__ = [
    "Comparison",
    "Estimate",
    "bootstrap_ci",
    "check_alpha",
    "classification_estimates",
    "delong_auc",
    "delong_test",
    "paired_bootstrap",
    "segmentation_estimates",
]

Statistic = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class Estimate:
    """A point estimate over ``n`` cases with a ``1 - alpha`` confidence interval ``[ci_low, ci_high]``.

    Fields are NaN where undefined (the CI alone, or everything), and ``note`` then says why; ``method``
    names how the interval was made, e.g. ``"case bootstrap (percentile, n_boot=2000)"``.
    """

    value: float
    ci_low: float
    ci_high: float
    n: int
    method: str
    note: str = ""


@dataclass(frozen=True)
class Comparison:
    """Model A minus model B on the same ``n`` cases: ``diff`` with a CI and a two-sided ``p_value``."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    method: str
    note: str = ""


def _undefined(n: int, method: str, note: str) -> Estimate:
    return Estimate(math.nan, math.nan, math.nan, n, method, note)


def _undecided(n: int, method: str, note: str, diff: float = math.nan) -> Comparison:
    return Comparison(diff, math.nan, math.nan, math.nan, n, method, note)


# ----------------------------------------------------------------------------------------------- bootstrap
def check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def _check_bootstrap_args(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    check_alpha(alpha)


def _resample_indices(n: int, n_boot: int, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    """Case indices of ``n_boot`` resamples with replacement, shape ``(n_boot, n)``.

    With ``strata`` (one label per case) each case position is refilled from its own stratum, so every
    resample keeps the stratum sizes (e.g. the numbers of malignant and benign lesions).
    """
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    indices = np.empty((n_boot, n), dtype=np.int64)
    for label in np.unique(strata):
        members = np.flatnonzero(strata == label)
        indices[:, members] = members[rng.integers(0, members.size, size=(n_boot, members.size))]
    return indices


def _quiet(function: Statistic, values: np.ndarray) -> float:
    # nanmean of an all-NaN resample warns "Mean of empty slice" and returns NaN: expected, handled below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(function(values))


def _boot_statistics(values: np.ndarray, statistic: Statistic, indices: np.ndarray) -> np.ndarray:
    """``statistic`` of every resample ``values[indices[b]]``, shape ``(n_boot,)``."""
    if values.ndim == 1 and statistic in (np.mean, np.nanmean):  # vectorised fast path, same numbers
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return statistic(values[indices], axis=1)
    return np.array([_quiet(statistic, values[rows]) for rows in indices], dtype=np.float64)


def _percentile_interval(boot: np.ndarray, alpha: float, value: float) -> tuple[float, float, str]:
    """The ``alpha/2`` and ``1 - alpha/2`` percentiles of the finite bootstrap values, and a note.

    A percentile interval need not contain ``value`` (the statistic on the original cases) when the statistic
    is biased on resamples: binned ECE, for one, grows when resampling duplicates cases. The interval is kept
    as computed and the note says so, so a reader never meets an unexplained estimate outside its CI.
    """
    finite = boot[np.isfinite(boot)]
    if finite.size == 0:
        return math.nan, math.nan, "the statistic is undefined on every bootstrap resample"
    notes = []
    if finite.size < boot.size:
        notes.append(f"{boot.size - finite.size} of {boot.size} resamples undefined, left out")
    low, high = (float(q) for q in np.quantile(finite, [alpha / 2, 1 - alpha / 2]))
    if not low <= value <= high:
        side, other, beyond = (
            ("below", "above", finite > value) if value < low else ("above", "below", finite < value)
        )
        notes.append(
            f"the estimate lies {side} its percentile interval ({np.mean(beyond):.0%} of resamples lie {other}"
            " it): the statistic is biased on resamples"
        )
    return low, high, _join(*notes)


def _case_values(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (n_cases,) or (n_cases, k), got {array.shape}")
    return array


def _join(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


def bootstrap_ci(
    values: ArrayLike,
    statistic: Statistic = np.nanmean,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    strata: ArrayLike | None = None,
) -> Estimate:
    """``statistic(values)`` with a case-level percentile-bootstrap CI.

    ``values`` holds one row per case: shape ``(n_cases,)`` (e.g. Dice per lesion) or ``(n_cases, k)``
    (e.g. label and score per lesion; ``statistic`` then maps an ``(n, k)`` array to a float). Cases are
    resampled with replacement ``n_boot`` times (within ``strata``, one label per case, when given) and the
    CI is the ``alpha/2`` and ``1 - alpha/2`` percentiles of the resampled statistic. NaN per-case values
    are the statistic's business (``np.nanmean`` skips them); resamples whose statistic is NaN are left
    out of the percentiles and counted in ``note``.
    """
    _check_bootstrap_args(n_boot, alpha)
    array = _case_values(values, "values")
    n = int(array.shape[0])
    method = f"{'stratified ' if strata is not None else ''}case bootstrap (percentile, n_boot={n_boot})"
    groups = None if strata is None else np.asarray(strata)
    if groups is not None and groups.shape != (n,):
        raise ValueError(f"strata shape {groups.shape} must be ({n},), one label per case")
    if n == 0:
        return _undefined(0, method, "no cases")
    value = _quiet(statistic, array)
    if not math.isfinite(value):
        return _undefined(n, method, "the statistic is undefined on these cases (e.g. every value is NaN)")
    boot = _boot_statistics(array, statistic, _resample_indices(n, n_boot, seed, groups))
    low, high, note = _percentile_interval(boot, alpha, value)
    return Estimate(value, low, high, n, method, note)


def _paired_p_value(boot_diff: np.ndarray) -> float:
    """Two-sided bootstrap p-value ``min(1, 2 (1 + min(#{d <= 0}, #{d >= 0})) / (B + 1))`` of B differences.

    The ``+1`` keeps it above zero (smallest value ``2 / (B + 1)``); it is the CI-inversion p-value: it falls
    below ``alpha`` about when 0 lies outside the percentile interval.
    """
    tail = min(int(np.sum(boot_diff <= 0)), int(np.sum(boot_diff >= 0)))
    return min(1.0, 2.0 * (1 + tail) / (boot_diff.size + 1))


def paired_bootstrap(
    a: ArrayLike,
    b: ArrayLike,
    statistic: Statistic = np.nanmean,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Comparison:
    """``statistic(a) - statistic(b)`` for two models scored on the same cases, with CI and p-value.

    ``a[i]`` and ``b[i]`` belong to case ``i`` (shape ``(n_cases,)`` or ``(n_cases, k)`` each); the case
    indices are resampled jointly, which keeps the pairing. CI: percentiles of the resampled difference;
    p-value: see :func:`_paired_p_value`. Resamples with an undefined difference are left out and counted.
    """
    _check_bootstrap_args(n_boot, alpha)
    first, second = _case_values(a, "a"), _case_values(b, "b")
    if first.shape[0] != second.shape[0]:
        raise ValueError(f"a has {first.shape[0]} cases but b has {second.shape[0]}; pair them case by case")
    n = int(first.shape[0])
    method = f"paired case bootstrap (percentile, n_boot={n_boot})"
    diff = _quiet(statistic, first) - _quiet(statistic, second) if n else math.nan
    if not math.isfinite(diff):
        return _undecided(n, method, "the statistic is undefined for a or b on these cases")
    indices = _resample_indices(n, n_boot, seed)
    boot = _boot_statistics(first, statistic, indices) - _boot_statistics(second, statistic, indices)
    low, high, note = _percentile_interval(boot, alpha, diff)
    finite = boot[np.isfinite(boot)]
    p_value = _paired_p_value(finite) if finite.size else math.nan
    return Comparison(diff, low, high, p_value, n, method, note)


# -------------------------------------------------------------------------------------------------- DeLong
def _labels_and_scores(y_true: Any, *scores: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    labels = _binary_labels(y_true)
    return labels, [_scores(score, labels.size) for score in scores]


def _delong_components(labels: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs, shape ``(k,)``, and their DeLong covariance, shape ``(k, k)``, of ``k`` score vectors.

    Sun & Xu (2014): with mid-ranks ``tz`` in the pooled sample and ``tx``/``ty`` within positives/negatives,
    the structural components are ``V10 = (tz_pos - tx) / n_neg`` and ``V01 = 1 - (tz_neg - ty) / n_pos``;
    ``cov = cov(V10) / n_pos + cov(V01) / n_neg`` (sample covariances, ddof 1).
    """
    pos = np.stack([score[labels] for score in scores])
    neg = np.stack([score[~labels] for score in scores])
    m, n = pos.shape[1], neg.shape[1]
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    v10 = (tz[:, :m] - rankdata(pos, axis=1)) / n
    v01 = 1.0 - (tz[:, m:] - rankdata(neg, axis=1)) / m
    with warnings.catch_warnings():  # a single case of a class has no sample covariance: NaN, noted later
        warnings.simplefilter("ignore", RuntimeWarning)
        cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return _auc_from_ranks(tz, m), cov


def delong_auc(y_true: ArrayLike, score: ArrayLike, *, alpha: float = 0.05) -> Estimate:
    """ROC AUC of ``score`` against ``y_true`` (1 = malignant), both shape ``(n_cases,)``, with a DeLong CI.

    The AUC equals ``sklearn.metrics.roc_auc_score``; the CI is the plain normal interval
    ``AUC ± z_{1-alpha/2} * sqrt(var_DeLong)`` clipped to [0, 1] (as pROC does). NaN with a note when only
    one class is present (AUC undefined) or a class has a single case (variance undefined: CI only).
    """
    check_alpha(alpha)
    labels, (scores,) = _labels_and_scores(y_true, score)
    method = "DeLong (normal CI, clipped to [0, 1])"
    if note := _one_class_reason(labels):
        return _undefined(labels.size, method, note)
    aucs, cov = _delong_components(labels, [scores])
    auc, half = float(aucs[0]), float(norm.ppf(1 - alpha / 2) * math.sqrt(max(cov[0, 0], 0.0)))
    if not math.isfinite(half):
        return Estimate(
            auc, math.nan, math.nan, labels.size, method, "DeLong variance needs >= 2 cases per class"
        )
    return Estimate(auc, max(0.0, auc - half), min(1.0, auc + half), labels.size, method)


def delong_test(
    y_true: ArrayLike,
    score_a: ArrayLike,
    score_b: ArrayLike,
    *,
    alpha: float = 0.05,
) -> Comparison:
    """Paired DeLong test of ``AUC(score_a) - AUC(score_b)`` on the same cases (all shape ``(n_cases,)``).

    ``z = diff / sqrt(var_a + var_b - 2 cov_ab)``, two-sided normal p-value; CI ``diff ± z_{1-alpha/2} se``
    clipped to [-1, 1]. Identical scores give diff 0, p 1. NaN with a note when a class is missing or too
    small, or when the difference is non-zero with zero variance (e.g. AUC 1 against AUC 0).
    """
    check_alpha(alpha)
    labels, scores = _labels_and_scores(y_true, score_a, score_b)
    method = "paired DeLong test (normal)"
    if note := _one_class_reason(labels):
        return _undecided(labels.size, method, note)
    aucs, cov = _delong_components(labels, scores)
    diff, var = float(aucs[0] - aucs[1]), float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if not math.isfinite(var):
        return _undecided(labels.size, method, "DeLong variance needs >= 2 cases per class", diff)
    if var <= 1e-15 and diff == 0:
        return Comparison(0.0, 0.0, 0.0, 1.0, labels.size, method, "identical AUC components")
    if var <= 1e-15:
        return _undecided(labels.size, method, "zero variance of a non-zero difference", diff)
    se = math.sqrt(var)
    half = float(norm.ppf(1 - alpha / 2)) * se
    p_value = float(2 * norm.sf(abs(diff) / se))
    return Comparison(diff, max(-1.0, diff - half), min(1.0, diff + half), p_value, labels.size, method)


# ------------------------------------------------------------------------------------------ per-split tables
#: Metrics of :func:`shared.metrics.binary_metrics` (its field names) and why each can be undefined.
_BINARY_UNDEFINED_WHEN = {
    SENSITIVITY: "no malignant cases (TP + FN = 0)",
    SPECIFICITY: "no benign cases (TN + FP = 0)",
    PPV: "no case called malignant at this threshold (TP + FP = 0)",
    NPV: "no case called benign at this threshold (TN + FN = 0)",
    F1: "no malignant case and none called malignant (2TP + FP + FN = 0)",
    ACCURACY: "no cases",
}


def _classification_row(labels: np.ndarray, probs: np.ndarray, threshold: float, n_bins: int) -> np.ndarray:
    """Binary metrics (in ``_BINARY_UNDEFINED_WHEN`` order), Brier and ECE of one (re)sample, shape ``(8,)``."""
    at_threshold = binary_metrics(labels, probs, threshold)
    values = [getattr(at_threshold, name) for name in _BINARY_UNDEFINED_WHEN]
    return np.array([*values, brier_score(labels, probs), expected_calibration_error(labels, probs, n_bins)])


def classification_estimates(
    y_true: ArrayLike,
    prob: ArrayLike,
    *,
    threshold: float = 0.5,
    n_bins: int = 10,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Estimate]:
    """Every classification metric of one split with a ``1 - alpha`` CI, keyed by its metric name.

    ``y_true`` (1 = malignant) and ``prob`` (malignancy probability) have shape ``(n_cases,)``. Keys:
    ``auc`` (:func:`delong_auc`); ``sensitivity``, ``specificity``, ``ppv``, ``npv``, ``f1``, ``accuracy``
    (:func:`shared.metrics.binary_metrics`, called malignant when ``prob > threshold``), ``brier`` and
    ``ece`` (``n_bins`` bins), all by a case bootstrap stratified by class (the class counts stay fixed) on
    one shared set of resamples. Undefined metrics are NaN Estimates whose note says why.
    """
    _check_bootstrap_args(n_boot, alpha)
    labels, probs = labels_and_probabilities(y_true, prob)
    n, names = labels.size, (*_BINARY_UNDEFINED_WHEN, BRIER, ECE)
    point = _classification_row(labels, probs, threshold, n_bins)
    rows = _resample_indices(n, n_boot, seed, strata=labels)
    boot = np.stack([_classification_row(labels[r], probs[r], threshold, n_bins) for r in rows])
    method = f"stratified case bootstrap (percentile, n_boot={n_boot})"
    out = {AUC: delong_auc(labels, probs, alpha=alpha)}
    for column, name in enumerate(names):
        if not math.isfinite(point[column]):
            out[name] = _undefined(n, method, f"{name} undefined: {_BINARY_UNDEFINED_WHEN[name]}")
            continue
        low, high, note = _percentile_interval(boot[:, column], alpha, float(point[column]))
        out[name] = Estimate(float(point[column]), low, high, n, method, note)
    return out


def segmentation_estimates(
    dice_curves: Sequence[Sequence[float]],
    hd95_mm: ArrayLike,
    *,
    overlaps: Mapping[str, ArrayLike] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Estimate]:
    """Mean Dice after every click round and mean HD95 (mm) of one split, each with a case-bootstrap CI.

    ``dice_curves[c][r]`` is case ``c``'s Dice after click round ``r + 1``; shorter curves are padded with
    their last Dice (:func:`shared.metrics.padded_dice_curves`). ``hd95_mm`` has shape ``(n_cases,)``, NaN
    where undefined (empty prediction): those cases are left out of the mean (``np.nanmean``) and counted in
    the note. ``overlaps`` maps overlap names (``iou``, ``iou_1click``, ``seg_precision`` …, see
    :meth:`shared.metrics.Overlap.named`) to per-case values, shape ``(n_cases,)``. Keys: ``dice_{n}click`` for
    n = 1..R (R = longest curve), ``dice`` (round R), ``hd95_mm`` and every overlap name (mean over cases).
    Every key uses the same seed, hence the same resampled cases.
    """
    padded = padded_dice_curves(dice_curves)
    hd95 = np.asarray(hd95_mm, dtype=np.float64)
    if hd95.shape != (padded.shape[0],):
        raise ValueError(f"{padded.shape[0]} Dice curves but hd95_mm has shape {hd95.shape}; one per case")
    options = {"n_boot": n_boot, "seed": seed, "alpha": alpha}
    rounds = padded.shape[1]
    out = {dice_click_name(r + 1): bootstrap_ci(padded[:, r], np.mean, **options) for r in range(rounds)}
    out[DICE] = out[dice_click_name(rounds)]
    hd95_estimate = bootstrap_ci(hd95, np.nanmean, **options)
    if n_undefined := int(np.isnan(hd95).sum()):
        why = (
            f"{n_undefined} of {hd95.size} cases have undefined HD95 (empty prediction), left out of the mean"
        )
        hd95_estimate = replace(hd95_estimate, note=_join(why, hd95_estimate.note))
    out[HD95_MM] = hd95_estimate
    for name, values in (overlaps or {}).items():
        if np.shape(values) != hd95.shape:
            raise ValueError(f"{padded.shape[0]} Dice curves but {name} has shape {np.shape(values)}")
        out[name] = bootstrap_ci(values, np.mean, **options)
    return out
