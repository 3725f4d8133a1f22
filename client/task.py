"""The site's side of a round, without Flower's app API: which site this is, its base, and the work per message.

The global adapter arrives packed (:mod:`shared.protocol`); it is unpacked with the layout of this site's own
adapter, so a record built from another base or other adapter settings is refused before training. Under
``federation.lora-aggregation = ffa`` the site sets every LoRA A to the shared frozen value
(:func:`shared.adapters.ffa_lora_a`, from ``train.seed`` and the base fingerprint) and freezes it: the record
holds no A, and the update sends none.

A site may train at its own LoRA rank (node config ``lora-rank`` or its site TOML's ``lora-rank``, one of the two;
``federation.lora-aggregation = product`` and
``federation.compression = none`` only): it decodes the global adapter at the run's rank, projects it to its own
(:func:`shared.lora_aggregation.project`, the optimal rank-r approximation of the global ΔW, alpha kept, so the
scaling is alpha / r) and sends its update at that rank; the server reads the rank from the record's sizes.
Evaluation always uses the global adapter at the run's rank.

Train messages travel as ``federation.compression`` says (:mod:`shared.protocol`, "Compression"): the global
adapter is decoded with it, and under ``fp16``/``int8`` the update goes back as the difference from the adapter
received plus the residual kept in the site's state folder (:mod:`client.error_feedback`). Evaluate messages
always carry the exact float32 adapter (``none``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from client.egress import eval_metric_keys, outgoing_adapter, outgoing_metrics, train_metric_keys
from client.error_feedback import load_residual, save_residual
from client.site_setup import SITE_SETUP
from shared.adapters import (
    Adapter,
    adapter_parameters,
    apply_adapter,
    extract_adapter,
    model_specs,
    set_ffa_lora_a,
)
from shared.base import BaseModels, check_filled, working_copy, wrap_for_training
from shared.config import ConfigError, FedabusConfig, load_site_config
from shared.device import resolve_device
from shared.lora_aggregation import project, rank_layout, scaling_at_rank
from shared.metric_names import CLS_EPSILON, DELTA, NUM_EXAMPLES, PRIVACY, SEG_EPSILON, metric_key
from shared.privacy.ledger import PrivacyLedger
from shared.privacy.planning import RoundPlan, plan_private_round
from shared.protocol import layout_of, record_to_adapter, update_to_record
from shared.training.site import SiteData, evaluate_site, find_site_config, train_site

__all__ = [
    "BaseMismatch",
    "BudgetSpent",
    "SiteSettings",
    "base_of",
    "open_site_of",
    "run_evaluate",
    "run_train",
    "site_settings",
]

logger = logging.getLogger(__name__)


class BaseMismatch(RuntimeError):
    """The site's base checkpoint is not the one the server federates; the site does not train."""


class BudgetSpent(RuntimeError):
    """Sample-level DP: the next round would exceed this site's ε budget; the site does not train.

    ``metrics`` holds the site's privacy metrics (ε spent so far), which it reports with its refusal."""

    def __init__(self, message: str, metrics: dict[str, float], site: str) -> None:
        super().__init__(message)
        self.metrics = metrics
        self.site = site


@dataclass(frozen=True)
class SiteSettings:
    """Where a site's data and base are, from its node config (deployment) or the run config (simulation)."""

    site_dir: Path
    site_config: Path | None
    base_path: Path
    device: str
    #: The site's own state (the privacy ledger): node config ``state-dir``; default
    #: ``~/.fedabus/site-state/<site folder>``, in simulation ``<sites-dir>/../site-state/<site folder>``.
    state_dir: Path
    #: The site's own ε budget (node config ``epsilon-budget``; 0: the run's budget only).
    epsilon_budget: float = 0.0
    #: CPU threads torch may use (node config ``threads``; 0: torch's default, one per core).
    threads: int = 0
    #: Name shown in reports and MLflow (node config ``site-id``; empty: the site config's name or the folder's).
    site_id: str = ""
    #: This site's LoRA rank (node config ``lora-rank`` or the site TOML's; 0: the run's ``adapter.lora-rank``).
    lora_rank: int = 0

    def apply_threads(self) -> None:
        """Limit torch's CPU threads when the node config asks (several sites sharing one machine)."""
        if self.threads > 0:
            torch.set_num_threads(self.threads)


