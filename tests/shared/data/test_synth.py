"""The synthetic consortium: determinism, class balance, both layouts readable, lesion geometry, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from shared.config import load_site_config
from shared.data.io import read_volume
from shared.data.layouts import discover_site
from shared.data.planes import largest_lesion_box
from shared.data.synth import SynthOptions, assign_splits, generate_consortium, register, site_styles
from shared.data.synth_case import BIRADS_CATEGORIES, _lesion_volume_mm3, generate_case
from shared.data.transforms import orient_canonical
from shared.data.validate import validate_site

SMALL = SynthOptions(shape=(32, 48, 48), lesion_median_cm3=0.25)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], dict]:
    out = tmp_path_factory.mktemp("consortium")
    sites = generate_consortium(out, sites=3, cases=6, seed=11, options=SMALL)
    return out, sites, json.loads((out / "consortium.json").read_text(encoding="utf-8"))


def _arrays(site_dir: Path) -> list[np.ndarray]:
    files = sorted(p for p in site_dir.rglob("*") if p.name.endswith((".nii.gz", ".nrrd")))
    return [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in files]


def test_same_seed_same_arrays_other_seed_differs(consortium, tmp_path: Path) -> None:
    out, sites, _ = consortium
    again = generate_consortium(tmp_path / "again", sites=1, cases=6, seed=11, options=SMALL)
    other = generate_consortium(tmp_path / "other", sites=1, cases=6, seed=12, options=SMALL)
    first, repeated, different = _arrays(sites[0]), _arrays(again[0]), _arrays(other[0])
    assert len(first) == len(repeated) == 12
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, repeated, strict=True))
    assert (sites[0] / "manifest.csv").read_bytes() == (again[0] / "manifest.csv").read_bytes()
    assert not all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(first, different, strict=True))


def test_cases_made_in_worker_processes_are_the_cases_made_in_one(consortium, tmp_path: Path) -> None:
    out, sites, truth = consortium
    parallel = generate_consortium(tmp_path / "parallel", sites=3, cases=6, seed=11, options=SMALL, workers=2)
    for serial_site, parallel_site in zip(sites, parallel, strict=True):
        first, second = _arrays(serial_site), _arrays(parallel_site)
        assert len(first) == len(second) == 12
        assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second, strict=True))
        tables = sorted(p.relative_to(serial_site) for p in serial_site.rglob("*.csv"))
        assert tables and tables == sorted(p.relative_to(parallel_site) for p in parallel_site.rglob("*.csv"))
        assert all((serial_site / t).read_bytes() == (parallel_site / t).read_bytes() for t in tables)
    again = json.loads((tmp_path / "parallel" / "consortium.json").read_text(encoding="utf-8"))
    assert [s["cases"] for s in again["sites"]] == [s["cases"] for s in truth["sites"]]


def test_generate_case_is_deterministic_and_well_formed() -> None:
    style = site_styles(1, seed=3)[0]
    one = generate_case(style, 1, seed=3, site=0, case=4, options=SMALL)
    two = generate_case(style, 1, seed=3, site=0, case=4, options=SMALL)
    assert one.image.tobytes() == two.image.tobytes() and one.mask.tobytes() == two.mask.tobytes()
    assert one.image.dtype == np.uint8 and one.image.shape == SMALL.shape
    assert one.mask.dtype == np.uint8 and set(np.unique(one.mask)) == {0, 1}
    assert np.count_nonzero(one.image == 0) > 0  # no-contact zeros above the skin
    assert one.birads in BIRADS_CATEGORIES and one.features["volume_cm3"] > 0


def test_class_balance_and_splits(consortium) -> None:
    _, _, truth = consortium
    all_labels = []
    for record in truth["sites"]:
        labels = [c["label"] for c in record["cases"]]
        expected = min(max(round(record["style"]["malignant_fraction"] * 6), 1), 5)
        assert sum(labels) == expected and 0 < sum(labels) < len(labels)
        all_labels += labels
        for label in (0, 1):
            splits = [c["split"] for c in record["cases"] if c["label"] == label]
            if len(splits) >= 3:
                assert splits.count("test") >= 1 and splits.count("train") >= 1
    assert 0.3 <= np.mean(all_labels) <= 0.7


def test_assign_splits_keeps_two_test_cases_per_class() -> None:
    labels = [0] * 6 + [1] * 6
    splits = assign_splits(labels, SynthOptions(), np.random.default_rng(0))
    for label in (0, 1):
        chosen = [s for s, v in zip(splits, labels, strict=True) if v == label]
        assert chosen.count("test") == 2 and chosen.count("val") == 1 and chosen.count("train") == 3


def test_both_layouts_are_discovered_and_validate_clean(consortium) -> None:
    out, sites, truth = consortium
    layouts = []
    for site_dir, record in zip(sites, truth["sites"], strict=True):
        config = load_site_config(record["site_config"])
        index = discover_site(site_dir, config)
        layouts.append(index.layout)
        assert index.problems == {}
        expected = {c["case_id"]: (c["label"], c["split"]) for c in record["cases"]}
        assert {c.case_id: (c.label, c.split) for c in index.cases} == expected
        report = validate_site(site_dir, config)
        assert report.ok and not any(r.warnings for r in report.results)
        if index.layout == "manifest":
            assert all(c.birads in BIRADS_CATEGORIES for c in index.cases)
    assert layouts == ["manifest", "tdsc", "manifest"]


def test_tdsc_site_has_placeholder_spacing_and_toml_gives_the_real_one(consortium) -> None:
    _, sites, truth = consortium
    record = truth["sites"][1]
    case = discover_site(sites[1]).cases[0]
    assert "\\" in (sites[1] / "Train" / "labels.csv").read_text(
        encoding="utf-8"
    )  # backslash paths, as in TDSC
    assert read_volume(case.image).GetSpacing() == (1.0, 1.0, 1.0)
    report = validate_site(sites[1])  # without the site TOML: the placeholder is flagged
    assert report.ok and all(any("placeholder" in w for w in r.warnings) for r in report.results)
    image = read_volume(case.image, site_config=load_site_config(record["site_config"]))
    assert image.GetSpacing() == pytest.approx(tuple(reversed(record["style"]["spacing_mm"])))


def test_flipped_site_reads_back_to_the_generated_canonical_arrays(consortium) -> None:
    _, sites, truth = consortium
    record = truth["sites"][2]
    assert record["style"]["orientation"] == "LPI"
    case = discover_site(sites[2]).cases[0]
    image = read_volume(case.image)
    assert image.GetDirection()[8] == pytest.approx(-1.0)
    style = site_styles(3, seed=11)[2]
    label = record["cases"][0]["label"]
    generated = generate_case(style, label, seed=11, site=2, case=0, options=SMALL)
    assert np.array_equal(sitk.GetArrayFromImage(orient_canonical(image)), generated.image)
    assert np.array_equal(sitk.GetArrayFromImage(orient_canonical(read_volume(case.mask))), generated.mask)


def _posterior_ratio(image: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean grey level just below the lesion (8 voxels deep, under its footprint) over the same depth band
    beside it; < 1 is shadowing, > 1 enhancement; None when the lesion reaches the bottom."""
    box = largest_lesion_box(mask)
    sweep = slice(box.start[0], box.stop[0])
    footprint = mask[sweep].any(axis=1)  # (z, x) columns the lesion covers
    band = image[sweep, box.stop[1] : box.stop[1] + 8, :].astype(float)
    if band.shape[1] == 0:
        return None
    band = band.mean(axis=1)
    return float(band[footprint].mean() / (band[~footprint].mean() + 1.0))


