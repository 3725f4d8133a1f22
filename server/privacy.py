"""Client-level differential privacy on adapter updates: Flower's DP wrappers around the fedabus strategies.

Over 500 lines on purpose: a fifth is the statement below of what is protected and which decisions fedabus
takes, and the hooks stay beside the wrapper choice they correct (accounting lives in
:mod:`server.privacy_accountant`).

``privacy.client-dp`` picks one of Flower 1.41's wrappers (:data:`CLIENT_DP_WRAPPERS`); :func:`wrap_with_client_dp`
puts it around the strategy :func:`server.strategies.build_strategy` made, and :class:`ClientDPHooks` keeps every
fedabus hook working through it (round numbering, deadline sampling, declined sites, per-site metrics, state).

What is protected and how (the privacy unit is one site; neighbouring federations differ by one site's update
being present or absent). In a round that samples ``m`` sites, with global adapter ``g``, clip norm ``C`` and
noise multiplier ``σ``, each update ``u_i − g`` (both models together, as packed in the ``arrays`` record) is
clipped to L2 norm ``C`` — on the server (``server-*``) or at the site by :mod:`client.privacy`
(``client-*``) — and the new global adapter is::

    g + (Σ_i clip(u_i − g, C)) / m + N(0, (σ C / m)² I)

Decisions fedabus takes where Flower leaves them open:

* **Uniform weights, fixed denominator.** Under client-level DP every site weighs the same and the sum is divided
  by the number of *sampled* sites (:class:`FixedDenominatorMean`), not weighted by ``num-examples``: a case-count
  weight would leak case counts through the model and break the sensitivity bound ``C / m``. A site that fails
  or declines counts as a zero update, so the bound holds whoever replies.
* **Aggregators.** Only ``fedavg`` and ``fedprox`` (whose aggregate is the mean) may be combined with
  client-level DP. FedAdam would add the noise after its optimiser step, and median, trimmed mean and Krum pick
  or reorder updates: one site's influence is then not bounded by ``C / m`` and the stated ε would be false
  (:func:`check_client_dp` refuses them).
* **Accounting.** Flower's own accountant needs the ``flwr[dp]`` extra (not installed) and refuses strategies that
  override ``aggregate_train`` (ours do). :class:`ClientPrivacyAccountant` therefore composes one sampled
  Gaussian mechanism per released round with Opacus' RDP analysis, at sampling rate (sampled sites / eligible
  sites). With ``federation.fraction-train = 1`` (the default) the rate is 1 and the bound is exact; below 1 it
  uses the Poisson-sampling analysis although sites are drawn without replacement, so the ε *without*
  amplification is reported too. The noise multiplier of the adaptive modes is the combined one of Andrew et
  al. (update and clipped-count noise together), so both modes account the configured ``σ``.
* **Adaptive clipping.** Flower 1.41 updates the clip norm before adding the round's noise; fedabus adds noise
  for the norm the updates were clipped with. The clipped-count noise is ``max(m / 20, σ)`` (Flower's default
  ``m / 20`` would refuse any ``σ ≥ 0.3`` with three sites).
* **Admission first.** Every update passes the wrapped strategy's admission (:mod:`server.admission`) before it
  is clipped; a refused update is dropped and, like a failed site, counts as a zero update (the denominator
  stays the number of sampled sites).
* **Budget stop.** With ``privacy.client-epsilon-budget`` > 0, every round is checked after its sites are
  sampled and before any message goes out: if the ε after its release (at this round's sampling rate) would exceed
  the budget, :class:`ClientPrivacyBudgetSpent` ends the run there, so the last round run is the last one under
  budget. Spent releases are journalled (:mod:`server.privacy_accountant`), so a resumed run continues them.
* **Client-side clipping is checked.** In ``client-*`` modes the server measures every update and clips again any
  that exceeds ``C`` (a site without the clipping mod), with a warning.

Training and evaluation *metrics* are not covered by the guarantee (they travel and are logged as they are).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import KEY_NORM_BIT, compute_stdv

from server.privacy_accountant import ClientPrivacyAccountant
from server.replies import site_of, updates_of
from shared.config import ConfigError, PrivacyConfig
from shared.metric_names import (
    CLIENT_CLIP_NORM,
    CLIENT_EPSILON,
    CLIENT_EPSILON_NO_AMPLIFICATION,
    CLIENT_NOISE_STD,
    PRIVACY,
    metric_key,
)
from shared.privacy.ledger import exceeds_budget
from shared.protocol import ARRAYS, METRICS

__all__ = [
    "CLIENT_DP_WRAPPERS",
    "DP_STRATEGIES",
    "ClientDPHooks",
    "ClientPrivacyBudgetSpent",
    "FixedDenominatorMean",
    "DP_LORA_AGGREGATION",
    "check_client_dp",
    "clipped_count_stddev",
    "fixed_denominator_mean",
    "update_norm",
    "wrap_with_client_dp",
]

#: ``privacy.client-dp`` value -> Flower 1.41 wrapper (where the update is clipped; fixed or adaptive norm).
CLIENT_DP_WRAPPERS: dict[str, type] = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}
#: Strategies whose aggregate is the mean of the updates, the only ones the noise calibration holds for.
DP_STRATEGIES = ("fedavg", "fedprox")
#: Relative slack when checking that a site clipped its update (float32 rounding of the scaled update).
_CLIP_SLACK = 1e-5
#: Keys of the state that must survive a restart (with the wrapped strategy's own state).
_STATE_CLIP_NORM = "client-dp/clipping-norm"
_STATE_LEDGER = "client-dp/ledger"


# ------------------------------------------------------------------------------------------ settings
#: ``federation.lora-aggregation`` modes client-level DP supports: the sensitivity bound (clip norm / sampled
#: sites) holds for the element-wise mean of the packed updates, not for ``product``'s SVD of their ΔW sum.
DP_LORA_AGGREGATION = ("naive", "ffa")


def check_client_dp(
    privacy: PrivacyConfig, strategy: str, lora_aggregation: str = "naive", compression: str = "none"
) -> str:
    """Validate the client-level DP settings against the aggregation strategy, ``federation.lora-aggregation`` and
    ``federation.compression``; returns the mode (or ``off``).

    Raises :class:`~shared.config.ConfigError` naming the setting: an unknown mode, a noise multiplier below 0,
    a clip norm not above 0, a δ outside (0, 1), a strategy whose aggregate the noise cannot protect, a LoRA
    aggregation outside :data:`DP_LORA_AGGREGATION`, or site-side clipping (``client-*``) with a compressed
    uplink (Flower's clipping mod measures ``reply − request`` on the arrays as they travel; server-side clipping
    sees the decoded update and works with any compression).
    """
    mode = privacy.client_dp.strip().lower()
    if mode == "off":
        return mode
    if mode not in CLIENT_DP_WRAPPERS:
        allowed = ", ".join(["off", *CLIENT_DP_WRAPPERS])
        raise ConfigError(
            f"privacy.client-dp = {privacy.client_dp!r} is not a known mode; allowed: {allowed}"
        )
    z, clip, delta = privacy.client_noise_multiplier, privacy.client_clip_norm, privacy.client_delta
    if not math.isfinite(z) or z < 0:
        raise ConfigError(
            f"privacy.client-noise-multiplier = {z!r} must be a finite number >= 0 "
            "(noise std = multiplier x clip norm / sampled sites)"
        )
    if not math.isfinite(clip) or clip <= 0:
        raise ConfigError(f"privacy.client-clip-norm = {clip!r} must be a finite number > 0 (L2 norm)")
    if not math.isfinite(delta) or not 0 < delta < 1:
        raise ConfigError(
            f"privacy.client-delta = {delta!r} must lie strictly between 0 and 1 (choose below 1 / sites)"
        )
    if strategy not in DP_STRATEGIES:
        raise ConfigError(
            f"federation.strategy = {strategy!r} cannot be combined with privacy.client-dp = {mode!r}: "
            f"{_why_not(strategy)} Use one of {', '.join(DP_STRATEGIES)}, or set privacy.client-dp = 'off'."
        )
    if lora_aggregation not in DP_LORA_AGGREGATION:
        raise ConfigError(
            f"federation.lora-aggregation = {lora_aggregation!r} cannot be combined with privacy.client-dp = "
            f"{mode!r}: the SVD re-factorisation is a non-linear map of the clipped updates, so the noise would not "
            f"give the reported ε. Use federation.lora-aggregation = {' or '.join(map(repr, DP_LORA_AGGREGATION))} "
            "with client-level DP, or set privacy.client-dp = 'off'."
        )
    if mode.startswith("client-") and compression != "none":
        raise ConfigError(
            f"federation.compression = {compression!r} cannot be combined with privacy.client-dp = {mode!r}: the "
            "sites' clipping mod measures the update on the arrays as they travel, which are encoded. Use "
            "federation.compression = 'none' with site-side clipping, or a server-side mode (server-fixed, "
            "server-adaptive)."
        )
    budget = privacy.client_epsilon_budget
    if z == 0 and budget > 0:
        raise ConfigError(
            f"privacy.client-epsilon-budget = {budget!r} with privacy.client-noise-multiplier = 0: without noise "
            "one release already spends ε = inf, so no round fits the budget; set a noise multiplier > 0"
        )
    if z == 0:
        log(
            WARNING,
            "privacy.client-noise-multiplier = 0: updates are clipped but not noised (no DP, ε = inf)",
        )
    return mode


def _why_not(strategy: str) -> str:
    if strategy == "fedadam":
        return (
            "the noise would be added after FedAdam's optimiser step, which rescales the average, so one "
            "site's influence is not bounded by clip norm / sampled sites."
        )
    return (
        "a robust aggregator selects or reorders the sites' updates, so one site's influence on the aggregate "
        "is not bounded by clip norm / sampled sites and the Gaussian noise would not give the reported ε."
    )


def clipped_count_stddev(noise_multiplier: float, sampled_sites: int) -> float | None:
    """Noise std of the clipped-update count in adaptive clipping: ``max(m / 20, σ)``; None when ``σ`` is 0.

    Andrew et al. recommend ``m / 20``; Flower refuses ``σ ≥ 2 × count std``, which with ``m / 20`` would
    forbid useful ``σ`` for a handful of hospitals. With ``max(m / 20, σ)`` the update noise multiplier grows
    by at most ``1 / sqrt(1 − 1/4) ≈ 1.155`` so that update and count noise together still amount to ``σ``.
    """
    if noise_multiplier == 0:
        return None
    return max(sampled_sites / 20.0, noise_multiplier)


# ------------------------------------------------------------------------------------------ aggregation
def update_norm(update: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``update − reference`` over all arrays of the records (float64 sum)."""
    total = 0.0
    for key in reference.keys():
        diff = update[key].numpy().astype(np.float64) - reference[key].numpy()
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def fixed_denominator_mean(
    reference: ArrayRecord, updates: Sequence[ArrayRecord], denominator: int
) -> ArrayRecord:
    """``reference + Σ (update − reference) / denominator``, array by array (same keys, shapes and dtypes)."""
    out = {}
    for key in reference.keys():
        base = reference[key].numpy()
        total = np.zeros(base.shape, dtype=np.float64)
        for update in updates:
            total += update[key].numpy().astype(np.float64) - base
        out[key] = Array(np.asarray(base + total / denominator, dtype=base.dtype))
    return ArrayRecord(out)


