"""fedabus ServerApp: adapter-only federation with handshake, tracking, checkpoints and resume.

The round loop is Flower's own (``Strategy.start``); fedabus adds hooks (:mod:`server.strategies`) and an
end-of-round callback that logs every site's metrics to MLflow, saves a checkpoint and prints progress.
"""

from __future__ import annotations

import json
import math
import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.checkpoint import ServerCheckpoint
from server.handshake import SiteVetting
from server.strategies import build_strategy
from server.tracking import FederationTracker, RoundReport, update_best
from shared.adapters import Adapter, extract_adapter, lora_specs_from_config
from shared.base import load_base, wrap_for_training
from shared.config import FedabusConfig, load_config, to_flat_dict
from shared.privacy.validation import validate_privacy
from shared.protocol import adapter_to_record, layout_of, record_to_adapter

app = ServerApp()

FLOWER_KEYS = ("num-server-rounds",)
#: Run-config keys that may differ when a run is resumed (paths, tracking location, the number of rounds).
RESUMABLE_KEYS = (
    "num-server-rounds",
    "federation.tracking-uri",
    "federation.sample-timeout",
    "federation.round-timeout",
)
BEST_METRIC = "global/test/dice_1click_mean"
#: Client-level DP releases, written before each noisy adapter goes out (survives a crash before the checkpoint).
CLIENT_PRIVACY_JOURNAL = "client_privacy_journal.json"


def work_dir_of(config: FedabusConfig) -> Path:
    fed = config.federation
    return Path(fed.work_dir) if fed.work_dir else Path.home() / ".fedabus" / fed.run_name


