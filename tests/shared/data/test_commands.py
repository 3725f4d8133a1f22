"""``fedabus validate`` / ``fedabus prepare``: JSON schema, table, exit codes, site config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared.cli import main

SHAPE = (20, 24, 28)


def write(array: np.ndarray, path: Path, spacing=(0.2, 0.08, 0.5)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def manifest_site(root: Path, *, broken: bool) -> None:
    """Two cases; with ``broken``, the second one's mask has a value 2 and a third row has a bad label."""
    rng = np.random.default_rng(0)
    image = (rng.random(SHAPE) * 100).astype(np.uint8)
    mask = np.zeros(SHAPE, np.uint8)
    mask[5:9, 5:9, 5:9] = 1
    rows = ["case_id,image,mask,label,split"]
    for name, label in (("A-01", "Malignant"), ("A-02", "benign")):
        write(image, root / "images" / f"{name}.nii.gz")
        write(mask * (2 if broken and name == "A-02" else 1), root / "masks" / f"{name}.nii.gz")
        rows.append(f"{name},images/{name}.nii.gz,masks/{name}.nii.gz,{label},train")
    if broken:
        rows.append("A-03,images/A-01.nii.gz,masks/A-01.nii.gz,unsure,val")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")


def test_validate_json_on_a_good_site_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest_site(tmp_path / "site", broken=False)
    assert main(["validate", str(tmp_path / "site"), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document == {
        "site": "site",
        "layout": "manifest",
        "cases": [
            {"case_id": "A-01", "ok": True, "errors": [], "warnings": []},
            {"case_id": "A-02", "ok": True, "errors": [], "warnings": []},
        ],
    }


def test_validate_json_flags_broken_cases_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest_site(tmp_path / "site", broken=True)
    assert main(["validate", str(tmp_path / "site"), "--json"]) == 1
    cases = {c["case_id"]: c for c in json.loads(capsys.readouterr().out)["cases"]}
    assert cases["A-01"]["ok"] is True
    assert cases["A-02"]["ok"] is False and "non-binary mask: values 0, 2" in cases["A-02"]["errors"][0]
    assert cases["A-03"]["ok"] is False and "unknown label value 'unsure'" in cases["A-03"]["errors"][0]


def test_validate_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest_site(tmp_path / "site", broken=True)
    assert main(["validate", str(tmp_path / "site")]) == 1
    out = capsys.readouterr().out
    assert "A-01  ok" in out and "A-02  ERROR (1)" in out
    assert "error: mask" in out and "3 case(s): 1 usable, 2 with errors" in out


def test_validate_with_site_config_silences_placeholder_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "Test"
    rng = np.random.default_rng(1)
    write((rng.random(SHAPE) * 100).astype(np.uint8), site / "DATA" / "DATA_000.nrrd", spacing=(1, 1, 1))
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:6, 3:6, 3:6] = 1
    write(mask, site / "MASK" / "MASK_000.nrrd", spacing=(1, 1, 1))
    (site / "labels.csv").write_text(
        "case_id,label,data_path,mask_path\n0,B,DATA\\DATA_000.nrrd,MASK\\MASK_000.nrrd\n"
    )
    assert main(["validate", str(site), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["layout"] == "tdsc" and "placeholder" in document["cases"][0]["warnings"][0]
    toml = tmp_path / "tdsc.toml"
    toml.write_text("[site]\nspacing-z = 0.476\nspacing-y = 0.2\nspacing-x = 0.073\n")
    assert main(["validate", str(site), "--json", "--site-config", str(toml)]) == 0
    assert json.loads(capsys.readouterr().out)["cases"][0]["warnings"] == []


def test_unusable_folder_or_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path)]) == 2
    assert "not a site folder" in capsys.readouterr().err
    manifest_site(tmp_path / "site", broken=False)
    bad = tmp_path / "bad.toml"
    bad.write_text("[site]\nspacing-q = 1\n")
    assert main(["validate", str(tmp_path / "site"), "--site-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "spacing-q" in err


def test_prepare_exit_codes_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest_site(tmp_path / "good", broken=False)
    assert main(["prepare", str(tmp_path / "good"), str(tmp_path / "out_good")]) == 0
    assert "2 written" in capsys.readouterr().out
    assert main(["prepare", str(tmp_path / "good"), str(tmp_path / "out_good")]) == 0
    assert "0 written, 2 up to date" in capsys.readouterr().out
    manifest_site(tmp_path / "bad", broken=True)
    assert main(["prepare", str(tmp_path / "bad"), str(tmp_path / "out_bad")]) == 1
    out = capsys.readouterr().out
    assert "skipped A-02: mask" in out and "skipped A-03:" in out
    assert main(["validate", str(tmp_path / "out_bad"), "--json"]) == 0
    assert main(["prepare", str(tmp_path / "good"), str(tmp_path / "good" / "out")]) == 2
