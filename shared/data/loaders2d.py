"""MONAI datasets and loaders of 2D frames for the 2D arms: BUSI-style images and ABUS volumes cut into slices.

Both give the same items (:func:`shared.data.slices2d.frame_sample`; a loader adds a leading batch axis B):
``image`` (1, S, S) float32 normalised, ``mask`` (1, S, S) float32 0/1, ``label`` int64 (0 benign,
1 malignant, 2 normal), ``case_id`` str, ``slice_index`` int64 (sweep index of an ABUS slice, -1 for a BUSI
image). S is ``size``; the image keeps its aspect ratio and is padded to a square (:mod:`shared.data.slices2d`).

* BUSI (:func:`busi_dataset`): images read lazily, one at a time (:class:`LoadBusid`), from the validated
  images of :func:`shared.data.busi.usable_busi_images`; intensities normalised per image
  (``normalisation``, as ``data.normalisation``: ``zscore`` by default, since a black BUSI pixel is not "no
  signal"); padding takes the normalised value of a black pixel. The mask is the union of the image's mask
  files; a normal image's mask is empty. Which classes are in is the caller's choice (``usable_busi_images``'
  ``classes``): benign/malignant only for the binary task, all three for seed 004's three-class classifier and
  for segmentation with lesion-free images.
* ABUS (:func:`shared.data.slices2d.volume_slice_samples`, a list): the chosen slices of each case (lesion
  slices plus a sampled share of lesion-free ones, :func:`shared.data.slices2d.choose_slices`), preprocessed as
  for the 3D models and held in memory at S × S.

:func:`slice_train_loader` is what the 2D segmenters (``model.seg-model = dynunet2d | u2net-lite``) train on:
the chosen slices of a site's training cases at ``data.slice-size`` with ``data.slice-negative-fraction``.

No augmentation yet (the 3D augmentations of :mod:`shared.data.augment` are for volumes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Transform

from shared.config import DataConfig
from shared.data.busi import BusiImage, read_busi_mask, read_png
from shared.data.layouts import CaseRecord
from shared.data.loaders import SiteConfigs
from shared.data.slices2d import frame_sample, volume_slice_samples
from shared.data.transforms import NORMALISATIONS, fit_intensity

__all__ = ["LoadBusid", "busi_dataset", "frame_loader", "slice_train_loader"]


class LoadBusid(Transform):
    """``{"case": BusiImage}`` -> the 2D item of the module docstring, at ``size`` x ``size``."""

    def __init__(self, size: int, normalisation: str = "zscore") -> None:
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation = {normalisation!r}; allowed: {', '.join(NORMALISATIONS)}")
        self.size = size
        self.normalisation = normalisation

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        record: BusiImage = data["case"]
        raw = read_png(record.image)
        mask = read_busi_mask(record.masks, raw.shape)
        intensity = fit_intensity(raw, self.normalisation)
        return frame_sample(
            intensity.apply(raw),
            mask,
            size=self.size,
            pad_value=intensity.pad_value,
            label=int(record.label if record.label is not None else -1),
            case_id=record.case_id,
            slice_index=-1,
        )


def busi_dataset(images: Sequence[BusiImage], *, size: int, normalisation: str = "zscore") -> Dataset:
    """Lazily read 2D items of validated BUSI ``images`` (module docstring)."""
    return Dataset([{"case": image} for image in images], LoadBusid(size, normalisation))


def frame_loader(
    items: Dataset | Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Batches of 2D items (a :func:`busi_dataset` or the list of
    :func:`~shared.data.slices2d.volume_slice_samples`): ``image``/``mask`` (B, 1, S, S), ``label`` (B,),
    ``case_id`` (list of B); shuffling seeded by ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        items, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=generator
    )


def slice_train_loader(
    cases: Sequence[CaseRecord],
    config: DataConfig,
    *,
    batch_size: int,
    site_config: SiteConfigs = None,
    seed: int = 0,
) -> DataLoader:
    """Shuffled batches of the training slices of ABUS ``cases`` for a 2D segmenter: ``image``/``mask``
    (B, 1, S, S) with S = ``data.slice-size``, lesion slices plus ``data.slice-negative-fraction`` lesion-free
    ones per case (:func:`~shared.data.slices2d.volume_slice_samples`, seeded by ``seed``; held in memory)."""
    items = volume_slice_samples(
        cases,
        config,
        size=config.slice_size,
        negative_fraction=config.slice_negative_fraction,
        seed=seed,
        site_config=site_config,
    )
    return frame_loader(items, batch_size=batch_size, shuffle=True, seed=seed)
