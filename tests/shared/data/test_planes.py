"""Tri-plane extraction on known box lesions: bounding box, frame positions, plane axes, aspect, shapes."""

from __future__ import annotations

import numpy as np
import pytest

from shared.config import DataConfig
from shared.data.planes import (
    PLANES,
    extract_planes,
    frame_positions,
    jitter_box,
    largest_lesion_box,
    lesion_components,
    planes_from_config,
)

SHAPE = (30, 40, 50)
BOX = ((8, 20), (10, 16), (20, 32))  # (z, y, x) start/stop: 12 × 6 × 12 voxels


def box_mask(box=BOX, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(a, b) for a, b in box)] = 1
    return mask


def coordinate_image(axis: int) -> np.ndarray:
    """An image whose value is the voxel's index along ``axis``."""
    return np.indices(SHAPE, dtype=np.float32)[axis]


def test_largest_lesion_box_uses_26_connected_components() -> None:
    mask = box_mask()
    mask[0:2, 0:2, 0:2] = 1  # a small second lesion
    mask[2, 2, 2] = 1  # touches it only diagonally: same component
    labels, count = lesion_components(mask)
    assert count == 2 and labels[2, 2, 2] == labels[0, 0, 0]
    box = largest_lesion_box(mask)
    assert (box.start, box.stop) == ((8, 10, 20), (20, 16, 32))
    assert box.extent == (12, 6, 12) and box.voxels == 12 * 6 * 12
    assert box.centre == (13.5, 12.5, 25.5) and box.centre_voxel == (13, 12, 25)
    with pytest.raises(ValueError, match="empty mask"):
        largest_lesion_box(np.zeros(SHAPE))


def test_frame_positions_spread_across_the_lesion() -> None:
    assert frame_positions(8, 20, 1) == [13]
    assert frame_positions(8, 20, 3) == [10, 13, 16]
    assert frame_positions(0, 9, 2) == [2, 5]
    assert frame_positions(5, 6, 4) == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="planes-frames"):
        frame_positions(0, 4, 0)


@pytest.mark.parametrize(("plane", "normal_axis", "box_axis"), [(0, 0, 0), (1, 2, 2), (2, 1, 1)])
def test_each_plane_is_a_slice_normal_to_its_axis(plane: int, normal_axis: int, box_axis: int) -> None:
    planes = extract_planes(
        coordinate_image(normal_axis), box_mask(), frames=3, size=16, margin=0, margin_mm=0
    )
    assert planes.shape == (3, 3, 16, 16) and planes.dtype == np.float32
    start, stop = BOX[box_axis]
    for frame, position in enumerate(frame_positions(start, stop, 3)):
        assert planes[plane, frame] == pytest.approx(np.full((16, 16), position), abs=1e-4)


def test_rows_and_columns_follow_the_documented_axes() -> None:
    depth = extract_planes(coordinate_image(1), box_mask(), frames=1, size=12, margin=0, margin_mm=0)
    # transverse and sagittal frames: rows run down in depth (y), columns are constant in y
    for plane in (0, 1):
        assert np.all(np.diff(depth[plane, 0].mean(axis=1)) > 0)
        assert np.allclose(depth[plane, 0].std(axis=1), 0, atol=1e-4)
    sweep = extract_planes(coordinate_image(0), box_mask(), frames=1, size=12, margin=0, margin_mm=0)
    assert np.all(np.diff(sweep[1, 0].mean(axis=0)) > 0)  # sagittal columns run along z
    assert np.all(np.diff(sweep[2, 0].mean(axis=1)) > 0)  # coronal rows run along z
    lateral = extract_planes(coordinate_image(2), box_mask(), frames=1, size=12, margin=0, margin_mm=0)
    assert np.all(np.diff(lateral[0, 0].mean(axis=0)) > 0)  # transverse columns run along x
    assert np.all(np.diff(lateral[2, 0].mean(axis=0)) > 0)  # coronal columns run along x


