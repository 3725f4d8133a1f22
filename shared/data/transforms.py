"""Preprocessing shared by training, evaluation and inference: orientation, resampling, intensity, crops.

One case goes through :func:`preprocess_case`:

1. **Canonical orientation** (:func:`orient_canonical`): SimpleITK's DICOMOrient to ``LPS``, an exact
   permutation/flip of the voxels (no interpolation) that makes the direction matrix the identity for any
   axis-aligned file. Afterwards the numpy array (``sitk.GetArrayFromImage``) has axes

   * axis 0 (z, D): inferior → superior, the ABUS **sweep** direction (one transducer frame per index);
   * axis 1 (y, H): anterior → posterior, i.e. **depth** from the skin (index 0 is nearest the transducer);
   * axis 2 (x, W): patient right → left, the **lateral** direction along the transducer.

   This holds for a supine patient scanned in the usual AP view. A file is mapped by its direction matrix (as
   read, or as overridden by the site config's ``orientation``): e.g. a TDSC-style NRRD whose x axis is really
   depth needs ``orientation = "PLS"`` (x → posterior, y → left, z → superior) in its site TOML, because its
   header carries an identity direction. docs/data.md explains how to find the right code.
2. **Resampling** (:func:`resample`) to ``DataConfig.spacing_{z,y,x}`` (mm; 0 keeps the file's spacing on that
   axis) with one SimpleITK resampler: linear for images, nearest neighbour for masks. The outer edges of the
   volume stay where they were (physical extent kept to within one output voxel).
3. **Intensity normalisation** (:func:`fit_intensity`): ``zscore_nonzero`` (mean/std over voxels > 0, the
   official SAM-Med3D choice; zero voxels are "no signal" in ABUS), ``zscore`` (all voxels) or ``minmax``
   (to [0, 1]). Statistics come from the whole case, so training crops and evaluation blocks agree.

Crops (:func:`crop_or_pad`, :func:`lesion_crop`) use MONAI's SpatialCrop and BorderPad and always report the
crop's ``start`` index so that a prediction on the crop maps back: ``crop[i, j, k] == volume[start + (i, j, k)]``
where the index is inside the volume, and ``pad_value`` (the normalised value of a raw 0) elsewhere.
:func:`restore_geometry` maps a processed-grid array back onto the file's own grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from monai.transforms import BorderPad, SpatialCrop

from shared.config import DataConfig

__all__ = [
    "CANONICAL_ORIENTATION",
    "NORMALISATIONS",
    "Crop",
    "Grid",
    "IntensityMap",
    "Preprocessed",
    "crop_or_pad",
    "fit_intensity",
    "lesion_crop",
    "orient_canonical",
    "preprocess_case",
    "resample",
    "resampled_grid",
    "restore_geometry",
    "target_spacing_zyx",
]

#: DICOM orientation code of the canonical orientation (identity direction in SimpleITK's LPS world).
CANONICAL_ORIENTATION = "LPS"
#: Allowed values of ``DataConfig.normalisation``.
NORMALISATIONS = ("zscore_nonzero", "zscore", "minmax")


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Grid:
    """A voxel grid in physical space, in SimpleITK (x, y, z) order: size (voxels), spacing/origin (mm)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Numpy shape (D, H, W) of an array on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing (mm) in array order (z, y, x)."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    def image_of(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image holding ``array`` (shape (D, H, W)) on this grid."""
        if tuple(array.shape) != self.shape_zyx:
            raise ValueError(
                f"array of shape {array.shape} does not fit a grid of shape {self.shape_zyx} (z, y, x)"
            )
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def orient_canonical(image: sitk.Image) -> sitk.Image:
    """Permute/flip ``image`` exactly into the canonical orientation (module docstring); no interpolation."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D of size {image.GetSize()}")
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def target_spacing_zyx(config: DataConfig, current_zyx: Sequence[float]) -> tuple[float, float, float]:
    """The spacing (mm, (z, y, x)) to resample to: ``config.spacing_*`` where > 0, else the current spacing."""
    wanted = (config.spacing_z, config.spacing_y, config.spacing_x)
    for axis, value in zip("zyx", wanted, strict=True):
        if not value >= 0.0 or not np.isfinite(value):
            raise ValueError(f"data config: spacing-{axis} = {value!r} must be a finite number >= 0 (mm)")
    return tuple(float(w) if w > 0 else float(c) for w, c in zip(wanted, current_zyx, strict=True))


def _resample_to(image: sitk.Image, grid: Grid, *, is_mask: bool) -> sitk.Image:
    """The one resampler: ``image`` onto ``grid``, linear (float32) for images, nearest (uint8) for masks."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(grid.size)
    resampler.SetOutputSpacing(grid.spacing)
    resampler.SetOutputOrigin(grid.origin)
    resampler.SetOutputDirection(grid.direction)
    resampler.SetInterpolator(sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear)
    resampler.SetOutputPixelType(sitk.sitkUInt8 if is_mask else sitk.sitkFloat32)
    resampler.SetDefaultPixelValue(0)
    return resampler.Execute(image)


