"""`fedabus study` end to end on a 3-site synthetic consortium: the arms (the federated one as a real Flower
simulation), every model tested on every site, the tables, the report, MLflow, and a resume that reuses every
finished arm.

The default run studies zero-shot, local, pooled and federated (one simulation); leave-one-site-out adds three
more simulations, so its real run is opt-in (``pytest -m study``; its orchestration is tested without Flower in
tests/shared/study/test_arms.py)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from shared.base import build_random_base, save_base
from shared.cli import main
from shared.data.synth import generate_consortium

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARMS = ("zero-shot", "local", "pooled", "federated")
ALL_ARMS = (*ARMS, "loso")
CHEAP = ("model.cls-depth=18", "train.seg-epochs=1", "train.cls-epochs=1", "train.eval-clicks=2",
         "train.seg-click-iterations=1")  # fmt: skip


def _study(root: Path, arms: tuple[str, ...]) -> dict:
    folders = generate_consortium(root / "sites", sites=3, cases=10, seed=4)
    base = save_base(build_random_base("small", cls_depth=18, seed=0), root / "base")
    argv = ["study", "--sites", *map(str, folders), "--arms", ",".join(arms), "--base", str(base)]
    argv += ["--rounds", "1", "--out", str(root / "out"), "--device", "cpu"]
    for item in CHEAP:
        argv += ["--set", item]
    return {"root": root, "argv": argv, "sites": [f.name for f in folders], "out": root / "out", "arms": arms}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _study(tmp_path_factory.mktemp("study"), ARMS)


@pytest.mark.timeout(1800)
def test_every_arm_tests_every_model_on_every_site(study: dict, capsys: pytest.CaptureFixture[str]) -> None:
    _check_study(study, capsys)


@pytest.mark.study
@pytest.mark.timeout(2400)
def test_all_five_arms_for_real(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _check_study(_study(tmp_path, ALL_ARMS), capsys)


def _check_study(study: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(study["argv"]) == 0
    printed = capsys.readouterr().out
    assert "Dice@1 [95% CI]" in printed and "report:" in printed
    out = study["out"]
    with (out / "results.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {"arm", "model", "test_site", "metric", "value", "ci_low", "ci_high", "n"} <= set(rows[0])
    models = {"zero-shot", "pooled", "federated", *(f"local:{s}" for s in study["sites"])}
    if "loso" in study["arms"]:
        models |= {f"loso:-{s}" for s in study["sites"]}
    dice = [r for r in rows if r["metric"] == "dice_1click"]
    assert {(r["model"], r["test_site"]) for r in dice} == {(m, s) for m in models for s in study["sites"]}
    for r in dice:
        assert 0.0 <= float(r["value"]) <= 1.0
        internal = r["internal"] == "True"
        if r["model"].startswith("loso:-"):  # the left-out site is the external test of its LOSO model
            assert internal == (r["model"] != f"loso:-{r['test_site']}")
        if r["model"] == "zero-shot":
            assert not internal
    summary = json.loads((out / "study.json").read_text(encoding="utf-8"))
    assert summary["arms"] == list(study["arms"]) and set(summary["site_fingerprints"]) == set(study["sites"])
    assert "validation" in summary["selection_rule"] and summary["comparisons"]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 5 and "Findings" in html
    cases = list(csv.DictReader((out / "cases.csv").open(encoding="utf-8")))
    assert {(c["model"], c["test_site"]) for c in cases} == {(m, s) for m in models for s in study["sites"]}

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent_id = (out / "mlflow_run_id").read_text(encoding="utf-8").strip()
    parent = client.get_run(parent_id)
    nested = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    assert {r.data.tags["fedabus.arm"] for r in nested} == set(study["arms"])
    federated = next(r for r in nested if r.data.tags["fedabus.arm"] == "federated")
    beneath = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{federated.info.run_id}'"
    )
    assert [r.data.tags.get("fedabus.role") for r in beneath] == ["federation"]  # its own runs sit beneath
    value = federated.data.metrics[f"federated/{study['sites'][0]}/dice_1click"]
    assert math.isfinite(value)


@pytest.mark.timeout(600)
def test_an_interrupted_study_reuses_every_finished_arm(
    study: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (study["out"] / "results.csv").read_text(encoding="utf-8")
    jobs = sorted((study["out"] / "jobs").glob("*.json"))
    jobs[-1].unlink()  # the last arm "was interrupted"
    assert main(study["argv"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reused") == len(ARMS) - 1, printed
    assert (study["out"] / "results.csv").read_text(encoding="utf-8").count("\n") == before.count("\n")
