"""The maths of secure aggregation (shared/secagg.py): exact mask cancellation, the weighted mean to well below
float32 rounding, a masked payload that says nothing about its update, Shamir thresholds and share transport."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from scipy import stats

from shared.secagg import (
    KeyPair,
    SecAggError,
    SiteShares,
    check_unmask_request,
    combine_secret,
    decode,
    decrypt_shares,
    encode,
    encrypt_shares,
    expand,
    flatten,
    mask,
    pair_seed,
    split_secret,
    threshold_for,
    unflatten,
    unmask,
)

ROUND = 7


def _seed(label: str) -> bytes:
    """A fixed 32-byte seed, so statistical tests are deterministic."""
    return hashlib.sha256(label.encode()).digest()


def _keys(ids):
    return {i: KeyPair.from_private(_seed(f"key-{i}")) for i in ids}


def _pair_seeds(me, keys, peers):
    return {
        j: pair_seed(keys[me].private, keys[j].public, server_round=ROUND, me=me, peer=j)
        for j in peers
        if j != me
    }


def _masked_inputs(updates, weights, ids):
    """Each site's masked input (all sites keyed), and the self seeds: what a round sends the server."""
    keys, self_seeds, inputs = _keys(ids), {i: _seed(f"self-{i}") for i in ids}, {}
    for i, update, weight in zip(ids, updates, weights, strict=True):
        encoded = encode(update, weight, num_sites=len(ids))
        inputs[i] = mask(encoded, me=i, self_seed=self_seeds[i], pair_seeds=_pair_seeds(i, keys, ids))
    return inputs, self_seeds, keys


def _ring_sum(vectors):
    vectors = list(vectors)
    total = np.zeros_like(vectors[0])
    for vector in vectors:
        total = total + vector
    return total


def test_pair_seeds_agree_from_either_side_and_differ_per_round():
    keys = _keys([3, 11])
    a = pair_seed(keys[3].private, keys[11].public, server_round=ROUND, me=3, peer=11)
    b = pair_seed(keys[11].private, keys[3].public, server_round=ROUND, me=11, peer=3)
    other_round = pair_seed(keys[3].private, keys[11].public, server_round=ROUND + 1, me=3, peer=11)
    assert a == b and a != other_round


def test_pairwise_masks_cancel_exactly_in_the_ring():
    ids, rng = [5, 2, 9], np.random.default_rng(0)
    updates = [rng.normal(size=1000).astype(np.float32) for _ in ids]
    inputs, self_seeds, _ = _masked_inputs(updates, [1.0, 1.0, 1.0], ids)
    total = _ring_sum(inputs.values())
    for seed in self_seeds.values():
        total = total - expand(seed, total.size)
    encoded = _ring_sum(encode(u, 1.0, num_sites=3) for u in updates)
    np.testing.assert_array_equal(total, encoded)
    assert not np.array_equal(inputs[5], encode(updates[0], 1.0, num_sites=3))  # each input is masked


def test_the_unmasked_sum_is_the_weighted_mean_to_well_below_float32_rounding():
    ids, rng = [1, 2, 3], np.random.default_rng(1)
    updates = [(rng.normal(size=(4, 25)) * scale).astype(np.float32) for scale in (1e-4, 0.3, 20.0)]
    weights = [3.0, 40.0, 11.0]
    inputs, self_seeds, keys = _masked_inputs([u.ravel() for u in updates], weights, ids)
    ring = unmask(
        _ring_sum(inputs.values()),
        self_seeds=self_seeds,
        dropped_keys={},
        public_keys={i: k.public for i, k in keys.items()},
        server_round=ROUND,
    )
    mean = decode(ring, sum(weights)).astype(np.float32).reshape(4, 25)
    plain = np.average(np.stack(updates).astype(np.float64), axis=0, weights=weights).astype(np.float32)
    np.testing.assert_allclose(mean, plain, rtol=2**-23, atol=1e-9)


def test_a_site_that_drops_before_sending_its_input_is_unmasked_from_its_key_shares():
    """Site 9 exchanged keys (its pairwise masks are in the others' inputs) but never sent its input."""
    ids, rng = [4, 6, 9], np.random.default_rng(2)
    updates = [rng.normal(size=300).astype(np.float32) for _ in ids]
    inputs, self_seeds, keys = _masked_inputs(updates, [2.0, 5.0, 7.0], ids)
    shares = split_secret(keys[9].private, threshold=2, num_shares=3)
    rebuilt = combine_secret([shares[0], shares[1]], threshold=2)  # held by sites 4 and 6
    ring = unmask(
        inputs[4] + inputs[6],
        self_seeds={4: self_seeds[4], 6: self_seeds[6]},
        dropped_keys={9: rebuilt},
        public_keys={i: k.public for i, k in keys.items()},
        server_round=ROUND,
    )
    expected = (2.0 * updates[0].astype(np.float64) + 5.0 * updates[1].astype(np.float64)) / 7.0
    np.testing.assert_allclose(decode(ring, 7.0), expected, rtol=0, atol=1e-9)