def resampled_grid(grid: Grid, spacing_zyx: Sequence[float]) -> Grid:
    """The grid covering the same physical box as ``grid`` (outer voxel edges kept) at ``spacing_zyx`` (mm)."""
    old = np.asarray(grid.spacing, dtype=float)
    new = np.asarray(spacing_zyx[::-1], dtype=float)
    if np.any(new <= 0):
        raise ValueError(f"target spacing {tuple(spacing_zyx)} (z, y, x) must be > 0 mm on every axis")
    extent = np.asarray(grid.size) * old
    size = np.maximum(1, np.round(extent / new)).astype(int)
    direction = np.asarray(grid.direction, dtype=float).reshape(3, 3)
    origin = np.asarray(grid.origin) + direction @ ((new - old) / 2.0)
    return Grid(tuple(int(s) for s in size), tuple(new.tolist()), tuple(origin.tolist()), grid.direction)


def resample(image: sitk.Image, spacing_zyx: Sequence[float], *, is_mask: bool) -> sitk.Image:
    """Resample ``image`` to ``spacing_zyx`` (mm, (z, y, x)) keeping its physical extent.

    Images come back as float32 (linear interpolation), masks as uint8 (nearest neighbour). Returns the input
    unchanged (cast only) when the spacing already matches.
    """
    grid = Grid.of(image)
    if np.allclose(grid.spacing_zyx, spacing_zyx, rtol=1e-6, atol=0.0):
        return sitk.Cast(image, sitk.sitkUInt8 if is_mask else sitk.sitkFloat32)
    return _resample_to(image, resampled_grid(grid, spacing_zyx), is_mask=is_mask)


def restore_geometry(
    array: np.ndarray, *, processed: Grid, original: Grid, is_mask: bool = True
) -> sitk.Image:
    """Map an array on the processed grid (shape (D, H, W)) back onto the file's own ``original`` grid.

    Works for any orientation because both grids live in the same physical space. Masks use nearest
    neighbour (uint8 result), probabilities linear interpolation (float32). Voxels outside the processed grid
    become 0.
    """
    source = processed.image_of(np.ascontiguousarray(array, dtype=np.uint8 if is_mask else np.float32))
    return _resample_to(source, original, is_mask=is_mask)


# ---------------------------------------------------------------- intensity


@dataclass(frozen=True)
class IntensityMap:
    """``normalised = (raw - offset) / scale``; ``pad_value`` is the normalised value of a raw 0."""

    offset: float
    scale: float

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Normalise ``array`` (any shape) to float32."""
        return (np.asarray(array, dtype=np.float32) - np.float32(self.offset)) / np.float32(self.scale)

    @property
    def pad_value(self) -> float:
        return float(-self.offset / self.scale)


def fit_intensity(array: np.ndarray, method: str) -> IntensityMap:
    """Intensity statistics of one case for ``method`` (one of :data:`NORMALISATIONS`).

    ``zscore_nonzero`` uses the voxels > 0 (all voxels when none is > 0); a constant image gets scale 1.
    """
    if method not in NORMALISATIONS:
        raise ValueError(f"data config: normalisation = {method!r}; allowed: {', '.join(NORMALISATIONS)}")
    values = np.asarray(array, dtype=np.float32)
    if method == "minmax":
        low, high = float(values.min()), float(values.max())
        return IntensityMap(low, high - low if high > low else 1.0)
    if method == "zscore_nonzero" and np.any(values > 0):
        values = values[values > 0]
    mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
    return IntensityMap(mean, std if std > 0 else 1.0)


# ---------------------------------------------------------------- one case


@dataclass(frozen=True)
class Preprocessed:
    """One case after :func:`preprocess_case`, in the canonical orientation at the target spacing.

    ``image``: (D, H, W) float32, normalised. ``mask``: (D, H, W) uint8 0/1 or None. ``spacing_mm``: (z, y, x).
    ``grid``: the processed grid; ``original``: the file's grid (for :func:`restore_geometry`).
    """

    image: np.ndarray
    mask: np.ndarray | None
    spacing_mm: tuple[float, float, float]
    intensity: IntensityMap
    grid: Grid
    original: Grid

    @property
    def pad_value(self) -> float:
        """Normalised value of a raw 0: what crops and blocks are padded with."""
        return self.intensity.pad_value


def _same_grid(a: Grid, b: Grid) -> bool:
    return a.size == b.size and all(
        np.allclose(x, y, atol=1e-4)
        for x, y in ((a.spacing, b.spacing), (a.origin, b.origin), (a.direction, b.direction))
    )


def preprocess_case(image: sitk.Image, mask: sitk.Image | None, config: DataConfig) -> Preprocessed:
    """Orient, resample and normalise one case (module docstring); the mask follows the image's grid.

    An axis of length 1 (a one-frame volume, :mod:`shared.data.busi_volumes`) is not resampled. The mask is
    resampled (nearest) onto the processed image grid, so a mask whose header differs slightly
    from the image's still lands voxel-aligned; values > 0 become 1.
    """
    original = Grid.of(image)
    oriented = orient_canonical(image)
    current = Grid.of(oriented)
    spacing = target_spacing_zyx(config, current.spacing_zyx)
    # An axis of one voxel (a one-frame volume's sweep) has no extent to resample: it keeps its spacing, else
    # the grid's centre would move off the frame and the linear resampler would return zeros.
    spacing = tuple(
        c if n == 1 else s for s, c, n in zip(spacing, current.spacing_zyx, current.shape_zyx, strict=True)
    )
    processed = resample(oriented, spacing, is_mask=False)
    grid = Grid.of(processed)
    raw = sitk.GetArrayViewFromImage(processed)
    intensity = fit_intensity(raw, config.normalisation)
    mask_array = None
    if mask is not None:
        binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
        on_grid = binary if _same_grid(Grid.of(binary), grid) else _resample_to(binary, grid, is_mask=True)
        mask_array = sitk.GetArrayFromImage(on_grid).astype(np.uint8, copy=False)
    return Preprocessed(intensity.apply(raw), mask_array, grid.spacing_zyx, intensity, grid, original)


# ---------------------------------------------------------------- crops


@dataclass(frozen=True)
class Crop:
    """A cubic crop: ``image`` (P, P, P) float32, ``mask`` (P, P, P) uint8 or None, ``start`` (z, y, x) index
    of the crop's first voxel in the volume (negative or past the end where the crop is padded)."""

    image: np.ndarray
    mask: np.ndarray | None
    start: tuple[int, int, int]


