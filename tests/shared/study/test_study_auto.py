"""A study arm with the fully automatic segmenter (``local@auto`` with ``model.seg-model = segresnet``): its
rows carry the ``*_auto`` metrics with the same statistics, never click metrics, and it sits in the same
matrix, report and comparisons as the click-prompted arms."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from shared.base import build_random_base, save_base
from shared.cli import main
from shared.data.synth import generate_consortium
from shared.metric_names import AUTO_NAMES
from shared.study.evaluation import compare_arms, result_rows
from tests.shared.study.test_study_units import _cases

SITES = ("site_a", "site_b")
#: The 2D arms at tiny widths of the same architectures, on 32-pixel frames of lesion slices only.
SLICE_ARMS = {
    "local@unet2d": {"model.seg-model": "dynunet2d", "model.auto-init-filters": 2, "model.dynunet-levels": 3},
    "local@u2net": {"model.seg-model": "u2net-lite", "model.auto-init-filters": 2},
}
for _keys in SLICE_ARMS.values():
    _keys.update({"data.slice-size": 32, "data.slice-negative-fraction": 0, "train.seg-batch-size": 8})


def _auto_cases(model: str, arm: str, site: str, shift: float, seed: int = 0) -> list[dict]:
    """The rows test_on_sites writes for an automatic segmenter: no click curve, the ``*_auto`` values."""
    rows = []
    for row in _cases(model, arm, site, 0, shift, seed=seed):
        dice = row["dice_curve"][0]
        for key in ("dice_curve", "hd95_mm", "iou_1click", "iou", "seg_precision_1click", "seg_precision",
                    "seg_recall_1click", "seg_recall"):  # fmt: skip
            row.pop(key)
        values = (dice, dice / (2 - dice), 0.8, dice, 8.0 - 10 * shift)
        rows.append({**row, "dice_curve": [], **dict(zip(AUTO_NAMES, values, strict=True))})
    return rows


def test_an_automatic_arm_gets_auto_rows_with_cis_and_is_compared_on_its_own_metrics():
    cases = []
    for site in SITES:
        cases += _cases(f"local:{site}", "local", site, 0, 0.1, seed=1)
        cases += _auto_cases(f"local@auto:{site}", "local@auto", site, -0.2, seed=1)
        cases += _auto_cases(f"local@auto2:{site}", "local@auto2", site, -0.1, seed=1)
    rows = result_rows(cases, {}, n_boot=200)
    auto = {r["metric"] for r in rows if r["arm"] == "local@auto"}
    assert set(AUTO_NAMES) <= auto and "auc" in auto and not any("click" in m for m in auto)
    assert "dice_auto" not in {r["metric"] for r in rows if r["arm"] == "local"}
    dice = next(r for r in rows if r["arm"] == "local@auto" and r["metric"] == "dice_auto")
    assert dice["ci_low"] < dice["value"] < dice["ci_high"] and dice["n"] == 24
    assert dice["value"] == pytest.approx(np.mean([c["dice_auto"] for c in cases if c["model"] == dice["model"]
                                                   and c["test_site"] == dice["test_site"]]))  # fmt: skip

    compared = compare_arms(cases, reference="local@auto", n_boot=200)
    against_click = {r["metric"] for r in compared if r["arm_b"] == "local"}
    assert against_click == {"auc", "accuracy"}  # different segmentation tasks: no paired Dice test
    against_auto = {r["metric"]: r for r in compared if r["arm_b"] == "local@auto2"}
    assert {"dice_auto", "hd95_mm_auto"} <= set(against_auto)
    assert against_auto["dice_auto"]["diff"] == pytest.approx(-0.1, abs=0.03)


@pytest.mark.slow
@pytest.mark.timeout(2700)  # four arms; on a loaded 2-core machine the SAM arm alone took 20 min
def test_a_study_trains_and_reports_sam_and_the_automatic_segmenter_side_by_side(tmp_path, capsys):
    folders = generate_consortium(tmp_path / "sites", sites=2, cases=6, seed=4)
    base = save_base(build_random_base("small", cls_depth=18, seed=0), tmp_path / "base")
    out = tmp_path / "out"
    arms = ("local", "local@auto", *SLICE_ARMS)
    argv = ["study", "--sites", *map(str, folders), "--arms", ",".join(arms), "--base", str(base)]
    argv += ["--rounds", "1", "--out", str(out), "--device", "cpu"]
    for item in ("model.cls-depth=18", "train.seg-epochs=1", "train.cls-epochs=1", "train.eval-clicks=2",
                 "train.seg-click-iterations=1", "local@auto:model.seg-model=segresnet",
                 "local@auto:model.auto-init-filters=4", "local@auto:model.auto-blocks-down=1,1",
                 *(f"{arm}:{key}={value}" for arm, keys in SLICE_ARMS.items() for key, value in keys.items()),
                 ):  # fmt: skip
        argv += ["--set", item]
    assert main(argv) == 0
    assert "(auto)" in capsys.readouterr().out
    with (out / "results.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    by_arm = {arm: {r["metric"] for r in rows if r["arm"] == arm} for arm in arms}
    assert "dice_1click" in by_arm["local"] and "dice_auto" not in by_arm["local"]
    for arm in arms[1:]:  # the 3D and the two 2D automatic segmenters: the same whole-volume metrics
        assert {*AUTO_NAMES, "auc"} <= by_arm[arm]
        assert not any("click" in m for m in by_arm[arm])
    models = {r["model"] for r in rows if r["metric"] == "dice_auto"}
    assert models == {f"{arm}:{s}" for arm in arms[1:] for s in ("site_a", "site_b")}
    summary = json.loads((out / "study.json").read_text(encoding="utf-8"))
    assert summary["arms"] == list(arms)
    for arm, kind in (("local@unet2d", "dynunet2d"), ("local@u2net", "u2net-lite")):
        (manifest,) = out.rglob(f"{arm}_site_a.json")  # the adapter of that model
        assert json.loads(manifest.read_text(encoding="utf-8"))["peft"]["seg"]["segmenter"] == kind
    assert "Dice (auto)" in (out / "report.html").read_text(encoding="utf-8")  # in the same matrix


def test_a_variant_arms_results_get_mlflow_metric_names_mlflow_accepts():
    from mlflow.utils.validation import _validate_metric_name

    from shared.study.runner import _mlflow_name

    name = _mlflow_name("local@auto:site_a/site_b/dice_auto")
    assert name == "local-auto.site_a/site_b/dice_auto"
    _validate_metric_name(name)  # raises on '@', which the study wrote before
