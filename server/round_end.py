"""The work after every server round: report, model selection on validation, checkpoint, MLflow, summary, ETA.

:class:`RoundEnd` is the ``evaluate_fn`` the ServerApp hands to Flower's ``Strategy.start``: Flower calls it
with round 0 before training (every site then evaluates the starting adapter on its **validation** split)
and after every round. Each evaluated round's aggregated validation metric (``train.select-metric``, e.g.
``global/val/dice_1click_mean``) ranks the global adapter; the best one is kept in the checkpoint. The test
split is not touched here: :mod:`server.final_test` tests the chosen adapter once, after the last round.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.checkpoint import ServerCheckpoint
from server.reports import BestAdapter, RoundReport, update_best
from server.tracking import FederationTracker
from shared.adapters import Adapter
from shared.metric_names import REFUSED_UPDATES_METRIC, VAL, aggregate_key, metric_key
from shared.protocol import layout_of, record_to_adapter

__all__ = ["RoundEnd", "selection_key", "write_json"]


def selection_key(select_metric: str) -> str:
    """The parent-run aggregate that ranks rounds, e.g. ``global/val/dice_1click_mean``."""
    return aggregate_key(metric_key(select_metric, split=VAL), "mean")


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``content`` as JSON."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


@dataclass
class RoundEnd:
    """Called as ``round_end(flower_round, arrays)``; keeps the global and the best adapter so far.

    Flower's round number becomes the federation's through ``strategy.rounds``
    (:class:`~server.round_numbering.RoundNumbering`), the one place that knows about resume.
    """

    grid: Grid
    strategy: Any
    tracker: FederationTracker
    checkpoints: ServerCheckpoint
    initial: Adapter
    global_adapter: Adapter
    best: BestAdapter | None
    flat_config: dict[str, Any]
    resumable_keys: tuple[str, ...]
    select_metric: str
    num_rounds: int
    round_timeout: float
    #: What every evaluation message carries (the base fingerprint and ``split = "val"``).
    evaluate_config: ConfigRecord
    summary_path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    #: ``federation.lora-aggregation``: what the strategy's arrays hold (under ``ffa`` no LoRA A: those stay the
    #: starting adapter's, :func:`shared.adapters.ffa_lora_a`).
    lora_aggregation: str = "naive"
    started: float = field(default_factory=time.monotonic)

    @property
    def metric(self) -> str:
        return selection_key(self.select_metric)

    def __call__(self, flower_round: int, arrays: ArrayRecord) -> None:
        if flower_round == 0:
            if not self.strategy.rounds.resumed:  # a resumed run evaluated its start in its first process
                self._evaluate_start(arrays)
            return None
        actual = self.strategy.rounds.federation(flower_round)
        sent = record_to_adapter(arrays, layout_of(self.initial.tensors), mode=self.lora_aggregation)
        tensors = {name: sent.get(name, frozen) for name, frozen in self.initial.tensors.items()}
        self.global_adapter = Adapter(tensors, {**self.initial.manifest, "metadata": {"round": actual}})
        report = RoundReport.from_site_metrics(
            actual,
            evaluation=self.strategy.last_eval_metrics,
            training=self.strategy.last_train_metrics,
            # privacy/client_epsilon etc. ({} without client DP); federation/lora_discarded_energy under product
            global_metrics={
                **self.strategy.privacy_metrics(),
                **self.strategy.aggregation_metrics(),
                REFUSED_UPDATES_METRIC: float(len(self.strategy.last_refusals)),
            },
            refused=self.strategy.last_refusals,
        )
        self.tracker.log_round(report)
        self._select(report, self.global_adapter, actual)
        self.checkpoints.save(
            server_round=actual,
            global_adapter=self.global_adapter,
            config=self.flat_config,
            strategy_state=self.strategy.get_state(),
            mlflow_run_id=self.tracker.run_id,
            best=self.best,
            # rounds MLflow has not received yet (its server was down) survive a restart with the checkpoint
            extra={
                "round_report": report.to_json(),
                "tracking_backlog": [kept.to_json() for kept in self.tracker.backlog],
            },
            ignore=self.resumable_keys,
        )
        self._write_summary(report, actual)
        self._log_progress(report, flower_round, actual)
        return None

    def record_stop(self, stop: dict[str, Any]) -> None:
        """The run ends before round ``stop["round"]`` for ``stop["reason"]`` (e.g. ``client-privacy-budget``):
        a WARNING with ``stop["message"]``, ``stopped`` in ``summary.json`` and the parent run's
        ``fedabus.stop_*`` tags (:meth:`~server.tracking.FederationTracker.log_stop`)."""
        log(WARNING, "%s", stop["message"])
        self.summary["stopped"] = dict(stop)
        write_json(self.summary_path, self.summary)
        self.tracker.log_stop(stop)

    def _evaluate_start(self, arrays: ArrayRecord) -> None:
        """Round 0 of a fresh run: every site evaluates the starting adapter on validation (a candidate like any
        round)."""
        messages = self.strategy.configure_evaluate(
            0, arrays, ConfigRecord(dict(self.evaluate_config)), self.grid
        )
        replies = self.grid.send_and_receive(messages, timeout=self.round_timeout)
        self.strategy.aggregate_evaluate(0, replies)
        report = RoundReport.from_site_metrics(0, evaluation=self.strategy.last_eval_metrics)
        self.tracker.log_round(report)
        self._select(report, self.initial, 0)
        self.summary["start_val"] = {site: dict(m) for site, m in self.strategy.last_eval_metrics.items()}
        write_json(self.summary_path, self.summary)

    def _select(self, report: RoundReport, adapter: Adapter, server_round: int) -> None:
        value = report.parent_metrics().get(self.metric, math.nan)
        if report.evaluation and math.isnan(value):
            log(
                WARNING,
                "Round %d: no site reported %s; this round cannot be chosen",
                server_round,
                self.metric,
            )
        self.best = update_best(
            self.best, adapter=adapter, metric=self.metric, value=value, server_round=server_round
        )

    def _write_summary(self, report: RoundReport, actual: int) -> None:
        if self.strategy.last_eval_metrics:
            self.summary["val"] = {site: dict(m) for site, m in self.strategy.last_eval_metrics.items()}
            self.summary["val_round"] = actual
        # Last training metrics per site (a site keeps its entry in rounds it skips, e.g. at its DP budget).
        self.summary.setdefault("train", {}).update(
            {site: dict(m) for site, m in self.strategy.last_train_metrics.items()}
        )
        if report.refused:
            self.summary.setdefault("refused_updates", {})[str(actual)] = dict(report.refused)
        if self.strategy.privacy_metrics():
            self.summary["client_privacy"] = self.strategy.privacy_metrics()
        if self.best is not None:
            self.summary["selection"] = {
                "metric": self.best.metric,
                "round": self.best.server_round,
                "value": self.best.value,
            }
        self.summary.update(
            rounds_done=actual,
            num_rounds=self.num_rounds,
            mlflow=self.tracker.describe_location(),
            run_id=self.tracker.run_id,
            tracking_uri=self.tracker.tracking_uri,
        )
        write_json(self.summary_path, self.summary)

    def _log_progress(self, report: RoundReport, flower_round: int, actual: int) -> None:
        elapsed = time.monotonic() - self.started
        eta = elapsed / flower_round * (self.num_rounds - actual)
        value = report.parent_metrics().get(self.metric, math.nan)
        quality = (
            f"validation {self.select_metric} {value:.3f}"
            if not math.isnan(value)
            else "not evaluated this round"
        )
        chosen = f"; best round so far {self.best.server_round}" if self.best is not None else ""
        log(
            INFO,
            "Round %d/%d done: %s%s; %.0f s elapsed, ETA %.0f s",
            actual,
            self.num_rounds,
            quality,
            chosen,
            elapsed,
            eta,
        )
