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
        "10",
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
    result = subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Dice@1" in result.stdout and "mlflow ui --backend-store-uri" in result.stdout

    summary = json.loads((out / "server" / "summary.json").read_text(encoding="utf-8"))
    assert summary["rounds_done"] == 1
    assert set(summary["before"]) == set(summary["after"]) == set(summary["last"]) == {"site_a", "site_b"}
    assert summary["selection"]["metric"] == "global/val/dice_1click_mean"
    assert summary["after_round"] == summary["selection"]["round"] in (0, 1)
    assert summary["tested_rounds"] == [0, 1]
    assert (out / "server" / "final_adapter.safetensors").is_file()
    assert (out / "server" / "chosen_adapter.safetensors").is_file()
    assert (out / "server" / "checkpoints" / "LATEST").is_file()

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    for child in children:  # validation every round; the test split once per tested adapter
        for metric in ("val/dice_1click", "val/auc", "test/dice_1click", "test/auc"):
            steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, metric))
            assert steps == [0, 1], (child.info.run_name, metric, steps)


def test_sample_level_dp_sites_stop_at_their_budget_and_the_run_goes_on(tmp_path):
    """Two DP rounds where the budget admits only the first: round 2 is declined by both sites, the run still
    finishes, and each site's ledger and MLflow run hold the ε of round 1."""
    from shared.config import load_config
    from shared.data.synth import generate_consortium
    from shared.demo import demo_synth_options
    from shared.privacy.ledger import PrivacyLedger
    from shared.privacy.planning import plan_private_round
    from shared.training.site import open_site

    sets = {"privacy.sample-dp": "true", "privacy.noise-multiplier": "1.0", "train.seg-click-iterations": "1"}
    sets |= {"train.eval-clicks": "2", "train.seg-epochs": "1", "train.cls-epochs": "1"}
    # The demo regenerates this consortium (same seed); the probe gives each site's training cases n.
    probe = generate_consortium(tmp_path / "probe", sites=2, cases=6, seed=0, options=demo_synth_options())
    config = load_config(sets)
    epsilons = []
    for site_dir in probe:
        ledger = PrivacyLedger.open(tmp_path / "probe-state" / site_dir.name)
        plan = plan_private_round(config, len(open_site(site_dir).train_cases), 2, ledger)
        one_round = max(p.epsilon_after for p in plan.models.values())
        for model, model_plan in plan.models.items():  # round 1 spent, as the site will record it
            kwargs = {"sample_rate": model_plan.sample_rate, "steps": model_plan.steps}
            ledger.record(model, noise_multiplier=1.0, accountant="rdp", **kwargs)
        two_rounds = max(
            ledger.epsilon_after(
                m, noise_multiplier=1.0, sample_rate=p.sample_rate, steps=p.steps, delta=plan.delta
            )
            for m, p in plan.models.items()
        )
        epsilons.append((one_round, two_rounds))
    budget = (max(e[0] for e in epsilons) + min(e[1] for e in epsilons)) / 2
    assert all(one < budget < two for one, two in epsilons), epsilons

    base_path = save_base(build_random_base("small", cls_depth=18, seed=0), tmp_path / "base")
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "shared.cli", "demo", "--sites", "2", "--cases", "6", "--rounds", "2"]
    command += ["--local-epochs", "1", "--out", str(out), "--base", str(base_path)]
    for key, value in {**sets, "privacy.epsilon-budget": repr(budget)}.items():
        command += ["--set", f"{key}={value}"]
    result = subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "stops training at its privacy budget" in output, output[-4000:]

    summary = json.loads((out / "server" / "summary.json").read_text(encoding="utf-8"))
    assert summary["rounds_done"] == 2
    for site in ("site_a", "site_b"):
        spent = summary["train"][site]
        assert spent["num-examples"] == 0.0  # declined in round 2
        assert 0 < spent["privacy/seg_epsilon"] <= budget and 0 < spent["privacy/cls_epsilon"] <= budget
        ledger = json.loads((out / "site-state" / site / "privacy_ledger.json").read_text(encoding="utf-8"))
        assert [len(ledger["models"][m]) for m in ("seg", "cls")] == [1, 1]  # only round 1 was spent

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    for child in children:
        history = client.get_metric_history(child.info.run_id, "privacy/seg_epsilon")
        assert sorted(m.step for m in history) == [1, 2], child.info.run_name


def test_client_level_dp_runs_end_to_end_and_logs_the_run_epsilon(tmp_path):
    base_path = save_base(build_random_base("small", cls_depth=18, seed=0), tmp_path / "base")
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "shared.cli", "demo", "--sites", "2", "--cases", "6", "--rounds", "2"]
    command += ["--local-epochs", "1", "--eval-every", "2", "--out", str(out), "--base", str(base_path)]
    sets = {
        "privacy.client-dp": '"client-fixed"',
        "privacy.client-clip-norm": "5.0",
        "privacy.client-noise-multiplier": "1.0",
        "train.seg-click-iterations": "1",
        "train.eval-clicks": "2",
    }
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    result = subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "client-level DP: ε" in result.stdout

    summary = json.loads((out / "server" / "summary.json").read_text(encoding="utf-8"))
    epsilon = summary["client_privacy"]["privacy/client_epsilon"]
    assert 0 < epsilon < float("inf")
    client = MlflowClient(summary["tracking_uri"])
    history = client.get_metric_history(summary["run_id"], "privacy/client_epsilon")
    by_round = {m.step: m.value for m in history}
    assert sorted(by_round) == [1, 2] and by_round[1] < by_round[2] == pytest.approx(epsilon)
