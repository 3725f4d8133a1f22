"""`fedabus predict`: clicks in the file's array order, a mask with exactly the input's geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from shared.adapters import extract_adapter, lora_specs_from_config, save_adapter
from shared.base import build_random_base, load_base, save_base, wrap_for_training
from shared.cli import main
from shared.config import load_config
from shared.data.transforms import preprocess_case
from shared.inference import file_index_to_processed


def _volume(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.rayleigh(30.0, size=(40, 72, 60)).astype(np.float32)
    array[18:26, 30:44, 25:35] += 80.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.45, 0.55, 0.8))
    image.SetOrigin((12.5, -40.0, 7.25))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))  # flipped sweep axis
    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, image


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return save_base(
        build_random_base("small", cls_depth=18, seed=0), tmp_path_factory.mktemp("base") / "base"
    )


def test_click_maps_to_the_same_physical_point(tmp_path):
    path, image = _volume(tmp_path)
    processed = preprocess_case(image, None, load_config().data)
    index = (20, 37, 30)
    mapped = file_index_to_processed(index, image, processed.grid)
    there = processed.grid.image_of(np.zeros(processed.grid.shape_zyx, np.uint8))
    back = there.TransformIndexToPhysicalPoint(tuple(int(v) for v in reversed(mapped)))
    point = image.TransformIndexToPhysicalPoint(tuple(reversed(index)))
    assert np.allclose(back, point, atol=max(processed.spacing_mm))
    with pytest.raises(ValueError, match="outside the image"):
        file_index_to_processed((40, 0, 0), image, processed.grid)


def test_predict_writes_a_mask_with_the_input_geometry(tmp_path, base_path, capsys):
    path, image = _volume(tmp_path)
    base = load_base(base_path)
    torch.manual_seed(0)
    models = wrap_for_training(base, lora_specs_from_config(load_config().adapter))
    adapter_path, _ = save_adapter(
        extract_adapter(models, base_fingerprints=base.fingerprints), tmp_path / "adapter"
    )
    out = tmp_path / "pred" / "mask.nii.gz"
    code = main(
        [
            "predict",
            "--image",
            str(path),
            "--click",
            "21,37,30",
            "--click",
            "22,40,31",
            "--negative-click",
            "5,5,5",
            "--base",
            str(base_path),
            "--adapter",
            str(adapter_path),
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    mask = sitk.ReadImage(str(out))
    assert mask.GetSize() == image.GetSize()
    assert mask.GetSpacing() == pytest.approx(image.GetSpacing())
    assert mask.GetOrigin() == pytest.approx(image.GetOrigin())
    assert mask.GetDirection() == pytest.approx(image.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
    printed = capsys.readouterr().out
    assert "malignancy probability" in printed and "click(s) used" in printed


def test_bad_click_is_a_clear_error(tmp_path, base_path):
    path, _ = _volume(tmp_path)
    with pytest.raises(SystemExit):
        main(
            [
                "predict",
                "--image",
                str(path),
                "--click",
                "1,2",
                "--base",
                str(base_path),
                "--out",
                str(tmp_path / "m.nii.gz"),
            ]
        )
    with pytest.raises(ValueError, match="outside the image"):
        main(
            [
                "predict",
                "--image",
                str(path),
                "--click",
                "99,2,2",
                "--base",
                str(base_path),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "m.nii.gz"),
            ]
        )
