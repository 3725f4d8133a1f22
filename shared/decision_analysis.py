"""Decisions at an operating point (seed 003's extra analyses): McNemar's test of two classifiers' calls on the
same cases (:func:`mcnemar`) and decision-curve analysis of malignancy probabilities (:func:`decision_curve`).

Inputs are per-case arrays of shape ``(n_cases,)`` (labels 0/1, 1 = malignant); a comparison is a
:class:`shared.statistics.Comparison`, like the bootstrap and DeLong ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import binom, chi2, norm

from shared.calibration import labels_and_probabilities
from shared.metrics import _binary_labels, as_binary_mask
from shared.statistics import Comparison, check_alpha

__all__ = [
    "DECISION_THRESHOLDS",
    "MCNEMAR_EXACT_BELOW",
    "DecisionCurve",
    "McNemar",
    "decision_curve",
    "mcnemar",
]


# ------------------------------------------------------------------------------------------------ McNemar
#: McNemar's p-value is the exact binomial one below this many discordant cases, and the continuity-corrected
#: chi-square from it on (the chi-square approximation needs b + c >= 25; statsmodels gives the same advice).
MCNEMAR_EXACT_BELOW = 25


@dataclass(frozen=True)
class McNemar(Comparison):
    """A :class:`Comparison` of two classifiers' accuracies with McNemar's discordant counts: ``only_a`` cases
    only A classifies correctly, ``only_b`` only B; ``statistic`` is ``min(only_a, only_b)`` (exact test) or
    the chi-square value (1 degree of freedom)."""

    only_a: int = 0
    only_b: int = 0
    statistic: float = math.nan


def _correct(labels: np.ndarray, pred: ArrayLike, name: str) -> np.ndarray:
    predicted = as_binary_mask(pred, name=name)
    if predicted.shape != labels.shape:
        raise ValueError(f"{name} shape {predicted.shape} must be {labels.shape}, one prediction per case")
    return predicted == labels


def mcnemar(
    y_true: ArrayLike,
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    *,
    exact: bool | None = None,
    alpha: float = 0.05,
) -> McNemar:
    """McNemar test of two classifiers' 0/1 predictions on the same cases (all shape ``(n_cases,)``).

    ``pred_a[i]`` and ``pred_b[i]`` are both classifiers' calls (1 = malignant, each at its own threshold) for
    case ``i``, whose truth is ``y_true[i]``; the caller pairs them by case id. With ``b`` cases only A gets
    right and ``c`` only B, ``diff = acc_A - acc_B = (b - c) / n``. p-value (two-sided): with ``exact`` None,
    the exact binomial test of ``min(b, c)`` out of ``b + c`` at 1/2 when ``b + c <``
    :data:`MCNEMAR_EXACT_BELOW`, else the continuity-corrected chi-square ``(|b - c| - 1)² / (b + c)`` with 1
    degree of freedom (Edwards); ``exact`` True or False forces one. No discordant case: p = 1. CI: Wald
    interval of a paired difference of proportions, clipped to [-1, 1].
    """
    check_alpha(alpha)
    labels = _binary_labels(y_true)
    right_a, right_b = _correct(labels, pred_a, "pred_a"), _correct(labels, pred_b, "pred_b")
    n, b, c = labels.size, int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    discordant = b + c
    use_exact = discordant < MCNEMAR_EXACT_BELOW if exact is None else exact
    if use_exact:
        method, statistic = "exact McNemar (binomial)", float(min(b, c))
        p_value = min(1.0, 2.0 * float(binom.cdf(min(b, c), discordant, 0.5))) if discordant else 1.0
    else:
        method = "McNemar chi-square (continuity-corrected)"
        statistic = (abs(b - c) - 1) ** 2 / discordant if discordant else 0.0
        p_value = float(chi2.sf(statistic, 1)) if discordant else 1.0
    diff = (b - c) / n
    half = float(norm.ppf(1 - alpha / 2)) * math.sqrt(max(discordant - (b - c) ** 2 / n, 0.0)) / n
    note = f"{b} cases right only by A, {c} right only by B"
    low, high = max(-1.0, diff - half), min(1.0, diff + half)
    return McNemar(diff, low, high, p_value, n, method, note, only_a=b, only_b=c, statistic=statistic)


# ------------------------------------------------------------------------------------------ decision curves
#: Threshold probabilities of a decision curve: 0.01, 0.02, …, 0.99.
DECISION_THRESHOLDS = np.round(np.arange(1, 100) / 100, 2)


@dataclass(frozen=True)
class DecisionCurve:
    """Net benefit (true positives per case, net of the false positives weighed by the odds of the threshold)
    at each threshold probability ``thresholds`` (shape ``(k,)``): of the model, of treating (biopsying)
    every lesion, and of treating none (0 everywhere), over ``n`` cases with malignant fraction ``prevalence``."""

    thresholds: np.ndarray
    model: np.ndarray
    treat_all: np.ndarray
    treat_none: np.ndarray
    n: int
    prevalence: float


def decision_curve(y_true: ArrayLike, prob: ArrayLike, thresholds: ArrayLike | None = None) -> DecisionCurve:
    """Decision-curve analysis (Vickers & Elkin, 2006) of malignancy probabilities ``prob`` against ``y_true``.

    At threshold probability ``pt`` a lesion is treated when ``prob > pt`` (strictly, as
    :func:`shared.metrics.binary_metrics`), and ``NB(pt) = TP/n - FP/n · pt / (1 - pt)``: the benefit of the
    malignant lesions found, less the harm of the benign ones treated, at the exchange rate a clinician who
    treats from risk ``pt`` on accepts. Treat-all: ``prevalence - (1 - prevalence) · pt / (1 - pt)``;
    treat-none: 0. ``thresholds`` must lie in (0, 1) (default :data:`DECISION_THRESHOLDS`).
    """
    labels, probs = labels_and_probabilities(y_true, prob)
    pts = np.asarray(DECISION_THRESHOLDS if thresholds is None else thresholds, dtype=np.float64)
    if pts.ndim != 1 or pts.size == 0 or not np.all((pts > 0) & (pts < 1)):
        raise ValueError("thresholds must be a non-empty 1-D array of probabilities in (0, 1)")
    n, odds = labels.size, pts / (1 - pts)
    treated = probs[None, :] > pts[:, None]
    tp = np.sum(treated & labels[None, :], axis=1)
    fp = np.sum(treated & ~labels[None, :], axis=1)
    prevalence = float(labels.mean())
    return DecisionCurve(
        thresholds=pts,
        model=tp / n - fp / n * odds,
        treat_all=prevalence - (1 - prevalence) * odds,
        treat_none=np.zeros_like(pts),
        n=n,
        prevalence=prevalence,
    )