class FixedDenominatorMean:
    """Mixed in after :class:`~server.strategies.FedabusHooks` and before FedAvg/FedProx under client-level DP.

    The aggregate is the unweighted sum of the updates divided by the number of sites sampled this round
    (sites that did not send an update count as zero updates); metrics are still averaged by Flower.
    """

    dp_reference: ArrayRecord | None = None
    dp_sampled_sites: int = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.dp_reference, self.dp_sampled_sites = arrays, len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        if self.dp_reference is None:
            raise RuntimeError("aggregate_train before configure_train: no global adapter to measure updates")
        updates = [next(iter(msg.content.array_records.values())) for msg in valid]
        arrays = fixed_denominator_mean(self.dp_reference, updates, max(self.dp_sampled_sites, len(valid)))
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return arrays, metrics


# ------------------------------------------------------------------------------------------ the budget stop
class ClientPrivacyBudgetSpent(RuntimeError):
    """Releasing round ``server_round`` would take the client-level ε above ``privacy.client-epsilon-budget``;
    raised before any message of that round is sent, so the run ends after round ``server_round − 1``."""

    reason = "client-privacy-budget"

    def __init__(
        self, *, server_round: int, epsilon_spent: float, epsilon_after: float, budget: float, delta: float
    ) -> None:
        self.server_round, self.epsilon_spent, self.epsilon_after = server_round, epsilon_spent, epsilon_after
        self.budget, self.delta = budget, delta
        super().__init__(
            f"Client-level DP budget: round {server_round} is not started; its release would take ε from "
            f"{epsilon_spent:.4g} to {epsilon_after:.4g} (δ = {delta:g}), above privacy.client-epsilon-budget = "
            f"{budget:g}. The run ends after round {server_round - 1} with ε = {epsilon_spent:.4g} spent."
        )

    def record(self) -> dict[str, Any]:
        """The stop as JSON values (``summary.json`` ``stopped``, MLflow tags)."""
        return {
            "reason": self.reason,
            "round": self.server_round,
            "epsilon_spent": self.epsilon_spent,
            "epsilon_after_round": self.epsilon_after,
            "budget": self.budget,
            "delta": self.delta,
            "message": str(self),
        }


