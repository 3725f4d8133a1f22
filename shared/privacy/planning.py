"""The budget check before a site trains a round under sample-level DP.

:func:`plan_private_round` turns the ``[privacy]`` and ``[train]`` settings, the site's number of training cases
n and its :class:`~shared.privacy.ledger.PrivacyLedger` into a :class:`RoundPlan`: for each model the Poisson
sample rate q = min(1, B / n) and ceil(n / B) steps per epoch (B = ``train.seg-batch-size`` /
``train.cls-batch-size``), the steps of this round (local epochs × steps per epoch), the noise multiplier, and
the cumulative ε after the round; the round is allowed when no model would exceed the budget. The segmenter's
expected batch under DP is ``privacy.seg-batch-size`` when set (larger batches: less noise per case, see
docs/privacy.md), trained in physical batches of ``train.seg-batch-size``.

* Noise multiplier: with ``privacy.target-epsilon`` > 0, Opacus' ``get_noise_multiplier`` for the whole planned
  run, ``num_rounds`` (Flower's ``num-server-rounds``) × the steps of one round, so that a run that starts
  with an empty ledger ends at (just below) the target; otherwise ``privacy.noise-multiplier``.
* δ = ``privacy.delta``, or 1 / (10 n) when it is 0.
* Budget = the smaller of ``privacy.epsilon-budget`` (or, when 0, ``privacy.target-epsilon``) and the site's own
  budget (``epsilon-budget`` in its node config); no budget (``inf``) when both are 0. Earlier rounds and
  runs recorded in the ledger count: a site that spent its budget does not train again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.config import FedabusConfig, PrivacyConfig
from shared.privacy.accounting import noise_multiplier_for
from shared.privacy.dp_sgd import DPSettings
from shared.privacy.ledger import MODELS, PrivacyLedger
from shared.privacy.sampling import poisson_sampling
from shared.privacy.validation import PrivacyConfigError, resolve_delta, validate_privacy

__all__ = ["ModelPlan", "RoundPlan", "plan_private_round", "privacy_budget"]


@dataclass(frozen=True)
class ModelPlan:
    """One model's DP-SGD in the planned round; ``noise_multiplier`` is 0 when the model trains no step
    (0 local epochs). ε values are cumulative for the site at the plan's δ."""

    model: str
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    epochs: int
    expected_batch_size: int
    epsilon_before: float
    epsilon_after: float
    allowed: bool
    #: The most cases one forward/backward pass takes (``train.seg-batch-size`` / ``train.cls-batch-size``); a
    #: larger Poisson batch is trained in physical batches of this size and one noisy step.
    physical_batch_size: int = 0

    @property
    def steps(self) -> int:
        """DP-SGD steps of this round (noise-only steps for empty Poisson batches included)."""
        return self.epochs * self.steps_per_epoch


@dataclass(frozen=True)
class RoundPlan:
    """The plan of one round at one site (module docstring). ``budget`` is ``inf`` without a budget."""

    seg: ModelPlan
    cls: ModelPlan
    delta: float
    budget: float
    accountant: str
    max_grad_norm: float
    #: ``privacy.seg-trainable``: the segmenter's fully trained submodules that still train under DP.
    seg_trainable: str
    n_cases: int
    num_rounds: int
    server_round: int
    run: str

    @property
    def models(self) -> dict[str, ModelPlan]:
        """``{"seg": ..., "cls": ...}``."""
        return {"seg": self.seg, "cls": self.cls}

    @property
    def allowed(self) -> bool:
        """Whether the round fits the budget for both models."""
        return self.seg.allowed and self.cls.allowed

    @property
    def reason(self) -> str:
        """Why the round is not allowed (empty when it is), for the site's log and the coordinator."""
        return "; ".join(
            f"{plan.model}: ε would reach {plan.epsilon_after:.4g} after this round (spent so far "
            f"{plan.epsilon_before:.4g}, δ = {self.delta:.3g}), above the site's budget {self.budget:.4g}"
            for plan in self.models.values()
            if not plan.allowed
        )

    def settings(self, model: str, *, seed: int | None = None) -> DPSettings:
        """The DP-SGD settings of ``model`` for this round (``seed``: tests only; None draws OS entropy)."""
        plan = self.models[model]
        if plan.steps == 0:
            raise ValueError(f"{model} trains no step this round (0 local epochs): nothing to make private")
        return DPSettings(
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            sample_rate=plan.sample_rate,
            steps_per_epoch=plan.steps_per_epoch,
            expected_batch_size=plan.expected_batch_size,
            accountant=self.accountant,
            seed=seed,
            physical_batch_size=plan.physical_batch_size,
        )