def _measure(label: int, count: int) -> dict[str, float]:
    """Mean lesion geometry/echo statistics of ``count`` generated cases of one class."""
    styles = site_styles(2, seed=5)
    ratios, texture, posterior = [], [], []
    for number in range(count):
        case = generate_case(styles[number % 2], label, seed=5, site=number % 2, case=number, options=SMALL)
        extent = np.asarray(largest_lesion_box(case.mask).extent) * np.asarray(case.spacing_mm)
        ratios.append(extent[1] / extent[2])
        smooth = ndimage.gaussian_filter(case.image.astype(float), 1.5)
        texture.append(smooth[case.mask > 0].std())  # heterogeneity beyond the speckle
        ratio = _posterior_ratio(case.image, case.mask)
        if ratio is not None:
            posterior.append(ratio)
    return {"ratio": np.mean(ratios), "heterogeneity": np.mean(texture), "posterior": np.mean(posterior)}


def test_lesion_geometry_differs_by_class_but_overlaps() -> None:
    benign, malignant = _measure(0, 14), _measure(1, 14)
    assert malignant["ratio"] > benign["ratio"] + 0.1  # taller-than-wide on average
    assert benign["ratio"] < 1.0
    assert malignant["heterogeneity"] > benign["heterogeneity"]
    assert malignant["posterior"] < benign["posterior"]  # shadowing vs enhancement


def test_lesion_volumes_are_log_normal_and_skewed_small_like_seed_000() -> None:
    options = SynthOptions(lesion_median_cm3=1.0)
    rng = np.random.default_rng(0)
    volumes = np.array([_lesion_volume_mm3(options, rng, largest_mm3=20_000.0) for _ in range(3000)]) / 1000
    assert np.median(volumes) == pytest.approx(1.0, rel=0.1)
    assert volumes.mean() > 1.6 * np.median(volumes)  # seed 000: mean 6.99 vs median 3.39 cm³
    assert volumes.min() >= options.lesion_min_ratio and volumes.max() <= 20.0
    assert 0.55 < np.mean(volumes < 1.5) < 0.75  # seed 000: 62 % under 5 cm³ ≈ 1.5 × median


def test_birads_correlates_with_label() -> None:
    style = site_styles(1, seed=2)[0]
    ranks = {0: [], 1: []}
    for number in range(12):
        case = generate_case(style, number % 2, seed=2, site=0, case=number, options=SMALL)
        ranks[case.label].append(BIRADS_CATEGORIES.index(case.birads))
    assert max(ranks[0]) <= BIRADS_CATEGORIES.index("4C") and min(ranks[1]) >= BIRADS_CATEGORIES.index("4A")
    assert np.mean(ranks[1]) > np.mean(ranks[0])


def test_cli_writes_a_consortium(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    command = f"synth --out {tmp_path} --sites 2 --cases 3 --seed 1 --shape 32,40,40"
    args = parser.parse_args(command.split())
    assert args.func(args) == 0
    assert (tmp_path / "site_a" / "manifest.csv").is_file() and (tmp_path / "site_b.toml").is_file()
    assert "site_b" in capsys.readouterr().out
    bad = parser.parse_args(["synth", "--out", str(tmp_path / "x"), "--sites", "0"])
    assert bad.func(bad) == 2


def test_invalid_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        SynthOptions(shape=(8, 8, 8))
    with pytest.raises(ValueError, match="site styles"):
        generate_consortium(tmp_path, sites=2, cases=1, seed=0, styles=site_styles(1, 0))
