"""2D frames: slice choice along the sweep axis, aspect-keeping square fitting, ABUS slice items that match the
preprocessed volume, and BUSI items (shapes, labels, normalisation, padding)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import DataConfig, load_site_config
from shared.data.busi import usable_busi_images
from shared.data.loaders import LoadCased, site_cases
from shared.data.loaders2d import busi_dataset, frame_loader, slice_train_loader
from shared.data.slices2d import choose_slices, fit_square, volume_slice_samples
from shared.data.synth import SynthOptions, generate_consortium
from shared.data.synth_busi import BusiSynthOptions, write_busi_site

CONFIG = DataConfig(spacing_z=0.6, spacing_y=0.6, spacing_x=0.6, normalisation="zscore_nonzero")


def _mask_with_lesion_rows(depth: int, counts: dict[int, int]) -> np.ndarray:
    mask = np.zeros((depth, 6, 6), np.uint8)
    for k, n in counts.items():
        mask[k].flat[:n] = 1
    return mask


def test_choose_slices_takes_every_lesion_slice_and_a_seeded_share_of_the_others() -> None:
    mask = _mask_with_lesion_rows(20, {4: 5, 5: 9, 6: 9, 7: 9, 8: 2})
    lesion, free = choose_slices(
        mask, negative_fraction=0.5, min_lesion_pixels=3, rng=np.random.default_rng(0)
    )
    assert lesion.tolist() == [
        4,
        5,
        6,
        7,
    ]  # slice 8 (2 pixels) is below min_lesion_pixels and not lesion-free
    assert free.size == 2 and not set(free.tolist()) & {4, 5, 6, 7, 8}
    again = choose_slices(mask, negative_fraction=0.5, min_lesion_pixels=3, rng=np.random.default_rng(0))[1]
    assert again.tolist() == free.tolist()
    every = choose_slices(mask, negative_fraction=None)
    assert every[0].tolist() == [4, 5, 6, 7, 8] and every[1].size == 15
    assert choose_slices(mask, negative_fraction=100.0, rng=np.random.default_rng(0))[1].size == 15
    assert choose_slices(mask, negative_fraction=0.0)[1].size == 0
    with pytest.raises(ValueError, match="seeded rng"):
        choose_slices(mask, negative_fraction=0.5)
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        choose_slices(mask[0], negative_fraction=None)


def test_fit_square_keeps_the_aspect_ratio_and_pads() -> None:
    image = np.ones((10, 40), np.float32)
    mask = np.zeros((10, 40), np.uint8)
    mask[:, :20] = 1
    frame = fit_square(image, size=16, pad_value=-3.0)
    fitted = fit_square(mask, size=16, is_mask=True)
    assert frame.shape == fitted.shape == (16, 16) and frame.dtype == np.float32 and fitted.dtype == np.uint8
    rows = np.flatnonzero(np.isclose(frame[:, 8], 1.0))
    assert rows.size == 4  # 10 x 40 -> 4 x 16, centred
    assert np.allclose(np.delete(frame, rows, axis=0), -3.0)
    assert fitted[rows].sum() == 4 * 8 and fitted.sum() == 4 * 8


@pytest.fixture(scope="module")
def abus_site(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("abus")
    options = SynthOptions(shape=(24, 32, 32), lesion_median_cm3=0.2, second_lesion_prob=0.0)
    site_dir = generate_consortium(out, sites=1, cases=3, seed=5, options=options)[0]
    return site_dir, load_site_config(out / f"{site_dir.name}.toml")


def test_abus_slices_are_sweep_frames_of_the_preprocessed_case(abus_site) -> None:
    site_dir, site_config = abus_site
    cases = site_cases(site_dir, site_config)[:2]
    samples = volume_slice_samples(
        cases, CONFIG, size=24, negative_fraction=0.5, seed=3, site_config=site_config
    )
    loaded = LoadCased(CONFIG, site_config)({"case": cases[0]})
    first = [s for s in samples if s["case_id"] == cases[0].case_id]
    lesion_slices = np.flatnonzero(loaded["mask"].reshape(loaded["mask"].shape[0], -1).any(axis=1))
    indices = [int(s["slice_index"]) for s in first]
    assert indices == sorted(indices) and set(lesion_slices.tolist()) <= set(indices)
    assert len(indices) - lesion_slices.size == round(0.5 * lesion_slices.size)
    item = first[len(first) // 2]
    k = int(item["slice_index"])
    expected = fit_square(loaded["image"][k], size=24, pad_value=loaded["pad_value"])
    np.testing.assert_allclose(item["image"][0].numpy(), expected, atol=1e-6)
    assert item["image"].shape == item["mask"].shape == (1, 24, 24)
    assert int(item["label"]) == cases[0].label
    assert not any(s["mask"].any() for s in first if int(s["slice_index"]) not in lesion_slices)
    assert (
        sum(bool(s["mask"].any()) for s in first) >= lesion_slices.size - 2
    )  # a lesion tip may vanish at 24²
    again = volume_slice_samples(
        cases, CONFIG, size=24, negative_fraction=0.5, seed=3, site_config=site_config
    )
    assert [int(s["slice_index"]) for s in again] == [int(s["slice_index"]) for s in samples]
    batch = next(iter(frame_loader(samples, batch_size=3, seed=1)))
    assert batch["image"].shape == (3, 1, 24, 24) and batch["label"].dtype == torch.int64


def test_the_2d_segmenters_training_loader_takes_its_slices_from_the_data_config(abus_site) -> None:
    """``data.slice-size`` and ``data.slice-negative-fraction`` choose the frames; per-case site configs (a study's
    pooled arm) read each case as its own site's config does."""
    site_dir, site_config = abus_site
    cases = site_cases(site_dir, site_config)[:2]
    config = replace(CONFIG, slice_size=16, slice_negative_fraction=0.0)
    per_case = {case.case_id: site_config for case in cases}
    batches = list(slice_train_loader(cases, config, batch_size=4, site_config=per_case, seed=2))
    expected = volume_slice_samples(cases, CONFIG, size=16, negative_fraction=0.0, site_config=site_config)
    assert sum(len(b["case_id"]) for b in batches) == len(expected)  # lesion slices only
    assert all(b["image"].shape[1:] == (1, 16, 16) and b["mask"].sum() > 0 for b in batches)


