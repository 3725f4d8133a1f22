"""Training and whole-volume evaluation of the fully automatic segmenter (shared.training.seg_auto), on
ellipsoid phantoms and on a synthetic site through ``fedabus train-local``, at a tiny SegResNet size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared.base import build_random_base, save_base
from shared.cli import main
from shared.config import DataConfig, TrainConfig
from shared.data.synth import generate_consortium
from shared.models.auto_seg import AutoSegSpec, build_auto_segmenter
from shared.training.seg import train_segmentation
from shared.training.seg_auto import AutoSegEvaluation
from shared.training.seg_eval import SegCase, evaluate_segmentation
from tests.shared.training.test_seg import batches, crops, ellipsoid

SPEC = AutoSegSpec(init_filters=4, blocks_down=(1, 1))
DATA = DataConfig(patch_size=32)


def whole_case(seed: int) -> SegCase:
    """A 40 x 64 x 56 volume with one lesion far from its centre: found only by sweeping the whole volume."""
    rng = np.random.default_rng(100 + seed)
    shape = (40, 64, 56)
    mask = ellipsoid(shape, (14 + rng.uniform(-2, 2), 44, 16), rng.uniform(3.5, 6.0, 3))
    image = rng.normal(0.0, 1.0, shape) + np.where(mask, -1.5, 0.5)
    return SegCase(
        f"c{seed}", image.astype(np.float32), mask.astype(np.uint8), (1.0, 0.5, 0.5), label=seed % 2
    )


@pytest.fixture(scope="module")
def trained() -> dict:
    model = build_auto_segmenter(SPEC, seed=0)
    config = TrainConfig(seg_epochs=12, seg_lr=1e-2, progress=False)
    cases = [whole_case(i) for i in range(3)]
    before = evaluate_segmentation(model, cases, config=config, data_config=DATA, device="cpu", split="val")
    images, masks = crops(8)
    result = train_segmentation(model, batches(images, masks, 4), config=config, device="cpu")
    after = evaluate_segmentation(model, cases, config=config, data_config=DATA, device="cpu", split="val")
    return {"model": model, "result": result, "before": before, "after": after, "cases": cases}


def test_training_without_clicks_lowers_the_loss_and_raises_the_whole_volume_dice(trained):
    losses = trained["result"]["epoch_loss"]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    assert trained["after"].metrics["val/dice_auto"] > trained["before"].metrics["val/dice_auto"] + 0.2, (
        trained["before"].metrics["val/dice_auto"],
        trained["after"].metrics["val/dice_auto"],
    )


def test_the_evaluation_reports_automatic_metrics_of_the_whole_volume_only(trained):
    evaluation = trained["after"]
    assert isinstance(evaluation, AutoSegEvaluation)
    metrics = evaluation.metrics
    for name in (
        "dice_auto",
        "iou_auto",
        "seg_precision_auto",
        "seg_recall_auto",
        "hd95_mm_auto",
        "n_cases_seg",
    ):
        assert f"val/{name}" in metrics
    assert not any("click" in key for key in metrics) and "val/dice" not in metrics
    for case, result in zip(trained["cases"], evaluation.cases, strict=True):
        full = result.prediction.full()
        assert full.shape == case.mask.shape  # a prediction of the whole volume, not of lesion blocks
        inter = np.logical_and(full, case.mask > 0).sum()
        assert result.dice == pytest.approx(2 * inter / (full.sum() + (case.mask > 0).sum()))
        assert result.record()["dice_curve"] == []


def test_a_false_positive_far_from_the_lesion_counts(monkeypatch):
    """The whole volume is judged: a blob predicted in a far corner lowers the Dice and raises the HD95."""
    from shared.training import seg_auto

    case = whole_case(0)
    model = build_auto_segmenter(SPEC, seed=0)
    results = {}
    for blob in (False, True):
        predicted = case.mask > 0
        if blob:
            predicted = predicted.copy()
            predicted[-6:, :6, -6:] = True
        monkeypatch.setattr(seg_auto, "predict_volume", lambda *a, p=predicted, **k: p)
        data = DataConfig(patch_size=32)
        results[blob] = seg_auto._evaluate_case(
            model, case, data_config=data, batch=1, device=torch.device("cpu")
        )
    assert results[False].dice == 1.0 and results[False].hd95_mm == 0.0
    assert results[True].dice < 1.0 and results[True].hd95_mm > 10.0
    assert results[True].prediction.full()[-1, 0, -1]  # the blob is in the kept prediction


@pytest.mark.slow
def test_train_local_trains_and_evaluates_the_automatic_segmenter(tmp_path):
    site_dir = generate_consortium(tmp_path / "sites", sites=1, cases=6, seed=5)[0]
    base = save_base(build_random_base("small", cls_depth=18, seed=0), tmp_path / "base")
    config = tmp_path / "auto.toml"
    config.write_text(
        "[model]\ncls-depth = 18\nseg-model = 'segresnet'\nauto-init-filters = 4\nauto-blocks-down = '1,1'\n"
        "[data]\npatch-size = 32\n[train]\nseg-epochs = 1\ncls-epochs = 1\nprogress = false\n",
        encoding="utf-8",
    )
    argv = ["train-local", "--site-dir", str(site_dir), "--base", str(base), "--config", str(config)]
    assert main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu", "--rounds", "2"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["selection"]["metric"] == "val/dice_auto"
    for when in ("before", "after"):
        assert 0.0 <= metrics[when]["test/dice_auto"] <= 1.0 and "test/auc" in metrics[when]
        assert not any("click" in key for key in metrics[when])
    assert np.isfinite(metrics["training"]["train/seg_loss"])
    manifest = json.loads((tmp_path / "out" / "adapter.json").read_text(encoding="utf-8"))
    assert manifest["peft"]["seg"]["segmenter"] == "segresnet"
