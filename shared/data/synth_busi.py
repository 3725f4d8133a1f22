"""A tiny synthetic BUSI-style site for tests and demos, and broken-file variants of it.

:func:`write_busi_site` writes ``benign/``, ``malignant/`` and ``normal/`` folders of 8-bit PNG images in the
BUSI convention (:mod:`shared.data.busi`): ``<class> (<n>).png`` with ``<class> (<n>)_mask.png`` (0/255), a
second lesion of some images in ``_mask_1.png`` (as BUSI does), an all-black mask for normal images, and about
half of the images stored as RGB with three equal channels (as most BUSI files are).

Each image is a B-mode-like frame (H, W): bright skin line, dark subcutaneous fat, brighter heterogeneous gland,
darker deep tissue, depth attenuation and Rayleigh speckle (the envelope of a smoothed complex Gaussian field),
log-compressed to 8 bits. Lesions are hypoechoic blobs: benign ones oval and wider than tall with posterior
enhancement, malignant ones taller and lobulated (angular harmonics of the radius) with posterior shadowing.
Sizes vary by up to ±20 % around ``size``. Everything is drawn from ``SeedSequence([seed, class, n])``: the
same seed gives the same files byte for byte.

:func:`break_busi_site` applies one named defect (:data:`BREAKAGES`) to a written site and says which case,
file and reason validation must report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from shared.data.busi import BUSI_CLASSES
from shared.data.synth_case import rng_for

__all__ = [
    "BREAKAGES",
    "Breakage",
    "BusiSynthOptions",
    "break_busi_site",
    "synth_busi_frame",
    "write_busi_site",
]


@dataclass(frozen=True)
class BusiSynthOptions:
    """``per_class``: images per class (benign, malignant, normal); ``size``: mean (H, W) in pixels;
    ``rgb_fraction``: share stored as RGB; ``extra_mask_fraction``: share of lesion images with a second lesion
    in ``_mask_1.png``."""

    per_class: tuple[int, int, int] = (4, 4, 2)
    size: tuple[int, int] = (72, 96)
    rgb_fraction: float = 0.5
    extra_mask_fraction: float = 0.25


def _speckle(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Rayleigh-distributed speckle of unit mean: |smoothed complex Gaussian| over (H, W)."""
    real, imag = (ndimage.gaussian_filter(rng.standard_normal(shape), (0.8, 1.6)) for _ in range(2))
    envelope = np.hypot(real, imag)
    return envelope / envelope.mean()


def _tissue(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Mean echogenicity (H, W) in [0, 1]: skin, fat, gland, deep tissue, with a smooth texture."""
    height, width = shape
    depth = np.linspace(0.0, 1.0, height)[:, None]
    skin, fat = rng.uniform(0.03, 0.06), rng.uniform(0.15, 0.3)
    profile = np.where(depth < skin, 0.95, np.where(depth < fat, 0.35, 0.7))
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), (3, 6))
    texture /= max(float(texture.std()), 1e-6)
    base = profile * (1.0 + 0.15 * texture) * np.exp(-rng.uniform(0.5, 1.2) * depth)
    return np.broadcast_to(base, (height, width)).copy()


def _blob(shape: tuple[int, int], label: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """A lesion mask (H, W) bool: oval and wider than tall (benign, 0) or taller and lobulated (malignant, 1)."""
    height, width = shape
    centre = (rng.uniform(0.35, 0.65) * height, rng.uniform(0.3, 0.7) * width)
    radius = scale * rng.uniform(0.12, 0.2) * min(height, width)
    aspect = rng.uniform(0.55, 0.8) if label == 0 else rng.uniform(0.9, 1.3)  # height / width
    rows, cols = np.mgrid[0:height, 0:width].astype(float)
    dy, dx = (rows - centre[0]) / aspect, cols - centre[1]
    angle, distance = np.arctan2(dy, dx), np.hypot(dy, dx)
    harmonics = (0.04, 0.0) if label == 0 else (0.12, 0.1)
    wobble = 1.0 + sum(
        amp * np.cos(k * angle + rng.uniform(0, 2 * math.pi))
        for k, amp in zip((3, 7), harmonics, strict=True)
    )
    return distance <= radius * wobble


def _insert_lesion(tissue: np.ndarray, mask: np.ndarray, label: int, rng: np.random.Generator) -> None:
    """Darken the lesion and brighten (benign) or shadow (malignant) the tissue below it, in place."""
    tissue[mask] *= rng.uniform(0.15, 0.35)
    rows, cols = np.nonzero(mask)
    below = np.zeros_like(mask)
    for col in np.unique(cols):
        below[rows[cols == col].max() + 1 :, col] = True
    tissue[below] *= rng.uniform(1.2, 1.5) if label == 0 else rng.uniform(0.45, 0.7)


def synth_busi_frame(
    label: int, shape: tuple[int, int], rng: np.random.Generator, *, extra_lesion: bool = False
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One frame: ``image`` (H, W) uint8 and its lesion masks (H, W) uint8 0/255, one per lesion (none for a
    normal image, ``label`` 2; a second, smaller lesion with ``extra_lesion``)."""
    tissue = _tissue(shape, rng)
    masks = []
    if label in (0, 1):
        for scale in (1.0, 0.6)[: 2 if extra_lesion else 1]:
            blob = _blob(shape, label, rng, scale)
            if masks:
                blob &= ~masks[0]  # the second lesion is a separate region, as in a BUSI _mask_1.png
            _insert_lesion(tissue, blob, label, rng)
            masks.append(blob)
    signal = tissue * _speckle(shape, rng) + 0.02 * np.abs(rng.standard_normal(shape))
    decibels = 20 * np.log10(np.maximum(signal, 1e-6))
    dynamic = rng.uniform(28.0, 38.0)  # displayed range (dB) below the brightest 1 % of pixels
    image = np.clip((decibels - np.percentile(decibels, 99.0) + dynamic) / dynamic, 0.0, 1.0) * 255
    return np.rint(image).astype(np.uint8), [m.astype(np.uint8) * 255 for m in masks]


def _write_png(array: np.ndarray, path: Path, *, rgb: bool = False) -> None:
    pixels = np.repeat(array[..., None], 3, axis=-1) if rgb else array
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=rgb), str(path))