def test_busi_items_are_square_normalised_and_labelled(tmp_path: Path) -> None:
    site = write_busi_site(
        tmp_path / "busi", seed=2, options=BusiSynthOptions(per_class=(2, 2, 1), size=(24, 48))
    )
    images = usable_busi_images(site)
    dataset = busi_dataset(images, size=32)
    items = [dataset[i] for i in range(len(dataset))]
    assert [int(i["label"]) for i in items] == [0, 0, 1, 1, 2]
    for item, record in zip(items, images, strict=True):
        assert (
            item["image"].shape == item["mask"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
        )
        assert item["case_id"] == record.case_id and int(item["slice_index"]) == -1
        assert set(torch.unique(item["mask"]).tolist()) <= {0.0, 1.0}
        assert bool(item["mask"].any()) == (record.class_name != "normal")
    column = items[0]["image"][0, :, 16]  # images are wider than tall: padded above and below with raw black
    assert column[0] == column[-1] == items[0]["image"].min() < items[0]["image"].max()
    inside = items[0]["image"][items[0]["image"] > column[0]]
    assert abs(float(inside.mean())) < 0.3  # z-scored over the image, not the padding
    batch = next(iter(frame_loader(dataset, batch_size=5, shuffle=False)))
    assert batch["image"].shape == (5, 1, 32, 32) and batch["case_id"][0] == images[0].case_id
    with pytest.raises(ValueError, match="normalisation"):
        busi_dataset(images, size=32, normalisation="unit")
