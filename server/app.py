"""fedabus ServerApp: adapter-only federation with handshake, tracking, checkpoints and resume.

The round loop is Flower's own (``Strategy.start``); fedabus adds hooks (:mod:`server.strategies`) and an
end-of-round callback (:mod:`server.round_end`) that logs every site's validation metrics to MLflow, keeps the
best adapter by validation, saves a checkpoint and prints progress. After the last round the test split is
touched once (:mod:`server.final_test`): every site tests the chosen, the last and the starting adapter.
"""

from __future__ import annotations

import json
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.checkpoint import ServerCheckpoint
from server.final_test import TestedAdapter, run_final_test
from server.handshake import SiteVetting
from server.reports import RoundReport
from server.round_end import RoundEnd, write_json
from server.strategies import build_strategy
from server.tracking import FederationTracker
from shared.adapters import Adapter, extract_adapter, lora_specs_from_config, save_adapter
from shared.base import load_base, wrap_for_training
from shared.config import FedabusConfig, load_run_config, to_flat_dict
from shared.metric_names import VAL
from shared.privacy.validation import validate_privacy
from shared.protocol import BASE_FINGERPRINT, SPLIT, adapter_to_record

app = ServerApp()

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
    config = load_run_config(run_config)
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
    summary_path = work / "summary.json"
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

    round_config = ConfigRecord({BASE_FINGERPRINT: fingerprint})
    round_end = RoundEnd(
        grid=grid,
        strategy=strategy,
        tracker=tracker,
        checkpoints=checkpoints,
        initial=initial,
        global_adapter=global_adapter,
        best=best,
        flat_config=flat,
        resumable_keys=RESUMABLE_KEYS,
        select_metric=config.train.select_metric,
        num_rounds=num_rounds,
        offset=strategy.round_offset,
        round_timeout=fed.round_timeout,
        evaluate_config=ConfigRecord({**dict(round_config), SPLIT: VAL}),
        summary_path=summary_path,
        summary=_read_json(summary_path) if state is not None else {},
    )
    remaining = num_rounds - strategy.round_offset
    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=adapter_to_record(global_adapter.tensors),
            num_rounds=remaining,
            timeout=fed.round_timeout,
            train_config=round_config,
            evaluate_config=round_end.evaluate_config,
            evaluate_fn=round_end,
        )
    else:
        log(INFO, "All %d rounds were already done; nothing to train", num_rounds)
    if fed.final_test:
        _final_test(grid, vetting, round_end, round_config, fed.round_timeout)
    tracker.finish(final_adapter=round_end.global_adapter, best=round_end.best)
    save_adapter(round_end.global_adapter, work / "final_adapter")
    chosen = round_end.best.adapter if round_end.best is not None else round_end.global_adapter
    save_adapter(chosen, work / "chosen_adapter")
    log(INFO, "Chosen adapter (best by validation): %s", work / "chosen_adapter.safetensors")
    log(INFO, "Final adapter: %s", work / "final_adapter.safetensors")
    log(INFO, "%s", tracker.describe_location())


def _final_test(
    grid: Grid, vetting: SiteVetting, end: RoundEnd, config: ConfigRecord, timeout: float
) -> None:
    """Test the chosen, the last and the starting adapter once at every admitted site (see
    :mod:`server.final_test`); the results go to ``summary.json`` (``after`` is the chosen adapter)."""
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
    online = set(grid.get_node_ids())
    sites = {node: name for node, name in vetting.accepted.items() if node in online}
    results = run_final_test(grid, sites, adapters, config=config, timeout=timeout, tracker=end.tracker)
    end.summary.update(results)
    end.summary["after_round"] = adapters[0].server_round
    end.summary["last_round"] = last_round
    end.summary["tested_rounds"] = sorted({a.server_round for a in adapters})
    write_json(end.summary_path, end.summary)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
