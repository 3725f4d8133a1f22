"""Preprocessing: canonical orientation, resampling, intensity normalisation, crops and geometry round trips."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from shared.config import DataConfig
from shared.data.transforms import (
    Grid,
    crop_or_pad,
    fit_intensity,
    lesion_crop,
    orient_canonical,
    preprocess_case,
    resample,
    restore_geometry,
    target_spacing_zyx,
)


def image_of(
    array: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None
) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest physical coordinates (mm) of the outer voxel edges."""
    size, spacing = np.asarray(image.GetSize()), np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    corners = []
    for corner in np.ndindex(2, 2, 2):
        index = np.where(np.asarray(corner) == 1, size - 0.5, -0.5)
        corners.append(np.asarray(image.GetOrigin()) + direction @ (index * spacing))
    corners = np.asarray(corners)
    return corners.min(0), corners.max(0)


def test_orient_canonical_undoes_a_flipped_sweep_axis_exactly() -> None:
    canonical = np.random.default_rng(0).integers(0, 255, (6, 7, 8), dtype=np.uint8)
    stored = sitk.DICOMOrient(image_of(canonical, (0.5, 0.4, 0.3), (10.0, -5.0, 3.0)), "LPI")
    assert stored.GetDirection()[8] == -1.0
    assert np.array_equal(sitk.GetArrayFromImage(stored), canonical[::-1])
    back = orient_canonical(stored)
    assert np.allclose(back.GetDirection(), np.eye(3).ravel())
    assert np.array_equal(sitk.GetArrayFromImage(back), canonical)
    assert np.allclose(back.GetOrigin(), (10.0, -5.0, 3.0))


def test_orient_canonical_permutes_axes_by_direction() -> None:
    array = np.zeros((4, 5, 6), dtype=np.uint8)  # file axes (z, y, x); x is really depth (posterior)
    array[1, 2, 3] = 9
    image = image_of(array, direction=(0, 1, 0, 1, 0, 0, 0, 0, 1))  # "PLS": x→P, y→L, z→S
    canonical = sitk.GetArrayFromImage(orient_canonical(image))
    assert canonical.shape == (4, 6, 5)  # (sweep, depth, lateral)
    assert canonical[1, 3, 2] == 9


def test_target_spacing_keeps_the_file_spacing_where_zero() -> None:
    config = DataConfig(spacing_z=0.5, spacing_y=0.0, spacing_x=0.25)
    assert target_spacing_zyx(config, (1.0, 2.0, 3.0)) == (0.5, 2.0, 0.25)
    with pytest.raises(ValueError, match="spacing-y"):
        target_spacing_zyx(DataConfig(spacing_y=-1.0), (1.0, 1.0, 1.0))


@pytest.mark.parametrize("target", [(0.5, 0.5, 0.5), (1.3, 0.7, 2.1)])
def test_resampling_keeps_physical_extent(target) -> None:
    direction = (0, 0, 1, 1, 0, 0, 0, 1, 0)
    image = image_of(np.ones((30, 20, 10), np.float32), (0.3, 0.7, 1.1), (4.0, -2.0, 7.5), direction)
    out = resample(image, target, is_mask=False)
    assert out.GetSpacing() == pytest.approx(tuple(reversed(target)))
    assert out.GetPixelID() == sitk.sitkFloat32
    low, high = physical_box(image)
    new_low, new_high = physical_box(out)
    assert np.all(np.abs(new_low - low) <= max(target) / 2 + 1e-6)
    assert np.all(np.abs(new_high - high) <= max(target) / 2 + 1e-6)
    assert np.all(sitk.GetArrayFromImage(out) == pytest.approx(1.0))  # edges interpolated, never 0


def test_resampling_interpolates_images_linearly_and_masks_by_nearest() -> None:
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32), (8, 10, 20)).copy()  # value = x index (mm)
    out = resample(image_of(ramp), (1.0, 1.0, 0.5), is_mask=False)
    values = sitk.GetArrayFromImage(out)[4, 5, 2:-2]
    x_mm = np.array([out.TransformIndexToPhysicalPoint((i, 5, 4))[0] for i in range(2, out.GetSize()[0] - 2)])
    assert values == pytest.approx(x_mm, abs=1e-4)
    mask = np.zeros((8, 10, 20), np.uint8)
    mask[2:6, 3:7, 5:15] = 1
    resampled = resample(image_of(mask), (0.5, 0.5, 0.5), is_mask=True)
    assert resampled.GetPixelID() == sitk.sitkUInt8
    as_array = sitk.GetArrayFromImage(resampled)
    assert set(np.unique(as_array)) == {0, 1}
    assert as_array.sum() == mask.sum() * 8


