"""One federated run on the server: config -> strategy -> tracking -> RoundEnd -> Flower's loop -> final test.

The round loop is Flower's own (``Strategy.start``); fedabus adds hooks (:mod:`server.strategies`) and an
end-of-round callback (:mod:`server.round_end`) that logs every site's validation metrics to MLflow, keeps the
best adapter by validation, saves a checkpoint and prints progress. After the last round the test split is
touched once (:mod:`server.final_test`): every site tests the chosen, the last and the starting adapter.

With ``federation.resume`` a run continues from its work folder's latest checkpoint: the same MLflow run, the
strategy state, the global and the best adapter, and the federation's round numbering
(:class:`~server.round_numbering.RoundNumbering`). When that checkpoint is damaged the previous kept one stands in
(:meth:`~server.checkpoint.ServerCheckpoint.resume`) and the rounds after it are run again; when none is usable the
run stops with a message naming the files (:func:`record_refused_start`), not a traceback.

A run ends early, recorded rather than raised, when the next round would exceed the client-level ε budget
(:class:`~server.privacy.ClientPrivacyBudgetSpent`) or too few sites are online to start it
(:class:`~server.strategies.FederationStalled`): a WARNING, ``stopped`` in ``summary.json`` and the parent MLflow
run's ``fedabus.stop_*`` tags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.checkpoint import CheckpointError, ResumePoint, ServerCheckpoint
from server.final_test import TestedAdapter, run_final_test
from server.handshake import SiteVetting
from server.privacy import ClientPrivacyBudgetSpent
from server.reports import RoundReport
from server.round_end import RoundEnd, write_json
from server.round_numbering import RoundNumbering
from server.strategies import FederationStalled, FederationStrategy, build_strategy
from server.tracking import FederationTracker, TrackingError
from shared.adapters import (
    Adapter,
    extract_adapter,
    lora_specs_from_config,
    model_specs,
    save_adapter,
    set_ffa_lora_a,
)
from shared.base import load_base, wrap_for_training
from shared.config import FedabusConfig, to_flat_dict
from shared.metric_names import VAL
from shared.protocol import BASE_FINGERPRINT, SPLIT, adapter_to_record, layout_of

__all__ = [
    "CLIENT_PRIVACY_JOURNAL",
    "RESUMABLE_KEYS",
    "FederationRun",
    "REFUSED_START",
    "record_refused_start",
    "schema_defaults",
    "work_dir_of",
]

#: Run-config keys that may differ when a run is resumed (paths, tracking location, the number of rounds).
RESUMABLE_KEYS = (
    "num-server-rounds",
    "federation.tracking-uri",
    "federation.sample-timeout",
    "federation.round-timeout",
    "federation.final-test",
)
#: Client-level DP releases, written before each noisy adapter goes out (survives a crash before the checkpoint).
CLIENT_PRIVACY_JOURNAL = "client_privacy_journal.json"


def work_dir_of(config: FedabusConfig) -> Path:
    """The server's work folder: ``federation.work-dir``, else ``~/.fedabus/<federation.run-name>``."""
    fed = config.federation
    return Path(fed.work_dir) if fed.work_dir else Path.home() / ".fedabus" / fed.run_name


def _initial_adapter(config: FedabusConfig) -> tuple[Adapter, str]:
    """The starting adapter of a fresh run (seeded by ``train.seed``) and the base's fingerprint. Under
    ``federation.lora-aggregation = ffa`` its LoRA A are the shared frozen ones every site derives itself
    (:func:`shared.adapters.ffa_lora_a` of ``train.seed`` and the base fingerprint)."""
    if not config.model.base_path:
        raise ValueError(
            "model.base-path is empty: the server needs the federation's base (fedabus make-base)"
        )
    base = load_base(config.model.base_path, attention_impl=config.model.attention_impl)
    torch.manual_seed(config.train.seed)  # every fresh run starts from the same adapter
    models = wrap_for_training(base, model_specs(config))
    if config.federation.lora_aggregation == "ffa":
        set_ffa_lora_a(models, seed=config.train.seed, base_fingerprints=base.fingerprints, freeze=False)
    return extract_adapter(models, base_fingerprints=base.fingerprints), base.fingerprint


def schema_defaults(num_rounds: int) -> dict[str, Any]:
    """The flat run config of the schema's defaults (what a key added after a checkpoint was written would have
    held), with ``num_rounds``."""
    return {**to_flat_dict(FedabusConfig()), "num-server-rounds": num_rounds}


def _log_resume_point(point: ResumePoint) -> None:
    """Log the damaged checkpoints a resume stepped over and the config keys it accepted at their default."""
    for damaged in point.damaged:
        where = f"; moved to {damaged.moved_to}" if damaged.moved_to is not None else ""
        log(WARNING, "Checkpoint %s is damaged: %s%s", damaged.path, damaged.reason, where)
    if point.fell_back:
        log(
            WARNING,
            "Falling back to the previous good checkpoint: resuming after round %d (%s); the rounds after it are "
            "run again",
            point.state.server_round,
            point.state.path,
        )
    for key in point.defaulted:
        log(INFO, "Run config key %s is not in the checkpoint; accepted: its value is the default", key)


