"""Mocked training rounds for the aggregation tests: a strategy that sent a global adapter, and replies to it."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

#: Packed adapter layout of the mocked rounds (one flat float32 array per model, as shared.protocol sends it).
LAYOUT = {"cls": 1, "seg": 2}


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


class TrainRound:
    """``build_strategy(federation, privacy=privacy)`` after ``configure_train`` of round ``server_round`` with
    every element of the global adapter at ``global_value``, sampling ``sites`` nodes (1..sites)."""

    def __init__(
        self, federation, *, privacy=None, global_value: float = 0.0, sites: int = 5, server_round: int = 1
    ):
        from flwr.app import ConfigRecord

        from server.strategies import build_strategy

        self.strategy = build_strategy(federation, privacy=privacy)
        self.server_round = server_round
        nodes = list(range(1, sites + 1))
        self.messages = list(
            self.strategy.configure_train(server_round, packed(global_value), ConfigRecord(), FakeGrid(nodes))
        )

    def reply(
        self,
        node: int,
        value: float | Mapping[str, np.ndarray],
        *,
        site: str | None = None,
        examples: float = 10,
        server_round: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ):
        """A train reply of ``site`` (default ``site-<node>``): every element at ``value`` (or these arrays),
        ``num-examples`` and a training loss, answering ``server_round`` (default: this round)."""
        from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

        from shared.protocol import ARRAYS, METRICS, NUM_EXAMPLES, SERVER_ROUND, SITE, SITE_ID

        request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        values = {NUM_EXAMPLES: examples, "train/seg_loss": 0.5, **(metrics or {})}
        answered = self.server_round if server_round is None else server_round
        content = RecordDict(
            {
                ARRAYS: packed(value),
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