def site_settings(node_config: dict[str, Any], config: FedabusConfig) -> SiteSettings:
    """Deployment: ``--node-config 'data-path="..." [site-config="..."] [base-path="..."] [device="cuda"]
    [state-dir="..."] [epsilon-budget=3.0] [threads=4] [site-id="..."] [lora-rank=8]'``. Simulation: the
    ``partition-id``-th sub-folder (name order) of
    ``federation.sites-dir``."""
    if "data-path" in node_config:
        site_dir = Path(str(node_config["data-path"]))
    elif "partition-id" in node_config and config.federation.sites_dir:
        folders = sorted(p for p in Path(config.federation.sites_dir).iterdir() if p.is_dir())
        index = int(node_config["partition-id"])
        if index >= len(folders):
            raise ValueError(
                f"simulated node {index} has no site: {config.federation.sites_dir} holds {len(folders)}"
            )
        site_dir = folders[index]
    else:
        raise ValueError(
            "this node has no data: start the SuperNode with --node-config 'data-path=\"/path/to/site\"'"
        )
    if not site_dir.is_dir():
        raise ValueError(f"{site_dir}: site data folder not found (node config data-path)")
    base = node_config.get("base-path") or config.model.base_path
    if not base:
        raise ValueError(
            "no base checkpoint: set model.base-path in the run config or base-path in the node config"
        )
    site_config = node_config.get("site-config")
    if node_config.get("state-dir"):
        state_dir = Path(str(node_config["state-dir"]))
    elif "data-path" in node_config:
        state_dir = Path.home() / ".fedabus" / "site-state" / site_dir.name
    else:
        state_dir = Path(config.federation.sites_dir).resolve().parent / "site-state" / site_dir.name
    try:
        budget = float(node_config.get("epsilon-budget", 0.0))
        threads = int(node_config.get("threads", 0))
    except (TypeError, ValueError):
        raise ValueError(
            "node config epsilon-budget / threads must be numbers, got "
            f"{node_config.get('epsilon-budget')!r} / {node_config.get('threads')!r}"
        ) from None
    lora_rank = site_rank(node_config, site_dir, Path(str(site_config)) if site_config else None, config)
    return SiteSettings(
        site_dir,
        Path(str(site_config)) if site_config else None,
        Path(str(base)),
        str(node_config.get("device", config.model.device)),
        state_dir,
        budget,
        threads,
        str(node_config.get("site-id", "")),
        lora_rank,
    )


def site_rank(
    node_config: dict[str, Any], site_dir: Path, site_config: Path | None, config: FedabusConfig
) -> int:
    """The site's own LoRA rank (0: the run's), one setting in three places: node config ``lora-rank``,
    ``lora-rank`` in the site TOML (``site_config``, else the one :func:`~shared.training.site.find_site_config`
    finds beside ``site_dir``) and the run config's ``federation.site-lora-ranks`` entry of this site's name (node
    config ``site-id``, else the TOML's ``name``, else the folder's). Given in several places with different ranks
    raises :class:`~shared.config.ConfigError` naming each; then checked with :func:`check_site_rank`."""
    try:
        node_rank = int(node_config.get("lora-rank", 0))
    except (TypeError, ValueError):
        raise ConfigError(
            f"node config lora-rank = {node_config.get('lora-rank')!r} must be an integer"
        ) from None
    path = site_config or find_site_config(site_dir)
    toml = load_site_config(path) if path is not None else None
    name = str(node_config.get("site-id", "")) or (toml.name if toml is not None else "") or site_dir.name
    given = {
        where: rank
        for where, rank in (
            ("node config lora-rank", node_rank),
            (f"{path}: lora-rank", toml.lora_rank if toml is not None else 0),
            (f"run config federation.site-lora-ranks ({name})", config.federation.site_ranks().get(name, 0)),
        )
        if rank
    }
    if len(set(given.values())) > 1:
        raise ConfigError(
            "the site's LoRA rank is given in several places and differently: "
            + ", ".join(f"{where} = {rank}" for where, rank in given.items())
            + "; give it in one place (the site TOML, the node config or the run config)"
        )
    where, rank = next(iter(given.items()), ("node config lora-rank", 0))
    check_site_rank(rank, config, where=where)
    return rank


