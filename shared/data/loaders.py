"""MONAI datasets and loaders for segmentation training, segmentation evaluation and classification.

Flow: :func:`site_cases` validates a site folder (the checks of ``fedabus validate``) and returns only usable
cases of the wanted splits, logging how many it skipped and why; the factories below take those cases. Every
item is read lazily, one case at a time (:class:`LoadCased` reads image and mask with the site's overrides
and runs :func:`~shared.data.transforms.preprocess_case`); nothing holds a whole site at full resolution.
``cache_rate > 0`` keeps that fraction of preprocessed cases (at the target spacing) in memory with MONAI's
CacheDataset; random crops are still drawn fresh each time.

Items (tensors are plain ``torch.Tensor``; batched loaders add a leading batch axis B):

* segmentation training (:func:`seg_train_loader`): ``image`` (1, P, P, P) float32 normalised, ``mask``
  (1, P, P, P) float32 0/1, ``crop_start`` (3,) int64 = (z, y, x) of the crop in the preprocessed volume,
  ``case_id`` str, ``label`` int64 (1 malignant). P = ``DataConfig.patch_size``; crops are centred on the
  largest lesion with seeded jitter ``DataConfig.crop_jitter_voxels``.
* segmentation evaluation (:func:`seg_eval_loader`, one case per step, not batched): ``image`` and ``mask``
  (1, D, H, W) float32 of the whole preprocessed case; ``blocks`` (list of
  :class:`~shared.data.blocks.Block`), ``block_images`` and ``block_masks`` (N, 1, P, P, P) float32;
  ``spacing_mm`` (z, y, x), ``pad_value``, ``lesion_volume_cm3``, ``case_id``, ``label``, ``birads`` (str or
  None), ``grid``/``original`` (:class:`~shared.data.transforms.Grid`) to map predictions back to the file.
* classification (:func:`cls_loader`): ``planes`` (3, F, S, S) float32 from the ground-truth mask
  (:mod:`shared.data.planes`), ``label`` int64, ``case_id`` str.

Determinism: the loaders draw crop jitter and shuffling from ``seed`` (a seeded ``torch.Generator``); pass a
different seed per round/epoch for fresh crops.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose, Randomizable, Transform

from shared.config import DataConfig, SiteConfig
from shared.data.blocks import covering_blocks, extract_blocks
from shared.data.io import read_volume
from shared.data.layouts import CaseRecord
from shared.data.planes import largest_lesion_box, planes_from_config
from shared.data.transforms import lesion_crop, preprocess_case
from shared.data.validate import ValidationReport, usable_cases

__all__ = [
    "EvalBlocksd",
    "LesionCropd",
    "LoadCased",
    "TriPlanesd",
    "cls_dataset",
    "cls_loader",
    "seg_eval_dataset",
    "seg_eval_loader",
    "seg_train_dataset",
    "seg_train_loader",
    "site_cases",
]

logger = logging.getLogger(__name__)


def site_cases(
    site_dir: str | Path | ValidationReport,
    site_config: SiteConfig | None = None,
    *,
    splits: Sequence[str] | None = None,
    cache: str | Path | None = None,
) -> list[CaseRecord]:
    """Usable cases of ``site_dir`` (a folder, or its finished validation report) in ``splits`` (all splits when
    None): validation errors are skipped with a logged count (:func:`shared.data.validate.usable_cases`;
    ``cache``, a file outside the site folder, skips re-checking unchanged cases), as are cases without a mask
    or label."""
    cases = usable_cases(site_dir, site_config, splits=splits, cache=cache)
    complete = [c for c in cases if c.mask is not None and c.label is not None]
    if len(complete) < len(cases):
        where = site_dir.site_dir if isinstance(site_dir, ValidationReport) else site_dir
        logger.warning("%s: skipping %d case(s) without mask or label", where, len(cases) - len(complete))
    return complete


# ---------------------------------------------------------------- transforms


class LoadCased(Transform):
    """``{"case": CaseRecord}`` → the preprocessed case: ``image`` (D, H, W) float32, ``mask`` (D, H, W) uint8,
    ``spacing_mm``, ``pad_value``, ``grid``, ``original`` and the case's ``case_id``, ``label``, ``birads``.

    An item's own ``site_config`` (cases of several sites in one dataset, e.g. a study's pooled arm) wins over
    the one given here."""

    def __init__(self, config: DataConfig, site_config: SiteConfig | None = None) -> None:
        self.config = config
        self.site_config = site_config

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        case: CaseRecord = data["case"]
        if case.mask is None:
            raise ValueError(
                f"case {case.case_id!r}: no mask path; loaders need a mask (run fedabus validate)"
            )
        site_config = data.get("site_config", self.site_config)
        image = read_volume(case.image, site_config=site_config)
        mask = read_volume(case.mask, site_config=site_config)
        done = preprocess_case(image, mask, self.config)
        del image, mask
        if done.mask is None or not done.mask.any():
            raise ValueError(f"case {case.case_id!r}: mask {case.mask} is empty after preprocessing")
        return {
            "image": done.image,
            "mask": done.mask,
            "spacing_mm": done.spacing_mm,
            "pad_value": done.pad_value,
            "grid": done.grid,
            "original": done.original,
            "case_id": case.case_id,
            "label": -1 if case.label is None else int(case.label),
            "birads": case.birads,
        }


class LesionCropd(Randomizable, Transform):
    """A loaded case → a training crop (module docstring), centred on the largest lesion's box with jitter.

    The jitter comes from this transform's random state (MONAI ``set_random_state``; seeded by the loaders).
    """

    def __init__(self, config: DataConfig) -> None:
        self.patch_size = config.patch_size
        self.jitter = config.crop_jitter_voxels
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        self.randomize()
        crop = lesion_crop(
            data["image"],
            data["mask"],
            patch_size=self.patch_size,
            pad_value=data["pad_value"],
            centre=largest_lesion_box(data["mask"]).centre_voxel,
            jitter_voxels=self.jitter,
            rng=np.random.default_rng(self._seed),
        )
        return {
            "image": torch.from_numpy(crop.image[None].astype(np.float32)),
            "mask": torch.from_numpy(crop.mask[None].astype(np.float32)),
            "crop_start": torch.tensor(crop.start, dtype=torch.int64),
            "case_id": data["case_id"],
            "label": torch.tensor(data["label"], dtype=torch.int64),
        }


class EvalBlocksd(Transform):
    """A loaded case → the whole case plus the blocks covering its lesion (module docstring)."""

    def __init__(self, config: DataConfig) -> None:
        self.patch_size = config.patch_size
        self.min_lesion_voxels = config.block_min_lesion_voxels

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        image, mask, pad = data["image"], data["mask"], data["pad_value"]
        blocks = covering_blocks(mask, patch_size=self.patch_size, min_lesion_voxels=self.min_lesion_voxels)
        voxel_mm3 = float(np.prod(data["spacing_mm"]))
        return {
            "image": torch.from_numpy(image[None].astype(np.float32)),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "blocks": blocks,
            "block_images": torch.from_numpy(extract_blocks(image, blocks, pad_value=pad)[:, None]),
            "block_masks": torch.from_numpy(extract_blocks(mask, blocks).astype(np.float32)[:, None]),
            "lesion_volume_cm3": float(np.count_nonzero(mask)) * voxel_mm3 / 1000.0,
            **{
                k: data[k]
                for k in ("spacing_mm", "pad_value", "case_id", "label", "birads", "grid", "original")
            },
        }


class TriPlanesd(Transform):
    """A loaded case → ``planes`` (3, F, S, S) float32 from its ground-truth mask, ``label``, ``case_id``."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        planes = planes_from_config(
            data["image"],
            data["mask"],
            self.config,
            spacing_mm=data["spacing_mm"],
            pad_value=data["pad_value"],
        )
        return {
            "planes": torch.from_numpy(planes),
            "label": torch.tensor(data["label"], dtype=torch.int64),
            "case_id": data["case_id"],
        }


