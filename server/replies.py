"""Who a reply comes from, and what it carries: the helpers every strategy and wrapper shares.

Flower's error replies (a site died or timed out) come from the SuperLink itself; their
``reply_to_message_id`` is the only link back to the site, so a strategy remembers where its messages went
(:class:`Recipients`, one per strategy instance) and :func:`site_of` names a failed site by it.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log

from server.admission import Candidate
from shared.protocol import ARRAYS, DECLINED, METRICS, SERVER_ROUND, SITE, SITE_ID

__all__ = ["Recipients", "candidate_of", "in_site_order", "metrics_by_site", "site_of", "updates_of"]


class Recipients:
    """Who the messages of the last rounds went to (node -> site name from the handshake)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.names: dict[int, str] = {}

    def remember(self, messages: list[Message], names: dict[int, str]) -> None:
        # The grid sets each message's id when it pushes it, so ids are read at lookup time.
        self.sent = [*self.sent[-len(messages) * 2 :], *messages] if messages else self.sent
        self.names.update(names)

    def name_of(self, reply: Message) -> str | None:
        target = reply.metadata.reply_to_message_id
        for message in self.sent:
            if target and message.metadata.message_id == target:
                node = message.metadata.dst_node_id
                return self.names.get(node, f"node-{node}")
        return None


def site_of(message: Message, recipients: Recipients | None = None) -> str:
    """The site name a reply declares (``site`` ConfigRecord); for an error reply the site the message went to
    (its name from the handshake, via ``recipients``); else the sending node id."""
    record = message.content.config_records.get(SITE) if message.has_content() else None
    if record is not None and SITE_ID in record:
        return str(record[SITE_ID])
    if message.has_error() and recipients is not None:
        name = recipients.name_of(message)
        if name is not None:
            return name
    return f"node-{message.metadata.src_node_id}"


def in_site_order(replies: Iterable[Message], recipients: Recipients | None = None) -> list[Message]:
    """``replies`` sorted by site name, then sending node: the order every aggregation sums them in.

    Replies arrive in whatever order the sites finish; Flower's FedAvg accumulates ``w · update`` in float32 in
    list order, and float addition is not associative, so without a fixed order two runs with the same
    updates give global adapters that differ in the last bits (different hashes)."""
    return sorted(replies, key=lambda msg: (site_of(msg, recipients), msg.metadata.src_node_id))


def metrics_by_site(
    replies: Iterable[Message], recipients: Recipients | None = None
) -> dict[str, dict[str, float]]:
    """``{site: {metric: value}}`` of the replies that carry a metrics record (failed sites have none)."""
    out = {}
    for msg in replies:
        if msg.has_error() or METRICS not in msg.content.metric_records:
            continue
        out[site_of(msg, recipients)] = {k: float(v) for k, v in msg.content.metric_records[METRICS].items()}
    return out


def updates_of(
    server_round: int, replies: Iterable[Message], recipients: Recipients | None = None
) -> list[Message]:
    """The replies that carry an update; logs every site that failed or sent none (with its reason)."""
    with_update = []
    for msg in replies:
        if msg.has_error():
            log(
                WARNING,
                "Round %d: site %s failed: %s",
                server_round,
                site_of(msg, recipients),
                msg.error.reason,
            )
        elif ARRAYS in msg.content.array_records:
            with_update.append(msg)
        else:
            reason = msg.content.config_records.get(SITE, {}).get(DECLINED, "no update sent")
            log(
                WARNING,
                "Round %d: site %s sent no update: %s",
                server_round,
                site_of(msg, recipients),
                reason,
            )
    return with_update


def candidate_of(
    message: Message, recipients: Recipients | None = None, problem: str | None = None
) -> Candidate:
    """A reply that carries an update (see :func:`updates_of`), as :func:`server.admission.admit` checks it: the
    site, the round it says it answers (``server-round`` in its ``site`` record), its arrays and metrics, and
    ``problem``, why its update could not be decoded (None: it was, or needed no decoding)."""
    content = message.content
    site_record = content.config_records.get(SITE, {})
    raw_round = site_record.get(SERVER_ROUND)
    answered = raw_round if isinstance(raw_round, int) and not isinstance(raw_round, bool) else None
    metrics = content.metric_records.get(METRICS, {})
    return Candidate(
        site=site_of(message, recipients),
        server_round=answered,
        arrays={name: array.numpy() for name, array in content.array_records[ARRAYS].items()},
        metrics=dict(metrics.items()),
        records=(tuple(content.array_records), tuple(content.metric_records)),
        problem=problem,
    )
