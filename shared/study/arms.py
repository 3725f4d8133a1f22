"""The arms of a study: how each one trains its models.

* ``zero-shot``: the base with a fresh adapter; nothing trains.
* ``local``: one model per site, on that site's training data only; the epoch chunk is chosen on its validation
  split (:func:`shared.training.selection.train_with_selection`).
* ``pooled``: one model on every site's training data together, chosen on their validation data together (an
  upper bound that exists only because the study sees every folder; a real consortium cannot pool).
* ``federated``: the real Flower federation of all sites (simulation engine, the same ServerApp and ClientApp
  as a deployment); the round is chosen on the sites' validation splits by the server.
* ``loso``: for every site, a federation of the other sites (external generalisation to the left-out one).

An arm may run in several variants side by side: ``KIND@LABEL`` (``federated@product``, ``local@dora``) is arm
``KIND`` under its own config (``--set federated@product:federation.lora-aggregation=product``), and its models
are named after it (``federated@product``, ``local@dora:site_a``).

An arm returns :class:`TrainedModel` s; the study tests each on every site (:mod:`shared.study.evaluation`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.adapters import extract_adapter, model_specs, save_adapter
from shared.base import load_base, wrap_for_training
from shared.config import FedabusConfig, to_flat_dict
from shared.metric_names import VAL, metric_key
from shared.study.sites import StudyError, StudySite, pooled_site, write_fold_sites
from shared.training.selection import train_with_selection
from shared.training.site import SiteData

__all__ = ["ARMS", "ArmContext", "TrainedModel", "arm_kind", "train_arm"]

ARMS = ("zero-shot", "local", "pooled", "federated", "loso")
_VARIANT = re.compile(r"[a-z0-9][a-z0-9-]*")


def arm_kind(arm: str) -> str:
    """The kind (one of :data:`ARMS`) of ``arm``, which is ``KIND`` or ``KIND@LABEL`` (module docstring); raises
    :class:`StudyError` naming the arm otherwise."""
    kind, at, label = arm.partition("@")
    if kind not in ARMS or (at and not _VARIANT.fullmatch(label)):
        raise StudyError(
            f"unknown arm {arm!r}: an arm is one of {', '.join(ARMS)}, or KIND@LABEL for a variant with its own "
            "config (LABEL: lower-case letters, digits and dashes, e.g. federated@product)"
        )
    return kind


@dataclass(frozen=True)
class TrainedModel:
    """A model of an arm: its name (``local:site_a``, ``loso:-site_b``, ``federated``), the sites whose
    training data it saw, its adapter file and how it was chosen."""

    name: str
    trained_on: tuple[str, ...]
    adapter_path: Path
    selection: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ArmContext:
    """What every arm needs: the arm's config, the base, the sites and this fold's view of them, where to write,
    the device, the seed, the number of rounds and a progress printer."""

    config: FedabusConfig
    base_path: Path
    sites: Sequence[StudySite]
    views: Sequence[SiteData]
    out: Path
    device: torch.device
    seed: int
    rounds: int
    say: Callable[[str], None] = print
    #: MLflow store, experiment and the run the federations' own runs are nested under.
    tracking_uri: str = ""
    experiment: str = "fedabus-study"
    parent_run_id: str = ""


def _fresh_models(context: ArmContext) -> tuple[dict[str, Any], dict[str, str]]:
    base = load_base(context.base_path, attention_impl=context.config.model.attention_impl)
    torch.manual_seed(context.seed)  # the same fresh adapter for every model of a repeat
    return wrap_for_training(base, model_specs(context.config)), base.fingerprints


def _save(models: dict[str, Any], fingerprints: dict[str, str], path: Path, name: str) -> Path:
    adapter = extract_adapter(models, base_fingerprints=fingerprints, metadata={"study-model": name})
    tensors, _manifest = save_adapter(adapter, path)
    return tensors


def _zero_shot(context: ArmContext, arm: str) -> list[TrainedModel]:
    models, fingerprints = _fresh_models(context)
    return [TrainedModel(arm, (), _save(models, fingerprints, context.out / arm, arm))]


def _trained(context: ArmContext, name: str, data: SiteData, trained_on: tuple[str, ...]) -> TrainedModel:
    models, fingerprints = _fresh_models(context)

    def progress(r: int, rounds: int, value: float) -> None:
        context.say(f"    {name}: round {r}/{rounds}, {selection_metric} {value:.3f}")

    selection_metric = metric_key(context.config.train.select_metric, split=VAL)
    selection = train_with_selection(
        models,
        data,
        context.config,
        device=context.device,
        rounds=context.rounds,
        eval_every=context.config.federation.eval_interval,
        fingerprints=fingerprints,
        seed=context.seed,
        progress=progress,
    )
    path = _save(models, fingerprints, context.out / name.replace(":", "_"), name)
    chosen = {"metric": selection.metric, "round": selection.chosen_round, "value": selection.value}
    return TrainedModel(name, trained_on, path, {**chosen, "note": selection.note})


def _local(context: ArmContext, arm: str) -> list[TrainedModel]:
    return [_trained(context, f"{arm}:{view.name}", view, (view.name,)) for view in context.views]


def _pooled(context: ArmContext, arm: str) -> list[TrainedModel]:
    names = tuple(view.name for view in context.views)
    return [_trained(context, arm, pooled_site(context.views), names)]


def _federation(context: ArmContext, name: str, include: Sequence[str]) -> TrainedModel:
    from shared.simulation import run_simulation

    if len(include) < 2:
        raise StudyError(f"{name}: a federation needs at least 2 sites, got {list(include)}")
    root = context.out / name.replace(":", "_")
    if root.exists():
        shutil.rmtree(root)
    sites_dir = write_fold_sites(root / "sites", context.sites, context.views, include)
    work = root / "server"
    overrides = {
        **_changed_keys(context.config),
        "num-server-rounds": context.rounds,
        "model.base-path": str(context.base_path),
        "federation.sites-dir": str(sites_dir),
        "federation.work-dir": str(work),
        "federation.min-sites": len(include),
        "federation.resume": False,
        "federation.final-test": False,  # the study tests the chosen adapter on every site itself
        "federation.tracking-uri": context.tracking_uri or f"sqlite:///{root / 'mlflow.db'}",
        "federation.experiment": context.experiment,
        "federation.run-name": name,
        "train.seed": context.seed,
        "train.progress": False,
    }
    rounds = re.compile(r"Round \d+/\d+ done.*")

    def relay(line: str) -> None:
        found = rounds.search(line)
        if found:
            context.say(f"    {name}: {found.group(0)}")

    code = run_simulation(
        overrides,
        sites=len(include),
        flwr_home=root / "flwr-home",
        cwd=root,
        on_line=relay,
        log_path=root / "flwr.log",
    )
    chosen = work / "chosen_adapter.safetensors"
    if code != 0 or not chosen.is_file():
        raise StudyError(f"{name}: the federation failed (exit {code}); its log: {root / 'flwr.log'}")
    summary = json.loads((work / "summary.json").read_text(encoding="utf-8"))
    if context.parent_run_id and context.tracking_uri:  # show the federation's runs beneath the arm's run
        from mlflow import MlflowClient

        MlflowClient(context.tracking_uri).set_tag(
            summary["run_id"], "mlflow.parentRunId", context.parent_run_id
        )
    return TrainedModel(name, tuple(include), chosen, dict(summary.get("selection", {})))


def _changed_keys(config: FedabusConfig) -> dict[str, Any]:
    """The run-config keys whose value differs from the schema default (the rest the ServerApp knows)."""
    defaults = to_flat_dict(FedabusConfig())
    return {k: v for k, v in to_flat_dict(config).items() if defaults.get(k) != v}


def _federated(context: ArmContext, arm: str) -> list[TrainedModel]:
    return [_federation(context, arm, [view.name for view in context.views])]


def _loso(context: ArmContext, arm: str) -> list[TrainedModel]:
    names = [view.name for view in context.views]
    if len(names) < 3:
        raise StudyError(
            f"loso needs at least 3 sites (a federation of 2 for each left-out site), got {len(names)}"
        )
    return [_federation(context, f"{arm}:-{left}", [n for n in names if n != left]) for left in names]


_TRAINERS: dict[str, Callable[[ArmContext, str], list[TrainedModel]]] = {
    "zero-shot": _zero_shot,
    "local": _local,
    "pooled": _pooled,
    "federated": _federated,
    "loso": _loso,
}


def train_arm(arm: str, context: ArmContext) -> list[TrainedModel]:
    """Train the models of ``arm`` (one of :data:`ARMS`, or a ``KIND@LABEL`` variant) in ``context``; adapters
    are written under ``context.out``."""
    trainer = _TRAINERS[arm_kind(arm)]
    context.out.mkdir(parents=True, exist_ok=True)
    return trainer(context, arm)
