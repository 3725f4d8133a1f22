"""BUSI (2D) folders as study sites: converted once into a manifest site of one-frame volumes
(``shared.data.busi_volumes``), refused for the arms that cannot use them, and studied by a 2D arm."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared.cli import main
from shared.config import DataConfig, load_config
from shared.data.busi_volumes import CONVERSION_NAME, convert_busi_site
from shared.data.io import read_volume
from shared.data.synth_busi import BusiSynthOptions, break_busi_site, write_busi_site
from shared.data.transforms import preprocess_case
from shared.study.sites import StudyError, check_busi_arms
from shared.training.site import open_site

OPTIONS = BusiSynthOptions(per_class=(6, 5, 2), size=(40, 56))


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _manifest(site_dir: Path) -> list[dict[str, str]]:
    with (site_dir / "manifest.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_conversion_is_stratified_deterministic_leaves_out_normal_and_broken_images(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="shared.data.busi_volumes")
    busi = write_busi_site(tmp_path / "busi_a", seed=3, options=OPTIONS)
    broken = break_busi_site(busi, "non-binary-mask")  # malignant (1)
    before = _snapshot(busi)
    first = convert_busi_site(busi, tmp_path / "out1", seed=0, val_fraction=0.2)
    again = convert_busi_site(busi, tmp_path / "out2", seed=0, val_fraction=0.2)
    assert _snapshot(busi) == before  # the user's folder is untouched
    assert not {p.name for p in busi.iterdir()} - {"benign", "malignant", "normal"}

    rows = _manifest(first.site_dir)
    assert rows == _manifest(again.site_dir) and first.key == again.key
    assert _snapshot(first.site_dir) == _snapshot(again.site_dir)  # same folder + seed -> same site
    assert first.site_dir.name == "busi_a" and first.normal == 2
    ids = {r["case_id"] for r in rows}
    assert not any(i.startswith("normal/") for i in ids) and broken.case_id not in ids
    assert broken.reason in first.skipped[broken.case_id][0] and str(broken.path) in caplog.text
    assert "normal/ image(s) left out" in caplog.text
    for label, count in (
        ("benign", 6),
        ("malignant", 4),
    ):  # test: round(0.2 n) >= 1; val carved from the rest
        splits = [r["split"] for r in rows if r["label"] == label]
        assert len(splits) == count and splits.count("test") == 1 and splits.count("val") == 1
    other = _manifest(convert_busi_site(busi, tmp_path / "out3", seed=5, val_fraction=0.2).site_dir)
    assert [r["split"] for r in other] != [r["split"] for r in rows]  # the seed decides the split

    site = open_site(first.site_dir, val_fraction=0.2)
    assert len(site.train_cases) + len(site.val_cases) + len(site.test_cases) == 10
    volume = read_volume(site.train_cases[0].image)
    assert volume.GetSize()[2] == 1 and volume.GetSpacing() == pytest.approx((0.1, 0.1, 1.0))


def test_an_interrupted_conversion_leaves_nothing_trusted_and_a_changed_image_a_new_site(
    tmp_path, monkeypatch
):
    import shared.data.busi_volumes as busi_volumes

    busi = write_busi_site(tmp_path / "busi_a", seed=3, options=OPTIONS)
    write_case, calls = busi_volumes._write_case, []

    def interrupted(record, site_dir):
        calls.append(record.case_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the study is stopped mid-conversion
        return write_case(record, site_dir)

    monkeypatch.setattr(busi_volumes, "_write_case", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_busi_site(busi, tmp_path / "out", seed=0, val_fraction=0.2)
    assert not list((tmp_path / "out").iterdir())  # no half-written site, no partial folder
    monkeypatch.setattr(busi_volumes, "_write_case", write_case)
    first = convert_busi_site(busi, tmp_path / "out", seed=0, val_fraction=0.2)
    assert len(_manifest(first.site_dir)) == 11 and (first.site_dir / CONVERSION_NAME).is_file()

    image = busi / "benign" / "benign (2).png"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((40, 56), 90, np.uint8)), str(image))
    changed = convert_busi_site(busi, tmp_path / "out", seed=0, val_fraction=0.2)
    assert changed.key != first.key and changed.site_dir != first.site_dir
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("spacing_z", [0.0, 0.5, 3.0])
def test_preprocessing_keeps_a_one_frame_volume_whole(tmp_path, spacing_z):
    busi = write_busi_site(tmp_path / "busi_a", seed=3, options=BusiSynthOptions(per_class=(3, 0, 0)))
    case = open_site(
        convert_busi_site(busi, tmp_path / "out", seed=0, val_fraction=0.0).site_dir
    ).train_cases[0]
    image, mask = read_volume(case.image), read_volume(case.mask)
    raw = sitk.GetArrayFromImage(mask)
    done = preprocess_case(image, mask, DataConfig(spacing_z=spacing_z, spacing_y=0.2, spacing_x=0.2))
    assert done.image.shape[0] == 1 and done.spacing_mm == pytest.approx((1.0, 0.2, 0.2))
    assert np.allclose(done.image.shape[1:], np.asarray(raw.shape[1:]) / 2, atol=1)  # 0.1 -> 0.2 mm in-plane
    assert abs(done.mask.sum() * 4 - raw.sum()) < 0.2 * raw.sum()  # the lesion survives the resampling
    assert float(np.abs(done.image).max()) > 0  # not resampled off the frame into zeros


def test_3d_arms_and_other_planes_are_refused_naming_the_folder_and_the_arm(tmp_path):
    busi = write_busi_site(tmp_path / "busi_a", seed=3, options=BusiSynthOptions(per_class=(3, 3, 0)))
    two_d = load_config({"model.seg-model": "u2net-lite", "train.cls-planes": "transverse"})
    check_busi_arms([busi], ["local"], {"local": two_d})  # the 2D arm on transverse frames is fine
    configs = {
        "local": load_config({"train.cls-planes": "transverse"}),  # SAM-Med3D
        "local@auto": load_config({"model.seg-model": "segresnet", "train.cls-planes": "transverse"}),
        "pooled": load_config({"model.seg-model": "dynunet2d"}),  # three planes
    }
    with pytest.raises(StudyError) as refused:
        check_busi_arms([busi], list(configs), configs)
    text = str(refused.value)
    assert text.count(str(busi)) == 3
    assert "arm 'local' (model.seg-model = 'sam-med3d'" in text and "arm 'local@auto'" in text
    assert "dynunet2d or u2net-lite" in text
    assert "arm 'pooled' classifies on train.cls-planes" in text and "transverse" in text

    out = tmp_path / "study"  # through the command: refused before anything is converted or trained
    with pytest.raises(SystemExit, match=r"arm 'local' .*busi_a"):
        main(
            [
                "study",
                "--sites",
                str(busi),
                "--arms",
                "local",
                "--out",
                str(out),
                "--base",
                str(tmp_path / "b"),
            ]
        )
    assert not (out / "busi-sites").exists() and not (out / "jobs").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_local_2d_arm_trains_and_is_tested_on_a_busi_site(tmp_path, capsys):
    from shared.base import build_random_base, save_base

    busi = write_busi_site(
        tmp_path / "busi_a", seed=3, options=BusiSynthOptions(per_class=(5, 5, 1), size=(32, 40))
    )
    base = save_base(
        build_random_base("small", cls_depth=18, cls_planes=("transverse",), seed=0), tmp_path / "base"
    )
    out = tmp_path / "out"
    argv = ["study", "--sites", str(busi), "--arms", "local", "--base", str(base), "--rounds", "1"]
    argv += ["--out", str(out), "--device", "cpu"]
    for item in ("model.seg-model=u2net-lite", "model.auto-init-filters=2", "data.slice-size=32",
                 "data.slice-negative-fraction=0", "train.seg-batch-size=8", "train.cls-planes=transverse",
                 "model.cls-depth=18", "data.planes-size=32", "data.planes-frames=1", "train.seg-epochs=1",
                 "train.cls-epochs=1", "train.progress=false"):  # fmt: skip
        argv += ["--set", item]
    assert main(argv) == 0
    with (out / "results.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    dice = [r for r in rows if r["metric"] == "dice_auto"]
    assert [(r["model"], r["test_site"], r["n"]) for r in dice] == [("local:busi_a", "busi_a", "2")]
    assert 0.0 <= float(dice[0]["value"]) <= 1.0 and "auc" in {r["metric"] for r in rows}
    fingerprints = json.loads((out / "study.json").read_text(encoding="utf-8"))["site_fingerprints"]
    capsys.readouterr()
    assert main(argv) == 0  # run again: the converted site and the finished job are reused
    assert "reused" in capsys.readouterr().out and len(list((out / "busi-sites").iterdir())) == 1
    assert json.loads((out / "study.json").read_text(encoding="utf-8"))["site_fingerprints"] == fingerprints


def test_a_3d_segmenter_refuses_to_train_on_one_frame_cases(tmp_path):
    # validation lets one-frame volumes through (for the 2D arms); a 3D training crop names the case instead
    from shared.data.loaders import seg_train_loader

    busi = write_busi_site(tmp_path / "busi_a", seed=3, options=OPTIONS)
    site = open_site(convert_busi_site(busi, tmp_path / "out", seed=0, val_fraction=0.2).site_dir)
    loader = seg_train_loader(site.train_cases[:1], DataConfig(patch_size=16), batch_size=1)
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps a transform's error, keeping it as the cause
        next(iter(loader))
    cause = raised.value.__cause__
    assert isinstance(cause, ValueError) and "a single frame along the sweep" in str(cause)
    assert "model.seg-model = dynunet2d or u2net-lite" in str(cause)