# ---------------------------------------------------------------- datasets and loaders


#: A site's reading overrides: one for all cases, or one per case id (cases of several sites together).
SiteConfigs = SiteConfig | Mapping[str, SiteConfig | None] | None


def _split_configs(site_config: SiteConfigs) -> tuple[SiteConfig | None, Mapping[str, SiteConfig | None]]:
    """(the config for every case, per-case configs)."""
    if isinstance(site_config, Mapping):
        return None, site_config
    return site_config, {}


def _dataset(
    cases: Sequence[CaseRecord],
    transform: Compose,
    cache_rate: float,
    per_case: Mapping[str, SiteConfig | None] | None = None,
) -> Dataset:
    data = [
        {"case": case, "site_config": per_case[case.case_id]} if per_case else {"case": case}
        for case in cases
    ]
    if cache_rate > 0:
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=1, progress=False)
    return Dataset(data, transform)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def seg_train_dataset(
    cases: Sequence[CaseRecord],
    config: DataConfig,
    *,
    site_config: SiteConfigs = None,
    seed: int = 0,
    cache_rate: float = 0.0,
) -> Dataset:
    """Lesion-centred training crops of ``cases`` (items in the module docstring), jitter seeded by ``seed``."""
    crop = LesionCropd(config)
    crop.set_random_state(seed=seed)
    common, per_case = _split_configs(site_config)
    return _dataset(cases, Compose([LoadCased(config, common), crop]), cache_rate, per_case)


