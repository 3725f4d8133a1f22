"""Admission of site updates before aggregation (server/admission.py, applied by the strategies' hooks)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.admission import AdmissionLimits, Candidate, admit, check_metrics
from server.reports import RoundReport, round_summary
from shared.config import ConfigError, FederationConfig, PrivacyConfig

#: Five honest sites: every element of site-i's adapter at HONEST[i - 1]; ten training cases each.
HONEST = (1.0, 1.1, 0.9, 1.2, 1.05)


def fedavg(values_and_weights: list[tuple[float, float]]) -> float:
    total = sum(w for _, w in values_and_weights)
    return sum(v * w for v, w in values_and_weights) / total


def honest_replies(rnd, count: int = 4) -> list:
    return [rnd.reply(node, value) for node, value in enumerate(HONEST[:count], start=1)]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"seg": np.ones(2, np.float32), "lora": np.ones(1, np.float32)}, "not the global adapter's"),
        ({"cls": np.ones(1, np.float32), "seg": np.ones(4, np.float32)}, "has shape (4,)"),
        ({"cls": np.ones(1, np.float64), "seg": np.ones(2, np.float64)}, "expected float32"),
        ({"cls": np.ones(1, np.float32), "seg": np.array([1.0, math.nan], np.float32)}, "NaN or Inf"),
        ({"cls": np.full(1, math.inf, np.float32), "seg": np.ones(2, np.float32)}, "NaN or Inf"),
    ],
)
def test_a_malformed_update_is_refused_and_the_others_are_aggregated(train_round, caplog, bad, reason):
    rnd = train_round(FederationConfig(strategy="fedavg", min_sites=2))
    aggregate = rnd.aggregate([*honest_replies(rnd), rnd.reply(5, bad)])
    np.testing.assert_allclose(aggregate, fedavg([(v, 10) for v in HONEST[:4]]), rtol=1e-6)
    assert list(rnd.strategy.last_refusals) == ["site-5"] and reason in rnd.strategy.last_refusals["site-5"]
    assert "site-5" not in rnd.strategy.last_train_metrics  # refused: its metrics are not tracked either
    assert "update of site site-5 refused" in caplog.text


def test_the_aggregate_is_exactly_fedavg_of_the_admitted_updates(train_round):
    rnd = train_round(FederationConfig(strategy="fedavg", min_sites=2), global_value=0.5)
    replies = [
        rnd.reply(1, 1.0, examples=3),
        rnd.reply(2, 2.0, examples=1),
        rnd.reply(3, 1.5, examples=6),
        rnd.reply(4, math.nan, examples=100),  # would dominate the weighted mean
        rnd.reply(5, 1.2, examples=5, server_round=0),  # stale
    ]
    aggregate = rnd.aggregate(replies)
    expected = fedavg([(1.0, 3), (2.0, 1), (1.5, 6)])
    np.testing.assert_allclose(aggregate, np.full(3, expected), rtol=1e-6)
    assert sorted(rnd.strategy.last_refusals) == ["site-4", "site-5"]


def test_an_update_above_the_absolute_norm_bound_is_refused(train_round):
    federation = FederationConfig(
        strategy="fedavg", min_sites=2, max_update_norm=3.0, max_update_norm_ratio=0
    )
    rnd = train_round(federation, global_value=1.0)
    # norm of (value - 1) over 3 elements: 1.5 * sqrt(3) = 2.6 passes, 2.5 * sqrt(3) = 4.3 does not
    aggregate = rnd.aggregate([rnd.reply(1, 2.5), rnd.reply(2, 0.0), rnd.reply(3, 3.5)])
    np.testing.assert_allclose(aggregate, 1.25, rtol=1e-6)
    assert "> federation.max-update-norm 3" in rnd.strategy.last_refusals["site-3"]


def test_an_update_far_above_the_rounds_median_norm_is_refused(train_round):
    rnd = train_round(FederationConfig(strategy="fedavg", min_sites=2))  # ratio 10 by default
    aggregate = rnd.aggregate([*honest_replies(rnd), rnd.reply(5, 1e3)])
    np.testing.assert_allclose(aggregate, fedavg([(v, 10) for v in HONEST[:4]]), rtol=1e-6)
    assert "x the round's median update norm" in rnd.strategy.last_refusals["site-5"]
    below = train_round(FederationConfig(strategy="fedavg", min_sites=2))
    below.aggregate([*honest_replies(below), below.reply(5, 9.0)])  # 9 < 10 x the median 1.1: admitted
    assert below.strategy.last_refusals == {}


@pytest.mark.parametrize(
    ("answered", "reason"), [(0, "answers round 0"), (2, "answers round 2"), (None, "does not say")]
)
def test_a_stale_or_unnumbered_reply_is_refused(train_round, answered, reason):
    rnd = train_round(FederationConfig(strategy="fedavg", min_sites=2))
    late = rnd.reply(5, 1.0, server_round=answered if answered is not None else 1)
    if answered is None:
        del late.content["site"]["server-round"]
    rnd.aggregate([*honest_replies(rnd), late])
    assert reason in rnd.strategy.last_refusals["site-5"]


def test_a_replayed_reply_is_refused_in_the_round_and_later(train_round):
    rnd = train_round(FederationConfig(strategy="fedavg", min_sites=2))
    first = rnd.reply(1, 1.0)
    aggregate = rnd.aggregate([first, rnd.reply(2, 2.0), rnd.reply(1, 50.0, site="site-1")])
    np.testing.assert_allclose(aggregate, 1.5, rtol=1e-6)  # the first reply of site-1 counts
    assert "second update from this site" in rnd.strategy.last_refusals["site-1"]
    rnd.aggregate([rnd.reply(1, 1.0), rnd.reply(3, 1.0), rnd.reply(4, 1.0)])  # the same round again
    assert "site-1" in rnd.strategy.last_refusals and "site-3" not in rnd.strategy.last_refusals


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"num-examples": -1}, "num-examples = -1.0"),
        ({"num-examples": math.nan}, "num-examples = nan"),
        ({"num-examples": math.inf}, "num-examples = inf"),
        ({"train/seg_loss": math.inf}, "train/seg_loss = inf"),
        ({"train/cls_loss": -0.1}, "train/cls_loss = -0.1"),
        ({"val/dice_1click": 1.5}, "outside [0, 1]"),
        ({"val/auc": -0.2}, "outside [0, 1]"),
    ],
)
def test_metrics_out_of_range_are_refused(train_round, metrics, reason):
    rnd = train_round(FederationConfig(strategy="fedavg", min_sites=2))
    bad = rnd.reply(5, 1.0)
    for key, value in metrics.items():
        bad.content["metrics"][key] = value
    rnd.aggregate([*honest_replies(rnd), bad])
    assert reason in rnd.strategy.last_refusals["site-5"]


def test_nan_dice_auc_and_loss_mean_not_measured_and_pass():
    metrics = {"num-examples": 4, "val/dice": math.nan, "val/auc": 0.9, "train/cls_loss": math.nan}
    assert check_metrics(metrics) is None
    assert check_metrics({"train/seg_loss": 0.1}) == "no 'num-examples' metric"


def test_below_min_sites_after_refusals_the_round_keeps_the_global_adapter(train_round, caplog):
    rnd = train_round(FederationConfig(strategy="fedavg", min_sites=3))
    replies = [rnd.reply(1, 1.0), rnd.reply(2, 1.1), rnd.reply(3, math.inf)]
    assert rnd.aggregate(replies) is None
    assert "only 2 update(s) admitted, 1 refused; federation.min-sites = 3" in caplog.text
    assert "global adapter is unchanged" in caplog.text
    assert list(rnd.strategy.last_refusals) == ["site-3"]


def test_two_records_of_a_kind_are_refused_before_flower_would_stop_the_run(train_round):
    from server.strategies import site_of

    rnd = train_round(FederationConfig(strategy="fedavg", min_sites=2))
    doubled = rnd.reply(5, 1.0)
    doubled.content["extra"] = doubled.content["arrays"].copy()
    rnd.aggregate([*honest_replies(rnd), doubled])
    assert site_of(doubled) in rnd.strategy.last_refusals
    assert "array records ['arrays', 'extra']" in rnd.strategy.last_refusals["site-5"]


def test_client_dp_admits_before_clipping_and_a_refused_update_is_a_zero_update(train_round):
    federation = FederationConfig(
        strategy="fedavg", min_sites=2, max_update_norm=5.0, max_update_norm_ratio=0
    )
    privacy = PrivacyConfig(client_dp="server-fixed", client_noise_multiplier=0.0, client_clip_norm=1.0)
    rnd = train_round(federation, privacy=privacy, sites=3)
    # norms over 3 elements: 0.87 (kept as is), 3.5 (clipped to 1), 17 (> 5: refused, though clipping would
    # have made it harmless-looking); the sum is divided by the 3 sampled sites
    aggregate = rnd.aggregate([rnd.reply(1, 0.5), rnd.reply(2, 2.0), rnd.reply(3, 10.0)])
    np.testing.assert_allclose(aggregate, (0.5 + 1 / math.sqrt(3)) / 3, rtol=1e-5)
    assert list(rnd.strategy.last_refusals) == ["site-3"]
    assert set(rnd.strategy.last_train_metrics) == {"site-1", "site-2"}


def test_admit_on_plain_data_refuses_by_norm_only_what_passed_the_other_checks():
    reference = {"seg": np.zeros(2, np.float32)}

    def candidate(site: str, value: float) -> Candidate:
        return Candidate(site, 3, {"seg": np.full(2, value, np.float32)}, {"num-examples": 1.0})

    decision = admit(
        [candidate("a", 1.0), candidate("b", math.nan), candidate("c", 2.0), candidate("d", 100.0)],
        reference=reference,
        server_round=3,
        limits=AdmissionLimits(max_norm=0.0, max_norm_ratio=10.0),
    )
    assert decision.admitted == [0, 2]
    assert [(i, site) for i, site, _ in decision.refused] == [(1, "b"), (3, "d")]
    assert decision.norms[0] == pytest.approx(math.sqrt(2)) and math.isnan(decision.norms[1])


def test_masked_updates_are_checked_for_layout_round_and_metrics_but_not_values_or_norms():
    """Under secure aggregation the arrays are uint64 ring elements: huge values pass (they say nothing), a float
    array or another length does not, nor does a bad metric."""
    reference = {"seg": np.zeros(2, np.float32)}

    def candidate(site: str, arrays, metrics=None) -> Candidate:
        return Candidate(site, 3, {"seg": arrays}, metrics or {"num-examples": 1.0})

    ring = np.array([2**64 - 1, 2**63], dtype=np.uint64)
    decision = admit(
        [
            candidate("a", ring),
            candidate("b", ring // np.uint64(3)),
            candidate("c", np.zeros(2, np.float32)),
            candidate("d", np.zeros(3, np.uint64)),
            candidate("e", ring, {"num-examples": -1.0}),
        ],
        reference=reference,
        server_round=3,
        limits=AdmissionLimits(max_norm=1.0, max_norm_ratio=10.0),
        masked=True,
    )
    assert decision.admitted == [0, 1]
    reasons = {site: reason for _, site, reason in decision.refused}
    assert "expected uint64" in reasons["c"] and "shape" in reasons["d"] and "num-examples" in reasons["e"]


@pytest.mark.parametrize("settings", [{"max_update_norm": -1.0}, {"max_update_norm_ratio": math.inf}])
def test_invalid_bounds_are_refused_naming_the_key(settings):
    from server.strategies import build_strategy

    with pytest.raises(ConfigError, match="federation.max-update-norm"):
        build_strategy(FederationConfig(strategy="fedavg", **settings))


def test_refusals_reach_the_round_report_and_its_summary():
    report = RoundReport.from_site_metrics(
        2,
        training={"a": {"num-examples": 3, "train/seg_loss": 0.2}},
        global_metrics={"federation/refused_updates": 1.0},
        refused={"b": "array 'seg' holds NaN or Inf"},
    )
    assert report.parent_metrics()["federation/refused_updates"] == 1.0
    assert RoundReport.from_json(report.to_json()) == report
    assert round_summary(report)["refused"] == {"b": "array 'seg' holds NaN or Inf"}
