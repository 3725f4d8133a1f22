"""``train.cls-boxes = predicted``: the classifier's training planes are cut around the segmenter's own boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.adapters import lora_specs_from_config
from shared.base import build_random_base, wrap_for_training
from shared.config import ConfigError, load_config
from shared.data.loaders import LoadCased, TriPlanesd
from shared.data.planes import BoxError, largest_lesion_box, planes_from_config
from shared.data.synth import SynthOptions, generate_consortium
from shared.training import site as site_module
from shared.training.site import open_site, train_site
from tests.shared.tiny_sam import TINY_SAM, P

RUN = {
    "data.patch-size": P,
    "data.crop-jitter-voxels": 2,
    "data.planes-frames": 2,
    "data.planes-size": 32,
    "data.augment": False,
    "model.cls-depth": 18,
    "model.cls-norm-groups": 8,
    "train.seg-epochs": 1,
    "train.seg-batch-size": 2,
    "train.seg-click-iterations": 1,
    "train.eval-clicks": 2,
    "train.cls-epochs": 1,
    "train.cls-batch-size": 2,
    "train.progress": False,
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    options = SynthOptions(shape=(40, 48, 48), lesion_median_cm3=0.3, second_lesion_prob=0.0)
    site_dir = generate_consortium(
        tmp_path_factory.mktemp("sites"), sites=1, cases=5, seed=3, options=options
    )[0]
    return open_site(site_dir)


def models_for(config):
    base = build_random_base(TINY_SAM, cls_depth=18, cls_norm_groups=8, seed=0)
    return wrap_for_training(base, lora_specs_from_config(config.adapter))


def test_the_key_is_checked() -> None:
    assert load_config({}).train.cls_boxes == "ground-truth"
    with pytest.raises(ConfigError, match="train.cls-boxes = 'segmenter'; allowed: ground-truth, predicted"):
        load_config({"train.cls-boxes": "segmenter"})


def test_box_error_measured_on_a_case_gives_back_the_found_box() -> None:
    true = largest_lesion_box(np.pad(np.ones((6, 4, 8), np.uint8), ((5, 20), (7, 20), (3, 20))))
    found = largest_lesion_box(np.pad(np.ones((5, 6, 7), np.uint8), ((7, 19), (6, 19), (5, 19))))
    moved = BoxError.between(true, found).apply(true, (40, 40, 40))
    assert (moved.start, moved.stop) == (found.start, found.stop)


@pytest.mark.parametrize("boxes", ["ground-truth", "predicted"])
def test_a_round_trains_the_classifier_on_the_boxes_asked_for(site, monkeypatch, boxes: str) -> None:
    config = load_config({**RUN, "train.cls-boxes": boxes})
    seen = {}
    real_loader = site_module.cls_loader

    def spy(*args, **kwargs):
        seen["box_errors"] = kwargs.get("box_errors")
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(site_module, "cls_loader", spy)
    metrics = train_site(models_for(config), site, config, device=torch.device("cpu"), seed=1)
    assert np.isfinite(metrics["train/cls_loss"])
    if boxes == "ground-truth":
        assert seen["box_errors"] is None
        return
    errors = seen["box_errors"]
    assert errors  # seeded: the tiny segmenter finds something in these cases, so the check below runs
    assert set(errors) <= {c.case_id for c in site.train_cases}
    assert all(isinstance(e, BoxError) for e in errors.values())
    for case in site.train_cases:  # the planes a case trains on are those cut around the segmenter's box
        if case.case_id not in errors:
            continue
        loaded = LoadCased(config.data, site.site_config)({"case": case})
        planes = TriPlanesd(config.data, box_errors=errors)(loaded)["planes"].numpy()
        box = errors[case.case_id].apply(largest_lesion_box(loaded["mask"]), loaded["mask"].shape)
        kwargs = {"spacing_mm": loaded["spacing_mm"], "pad_value": loaded["pad_value"]}
        assert np.array_equal(
            planes, planes_from_config(loaded["image"], loaded["mask"], config.data, box=box, **kwargs)
        )
