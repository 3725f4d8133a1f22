"""The federation as a real distributed system: a SuperLink and two SuperNodes on 127.0.0.1 with TLS and site
authentication (registered ECDSA keys), driven with ``flwr run`` like a coordinator would.

A consortium is a SuperLink (own port, ``--database`` and FLWR_HOME) and two SuperNodes whose ``--node-config``
names a synthetic site folder; the run config points at a random small base, a temp work-dir and a temp SQLite
MLflow store. ``flwr run`` can exit 0 when the ServerApp failed, so success is judged by the server's
``summary.json``, its checkpoints and MLflow.

Every federated round costs real time here (Flower starts a fresh ClientApp process per message), so one
federation serves two tests: the ``interrupted`` fixture runs a 2-round federation and kills the server once
round 1 is done; the first test checks that complete round, the resume test restarts the server and finishes.
The killed-site test then reuses that consortium (its SuperLink and SuperNodes) and kills one site.

That an unregistered site key is refused is tested in
tests/deployment/test_superlink_tls.py::test_registered_site_joins_and_unregistered_site_is_refused.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from server.checkpoint import CheckpointState, load_latest
from shared.simulation import run_config_overrides
from tests.integration.processes import (
    BIN,
    CONNECTION,
    REPO,
    Consortium,
    Deployment,
    make_consortium,
    start_consortium,
    stop,
    wait_until,
)

pytestmark = [pytest.mark.integration]

SITES = ("site_a", "site_b")
#: One cheap round: one local epoch of each model, two evaluation clicks.
CHEAP_ROUNDS = {
    "train.progress": False,  # explicit: the run config's default is the command line's (bars on)
    "train.seg-epochs": 1,
    "train.cls-epochs": 1,
    "train.eval-clicks": 2,
    "train.seg-click-iterations": 1,
}
#: Every evaluated round is on the validation split; the test split only after the last round (final test).
PARENT_DICE = "global/val/dice_1click_mean"
SITE_METRICS = ("val/dice_1click", "val/auc")
TEST_METRICS = ("test/dice_1click", "test/auc")


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Consortium:
    return make_consortium(tmp_path_factory.mktemp("consortium"), SITES)


@dataclass
class Federation:
    """A running consortium: the SuperLink, one SuperNode per site, and ``flwr run`` launched against it."""

    deployment: Deployment
    consortium: Consortium
    superlink: subprocess.Popen | None = None
    nodes: dict[str, tuple[subprocess.Popen, Path]] = field(default_factory=dict)

    def overrides(self, work: Path, **values: Any) -> dict[str, Any]:
        """Run config of a cheap federation writing to ``work`` and the MLflow store ``<work>-mlflow.db``."""
        return {
            "num-server-rounds": 1,
            "model.base-path": str(self.consortium.base),
            "model.cls-depth": 18,  # the consortium's base (recorded config = the base's manifest)
            "federation.work-dir": str(work),
            "federation.tracking-uri": f"sqlite:///{work.parent / (work.name + '-mlflow.db')}",
            "federation.min-sites": 2,
            "federation.sample-timeout": 300.0,
            "federation.round-timeout": 600.0,
            **CHEAP_ROUNDS,
            **values,
        }

    def start_run(self, overrides: dict[str, Any], log_name: str) -> tuple[subprocess.Popen, Path]:
        argv = [str(BIN / "flwr"), "run", str(REPO), CONNECTION, "--stream", *run_config_overrides(overrides)]
        return self.deployment.start(argv, log_name)

    def start_superlink(self) -> None:
        self.superlink, _ = self.deployment.start_superlink()


@contextmanager
def _running_federation(root: Path, consortium: Consortium) -> Iterator[Federation]:
    """SuperLink up, both sites registered, both SuperNodes activated; everything stopped on exit."""
    deployment = Deployment.create(root, consortium.creds)
    federation = Federation(deployment, consortium)
    try:
        federation.superlink, federation.nodes = start_consortium(deployment, consortium)
        yield federation
    finally:
        deployment.stop_all()


def _finish(run: subprocess.Popen, log: Path, timeout: float) -> str:
    """Wait for ``flwr run`` to exit; return its output (fail with the output's tail after ``timeout`` s)."""
    try:
        run.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(run)
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise AssertionError(f"flwr run did not finish within {timeout} s:\n{tail}") from None
    return log.read_text(encoding="utf-8", errors="replace")


def _rounds_done(work: Path) -> int:
    path = work / "summary.json"  # written atomically after the round's checkpoint
    return json.loads(path.read_text(encoding="utf-8")).get("rounds_done", 0) if path.is_file() else 0


def _summary(work: Path, output: str) -> dict[str, Any]:
    path = work / "summary.json"
    assert path.is_file(), f"the ServerApp wrote no {path}; flwr run output:\n{output[-4000:]}"
    return json.loads(path.read_text(encoding="utf-8"))


def _mlflow(summary: dict[str, Any]):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=summary["tracking_uri"])


