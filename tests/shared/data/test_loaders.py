"""Loaders on a small synthetic consortium: documented shapes/dtypes, crops map back, determinism, skipping."""

from __future__ import annotations

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
    cls_loader,
    seg_eval_loader,
    seg_train_loader,
    site_cases,
)
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
    for site_dir, config in sites:
        cases = site_cases(site_dir, config)
        batch = next(iter(seg_train_loader(cases, CONFIG, batch_size=2, site_config=config, shuffle=False)))
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
