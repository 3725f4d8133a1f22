"""FederationRun wiring on a tiny base, without sites, MLflow or Flower's loop: fresh start, then resume."""

from __future__ import annotations

import json

import pytest

from server import federation_run
from server.checkpoint import ServerCheckpoint
from server.federation_run import CLIENT_PRIVACY_JOURNAL, FederationRun
from server.privacy import ClientPrivacyBudgetSpent
from server.privacy_accountant import ClientPrivacyJournalError
from shared.base import build_random_base, save_base
from shared.config import load_run_config


class NoSites:
    """A grid nobody is connected to; nothing in these runs may send a message."""

    def get_node_ids(self) -> list[int]:
        return []


class FakeTracker:
    """Stands for MLflow (a migrated SQLite store takes many seconds to create): one run, resumable by id."""

    runs: dict[str, FakeTracker] = {}

    def __init__(self, run_id: str) -> None:
        self.run_id, self.finished, self.logged, self.stops = run_id, 0, [], []

    @classmethod
    def start(cls, **_) -> FakeTracker:
        tracker = cls(f"run-{len(cls.runs)}")
        cls.runs[tracker.run_id] = tracker
        return tracker

    @classmethod
    def resume(cls, run_id: str, **_) -> FakeTracker:
        return cls.runs[run_id]

    def log_round(self, report) -> None:
        self.logged.append(report.server_round)

    def finish(self, **_) -> None:
        self.finished += 1

    def log_stop(self, stop) -> None:
        self.stops.append(stop["reason"])

    def describe_location(self) -> str:
        return f"fake run {self.run_id}"


@pytest.fixture
def run_config(tmp_path, monkeypatch) -> dict[str, object]:
    monkeypatch.setattr(FakeTracker, "runs", {})
    monkeypatch.setattr(federation_run, "FederationTracker", FakeTracker)
    base = save_base(build_random_base("small", cls_depth=18, seed=0), tmp_path / "base")
    return {
        "model.base-path": str(base),
        "federation.work-dir": str(tmp_path / "work"),
        "federation.final-test": False,
    }


def prepare(run_config: dict[str, object], num_rounds: int) -> FederationRun:
    return FederationRun.prepare(NoSites(), load_run_config(run_config), num_rounds=num_rounds)


def test_a_resumed_run_continues_the_checkpoints_numbering_and_saves_both_adapters(run_config, tmp_path):
    fresh = prepare(run_config, num_rounds=0)
    assert not fresh.strategy.rounds.resumed
    fresh.run()  # nothing to train; closes the MLflow run and saves the starting adapter twice
    work = tmp_path / "work"
    assert (work / "final_adapter.safetensors").is_file() and (work / "chosen_adapter.safetensors").is_file()

    # As if the first process had completed two rounds before it stopped.
    ServerCheckpoint(work / "checkpoints").save(
        server_round=2,
        global_adapter=fresh.round_end.global_adapter,
        config=fresh.round_end.flat_config,
        mlflow_run_id=fresh.tracker.run_id,
    )
    (work / "summary.json").write_text(json.dumps({"rounds_done": 2}), encoding="utf-8")
    resumed = prepare(run_config, num_rounds=2)
    assert resumed.strategy.rounds.done_before == 2 and resumed.strategy.rounds.remaining(2) == 0
    assert resumed.tracker is fresh.tracker
    assert resumed.round_end.summary == {"rounds_done": 2}
    resumed.run()
    assert fresh.tracker.finished == 2


CLIENT_DP = {"privacy.client-dp": "server-fixed", "privacy.client-epsilon-budget": 5.0}


def test_a_run_stopped_at_the_client_dp_budget_is_recorded_and_ends_normally(
    run_config, tmp_path, monkeypatch
):
    run = prepare({**run_config, **CLIENT_DP}, num_rounds=3)
    stop = ClientPrivacyBudgetSpent(
        server_round=1, epsilon_spent=0.0, epsilon_after=6.0, budget=5.0, delta=1e-5
    )

    def start(**_):
        raise stop

    monkeypatch.setattr(run.strategy, "start", start)
    run.run()
    summary = json.loads((tmp_path / "work" / "summary.json").read_text(encoding="utf-8"))
    assert summary["stopped"]["reason"] == "client-privacy-budget" and summary["stopped"]["round"] == 1
    assert run.tracker.stops == ["client-privacy-budget"] and run.tracker.finished == 1
    assert (tmp_path / "work" / "final_adapter.safetensors").is_file()


def test_resume_with_client_dp_releases_but_no_journal_is_refused_before_mlflow(
    run_config, tmp_path, monkeypatch
):
    config = {**run_config, **CLIENT_DP}
    fresh = prepare(config, num_rounds=0)
    work = tmp_path / "work"
    ServerCheckpoint(work / "checkpoints").save(
        server_round=1,
        global_adapter=fresh.round_end.global_adapter,
        config=fresh.round_end.flat_config,
        strategy_state={**fresh.strategy.get_state(), "client-dp/ledger": [[1.0, 1.0]]},
        mlflow_run_id=fresh.tracker.run_id,
    )
    assert not (work / CLIENT_PRIVACY_JOURNAL).exists()

    def reopen(*_, **__):
        raise AssertionError("the MLflow run must not be reopened")

    monkeypatch.setattr(FakeTracker, "resume", reopen)
    with pytest.raises(ClientPrivacyJournalError, match=str(work / CLIENT_PRIVACY_JOURNAL)):
        prepare(config, num_rounds=2)
