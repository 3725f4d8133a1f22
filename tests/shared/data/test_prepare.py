"""prepare_site: canonical output, overrides and geometry kept, source untouched, idempotent, bad cases skipped."""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared.config import SiteConfig
from shared.data.layouts import discover_site
from shared.data.prepare import PrepareError, prepare_site
from shared.data.validate import validate_site

SHAPE = (20, 24, 28)  # (z, y, x)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
ORIGIN = (5.0, -7.5, 12.25)


def arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = (rng.random(SHAPE) * 200 + 5).astype(np.uint8)
    mask = np.zeros(SHAPE, np.uint8)
    mask[6:11, 9:14, 10:18] = 1
    return image, mask


def write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def tdsc_source(folder: Path) -> None:
    """Three good TDSC cases (placeholder spacing) and one with an empty mask."""
    lines = ["case_id,label,data_path,mask_path"]
    for number, label in ((0, "M"), (1, "B"), (2, "b"), (3, "M")):
        image, mask = arrays(number)
        write(image, folder / "DATA" / f"DATA_{number:03d}.nrrd")
        write(mask * (number != 3), folder / "MASK" / f"MASK_{number:03d}.nrrd")
        lines.append(f"{number},{label},DATA\\DATA_{number:03d}.nrrd,MASK\\MASK_{number:03d}.nrrd")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


TDSC_CONFIG = SiteConfig(spacing_z=0.476, spacing_y=0.2, spacing_x=0.073)


def test_prepare_tdsc_applies_overrides_and_keeps_geometry(tmp_path: Path) -> None:
    source, out = tmp_path / "Train", tmp_path / "prepared"
    tdsc_source(source)
    before = tree_digest(source)
    result = prepare_site(source, out, TDSC_CONFIG)
    assert tree_digest(source) == before  # the source is never modified
    assert result.written == ["0", "1", "2"] and list(result.skipped) == ["3"]
    assert "empty mask" in result.skipped["3"][0]
    index = discover_site(out)
    assert index.layout == "manifest" and not index.problems
    assert [(c.case_id, c.label, c.split) for c in index.cases] == [
        ("0", 1, "train"),
        ("1", 0, "train"),
        ("2", 0, "train"),
    ]
    image = sitk.ReadImage(str(out / "images" / "1.nii.gz"))
    mask = sitk.ReadImage(str(out / "masks" / "1.nii.gz"))
    np.testing.assert_allclose(image.GetSpacing(), (0.073, 0.2, 0.476), rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), DIRECTION, atol=1e-6)
    assert mask.GetPixelID() == sitk.sitkUInt8 and image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), arrays(1)[0])
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(mask), arrays(1)[1])
    report = validate_site(out)  # the prepared folder is valid without any site config
    assert report.ok and all(not r.warnings for r in report.results)


def test_prepare_is_idempotent_and_redoes_only_changed_cases(tmp_path: Path) -> None:
    source, out = tmp_path / "Train", tmp_path / "prepared"
    tdsc_source(source)
    prepare_site(source, out, TDSC_CONFIG)
    outputs = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    again = prepare_site(source, out, TDSC_CONFIG)
    assert again.written == [] and again.up_to_date == ["0", "1", "2"] and list(again.skipped) == ["3"]
    assert {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == outputs
    image, _ = arrays(7)
    write(image, source / "DATA" / "DATA_002.nrrd")
    os.utime(source / "DATA" / "DATA_002.nrrd", ns=(1, 1))
    third = prepare_site(source, out, TDSC_CONFIG)
    assert third.written == ["2"] and third.up_to_date == ["0", "1"]
    changed = prepare_site(source, out, SiteConfig(spacing_z=0.5, spacing_y=0.2, spacing_x=0.073))
    assert changed.written == ["0", "1", "2"]


def test_case_that_became_bad_is_skipped_and_its_old_outputs_removed(tmp_path: Path) -> None:
    source, out = tmp_path / "Train", tmp_path / "prepared"
    tdsc_source(source)
    prepare_site(source, out, TDSC_CONFIG)
    with open(source / "DATA" / "DATA_000.nrrd", "r+b") as stream:
        stream.truncate(300)
    result = prepare_site(source, out, TDSC_CONFIG)
    assert "0" in result.skipped and "truncated" in result.skipped["0"][0]
    assert result.removed == ["0"]
    assert not (out / "images" / "0.nii.gz").exists()
    assert [c.case_id for c in discover_site(out).cases] == ["1", "2"]
    assert any("skipped 0:" in line for line in result.summary_lines())


def test_leftover_temp_files_of_an_interrupted_run_are_removed(tmp_path: Path) -> None:
    source, out = tmp_path / "Train", tmp_path / "prepared"
    tdsc_source(source)
    (out / "images").mkdir(parents=True)
    leftover = out / "images" / ".fedabus-tmp-abc123-0.nii.gz"
    leftover.write_bytes(b"half")
    prepare_site(source, out, TDSC_CONFIG)
    assert not leftover.exists()
    assert not [p for p in out.rglob("*") if ".fedabus-tmp-" in p.name]


def test_output_inside_the_source_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "Train"
    tdsc_source(source)
    with pytest.raises(PrepareError, match="inside the source"):
        prepare_site(source, source / "prepared")
    with pytest.raises(PrepareError, match="inside the source"):
        prepare_site(source, source)


def write_dicom_series(array: np.ndarray, folder: Path, spacing=(0.2, 0.1, 0.5)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = f"1.2.826.0.1.3680043.2.1125.{zlib.crc32(folder.name.encode())}"
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        for key, value in {
            "0020|000e": uid,
            "0008|0060": "US",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": "\\".join(f"{v:g}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0013": str(z + 1),
            "0028|0030": f"{spacing[1]:g}\\{spacing[0]:g}",
        }.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(slice_)


def test_prepare_converts_dicom_series_named_in_a_manifest(tmp_path: Path) -> None:
    source, out = tmp_path / "hospital", tmp_path / "prepared"
    image, mask = arrays(3)
    write_dicom_series(image[4:10].astype(np.int16), source / "dicom" / "case1" / "image")
    write_dicom_series(mask[4:10].astype(np.int16), source / "dicom" / "case1" / "mask")
    (source / "manifest.csv").write_text(
        "case_id,image,mask,label,split,birads\nP 001,dicom/case1/image,dicom/case1/mask,malignant,test,4b\n"
    )
    result = prepare_site(source, out)
    assert result.written == ["P 001"] and not result.skipped, result.skipped
    index = discover_site(out)
    assert index.cases[0].case_id == "P 001" and index.cases[0].birads == "4b"
    assert index.cases[0].image == out / "images" / "P_001.nii.gz"
    converted = sitk.ReadImage(str(index.cases[0].image))
    np.testing.assert_allclose(converted.GetSpacing(), (0.2, 0.1, 0.5), rtol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(converted), image[4:10])
    assert validate_site(out).ok
