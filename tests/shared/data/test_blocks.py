"""Evaluation blocks: coverage of every lesion voxel, dropping sparse blocks, stitching (oracle Dice 1)."""

from __future__ import annotations

import numpy as np
import pytest

from shared.data.blocks import Block, axis_starts, covering_blocks, extract_blocks, lesion_bbox, stitch


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def random_lesion(shape, box, seed: int) -> np.ndarray:
    """A blobby lesion filling part of ``box`` ((start, stop) per axis)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    region = tuple(slice(a, b) for a, b in box)
    mask[region] = rng.uniform(size=tuple(b - a for a, b in box)) < 0.7
    return mask


CASES = [
    ((40, 50, 60), ((5, 15), (10, 20), (20, 30)), 16),  # lesion smaller than a block
    ((40, 50, 60), ((0, 40), (3, 47), (1, 59)), 16),  # lesion larger than a block on every axis
    ((12, 50, 60), ((2, 10), (45, 50), (0, 5)), 16),  # volume thinner than a block, lesion at the borders
    ((33, 33, 33), ((0, 33), (0, 33), (0, 33)), 10),  # extent not a multiple of the block
]


@pytest.mark.parametrize(("shape", "box", "patch"), CASES)
def test_blocks_cover_every_lesion_voxel_and_oracle_stitch_gives_dice_one(shape, box, patch) -> None:
    mask = random_lesion(shape, box, seed=len(shape) + patch)
    blocks = covering_blocks(mask, patch_size=patch, min_lesion_voxels=0)
    assert all(b.size == patch for b in blocks)
    stitched = stitch(extract_blocks(mask, blocks).astype(np.float32), blocks, mask.shape)
    assert stitched.values.shape == mask.shape and stitched.values.dtype == np.float32
    assert np.all(stitched.covered[mask > 0])  # every lesion voxel is inside a block
    assert dice(stitched.values > 0.5, mask) == 1.0
    assert sum(b.lesion_voxels for b in blocks) >= np.count_nonzero(mask)


def test_single_block_stays_inside_a_large_enough_volume() -> None:
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[0:4, 36:40, 18:22] = 1
    (block,) = covering_blocks(mask, patch_size=16, min_lesion_voxels=0)
    assert block.start == (0, 24, 12)  # moved inside, still covering the lesion
    assert axis_starts(2, 8, 16, 10) == [-3]  # volume shorter than the block: centred on the lesion


def test_sparse_blocks_are_dropped_but_the_fullest_block_is_kept() -> None:
    mask = np.zeros((20, 20, 40), np.uint8)
    mask[5:15, 5:15, 2:30] = 1  # 28 voxels long: two blocks of 16 along x
    blocks = covering_blocks(mask, patch_size=16, min_lesion_voxels=0)
    assert len(blocks) == 2
    counts = sorted(b.lesion_voxels for b in blocks)
    kept = covering_blocks(mask, patch_size=16, min_lesion_voxels=counts[0] + 1)
    assert [b.lesion_voxels for b in kept] == [counts[1]]
    only = covering_blocks(mask, patch_size=16, min_lesion_voxels=10**9)
    assert [b.lesion_voxels for b in only] == [counts[1]]
    stitched = stitch(extract_blocks(mask, kept), kept, mask.shape)
    covered = stitched.covered  # exact inside the kept blocks
    assert np.array_equal((stitched.values > 0.5)[covered], (mask > 0)[covered])


def test_stitch_averages_overlaps_and_fills_the_rest() -> None:
    blocks = [Block((0, 0, 0), 4, 0), Block((0, 0, 2), 4, 0)]
    predictions = [np.zeros((4, 4, 4), np.float32), np.ones((4, 4, 4), np.float32)]
    stitched = stitch(predictions, blocks, (4, 4, 8), fill=-1.0)
    assert np.all(stitched.values[..., :2] == 0.0)
    assert np.all(stitched.values[..., 2:4] == 0.5) and np.all(stitched.coverage[..., 2:4] == 2)
    assert np.all(stitched.values[..., 4:6] == 1.0)
    assert np.all(stitched.values[..., 6:] == -1.0) and not stitched.covered[..., 6:].any()


def test_blocks_outside_the_volume_are_padded() -> None:
    volume = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    (patch,) = extract_blocks(volume, [Block((-1, 0, 0), 3, 0)], pad_value=-5.0)
    assert np.all(patch[0] == -5.0) and np.array_equal(patch[1:], volume[0:2, 0:3, 0:3])


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="empty mask"):
        covering_blocks(np.zeros((4, 4, 4)), patch_size=2, min_lesion_voxels=0)
    with pytest.raises(ValueError, match="2 predictions for 1 blocks"):
        stitch([np.zeros((2, 2, 2))] * 2, [Block((0, 0, 0), 2, 0)], (4, 4, 4))
    with pytest.raises(ValueError, match="block of side 2"):
        stitch([np.zeros((3, 3, 3))], [Block((0, 0, 0), 2, 0)], (4, 4, 4))
    assert lesion_bbox(np.zeros((3, 3, 3))) is None
