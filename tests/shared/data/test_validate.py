"""Validation: every bad-input kind is flagged with its named reason; good cases pass; JSON schema."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared.config import SiteConfig
from shared.data.layouts import CaseRecord, discover_site
from shared.data.validate import usable_cases, validate_case, validate_site

SHAPE = (20, 24, 28)  # (z, y, x)
SPACING = (0.2, 0.08, 0.5)  # (x, y, z) mm


def volume(array: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def good_arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = (rng.random(SHAPE) * 200 + 10).astype(np.uint8)
    mask = np.zeros(SHAPE, np.uint8)
    mask[8:12, 10:15, 12:17] = 1
    return image, mask


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def truncate(path: Path, fraction: float = 0.5) -> None:
    with open(path, "r+b") as stream:
        stream.truncate(int(path.stat().st_size * fraction))


def build_manifest_site(root: Path) -> dict[str, str]:
    """One good case and one case per bad-input kind; returns case id -> expected reason (None = good)."""
    image, mask = good_arrays()
    rows = []
    expected: dict[str, str] = {}

    def case(case_id, *, img=None, msk=None, label="malignant", split="train", reason="", suffix=".nii.gz"):
        img_path = write(img if img is not None else volume(image), root / "images" / f"{case_id}{suffix}")
        msk_path = write(msk if msk is not None else volume(mask), root / "masks" / f"{case_id}{suffix}")
        rows.append(f"{case_id},images/{img_path.name},masks/{msk_path.name},{label},{split}")
        expected[case_id] = reason
        return img_path, msk_path

    case("good")
    case("good_nrrd", label="B", split="val", suffix=".nrrd")
    truncate(case("truncated", reason="truncated")[0])
    truncate(case("truncated_nrrd", reason="unreadable or truncated", suffix=".nrrd")[1])
    case("garbage", reason="unreadable")[0].write_bytes(b"garbage" * 50)
    case("no_image", reason="missing file")[0].unlink()
    case("no_mask", reason="missing file")[1].unlink()
    case("size", msk=volume(mask[:, :, :-2]), reason="geometry mismatch: size")
    case("spacing", msk=volume(mask, spacing=(0.2, 0.08, 0.6)), reason="geometry mismatch: spacing")
    case("origin", msk=volume(mask, origin=(0.0, 1.5, 0.0)), reason="geometry mismatch: origin")
    flipped = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0)
    case("direction", msk=volume(mask, direction=flipped), reason="geometry mismatch: direction")
    case("empty", msk=volume(mask * 0), reason="empty mask")
    case("values", msk=volume(mask * 255), reason="non-binary mask: values 0, 255")
    case("flat", img=volume(image[0]), reason="not 3D")
    bad = image.astype(np.float32)
    bad[0, 0, :3] = [np.nan, np.inf, -np.inf]
    case("nan", img=volume(bad), reason="NaN/Inf intensities: 1 NaN and 2 Inf")
    case("nan_nrrd", img=volume(bad), reason="NaN/Inf intensities: 1 NaN and 2 Inf", suffix=".nrrd")
    nan_mask = mask.astype(np.float32)
    nan_mask[0, 0, 0] = np.nan
    case("mask_nan", msk=volume(nan_mask), reason="non-binary mask: values 0, 1, nan")
    case("label", label="probably", reason="unknown label value 'probably'")
    case("split", split="holdout", reason="unknown split value 'holdout'")
    case("dup", reason="duplicate case id")
    rows.append(rows[-1])
    header = "\ufeffcase_id, image ,mask,label,split,notes"
    (root / "manifest.csv").write_text(
        "\n".join([header] + [r + ",x" for r in rows]) + "\n", encoding="utf-8"
    )
    return expected


def test_every_bad_kind_is_flagged_with_its_reason_and_good_cases_pass(tmp_path: Path) -> None:
    expected = build_manifest_site(tmp_path)
    report = validate_site(tmp_path)
    assert report.layout == "manifest"
    assert [r.case_id for r in report.results].count("dup") == 2
    for result in report.results:
        reason = expected[result.case_id]
        if not reason:
            assert result.ok and not result.errors, result.errors
            continue
        assert not result.ok, result.case_id
        text = " | ".join(result.errors)
        assert reason in text, (result.case_id, text)
        assert all(e.startswith(f"case {result.case_id!r}: ") for e in result.errors)
    assert not report.ok and report.num_bad == len(report.results) - 2


def test_errors_name_the_file(tmp_path: Path) -> None:
    build_manifest_site(tmp_path)
    report = validate_site(tmp_path)
    by_id = {r.case_id: r for r in report.results}
    assert str(tmp_path / "images" / "truncated.nii.gz") in by_id["truncated"].errors[0]
    assert str(tmp_path / "masks" / "empty.nii.gz") in by_id["empty"].errors[0]
    assert "manifest.csv row" in by_id["label"].errors[0]


def test_json_schema_is_exact(tmp_path: Path) -> None:
    build_manifest_site(tmp_path)
    document = json.loads(validate_site(tmp_path).to_json())
    assert set(document) == {"site", "layout", "cases"}
    assert document["site"] == tmp_path.name and document["layout"] == "manifest"
    for entry in document["cases"]:
        assert set(entry) == {"case_id", "ok", "errors", "warnings"}
        assert isinstance(entry["case_id"], str) and isinstance(entry["ok"], bool)
        assert all(isinstance(m, str) for m in entry["errors"] + entry["warnings"])
        assert entry["ok"] == (not entry["errors"])


def tdsc_site(folder: Path, *, spacing=(1.0, 1.0, 1.0)) -> None:
    image, mask = good_arrays(1)
    lines = ["case_id,label,data_path,mask_path"]
    for number, label in ((0, "M"), (1, "B"), (2, "B")):
        write(volume(image, spacing=spacing), folder / "DATA" / f"DATA_{number:03d}.nrrd")
        write(volume(mask, spacing=spacing), folder / "MASK" / f"MASK_{number:03d}.nrrd")
        lines.append(f"{number},{label},DATA\\DATA_{number:03d}.nrrd,MASK\\MASK_{number:03d}.nrrd")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")


def test_tdsc_site_with_a_broken_case_and_placeholder_spacing(tmp_path: Path) -> None:
    site = tmp_path / "Train"
    tdsc_site(site)
    truncate(site / "DATA" / "DATA_001.nrrd")
    report = validate_site(site)
    assert report.layout == "tdsc"
    assert [r.ok for r in report.results] == [True, False, True]
    assert "unreadable or truncated" in report.results[1].errors[0]
    assert "placeholder" in " ".join(report.results[0].warnings)
    config = SiteConfig(spacing_z=0.476, spacing_y=0.2, spacing_x=0.073)
    assert validate_site(site, config).results[0].warnings == []


def test_realistic_spacing_gives_no_warning(tmp_path: Path) -> None:
    site = tmp_path / "Test"
    tdsc_site(site, spacing=SPACING)
    report = validate_site(site)
    assert report.ok and all(not r.warnings for r in report.results)


def test_image_and_mask_overridden_alike_still_match(tmp_path: Path) -> None:
    site = tmp_path / "Validation"
    tdsc_site(site, spacing=SPACING)
    report = validate_site(site, SiteConfig(spacing_z=0.3, orientation="RAS"))
    assert report.ok


def test_geometry_within_tolerance_is_accepted(tmp_path: Path) -> None:
    image, mask = good_arrays()
    write(volume(image), tmp_path / "i.nii.gz")
    write(volume(mask, origin=(1e-5, 0.0, 0.0), spacing=(0.2, 0.08, 0.50001)), tmp_path / "m.nii.gz")
    case = CaseRecord("x", tmp_path / "i.nii.gz", tmp_path / "m.nii.gz", 1, "train", None, "M")
    assert validate_case(case).ok


def test_validate_case_alone_checks_label_split_and_mask_path(tmp_path: Path) -> None:
    image, mask = good_arrays()
    write(volume(image), tmp_path / "i.nii.gz")
    case = CaseRecord("x", tmp_path / "i.nii.gz", None, None, "other", None, "??")
    result = validate_case(case, None)
    text = " | ".join(result.errors)
    assert "unknown label value '??'" in text and "unknown split value 'other'" in text and "no mask" in text


def test_float_mask_with_zero_and_one_is_binary(tmp_path: Path) -> None:
    image, mask = good_arrays()
    write(volume(image), tmp_path / "i.nii.gz")
    write(volume(mask.astype(np.float32)), tmp_path / "m.nii.gz")
    case = CaseRecord("x", tmp_path / "i.nii.gz", tmp_path / "m.nii.gz", 0, "val", None, "B")
    assert validate_case(case).ok


def test_usable_cases_skips_bad_ones_and_logs_the_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = build_manifest_site(tmp_path)
    with caplog.at_level(logging.WARNING):
        cases = usable_cases(discover_site(tmp_path))
    assert [c.case_id for c in cases] == [k for k, v in expected.items() if not v]
    assert f"skipping {len(expected) - 1} of {len(expected) + 1} cases" in caplog.text
    assert [c.case_id for c in usable_cases(validate_site(tmp_path), splits=("val",))] == ["good_nrrd"]


def test_cache_skips_unchanged_cases_and_rechecks_changed_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared.data.validate as validate_module

    site, cache = tmp_path / "Train", tmp_path / "work" / "validation-cache.json"
    tdsc_site(site, spacing=SPACING)
    first = validate_site(site, cache=cache)
    assert first.ok and cache.is_file()
    checked: list[str] = []
    original = validate_module.validate_case

    def counting(case, *args, **kwargs):
        checked.append(case.case_id)
        return original(case, *args, **kwargs)

    monkeypatch.setattr(validate_module, "validate_case", counting)
    assert validate_site(site, cache=cache).to_dict() == first.to_dict() and checked == []
    truncate(site / "MASK" / "MASK_002.nrrd")
    second = validate_site(site, cache=cache)
    assert checked == ["2"] and [r.ok for r in second.results] == [True, True, False]