def _site_runs(client, parent_id: str) -> dict[str, str]:
    """Site name -> run id of the parent's nested runs (MLflow's ``mlflow.parentRunId`` tag)."""
    parent = client.get_run(parent_id)
    nested = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    return {run.data.tags["fedabus.site"]: run.info.run_id for run in nested}


#: ``{run: {metric: [(step, value), ...]}}`` with run ``federation`` (the parent) or a site name.
Histories = dict[str, dict[str, list[tuple[int, float]]]]


def _histories(summary: dict[str, Any]) -> Histories:
    """Every logged (step, value) of the parent's mean Dice and of each site's Dice and AUC, sorted by step
    (duplicated steps kept, so they show)."""
    client = _mlflow(summary)
    runs = {"federation": (summary["run_id"], (PARENT_DICE,))}
    runs |= {site: (run_id, SITE_METRICS) for site, run_id in _site_runs(client, summary["run_id"]).items()}
    return {
        name: {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}
        for name, (run_id, keys) in runs.items()
    }


def _steps(histories: Histories, run: str, key: str) -> list[int]:
    return [step for step, _ in histories[run][key]]


def _assert_site_metrics(metrics: dict[str, float], where: str, keys: tuple[str, ...] = SITE_METRICS) -> None:
    """Dice in [0, 1]; AUC in [0, 1] or NaN (a 2-case validation split may hold one class only)."""
    for key in keys:
        value = metrics.get(key, math.nan)
        assert 0.0 <= value <= 1.0 or ("auc" in key and math.isnan(value)), f"{where}: {key} = {value}"


@dataclass(frozen=True)
class Interrupted:
    """A 2-round federation whose SuperLink (with its ServerApp) was killed once round 1 was complete, and
    what the server had written by then."""

    federation: Federation
    work: Path
    overrides: dict[str, Any]
    summary: dict[str, Any]
    checkpoint: CheckpointState
    histories: Histories


@pytest.fixture(scope="module")
def interrupted(consortium: Consortium, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Interrupted]:
    root = tmp_path_factory.mktemp("interrupted")
    with _running_federation(root, consortium) as federation:
        work = root / "server"
        overrides = federation.overrides(work, **{"num-server-rounds": 2})
        run, log = federation.start_run(overrides, "flwr-run-1.log")
        wait_until(lambda: _rounds_done(work) >= 1, "round 1 completed", 900, run, log, interval=0.1)
        stop(federation.superlink, crash=True)  # SIGKILL: the SuperLink and its ServerApp die in round 2
        stop(run)
        summary = _summary(work, log.read_text(encoding="utf-8", errors="replace"))
        checkpoint = load_latest(work / "checkpoints")
        assert checkpoint is not None, f"no checkpoint in {work / 'checkpoints'}"
        yield Interrupted(federation, work, overrides, summary, checkpoint, _histories(summary))


@pytest.mark.timeout(1500)
def test_one_federated_round_over_tls_with_authenticated_sites(interrupted: Interrupted) -> None:
    summary = interrupted.summary
    assert summary["rounds_done"] == 1
    for phase in ("start_val", "val"):  # round 0 and round 1 on every site's validation split
        assert sorted(summary[phase]) == list(SITES), phase
        for site in SITES:
            _assert_site_metrics(summary[phase][site], f"summary.json {phase}, {site}")
    assert "after" not in summary  # the test split is touched only after the last round

    histories = interrupted.histories
    assert sorted(histories) == ["federation", *SITES]  # one nested MLflow run per site
    assert _steps(histories, "federation", PARENT_DICE) == [0, 1]
    for site in SITES:
        for key in SITE_METRICS:
            assert _steps(histories, site, key) == [0, 1], (site, key)
            after = dict(histories[site][key])[1]
            assert after == pytest.approx(summary["val"][site][key], nan_ok=True), (site, key)

    checkpoint = interrupted.checkpoint
    assert checkpoint.server_round == 1 and checkpoint.mlflow_run_id == summary["run_id"]
    assert checkpoint.global_adapter.tensors and checkpoint.path.name == "round-0001"


