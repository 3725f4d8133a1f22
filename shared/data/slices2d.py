"""2D samples for the 2D arms (seed 004's U2NET-Lite and ResNeXt-50): ABUS volumes cut into slices, and the
one square, normalised frame format shared with BUSI images (:mod:`shared.data.loaders2d`).

**Which axis.** A canonical, preprocessed ABUS case is a (D, H, W) = (sweep, depth, lateral) array
(docs/data.md, "Canonical orientation"). The transducer acquires one transverse frame per sweep position, so a
slice is ``image[k]`` (H, W) = (depth, lateral) with the skin on top: the view a hand-held B-mode image (BUSI)
shows, and the plane the 2D models of seeds 001 and 004 were built for.

**Which slices** (:func:`choose_slices`): every slice with at least ``min_lesion_pixels`` lesion pixels, plus a
seeded random sample of lesion-free slices, ``round(negative_fraction × positives)`` of them (all there are if
fewer), so that a segmenter also sees tissue without a lesion but the lesion slices are not drowned (a typical
ABUS volume has far more lesion-free slices than lesion slices). Slices with 1 to ``min_lesion_pixels - 1``
lesion pixels (the lesion's tips) are in neither group. Evaluation that stacks predictions back to 3D uses every
slice instead (``negative_fraction=None``).

**Frame format** (:func:`fit_square`): a 2D image is resized so that its longer side is ``size`` pixels
(MONAI ``Resize``: area averaging when shrinking, bilinear when enlarging; the aspect ratio is kept, so a taller-than-wide lesion stays
taller than wide) and padded to ``size × size`` (MONAI ``SpatialPad``, centred) with ``pad_value``; the mask is
resized with nearest neighbour and padded with 0. :func:`unfit_square` is its inverse for predictions: the
padding is cut off and the rest resized back to the slice's (H, W), so a 2D segmenter's frames stack back
into the (D, H, W) volume they were cut from (:func:`shared.training.seg_auto.predict_volume`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Resize, SpatialPad

from shared.config import DataConfig
from shared.data.layouts import CaseRecord
from shared.data.loaders import LoadCased, SiteConfigs, split_site_configs

__all__ = [
    "choose_slices",
    "fit_square",
    "fitted_shape",
    "frame_sample",
    "slice_samples",
    "unfit_square",
    "volume_slice_samples",
]


def choose_slices(
    mask: np.ndarray,
    *,
    negative_fraction: float | None,
    min_lesion_pixels: int = 1,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(lesion, lesion_free)`` sweep indices (sorted int64) of a (D, H, W) mask, as the module docstring says.

    ``negative_fraction=None`` returns every lesion-free slice (evaluation); otherwise ``rng`` draws
    ``round(negative_fraction × len(lesion))`` of them without replacement.
    """
    if mask.ndim != 3:
        raise ValueError(f"choose_slices: mask must be (D, H, W), got shape {mask.shape}")
    if min_lesion_pixels < 1:
        raise ValueError(f"min_lesion_pixels = {min_lesion_pixels} must be at least 1")
    counts = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
    lesion = np.flatnonzero(counts >= min_lesion_pixels)
    free = np.flatnonzero(counts == 0)
    if negative_fraction is None:
        return lesion, free
    if negative_fraction < 0:
        raise ValueError(f"negative_fraction = {negative_fraction} must be >= 0 (or None for every slice)")
    wanted = min(int(round(negative_fraction * lesion.size)), free.size)
    if wanted == 0:
        return lesion, free[:0]
    if rng is None:
        raise ValueError("choose_slices: sampling lesion-free slices needs a seeded rng (numpy Generator)")
    return lesion, np.sort(rng.choice(free, size=wanted, replace=False))


def fit_square(array: np.ndarray, *, size: int, pad_value: float = 0.0, is_mask: bool = False) -> np.ndarray:
    """(H, W) -> (size, size) (module docstring): an image becomes float32 (area-averaged when shrinking, bilinear when enlarging), a mask
    (``is_mask``) uint8 0/1 (nearest neighbour, padded with 0 whatever ``pad_value``)."""
    if size < 2:
        raise ValueError(f"frame size {size} must be at least 2 pixels")
    if is_mask:
        mode = "nearest"
    else:  # MONAI's anti-aliasing blur pads with zeros and darkens the border rows: area-average instead
        mode = "area" if size < max(array.shape) else "bilinear"
    resize = Resize(spatial_size=size, size_mode="longest", mode=mode)
    pad = SpatialPad(spatial_size=(size, size), mode="constant", value=0.0 if is_mask else pad_value)
    fitted = np.asarray(pad(resize(array[None].astype(np.float32)))[0], dtype=np.float32)
    return (fitted > 0.5).astype(np.uint8) if is_mask else fitted


