"""Training-time augmentation of image and mask together (MONAI dictionary transforms), for both models.

:class:`TrainAugmentation` takes one case's ``image`` and ``mask`` (D, H, W) in the canonical orientation of
:mod:`shared.data.transforms` and returns augmented copies. The loaders apply it to the segmentation crop
(:class:`~shared.data.loaders.LesionCropd`, after the crop) and to a lesion region before the classifier's planes
are cut (:class:`~shared.data.loaders.TriPlanesd`); evaluation, validation, test and inference never see it.
Settings are the ``data.augment*`` keys of :class:`~shared.config.DataConfig`; ``data.augment = false`` leaves the
training items bit for bit as they were without augmentation.

Transforms, in order (each with its own probability; a range of 0 leaves that transform out):

1. **Flips** along the sweep (z, axis 0) and the lateral (x, axis 2) axes, each with ``augment-flip-prob``; never
   along depth (y), whose direction (skin at the top, shadowing below) is physics, not pose.
2. **Rotation** about every axis by up to ``augment-rotate-deg`` degrees (one affine resampling), then an
   **isotropic zoom** by a factor in [1 - ``augment-zoom``, 1 + ``augment-zoom``]; image linear, mask nearest
   (stays 0/1 and aligned with the image), the volume size kept. Angles and zoom act on the voxel grid.
3. **Speckle-like multiplicative noise**: raw signal × (1 + N(0, ``augment-speckle-std``)) per voxel.
4. **Gaussian blur** with σ drawn in [``augment-blur-sigma`` / 4, ``augment-blur-sigma``] voxels per axis.
5. **Gamma** in [1 / (1 + ``augment-gamma``), 1 + ``augment-gamma``] (MONAI's range-preserving contrast).
6. **Intensity**: contrast × (1 + u) and brightness + u standard deviations, u in ±``augment-intensity``.

Steps 2-4 run on the raw signal (``image - pad_value``), so that voxels brought in from outside by a rotation or a
zoom-out and the multiplicative noise behave like a raw 0 ("no signal" in ABUS), as the crops' padding does.
Steps 2-6 each run with probability ``augment-prob``.

Determinism. The random state of the ``k``-th draw of a case (``k`` = 0, 1, ... counted per case by this object) is
seeded from ``(seed, case id, k, stream)``, never from the order in which cases are drawn. Without DP each epoch
draws every case once, so ``k`` is the epoch within the loader's life (one round or one ``train-local`` chunk,
whose seed the caller varies); under DP Poisson sampling a case's augmentations depend only on how often that case
was drawn, not on the other cases' draws. The same seed gives the same augmented items; a fresh object starts at
``k`` = 0 again, which is what a resumed round does. The counters live in the process: with DataLoader workers
they would be copied per worker and epoch, so the loaders refuse ``num_workers > 0`` while augmenting.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
)

from shared.config import DataConfig

__all__ = ["CaseDraws", "RandSpeckleNoised", "TrainAugmentation", "augmentation_seed", "build_augmentation"]

_KEYS = ("image", "mask")
#: Flip axes (spatial, i.e. without the channel axis): sweep (z) and lateral (x); depth (y) never.
FLIP_AXES = (0, 2)


class RandSpeckleNoised(RandomizableTransform, MapTransform):
    """Multiplicative Gaussian noise, ``x * (1 + n)`` with ``n ~ N(0, std)`` per voxel, on ``keys`` with ``prob``.

    On a raw ultrasound signal this is a simple model of speckle: the noise grows with the echo strength and a
    voxel without signal (0) stays 0.
    """

    def __init__(self, keys: Any, *, std: float, prob: float = 0.1) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.std = float(std)
        self._noise: np.ndarray | None = None

    def randomize(self, shape: tuple[int, ...]) -> None:  # type: ignore[override]
        super().randomize(None)
        self._noise = (
            self.R.normal(0.0, self.std, size=shape).astype(np.float32) if self._do_transform else None
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        first = out[self.keys[0]]
        self.randomize(tuple(first.shape))
        if self._noise is None:
            return out
        for key in self.key_iterator(out):
            value = out[key]
            out[key] = value * (1.0 + torch.as_tensor(self._noise, dtype=value.dtype, device=value.device))
        return out


def _raw_signal_transforms(config: DataConfig) -> list[Any]:
    p = config.augment_prob
    steps: list[Any] = [RandFlipd(_KEYS, prob=config.augment_flip_prob, spatial_axis=a) for a in FLIP_AXES]
    if config.augment_rotate_deg > 0:
        angle = math.radians(config.augment_rotate_deg)
        steps.append(
            RandAffined(
                _KEYS, prob=p, rotate_range=(angle,) * 3, mode=("bilinear", "nearest"), padding_mode="zeros"
            )
        )
    if config.augment_zoom > 0:
        low, high = 1.0 - config.augment_zoom, 1.0 + config.augment_zoom
        steps.append(
            RandZoomd(
                _KEYS,
                prob=p,
                min_zoom=low,
                max_zoom=high,
                mode=("trilinear", "nearest-exact"),
                padding_mode="constant",
                keep_size=True,
            )
        )
    if config.augment_speckle_std > 0:
        steps.append(RandSpeckleNoised("image", std=config.augment_speckle_std, prob=p))
    if config.augment_blur_sigma > 0:
        sigma = (config.augment_blur_sigma / 4, config.augment_blur_sigma)
        steps.append(RandGaussianSmoothd("image", sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=p))
    return steps


def _normalised_transforms(config: DataConfig) -> list[Any]:
    p = config.augment_prob
    steps: list[Any] = []
    if config.augment_gamma > 0:
        steps.append(
            RandAdjustContrastd(
                "image", prob=p, gamma=(1 / (1 + config.augment_gamma), 1 + config.augment_gamma)
            )
        )
    if config.augment_intensity > 0:
        steps.append(RandScaleIntensityd("image", factors=config.augment_intensity, prob=p))
        steps.append(RandShiftIntensityd("image", offsets=config.augment_intensity, prob=p))
    return steps


def augmentation_seed(seed: int, case_id: str, draw: int, stream: str) -> int:
    """The 32-bit seed of the ``draw``-th augmentation of ``case_id`` in ``stream`` (``seg`` or ``cls``)."""
    words = [int(seed) % 2**64, zlib.crc32(str(case_id).encode()), int(draw), zlib.crc32(stream.encode())]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0])


class CaseDraws:
    """Random states of the successive draws of each case in one ``stream`` (module docstring, "Determinism"):
    the ``k``-th call for a case id gives ``RandomState(augmentation_seed(seed, case_id, k, stream))``."""

    def __init__(self, seed: int, stream: str) -> None:
        self.seed = int(seed)
        self.stream = stream
        self._draws: dict[str, int] = {}

    def next_state(self, case_id: str) -> np.random.RandomState:
        draw = self._draws.get(case_id, 0)
        self._draws[case_id] = draw + 1
        return np.random.RandomState(augmentation_seed(self.seed, case_id, draw, self.stream))


class TrainAugmentation:
    """Seeded augmentation of one case's image and mask (module docstring).

    Args:
        config: the ``data.augment*`` settings (``config.augment`` is not checked here: the loaders build this
            only when it is on).
        seed: training seed of the loader (``train.seed`` of the round or chunk).
        stream: ``seg`` or ``cls``, so the two models' augmentations of a case are drawn independently.
    """

    def __init__(self, config: DataConfig, *, seed: int, stream: str) -> None:
        self._draws = CaseDraws(seed, stream)
        self._raw = Compose(_raw_signal_transforms(config))
        self._normalised = Compose(_normalised_transforms(config))

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, *, pad_value: float, case_id: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augmented ``image`` (D, H, W) float32 and ``mask`` (D, H, W) uint8 0/1 of the case's next draw."""
        state = self._draws.next_state(case_id)
        self._raw.set_random_state(state=state)
        self._normalised.set_random_state(seed=int(state.randint(2**32, dtype=np.uint32)))
        item = {
            "image": torch.from_numpy(np.asarray(image, dtype=np.float32)[None] - np.float32(pad_value)),
            "mask": torch.from_numpy(np.asarray(mask, dtype=np.float32)[None]),
        }
        item = self._raw(item)
        item["image"] = item["image"] + np.float32(pad_value)
        item = self._normalised(item)
        out_image = np.asarray(torch.as_tensor(item["image"]).numpy()[0], dtype=np.float32)
        out_mask = (torch.as_tensor(item["mask"]).numpy()[0] > 0.5).astype(np.uint8)
        return out_image, out_mask


def build_augmentation(
    config: DataConfig, *, seed: int, stream: str, num_workers: int = 0
) -> TrainAugmentation | None:
    """The training augmentation of ``config`` (None when ``data.augment`` is off).

    Raises ValueError for ``num_workers > 0`` while augmenting (the per-case draw counters would be per worker).
    """
    if not config.augment:
        return None
    if num_workers > 0:
        raise ValueError(
            f"num_workers = {num_workers}: training augmentation (data.augment) is seeded per case and draw in "
            "the loading process; use num_workers = 0, or set data.augment = false"
        )
    return TrainAugmentation(config, seed=seed, stream=stream)
