"""Tri-plane extraction for the benign/malignant classifier (seed 003).

From a 3D mask: connected components (26-connectivity, ``scipy.ndimage.label``) → the largest lesion's
bounding box → lesion-region images in the transverse, sagittal and coronal planes, ``frames`` per plane,
each resized to ``size × size`` → float32 array of shape **(3, F, S, S)**.

Inputs are arrays in the canonical orientation of :mod:`shared.data.transforms` (after
:func:`~shared.data.transforms.preprocess_case`): array axes (z, y, x) = (sweep inferior → superior,
depth anterior → posterior from the skin, lateral right → left). The planes are:

====  ============  ===========================  ==================================  ==========================
axis  plane         slice of the (z, y, x) array  frame rows (top → bottom)           frame columns (left → right)
====  ============  ===========================  ==================================  ==========================
0     transverse    ``image[z_k, :, :]``         y: depth, skin at the top           x: patient right → left
1     sagittal      ``image[:, :, x_k].T``       y: depth, skin at the top           z: inferior → superior
2     coronal       ``image[:, y_k, :]``         z: inferior → superior              x: patient right → left
====  ============  ===========================  ==================================  ==========================

The transverse frame is the image the ABUS transducer acquires; the coronal frame is parallel to the skin (the
characteristic ABUS view). A file's direction matrix reaches this table through the canonical orientation:
DICOMOrient to LPS makes array axis 0 the one the direction matrix sends to superior/inferior, axis 1 the one
sent to anterior/posterior and axis 2 the one sent to left/right.

Frames: for the plane normal to axis ``a``, frame ``k`` (k = 0..F-1) is the slice at index
``floor(start_a + extent_a · (k + 1) / (F + 1) - 0.5)`` of the lesion's box on that axis, i.e. evenly spread
across the lesion (one frame = the central slice, :attr:`LesionBox.centre_voxel`).

Region: a square **in millimetres**, centred on the box centre, whose side is the larger of the box's two
in-plane extents plus a margin on each side (``max(margin · extent, margin_mm)``); the aspect ratio of the
lesion is therefore kept (taller-than-wide stays visible). The region is cut from the slice (padded with
``pad_value`` outside the volume) and resized to ``size × size`` with MONAI's Resize: area averaging when the
region is larger than the frame (no aliasing; MONAI's own anti-aliasing blur pads with zeros and would darken the
border rows), bilinear when it is smaller. The image is the normalised image, not masked: surroundings (margins, posterior shadowing)
stay visible, as in the seed's lesion-region maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from monai.transforms import Resize
from scipy import ndimage

from shared.config import DataConfig
from shared.data.transforms import crop_or_pad

__all__ = [
    "PLANES",
    "BoxError",
    "LesionBox",
    "extract_planes",
    "frame_positions",
    "jitter_box",
    "largest_lesion_box",
    "lesion_components",
    "planes_from_config",
]

#: Plane names in the order of axis 0 of :func:`extract_planes`' output.
PLANES = ("transverse", "sagittal", "coronal")
# For each plane: the array axis it is normal to, and the (row, column) array axes of its frames.
_PLANE_AXES = {"transverse": (0, (1, 2)), "sagittal": (2, (1, 0)), "coronal": (1, (0, 2))}


@dataclass(frozen=True)
class LesionBox:
    """Bounding box of one connected lesion: ``start``/``stop`` (z, y, x) voxel indices, stop exclusive;
    ``voxels`` its number of voxels."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    voxels: int

    @property
    def extent(self) -> tuple[int, int, int]:
        """Box size (voxels) per axis (z, y, x)."""
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    @property
    def centre(self) -> tuple[float, float, float]:
        """Box centre (z, y, x) in voxel index units (may be a half index)."""
        return tuple((a + b - 1) / 2 for a, b in zip(self.start, self.stop, strict=True))

    @property
    def centre_voxel(self) -> tuple[int, int, int]:
        """A voxel at the box centre (rounded down)."""
        return tuple(int((a + b - 1) // 2) for a, b in zip(self.start, self.stop, strict=True))


def lesion_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of ``mask > 0`` with 26-connectivity: (labels (D, H, W) int32, count)."""
    labels, count = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), dtype=bool))
    return labels, int(count)


def largest_lesion_box(mask: np.ndarray) -> LesionBox:
    """Bounding box of the largest connected lesion of ``mask`` (D, H, W); ties go to the lower label.

    Raises ValueError when the mask has no lesion voxel.
    """
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D mask (D, H, W), got shape {mask.shape}")
    labels, count = lesion_components(mask)
    if count == 0:
        raise ValueError("empty mask: no lesion to extract planes from")
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    largest = int(np.argmax(sizes)) + 1
    found = ndimage.find_objects(labels, max_label=largest)[largest - 1]
    start = tuple(int(s.start) for s in found)
    stop = tuple(int(s.stop) for s in found)
    return LesionBox(start, stop, int(sizes[largest - 1]))


@dataclass(frozen=True)
class BoxError:
    """How a box misses the true lesion box, per axis (z, y, x): the centre's shift and the extent's ratio, both in
    units of the true box's extent (so that an error measured on a case carries over to its augmented copies)."""

    shift: tuple[float, float, float]
    scale: tuple[float, float, float]

    @classmethod
    def between(cls, true: LesionBox, found: LesionBox) -> BoxError:
        """The error of ``found`` (e.g. the box of a segmenter's mask) against ``true``."""
        return cls(
            tuple((f - t) / e for f, t, e in zip(found.centre, true.centre, true.extent, strict=True)),
            tuple(f / e for f, e in zip(found.extent, true.extent, strict=True)),
        )

    @classmethod
    def random(cls, fraction: float, rng: np.random.RandomState) -> BoxError:
        """Shift ``u · fraction`` and scale ``1 + v · fraction`` per axis, ``u``, ``v`` uniform in [-1, 1]."""
        shift, scale = rng.uniform(-1.0, 1.0, size=3), rng.uniform(-1.0, 1.0, size=3)
        return cls(tuple(float(u * fraction) for u in shift), tuple(float(1 + v * fraction) for v in scale))

    def apply(self, box: LesionBox, shape: Sequence[int]) -> LesionBox:
        """``box`` with this error, rounded to whole voxels, at least one voxel per axis, inside ``shape``."""
        start, stop = [], []
        for axis in range(3):
            extent = box.extent[axis]
            new_extent = min(max(1, int(round(extent * self.scale[axis]))), int(shape[axis]))
            centre = box.centre[axis] + self.shift[axis] * extent
            first = int(np.floor(centre - (new_extent - 1) / 2 + 0.5))
            first = min(max(first, 0), int(shape[axis]) - new_extent)
            start.append(first)
            stop.append(first + new_extent)
        return LesionBox(tuple(start), tuple(stop), box.voxels)


def jitter_box(
    box: LesionBox, fraction: float, shape: Sequence[int], rng: np.random.RandomState
) -> LesionBox:
    """``box`` moved and resized at random, as a segmenter's box misses the true one (``data.planes-box-jitter``):
    :meth:`BoxError.random` applied to it (the volume ``shape`` (D, H, W) bounds it); ``fraction`` 0 returns
    ``box`` unchanged without a draw."""
    if fraction <= 0:
        return box
    return BoxError.random(fraction, rng).apply(box, shape)


def frame_positions(start: int, stop: int, frames: int) -> list[int]:
    """``frames`` slice indices spread evenly across [start, stop) (module docstring)."""
    if frames < 1:
        raise ValueError(f"data config: planes-frames = {frames} must be >= 1")
    extent = stop - start
    positions = [int(np.floor(start + extent * (k + 1) / (frames + 1) - 0.5)) for k in range(frames)]
    return [min(max(p, start), stop - 1) for p in positions]


def _region(
    slice_2d: np.ndarray, centre: Sequence[float], sides: Sequence[int], pad_value: float
) -> np.ndarray:
    start = [int(np.floor(c - (n - 1) / 2 + 0.5)) for c, n in zip(centre, sides, strict=True)]
    return crop_or_pad(slice_2d, start, sides, pad_value=pad_value)


def _plane_frames(
    image: np.ndarray,
    box: LesionBox,
    plane: str,
    *,
    frames: int,
    size: int,
    spacing_mm: Sequence[float],
    margin: float,
    margin_mm: float,
    pad_value: float,
) -> np.ndarray:
    """The (frames, S, S) float32 frames of one plane (module docstring)."""
    normal, (row_axis, col_axis) = _PLANE_AXES[plane]
    side_mm = max(
        box.extent[a] * spacing_mm[a] + 2 * max(margin * box.extent[a] * spacing_mm[a], margin_mm)
        for a in (row_axis, col_axis)
    )
    sides = [max(1, int(round(side_mm / spacing_mm[a]))) for a in (row_axis, col_axis)]
    centre = [box.centre[row_axis], box.centre[col_axis]]
    mode = "area" if max(sides) > size else "bilinear"
    resize = Resize((size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    out = []
    for position in frame_positions(box.start[normal], box.stop[normal], frames):
        slice_2d = np.take(image, position, axis=normal)  # remaining axes keep their (z, y, x) order
        if row_axis > col_axis:
            slice_2d = slice_2d.T
        region = _region(slice_2d, centre, sides, pad_value)
        out.append(np.asarray(resize(region[None].astype(np.float32))[0], dtype=np.float32))
    return np.stack(out)


def extract_planes(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    frames: int,
    size: int,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    margin: float = 0.15,
    margin_mm: float = 1.0,
    pad_value: float = 0.0,
    box: LesionBox | None = None,
) -> np.ndarray:
    """Lesion-region frames of the largest lesion of ``mask`` in ``image`` (both (D, H, W), canonical).

    Returns float32 (3, frames, size, size): planes in :data:`PLANES` order, frames across the lesion.
    ``spacing_mm`` is (z, y, x). ``box``: cut around this box instead of the largest lesion's (a jittered one,
    :func:`jitter_box`). Raises ValueError for an empty mask or mismatched shapes.
    """
    if image.shape != mask.shape:
        raise ValueError(f"image shape {image.shape} and mask shape {mask.shape} differ")
    if size < 1 or margin < 0 or margin_mm < 0:
        raise ValueError(f"planes: size = {size} must be >= 1 and margins ({margin}, {margin_mm} mm) >= 0")
    box = largest_lesion_box(mask) if box is None else box
    options = dict(spacing_mm=spacing_mm, margin=margin, margin_mm=margin_mm, pad_value=pad_value)
    return np.stack([_plane_frames(image, box, p, frames=frames, size=size, **options) for p in PLANES])


def planes_from_config(
    image: np.ndarray,
    mask: np.ndarray,
    config: DataConfig,
    *,
    spacing_mm: Sequence[float],
    pad_value: float,
    box: LesionBox | None = None,
) -> np.ndarray:
    """:func:`extract_planes` with frames, size and margins from ``config``: (3, planes_frames, S, S)."""
    return extract_planes(
        image,
        mask,
        frames=config.planes_frames,
        size=config.planes_size,
        spacing_mm=spacing_mm,
        margin=config.planes_margin,
        margin_mm=config.planes_margin_mm,
        pad_value=pad_value,
        box=box,
    )
