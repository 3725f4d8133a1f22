"""MONAI datasets and loaders for segmentation training, segmentation evaluation and classification.

Flow: :func:`site_cases` validates a site folder (the checks of ``fedabus validate``) and returns only usable
cases of the wanted splits, logging how many it skipped and why; the factories below take those cases. Every
item is read lazily, one case at a time (:class:`LoadCased` reads image and mask with the site's overrides
and runs :func:`~shared.data.transforms.preprocess_case`); nothing holds a whole site at full resolution, unless
``data.case-cache-mb`` lets the process keep preprocessed cases (:mod:`shared.data.case_cache`: same values).
``cache_rate > 0`` keeps that fraction of preprocessed cases (at the target spacing) in memory with MONAI's
CacheDataset; random crops are still drawn fresh each time.

Items (tensors are plain ``torch.Tensor``; batched loaders add a leading batch axis B):

* segmentation training (:func:`seg_train_loader`): ``image`` (1, P, P, P) float32 normalised, ``mask``
  (1, P, P, P) float32 0/1, ``crop_start`` (3,) int64 = (z, y, x) of the crop in the preprocessed volume,
  ``case_id`` str, ``label`` int64 (1 malignant). P = ``DataConfig.patch_size``; crops are centred on the
  largest lesion with seeded jitter ``DataConfig.crop_jitter_voxels``, then augmented when ``data.augment`` is
  on (:mod:`shared.data.augment`; ``crop_start`` is where the crop was cut, before augmentation).
* segmentation evaluation (:func:`seg_eval_loader`, one case per step, not batched): ``image`` and ``mask``
  (1, D, H, W) float32 of the whole preprocessed case; ``blocks`` (list of
  :class:`~shared.data.blocks.Block`), ``block_images`` and ``block_masks`` (N, 1, P, P, P) float32;
  ``spacing_mm`` (z, y, x), ``pad_value``, ``lesion_volume_cm3``, ``case_id``, ``label``, ``birads`` (str or
  None), ``grid``/``original`` (:class:`~shared.data.transforms.Grid`) to map predictions back to the file.
* classification (:func:`cls_loader`): ``planes`` (3, F, S, S) float32 from the ground-truth mask
  (:mod:`shared.data.planes`), ``label`` int64, ``case_id`` str; for training (the default) cut from an augmented
  lesion region when ``data.augment`` is on (:class:`TriPlanesd`).

Determinism: the loaders draw crop jitter and shuffling from ``seed`` (a seeded ``torch.Generator``) and the
augmentation from ``seed``, the case and its draw count (:mod:`shared.data.augment`); pass a different seed per
round/epoch for fresh crops. Evaluation items (:func:`seg_eval_loader`) are never augmented.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose, Randomizable, RandomizableTrait, Transform

from shared.config import DataConfig, SiteConfig
from shared.data.augment import CaseDraws, TrainAugmentation, build_augmentation
from shared.data.blocks import covering_blocks, extract_blocks
from shared.data.case_cache import MIB, PROCESS_CACHE, case_key
from shared.data.io import read_volume
from shared.data.layouts import CaseRecord
from shared.data.planes import BoxError, LesionBox, jitter_box, largest_lesion_box, planes_from_config
from shared.data.transforms import crop_or_pad, lesion_crop, preprocess_case
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
    "SiteConfigs",
    "split_site_configs",
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
        return PROCESS_CACHE.load(
            case_key(case, self.config, site_config),
            lambda: self._load(case, site_config),
            max_bytes=self.config.case_cache_mb * MIB,
        )

    def _load(self, case: CaseRecord, site_config: SiteConfig | None) -> dict[str, Any]:
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

    The jitter comes from this transform's random state (MONAI ``set_random_state``; seeded by the loaders);
    ``augment`` (training) then augments the crop's image and mask together.
    """

    def __init__(self, config: DataConfig, augment: TrainAugmentation | None = None) -> None:
        self.patch_size = config.patch_size
        self.jitter = config.crop_jitter_voxels
        self.augment = augment
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        if data["image"].shape[0] == 1:  # validation lets one-frame volumes through for the 2D segmenters
            raise ValueError(
                f"case {data['case_id']}: a single frame along the sweep, {tuple(data['image'].shape)} voxels; "
                "a 3D segmenter cannot learn from it: use a 2D one (model.seg-model = dynunet2d or u2net-lite)"
            )
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
        image, mask = crop.image, crop.mask
        if self.augment is not None:
            image, mask = self.augment(image, mask, pad_value=data["pad_value"], case_id=data["case_id"])
        return {
            "image": torch.from_numpy(image[None].astype(np.float32)),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
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


#: Side of the lesion region augmented before the classifier's planes are cut, as a multiple of the planes'
#: square side (room for rotation and zoom-out to bring in real surroundings instead of padding).
AUGMENT_REGION_ROOM = 1.5


def _planes_region(data: Mapping[str, Any], config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The lesion region that holds every plane of the largest lesion (with :data:`AUGMENT_REGION_ROOM`), as
    (image, mask) crops; mask voxels outside that lesion's bounding box are cleared so that the largest lesion
    stays the one the planes are cut from."""
    mask, spacing = data["mask"], np.asarray(data["spacing_mm"], dtype=float)
    box: LesionBox = largest_lesion_box(mask)
    extent_mm = np.asarray(box.extent) * spacing
    side_mm = float(
        np.max(extent_mm + 2 * np.maximum(config.planes_margin * extent_mm, config.planes_margin_mm))
    )
    sizes = np.ceil(AUGMENT_REGION_ROOM * side_mm / spacing).astype(int) + 1
    start = np.asarray(box.centre_voxel) - sizes // 2
    image = crop_or_pad(data["image"], start, sizes, pad_value=data["pad_value"])
    region_mask = np.zeros(tuple(sizes), dtype=np.uint8)
    inner = tuple(
        slice(max(a - s, 0), max(min(b - s, n), 0))
        for a, b, s, n in zip(box.start, box.stop, start, sizes, strict=True)
    )
    region_mask[inner] = crop_or_pad(mask, start, sizes)[inner]
    return image, region_mask


class TriPlanesd(Transform):
    """A loaded case → ``planes`` (3, F, S, S) float32 from its ground-truth mask, ``label``, ``case_id``.

    With ``augment`` (training) the planes are cut from an augmented lesion region (:func:`_planes_region`,
    image and mask augmented together in 3D; docs/training.md says why); an augmentation that leaves no lesion
    voxel (a tiny lesion zoomed away) falls back to the region as it was. The box the planes are cut around is the
    lesion's, moved by the case's ``box_errors`` entry when there is one (the segmenter's miss on that case,
    ``train.cls-boxes = predicted``), then jittered with ``box_draws`` (``data.planes-box-jitter`` > 0;
    :func:`jitter_box`, one seeded draw per case and epoch)."""

    def __init__(
        self,
        config: DataConfig,
        augment: TrainAugmentation | None = None,
        box_draws: CaseDraws | None = None,
        box_errors: Mapping[str, BoxError] | None = None,
    ) -> None:
        self.config = config
        self.augment = augment
        self.box_draws = box_draws
        self.box_errors = box_errors or {}

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        image, mask = data["image"], data["mask"]
        if self.augment is not None:
            image, mask = _planes_region(data, self.config)
            augmented = self.augment(image, mask, pad_value=data["pad_value"], case_id=data["case_id"])
            if augmented[1].any():
                image, mask = augmented
        box = None
        error = self.box_errors.get(str(data["case_id"]))
        if error is not None or self.box_draws is not None:
            box = largest_lesion_box(mask)
            box = box if error is None else error.apply(box, mask.shape)
        if self.box_draws is not None:
            state = self.box_draws.next_state(data["case_id"])
            box = jitter_box(box, self.config.planes_box_jitter, mask.shape, state)
        planes = planes_from_config(
            image,
            mask,
            self.config,
            spacing_mm=data["spacing_mm"],
            pad_value=data["pad_value"],
            box=box,
        )
        return {
            "planes": torch.from_numpy(planes),
            "label": torch.tensor(data["label"], dtype=torch.int64),
            "case_id": data["case_id"],
        }


class _RandomTriPlanesd(TriPlanesd, RandomizableTrait):
    """:class:`TriPlanesd` with augmentation or box jitter, marked random so that MONAI's CacheDataset caches the
    loaded case before it and never one random draw."""


# ---------------------------------------------------------------- datasets and loaders


#: A site's reading overrides: one for all cases, or one per case id (cases of several sites together).
SiteConfigs = SiteConfig | Mapping[str, SiteConfig | None] | None


def split_site_configs(site_config: SiteConfigs) -> tuple[SiteConfig | None, Mapping[str, SiteConfig | None]]:
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
    """Lesion-centred training crops of ``cases`` (items in the module docstring), jitter and augmentation
    (``data.augment``) seeded by ``seed``."""
    crop = LesionCropd(config, build_augmentation(config, seed=seed, stream="seg"))
    crop.set_random_state(seed=seed)
    common, per_case = split_site_configs(site_config)
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
    """Batches of training crops: ``image``/``mask`` (B, 1, P, P, P) float32, ``crop_start`` (B, 3).

    ``num_workers > 0`` is refused while ``data.augment`` is on (:func:`~shared.data.augment.build_augmentation`)."""
    build_augmentation(config, seed=seed, stream="seg", num_workers=num_workers)  # refuses workers early
    dataset = seg_train_dataset(cases, config, site_config=site_config, seed=seed, cache_rate=cache_rate)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=_generator(seed)
    )


def seg_eval_dataset(
    cases: Sequence[CaseRecord], config: DataConfig, *, site_config: SiteConfigs = None
) -> Dataset:
    """Whole preprocessed cases with their covering blocks (items in the module docstring)."""
    common, per_case = split_site_configs(site_config)
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
    seed: int = 0,
    training: bool = True,
    box_errors: Mapping[str, BoxError] | None = None,
) -> Dataset:
    """Tri-plane frames from the ground-truth masks of ``cases`` with their labels; for ``training`` cut from
    augmented lesion regions when ``data.augment`` is on and around jittered boxes when ``data.planes-box-jitter``
    is above 0 (both seeded by ``seed``), never when ``training`` is False. ``box_errors``: case id -> how the
    segmenter's box missed that case (:class:`TriPlanesd`)."""
    common, per_case = split_site_configs(site_config)
    augment = build_augmentation(config, seed=seed, stream="cls") if training else None
    box_draws = CaseDraws(seed, "cls-box") if training and config.planes_box_jitter > 0 else None
    if augment is None and box_draws is None:
        planes = TriPlanesd(config, box_errors=box_errors)
    else:
        planes = _RandomTriPlanesd(config, augment, box_draws, box_errors)
    return _dataset(cases, Compose([LoadCased(config, common), planes]), cache_rate, per_case)


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
    training: bool = True,
    box_errors: Mapping[str, BoxError] | None = None,
) -> DataLoader:
    """Batches of ``planes`` (B, 3, F, S, S) float32 and ``label`` (B,) int64 (augmented and boxed as
    :func:`cls_dataset`; ``num_workers > 0`` is refused while augmenting or jittering)."""
    if training:
        build_augmentation(config, seed=seed, stream="cls", num_workers=num_workers)  # refuses workers early
        if config.planes_box_jitter > 0 and num_workers > 0:
            raise ValueError(
                f"num_workers = {num_workers}: data.planes-box-jitter draws are seeded per case and epoch in the "
                "loading process; use num_workers = 0, or set data.planes-box-jitter = 0"
            )
    dataset = cls_dataset(
        cases,
        config,
        site_config=site_config,
        cache_rate=cache_rate,
        seed=seed,
        training=training,
        box_errors=box_errors,
    )
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=_generator(seed)
    )
