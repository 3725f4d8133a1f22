"""``train.cls-boxes = predicted``: the classifier's training planes are cut around the segmenter's own boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.config import ConfigError, load_config
from shared.data.loaders import LoadCased, TriPlanesd
from shared.data.planes import BoxError, largest_lesion_box, planes_from_config
from shared.training import site as site_module
from shared.training.site import train_site
from tests.shared.tiny_sam import TINY_RUN

RUN = {
    **TINY_RUN,
    "data.augment": False,
    "train.seg-click-iterations": 1,
    "train.eval-clicks": 2,
}

# tiny_*: tests/shared/conftest.py


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
def test_a_round_trains_the_classifier_on_the_boxes_asked_for(
    tiny_site, tiny_models, monkeypatch, boxes: str
) -> None:
    site = tiny_site
    config = load_config({**RUN, "train.cls-boxes": boxes})
    seen = {}
    real_loader = site_module.cls_loader

    def spy(*args, **kwargs):
        seen["box_errors"] = kwargs.get("box_errors")
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(site_module, "cls_loader", spy)
    metrics = train_site(tiny_models(config.adapter)[1], site, config, device=torch.device("cpu"), seed=1)
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
