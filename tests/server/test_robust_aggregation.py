"""Robust aggregation as server/strategies.py configures it, on mocked replies with answers computed by hand.

Five sites, every element of a site's adapter at one value (the global adapter is 0, so values are updates):
four honest sites at 0.7, 1.0, 1.1 and 1.5 and one Byzantine site that flips the sign (and scales by 1e3).
By hand, with ``num-malicious = 1`` (Krum scores each update by its squared distances to its n - f - 2 = 2
nearest others, per element): 0.7 -> 0.09 + 0.16 = 0.25, 1.0 -> 0.01 + 0.09 = 0.10, 1.1 -> 0.01 + 0.16 = 0.17,
1.5 -> 0.16 + 0.25 = 0.41, the Byzantine one far more: Krum picks 1.0. The median is 1.0; the trimmed mean with
``trim-beta = 0.2`` drops one value at each end and averages 0.7, 1.0, 1.1.
"""

from __future__ import annotations

import numpy as np
import pytest

from shared.config import FederationConfig

HONEST = (0.7, 1.0, 1.1, 1.5)
TRIMMED = (0.7 + 1.0 + 1.1) / 3
#: What each strategy makes of the five updates; the Byzantine value is the last. ``multikrum`` as configured
#: (Flower's default ``num_nodes_to_select = 1``) selects one update, like Krum.
ROBUST = {"fedmedian": 1.0, "fedtrimmedavg": TRIMMED, "krum": 1.0, "multikrum": 1.0}


def round_with(train_round, strategy: str, byzantine: float, **federation) -> np.ndarray:
    config = FederationConfig(strategy=strategy, min_sites=2, num_malicious=1, trim_beta=0.2, **federation)
    rnd = train_round(config)
    values = (*HONEST, byzantine)
    aggregate = rnd.aggregate([rnd.reply(node, value) for node, value in enumerate(values, start=1)])
    assert rnd.strategy.last_refusals == {}  # every update was admitted: the aggregator alone decides
    return aggregate


@pytest.mark.parametrize("strategy", sorted(ROBUST))
def test_robust_aggregators_resist_a_scaled_sign_flipped_update_that_fedavg_follows(train_round, strategy):
    # the norm-ratio bound would refuse a 1e3 x update; turned off here to test the aggregators themselves
    byzantine = -1e3 * 1.0
    mean = round_with(train_round, "fedavg", byzantine, max_update_norm_ratio=0)
    np.testing.assert_allclose(mean, (sum(HONEST) + byzantine) / 5, rtol=1e-6)
    assert mean[0] < -100  # FedAvg follows the attacker
    robust = round_with(train_round, strategy, byzantine, max_update_norm_ratio=0)
    np.testing.assert_allclose(robust, ROBUST[strategy], rtol=1e-6)


@pytest.mark.parametrize("strategy", sorted(ROBUST))
def test_a_plain_sign_flip_passes_admission_and_only_robust_aggregators_ignore_it(train_round, strategy):
    mean = round_with(train_round, "fedavg", -1.0)  # default admission: same norm as honest updates
    np.testing.assert_allclose(mean, (sum(HONEST) - 1.0) / 5, rtol=1e-6)
    np.testing.assert_allclose(round_with(train_round, strategy, -1.0), ROBUST[strategy], rtol=1e-6)


def test_fedmedian_and_trimmed_mean_are_element_wise(train_round):
    rnd = train_round(FederationConfig(strategy="fedmedian", min_sites=2))
    columns = [(0.1, 5.0, -3.0), (0.2, 4.0, -2.0), (0.3, 3.0, -1.0), (0.4, 2.0, 0.0), (0.5, 1.0, 1.0)]
    replies = [
        rnd.reply(n, {"cls": np.float32([c]), "seg": np.float32([s, t])})
        for n, (c, s, t) in enumerate(columns, start=1)
    ]
    np.testing.assert_allclose(rnd.aggregate(replies), [0.3, 3.0, -1.0], rtol=1e-6)


def test_fedavg_weights_by_training_cases_and_the_robust_ones_do_not(train_round):
    values, cases = (1.0, 1.1, 0.9, 1.2, 5.0), (1, 1, 1, 1, 96)
    mean = train_round(FederationConfig(strategy="fedavg", min_sites=2))
    replies = [mean.reply(n, v, examples=k) for n, (v, k) in enumerate(zip(values, cases, strict=True), 1)]
    np.testing.assert_allclose(mean.aggregate(replies), (4.2 + 5.0 * 96) / 100, rtol=1e-6)
    median = train_round(FederationConfig(strategy="fedmedian", min_sites=2))
    replies = [median.reply(n, v, examples=k) for n, (v, k) in enumerate(zip(values, cases, strict=True), 1)]
    np.testing.assert_allclose(median.aggregate(replies), 1.1, rtol=1e-6)


#: Three sites' updates and training cases whose float32 weighted sum depends on the order it is taken in.
ORDERED_UPDATES = {
    "site_a": ({"cls": np.float32([0.1]), "seg": np.float32([0.7, 1.3])}, 3),
    "site_b": ({"cls": np.float32([0.3]), "seg": np.float32([0.2, 0.9])}, 7),
    "site_c": ({"cls": np.float32([0.7]), "seg": np.float32([1.1, 0.6])}, 11),
}


def test_fedavg_of_the_same_replies_is_bit_identical_in_any_arrival_order(train_round):
    from itertools import permutations

    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from shared.protocol import NUM_EXAMPLES

    def replies(rnd, order):
        return [
            rnd.reply(node, ORDERED_UPDATES[site][0], site=site, examples=ORDERED_UPDATES[site][1])
            for node, site in sorted(enumerate(ORDERED_UPDATES, start=1), key=lambda p: order.index(p[1]))
        ]

    orders = list(permutations(ORDERED_UPDATES))
    # The premise: Flower's own weighted sum gives other bits in another order.
    plain = train_round(FederationConfig(strategy="fedavg", min_sites=2), sites=3)

    def as_bytes(arrays) -> bytes:
        return b"".join(arrays[name].numpy().tobytes() for name in sorted(arrays.keys()))

    raw = {
        as_bytes(aggregate_arrayrecords([m.content for m in replies(plain, order)], NUM_EXAMPLES))
        for order in orders
    }
    assert len(raw) > 1
    # Ours: every order gives the same bytes (a fresh strategy per order: one update per site and round).
    results = set()
    for order in orders:
        rnd = train_round(FederationConfig(strategy="fedavg", min_sites=2), sites=3)
        arrays, _ = rnd.strategy.aggregate_train(rnd.server_round, replies(rnd, order))
        results.add(as_bytes(arrays))
    assert len(results) == 1