def write_busi_site(out: str | Path, *, seed: int, options: BusiSynthOptions | None = None) -> Path:
    """Write a BUSI-style site into ``out`` (created; existing files of the same names are replaced) and return
    it. Deterministic per ``seed`` (module docstring)."""
    options = options or BusiSynthOptions()
    site = Path(out)
    for class_index, (class_name, count) in enumerate(zip(BUSI_CLASSES, options.per_class, strict=True)):
        folder = site / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(1, count + 1):
            rng = rng_for(seed, class_index, number)
            shape = tuple(int(round(n * rng.uniform(0.8, 1.2))) for n in options.size)
            extra = class_index < 2 and rng.uniform() < options.extra_mask_fraction
            image, masks = synth_busi_frame(class_index, shape, rng, extra_lesion=extra)
            stem = f"{class_name} ({number})"
            _write_png(image, folder / f"{stem}.png", rgb=rng.uniform() < options.rgb_fraction)
            for k, mask in enumerate(masks or [np.zeros(shape, np.uint8)]):
                _write_png(mask, folder / (f"{stem}_mask.png" if k == 0 else f"{stem}_mask_{k}.png"))
    return site


# ---------------------------------------------------------------- broken variants


@dataclass(frozen=True)
class Breakage:
    """What :func:`break_busi_site` did: the case id, the file and a fragment of the reason that validation
    must report for it."""

    case_id: str
    path: Path
    reason: str


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _replace_mask(path: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    grey = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    _write_png(change(grey.copy()).astype(np.uint8), path)


def _first(site: Path, class_name: str) -> tuple[str, Path, Path]:
    stem = f"{class_name} (1)"
    return f"{class_name}/{stem}", site / class_name / f"{stem}.png", site / class_name / f"{stem}_mask.png"


def _grey_pixel(grey: np.ndarray) -> np.ndarray:
    grey[0, 0] = 128  # an anti-aliased edge value
    return grey


def _lesion_in_normal(grey: np.ndarray) -> np.ndarray:
    grey[2:6, 2:6] = 255
    return grey


#: defect name -> (class folder of the damaged image, file damaged: "image"/"mask", reason fragment)
BREAKAGES: dict[str, tuple[str, str, str]] = {
    "missing-mask": ("benign", "mask", "no mask file"),
    "orphan-mask": ("malignant", "mask", "no image for this mask"),
    "empty-file": ("benign", "image", "empty file (0 bytes)"),
    "not-png": ("malignant", "image", "not a PNG file"),
    "truncated-image": ("benign", "image", "truncated file"),
    "truncated-mask": ("malignant", "mask", "truncated file"),
    "size-mismatch": ("benign", "mask", "image/mask size mismatch"),
    "non-binary-mask": ("malignant", "mask", "non-binary mask: values 0, 128, 255"),
    "empty-mask": ("benign", "mask", "empty mask: no lesion pixel"),
    "normal-with-lesion": ("normal", "mask", "mask of a normal/ image is not empty"),
}


def break_busi_site(site: str | Path, breakage: str) -> Breakage:
    """Damage image 1 of a written site (:func:`write_busi_site`) with the defect ``breakage`` (a key of
    :data:`BREAKAGES`) and return what validation must report."""
    if breakage not in BREAKAGES:
        raise ValueError(f"unknown breakage {breakage!r}: choose one of {sorted(BREAKAGES)}")
    class_name, kind, reason = BREAKAGES[breakage]
    case_id, image, mask = _first(Path(site), class_name)
    target = image if kind == "image" else mask
    if breakage == "missing-mask":
        for path in image.parent.glob(f"{image.stem}_mask*.png"):
            path.unlink()
    elif breakage == "orphan-mask":
        image.unlink()
    elif breakage == "empty-file":
        image.write_bytes(b"")
    elif breakage == "not-png":
        image.write_bytes(b"\xff\xd8\xff\xe0 a JPEG header, not a PNG" * 4)
    elif breakage.startswith("truncated"):
        _cut(target)
    elif breakage == "size-mismatch":
        _replace_mask(mask, lambda grey: np.pad(grey, ((0, 3), (0, 0))))
    elif breakage == "non-binary-mask":
        _replace_mask(mask, _grey_pixel)
    elif breakage == "empty-mask":
        for path in image.parent.glob(f"{image.stem}_mask*.png"):
            _replace_mask(path, np.zeros_like)
    elif breakage == "normal-with-lesion":
        _replace_mask(mask, _lesion_in_normal)
    return Breakage(case_id, target, reason)