@pytest.mark.timeout(1500)
def test_resume_after_the_server_is_killed(interrupted: Interrupted) -> None:
    federation, work = interrupted.federation, interrupted.work
    latest = work / "checkpoints" / "LATEST"
    assert latest.read_text(encoding="utf-8").strip() == "round-0001"  # nothing was saved after the kill

    federation.start_superlink()  # same port and --database; the SuperNodes reconnect on their own
    run, log = federation.start_run(interrupted.overrides, "flwr-run-2.log")
    output = _finish(run, log, timeout=900)

    summary = _summary(work, output)
    assert "Resuming after round 1" in output
    assert summary["rounds_done"] == 2, output[-4000:]
    assert summary["run_id"] == interrupted.checkpoint.mlflow_run_id
    assert latest.read_text(encoding="utf-8").strip() == "round-0002"
    assert (work / "final_adapter.safetensors").is_file()

    histories = _histories(summary)  # same MLflow run: every step exactly once, the old ones unchanged
    assert sorted(histories) == ["federation", *SITES]
    for run_name, keys in [("federation", (PARENT_DICE,)), *((site, SITE_METRICS) for site in SITES)]:
        for key in keys:
            assert _steps(histories, run_name, key) == [0, 1, 2], (run_name, key)
            assert histories[run_name][key][:2] == interrupted.histories[run_name][key], (run_name, key)
    parent = _mlflow(summary).get_run(summary["run_id"])
    assert parent.data.tags.get("fedabus.resumes") == "1"
    assert parent.info.status == "FINISHED"

    # The final test: the chosen (best by validation), the last and the starting adapter, once each.
    chosen = summary["selection"]["round"]
    assert summary["selection"]["metric"] == PARENT_DICE and summary["after_round"] == chosen
    tested = sorted({chosen, 2, 0})
    assert summary["tested_rounds"] == tested and parent.data.tags["fedabus.tested_rounds"] == ",".join(
        map(str, tested)
    )
    client = _mlflow(summary)
    for role in ("before", "after", "last"):
        assert sorted(summary[role]) == list(SITES), role
        for site in SITES:
            _assert_site_metrics(summary[role][site], f"summary.json {role}, {site}", TEST_METRICS)
    for run_name, run_id in _site_runs(client, summary["run_id"]).items():
        steps = sorted(m.step for m in client.get_metric_history(run_id, "test/dice_1click"))
        assert steps == tested, (run_name, steps)  # tested once per adapter, never per round
    assert (work / "chosen_adapter.safetensors").is_file()


@pytest.mark.timeout(1500)
def test_a_site_killed_mid_round_does_not_hang_the_federation(
    interrupted: Interrupted, tmp_path: Path
) -> None:
    # The consortium of the resume test, so its SuperLink and SuperNodes are not started twice; the SuperLink
    # is up again unless this test runs alone (then it is restarted here and the SuperNodes reconnect).
    federation = interrupted.federation
    if federation.superlink is None or federation.superlink.poll() is not None:
        federation.start_superlink()
    # min-sites 1: round 1 finishes with the surviving site once the SuperLink declares the dead one gone
    # (two missed 30 s heartbeats). The timeouts are generous so that a busy machine cannot close them; the
    # run must still end by itself, without waiting for either.
    work = tmp_path / "one-site-enough"
    timeouts = {
        "federation.round-timeout": 600.0,
        "federation.sample-timeout": 300.0,
        "federation.final-test": False,
    }
    victim, victim_log = federation.nodes["site_b"]
    trains = lambda: victim_log.read_text(encoding="utf-8", errors="replace").count(
        "Receiving: train message"
    )
    earlier = trains()  # the rounds of the resume test
    training = lambda: trains() > earlier
    run, log = federation.start_run(
        federation.overrides(work, **{"federation.min-sites": 1, **timeouts}), "flwr-run-killed-1.log"
    )
    wait_until(training, "site_b receiving its round-1 train message", 900, run, log)
    stop(victim, crash=True)  # the SuperNode and its ClientApp die without a goodbye
    killed = time.monotonic()
    output = _finish(run, log, timeout=900)
    summary = _summary(work, output)
    assert re.search(r"Round 1: site \S+ failed", output), output[-4000:]
    assert "aggregate_train: Received 1 results and 0 failures" in output, output[-4000:]
    assert summary["rounds_done"] == 1
    assert sorted(summary["start_val"]) == list(SITES)
    assert sorted(summary["val"]) == ["site_a"], summary["val"]
    _assert_site_metrics(summary["val"]["site_a"], "round 1, surviving site")
    print(f"\nrun finished {time.monotonic() - killed:.0f} s after site_b was killed")

    # min-sites 2 with site_b gone (offline at the SuperLink since round 1 ended on its failure): the run
    # stops (recorded, no traceback) with a clear message once the sample timeout has passed, whether site_a has answered the
    # handshake by then (admitted) or is still starting its ClientApp (connecting): it alone cannot make 2.
    work = tmp_path / "two-sites-needed"
    timeouts["federation.sample-timeout"] = 20.0
    started = time.monotonic()
    run, log = federation.start_run(
        federation.overrides(work, **{"federation.min-sites": 2, **timeouts}), "flwr-run-killed-2.log"
    )
    output = _finish(run, log, timeout=600)
    stalled = time.monotonic() - started
    found = re.search(
        r"only (\d) site\(s\) admitted after (\d+) s \(1 online, (\d) still answering the handshake\); "
        r"2 needed \(federation.min-sites\)\. Stopping instead of waiting forever\.",
        output,
    )
    assert found, output[-4000:]
    admitted, after, connecting = (int(g) for g in found.groups())
    assert admitted + connecting == 1 and after >= 20
    assert stalled >= 20.0
    assert not (work / "checkpoints" / "LATEST").exists()
    # a recorded stop, like the client-level DP budget's, not an exception
    assert "Traceback" not in output, output[-4000:]
    stopped = _summary(work, output)["stopped"]
    assert stopped["reason"] == "federation-stalled" and stopped["round"] == 1, stopped
    print(f"stalled run (min-sites 2, one site) stopped after {stalled:.0f} s")
