"""The main job end to end: `fedabus demo` runs a Flower simulation and records per-site metrics in MLflow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from shared.base import build_random_base, save_base

pytestmark = [pytest.mark.integration]


def test_demo_simulation_end_to_end(tmp_path):
    base_path = save_base(build_random_base("small", cls_depth=18, seed=0), tmp_path / "base")
    out = tmp_path / "demo"
    command = [
        sys.executable,
        "-m",
        "shared.cli",
        "demo",
        "--sites",
        "2",
        "--cases",
        "6",
        "--rounds",
        "1",
        "--local-epochs",
        "1",
        "--out",
        str(out),
        "--base",
        str(base_path),
        "--set",
        "train.eval-clicks=2",
        "--set",
        "train.seg-click-iterations=1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Dice@1" in result.stdout and "mlflow ui --backend-store-uri" in result.stdout

    summary = json.loads((out / "server" / "summary.json").read_text(encoding="utf-8"))
    assert summary["rounds_done"] == 1
    assert set(summary["before"]) == set(summary["after"]) == {"site_a", "site_b"}
    assert (out / "server" / "final_adapter.safetensors").is_file()
    assert (out / "server" / "checkpoints" / "LATEST").is_file()

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    for child in children:
        for metric in ("test/dice_1click", "test/auc"):
            steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, metric))
            assert steps == [0, 1], (child.info.run_name, metric, steps)