@pytest.mark.parametrize("method", ["zscore_nonzero", "zscore", "minmax"])
def test_normalisation_statistics(method: str) -> None:
    rng = np.random.default_rng(1)
    raw = np.zeros((10, 12, 14), np.float32)
    raw[2:8] = rng.uniform(10, 200, (6, 12, 14))
    intensity = fit_intensity(raw, method)
    out = intensity.apply(raw)
    assert out.dtype == np.float32
    if method == "zscore_nonzero":
        assert out[raw > 0].mean() == pytest.approx(0.0, abs=1e-4)
        assert out[raw > 0].std() == pytest.approx(1.0, abs=1e-4)
    elif method == "zscore":
        assert out.mean() == pytest.approx(0.0, abs=1e-4) and out.std() == pytest.approx(1.0, abs=1e-4)
    else:
        assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0)
    assert out[0, 0, 0] == pytest.approx(intensity.pad_value)  # a raw 0 maps to the pad value


def test_normalisation_edge_cases() -> None:
    assert fit_intensity(np.full((3, 3, 3), 7.0), "zscore").scale == 1.0
    assert fit_intensity(np.zeros((3, 3, 3)), "zscore_nonzero").offset == 0.0
    with pytest.raises(ValueError, match="normalisation = 'robust'"):
        fit_intensity(np.ones((2, 2, 2)), "robust")


def test_crop_or_pad_maps_indices_and_pads() -> None:
    volume = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    crop = crop_or_pad(volume, (-2, 3, 4), 4, pad_value=-1.0)
    assert crop.shape == (4, 4, 4) and crop.dtype == np.float32
    for index in np.ndindex(crop.shape):
        source = np.asarray(index) + (-2, 3, 4)
        inside = np.all(source >= 0) and np.all(source < volume.shape)
        assert crop[index] == (volume[tuple(source)] if inside else -1.0)
    assert np.all(crop_or_pad(volume, (50, 0, 0), (2, 3, 4), pad_value=5.0) == 5.0)


def test_lesion_crop_always_contains_the_lesion_centre() -> None:
    shape = (40, 50, 60)
    rng = np.random.default_rng(2)
    image = rng.normal(size=shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[30:38, 2:8, 50:59] = 1  # near the borders: crops need padding
    centre = np.array([33, 4, 54])  # bounding-box centre, rounded down
    for _ in range(20):
        crop = lesion_crop(image, mask, patch_size=16, pad_value=-9.0, jitter_voxels=7, rng=rng)
        assert crop.image.shape == crop.mask.shape == (16, 16, 16)
        local = centre - np.asarray(crop.start)
        assert np.all(local >= 0) and np.all(local < 16)
        assert crop.mask[tuple(local)] == 1 and crop.image[tuple(local)] == image[tuple(centre)]
    plain = lesion_crop(image, mask, patch_size=16, pad_value=-9.0)
    assert plain.start == (25, -4, 46) and np.all(plain.image[:, :4] == -9.0) and plain.image[0, 4, 0] != -9.0
    with pytest.raises(ValueError, match="crop-jitter-voxels"):
        lesion_crop(image, mask, patch_size=16, pad_value=0.0, jitter_voxels=8, rng=rng)
    with pytest.raises(ValueError, match="empty mask"):
        lesion_crop(image, np.zeros(shape, np.uint8), patch_size=16, pad_value=0.0)


def test_preprocess_case_and_restore_geometry_round_trip() -> None:
    rng = np.random.default_rng(3)
    canonical = rng.integers(0, 255, (24, 28, 32)).astype(np.uint8)
    mask = np.zeros_like(canonical)
    mask[4:18, 6:20, 5:25] = 1
    stored = [
        sitk.DICOMOrient(image_of(a, (0.6, 0.4, 0.5), (1.0, 2.0, 3.0)), "LPI") for a in (canonical, mask)
    ]
    same = preprocess_case(stored[0], stored[1], DataConfig())
    assert same.spacing_mm == pytest.approx((0.6, 0.4, 0.5))
    assert np.array_equal(same.mask, mask) and same.mask.dtype == np.uint8
    assert same.image.dtype == np.float32
    assert same.image == pytest.approx(same.intensity.apply(canonical))
    restored = restore_geometry(same.mask, processed=same.grid, original=same.original)
    assert Grid.of(restored) == Grid.of(stored[1])
    assert np.array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(stored[1]))

    coarse = preprocess_case(stored[0], stored[1], DataConfig(spacing_z=1.2, spacing_y=0.8, spacing_x=1.0))
    assert coarse.image.shape == (12, 14, 16) and coarse.mask.shape == (12, 14, 16)
    back = sitk.GetArrayFromImage(
        restore_geometry(coarse.mask, processed=coarse.grid, original=coarse.original)
    )
    overlap = 2 * np.sum((back > 0) & (sitk.GetArrayFromImage(stored[1]) > 0)) / (back.sum() + mask.sum())
    assert overlap > 0.85