def test_a_site_that_drops_after_sending_its_input_is_kept_in_the_sum():
    """Site 9's input arrived, then it went silent: its self-mask seed comes back from the others' shares."""
    ids, rng = [4, 6, 9], np.random.default_rng(3)
    updates = [rng.normal(size=300).astype(np.float32) for _ in ids]
    inputs, self_seeds, keys = _masked_inputs(updates, [1.0, 1.0, 1.0], ids)
    shares = split_secret(self_seeds[9], threshold=2, num_shares=3)
    rebuilt = {**self_seeds, 9: combine_secret(shares[:2], threshold=2)}
    ring = unmask(
        _ring_sum(inputs.values()),
        self_seeds=rebuilt,
        dropped_keys={},
        public_keys={i: k.public for i, k in keys.items()},
        server_round=ROUND,
    )
    np.testing.assert_allclose(decode(ring, 3.0), np.mean(updates, axis=0, dtype=np.float64), atol=1e-9)


def test_one_masked_payload_is_uniform_over_the_ring_whatever_the_update():
    """Two very different updates (zeros; ±1000 with weight 50): each payload's top bytes are uniform (χ²), and
    the two payload distributions cannot be told apart (two-sample KS). Without the masks both tests fail."""
    ids, length = [1, 2, 3], 4096
    payloads = []
    for update in (
        np.zeros(length, np.float32),
        np.where(np.arange(length) % 2, 1e3, -1e3).astype(np.float32),
    ):
        inputs, _, _ = _masked_inputs([update, np.zeros(length), np.zeros(length)], [50.0, 1.0, 1.0], ids)
        payloads.append(inputs[1])
    for payload in payloads:
        counts = np.bincount((payload >> np.uint64(56)).astype(np.int64), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-3
    as_unit = [p.astype(np.float64) / 2.0**64 for p in payloads]
    assert stats.ks_2samp(*as_unit).pvalue > 1e-3
    unmasked = [encode(np.zeros(length), 50.0, num_sites=3), encode(np.full(length, 1e3), 50.0, num_sites=3)]
    assert stats.ks_2samp(*[u.astype(np.float64) for u in unmasked]).pvalue < 1e-6  # the test can tell


def test_shamir_rebuilds_from_any_t_of_n_shares_and_not_from_fewer():
    secret = _seed("secret")
    shares = split_secret(secret, threshold=3, num_shares=5)
    for subset in itertools.combinations(shares, 3):
        assert combine_secret(list(subset), threshold=3) == secret
    with pytest.raises(SecAggError, match="3 are needed"):
        combine_secret(shares[:2], threshold=3)
    with pytest.raises(SecAggError, match="3 are needed"):
        combine_secret([shares[0], shares[0], shares[1]], threshold=3)  # a repeated share counts once
    try:
        below = combine_shares(shares[:2])  # Flower's combine does not know t: two points give another value
    except ValueError:
        below = None
    assert below != secret


def test_shares_travel_encrypted_and_bound_to_sender_receiver_and_round():
    keys = _keys([1, 2, 3])
    sent = SiteShares(self_seed=b"a" * 36, mask_key=b"b" * 52)
    box = encrypt_shares(
        sent, private=keys[1].private, peer_public=keys[2].public, server_round=ROUND, src=1, dst=2
    )
    got = decrypt_shares(
        box, private=keys[2].private, peer_public=keys[1].public, server_round=ROUND, src=1, dst=2
    )
    assert got == sent
    with pytest.raises(SecAggError, match="fail authentication"):
        decrypt_shares(
            box, private=keys[2].private, peer_public=keys[1].public, server_round=ROUND + 1, src=1, dst=2
        )
    with pytest.raises(SecAggError, match="fail authentication"):
        decrypt_shares(
            box, private=keys[3].private, peer_public=keys[1].public, server_round=ROUND, src=1, dst=3
        )


def test_an_honest_site_refuses_to_reveal_both_masks_of_one_site_or_too_few_survivors():
    with pytest.raises(SecAggError, match="both as survivors and as dropped"):
        check_unmask_request([1, 2], [2], keyed=[1, 2, 3], threshold=2)
    with pytest.raises(SecAggError, match="below the threshold"):
        check_unmask_request([1], [2, 3], keyed=[1, 2, 3], threshold=2)
    with pytest.raises(SecAggError, match="key exchange"):
        check_unmask_request([1, 2], [8], keyed=[1, 2, 3], threshold=2)
    check_unmask_request([1, 2], [3], keyed=[1, 2, 3], threshold=2)


def test_encoding_refuses_what_the_ring_cannot_hold():
    with pytest.raises(SecAggError, match="NaN or Inf"):
        encode(np.array([np.nan]), 1.0, num_sites=2)
    with pytest.raises(SecAggError, match="encodes at most"):
        encode(np.array([1e8]), 20.0, num_sites=2)


def test_flatten_and_unflatten_keep_names_and_shapes():
    arrays = {"b": np.ones((2, 3)), "a": np.arange(4.0)}
    back = unflatten(flatten(arrays), {k: v.shape for k, v in arrays.items()})
    assert {k: v.tolist() for k, v in back.items()} == {k: v.tolist() for k, v in arrays.items()}
    with pytest.raises(SecAggError, match="does not fit"):
        unflatten(np.zeros(3), {"a": (4,)})


def test_the_threshold_is_a_strict_majority_of_at_least_two():
    assert [threshold_for(n) for n in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