def test_region_is_square_in_mm_and_keeps_the_aspect_ratio() -> None:
    image = box_mask().astype(np.float32) * 5.0
    planes = extract_planes(image, box_mask(), frames=1, size=24, margin=0, margin_mm=0)
    transverse = planes[0, 0]  # box 6 (y, rows) × 12 (x, columns): lesion fills half of the rows
    assert transverse[7:17] == pytest.approx(5.0) and transverse[:5] == pytest.approx(0.0)
    assert transverse[19:] == pytest.approx(0.0)
    assert np.all(transverse[12] == pytest.approx(5.0))
    assert np.all(planes[2, 0] == pytest.approx(5.0))  # coronal: 12 × 12 voxels, all lesion
    squashed = extract_planes(
        image, box_mask(), frames=1, size=24, spacing_mm=(1.0, 2.0, 1.0), margin=0, margin_mm=0
    )
    assert np.all(squashed[0, 0] == pytest.approx(5.0))  # 6 voxels × 2 mm = 12 mm deep: square again


def test_margin_shows_the_surroundings() -> None:
    image = box_mask().astype(np.float32)
    planes = extract_planes(image, box_mask(), frames=1, size=32, margin=0.5, margin_mm=0)
    coronal = planes[2, 0]  # 12 voxels + 6 on each side: lesion in the middle half
    assert coronal[16, 16] == pytest.approx(1.0) and coronal[1, 1] == pytest.approx(0.0, abs=1e-3)
    mm = extract_planes(image, box_mask(), frames=1, size=32, margin=0, margin_mm=6.0)
    assert np.allclose(mm, planes, atol=1e-5)  # 6 mm at 1 mm spacing = the same margin


def test_planes_from_config_and_errors() -> None:
    config = DataConfig(planes_frames=2, planes_size=20)
    planes = planes_from_config(coordinate_image(0), box_mask(), config, spacing_mm=(1, 1, 1), pad_value=0.0)
    assert planes.shape == (len(PLANES), 2, 20, 20)
    with pytest.raises(ValueError, match="differ"):
        extract_planes(np.zeros((3, 3, 3)), np.ones((3, 3, 4)), frames=1, size=4)
    with pytest.raises(ValueError, match="empty mask"):
        extract_planes(np.zeros(SHAPE), np.zeros(SHAPE), frames=1, size=4)


def test_jitter_box_stays_within_its_bounds_and_the_volume() -> None:
    box = largest_lesion_box(box_mask())
    assert jitter_box(box, 0.0, SHAPE, np.random.RandomState(0)) is box
    rng = np.random.RandomState(1)
    moved = [jitter_box(box, 0.3, SHAPE, rng) for _ in range(200)]
    for new in moved:
        for axis in range(3):
            extent = box.extent[axis]
            assert new.extent[axis] >= 1 and 0 <= new.start[axis] and new.stop[axis] <= SHAPE[axis]
            assert abs(new.extent[axis] - extent) <= 0.3 * extent + 1
            assert abs(new.centre[axis] - box.centre[axis]) <= 0.3 * extent + 0.3 * extent / 2 + 1
    assert len({(b.start, b.stop) for b in moved}) > 50  # it does move
    edge = largest_lesion_box(box_mask(((0, 4), (0, 3), (46, 50))))
    for _ in range(50):
        new = jitter_box(edge, 1.0, SHAPE, rng)
        assert all(0 <= a < b <= n for a, b, n in zip(new.start, new.stop, SHAPE, strict=True))


def test_planes_cut_around_a_given_box() -> None:
    image, mask = coordinate_image(0), box_mask()
    config = DataConfig(planes_frames=1, planes_size=8)
    shifted = largest_lesion_box(box_mask(((10, 22), (10, 16), (20, 32))))
    kwargs = {"spacing_mm": (1.0, 1.0, 1.0), "pad_value": 0.0}
    planes = planes_from_config(image, mask, config, box=shifted, **kwargs)
    same = planes_from_config(image, box_mask(((10, 22), (10, 16), (20, 32))), config, **kwargs)
    assert np.array_equal(planes, same)
    assert not np.array_equal(planes, planes_from_config(image, mask, config, **kwargs))
