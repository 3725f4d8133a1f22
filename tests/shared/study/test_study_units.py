"""The study's parts without training: result rows and the site x model matrix, paired comparisons, fold
sites written for Flower, and bad site folders refused before anything trains."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from shared.config import load_config
from shared.data.synth import generate_consortium
from shared.metric_names import OVERLAP_NAMES
from shared.study.arms import arm_kind
from shared.study.evaluation import compare_arms, result_rows
from shared.study.runner import load_study_config
from shared.study.sites import StudyError, fold_site, open_study_sites, write_fold_sites
from shared.training.site import open_site

SITES = ("site_a", "site_b", "site_c")


def _cases(model: str, arm: str, site: str, fold, shift: float, n: int = 24, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    rows = []
    for i in range(n):
        dice = float(np.clip(0.5 + shift + rng.normal(0, 0.05), 0, 1))
        rows.append(
            {
                "arm": arm, "model": model, "fold": fold, "repeat": 0, "test_site": site, "case_id": f"{site}-{fold}-{i}",
                "label": int(labels[i]), "prob": float(np.clip(0.5 + (labels[i] - 0.5) * (0.4 + shift) + rng.normal(0, 0.2), 0, 1)),
                "prob_gt": 0.5, "dice_curve": [dice, dice + 0.01], "hd95_mm": 5.0 - 10 * shift, "birads": "4A",
                "volume_bin": "0-1", "iou_1click": dice / (2 - dice), "iou": (dice + 0.01) / (1.99 - dice),
                "seg_precision_1click": 0.9, "seg_precision": 0.9, "seg_recall_1click": dice, "seg_recall": dice,
            }
        )  # fmt: skip
        rows[-1]["pred"] = int(rows[-1]["prob"] > 0.5)
    return rows


def _seed(site: str, fold) -> int:
    """A seed per (site, fold) that is the same in every process (``hash`` of a str is salted per process)."""
    return zlib.crc32(f"{site}/{fold}".encode()) % 100


def _study_cases(folds=(0,)) -> list[dict]:
    cases = []
    for fold in folds:
        for site in SITES:
            cases += _cases("federated", "federated", site, fold, 0.10, seed=_seed(site, fold))
            for local in SITES:
                cases += _cases(
                    f"local:{local}",
                    "local",
                    site,
                    fold,
                    0.0 if local != site else 0.05,
                    seed=_seed(site, fold),
                )
    return cases


def test_the_matrix_has_every_model_at_every_site_with_internal_cells_marked():
    trained_on = {"federated": set(SITES), **{f"local:{s}": {s} for s in SITES}}
    rows = result_rows(_study_cases(), trained_on, n_boot=200)
    cells = {(r["model"], r["test_site"]) for r in rows if r["metric"] == "dice_1click"}
    assert cells == {(m, s) for m in trained_on for s in SITES}
    internal = {(r["model"], r["test_site"]) for r in rows if r["internal"] and r["metric"] == "dice_1click"}
    assert internal == {("federated", s) for s in SITES} | {(f"local:{s}", s) for s in SITES}
    metrics = {r["metric"] for r in rows}
    assert {"dice_1click", "dice_2click", "dice", "hd95_mm", "auc", "sensitivity", "specificity", "ppv", "npv",
            "f1", "accuracy", "brier", "ece", "iou_1click", "iou", "seg_precision_1click", "seg_precision",
            "seg_recall_1click", "seg_recall"} <= metrics  # fmt: skip
    for r in rows:
        if (
            math.isfinite(r["value"])
            and math.isfinite(r["ci_low"])
            and "biased on resamples" not in r["note"]
        ):
            assert r["ci_low"] <= r["value"] <= r["ci_high"], r


def test_folds_give_pooled_rows_with_the_mean_and_sd_over_folds():
    rows = result_rows(_study_cases(folds=(0, 1, 2)), {"federated": set(SITES)}, n_boot=200)
    pooled = [
        r for r in rows if r["fold"] == "all" and r["model"] == "federated" and r["metric"] == "dice_1click"
    ]
    assert len(pooled) == len(SITES)
    for row in pooled:
        per_fold = [r["value"] for r in rows if r["fold"] != "all" and r["model"] == "federated"
                    and r["metric"] == "dice_1click" and r["test_site"] == row["test_site"]]  # fmt: skip
        assert row["n"] == 3 * 24 and row["fold_mean"] == pytest.approx(np.mean(per_fold))
        assert row["fold_sd"] == pytest.approx(np.std(per_fold, ddof=1))


def test_comparisons_pair_federated_with_each_sites_own_local_model():
    rows = compare_arms(_study_cases(), "federated", n_boot=400)
    dice = [r for r in rows if r["metric"] == "dice_1click"]
    assert {(r["test_site"], r["model_b"]) for r in dice} == {(s, f"local:{s}") for s in SITES}
    for row in dice:  # federated is 0.05 better than the internal local model at every site
        assert row["diff"] == pytest.approx(0.05, abs=0.02) and row["ci_low"] > 0 and row["p_value"] < 0.05
    assert {r["metric"] for r in rows} == {"dice_1click", "hd95_mm", "auc", "accuracy"}
    cases = {(c["model"], c["case_id"]): c for c in _study_cases()}
    for row in (r for r in rows if r["metric"] == "accuracy"):  # McNemar at each arm's threshold
        ids = [i for m, i in cases if m == "federated" and i.startswith(row["test_site"])]
        right = {
            m: [cases[(m, i)]["pred"] == cases[(m, i)]["label"] for i in ids]
            for m in ("federated", row["model_b"])
        }
        pairs = list(zip(right["federated"], right[row["model_b"]], strict=True))
        assert (row["only_a"], row["only_b"]) == (pairs.count((True, False)), pairs.count((False, True)))
        assert row["method"].startswith(("exact McNemar", "McNemar chi-square")) and 0 <= row["p_value"] <= 1
    assert all(r["only_a"] is None for r in rows if r["metric"] != "accuracy")


def test_variants_are_compared_with_the_plain_arm_model_for_model():
    cases = _study_cases()
    for site in SITES:
        cases += _cases("federated@product", "federated@product", site, 0, 0.05, seed=_seed(site, 0))
        for local in SITES:
            shift = -0.05 if local != site else 0.0
            cases += _cases(f"local@dora:{local}", "local@dora", site, 0, shift, seed=_seed(site, 0))
    rows = [r for r in compare_arms(cases, "federated", n_boot=200) if r["metric"] == "dice_1click"]
    pairs = {(r["test_site"], r["model_b"]) for r in rows}
    assert pairs == {(s, m) for s in SITES for m in (f"local:{s}", f"local@dora:{s}", "federated@product")}
    for row in rows:
        if row["model_b"] == "federated@product":
            assert row["diff"] == pytest.approx(0.05, abs=0.02)


def test_arm_variants_take_their_own_config_and_bad_names_are_refused():
    arms = ["federated", "federated@product", "local@dora"]
    sets = {"federated@product:federation.lora-aggregation": "product", "local@dora:adapter.method": "dora",
            "train.seed": 3}  # fmt: skip
    config, per_arm = load_study_config(None, sets, arms)
    assert config.federation.lora_aggregation == "naive" and config.adapter.method == "lora"
    assert per_arm["federated@product"].federation.lora_aggregation == "product"
    assert per_arm["local@dora"].adapter.method == "dora" and per_arm["local@dora"].train.seed == 3
    assert [arm_kind(a) for a in arms] == ["federated", "federated", "local"]
    for bad in ("federal", "federated@", "federated@Product", "federated@a b", "@x"):
        with pytest.raises(StudyError, match="unknown arm"):
            arm_kind(bad)
    with pytest.raises(StudyError, match="--set locl@x:train.seed=...: unknown arm 'locl@x'"):
        load_study_config(None, {"locl@x:train.seed": 1}, arms)


def test_bad_site_folders_are_all_named_before_anything_trains(tmp_path: Path):
    folders = generate_consortium(tmp_path / "sites", sites=2, cases=8, seed=1)
    config = load_config({"model.cls-depth": 18})
    with pytest.raises(StudyError) as error:
        open_study_sites(
            [folders[0], tmp_path / "missing", tmp_path / "sites" / "consortium.json"], [], config
        )
    message = str(error.value)
    assert "missing: not a folder" in message and "consortium.json: not a folder" in message
    twin = tmp_path / "twin.toml"
    twin.write_text('[site]\nname = "site_a"\n', encoding="utf-8")
    with pytest.raises(StudyError, match="several site folders are named"):
        open_study_sites(folders, [twin, twin], config)


def test_a_fold_written_for_flower_reads_back_as_the_same_splits(tmp_path: Path):
    folders = generate_consortium(tmp_path / "sites", sites=2, cases=10, seed=1)
    config = load_config({"model.cls-depth": 18})
    sites = open_study_sites(folders, [], config)
    views = [fold_site(site, 1, 3, config, seed=0) for site in sites]
    root = write_fold_sites(tmp_path / "fold", sites, views, [s.name for s in sites])
    for site, view in zip(sites, views, strict=True):
        back = open_site(root / site.site_dir.name)
        for split in ("train", "val", "test"):
            assert sorted(c.case_id for c in back.cases(split)) == sorted(
                c.case_id for c in view.cases(split)
            ), split
        assert back.name == site.name


def test_case_rows_carry_the_overlaps_and_the_call_at_the_arms_threshold(monkeypatch):
    from types import SimpleNamespace

    from shared.study import evaluation

    overlaps = {name: 0.5 for name in OVERLAP_NAMES}
    seg_case = {"case_id": "c1", "label": 1, "dice_curve": [0.6, 0.7], "hd95_mm": 3.0, "birads": "4A",
                "volume_bin": "0-5", **overlaps}  # fmt: skip
    calls = [
        {"case_id": "c1", "source": "pred", "label": 1, "probability": 0.4, "predicted_malignant": False},
        {"case_id": "c1", "source": "gt", "label": 1, "probability": 0.9, "predicted_malignant": True},
    ]

    def fake_evaluate_site(models, site, config, *, device, split, details):
        details.update(segmentation={"cases": [seg_case]}, classification=calls)

    monkeypatch.setattr(evaluation, "evaluate_site", fake_evaluate_site)
    site = SimpleNamespace(name="site_a")
    (row,) = evaluation.test_on_sites({}, [site], None, device=None, tags={"arm": "local"})
    assert row["pred"] == 0 and row["prob"] == 0.4 and row["prob_gt"] == 0.9  # the end-to-end call
    assert {name: row[name] for name in OVERLAP_NAMES} == overlaps