# ------------------------------------------------------------------------------------------ the wrapper
@dataclass(frozen=True)
class _RoundPlan:
    """What one round's release is measured against: the global adapter sent, the clip norm, ``q``."""

    reference: ArrayRecord
    clipping_norm: float
    sample_rate: float


def _forwarded(name: str) -> property:
    """An attribute of the wrapped fedabus strategy, read and written through the DP wrapper."""

    def get(self: ClientDPHooks) -> Any:
        return getattr(self.strategy, name)

    def set(self: ClientDPHooks, value: Any) -> None:
        setattr(self.strategy, name, value)

    return property(get, set, doc=f"The wrapped strategy's ``{name}``.")


class ClientDPHooks:
    """Mixin placed before one of Flower's DP wrappers (:data:`CLIENT_DP_WRAPPERS`); see the module docstring.

    It forwards the fedabus hook attributes to the wrapped strategy, filters replies before Flower's clipping
    (failed, declined and malformed updates are dropped and count as zero updates), adds the noise for the
    clip norm the round used, composes the accountant, and checkpoints the clip norm and the ledger.
    """

    strategy: Any  # the wrapped FedabusHooks strategy (set by Flower's wrapper)
    clipping_norm: float
    noise_multiplier: float
    num_sampled_clients: int
    client_dp_mode: str = "off"
    #: The configured σ (the adaptive wrappers keep their larger update-noise multiplier in noise_multiplier).
    client_noise_multiplier: float = 0.0
    client_accountant: ClientPrivacyAccountant
    #: ``privacy.client-epsilon-budget`` (``inf``: no budget).
    client_epsilon_budget: float = math.inf
    noise_rng: np.random.Generator
    last_noise_std: float | None = None
    last_clipping_norm: float | None = None
    _plan: _RoundPlan | None = None

    rounds = _forwarded("rounds")
    eval_interval = _forwarded("eval_interval")
    sample_timeout = _forwarded("sample_timeout")
    allowed_nodes = _forwarded("allowed_nodes")
    node_vetting = _forwarded("node_vetting")
    last_train_metrics = _forwarded("last_train_metrics")
    last_eval_metrics = _forwarded("last_eval_metrics")
    last_sample_population = _forwarded("last_sample_population")
    recipients = _forwarded("recipients")
    last_refusals = _forwarded("last_refusals")
    adapter_layout = _forwarded("adapter_layout")
    lora_scaling = _forwarded("lora_scaling")

    @property
    def client_side(self) -> bool:
        """Whether sites clip their own updates (``client-*`` modes)."""
        return self.client_dp_mode.startswith("client-")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        clipping_norm = float(self.clipping_norm)
        self.strategy.last_sample_population = None
        messages = list(super().configure_train(server_round, arrays, config, grid))
        population = self.strategy.last_sample_population or len(messages)
        rate = min(1.0, len(messages) / population) if messages else 0.0
        if messages:
            self._check_budget(self.rounds.federation(server_round), rate)
        self.num_sampled_clients = max(1, len(messages))
        self._plan = _RoundPlan(arrays, clipping_norm, rate)
        return messages

    def _check_budget(self, server_round: int, sample_rate: float) -> None:
        """Raise :class:`ClientPrivacyBudgetSpent` when the release of ``server_round`` at sampling rate ``q``
        would take ε above :attr:`client_epsilon_budget` (tolerance of :func:`~shared.privacy.ledger.exceeds_budget`)."""
        if math.isinf(self.client_epsilon_budget):
            return
        accountant = self.client_accountant
        after = accountant.epsilon_after(self.client_noise_multiplier, sample_rate)
        if exceeds_budget(after, self.client_epsilon_budget):
            raise ClientPrivacyBudgetSpent(
                server_round=server_round,
                epsilon_spent=accountant.epsilon(),
                epsilon_after=after,
                budget=self.client_epsilon_budget,
                delta=accountant.delta,
            )
        log(
            INFO,
            "Round %d: client-level ε will be %.4g after it, within privacy.client-epsilon-budget = %g",
            server_round,
            after,
            self.client_epsilon_budget,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        plan = self._plan
        if plan is None:
            raise RuntimeError("aggregate_train before configure_train: no global adapter to clip against")
        replies = list(replies)
        logged_round = self.rounds.federation(server_round)
        recipients = self.strategy.recipients
        with_update = updates_of(logged_round, replies, recipients)
        # Admission before clipping; a refused update is a zero update (the denominator stays the sampled sites).
        admitted = self.strategy.admit_updates(logged_round, with_update)
        site_metrics = {
            site: {k: v for k, v in values.items() if k != KEY_NORM_BIT}  # per-site clip bits stay private
            for site, values in self.strategy.train_metrics_of(replies).items()
        }
        usable = [msg for msg in admitted if self._usable(logged_round, msg, plan)]
        try:
            if not usable:
                log(WARNING, "Round %d: no usable update; global adapter unchanged, no ε spent", logged_round)
                return None, None
            log(
                INFO,
                "Round %d: %d of %d sampled sites sent a usable update (the others count as zero updates)",
                logged_round,
                len(usable),
                self.num_sampled_clients,
            )
            with self.strategy.admitted_upstream():
                return super().aggregate_train(server_round, usable)
        finally:
            self.strategy.last_train_metrics = site_metrics
            self._plan = None

    def _usable(self, server_round: int, msg: Message, plan: _RoundPlan) -> bool:
        """Whether ``msg`` holds an update Flower can clip; clips an over-norm client-clipped update here."""
        record = msg.content.array_records.get(ARRAYS)
        problem = None
        if record is None or len(msg.content.array_records) != 1 or not _same_layout(record, plan.reference):
            problem = "arrays unlike the global adapter's"
        elif self.client_dp_mode == "client-adaptive" and KEY_NORM_BIT not in msg.content.metric_records.get(
            METRICS, {}
        ):
            problem = f"no {KEY_NORM_BIT!r} metric (is the clipping mod missing?)"
        else:
            norm = update_norm(record, plan.reference)
            problem = None if math.isfinite(norm) else "a non-finite update"
        if problem is not None:
            log(
                WARNING,
                "Round %d: site %s sent %s; dropped",
                server_round,
                site_of(msg, self.strategy.recipients),
                problem,
            )
            return False
        if norm == 0.0:
            return False  # a zero update adds nothing to the sum (and Flower's clipping divides by its norm)
        if self.client_side and norm > plan.clipping_norm * (1 + _CLIP_SLACK):
            log(
                WARNING,
                "Round %d: site %s sent an unclipped update (norm %.4g > clip norm %.4g); clipped here",
                server_round,
                site_of(msg, self.strategy.recipients),
                norm,
                plan.clipping_norm,
            )
            msg.content[ARRAYS] = _scaled_update(record, plan.reference, plan.clipping_norm / norm)
        return True

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        """Gaussian noise of std ``σ_update × C_round / m``; composes the release in the accountant."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("noise requested outside a configured round")
        std = compute_stdv(self.noise_multiplier, plan.clipping_norm, self.num_sampled_clients)
        noisy = {}
        for key, array in aggregated.items():
            values = array.numpy()
            noise = self.noise_rng.normal(0.0, std, values.shape) if std > 0 else np.zeros(values.shape)
            noisy[key] = Array(np.asarray(values + noise, dtype=values.dtype))
        self.last_noise_std, self.last_clipping_norm = std, plan.clipping_norm
        self.client_accountant.compose(self.client_noise_multiplier, plan.sample_rate)
        epsilon, delta = self.client_accountant.spent()
        log(
            INFO,
            "Client-level DP: noise std %.4g (clip norm %.4g, %d sampled sites); ε = %.4g at δ = %g",
            std,
            plan.clipping_norm,
            self.num_sampled_clients,
            epsilon,
            delta,
        )
        return ArrayRecord(noisy)

    def client_privacy_spent(self) -> tuple[float, float] | None:
        """Client-level ``(ε, δ)`` spent by the global adapters released so far (ε = 0 before the first)."""
        return self.client_accountant.spent()

    def privacy_metrics(self) -> dict[str, float]:
        """Parent-run metrics after a round: ``privacy/client_epsilon`` (at the sampling rate), the ε without
        sampling amplification, and the last release's clip norm and noise std. Infinite ε (σ = 0) is left out.
        The directions of these names are declared in :data:`shared.metric_names.DIRECTIONS`."""
        out = {
            metric_key(CLIENT_EPSILON, split=PRIVACY): self.client_accountant.epsilon(),
            metric_key(CLIENT_EPSILON_NO_AMPLIFICATION, split=PRIVACY): self.client_accountant.epsilon(
                amplification=False
            ),
        }
        out = {k: v for k, v in out.items() if math.isfinite(v)}
        if self.last_noise_std is not None and self.last_clipping_norm is not None:
            out[metric_key(CLIENT_CLIP_NORM, split=PRIVACY)] = self.last_clipping_norm
            out[metric_key(CLIENT_NOISE_STD, split=PRIVACY)] = self.last_noise_std
        return out

    def aggregation_metrics(self) -> dict[str, float]:
        """The wrapped strategy's aggregation metrics (:meth:`server.strategies.FedabusHooks.aggregation_metrics`)."""
        return self.strategy.aggregation_metrics()

    def keep_privacy_journal(self, path: Path) -> None:
        """Persist the accountant at every release (:meth:`ClientPrivacyAccountant.keep_journal`)."""
        self.client_accountant.keep_journal(path)

    def get_state(self) -> dict[str, Any]:
        """The wrapped strategy's state plus the clip norm and the accountant's ledger (JSON values)."""
        state: dict[str, Any] = dict(self.strategy.get_state())
        state[_STATE_CLIP_NORM] = float(self.clipping_norm)
        state[_STATE_LEDGER] = self.client_accountant.ledger()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self.strategy.set_state({k: v for k, v in state.items() if not k.startswith("client-dp/")})
        if _STATE_CLIP_NORM in state:
            self.clipping_norm = float(state[_STATE_CLIP_NORM])
        if _STATE_LEDGER in state:
            self.client_accountant.restore(state[_STATE_LEDGER])

    def summary(self) -> None:
        log(INFO, "\t├──> Client-level DP (privacy.client-dp = %s):", self.client_dp_mode)
        log(INFO, "\t│\t├── Noise multiplier σ: %s", self.client_noise_multiplier)
        log(INFO, "\t│\t├── δ: %g", self.client_accountant.delta)
        log(INFO, "\t│\t└── Uniform weights, sum of clipped updates / sampled sites")
        super().summary()


def _same_layout(record: ArrayRecord, reference: ArrayRecord) -> bool:
    """Same array names in the same order (Flower clips by position) and the same shapes."""
    names = list(reference.keys())
    return list(record.keys()) == names and all(record[k].shape == reference[k].shape for k in names)


def _scaled_update(record: ArrayRecord, reference: ArrayRecord, factor: float) -> ArrayRecord:
    """``reference + factor × (record − reference)``, array by array."""
    out = {}
    for key in reference.keys():
        base = reference[key].numpy()
        update = record[key].numpy().astype(np.float64) - base
        out[key] = Array(np.asarray(base + factor * update, dtype=base.dtype))
    return ArrayRecord(out)


def wrap_with_client_dp(strategy: Any, privacy: PrivacyConfig, *, num_sampled_sites: int) -> ClientDPHooks:
    """Wrap a fedabus strategy (built with :class:`FixedDenominatorMean`) in the Flower wrapper of the mode.

    ``num_sampled_sites`` only seeds the wrapper; every round then uses the number of sites actually sampled.
    Call :func:`check_client_dp` first (``build_strategy`` does).
    """
    mode = privacy.client_dp.strip().lower()
    wrapper = CLIENT_DP_WRAPPERS[mode]
    sampled = max(1, int(num_sampled_sites))
    z, clip = privacy.client_noise_multiplier, privacy.client_clip_norm
    cls = type(f"Fedabus{wrapper.__name__}", (ClientDPHooks, wrapper), {})
    if mode.endswith("-fixed"):
        wrapped = cls(strategy, z, clip, sampled)
    else:
        count_std = clipped_count_stddev(z, sampled)
        wrapped = cls(strategy, z, sampled, initial_clipping_norm=clip, clipped_count_stddev=count_std)
    wrapped.client_dp_mode = mode
    wrapped.client_noise_multiplier = float(z)
    wrapped.client_accountant = ClientPrivacyAccountant(privacy.client_delta)
    wrapped.client_epsilon_budget = privacy.client_epsilon_budget or math.inf
    wrapped.noise_rng = np.random.default_rng()
    return wrapped