def check_site_rank(rank: int, config: FedabusConfig, *, where: str = "node config lora-rank") -> None:
    """A site's own ``lora-rank`` (0: the run's) is allowed only with ``federation.lora-aggregation = product``
    (the only mode that aggregates ΔW across ranks), and ``federation.compression = none`` (a lossy update is a
    difference from the site's projection, at another layout than the server's reference); raises
    :class:`~shared.config.ConfigError` naming ``where`` it was set and the keys otherwise."""
    if rank == 0 or rank == config.adapter.lora_rank:
        return
    federation = config.federation
    if rank < 0 or federation.lora_aggregation != "product" or federation.compression != "none":
        raise ConfigError(
            f"{where} = {rank} differs from the run's adapter.lora-rank = "
            f"{config.adapter.lora_rank}: a site may train at its own rank (>= 1) only with "
            "federation.lora-aggregation = 'product' and federation.compression = 'none' (this run: "
            f"{federation.lora_aggregation!r}, {federation.compression!r})"
        )


def base_of(settings: SiteSettings, config: FedabusConfig, *, trust_stamp: bool = True) -> BaseModels:
    """The site's base, loaded and fingerprinted once per process (:mod:`client.site_setup`); shared between
    messages, so train only a :func:`shared.base.working_copy` of it. ``trust_stamp=False`` (the query) hashes the
    weights in a fresh process even when the state folder recorded their fingerprints."""
    return SITE_SETUP.base(
        settings.base_path,
        settings.state_dir,
        attention_impl=config.model.attention_impl,
        trust_stamp=trust_stamp,
    )


def _setup(
    settings: SiteSettings, config: FedabusConfig, fingerprint: str, run: str
) -> tuple[BaseModels, SiteData]:
    base = base_of(settings, config)
    if fingerprint and base.fingerprint != fingerprint:
        raise BaseMismatch(
            f"this site's base {settings.base_path} has fingerprint {base.fingerprint}, but the federation uses "
            f"{fingerprint}; install the coordinator's base files (fedabus make-base output) and restart"
        )
    return base, open_site_of(settings, config, run=run)


def open_site_of(settings: SiteSettings, config: FedabusConfig, *, run: str = "") -> SiteData:
    """The site's validated data, opened once per ``run`` and process while its files are unchanged
    (:meth:`client.site_setup.SiteSetup.site`)."""
    return SITE_SETUP.site(settings, config, run=run)


