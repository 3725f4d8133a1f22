"""Admitting sites: before a site takes part, its base fingerprint must equal the federation's.

:class:`SiteVetting` sends a QUERY message to every node it has not seen yet (also to nodes that join
later, e.g. a site that restarted) and sorts them into accepted and refused. Refused sites are logged with
the reason and never sampled; nodes that do not answer in time are asked again in a later round.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from shared.protocol import CONFIG, SITE

__all__ = ["SiteVetting"]


class SiteVetting:
    """Callable ``vetting(node_ids) -> accepted node ids``; keeps ``accepted`` (node -> site) and ``refused``."""

    def __init__(self, grid: Grid, fingerprint: str, *, timeout: float) -> None:
        self.grid = grid
        self.fingerprint = fingerprint
        self.timeout = timeout
        self.accepted: dict[int, str] = {}
        self.refused: dict[int, str] = {}

    def __call__(self, node_ids: Iterable[int]) -> set[int]:
        new = [n for n in node_ids if n not in self.accepted and n not in self.refused]
        if new:
            self._ask(new)
        return set(self.accepted)

    def _ask(self, nodes: list[int]) -> None:
        config = ConfigRecord({"base-fingerprint": self.fingerprint})
        messages = [
            Message(RecordDict({CONFIG: config}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes
        ]
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.refused[node] = f"handshake failed: {reply.error.reason}"
                log(WARNING, "Site on node %d refused: %s", node, self.refused[node])
                continue
            info = reply.content.config_records.get(SITE, ConfigRecord())
            site = str(info.get("site-id", f"node-{node}"))
            theirs = str(info.get("base-fingerprint", ""))
            if theirs != self.fingerprint:
                self.refused[node] = (
                    f"base fingerprint {theirs or '(none)'} differs from the federation's {self.fingerprint}; "
                    "the site must install the coordinator's base files"
                )
                log(WARNING, "Site %s refused: %s", site, self.refused[node])
            else:
                self.accepted[node] = site
                log(INFO, "Site %s admitted (node %d)", site, node)