def _initial_adapter(config: FedabusConfig) -> tuple[Adapter, str]:
    if not config.model.base_path:
        raise ValueError(
            "model.base-path is empty: the server needs the federation's base (fedabus make-base)"
        )
    base = load_base(config.model.base_path, attention_impl=config.model.attention_impl)
    torch.manual_seed(config.train.seed)  # every fresh run starts from the same adapter
    models = wrap_for_training(base, lora_specs_from_config(config.adapter))
    return extract_adapter(models, base_fingerprints=base.fingerprints), base.fingerprint


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    num_rounds = int(run_config.get("num-server-rounds", 3))
    config = load_config(run_config, ignore=FLOWER_KEYS)
    validate_privacy(config)  # refuse DP settings that would not protect anything before any site trains
    fed = config.federation
    flat = {**to_flat_dict(config), "num-server-rounds": num_rounds}
    work = work_dir_of(config)
    work.mkdir(parents=True, exist_ok=True)

    initial, fingerprint = _initial_adapter(config)
    strategy = build_strategy(
        fed.strategy,
        min_sites=fed.min_sites,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        eval_interval=fed.eval_interval,
        sample_timeout=fed.sample_timeout,
        connect_timeout=fed.round_timeout,
        proximal_mu=config.train.proximal_mu,
        server_lr=fed.server_lr,
        trim_beta=fed.trim_beta,
        num_malicious=fed.num_malicious,
        privacy=config.privacy,
    )
    strategy.keep_privacy_journal(work / CLIENT_PRIVACY_JOURNAL)
    vetting = SiteVetting(grid, fingerprint)
    strategy.node_vetting = vetting

    checkpoints = ServerCheckpoint(work / "checkpoints", keep=fed.checkpoint_keep)
    state = checkpoints.resume(flat, ignore=RESUMABLE_KEYS) if fed.resume else None
    if state is not None:
        tracker = FederationTracker.resume(
            state.mlflow_run_id, tracking_uri=fed.tracking_uri, default_dir=work
        )
        if "round_report" in state.extra:
            tracker.log_round(RoundReport.from_json(state.extra["round_report"]))
        strategy.set_state(state.strategy_state)
        strategy.round_offset = state.server_round
        global_adapter, best = state.global_adapter, state.best
        log(INFO, "Resuming after round %d from %s", state.server_round, state.path)
    else:
        tracker = FederationTracker.start(
            config=flat,
            strategy=fed.strategy,
            base_fingerprint=fingerprint,
            tracking_uri=fed.tracking_uri,
            default_dir=work,
            experiment=fed.experiment,
            run_name=fed.run_name,
        )
        global_adapter, best = initial, None
    log(INFO, "%s", tracker.describe_location())

    offset = strategy.round_offset
    remaining = num_rounds - offset
    round_config = ConfigRecord({"base-fingerprint": fingerprint})
    started = time.monotonic()
    summary_path = work / "summary.json"
    summary = (
        json.loads(summary_path.read_text(encoding="utf-8"))
        if state is not None and summary_path.is_file()
        else {}
    )

    def end_of_round(server_round: int, arrays: ArrayRecord):
        nonlocal best, global_adapter
        if server_round == 0:
            if offset == 0:
                _evaluate_before(grid, strategy, arrays, round_config, fed.round_timeout)
                report = RoundReport.from_site_metrics(0, evaluation=strategy.last_eval_metrics)
                tracker.log_round(report)
                summary["before"] = {site: dict(m) for site, m in strategy.last_eval_metrics.items()}
                _write_json(summary_path, summary)
            return None
        actual = offset + server_round
        tensors = record_to_adapter(arrays, layout_of(initial.tensors))
        global_adapter = Adapter(tensors, {**initial.manifest, "metadata": {"round": actual}})
        report = RoundReport.from_site_metrics(
            actual,
            evaluation=strategy.last_eval_metrics,
            training=strategy.last_train_metrics,
            global_metrics=strategy.privacy_metrics(),  # privacy/client_epsilon etc.; {} without client DP
        )
        tracker.log_round(report)
        parent = report.parent_metrics()
        best = update_best(
            best,
            adapter=global_adapter,
            metric=BEST_METRIC,
            value=parent.get(BEST_METRIC, math.nan),
            server_round=actual,
        )
        checkpoints.save(
            server_round=actual,
            global_adapter=global_adapter,
            config=flat,
            strategy_state=strategy.get_state(),
            mlflow_run_id=tracker.run_id,
            best=best,
            extra={"round_report": report.to_json()},
            ignore=RESUMABLE_KEYS,
        )
        if strategy.last_eval_metrics:
            summary["after"] = {site: dict(m) for site, m in strategy.last_eval_metrics.items()}
            summary["after_round"] = actual
        # Last training metrics per site (a site keeps its entry in rounds it skips, e.g. at its DP budget).
        summary.setdefault("train", {}).update(
            {site: dict(m) for site, m in strategy.last_train_metrics.items()}
        )
        if strategy.privacy_metrics():
            summary["client_privacy"] = strategy.privacy_metrics()
        summary.update(
            rounds_done=actual,
            num_rounds=num_rounds,
            mlflow=tracker.describe_location(),
            run_id=tracker.run_id,
            tracking_uri=tracker.tracking_uri,
        )
        _write_json(summary_path, summary)
        elapsed = time.monotonic() - started
        eta = elapsed / server_round * (remaining - server_round)
        dice = parent.get(BEST_METRIC, math.nan)
        quality = f"mean test Dice@1 {dice:.3f}" if not math.isnan(dice) else "not evaluated this round"
        log(
            INFO,
            "Round %d/%d done: %s; %.0f s elapsed, ETA %.0f s",
            actual,
            num_rounds,
            quality,
            elapsed,
            eta,
        )
        return None

    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=adapter_to_record(global_adapter.tensors),
            num_rounds=remaining,
            timeout=fed.round_timeout,
            train_config=round_config,
            evaluate_config=ConfigRecord(dict(round_config)),
            evaluate_fn=end_of_round,
        )
    else:
        log(INFO, "All %d rounds were already done; nothing to run", num_rounds)
    tracker.finish(final_adapter=global_adapter, best=best)
    from shared.adapters import save_adapter

    save_adapter(global_adapter, work / "final_adapter")
    log(INFO, "Final adapter: %s", work / "final_adapter.safetensors")
    log(INFO, "%s", tracker.describe_location())


def _evaluate_before(grid: Grid, strategy, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> None:
    """Every site evaluates the starting adapter (the 'before federation' column of the results)."""
    messages = strategy.configure_evaluate(
        0 - strategy.round_offset, arrays, ConfigRecord(dict(config)), grid
    )
    replies = grid.send_and_receive(messages, timeout=timeout)
    strategy.aggregate_evaluate(0 - strategy.round_offset, replies)


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content, indent=1, default=str) + "\n")
    tmp.replace(path)
