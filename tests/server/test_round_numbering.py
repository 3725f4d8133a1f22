"""Flower's round number -> the federation's, in one place (no processes, no MLflow)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord

from server.round_end import RoundEnd
from server.round_numbering import RoundNumbering
from shared.adapters import Adapter
from shared.protocol import adapter_to_record


def test_a_fresh_run_keeps_flowers_numbers():
    fresh = RoundNumbering()
    assert not fresh.resumed
    assert [fresh.federation(r) for r in (0, 1, 5)] == [0, 1, 5]
    assert fresh.remaining(5) == 5


def test_a_resumed_run_continues_after_the_checkpointed_round():
    resumed = RoundNumbering(done_before=3)
    assert resumed.resumed
    assert resumed.federation(1) == 4
    assert resumed.remaining(5) == 2
    assert resumed.remaining(2) == 0  # num-server-rounds lowered below what is done: nothing to train


def test_a_negative_count_of_rounds_done_is_refused():
    with pytest.raises(ValueError, match="done_before"):
        RoundNumbering(done_before=-1)


class Recorder:
    """Stands for the tracker and the checkpoints: remembers the round numbers it is given."""

    run_id, tracking_uri = "run", "sqlite:///x"
    backlog: tuple = ()  # rounds kept while MLflow is unreachable: none here

    def __init__(self) -> None:
        self.logged: list[int] = []
        self.saved: list[int] = []

    def log_round(self, report) -> None:
        self.logged.append(report.server_round)

    def save(self, *, server_round: int, **_) -> None:
        self.saved.append(server_round)

    def describe_location(self) -> str:
        return "nowhere"


def test_round_end_numbers_a_resumed_runs_rounds_by_the_strategys_numbering(tmp_path):
    adapter = Adapter({"seg.w": torch.zeros(2, 3)})
    strategy = SimpleNamespace(
        rounds=RoundNumbering(done_before=3),
        last_eval_metrics={},
        last_train_metrics={"a": {"num-examples": 2, "train/loss": 0.5}},
        privacy_metrics=dict,
        last_refusals={},
        aggregation_metrics=dict,
        get_state=dict,
    )
    recorder = Recorder()
    end = RoundEnd(
        grid=None,  # a resumed run's round 0 must not ask the sites anything
        strategy=strategy,
        tracker=recorder,
        checkpoints=recorder,
        initial=adapter,
        global_adapter=adapter,
        best=None,
        flat_config={},
        resumable_keys=(),
        select_metric="dice_1click",
        num_rounds=5,
        round_timeout=1.0,
        evaluate_config=ConfigRecord({"split": "val"}),
        summary_path=tmp_path / "summary.json",
    )
    end(0, adapter_to_record(adapter.tensors))
    assert recorder.logged == []
    end(1, adapter_to_record(adapter.tensors))
    assert recorder.logged == [4] and recorder.saved == [4]
    assert end.global_adapter.manifest["metadata"] == {"round": 4}
    assert json.loads(end.summary_path.read_text())["rounds_done"] == 4
