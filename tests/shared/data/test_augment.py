"""Training augmentation: seeded per case and draw, masks stay binary and aligned, flips, checked settings.

What the loaders do with it (evaluation untouched, off = the old items) is tested in test_loaders.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from shared.config import ConfigError, DataConfig, load_config
from shared.data.augment import TrainAugmentation, build_augmentation

CONFIG = DataConfig()
#: Geometry only, every transform applied: flips, rotation and zoom always on, no intensity change.
GEOMETRY = DataConfig(
    augment_prob=1.0,
    augment_flip_prob=0.5,
    augment_rotate_deg=20.0,
    augment_zoom=0.2,
    augment_speckle_std=0.0,
    augment_blur_sigma=0.0,
    augment_gamma=0.0,
    augment_intensity=0.0,
)


def _ellipsoid(shape: tuple[int, int, int] = (20, 24, 28)) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    centre = np.asarray(shape, dtype=float)[:, None, None, None] / 2
    radii = np.asarray([5.0, 7.0, 4.0])[:, None, None, None]
    return (((grid - centre) / radii) ** 2).sum(0).__le__(1.0).astype(np.uint8)


def test_same_seed_case_and_draw_give_the_same_augmentation() -> None:
    mask = _ellipsoid()
    rng = np.random.default_rng(0)
    image = rng.normal(size=mask.shape).astype(np.float32) + 2 * mask
    strong = dataclasses.replace(CONFIG, augment_prob=1.0)

    def draws(seed: int, order: list[str]) -> dict[str, list[np.ndarray]]:
        augment = TrainAugmentation(strong, seed=seed, stream="seg")
        out: dict[str, list[np.ndarray]] = {}
        for case in order:
            out.setdefault(case, []).append(augment(image, mask, pad_value=-1.0, case_id=case)[0])
        return out

    first, again = draws(7, ["a", "b", "a"]), draws(7, ["b", "a", "a"])
    for case in ("a", "b"):  # the other cases' draws (order, Poisson sampling) change nothing
        for x, y in zip(first[case], again[case], strict=True):
            assert np.array_equal(x, y)
    assert not np.array_equal(first["a"][0], first["a"][1])  # the next epoch's draw is a new one
    assert not np.array_equal(first["a"][0], draws(8, ["a"])["a"][0])
    assert not np.array_equal(first["a"][0], image)


@pytest.mark.parametrize("seed", range(6))
def test_mask_stays_binary_and_aligned_with_the_image(seed: int) -> None:
    mask, k, pad = _ellipsoid(), 5.0, -0.75
    image = (pad + k * mask).astype(np.float32)  # the support of the image is the mask
    out_image, out_mask = TrainAugmentation(GEOMETRY, seed=seed, stream="seg")(
        image, mask, pad_value=pad, case_id="c"
    )
    assert out_mask.dtype == np.uint8 and set(np.unique(out_mask)) <= {0, 1} and out_mask.sum() > 0
    support = out_image > pad + 1e-3
    assert np.all(support[out_mask > 0])  # linear and nearest agree on every mask voxel
    # Two resamplings (rotation, zoom), each of which may spread the linear image by one voxel beyond the mask:
    near = ndimage.binary_dilation(out_mask > 0, structure=np.ones((3, 3, 3)), iterations=2)
    assert not np.any(support & ~near)
    assert np.allclose(out_image[~near], pad, atol=1e-3)  # outside stays the padding value (raw 0)
    halves = out_image > pad + k / 2
    dice = 2 * np.sum(halves & (out_mask > 0)) / (halves.sum() + out_mask.sum())
    assert dice > 0.88


def test_flips_are_along_sweep_and_lateral_never_depth() -> None:
    flips = dataclasses.replace(GEOMETRY, augment_flip_prob=1.0, augment_prob=0.0)
    mask = _ellipsoid()
    image = np.arange(mask.size, dtype=np.float32).reshape(mask.shape)
    out_image, out_mask = TrainAugmentation(flips, seed=0, stream="seg")(
        image, mask, pad_value=0.0, case_id="c"
    )
    assert np.array_equal(out_image, np.flip(image, (0, 2)))
    assert np.array_equal(out_mask, np.flip(mask, (0, 2)))


def test_intensity_transforms_leave_the_mask_alone() -> None:
    intensity = dataclasses.replace(
        CONFIG, augment_prob=1.0, augment_flip_prob=0.0, augment_rotate_deg=0.0, augment_zoom=0.0
    )
    mask = _ellipsoid()
    image = np.random.default_rng(1).uniform(0.5, 2.0, size=mask.shape).astype(np.float32)
    out_image, out_mask = TrainAugmentation(intensity, seed=0, stream="seg")(
        image, mask, pad_value=0.0, case_id="c"
    )
    assert np.array_equal(out_mask, mask) and not np.allclose(out_image, image)
    assert np.isfinite(out_image).all()


def test_settings_are_checked_and_off_builds_nothing() -> None:
    assert build_augmentation(dataclasses.replace(CONFIG, augment=False), seed=0, stream="seg") is None
    with pytest.raises(ConfigError, match="data.augment-flip-prob = 1.5"):
        load_config({"data.augment-flip-prob": 1.5})
    with pytest.raises(ConfigError, match="data.augment-zoom"):
        DataConfig(augment_zoom=1.0)
    with pytest.raises(ValueError, match="num_workers = 2"):
        build_augmentation(CONFIG, seed=0, stream="seg", num_workers=2)
