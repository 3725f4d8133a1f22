"""How well predicted malignancy probabilities are calibrated: Brier score, reliability bins and ECE.

Inputs are one label (1 = malignant) and one probability per case, both shape ``(n_cases,)``; probabilities
must lie in [0, 1] (a softmax output, not logits). Results are plain floats or numpy arrays. The bootstrap
intervals of these metrics are made in :func:`shared.statistics.classification_estimates`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from shared.metrics import _binary_labels, _scores

__all__ = [
    "CalibrationCurve",
    "brier_score",
    "calibration_curve",
    "ece_of",
    "expected_calibration_error",
    "labels_and_probabilities",
]


@dataclass(frozen=True)
class CalibrationCurve:
    """Reliability diagram of equal-width probability bins; empty bins are skipped.

    All arrays have shape ``(n_nonempty_bins,)``: ``mean_predicted`` and ``observed_fraction`` are in
    [0, 1], ``count`` the number of cases per bin, ``bin_index`` which of the ``n_bins`` bins (0-based).
    """

    mean_predicted: np.ndarray
    observed_fraction: np.ndarray
    count: np.ndarray
    bin_index: np.ndarray


def labels_and_probabilities(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """``y_true`` as bool labels and ``prob`` as float probabilities, both shape ``(n_cases,)``, checked.

    Raises ValueError when the labels are not 0/1, the shapes differ, or a probability is not finite or lies
    outside [0, 1]."""
    labels = _binary_labels(y_true)
    probs = _scores(prob, labels.size)
    if np.any((probs < 0) | (probs > 1)):
        raise ValueError(
            "prob must lie in [0, 1]: pass malignancy probabilities (e.g. a softmax), not logits"
        )
    return labels, probs


def brier_score(y_true: ArrayLike, prob: ArrayLike) -> float:
    """Mean of ``(prob - y_true)²`` over cases, both shape ``(n_cases,)``; 0 is perfect, 0.25 a coin flip."""
    labels, probs = labels_and_probabilities(y_true, prob)
    return float(np.mean((probs - labels) ** 2))


def calibration_curve(y_true: ArrayLike, prob: ArrayLike, n_bins: int = 10) -> CalibrationCurve:
    """Per-bin mean predicted probability, observed malignant fraction and case count (empty bins skipped).

    ``n_bins`` equal-width bins of [0, 1]: bin ``k`` holds ``k / n_bins <= prob < (k + 1) / n_bins``, the
    last one also ``prob == 1``. ``y_true`` and ``prob`` have shape ``(n_cases,)``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    labels, probs = labels_and_probabilities(y_true, prob)
    bins = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    keep = np.flatnonzero(count)
    sum_prob = np.bincount(bins, weights=probs, minlength=n_bins)[keep]
    sum_pos = np.bincount(bins, weights=labels.astype(np.float64), minlength=n_bins)[keep]
    return CalibrationCurve(sum_prob / count[keep], sum_pos / count[keep], count[keep], keep)


def expected_calibration_error(y_true: ArrayLike, prob: ArrayLike, n_bins: int = 10) -> float:
    """ECE: ``sum_k (n_k / n) |mean prob_k - observed fraction_k|`` over the bins of :func:`calibration_curve`."""
    return ece_of(calibration_curve(y_true, prob, n_bins))


def ece_of(curve: CalibrationCurve) -> float:
    """The ECE of a reliability diagram: its bins' gaps ``|mean prob - observed fraction|``, weighted by count."""
    gaps = np.abs(curve.mean_predicted - curve.observed_fraction)
    return float(np.sum(curve.count * gaps) / np.sum(curve.count))
