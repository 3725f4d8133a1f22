"""Admitting sites: before a site takes part, its base fingerprint must equal the federation's.

:class:`SiteVetting` sends one QUERY message to every online node it has not asked yet (also to nodes that join
later, e.g. a site that restarted) and collects the answers without blocking: each call pushes the new
queries and pulls whatever replies have arrived. A node is then

* **admitted** (``accepted``): it answered with the federation's base fingerprint;
* **refused** (``refused``, with the reason, logged): another base, or its ClientApp failed on the query (a
  broken data folder, a missing base file) — a site problem that asking again would not fix;
* **connecting** (:meth:`SiteVetting.connecting`): online at the SuperLink, its answer not in yet. Starting a
  ClientApp process, importing torch and hashing the base take tens of seconds on a busy machine, so a slow
  answer is not a refusal: the sampler keeps waiting for connecting sites (see :mod:`server.strategies`).

A query that was lost (the node went offline, the message or its reply expired) is forgotten, and the node is
asked again once it is online, at most every ``retry_after`` seconds. A node is never sent a second query while
its first is unanswered, so a slow site is not buried under ClientApp processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from shared.protocol import BASE_FINGERPRINT, CONFIG, SITE, SITE_ID

__all__ = ["SiteVetting"]

#: Error codes that say the query or its answer was lost on the way, not that the site cannot take part.
_TRANSIENT_ERRORS = frozenset(
    {
        ErrorCode.MESSAGE_UNAVAILABLE,
        ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
        ErrorCode.NODE_UNAVAILABLE,
        ErrorCode.CLIENT_APP_CRASHED,
    }
)


@dataclass(frozen=True)
class _Query:
    node: int
    sent_at: float


class SiteVetting:
    """Callable ``vetting(online node ids) -> admitted node ids``; keeps ``accepted`` (node -> site name),
    ``refused`` (node -> reason) and the unanswered queries (:meth:`connecting`)."""

    def __init__(self, grid: Grid, fingerprint: str, *, retry_after: float = 30.0) -> None:
        self.grid = grid
        self.fingerprint = fingerprint
        self.retry_after = retry_after
        self.accepted: dict[int, str] = {}
        self.refused: dict[int, str] = {}
        self._pending: dict[str, _Query] = {}  # message id -> query
        self._retry_at: dict[int, float] = {}  # node -> monotonic time it may be asked again

    def __call__(self, node_ids: Iterable[int]) -> set[int]:
        """Ask the online nodes not asked yet, take in the answers that arrived; return the admitted nodes."""
        asked = {query.node for query in self._pending.values()}
        now = time.monotonic()
        new = [
            n
            for n in node_ids
            if n not in self.accepted
            and n not in self.refused
            and n not in asked
            and self._retry_at.get(n, 0.0) <= now
        ]
        if new:
            self._ask(new)
        if self._pending:
            self._collect()
        return set(self.accepted)

    def connecting(self, node_ids: Iterable[int]) -> set[int]:
        """The nodes among ``node_ids`` (those online) whose answer to the query has not arrived yet."""
        asked = {query.node for query in self._pending.values()}
        return {n for n in node_ids if n in asked}

    def _ask(self, nodes: list[int]) -> None:
        config = ConfigRecord({BASE_FINGERPRINT: self.fingerprint})
        messages = [
            Message(RecordDict({CONFIG: config}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes
        ]
        sent_at = time.monotonic()
        for node, message_id in zip(nodes, self.grid.push_messages(messages), strict=True):
            if message_id:  # Flower returns None for a message it could not push
                self._pending[message_id] = _Query(node, sent_at)
            else:
                self._retry_at[node] = sent_at + self.retry_after

    def _collect(self) -> None:
        for reply in self.grid.pull_messages(list(self._pending)):
            query = self._pending.pop(reply.metadata.reply_to_message_id, None)
            if query is not None:
                self._judge(query, reply)

    def _judge(self, query: _Query, reply: Message) -> None:
        node = query.node
        if reply.has_error():
            reason = f"handshake failed: {reply.error.reason}"
            if reply.error.code in _TRANSIENT_ERRORS:
                self._retry_at[node] = time.monotonic() + self.retry_after
                log(WARNING, "Node %d did not answer the handshake (%s); asking again later", node, reason)
            else:
                self.refused[node] = reason
                log(WARNING, "Site on node %d refused: %s", node, reason)
            return
        info = reply.content.config_records.get(SITE, ConfigRecord())
        site = str(info.get(SITE_ID, f"node-{node}"))
        theirs = str(info.get(BASE_FINGERPRINT, ""))
        if theirs != self.fingerprint:
            self.refused[node] = (
                f"base fingerprint {theirs or '(none)'} differs from the federation's {self.fingerprint}; "
                "the site must install the coordinator's base files"
            )
            log(WARNING, "Site %s refused: %s", site, self.refused[node])
        else:
            self.accepted[node] = site
            waited = time.monotonic() - query.sent_at
            log(INFO, "Site %s admitted (node %d, answered in %.0f s)", site, node, waited)