def _resume(
    point: ResumePoint, strategy: FederationStrategy, config: FedabusConfig, work: Path
) -> FederationTracker:
    """Continue after the checkpoint's round: its MLflow run, strategy state and round numbering."""
    state, fed = point.state, config.federation
    # The state first: a missing client-level DP journal refuses the resume before the MLflow run is reopened.
    strategy.set_state(state.strategy_state)
    tracker = FederationTracker.resume(state.mlflow_run_id, tracking_uri=fed.tracking_uri, default_dir=work)
    for backlog in state.extra.get("tracking_backlog", []):  # rounds MLflow missed while it was down
        tracker.log_round(RoundReport.from_json(backlog))
    if "round_report" in state.extra:
        tracker.log_round(RoundReport.from_json(state.extra["round_report"]))
    if tracker.last_logged_round > state.server_round:
        rerun = list(range(state.server_round + 1, tracker.last_logged_round + 1))
        tracker.note_rerun_rounds(rerun)
        log(
            WARNING,
            "MLflow already holds round(s) %s from before the server stopped (the checkpoint resumed is older); "
            "they are run again but not logged again (no duplicate steps): summary.json and the checkpoints hold "
            "the re-run",
            ", ".join(map(str, rerun)),
        )
    strategy.rounds = RoundNumbering(done_before=state.server_round)
    log(INFO, "Resuming after round %d from %s", state.server_round, state.path)
    return tracker


#: Errors that keep a run from starting, as a stop of :func:`record_refused_start`, and their ``reason``.
REFUSED_START: dict[type[Exception], str] = {
    CheckpointError: "checkpoint-unusable",
    TrackingError: "tracking-unusable",
}


def record_refused_start(config: FedabusConfig, error: Exception) -> None:
    """The run cannot start (no usable checkpoint, one written with another run config, an MLflow store that
    cannot be used or reached): an ERROR naming the files and the reason instead of a traceback, and ``stopped``
    in the work folder's ``summary.json``; nothing is trained."""
    log(ERROR, "Not starting: %s", error)
    reason = next(name for kind, name in REFUSED_START.items() if isinstance(error, kind))
    path = work_dir_of(config) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = _read_json(path)
    summary["stopped"] = {"reason": reason, "round": None, "message": str(error)}
    write_json(path, summary)


def _start(config: FedabusConfig, flat: dict[str, Any], fingerprint: str, work: Path) -> FederationTracker:
    """A new MLflow parent run for a fresh federation."""
    fed = config.federation
    return FederationTracker.start(
        config=flat,
        strategy=fed.strategy,
        base_fingerprint=fingerprint,
        tracking_uri=fed.tracking_uri,
        default_dir=work,
        experiment=fed.experiment,
        run_name=fed.run_name,
    )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass
class FederationRun:
    """The parts of one ServerApp run, wired from the config by :meth:`prepare`; :meth:`run` runs it."""

    grid: Grid
    config: FedabusConfig
    #: ``num-server-rounds``: the federation's total, including rounds done before a resume.
    num_rounds: int
    work: Path
    strategy: FederationStrategy
    vetting: SiteVetting
    tracker: FederationTracker
    round_end: RoundEnd
    #: What every train message carries (the base fingerprint).
    round_config: ConfigRecord

    @classmethod
    def prepare(cls, grid: Grid, config: FedabusConfig, *, num_rounds: int) -> FederationRun:
        """Load the base and make the starting adapter, build the strategy, and open the MLflow run (a new one,
        or the checkpoint's when resuming)."""
        fed = config.federation
        flat = {**to_flat_dict(config), "num-server-rounds": num_rounds}
        work = work_dir_of(config)
        work.mkdir(parents=True, exist_ok=True)
        # The strategy first: an unsupported combination of settings fails before the base is loaded.
        strategy = build_strategy(fed, proximal_mu=config.train.proximal_mu, privacy=config.privacy)
        initial, fingerprint = _initial_adapter(config)
        strategy.adapter_layout = layout_of(initial.tensors)
        strategy.lora_scaling = {p: s.scaling for p, s in lora_specs_from_config(config.adapter).items()}
        strategy.keep_privacy_journal(work / CLIENT_PRIVACY_JOURNAL)
        vetting = SiteVetting(grid, fingerprint)
        strategy.node_vetting = vetting
        checkpoints = ServerCheckpoint(work / "checkpoints", keep=fed.checkpoint_keep)
        point = (
            checkpoints.resume(flat, ignore=RESUMABLE_KEYS, defaults=schema_defaults(num_rounds))
            if fed.resume
            else None
        )
        state = point.state if point is not None else None
        summary_path = work / "summary.json"
        summary = _read_json(summary_path) if state is not None else {}
        if point is not None:
            _log_resume_point(point)
            if point.fell_back:
                summary.setdefault("checkpoint_fallbacks", []).append(
                    {
                        "resumed_after_round": state.server_round,
                        "damaged": {str(d.path): d.reason for d in point.damaged},
                    }
                )
            tracker = _resume(point, strategy, config, work)
        else:
            tracker = _start(config, flat, fingerprint, work)
        log(INFO, "%s", tracker.describe_location())
        round_config = ConfigRecord({BASE_FINGERPRINT: fingerprint})
        round_end = RoundEnd(
            grid=grid,
            strategy=strategy,
            tracker=tracker,
            checkpoints=checkpoints,
            initial=initial,
            global_adapter=state.global_adapter if state is not None else initial,
            best=state.best if state is not None else None,
            flat_config=flat,
            resumable_keys=RESUMABLE_KEYS,
            select_metric=config.train.select_metric,
            num_rounds=num_rounds,
            round_timeout=fed.round_timeout,
            evaluate_config=ConfigRecord({**dict(round_config), SPLIT: VAL}),
            summary_path=summary_path,
            summary=summary,
            lora_aggregation=fed.lora_aggregation,
        )
        return cls(grid, config, num_rounds, work, strategy, vetting, tracker, round_end, round_config)

    def run(self) -> None:
        """Train the rounds still to do, test once (``federation.final-test``), close the MLflow run and save
        ``final_adapter`` and ``chosen_adapter`` in the work folder.

        A round that would exceed ``privacy.client-epsilon-budget`` (:class:`~server.privacy.ClientPrivacyBudgetSpent`)
        or that too few sites are online to start (:class:`~server.strategies.FederationStalled`) is not run: the
        run is recorded as stopped there and ends normally, with the final test of the rounds done."""
        remaining = self.strategy.rounds.remaining(self.num_rounds)
        if remaining > 0:
            try:
                self.strategy.start(
                    grid=self.grid,
                    initial_arrays=adapter_to_record(
                        self.round_end.global_adapter.tensors, mode=self.config.federation.lora_aggregation
                    ),
                    num_rounds=remaining,
                    timeout=self.config.federation.round_timeout,
                    train_config=self.round_config,
                    evaluate_config=self.round_end.evaluate_config,
                    evaluate_fn=self.round_end,
                )
            except (ClientPrivacyBudgetSpent, FederationStalled) as stop:
                self.round_end.record_stop(stop.record())
        else:
            log(INFO, "All %d rounds were already done; nothing to train", self.num_rounds)
        if self.config.federation.final_test:
            self._final_test()
        self._save()

    def _final_test(self) -> None:
        """Test the chosen, the last and the starting adapter once at every admitted site (see
        :mod:`server.final_test`); the results go to ``summary.json`` (``after`` is the chosen adapter)."""
        end = self.round_end
        if "after" in end.summary and end.summary.get("tested_rounds") is not None:
            log(INFO, "The final test was already done; not testing again")
            return
        chosen = end.best
        if chosen is None:
            log(WARNING, "No round was evaluated on validation: the last round's adapter is the chosen one")
        last_round = int(end.summary.get("rounds_done", 0))
        adapters = [
            TestedAdapter("after", chosen.server_round, chosen.adapter)
            if chosen is not None
            else TestedAdapter("after", last_round, end.global_adapter),
            TestedAdapter("last", last_round, end.global_adapter),
            TestedAdapter("before", 0, end.initial),
        ]
        online = set(self.grid.get_node_ids())
        sites = {node: name for node, name in self.vetting.accepted.items() if node in online}
        results = run_final_test(
            self.grid,
            sites,
            adapters,
            config=self.round_config,
            timeout=self.config.federation.round_timeout,
            tracker=self.tracker,
            lora_aggregation=self.config.federation.lora_aggregation,
        )
        end.summary.update(results)
        end.summary["after_round"] = adapters[0].server_round
        end.summary["last_round"] = last_round
        end.summary["tested_rounds"] = sorted({a.server_round for a in adapters})
        write_json(end.summary_path, end.summary)

    def _save(self) -> None:
        """Close the MLflow run and save the last round's and the chosen (best by validation) adapter."""
        end = self.round_end
        save_adapter(end.global_adapter, self.work / "final_adapter")  # first: MLflow may be down
        chosen = end.best.adapter if end.best is not None else end.global_adapter
        save_adapter(chosen, self.work / "chosen_adapter")
        self.tracker.finish(final_adapter=end.global_adapter, best=end.best)
        log(INFO, "Chosen adapter (best by validation): %s", self.work / "chosen_adapter.safetensors")
        log(INFO, "Final adapter: %s", self.work / "final_adapter.safetensors")
        log(INFO, "%s", self.tracker.describe_location())
