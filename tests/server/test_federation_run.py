"""FederationRun wiring on a tiny base, without sites, MLflow or Flower's loop: fresh start, then resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from server.checkpoint import CheckpointError, IncompatibleCheckpointError, ServerCheckpoint
from server.federation_run import CLIENT_PRIVACY_JOURNAL, FederationRun, record_refused_start
from server.privacy import ClientPrivacyBudgetSpent
from server.privacy_accountant import ClientPrivacyJournalError
from server.strategies import FederationStalled
from shared.base import build_random_base, save_base
from shared.config import load_run_config


class NoSites:
    """A grid nobody is connected to; nothing in these runs may send a message."""

    def get_node_ids(self) -> list[int]:
        return []


@pytest.fixture
def run_config(tmp_path, fake_tracker) -> dict[str, object]:
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


STOPS = {
    "client-privacy-budget": (
        CLIENT_DP,
        ClientPrivacyBudgetSpent(
            server_round=1, epsilon_spent=0.0, epsilon_after=6.0, budget=5.0, delta=1e-5
        ),
    ),
    "federation-stalled": (
        {},
        FederationStalled(
            "Round 1 stopped: only 1 site(s) admitted", server_round=1, admitted=1, online=1, needed=2
        ),
    ),
}


@pytest.mark.parametrize("reason", sorted(STOPS))
def test_a_run_stopped_before_a_round_is_recorded_and_ends_normally(
    run_config, tmp_path, monkeypatch, reason
):
    settings, stop = STOPS[reason]
    run = prepare({**run_config, **settings}, num_rounds=3)

    def start(**_):
        raise stop

    monkeypatch.setattr(run.strategy, "start", start)
    run.run()
    summary = json.loads((tmp_path / "work" / "summary.json").read_text(encoding="utf-8"))
    assert summary["stopped"]["reason"] == reason and summary["stopped"]["round"] == 1
    assert summary["stopped"]["message"] == str(stop)
    assert run.tracker.stops == [reason] and run.tracker.finished == 1
    assert (tmp_path / "work" / "final_adapter.safetensors").is_file()


def _two_rounds_checkpointed(run_config, tmp_path) -> tuple[FederationRun, Path]:
    """A fresh run's two checkpoints (rounds 1 and 2, MLflow holding rounds 0..2); returns it and the folder."""
    fresh = prepare(run_config, num_rounds=0)
    folder = tmp_path / "work" / "checkpoints"
    for r in (1, 2):
        ServerCheckpoint(folder).save(
            server_round=r,
            global_adapter=fresh.round_end.global_adapter,
            config=fresh.round_end.flat_config,
            mlflow_run_id=fresh.tracker.run_id,
        )
    fresh.tracker.logged = [0, 1, 2]
    (tmp_path / "work" / "summary.json").write_text(json.dumps({"rounds_done": 2}), encoding="utf-8")
    return fresh, folder


def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one_and_reruns_its_rounds(
    run_config, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="flwr")
    fresh, folder = _two_rounds_checkpointed(run_config, tmp_path)
    damaged = folder / "round-0002" / "global.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a disk that damaged a finished file
    resumed = prepare(run_config, num_rounds=3)
    assert resumed.strategy.rounds.done_before == 1 and resumed.strategy.rounds.remaining(3) == 2
    assert f"Checkpoint {folder / 'round-0002'} is damaged" in caplog.text and str(damaged) in caplog.text
    assert "Falling back to the previous good checkpoint: resuming after round 1" in caplog.text
    assert "Resuming after round 1" in caplog.text
    assert resumed.tracker.rerun == [2]  # MLflow keeps round 2's first attempt: no duplicated step
    fallback = resumed.round_end.summary["checkpoint_fallbacks"]
    assert (
        fallback[0]["resumed_after_round"] == 1
        and str(damaged) in fallback[0]["damaged"][str(folder / "round-0002")]
    )
    assert (folder / "LATEST").read_text().strip() == "round-0001"
    assert sorted(p.name[:19] for p in folder.iterdir()) == ["LATEST", "damaged-round-0002-", "round-0001"]


def test_no_usable_checkpoint_stops_with_a_message_instead_of_a_traceback(run_config, tmp_path, caplog):
    _, folder = _two_rounds_checkpointed(run_config, tmp_path)
    for r in (1, 2):
        (folder / f"round-000{r}" / "state.json").write_text("{", encoding="utf-8")
    config = load_run_config(run_config)
    with pytest.raises(CheckpointError) as refused:
        FederationRun.prepare(NoSites(), config, num_rounds=3)
    record_refused_start(config, refused.value)
    summary = json.loads((tmp_path / "work" / "summary.json").read_text(encoding="utf-8"))
    assert summary["stopped"]["reason"] == "checkpoint-unusable" and summary["rounds_done"] == 2
    assert str(folder / "round-0002" / "state.json") in summary["stopped"]["message"]
    assert "Not starting: cannot resume from" in caplog.text


def test_a_checkpoint_without_a_newer_config_key_resumes_when_the_key_is_at_its_default(
    run_config, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="flwr")
    fresh = prepare(run_config, num_rounds=0)
    old_config = {k: v for k, v in fresh.round_end.flat_config.items() if k != "federation.max-update-norm"}
    ServerCheckpoint(tmp_path / "work" / "checkpoints").save(
        server_round=1,
        global_adapter=fresh.round_end.global_adapter,
        config=old_config,
        mlflow_run_id="run-0",
    )
    assert prepare(run_config, num_rounds=2).strategy.rounds.done_before == 1
    assert "federation.max-update-norm is not in the checkpoint; accepted" in caplog.text
    with pytest.raises(
        IncompatibleCheckpointError, match=r"federation.max-update-norm: checkpoint \(absent\), now 3.0"
    ):
        prepare({**run_config, "federation.max-update-norm": 3.0}, num_rounds=2)


def test_resume_with_client_dp_releases_but_no_journal_is_refused_before_mlflow(
    run_config, tmp_path, monkeypatch, fake_tracker
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

    monkeypatch.setattr(fake_tracker, "resume", reopen)
    with pytest.raises(ClientPrivacyJournalError, match=str(work / CLIENT_PRIVACY_JOURNAL)):
        prepare(config, num_rounds=2)
