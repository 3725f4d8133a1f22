"""Loaders on a small synthetic consortium: documented shapes/dtypes, crops map back, determinism, skipping."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import DataConfig, load_site_config
from shared.data.blocks import stitch
from shared.data.loaders import (
    LoadCased,
    cls_dataset,
    cls_loader,
    seg_eval_loader,
    seg_train_loader,
    site_cases,
)
from shared.data.planes import planes_from_config
from shared.data.synth import SynthOptions, generate_consortium
from shared.data.transforms import crop_or_pad

CONFIG = DataConfig(
    spacing_z=0.6,
    spacing_y=0.6,
    spacing_x=0.6,
    patch_size=24,
    crop_jitter_voxels=4,
    planes_frames=2,
    planes_size=16,
)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, object]]:
    out = tmp_path_factory.mktemp("sites")
    options = SynthOptions(shape=(32, 40, 40), lesion_median_cm3=0.2, second_lesion_prob=0.0)
    dirs = generate_consortium(out, sites=2, cases=5, seed=4, options=options)
    return [(d, load_site_config(out / f"{d.name}.toml")) for d in dirs]


def test_site_cases_filters_splits(sites) -> None:
    for site_dir, config in sites:
        everything = site_cases(site_dir, config)
        train = site_cases(site_dir, config, splits=["train"])
        assert len(everything) == 5 and 0 < len(train) < 5
        assert all(c.split == "train" for c in train)


def test_seg_train_loader_shapes_and_crops_map_back(sites) -> None:
    unaugmented = dataclasses.replace(CONFIG, augment=False)  # an augmented crop does not map back voxel-wise
    for site_dir, config in sites:
        cases = site_cases(site_dir, config)
        loader = seg_train_loader(cases, unaugmented, batch_size=2, site_config=config, shuffle=False)
        batch = next(iter(loader))
        assert batch["image"].shape == batch["mask"].shape == (2, 1, 24, 24, 24)
        assert batch["image"].dtype == batch["mask"].dtype == torch.float32
        assert batch["crop_start"].shape == (2, 3) and batch["crop_start"].dtype == torch.int64
        assert batch["label"].dtype == torch.int64 and len(batch["case_id"]) == 2
        assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0} and batch["mask"][0].sum() > 0
        loaded = LoadCased(CONFIG, config)({"case": cases[0]})  # the whole preprocessed case
        start = batch["crop_start"][0].tolist()
        expected = crop_or_pad(loaded["image"], start, 24, pad_value=loaded["pad_value"])
        assert np.array_equal(batch["image"][0, 0].numpy(), expected)
        assert np.array_equal(batch["mask"][0, 0].numpy(), crop_or_pad(loaded["mask"], start, 24))
        assert batch["case_id"][0] == cases[0].case_id


def test_seg_train_loader_is_deterministic_per_seed(sites) -> None:
    site_dir, config = sites[0]
    cases = site_cases(site_dir, config)

    def starts(seed: int) -> list[list[int]]:
        loader = seg_train_loader(cases, CONFIG, batch_size=5, site_config=config, seed=seed)
        batch = next(iter(loader))
        return sorted(zip(batch["case_id"], batch["crop_start"].tolist(), strict=True))

    assert starts(1) == starts(1)
    assert starts(1) != starts(2)


def test_seg_eval_loader_gives_whole_cases_and_blocks(sites) -> None:
    site_dir, config = sites[1]  # TDSC layout: spacing from the site TOML
    cases = site_cases(site_dir, config, splits=["test"])
    items = list(seg_eval_loader(cases, CONFIG, site_config=config))
    assert [item["case_id"] for item in items] == [c.case_id for c in cases]
    for item in items:
        assert (
            item["image"].ndim == 4 and item["image"].shape[0] == 1 and item["image"].dtype == torch.float32
        )
        assert item["mask"].shape == item["image"].shape
        count = len(item["blocks"])
        assert item["block_images"].shape == item["block_masks"].shape == (count, 1, 24, 24, 24)
        assert item["spacing_mm"] == pytest.approx((0.6, 0.6, 0.6))
        mask = item["mask"][0].numpy()
        stitched = stitch(item["block_masks"][:, 0].numpy(), item["blocks"], mask.shape)
        assert np.array_equal(stitched.values > 0.5, mask > 0)  # oracle blocks give the mask back
        expected_cm3 = mask.sum() * 0.6**3 / 1000
        assert item["lesion_volume_cm3"] == pytest.approx(expected_cm3)


def test_cls_loader_gives_planes_and_labels(sites) -> None:
    site_dir, config = sites[0]
    cases = site_cases(site_dir, config)
    batches = list(cls_loader(cases, CONFIG, batch_size=3, site_config=config, shuffle=False))
    assert batches[0]["planes"].shape == (3, 3, 2, 16, 16) and batches[0]["planes"].dtype == torch.float32
    labels = torch.cat([b["label"] for b in batches]).tolist()
    assert labels == [c.label for c in cases] and batches[0]["label"].dtype == torch.int64
    assert torch.isfinite(batches[0]["planes"]).all()


def test_invalid_cases_are_skipped_with_a_logged_count(sites, tmp_path: Path, caplog) -> None:
    site_dir, config = sites[0]
    broken = tmp_path / site_dir.name
    shutil.copytree(site_dir, broken)
    first = sorted((broken / "masks").iterdir())[0]
    first.write_bytes(first.read_bytes()[:100])  # truncated mask
    with caplog.at_level(logging.WARNING):
        cases = site_cases(broken, config)
    assert len(cases) == 4
    assert any("skipping 1 of 5" in record.getMessage() for record in caplog.records)
    batch = next(iter(seg_train_loader(cases, CONFIG, batch_size=4, site_config=config)))
    assert batch["image"].shape[0] == 4


# ------------------------------------------------------------------ training augmentation (data.augment)


def test_seg_training_is_augmented_deterministically_per_seed(sites) -> None:
    site_dir, site_config = sites[0]
    cases = site_cases(site_dir, site_config)

    def batch(config: DataConfig, seed: int) -> dict:
        return next(iter(seg_train_loader(cases, config, batch_size=5, site_config=site_config, seed=seed)))

    first, again = batch(CONFIG, 1), batch(CONFIG, 1)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    assert not torch.equal(first["image"], batch(CONFIG, 2)["image"])
    plain = batch(dataclasses.replace(CONFIG, augment=False), 1)
    assert torch.equal(first["crop_start"], plain["crop_start"])  # same crops, then augmented
    assert not torch.equal(first["image"], plain["image"])
    assert set(torch.unique(first["mask"]).tolist()) <= {0.0, 1.0}
    assert all(m.sum() > 0 for m in first["mask"])


def test_augment_off_gives_the_unaugmented_planes_bit_for_bit(sites) -> None:
    """(The crops: test_seg_train_loader_shapes_and_crops_map_back.)"""
    site_dir, site_config = sites[0]
    off = dataclasses.replace(CONFIG, augment=False)
    for case in site_cases(site_dir, site_config):
        loaded = LoadCased(off, site_config)({"case": case})
        planes = cls_dataset([case], off, site_config=site_config)[0]["planes"].numpy()
        kwargs = {"spacing_mm": loaded["spacing_mm"], "pad_value": loaded["pad_value"]}
        assert np.array_equal(planes, planes_from_config(loaded["image"], loaded["mask"], off, **kwargs))


def test_classifier_training_planes_are_augmented_evaluation_planes_never(sites) -> None:
    site_dir, site_config = sites[0]
    cases = site_cases(site_dir, site_config)
    off = dataclasses.replace(CONFIG, augment=False)

    def planes(config: DataConfig, *, seed: int = 0, training: bool = True) -> torch.Tensor:
        loader = cls_loader(
            cases, config, batch_size=5, site_config=site_config, seed=seed, shuffle=False, training=training
        )
        return torch.cat([b["planes"] for b in loader])

    augmented = planes(CONFIG, seed=3)
    assert torch.equal(augmented, planes(CONFIG, seed=3)) and torch.isfinite(augmented).all()
    assert not torch.equal(augmented, planes(CONFIG, seed=4))
    assert not torch.equal(augmented, planes(off))
    assert augmented.shape == planes(off).shape == (5, 3, 2, 16, 16)
    assert torch.equal(planes(CONFIG, training=False), planes(off))
    strong = dataclasses.replace(CONFIG, augment_prob=1.0)
    cached = cls_dataset(cases[:1], strong, site_config=site_config, cache_rate=1.0, seed=3)
    assert not torch.equal(cached[0]["planes"], cached[0]["planes"])  # the cache holds the case, not a draw


def test_classifier_training_boxes_are_jittered_when_asked_and_evaluation_never(sites) -> None:
    site_dir, site_config = sites[0]
    cases = site_cases(site_dir, site_config)
    off = dataclasses.replace(CONFIG, augment=False)
    jittered = dataclasses.replace(off, planes_box_jitter=0.3)

    def planes(config: DataConfig, *, seed: int = 0, training: bool = True) -> torch.Tensor:
        dataset = cls_dataset(cases, config, site_config=site_config, seed=seed, training=training)
        return torch.stack([dataset[i]["planes"] for i in range(len(cases))])

    assert torch.equal(planes(jittered, seed=3), planes(jittered, seed=3))
    assert not torch.equal(planes(jittered, seed=3), planes(off))
    assert not torch.equal(planes(jittered, seed=3), planes(jittered, seed=4))
    assert torch.equal(planes(jittered, training=False), planes(off))
    dataset = cls_dataset(cases[:1], jittered, site_config=site_config, seed=3)
    assert not torch.equal(dataset[0]["planes"], dataset[0]["planes"])  # a new draw each epoch
    with pytest.raises(ValueError, match="planes-box-jitter"):
        cls_loader(cases, jittered, batch_size=2, site_config=site_config, num_workers=1)


def test_evaluation_items_are_identical_with_augment_on_and_off(sites) -> None:
    site_dir, site_config = sites[0]
    cases = site_cases(site_dir, site_config)
    on = list(seg_eval_loader(cases, CONFIG, site_config=site_config))
    off = list(seg_eval_loader(cases, dataclasses.replace(CONFIG, augment=False), site_config=site_config))
    for a, b in zip(on, off, strict=True):
        for key in ("image", "mask", "block_images", "block_masks"):
            assert torch.equal(a[key], b[key]), key
        assert a["blocks"] == b["blocks"] and a["case_id"] == b["case_id"]