def _models(
    base: BaseModels,
    config: FedabusConfig,
    global_record: ArrayRecord,
    *,
    compression: str = "none",
    rank: int = 0,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The site's models with the global adapter applied, and the adapter tensors received (float32, decoded
    from ``compression``): the ones that travel under ``federation.lora-aggregation``. ``rank`` (0: the run's):
    the site's own LoRA rank; the global adapter is then projected to it (module docstring)."""
    global_rank = config.adapter.lora_rank
    rank = rank or global_rank
    specs = model_specs(config, lora_rank=rank)
    # The global adapter overwrites every fully trained parameter: they are allocated, not copied.
    working = working_copy(base, specs, empty=True)
    models = wrap_for_training(working, specs)
    mode = config.federation.lora_aggregation
    layout = layout_of(
        {
            f"{prefix}.{name}": p
            for prefix, model in models.items()
            for name, p in adapter_parameters(model).items()
        }
    )
    if mode == "ffa":
        set_ffa_lora_a(models, seed=config.train.seed, base_fingerprints=base.fingerprints, freeze=True)
    if rank == global_rank:
        tensors = record_to_adapter(global_record, layout, mode=mode, compression=compression)
    else:
        received = record_to_adapter(global_record, rank_layout(layout, global_rank), mode=mode)
        own = {p: getattr(spec, "scaling", 1.0) for p, spec in specs.items()}  # an automatic seg has no LoRA
        tensors = project(
            received, rank=rank, scaling=scaling_at_rank(own, rank, global_rank), to_scaling=own
        )
    adapter = Adapter(tensors, {"base_fingerprint": dict(base.fingerprints)})
    apply_adapter(models, adapter, base_fingerprints=base.fingerprints)
    check_filled(working)
    return models, tensors


def run_train(
    settings: SiteSettings,
    config: FedabusConfig,
    global_record: ArrayRecord,
    *,
    fingerprint: str,
    server_round: int,
    num_rounds: int = 1,
    run: str = "",
) -> tuple[ArrayRecord, dict[str, float], str]:
    """Train from the global adapter; returns (the checked update as its reply record, checked metrics, site name).

    Under sample-level DP the round is planned against the site's ledger first; :class:`BudgetSpent` when
    it would exceed the site's budget (nothing is trained)."""
    settings.apply_threads()
    base, site = _setup(settings, config, fingerprint, run)
    plan, ledger = _privacy_plan(settings, config, site, num_rounds, server_round, run)
    compression = config.federation.compression
    models, received = _models(base, config, global_record, compression=compression, rank=settings.lora_rank)
    device = resolve_device(settings.device)
    seed = config.train.seed * 1_000_003 + server_round
    metrics = train_site(
        models,
        site,
        config,
        device=device,
        seed=seed,
        proximal=config.train.proximal_mu > 0,
        plan=plan,
        ledger=ledger,
    )
    update = extract_adapter(models, base_fingerprints=base.fingerprints).tensors
    keys = train_metric_keys(config.privacy.sample_dp)
    checked = outgoing_adapter(update, layout_of(received))
    return _reply_record(settings, config, checked, received, run), outgoing_metrics(metrics, keys), site.name


def _reply_record(
    settings: SiteSettings,
    config: FedabusConfig,
    update: dict[str, torch.Tensor],
    received: dict[str, torch.Tensor],
    run: str,
) -> ArrayRecord:
    """The update encoded for the server; under a lossy ``federation.compression`` with the residual of the site's
    last update added, and the new residual kept for the next one (:mod:`client.error_feedback`)."""
    compression, mode = config.federation.compression, config.federation.lora_aggregation
    residual = (
        load_residual(settings.state_dir, layout_of(update), run=run, compression=compression)
        if compression != "none"
        else None
    )
    record, residual = update_to_record(
        update, received, mode=mode, compression=compression, residual=residual
    )
    if residual is not None:
        save_residual(settings.state_dir, residual, run=run, compression=compression)
    return record


def _privacy_plan(
    settings: SiteSettings,
    config: FedabusConfig,
    site: SiteData,
    num_rounds: int,
    server_round: int,
    run: str,
) -> tuple[RoundPlan | None, PrivacyLedger | None]:
    """The DP plan of this round and the site's ledger (None, None without sample-level DP)."""
    if not config.privacy.sample_dp:
        return None, None
    ledger = PrivacyLedger.open(settings.state_dir)
    plan = plan_private_round(
        config,
        len(site.train_cases),
        num_rounds,
        ledger,
        site_budget=settings.epsilon_budget,
        server_round=server_round,
        run=run,
    )
    if not plan.allowed:
        spent = {
            NUM_EXAMPLES: 0.0,
            metric_key(SEG_EPSILON, split=PRIVACY): plan.seg.epsilon_before,
            metric_key(CLS_EPSILON, split=PRIVACY): plan.cls.epsilon_before,
            metric_key(DELTA, split=PRIVACY): plan.delta,
        }
        metrics = outgoing_metrics(spent, train_metric_keys(True))
        raise BudgetSpent(
            f"{site.name} stops training at its privacy budget: {plan.reason}", metrics, site.name
        )
    logger.info(
        "%s: DP round %d, noise multiplier seg %.3f / cls %.3f, ε after %.3f / %.3f (δ %.2g, budget %.3g)",
        site.name,
        server_round,
        plan.seg.noise_multiplier,
        plan.cls.noise_multiplier,
        plan.seg.epsilon_after,
        plan.cls.epsilon_after,
        plan.delta,
        plan.budget,
    )
    return plan, ledger


def run_evaluate(
    settings: SiteSettings,
    config: FedabusConfig,
    global_record: ArrayRecord,
    *,
    fingerprint: str,
    split: str = "val",
    run: str = "",
) -> tuple[dict[str, float], str]:
    """Evaluate the global adapter on the site's ``split`` (``val`` every evaluation round; ``test`` once, for
    the models the server chose); returns (checked metrics, site name)."""
    if split not in ("val", "test"):
        raise ValueError(f"evaluate message asks for split {split!r}; a site evaluates on val or test only")
    settings.apply_threads()
    base, site = _setup(settings, config, fingerprint, run)
    models, _ = _models(base, config, global_record)
    metrics = evaluate_site(models, site, config, device=resolve_device(settings.device), split=split)
    keys = eval_metric_keys(config.train.eval_clicks, split=split, automatic=config.automatic_seg)
    return outgoing_metrics(metrics, keys), site.name
