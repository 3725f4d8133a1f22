"""Honest model selection for training without a federation (``train-local``, a study's local and pooled arms).

Training runs in ``rounds`` chunks of the configured local epochs (``train.seg-epochs`` and ``train.cls-epochs``
each), exactly as a site trains in ``rounds`` federated rounds, so a local model and a federated one see the
same number of epochs. The validation split is evaluated before the first chunk (round 0, the starting
adapter) and after every ``eval_every``-th chunk and the last; the adapter with the best
``val/<train.select-metric>`` is kept and put back into the models at the end. The test split is never
looked at here: the caller tests the chosen models once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.adapters import Adapter, apply_adapter, extract_adapter
from shared.config import FedabusConfig
from shared.metric_names import VAL, metric_key
from shared.training.site import SiteData, evaluate_site, train_site

__all__ = ["Selection", "train_with_selection"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """What selection saw and chose.

    ``metric`` is the validation key (``val/dice_1click``); ``chosen_round`` the chunk whose adapter was kept
    (0: the starting adapter, also when no validation case exists and nothing can be compared — then the last
    round is kept and ``note`` says so); ``history`` maps each evaluated round to its validation metrics;
    ``training`` holds the training metrics of every chunk.
    """

    metric: str
    chosen_round: int
    value: float
    rounds: int
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    training: list[dict[str, float]] = field(default_factory=list)
    note: str = ""


def _snapshot(models: dict[str, Any], fingerprints: dict[str, str]) -> Adapter:
    adapter = extract_adapter(models, base_fingerprints=fingerprints)
    return Adapter({k: v.clone() for k, v in adapter.tensors.items()}, adapter.manifest)


def train_with_selection(
    models: dict[str, Any],
    site: SiteData,
    config: FedabusConfig,
    *,
    device: torch.device,
    rounds: int,
    fingerprints: dict[str, str],
    eval_every: int = 1,
    seed: int = 0,
    progress: Any = None,
) -> Selection:
    """Train ``models`` on ``site``'s training split for ``rounds`` chunks, select on its validation split,
    and leave the chosen adapter in ``models``. ``progress(round, rounds, value)`` is called after each
    evaluated chunk when given."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    metric = metric_key(config.train.select_metric, split=VAL)
    has_val = bool(site.val_cases)
    history: dict[int, dict[str, float]] = {}
    best_round, best_value, best = 0, math.nan, None
    if has_val:
        history[0] = evaluate_site(models, site, config, device=device, split="val")
        best_value, best = history[0].get(metric, math.nan), _snapshot(models, fingerprints)
    training = []
    for r in range(1, rounds + 1):
        torch.manual_seed(seed * 1_000_003 + r)
        training.append(train_site(models, site, config, device=device, seed=seed * 1_000_003 + r))
        if has_val and (r % max(1, eval_every) == 0 or r == rounds):
            history[r] = evaluate_site(models, site, config, device=device, split="val")
            value = history[r].get(metric, math.nan)
            if not math.isnan(value) and (math.isnan(best_value) or value > best_value):
                best_round, best_value, best = r, value, _snapshot(models, fingerprints)
            if progress is not None:
                progress(r, rounds, value)
    note = ""
    if not has_val:
        best_round, note = rounds, f"{site.name}: no validation case; the last round is kept"
    elif best is None or math.isnan(best_value):
        best_round, note = rounds, f"{site.name}: {metric} undefined in every round; the last round is kept"
    elif best_round != rounds:
        apply_adapter(models, best, base_fingerprints=fingerprints)
    if note:
        logger.warning("%s", note)
    return Selection(metric, best_round, best_value, rounds, history, training, note)
