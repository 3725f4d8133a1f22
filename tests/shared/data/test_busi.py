"""The BUSI 2D layout: indexing, PNG reading (grey conversion, binary masks, mask union), validation with every
problem named with its case and file, site-level refusals, the synthesiser's determinism and splits."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared.data.busi import (
    NORMAL_LABEL,
    BusiImage,
    discover_busi,
    is_busi_site,
    read_busi_mask,
    read_png,
    split_busi,
    usable_busi_images,
    validate_busi_site,
)
from shared.data.io import VolumeReadError
from shared.data.layouts import SiteLayoutError
from shared.data.synth_busi import BREAKAGES, BusiSynthOptions, break_busi_site, write_busi_site

OPTIONS = BusiSynthOptions(per_class=(4, 4, 2), size=(40, 48), extra_mask_fraction=0.5)


@pytest.fixture(scope="module")
def clean_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_busi_site(tmp_path_factory.mktemp("busi") / "site", seed=7, options=OPTIONS)


@pytest.fixture
def site(clean_site: Path, tmp_path: Path) -> Path:
    """A private copy of the clean site, free to damage."""
    return Path(shutil.copytree(clean_site, tmp_path / "site"))


def _files(site: Path) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in sorted(site.rglob("*.png"))}


def test_synthetic_site_is_indexed_and_valid(clean_site: Path) -> None:
    index = discover_busi(clean_site)
    assert index.layout == "busi" and is_busi_site(clean_site)
    by_class = {c: [r for r in index.cases if r.class_name == c] for c in ("benign", "malignant", "normal")}
    assert [len(v) for v in by_class.values()] == [4, 4, 2]
    assert index.cases[0].case_id == "benign/benign (1)"
    assert {r.label for r in by_class["malignant"]} == {1} and {r.label for r in by_class["normal"]} == {2}
    extra = [r for r in index.cases if len(r.masks) > 1]
    assert extra, "the synthesiser should write some _mask_1.png files"
    assert all(
        r.masks[0].name.endswith("_mask.png") and r.masks[1].name.endswith("_mask_1.png") for r in extra
    )
    report = validate_busi_site(clean_site)
    assert report.ok, [r.errors for r in report.results if not r.ok]
    assert report.to_dict()["layout"] == "busi"


def test_extra_masks_are_united(clean_site: Path) -> None:
    record = next(r for r in discover_busi(clean_site).cases if len(r.masks) > 1)
    shape = read_png(record.image).shape
    union = read_busi_mask(record.masks, shape)
    parts = [read_busi_mask([p], shape) for p in record.masks]
    assert union.dtype == np.uint8 and set(np.unique(union)) <= {0, 1}
    np.testing.assert_array_equal(union, np.maximum.reduce(parts))
    assert union.sum() > parts[0].sum()


def test_synthesiser_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = _files(write_busi_site(tmp_path / "a", seed=3, options=OPTIONS))
    again = _files(write_busi_site(tmp_path / "b", seed=3, options=OPTIONS))
    other = _files(write_busi_site(tmp_path / "c", seed=4, options=OPTIONS))
    assert first == again
    assert first.keys() != other.keys() or any(first[k] != other[k] for k in first)


def _write(path: Path, array: np.ndarray, *, vector: bool = False) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    return path


def test_colour_pngs_become_grey_with_luma_weights(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    expected = 0.299 * 200 + 0.587 * 100 + 0.114 * 50
    np.testing.assert_allclose(read_png(_write(tmp_path / "rgb.png", rgb, vector=True)), expected, rtol=1e-6)
    rgba = np.concatenate([rgb, np.full((4, 5, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_allclose(
        read_png(_write(tmp_path / "rgba.png", rgba, vector=True)), expected, rtol=1e-6
    )
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    out = read_png(_write(tmp_path / "grey.png", grey))
    assert out.dtype == np.float32 and out.shape == (4, 5)
    np.testing.assert_array_equal(out, grey)


def test_masks_of_0_1_and_0_255_are_binary_and_others_refused(tmp_path: Path) -> None:
    ones = np.array([[0, 1], [1, 0]], np.uint8)
    np.testing.assert_array_equal(read_busi_mask([_write(tmp_path / "a.png", ones)]), ones)
    np.testing.assert_array_equal(read_busi_mask([_write(tmp_path / "b.png", ones * 255)]), ones)
    white = np.repeat((ones * 255)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(read_busi_mask([_write(tmp_path / "c.png", white, vector=True)]), ones)
    mixed = _write(tmp_path / "d.png", np.array([[0, 1], [255, 0]], np.uint8))
    with pytest.raises(VolumeReadError, match=r"d\.png: non-binary mask: values 0, 1, 255"):
        read_busi_mask([mixed])
    with pytest.raises(
        VolumeReadError, match="image/mask size mismatch: mask is 2 x 2 pixels, the image 3 x 2"
    ):
        read_busi_mask([tmp_path / "a.png"], (2, 3))


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_every_broken_file_is_reported_with_its_case_and_file(site: Path, breakage: str) -> None:
    done = break_busi_site(site, breakage)
    report = validate_busi_site(site)
    bad = {r.case_id: r for r in report.results if not r.ok}
    assert list(bad) == [done.case_id], {k: v.errors for k, v in bad.items()}
    errors = bad[done.case_id].errors
    assert any(
        e.startswith(f"case {done.case_id!r}: ") and done.path.name in e and done.reason in e for e in errors
    ), errors
    usable = usable_busi_images(report)
    assert done.case_id not in {r.case_id for r in usable}
    assert len(usable) == len(report.results) - 1


def test_permission_denied_is_named(site: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    image = site / "benign" / "benign (2).png"
    image.chmod(0)
    result = next(r for r in validate_busi_site(site).results if r.case_id == "benign/benign (2)")
    assert any("permission denied" in e and image.name in e for e in result.errors)


def test_normal_image_without_mask_file_has_an_empty_mask(site: Path) -> None:
    (site / "normal" / "normal (1)_mask.png").unlink()
    report = validate_busi_site(site)
    assert report.ok
    record = next(r for r in report.cases if r.case_id == "normal/normal (1)")
    assert isinstance(record, BusiImage) and record.masks == () and record.label == NORMAL_LABEL
    image = read_png(record.image)
    assert not read_busi_mask(record.masks, image.shape).any()


def test_other_files_and_hidden_folders_are_ignored(site: Path) -> None:
    (site / "benign" / "Thumbs.db").write_bytes(b"junk")
    (site / "benign" / "notes").mkdir()
    (site / ".cache").mkdir()
    (site / "__MACOSX").mkdir()
    (site / "README.txt").write_text("BUSI")
    assert len(discover_busi(site).cases) == 10
    assert validate_busi_site(site).ok


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: (s / "Benign_old").mkdir(), "unknown class folder 'Benign_old'"),
        (lambda s: shutil.copy(s / "benign" / "benign (1).png", s / "stray.png"), "'stray.png' is outside"),
        (lambda s: [shutil.rmtree(s / c) for c in ("benign", "malignant", "normal")], "not a BUSI site"),
        (lambda s: [p.unlink() for p in s.rglob("*.png")], "hold no PNG image"),
        (lambda s: shutil.rmtree(s), "does not exist"),
    ],
    ids=["unknown-folder", "png-outside", "no-class-folder", "empty-class-folders", "missing-site"],
)
def test_unusable_folders_raise_a_layout_error_naming_the_site(site: Path, damage, message: str) -> None:
    damage(site)
    with pytest.raises(SiteLayoutError, match=message) as caught:
        validate_busi_site(site)
    assert str(site) in str(caught.value)


def test_class_folders_match_case_insensitively(site: Path) -> None:
    (site / "malignant").rename(site / "Malignant")
    index = discover_busi(site)
    assert {r.class_name for r in index.cases} == {"benign", "malignant", "normal"}


def test_usable_images_by_class_and_stratified_deterministic_split(clean_site: Path) -> None:
    binary = usable_busi_images(clean_site, classes=("benign", "malignant"))
    assert len(binary) == 8 and {r.label for r in binary} == {0, 1}
    with pytest.raises(ValueError, match="classes="):
        usable_busi_images(clean_site, classes=("cyst",))
    train, val, test = split_busi(binary, val_fraction=0.25, test_fraction=0.25, seed=1)
    assert sorted(r.case_id for r in train + val + test) == sorted(r.case_id for r in binary)
    assert {r.split for r in val} == {"val"} and {r.split for r in test} == {"test"}
    for split in (val, test):
        assert sorted(r.label for r in split) == [0, 1]
    assert all(isinstance(r, BusiImage) for r in train + val + test)
    assert split_busi(binary, val_fraction=0.25, test_fraction=0.25, seed=1) == (train, val, test)


def test_fedabus_validate_reads_a_busi_folder(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shared.cli import main

    assert main(["validate", str(site), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["layout"] == "busi" and len(document["cases"]) == 10
    done = break_busi_site(site, "non-binary-mask")
    assert main(["validate", str(site)]) == 1
    table = capsys.readouterr().out
    assert "site site (busi layout)" in table and done.case_id in table and done.reason in table
