"""The test split, touched once: after the last round every admitted site tests the chosen adapter.

The chosen adapter is the best by the aggregated validation metric (:mod:`server.round_end`); the starting
adapter and the last round's adapter are tested alongside, once each, so a report can show before / chosen /
last without ever ranking on test. Each site sends only its aggregate test metrics (with their confidence
bounds); they go to ``summary.json`` (``before``, ``after`` = the chosen adapter, ``last``) and to MLflow at the
step of the round the adapter comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.replies import Recipients, metrics_by_site, site_of
from server.reports import RoundReport
from server.tracking import FederationTracker
from shared.adapters import Adapter
from shared.metric_names import TEST
from shared.protocol import ARRAYS, CONFIG, SPLIT, adapter_to_record

__all__ = ["TestedAdapter", "run_final_test"]


@dataclass(frozen=True)
class TestedAdapter:
    """One adapter to test: its role in the summary (``before``, ``after``, ``last``) and its round."""

    role: str
    server_round: int
    adapter: Adapter


def _ask(
    grid: Grid, sites: dict[int, str], adapter: Adapter, config: ConfigRecord, timeout: float, mode: str
) -> list[Message]:
    """Every site in ``sites`` (node -> name) evaluates ``adapter`` (packed for ``federation.lora-aggregation =
    mode``) on its test split."""
    record = adapter_to_record(adapter.tensors, mode=mode)
    content = {**dict(config), SPLIT: TEST}
    messages = [
        Message(
            RecordDict({ARRAYS: record, CONFIG: ConfigRecord(content)}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in sites
    ]
    recipients = Recipients()
    recipients.remember(messages, sites)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for reply in replies:
        if reply.has_error():
            log(WARNING, "Final test: site %s failed: %s", site_of(reply, recipients), reply.error.reason)
    return replies


def run_final_test(
    grid: Grid,
    sites: dict[int, str],
    adapters: list[TestedAdapter],
    *,
    config: ConfigRecord,
    timeout: float,
    tracker: FederationTracker,
    lora_aggregation: str = "naive",
) -> dict[str, dict[str, dict[str, float]]]:
    """Test each distinct adapter (by round) once at every site in ``sites`` (node -> name); log the metrics to MLflow at
    the adapter's round and return ``{role: {site: metrics}}`` (roles sharing a round share the result)."""
    results: dict[int, dict[str, dict[str, float]]] = {}
    for tested in adapters:
        if tested.server_round in results:
            continue
        log(
            INFO,
            "Final test: the %s adapter (round %d) on every site's test split",
            tested.role,
            tested.server_round,
        )
        metrics = metrics_by_site(_ask(grid, sites, tested.adapter, config, timeout, lora_aggregation))
        results[tested.server_round] = metrics
        if metrics:
            tracker.log_test(RoundReport.from_site_metrics(tested.server_round, evaluation=metrics))
    return {tested.role: results[tested.server_round] for tested in adapters}
