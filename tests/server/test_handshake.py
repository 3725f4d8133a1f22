"""Admitting sites without blocking, and sampling that tells slow sites from gone ones (mocked grid, no
processes; the real SuperLink path is tests/integration/test_deployment.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from server.handshake import SiteVetting
from server.strategies import FederationStalled, build_strategy
from shared.config import FederationConfig
from shared.protocol import SITE

FINGERPRINT = "seg=sha256:aa;cls=sha256:bb"


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


class SlowGrid:
    """A SuperLink stand-in: ``online`` nodes; a node answers its query only once ``answers[node]`` is set
    (a fingerprint, or an :class:`Error`), like a ClientApp that takes its time to start."""

    def __init__(self, online: list[int]) -> None:
        self.online = list(online)
        self.answers: dict[int, str | Error] = {}
        self.queries: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.online)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"q{len(self.queries)}"
            self.queries.append(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        replies = []
        for query in self.queries:
            node = query.metadata.dst_node_id
            if query.metadata.message_id not in message_ids or node not in self.answers:
                continue
            answer = self.answers[node]
            if isinstance(answer, Error):
                replies.append(Message(answer, reply_to=query))
            else:
                site = ConfigRecord({"site-id": f"site-{node}", "base-fingerprint": answer})
                replies.append(Message(RecordDict({SITE: site}), reply_to=query))
        return replies

    def queries_to(self, node: int) -> int:
        return sum(1 for q in self.queries if q.metadata.dst_node_id == node)


def test_a_slow_site_is_connecting_until_it_answers_and_is_asked_once():
    grid = SlowGrid([1, 2])
    vetting = SiteVetting(grid, FINGERPRINT)
    assert vetting([1, 2]) == set() and vetting.connecting([1, 2]) == {1, 2}
    assert vetting([1, 2]) == set()  # still waiting: no second query piles up at the slow site
    assert grid.queries_to(1) == grid.queries_to(2) == 1
    grid.answers[1] = FINGERPRINT
    assert vetting([1, 2]) == {1} and vetting.accepted == {1: "site-1"}
    assert vetting.connecting([1, 2]) == {2}
    assert vetting.connecting([1]) == set()  # node 2 went offline: it is gone, not connecting


def test_another_base_or_a_failing_clientapp_is_refused_with_the_reason():
    grid = SlowGrid([1, 2])
    grid.answers = {
        1: "seg=sha256:other;cls=sha256:bb",
        2: Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="site folder not found"),
    }
    vetting = SiteVetting(grid, FINGERPRINT)
    assert vetting([1, 2]) == set()
    assert "differs from the federation's" in vetting.refused[1]
    assert "site folder not found" in vetting.refused[2]
    assert vetting([1, 2]) == set() and grid.queries_to(1) == grid.queries_to(2) == 1  # never asked again


def test_a_lost_query_is_asked_again_later():
    grid = SlowGrid([1])
    grid.answers[1] = Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node went offline")
    vetting = SiteVetting(grid, FINGERPRINT, retry_after=0.2)
    assert vetting([1]) == set() and not vetting.refused and vetting.connecting([1]) == set()
    assert vetting([1]) == set() and grid.queries_to(1) == 1  # not before retry_after
    time.sleep(0.25)
    grid.answers[1] = FINGERPRINT
    assert vetting([1]) == {1} and grid.queries_to(1) == 2


def _strategy(grid: SlowGrid, min_sites: int, sample_timeout: float, connect_timeout: float = 30.0):
    federation = FederationConfig(
        min_sites=min_sites, sample_timeout=sample_timeout, round_timeout=connect_timeout
    )
    strategy = build_strategy(federation)
    strategy.node_vetting = SiteVetting(grid, FINGERPRINT)
    strategy.poll_interval = 0.05
    return strategy


def _arrays() -> ArrayRecord:
    return ArrayRecord({"seg.w": Array(np.zeros((2, 3), dtype=np.float32))})


def _sample(strategy, grid: SlowGrid) -> list[int]:
    messages = strategy.configure_train(1, _arrays(), ConfigRecord(), grid)
    return sorted(m.metadata.dst_node_id for m in messages)


def test_a_round_waits_past_the_sample_timeout_for_sites_that_are_only_slow(monkeypatch):
    grid = SlowGrid([1, 2])
    strategy = _strategy(grid, min_sites=2, sample_timeout=0.2)
    sleep = time.sleep

    def answer_late(seconds: float) -> None:  # both sites answer after ~0.6 s, well past the sample timeout
        if time.monotonic() - started > 0.6:
            grid.answers.update({1: FINGERPRINT, 2: FINGERPRINT})
        sleep(seconds)

    monkeypatch.setattr("server.strategies.time.sleep", answer_late)
    started = time.monotonic()
    assert _sample(strategy, grid) == [1, 2]
    assert time.monotonic() - started >= 0.6


def test_a_round_stops_after_the_sample_timeout_when_the_missing_sites_are_gone():
    grid = SlowGrid([1])  # site 2 is offline; site 1 is slow and could not make up min-sites 2 alone
    strategy = _strategy(grid, min_sites=2, sample_timeout=0.3, connect_timeout=60.0)
    started = time.monotonic()
    with pytest.raises(FederationStalled, match=r"only 0 site\(s\) admitted .*1 online, 1 still answering"):
        _sample(strategy, grid)
    assert 0.3 <= time.monotonic() - started < 5


def test_a_slow_site_that_never_answers_stops_the_round_at_the_connect_timeout():
    grid = SlowGrid([1, 2])
    grid.answers[1] = FINGERPRINT
    strategy = _strategy(grid, min_sites=2, sample_timeout=0.1, connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(FederationStalled, match=r"only 1 site\(s\) admitted .*1 still answering.*2 needed"):
        _sample(strategy, grid)
    assert 0.5 <= time.monotonic() - started < 5


def test_enough_admitted_sites_wait_for_connecting_ones_only_until_the_sample_timeout():
    grid = SlowGrid([1, 2])
    grid.answers[1] = FINGERPRINT
    strategy = _strategy(grid, min_sites=1, sample_timeout=0.3)
    started = time.monotonic()
    assert _sample(strategy, grid) == [1]  # site 2 joins a later round once it has answered
    assert 0.3 <= time.monotonic() - started < 5
    grid.answers[2] = FINGERPRINT
    started = time.monotonic()
    assert _sample(strategy, grid) == [1, 2]
    assert time.monotonic() - started < 0.3  # nobody connecting: no wait at all