def fitted_shape(shape: Sequence[int], size: int) -> tuple[int, int]:
    """The (h, w) an (H, W) image has inside its ``size × size`` frame: MONAI ``Resize(size_mode="longest")``'s
    ``round(side × size / max(H, W))``."""
    scale = size / max(shape)
    return int(round(shape[0] * scale)), int(round(shape[1] * scale))


def unfit_square(frames: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Frames ``(B, C, S, S)`` made by :func:`fit_square` from (H, W) = ``shape`` images -> ``(B, C, H, W)``:
    the centred ``fitted_shape`` region (``SpatialPad``'s symmetric padding: ``(S - h) // 2`` before) is cut out
    and resized bilinearly to ``shape`` (a no-op resize when no resize was needed). Use it on probabilities or
    logits, then threshold."""
    from torch.nn import functional

    size = int(frames.shape[-1])
    h, w = fitted_shape(shape, size)
    top, left = (size - h) // 2, (size - w) // 2
    region = frames[..., top : top + h, left : left + w]
    if (h, w) == tuple(shape):
        return region
    return functional.interpolate(
        region, size=tuple(int(v) for v in shape), mode="bilinear", align_corners=False
    )


def frame_sample(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    size: int,
    pad_value: float,
    label: int,
    case_id: str,
    slice_index: int,
) -> dict[str, Any]:
    """One 2D item: ``image`` (1, size, size) float32 normalised, ``mask`` (1, size, size) float32 0/1,
    ``label`` int64 (0 benign, 1 malignant, 2 normal), ``case_id`` str, ``slice_index`` int64 (the sweep index
    of an ABUS slice, -1 for a 2D image)."""
    frame = fit_square(image, size=size, pad_value=pad_value)
    fitted = fit_square(mask, size=size, is_mask=True)
    return {
        "image": torch.from_numpy(frame[None]),
        "mask": torch.from_numpy(fitted[None].astype(np.float32)),
        "label": torch.tensor(label, dtype=torch.int64),
        "case_id": case_id,
        "slice_index": torch.tensor(slice_index, dtype=torch.int64),
    }


def slice_samples(
    loaded: dict[str, Any],
    *,
    size: int,
    negative_fraction: float | None,
    min_lesion_pixels: int = 1,
    rng: np.random.Generator | None = None,
) -> list[dict[str, Any]]:
    """The chosen sweep slices of one loaded case (:class:`~shared.data.loaders.LoadCased`'s output: ``image``
    and ``mask`` (D, H, W), ``pad_value``, ``label``, ``case_id``) as :func:`frame_sample` items in sweep order;
    each slice keeps the case's label."""
    lesion, free = choose_slices(
        loaded["mask"], negative_fraction=negative_fraction, min_lesion_pixels=min_lesion_pixels, rng=rng
    )
    return [
        frame_sample(
            loaded["image"][k],
            loaded["mask"][k],
            size=size,
            pad_value=loaded["pad_value"],
            label=int(loaded["label"]),
            case_id=loaded["case_id"],
            slice_index=int(k),
        )
        for k in np.sort(np.concatenate([lesion, free]))
    ]


def volume_slice_samples(
    cases: Sequence[CaseRecord],
    config: DataConfig,
    *,
    size: int,
    negative_fraction: float | None = 0.25,
    min_lesion_pixels: int = 1,
    seed: int = 0,
    site_config: SiteConfigs = None,
) -> list[dict[str, Any]]:
    """2D items of ABUS ``cases`` (validated, e.g. :func:`~shared.data.loaders.site_cases`): each case is read
    and preprocessed as for the 3D models (:class:`~shared.data.loaders.LoadCased`: canonical orientation,
    ``config``'s spacing and normalisation), one at a time, and only its chosen slices are kept, at
    ``size × size`` (memory: about 8 × size² bytes per slice). The lesion-free sample of case ``i`` is drawn
    from ``SeedSequence([seed, i])``: the same cases and seed give the same items. ``site_config`` is one
    site's config or, for cases of several sites (a study's pooled arm), a mapping case id -> config."""
    common, per_case = split_site_configs(site_config)
    load = LoadCased(config, common)
    samples: list[dict[str, Any]] = []
    for number, case in enumerate(cases):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), number]))
        samples += slice_samples(
            load({"case": case, "site_config": per_case[case.case_id]} if per_case else {"case": case}),
            size=size,
            negative_fraction=negative_fraction,
            min_lesion_pixels=min_lesion_pixels,
            rng=rng,
        )
    return samples
