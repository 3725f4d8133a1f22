"""The fully automatic segmenter federated for real: `fedabus demo` (a Flower simulation of 2 sites, 2 rounds)
with ``model.seg-model = segresnet``: the whole network travels as the seg adapter, the server selects by
``dice_auto`` and every site reports the automatic metrics, never a click metric."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from shared.adapters import load_adapter
from shared.base import build_random_base, save_base

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AUTO = ("model.seg-model=segresnet", "model.auto-init-filters=4", "model.auto-blocks-down=1,1")


@pytest.mark.timeout(900)
def test_a_federation_trains_and_selects_the_automatic_segmenter(tmp_path):
    base_path = save_base(build_random_base("small", cls_depth=18, seed=0), tmp_path / "base")
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "shared.cli", "demo", "--sites", "2", "--cases", "6", "--rounds", "2"]
    command += ["--local-epochs", "1", "--out", str(out), "--base", str(base_path)]
    for item in AUTO:
        command += ["--set", item]
    result = subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=840
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Dice auto" in result.stdout

    summary = json.loads((out / "server" / "summary.json").read_text(encoding="utf-8"))
    assert summary["rounds_done"] == 2
    assert summary["selection"]["metric"] == "global/val/dice_auto_mean"
    for site in ("site_a", "site_b"):
        assert 0.0 <= summary["after"][site]["test/dice_auto"] <= 1.0
        assert not any("click" in key for key in summary["after"][site])
    chosen = load_adapter(out / "server" / "chosen_adapter")
    seg = [name for name in chosen.tensors if name.startswith("seg.")]
    assert seg and all(name.startswith("seg.net.") for name in seg)

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    for child in children:  # the start and the last round are always evaluated (shared/demo.py)
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val/dice_auto"))
        assert steps[0] == 0 and steps[-1] == 2, (child.info.run_name, steps)  # the demo's eval schedule
