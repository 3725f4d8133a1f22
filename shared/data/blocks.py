"""Evaluation blocks: the patch-size cubes that cover a lesion, and stitching their predictions back.

Seed 000 evaluates a case on the N blocks of 128³ needed to cover the whole lesion and drops blocks with
fewer than 2000 lesion voxels. :func:`covering_blocks` does the same for any ``patch_size``:

* per axis, the lesion's bounding box (all lesion voxels of the mask) of extent ``e`` gets
  ``n = ceil(e / P)`` block positions, spread evenly from the box's first to its last voxel (neighbours overlap
  when ``e`` is not a multiple of ``P``); a single block is centred on the box and, when the volume is at least
  ``P`` long on that axis, moved inside the volume as far as the box allows;
* the blocks are the product of the per-axis positions, so together they cover every lesion voxel;
* blocks with fewer than ``min_lesion_voxels`` lesion voxels are dropped, except that the block with the most
  lesion voxels is always kept (so every lesion is evaluated).

Blocks may extend past the volume; :func:`extract_blocks` pads them (MONAI BorderPad via
:func:`~shared.data.transforms.crop_or_pad`). :func:`stitch` puts per-block predictions back into the volume
and **averages probabilities** (values in [0, 1], e.g. ``sigmoid(logits)``) where blocks overlap; threshold
the result at 0.5 for a mask. Voxels that no block covers get ``fill`` (0: background).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.data.transforms import crop_or_pad

__all__ = ["Block", "Stitched", "axis_starts", "covering_blocks", "extract_blocks", "lesion_bbox", "stitch"]


@dataclass(frozen=True)
class Block:
    """One cubic block: ``start`` (z, y, x) voxel index of its first voxel in the volume (may be negative or
    extend past the end), side ``size`` (voxels), and the number of lesion voxels it holds."""

    start: tuple[int, int, int]
    size: int
    lesion_voxels: int

    def overlap(self, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """(volume slices, block slices) of the part of the block inside a volume of ``shape``; None if none."""
        begin = np.asarray(self.start)
        low = np.maximum(begin, 0)
        high = np.minimum(begin + self.size, np.asarray(shape))
        if np.any(high <= low):
            return None
        volume = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
        block = tuple(slice(int(a), int(b)) for a, b in zip(low - begin, high - begin, strict=True))
        return volume, block


@dataclass(frozen=True)
class Stitched:
    """Stitched predictions: ``values`` (D, H, W) float32 averaged over blocks, ``coverage`` (D, H, W) uint16
    number of blocks covering each voxel (0: not covered, value is ``fill``)."""

    values: np.ndarray
    coverage: np.ndarray

    @property
    def covered(self) -> np.ndarray:
        """(D, H, W) bool: voxels inside at least one block."""
        return self.coverage > 0


def lesion_bbox(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """Bounding box (start, stop) in (z, y, x) voxels, stop exclusive, of all voxels > 0; None when empty."""
    hits = [
        np.flatnonzero(np.any(mask > 0, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        for axis in range(3)
    ]
    if any(h.size == 0 for h in hits):
        return None
    return tuple(int(h[0]) for h in hits), tuple(int(h[-1]) + 1 for h in hits)


def axis_starts(low: int, high: int, size: int, length: int) -> list[int]:
    """Block starts on one axis covering voxels [low, high) with blocks of ``size`` (volume ``length`` long)."""
    extent = high - low
    count = max(1, math.ceil(extent / size))
    if count > 1:
        return [int(round(v)) for v in np.linspace(low, high - size, count)]
    start = low + extent // 2 - size // 2
    least, most = high - size, low  # any start in [least, most] covers the whole box
    if length >= size:
        least, most = max(least, 0), min(most, length - size)
    return [int(min(max(start, least), most))]


def covering_blocks(mask: np.ndarray, *, patch_size: int, min_lesion_voxels: int) -> list[Block]:
    """The blocks that cover the lesion of ``mask`` ((D, H, W), > 0 is lesion), filtered as the module says.

    Raises ValueError for an empty mask (there is no lesion to cover).
    """
    if patch_size < 1:
        raise ValueError(f"data config: patch-size = {patch_size} must be >= 1")
    box = lesion_bbox(mask)
    if box is None:
        raise ValueError("empty mask: no lesion voxel to cover with evaluation blocks")
    per_axis = [axis_starts(lo, hi, patch_size, n) for lo, hi, n in zip(*box, mask.shape, strict=True)]
    lesion = mask > 0
    blocks = []
    for start in np.stack(np.meshgrid(*per_axis, indexing="ij"), axis=-1).reshape(-1, 3):
        block = Block(tuple(int(v) for v in start), patch_size, 0)
        found = block.overlap(mask.shape)
        count = int(np.count_nonzero(lesion[found[0]])) if found else 0
        blocks.append(Block(block.start, patch_size, count))
    kept = [b for b in blocks if b.lesion_voxels >= min_lesion_voxels]
    return kept or [max(blocks, key=lambda b: b.lesion_voxels)]


def extract_blocks(volume: np.ndarray, blocks: Sequence[Block], *, pad_value: float = 0.0) -> np.ndarray:
    """The blocks of ``volume`` (D, H, W) stacked as (N, P, P, P), padded with ``pad_value`` outside it."""
    if not blocks:
        raise ValueError("extract_blocks: no blocks given")
    return np.stack([crop_or_pad(volume, b.start, b.size, pad_value=pad_value) for b in blocks])


def stitch(
    block_predictions: Sequence[np.ndarray] | np.ndarray,
    blocks: Sequence[Block],
    shape: Sequence[int],
    *,
    fill: float = 0.0,
) -> Stitched:
    """Put per-block probabilities ((N, P, P, P) or N arrays (P, P, P)) back into a (D, H, W) volume.

    Overlapping blocks are averaged (on probabilities, not logits); uncovered voxels get ``fill``.
    """
    if len(block_predictions) != len(blocks):
        raise ValueError(f"stitch: {len(block_predictions)} predictions for {len(blocks)} blocks")
    total = np.zeros(tuple(shape), dtype=np.float64)
    coverage = np.zeros(tuple(shape), dtype=np.uint16)
    for prediction, block in zip(block_predictions, blocks, strict=True):
        if tuple(np.shape(prediction)) != (block.size,) * 3:
            raise ValueError(
                f"stitch: prediction of shape {np.shape(prediction)} for a block of side {block.size}"
            )
        found = block.overlap(shape)
        if found is None:
            continue
        inside, part = found
        total[inside] += np.asarray(prediction, dtype=np.float64)[part]
        coverage[inside] += 1
    values = np.full(tuple(shape), fill, dtype=np.float32)
    covered = coverage > 0
    values[covered] = (total[covered] / coverage[covered]).astype(np.float32)
    return Stitched(values, coverage)