def seg_train_loader(
    cases: Sequence[CaseRecord],
    config: DataConfig,
    *,
    batch_size: int,
    site_config: SiteConfigs = None,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    cache_rate: float = 0.0,
) -> DataLoader:
    """Batches of training crops: ``image``/``mask`` (B, 1, P, P, P) float32, ``crop_start`` (B, 3)."""
    dataset = seg_train_dataset(cases, config, site_config=site_config, seed=seed, cache_rate=cache_rate)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=_generator(seed)
    )


def seg_eval_dataset(
    cases: Sequence[CaseRecord], config: DataConfig, *, site_config: SiteConfigs = None
) -> Dataset:
    """Whole preprocessed cases with their covering blocks (items in the module docstring)."""
    common, per_case = _split_configs(site_config)
    return _dataset(cases, Compose([LoadCased(config, common), EvalBlocksd(config)]), 0.0, per_case)


def _single(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


def seg_eval_loader(
    cases: Sequence[CaseRecord],
    config: DataConfig,
    *,
    site_config: SiteConfigs = None,
    num_workers: int = 0,
) -> DataLoader:
    """One case per step, not batched (no batch axis): the items of :func:`seg_eval_dataset`, in case order."""
    dataset = seg_eval_dataset(cases, config, site_config=site_config)
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=_single)


def cls_dataset(
    cases: Sequence[CaseRecord],
    config: DataConfig,
    *,
    site_config: SiteConfigs = None,
    cache_rate: float = 0.0,
) -> Dataset:
    """Tri-plane frames from the ground-truth masks of ``cases`` with their labels."""
    common, per_case = _split_configs(site_config)
    return _dataset(cases, Compose([LoadCased(config, common), TriPlanesd(config)]), cache_rate, per_case)


def cls_loader(
    cases: Sequence[CaseRecord],
    config: DataConfig,
    *,
    batch_size: int,
    site_config: SiteConfigs = None,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    cache_rate: float = 0.0,
) -> DataLoader:
    """Batches of ``planes`` (B, 3, F, S, S) float32 and ``label`` (B,) int64."""
    dataset = cls_dataset(cases, config, site_config=site_config, cache_rate=cache_rate)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=_generator(seed)
    )
