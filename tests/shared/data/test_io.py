"""Reading and writing volumes: geometry round trips, overrides, DICOM series, and named read errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared.config import SiteConfig
from shared.data.io import (
    VolumeReadError,
    check_file_complete,
    count_nonfinite,
    read_header,
    read_volume,
    write_volume,
)

SPACING = (0.45, 0.2, 0.07)  # (x, y, z) mm
ORIGIN = (-12.5, 3.25, 40.0)
# A proper rotation (axes permuted), so that a dropped direction would be noticed.
DIRECTION = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_image(dtype=np.uint8, shape_zyx=(20, 24, 28), seed: int = 0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = (rng.random(shape_zyx) * 200).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def truncate(path: Path, fraction: float = 0.6) -> None:
    with open(path, "r+b") as stream:
        stream.truncate(int(path.stat().st_size * fraction))


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """Write ``image`` as one DICOM file per z slice with positions, orientation and a shared series UID."""
    folder.mkdir(parents=True)
    direction = image.GetDirection()
    orientation = (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.77"
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        tags = {
            "0020|000e": uid,
            "0020|000d": uid + ".1",
            "0008|0060": "US",
            "0020|0037": "\\".join(f"{v:g}" for v in orientation),
            "0020|0032": "\\".join(f"{v:g}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0013": str(z + 1),
            "0028|0030": f"{image.GetSpacing()[1]:g}\\{image.GetSpacing()[0]:g}",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(slice_)


def assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 10)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_geometry_and_voxels_round_trip(tmp_path: Path, suffix: str, dtype) -> None:
    image = make_image(dtype)
    path = write_volume(image, tmp_path / f"vol{suffix}")
    back = read_volume(path)
    assert_same_geometry(image, back)
    assert back.GetPixelID() == image.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


def test_mhd_with_detached_data_is_read(tmp_path: Path) -> None:
    image = make_image()
    sitk.WriteImage(image, str(tmp_path / "vol.mhd"))
    assert_same_geometry(image, read_volume(tmp_path / "vol.mhd"))


def test_header_matches_volume_without_reading_voxels(tmp_path: Path) -> None:
    path = write_volume(make_image(np.int16), tmp_path / "vol.nrrd")
    header = read_header(path)
    assert header.dimension == 3 and header.components == 1
    assert header.size == (28, 24, 20)
    assert header.shape_zyx == (20, 24, 28)
    np.testing.assert_allclose(header.spacing, SPACING)
    np.testing.assert_allclose(header.origin, ORIGIN)
    np.testing.assert_allclose(header.direction, DIRECTION)
    assert header.pixel_type == "16-bit signed integer"
    assert header.num_voxels == 20 * 24 * 28


def test_site_overrides_replace_spacing_and_direction(tmp_path: Path) -> None:
    path = write_volume(make_image(), tmp_path / "vol.nii.gz")
    config = SiteConfig(spacing_z=0.476, spacing_x=0.073, orientation="RAS")
    image = read_volume(path, site_config=config)
    np.testing.assert_allclose(image.GetSpacing(), (0.073, SPACING[1], 0.476), rtol=1e-6)
    assert image.GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN, atol=1e-4)  # the origin is kept
    header = read_header(path, site_config=config)
    assert header.spacing == image.GetSpacing()
    np.testing.assert_allclose(header.file_spacing, SPACING, rtol=1e-6)


def test_nine_number_orientation_override(tmp_path: Path) -> None:
    path = write_volume(make_image(), tmp_path / "vol.nrrd")
    config = SiteConfig(orientation="1, 0, 0, 0, 0, -1, 0, 1, 0")
    assert read_volume(path, site_config=config).GetDirection() == (1, 0, 0, 0, 0, -1, 0, 1, 0)


def test_dicom_series_folder_is_read_with_its_geometry(tmp_path: Path) -> None:
    image = make_image(np.int16, shape_zyx=(6, 24, 28))
    write_dicom_series(image, tmp_path / "series")
    header = read_header(tmp_path / "series")
    volume = read_volume(tmp_path / "series")
    assert_same_geometry(image, volume, tol=1e-4)
    assert header.size == volume.GetSize()
    np.testing.assert_allclose(header.spacing, volume.GetSpacing(), rtol=1e-4)
    np.testing.assert_allclose(header.origin, volume.GetOrigin(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume), sitk.GetArrayViewFromImage(image))


def test_folder_without_dicom_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeReadError, match="no DICOM series") as info:
        read_volume(tmp_path / "empty")
    assert info.value.path == tmp_path / "empty"


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(VolumeReadError, match="missing file") as info:
        read_header(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(info.value)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_files_are_reported(tmp_path: Path, suffix: str) -> None:
    path = write_volume(make_image(np.float32), tmp_path / f"vol{suffix}", compress=suffix != ".mha")
    truncate(path)
    with pytest.raises(VolumeReadError, match="truncated") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_gzip_tail_cut_is_found_by_the_thorough_check(tmp_path: Path) -> None:
    path = write_volume(make_image(np.float32), tmp_path / "vol.nii.gz")
    truncate(path, 0.97)
    with pytest.raises(VolumeReadError, match="truncated"):
        check_file_complete(path, thorough=True)


def test_garbage_file_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "vol.nii.gz"
    path.write_bytes(b"not an image" * 20)
    with pytest.raises(VolumeReadError, match="unreadable"):
        read_volume(path)


@pytest.mark.parametrize(
    "array, vector",
    [
        (np.zeros((24, 28), np.uint8), False),  # 2D
        (np.zeros((24, 1, 28), np.uint8), False),  # one row per slice (a single frame, (1, H, W), is usable)
        (np.zeros((20, 24, 28, 3), np.uint8), True),  # RGB voxels
    ],
)
def test_non_3d_volumes_are_rejected(tmp_path: Path, array: np.ndarray, vector: bool) -> None:
    path = tmp_path / "vol.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    with pytest.raises(VolumeReadError, match="not 3D|components per voxel"):
        read_volume(path)


def test_4d_volume_is_not_3d(tmp_path: Path) -> None:
    path = tmp_path / "vol.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([make_image(), make_image()]), str(path))
    with pytest.raises(VolumeReadError, match="not 3D: the file holds a 4D image"):
        read_volume(path)


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "vol.nii.gz"
    write_volume(make_image(), target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["vol.nii.gz"]
    before = target.read_bytes()

    def failing_write(image, path, useCompression=True):  # noqa: N803 (SimpleITK's keyword)
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(VolumeReadError, match="cannot write"):
        write_volume(make_image(seed=1), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["vol.nii.gz"]


def test_write_rejects_multi_file_formats(tmp_path: Path) -> None:
    with pytest.raises(VolumeReadError, match="atomically"):
        write_volume(make_image(), tmp_path / "vol.mhd")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("cut", [1, 4, 9])
def test_nrrd_gzip_tail_cut_is_found_by_the_thorough_check(tmp_path: Path, cut: int) -> None:
    path = write_volume(make_image(), tmp_path / "vol.nrrd")
    check_file_complete(path, thorough=True)  # an intact file passes
    with open(path, "r+b") as stream:
        stream.truncate(path.stat().st_size - cut)
    with pytest.raises(VolumeReadError, match="truncated"):
        check_file_complete(path, thorough=True)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nonfinite_voxels_of_nifti_are_counted_from_the_file(tmp_path: Path, suffix: str) -> None:
    array = np.zeros((20, 24, 28), np.float32)
    array[3, 4, :4] = [np.nan, np.nan, np.inf, -np.inf]
    path = write_volume(sitk.GetImageFromArray(array), tmp_path / f"vol{suffix}")
    assert count_nonfinite(path) == (2, 2)
    assert count_nonfinite(write_volume(make_image(), tmp_path / "int.nii.gz")) == (0, 0)
