"""Tests of shared.decision_analysis: McNemar against scipy and hand examples, decision curves by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest, chi2

from shared.decision_analysis import MCNEMAR_EXACT_BELOW, decision_curve, mcnemar


# ------------------------------------------------------------------------------------------------ McNemar
def test_mcnemar_on_a_hand_example_matches_scipy_binomtest() -> None:
    y = np.array([1] * 20)
    # 10 both right, 7 right only by A, 2 right only by B, 1 both wrong
    pred_a = np.array([1] * 10 + [1] * 7 + [0] * 2 + [0])
    pred_b = np.array([1] * 10 + [0] * 7 + [1] * 2 + [0])
    result = mcnemar(y, pred_a, pred_b)
    assert result.diff == pytest.approx((17 - 12) / 20)
    assert result.p_value == pytest.approx(binomtest(7, 9, 0.5).pvalue)
    assert result.ci_low < result.diff < result.ci_high
    assert mcnemar(y, pred_b, pred_a).p_value == pytest.approx(result.p_value)


def test_mcnemar_exact_p_value_by_hand() -> None:
    # b = 7 right only by A, c = 2 right only by B: p = 2 P(X <= 2), X ~ Bin(9, 1/2) = 2 (1 + 9 + 36) / 512
    y = np.array([1] * 20)
    pred_a = np.array([1] * 10 + [1] * 7 + [0] * 2 + [0])
    pred_b = np.array([1] * 10 + [0] * 7 + [1] * 2 + [0])
    result = mcnemar(y, pred_a, pred_b)
    assert (result.only_a, result.only_b, result.statistic) == (7, 2, 2.0)
    assert result.p_value == pytest.approx(92 / 512) and result.method.startswith("exact")


def test_mcnemar_chi_square_with_continuity_correction_by_hand() -> None:
    # b = 20, c = 10 (30 >= 25 discordant): chi² = (|20 - 10| - 1)² / 30 = 2.7 and, with 1 degree of freedom,
    # p = erfc(sqrt(chi² / 2)) = 0.100348..., as statsmodels' mcnemar(exact=False, correction=True) gives.
    y = np.ones(40, dtype=int)
    pred_a = np.array([1] * 20 + [0] * 10 + [1] * 5 + [0] * 5)
    pred_b = np.array([0] * 20 + [1] * 10 + [1] * 5 + [0] * 5)
    result = mcnemar(y, pred_a, pred_b)
    assert 30 >= MCNEMAR_EXACT_BELOW and (result.only_a, result.only_b) == (20, 10)
    assert result.statistic == pytest.approx(2.7) and result.method.startswith("McNemar chi-square")
    assert result.p_value == pytest.approx(math.erfc(math.sqrt(2.7 / 2))) == pytest.approx(0.1003482465)
    assert result.p_value == pytest.approx(chi2.sf(2.7, 1))
    assert result.diff == pytest.approx(10 / 40)
    # forcing the exact test on the same counts: 2 P(X <= 10), X ~ Bin(30, 1/2)
    assert mcnemar(y, pred_a, pred_b, exact=True).p_value == pytest.approx(binomtest(10, 30, 0.5).pvalue)


def test_mcnemar_without_discordant_pairs_has_p_one() -> None:
    result = mcnemar([0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0])
    assert result.diff == 0 and result.p_value == 1.0
    with pytest.raises(ValueError, match="pred_b"):
        mcnemar([0, 1], [0, 1], [0, 1, 1])


# ----------------------------------------------------------------------------------------- decision curves
def test_decision_curve_net_benefit_by_hand() -> None:
    y = [1, 1, 0, 0]
    prob = [0.9, 0.4, 0.6, 0.1]
    curve = decision_curve(y, prob, thresholds=[0.25, 0.5, 0.95])
    # pt = 0.25: treated 0.9, 0.4, 0.6 (TP 2, FP 1): 2/4 - 1/4 · 1/3; pt = 0.5: 0.9, 0.6 (TP 1, FP 1): 1/4 - 1/4
    # pt = 0.95: none treated: 0
    assert curve.model == pytest.approx([0.5 - 1 / 12, 0.0, 0.0])
    assert curve.treat_all == pytest.approx([0.5 - 0.5 / 3, 0.0, 0.5 - 0.5 * 19])
    assert list(curve.treat_none) == [0.0, 0.0, 0.0]
    assert (curve.n, curve.prevalence) == (4, 0.5)


def test_decision_curve_default_grid_and_bad_thresholds() -> None:
    curve = decision_curve([1, 0, 1], [0.8, 0.2, 0.7])
    assert curve.thresholds[0] == 0.01 and curve.thresholds[-1] == 0.99 and curve.thresholds.size == 99
    # a perfect classifier's net benefit is the prevalence between its largest benign and its smallest
    # malignant probability (every malignant lesion treated, no benign one)
    between = (curve.thresholds >= 0.2) & (curve.thresholds < 0.7)
    assert curve.model[between] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="thresholds"):
        decision_curve([1, 0], [0.8, 0.2], thresholds=[0.0, 0.5])