def privacy_budget(privacy: PrivacyConfig, site_budget: float = 0.0) -> float:
    """min(``epsilon-budget`` or else ``target-epsilon``, ``site_budget``) over the values > 0; ``inf`` if none."""
    if not (math.isfinite(site_budget) and site_budget >= 0):
        raise PrivacyConfigError(f"site epsilon-budget = {site_budget!r} must be finite and >= 0 (0: none)")
    configured = privacy.epsilon_budget if privacy.epsilon_budget > 0 else privacy.target_epsilon
    candidates = [value for value in (configured, site_budget) if value > 0]
    return min(candidates) if candidates else math.inf


def _model_plan(
    model: str,
    config: FedabusConfig,
    *,
    n_cases: int,
    num_rounds: int,
    delta: float,
    budget: float,
    ledger: PrivacyLedger,
) -> ModelPlan:
    privacy, train = config.privacy, config.train
    if model == "seg":
        physical, epochs = train.seg_batch_size, train.seg_epochs
        batch = privacy.seg_batch_size or physical
    else:
        physical = batch = train.cls_batch_size
        epochs = train.cls_epochs
    rate, per_epoch = poisson_sampling(n_cases, batch)
    steps = epochs * per_epoch
    before = ledger.epsilon(model, delta, accountant=privacy.accountant)
    expected = min(batch, n_cases)
    if steps == 0:
        return ModelPlan(model, 0.0, rate, per_epoch, epochs, expected, before, before, True, physical)
    sigma = privacy.noise_multiplier
    if privacy.target_epsilon > 0:
        sigma = noise_multiplier_for(
            target_epsilon=privacy.target_epsilon,
            delta=delta,
            sample_rate=rate,
            steps=num_rounds * steps,
            accountant=privacy.accountant,
        )
    over, after = ledger.would_exceed(
        model,
        noise_multiplier=sigma,
        sample_rate=rate,
        steps=steps,
        delta=delta,
        budget=budget,
        accountant=privacy.accountant,
    )
    return ModelPlan(model, sigma, rate, per_epoch, epochs, expected, before, after, not over, physical)


def plan_private_round(
    config: FedabusConfig,
    n_train_cases: int,
    num_rounds: int,
    ledger: PrivacyLedger,
    *,
    site_budget: float = 0.0,
    server_round: int = 0,
    run: str = "",
) -> RoundPlan:
    """Plan (and budget-check) the next round of a site with ``n_train_cases`` training cases.

    Args:
        config: needs ``privacy.sample-dp``; validated with :func:`validate_privacy` first.
        n_train_cases: the site's usable training cases n (the privacy unit is one case).
        num_rounds: rounds of the whole run (Flower's ``num-server-rounds``), for a ``target-epsilon``.
        ledger: the site's ledger (earlier spending counts against the budget).
        site_budget: the site's own ε budget (node config ``epsilon-budget``); 0 = none.
        server_round, run: recorded with the round's ledger entries.

    Returns:
        the :class:`RoundPlan`; check ``plan.allowed`` (and show ``plan.reason``) before training.
    """
    if not config.privacy.sample_dp:
        raise ValueError("plan_private_round needs privacy.sample-dp = true")
    if num_rounds < 1:
        raise ValueError(f"num-server-rounds = {num_rounds} must be >= 1")
    validate_privacy(config, n_train_cases)
    delta = resolve_delta(config.privacy, n_train_cases)
    budget = privacy_budget(config.privacy, site_budget)
    common = {"n_cases": n_train_cases, "num_rounds": num_rounds, "delta": delta, "budget": budget}
    plans = {model: _model_plan(model, config, ledger=ledger, **common) for model in MODELS}
    return RoundPlan(
        seg=plans["seg"],
        cls=plans["cls"],
        delta=delta,
        budget=budget,
        accountant=config.privacy.accountant,
        max_grad_norm=config.privacy.max_grad_norm,
        seg_trainable=config.privacy.seg_trainable,
        n_cases=n_train_cases,
        num_rounds=num_rounds,
        server_round=server_round,
        run=run,
    )
