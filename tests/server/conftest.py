"""Mocked training rounds for the aggregation tests: a strategy that sent a global adapter, and replies to it;
small LoRA adapters at any rank (:class:`LoraAdapters`) for the LoRA-aware aggregation tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

#: Packed adapter layout of the mocked rounds (one flat float32 array per model, as shared.protocol sends it).
LAYOUT = {"cls": 1, "seg": 2}


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


class TrainRound:
    """``build_strategy(federation, privacy=privacy)`` after ``configure_train`` of round ``server_round`` with
    every element of the global adapter at ``global_value`` (or these packed arrays), sampling ``sites`` nodes
    (1..sites). ``adapter_layout`` and ``lora_scaling`` are set on the strategy first (as
    :class:`server.federation_run.FederationRun` does; product aggregation and compression need them)."""

    def __init__(
        self,
        federation,
        *,
        privacy=None,
        global_value: float | Mapping[str, np.ndarray] = 0.0,
        sites: int = 5,
        server_round: int = 1,
        adapter_layout: Mapping[str, tuple[int, ...]] | None = None,
        lora_scaling: Mapping[str, float] | None = None,
    ):
        from flwr.app import ConfigRecord

        from server.strategies import build_strategy

        self.strategy = build_strategy(federation, privacy=privacy)
        if adapter_layout is not None:
            self.strategy.adapter_layout = dict(adapter_layout)
        if lora_scaling is not None:
            self.strategy.lora_scaling = dict(lora_scaling)
        self.server_round = server_round
        nodes = list(range(1, sites + 1))
        self.messages = list(
            self.strategy.configure_train(server_round, packed(global_value), ConfigRecord(), FakeGrid(nodes))
        )

    def reply(
        self,
        node: int,
        value: float | Mapping[str, np.ndarray] | ArrayRecord,
        *,
        site: str | None = None,
        examples: float = 10,
        server_round: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ):
        """A train reply of ``site`` (default ``site-<node>``): every element at ``value`` (or these arrays, or
        this record as it travels),
        ``num-examples`` and a training loss, answering ``server_round`` (default: this round)."""
        from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

        from shared.protocol import ARRAYS, METRICS, NUM_EXAMPLES, SERVER_ROUND, SITE, SITE_ID

        request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        values = {NUM_EXAMPLES: examples, "train/seg_loss": 0.5, **(metrics or {})}
        answered = self.server_round if server_round is None else server_round
        content = RecordDict(
            {
                ARRAYS: value if isinstance(value, ArrayRecord) else packed(value),
                METRICS: MetricRecord(values),
                SITE: ConfigRecord({SITE_ID: site or f"site-{node}", SERVER_ROUND: answered}),
            }
        )
        return Message(content, reply_to=request)

    def aggregate(self, replies) -> np.ndarray | None:
        """The new global adapter as one flat float64 vector (``cls`` then ``seg``); None when nothing was
        aggregated."""
        arrays, _ = self.strategy.aggregate_train(self.server_round, replies)
        return None if arrays is None else flat(arrays)


def packed(value: float | Mapping[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    if not isinstance(value, Mapping):
        value = {name: np.full(size, value, dtype=np.float32) for name, size in LAYOUT.items()}
    return ArrayRecord({name: Array(np.asarray(array)) for name, array in value.items()})


def flat(record) -> np.ndarray:
    return np.concatenate(
        [np.asarray(record[name].numpy(), dtype=np.float64) for name in sorted(record.keys())]
    )


@pytest.fixture
def train_round(task_identity):
    """:class:`TrainRound`, for building mocked rounds (Flower's task identity is set for the test)."""
    return TrainRound


class LoraAdapters:
    """Site adapters of one linear LoRA module (``seg``), one conv LoRA module (``cls``) and one fully trained
    tensor, at any rank, with the helpers the LoRA aggregation tests share. ``alpha``: the run's lora-alpha."""

    LIN = "seg.enc.qkv"
    CONV = "cls.conv"
    MODULES = (LIN, CONV)
    DECODER = "seg.mask_decoder.w"
    alpha = 16.0

    def site(self, rank: int, seed: int) -> dict:
        """A site adapter at ``rank`` (standard normal entries, seeded): linear A (r, 5) / B (6, r), conv
        A (r, 3, 3, 3) / B (4, r, 1, 1), decoder (3,)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        return {
            f"{self.LIN}.lora_A.weight": torch.randn(rank, 5, generator=g),
            f"{self.LIN}.lora_B.weight": torch.randn(6, rank, generator=g),
            f"{self.CONV}.lora_A.weight": torch.randn(rank, 3, 3, 3, generator=g),
            f"{self.CONV}.lora_B.weight": torch.randn(4, rank, 1, 1, generator=g),
            self.DECODER: torch.randn(3, generator=g),
        }

    def layout(self, rank: int) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.site(rank, 0).items()}

    def scaling(self, rank: int) -> dict[str, float]:
        """PEFT's scaling alpha / r of both models at ``rank``."""
        return {"seg": self.alpha / rank, "cls": self.alpha / rank}

    @staticmethod
    def delta(tensors, module: str, scaling: float):
        """ΔW = scaling · B A of ``module`` as an (out, in·kernel) float64 matrix."""
        from shared.lora_aggregation import delta_weight

        return delta_weight(tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"], scaling)

    def dense_mean(self, updates, weights, module: str, scalings) -> object:
        """Σ wᵢ sᵢ Bᵢ Aᵢ / Σ w of ``module`` (``scalings``: one per update, or one for all)."""
        if not isinstance(scalings, (list, tuple)):
            scalings = [scalings] * len(updates)
        total = sum(weights)
        return sum(
            w / total * self.delta(u, module, s) for w, u, s in zip(weights, updates, scalings, strict=True)
        )


@pytest.fixture
def lora() -> LoraAdapters:
    """:class:`LoraAdapters`: small site adapters at any LoRA rank and the ΔW helpers."""
    return LoraAdapters()


class FakeTracker:
    """Stands for MLflow (a migrated SQLite store takes many seconds to create): one run, resumable by id. Keeps
    what a run logs: ``logged`` (round numbers), ``reports`` (the round reports), ``tests`` (final-test
    reports), ``stops`` (stop reasons)."""

    runs: dict[str, FakeTracker] = {}
    tracking_uri = "fake://"
    backlog: list = []

    def __init__(self, run_id: str) -> None:
        self.run_id, self.finished, self.logged, self.stops = run_id, 0, [], []
        self.reports, self.tests = [], []

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
        self.reports.append(report)

    def log_test(self, report) -> bool:
        self.tests.append(report)
        return True

    @property
    def last_logged_round(self) -> int:
        return max(self.logged, default=-1)

    def note_rerun_rounds(self, rounds) -> None:
        self.rerun = list(rounds)

    def finish(self, **_) -> None:
        self.finished += 1

    def log_stop(self, stop) -> None:
        self.stops.append(stop["reason"])

    def describe_location(self) -> str:
        return f"fake run {self.run_id}"


@pytest.fixture
def fake_tracker(monkeypatch) -> type[FakeTracker]:
    """:class:`FakeTracker` in place of the server's MLflow tracker (``FederationTracker``), with no runs yet."""
    from server import federation_run

    monkeypatch.setattr(FakeTracker, "runs", {})
    monkeypatch.setattr(federation_run, "FederationTracker", FakeTracker)
    return FakeTracker