def crop_or_pad(
    volume: np.ndarray, start: Sequence[int], size: int | Sequence[int], *, pad_value: float = 0.0
) -> np.ndarray:
    """The box ``[start, start + size)`` of an N-D ``volume`` (MONAI SpatialCrop, then BorderPad outside it).

    ``out[i] == volume[start + i]`` where that index lies inside the volume, ``pad_value`` elsewhere; the
    output has the dtype of ``volume`` and shape ``size`` (an int means a cube).
    """
    shape = np.asarray(volume.shape)
    sizes = np.broadcast_to(np.asarray(size, dtype=int), shape.shape)
    begin = np.asarray(start, dtype=int)
    if begin.shape != shape.shape or np.any(sizes < 1):
        raise ValueError(
            f"crop start {tuple(start)} / size {tuple(sizes)} do not fit a volume of shape {volume.shape}"
        )
    end = begin + sizes
    inner_start, inner_end = np.clip(begin, 0, shape), np.clip(end, 0, shape)
    if np.any(inner_end <= inner_start):  # the box misses the volume entirely
        return np.full(tuple(sizes), pad_value, dtype=volume.dtype)
    cropped = SpatialCrop(roi_start=inner_start.tolist(), roi_end=inner_end.tolist())(volume[None])
    border = [int(v) for pair in zip(inner_start - begin, end - inner_end, strict=True) for v in pair]
    if any(border):
        cropped = BorderPad(spatial_border=border, mode="constant", value=pad_value)(cropped)
    return np.asarray(cropped[0], dtype=volume.dtype)


def _lesion_bbox_centre(mask: np.ndarray) -> tuple[int, int, int]:
    points = np.argwhere(mask > 0)
    if points.size == 0:
        raise ValueError("empty mask: no lesion voxel to centre the crop on")
    return tuple(int(v) for v in (points.min(0) + points.max(0)) // 2)


def lesion_crop(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    patch_size: int,
    pad_value: float,
    centre: Sequence[int] | None = None,
    jitter_voxels: int = 0,
    rng: np.random.Generator | None = None,
) -> Crop:
    """A ``patch_size``³ crop of ``image`` and ``mask`` (both (D, H, W)) around the lesion.

    The centre is ``centre`` (z, y, x) if given, else the centre of the bounding box of all mask voxels,
    moved by a uniform integer in [-jitter_voxels, jitter_voxels] per axis drawn from ``rng`` (training).
    Since the jitter is below ``patch_size / 2`` the crop always contains the unjittered centre.
    """
    if not 0 <= 2 * jitter_voxels < patch_size:
        raise ValueError(
            f"data config: crop-jitter-voxels = {jitter_voxels} must be >= 0 and below patch-size / 2 "
            f"(= {patch_size / 2:g}) so that the crop keeps the lesion centre"
        )
    middle = np.asarray(centre if centre is not None else _lesion_bbox_centre(mask), dtype=int)
    if jitter_voxels:
        if rng is None:
            raise ValueError("lesion_crop: jitter_voxels > 0 needs a seeded rng (numpy Generator)")
        middle = middle + rng.integers(-jitter_voxels, jitter_voxels + 1, size=3)
    start = middle - patch_size // 2
    return Crop(
        crop_or_pad(image, start, patch_size, pad_value=pad_value),
        crop_or_pad(mask, start, patch_size, pad_value=0),
        tuple(int(v) for v in start),
    )
