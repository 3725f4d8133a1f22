"""The pure parts of benchmarks/bench_byzantine.py: the attacks on a packed update and the drop arithmetic."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling ``harness``
    try:
        yield importlib.import_module("bench_byzantine")
    finally:
        sys.path.remove(str(BENCHMARKS))


GLOBAL = {"cls": np.float32([1.0, 1.0]), "seg": np.float32([0.0, 2.0, -1.0])}
HONEST = {"cls": np.float32([1.5, 0.5]), "seg": np.float32([0.5, 2.0, -2.0])}


def flat(packed) -> np.ndarray:
    return np.concatenate([np.asarray(packed[k], dtype=np.float64) for k in sorted(packed)])


def test_sign_flip_and_scale_act_on_the_update_not_the_adapter(bench):
    rng = np.random.default_rng(0)
    delta = flat(HONEST) - flat(GLOBAL)
    flipped = bench.attack_update("sign_flip", HONEST, GLOBAL, rng=rng)
    np.testing.assert_allclose(flat(flipped), flat(GLOBAL) - delta)
    scaled = bench.attack_update("scale", HONEST, GLOBAL, rng=rng, scale=1e3)
    np.testing.assert_allclose(flat(scaled), flat(GLOBAL) + 1e3 * delta, rtol=1e-6)
    assert bench.update_norm(scaled, GLOBAL) == pytest.approx(1e3 * np.linalg.norm(delta), rel=1e-6)
    assert all(v.dtype == np.float32 and v.shape == GLOBAL[k].shape for k, v in scaled.items())
    np.testing.assert_allclose(flat(bench.attack_update("label_flip", HONEST, GLOBAL, rng=rng)), flat(HONEST))


def test_noise_replaces_the_update_with_noise_scaled_to_its_rms(bench):
    big = {"seg": np.zeros(20000, dtype=np.float32)}
    honest = {"seg": np.full(20000, 0.01, dtype=np.float32)}  # RMS 0.01
    noisy = bench.attack_update("noise", honest, big, rng=np.random.default_rng(1), noise=10.0)
    assert np.std(noisy["seg"]) == pytest.approx(0.1, rel=0.05) and abs(np.mean(noisy["seg"])) < 0.005
    with pytest.raises(ValueError, match="unknown attack 'bogus'"):
        bench.attack_update("bogus", honest, big, rng=np.random.default_rng(1))


def test_drops_and_site_means_ignore_nan(bench):
    per_site = {"a": {"dice": 0.5, "auc": math.nan}, "b": {"dice": 0.7, "auc": 0.8}}
    assert bench.site_mean(per_site, ("dice", "auc")) == pytest.approx({"dice": 0.6, "auc": 0.8})
    assert math.isnan(bench.site_mean({"a": {"auc": math.nan}}, ("auc",))["auc"])
    assert bench.drops({"dice": 0.6, "auc": 0.8}, {"dice": 0.1}) == pytest.approx({"dice": 0.5})
    assert bench.json_safe({"x": [math.nan, 1.0, math.inf]}) == {"x": [None, 1.0, None]}
