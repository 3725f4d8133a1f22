"""Aggregation strategies: Flower's own, extended by hooks (never by copying the round loop).

Just over 500 lines: the hooks every strategy shares (deadline sampling, update admission, round numbering,
state) and the per-strategy subclasses stay together so that a new strategy is one subclass here; the maths
lives elsewhere (server/admission.py, shared/lora_aggregation.py, server/privacy.py).

:func:`build_strategy` returns an instance of ``FedabusHooks`` mixed into the chosen Flower strategy. The hooks

* sample sites with a deadline, so a round never waits forever for ``min_available_nodes``: sites that are
  online but still answering the handshake are waited for (up to ``connect_timeout``), sites that are gone are
  not (:class:`FederationStalled` after ``sample_timeout`` seconds). Flower's own ``configure_*`` then samples
  its fraction from a view of the grid holding only the admitted sites; nothing of Flower is patched;
* give Flower's round number the federation's (``rounds``, :class:`~server.round_numbering.RoundNumbering`) in
  every message and log line, so a resumed run continues its numbering;
* skip client evaluation on rounds off the evaluation interval;
* drop replies that carry no update (a site that declined to train says why in its metrics) before aggregation,
  and hand the rest to the strategy sorted by site (:func:`~server.replies.in_site_order`), so the aggregate is
  bit-identical whatever order the replies arrived in;
* encode the global adapter of train messages and decode every update as ``federation.compression`` says
  (:mod:`shared.protocol`), so admission and every strategy see packed float32 arrays; the bytes sent each way are
  logged per site (``train/upload_bytes``, ``train/download_bytes``);
* under ``federation.secure-aggregation`` run the key and share exchange once the sites are sampled, and take the
  masks off the admitted updates' sum before the strategy sees it (:mod:`server.secure_aggregation`);
* admit every update before the strategy (or client-level DP's clipping) sees it (:mod:`server.admission`:
  layout, finite values, the round it answers, metric ranges, norm bounds); a refused one is logged with its
  site and reason, kept in ``last_refusals`` for tracking and never aggregated, and a round left with fewer than
  ``min-sites`` admitted updates keeps the global adapter unchanged;
* remember, per round, which site sent which metrics (``last_train_metrics`` / ``last_eval_metrics``), for tracking,
  and where each message went (``recipients``, per instance), to name a site whose reply is an error.

Each strategy is a plain subclass (``FedabusFedAvg(FedabusHooks, FedAvg)``, ...) of the Flower strategy that
:data:`STRATEGIES` names.

With ``federation.lora-aggregation = product`` (``fedavg`` and ``fedprox`` only) :class:`ProductLoraMixin` sits
between the hooks and Flower's strategy: it keeps Flower's metric aggregation and replaces the arrays with the
ΔW-space aggregate of :mod:`shared.lora_aggregation`. Which strategy supports which mode is
:data:`LORA_AGGREGATION_SUPPORT`, checked by :func:`check_lora_aggregation` when the strategy is built.

Strategy state that must survive a restart (FedAdam/Yogi/Adagrad moments) is exposed through
:meth:`FedabusHooks.get_state` / :meth:`FedabusHooks.set_state`.

With ``privacy.client-dp`` other than ``off``, :func:`build_strategy` wraps the hooked strategy in one of Flower's
client-level DP wrappers (:mod:`server.privacy`); the wrapper offers the same attributes and methods, so the
ServerApp does not care which one it holds (:data:`FederationStrategy`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum

from server import privacy as client_dp
from server.admission import AdmissionLimits, Candidate, admit
from server.replies import Recipients, candidate_of, in_site_order, metrics_by_site, site_of, updates_of
from server.round_numbering import RoundNumbering
from server.secure_aggregation import SecureAggregation
from shared.adapters import AdapterMismatchError
from shared.config import (
    COMPRESSIONS,
    LORA_AGGREGATION_MODES,
    ConfigError,
    FederationConfig,
    PrivacyConfig,
    check_secure_aggregation,
)
from shared.lora_aggregation import (
    layout_rank,
    product_aggregate,
    project,
    rank_layout,
    scaling_at_rank,
)
from shared.metric_names import DOWNLOAD_BYTES, LORA_DISCARDED_ENERGY, TRAIN, UPLOAD_BYTES, metric_key
from shared.protocol import (
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    adapter_to_record,
    encode_record,
    float32_record,
    payload_bytes,
    record_encoding,
    record_rank,
    record_to_adapter,
    record_to_update,
)

__all__ = [
    "LORA_AGGREGATION_SUPPORT",
    "STRATEGIES",
    "FederationStalled",
    "FederationStrategy",
    "FedabusHooks",
    "ProductLoraMixin",
    "build_strategy",
    "check_lora_aggregation",
    "metrics_by_site",
    "site_of",
    "updates_of",
]

STRATEGIES: dict[str, type] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
}
#: ``federation.lora-aggregation`` modes each strategy supports. ``product`` is a non-linear map of the sites'
#: updates (an SVD of their weighted ΔW sum): only the weighted means of FedAvg/FedProx have it as their ΔW-space
#: counterpart; a robust aggregator's selection, FedAdam's optimiser step and client-level DP's sensitivity bound
#: (:func:`server.privacy.check_client_dp`) hold for element-wise averaging only.
LORA_AGGREGATION_SUPPORT: dict[str, tuple[str, ...]] = {
    name: LORA_AGGREGATION_MODES if name in ("fedavg", "fedprox") else ("naive", "ffa") for name in STRATEGIES
}
#: Strategy attributes holding state that must be checkpointed (dicts of name -> ndarray).
_STATE_ATTRIBUTES = ("m_t", "v_t")
#: Seconds between two "Waiting for sites" lines.
_WAIT_NOTE_EVERY = 10.0


class FederationStalled(RuntimeError):
    """Not enough sites were online within the deadline to start federation round ``server_round``; the run
    stops there instead of hanging (recorded like a budget stop: :meth:`record`)."""

    reason = "federation-stalled"

    def __init__(self, message: str, *, server_round: int, admitted: int, online: int, needed: int) -> None:
        self.server_round, self.admitted, self.online, self.needed = server_round, admitted, online, needed
        super().__init__(message)

    def record(self) -> dict[str, Any]:
        """The stop as JSON values (``summary.json`` ``stopped``, MLflow tags)."""
        return {
            "reason": self.reason,
            "round": self.server_round,
            "admitted_sites": self.admitted,
            "online_sites": self.online,
            "needed_sites": self.needed,
            "message": str(self),
        }


class _AdmittedSites:
    """A grid as Flower's sampling sees it in one ``configure_*`` call: only the sites fedabus admitted and
    waited for (everything else is the real grid). Flower's ``sample_nodes`` then finds enough sites at once
    and samples its fraction of them, so its own wait-forever loop never runs."""

    def __init__(self, grid: Grid, admitted: list[int]) -> None:
        self._grid = grid
        self._admitted = list(admitted)

    def get_node_ids(self) -> list[int]:
        return list(self._admitted)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class FedabusHooks:
    """Mixin placed before a Flower strategy class; see the module docstring."""

    #: Flower's round number -> the federation's (set once, on resume, by :mod:`server.federation_run`).
    rounds: RoundNumbering = RoundNumbering()
    eval_interval: int = 1
    sample_timeout: float = 600.0
    #: How long sampling may wait past ``sample_timeout`` for sites that are online but still connecting.
    connect_timeout: float = 1800.0
    #: Seconds between two looks at who is online while sampling waits.
    poll_interval: float = 1.0
    allowed_nodes: set[int] | None = None
    #: Optional ``callable(node_ids) -> accepted node ids`` (the base-fingerprint handshake).
    node_vetting: Callable[[Iterable[int]], set[int]] | None = None
    #: Number of eligible sites the last sampling chose from (the population of client-level DP accounting).
    last_sample_population: int | None = None
    #: Where this strategy's messages went (names failed sites); set per instance by :func:`build_strategy`.
    recipients: Recipients
    #: Update admission: the norm bounds, the global adapter sent this round (what updates are measured
    #: against), the last round's refusals ``{site: reason}`` and the sites admitted in the current round.
    admission_limits: AdmissionLimits = AdmissionLimits()
    admission_reference: ArrayRecord | None = None
    last_refusals: dict[str, str] = {}
    _admitted: tuple[int, frozenset[str]] = (-1, frozenset())
    _refused_replies: list[Message] = []
    _admitted_upstream: bool = False
    #: The global adapter's layout (name -> shape) and LoRA scaling (alpha / rank) per model prefix; set by
    #: :class:`server.federation_run.FederationRun` and needed under ``federation.lora-aggregation = product``.
    adapter_layout: dict[str, tuple[int, ...]] | None = None
    lora_scaling: dict[str, float] | None = None
    #: Parent-run metrics of the last aggregation (``federation/lora_discarded_energy``); set per round.
    last_aggregation_metrics: dict[str, float] | None = None
    #: ``federation.lora-aggregation`` and ``federation.compression`` (set by :func:`build_strategy`).
    lora_aggregation: str = "naive"
    compression: str = "none"
    #: Bytes of the last train round: the global adapter sent to each site, each site's update as received.
    _download_bytes: float = 0.0
    _upload_bytes: dict[str, float] = {}
    #: ``federation.secure-aggregation``: the server's part of the masking protocol (None: off), and the grid of
    #: the current train round (the unmasking step sends messages from ``aggregate_train``).
    secure_aggregation: SecureAggregation | None = None
    _train_grid: Grid | None = None

    def _eligible(self, online: list[int]) -> tuple[list[int], list[int]]:
        """``(admitted, connecting)`` among the ``online`` nodes: admitted sites that may be sampled, and
        sites still answering the handshake (see :class:`server.handshake.SiteVetting`)."""
        vetting = self.node_vetting
        accepted = vetting(online) if vetting is not None else set(online)
        connecting = vetting.connecting(online) if hasattr(vetting, "connecting") else set()
        allowed = [n for n in online if self.allowed_nodes is None or n in self.allowed_nodes]
        return [n for n in allowed if n in accepted], [n for n in allowed if n in connecting]

    def _wait_for_sites(self, grid: Grid, min_available: int, server_round: int = 0) -> list[int]:
        """The admitted sites once ``min_available`` of them are online; never waits forever.

        Waits for sites still answering the handshake ("slow to connect") up to ``sample_timeout`` once enough
        are admitted, and past it, up to ``connect_timeout``, while they could still make up ``min_available``.
        Stops with :class:`FederationStalled` (naming federation round ``server_round``) after ``sample_timeout``
        when even the connecting sites would be too few: the others are gone (offline at the SuperLink, or
        refused).
        """
        started = time.monotonic()
        noted = -math.inf
        while True:
            online = list(grid.get_node_ids())
            admitted, connecting = self._eligible(online)
            waited = time.monotonic() - started
            if len(admitted) >= min_available and (not connecting or waited >= self.sample_timeout):
                self.last_sample_population = len(admitted)
                return admitted
            if waited >= self.sample_timeout and (
                len(admitted) + len(connecting) < min_available
                or waited >= max(self.sample_timeout, self.connect_timeout)
            ):
                raise FederationStalled(
                    f"Round {server_round} stopped: only {len(admitted)} site(s) admitted after "
                    f"{waited:.0f} s ({len(online)} online, {len(connecting)} still answering the handshake); "
                    f"{min_available} needed (federation.min-sites). Stopping instead of waiting forever.",
                    server_round=server_round,
                    admitted=len(admitted),
                    online=len(online),
                    needed=min_available,
                )
            if time.monotonic() - noted >= _WAIT_NOTE_EVERY:
                noted = time.monotonic()
                log(
                    INFO,
                    "Waiting for sites: %d admitted, %d connecting, %d online, %d needed (%.0f s so far)",
                    len(admitted),
                    len(connecting),
                    len(online),
                    min_available,
                    waited,
                )
            time.sleep(self.poll_interval)

    def _admitted_view(self, grid: Grid, fraction: float, server_round: int) -> Grid | _AdmittedSites:
        """What Flower's own sampling for federation round ``server_round`` should see: only the admitted sites,
        after waiting for them (a fraction of 0 samples nobody, so nobody is waited for)."""
        if fraction == 0.0:
            return grid
        return _AdmittedSites(grid, self._wait_for_sites(grid, self.min_available_nodes, server_round))

    def _remember(self, messages: list[Message]) -> list[Message]:
        self.recipients.remember(messages, dict(getattr(self.node_vetting, "accepted", {})))
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        # Flower's configure_train (and FedProx's mu, FedOpt's current arrays) samples from the admitted view.
        view = self._admitted_view(grid, self.fraction_train, self.rounds.federation(server_round))
        self.admission_reference = arrays
        messages = list(super().configure_train(self.rounds.federation(server_round), arrays, config, view))
        sent = arrays
        if messages:  # as federation.compression says; none: float32 (FedAdam's own state is float64)
            sent = encode_record(
                arrays, self.adapter_layout or {}, mode=self.lora_aggregation, compression=self.compression
            )
            for msg in messages:
                msg.content[ARRAYS] = sent
        self._download_bytes = float(payload_bytes(sent))
        if self.secure_aggregation is not None:
            self._train_grid = grid
            messages = self.secure_aggregation.prepare(grid, self.rounds.federation(server_round), messages)
        return self._remember(messages)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        server_round = self.rounds.federation(server_round)
        if self.eval_interval > 1 and server_round % self.eval_interval:
            return []
        # the evaluation before round 1 (round 0) belongs to round 1: a stall there stops the run before it
        view = self._admitted_view(grid, self.fraction_evaluate, max(server_round, 1))
        messages = list(super().configure_evaluate(server_round, arrays, config, view))
        sent = float32_record(arrays)  # evaluation always travels as none (float32)
        for msg in messages:
            msg.content[ARRAYS] = sent
        return self._remember(messages)

    def admit_updates(self, server_round: int, with_update: list[Message]) -> list[Message]:
        """The updates of federation round ``server_round`` that pass :func:`server.admission.admit`; [] when
        admission leaves fewer than ``min_train_nodes`` (``federation.min-sites``). Logs every refusal."""
        self.last_refusals, self._refused_replies = {}, []
        if not with_update:
            return []
        if self.admission_reference is None:
            raise RuntimeError(
                "aggregate_train before configure_train: no global adapter to admit updates against"
            )
        if self._admitted[0] != server_round:
            self._admitted = (server_round, frozenset())
        undecodable = self._decode_updates(with_update)
        reference = {name: array.numpy() for name, array in self.admission_reference.items()}
        candidates = [
            self._at_rank(candidate_of(msg, self.recipients, undecodable.get(id(msg))), reference)
            for msg in with_update
        ]
        decision = admit(
            candidates,
            reference=reference,
            server_round=server_round,
            limits=self.admission_limits,
            seen=self._admitted[1],
            lora_aggregation=self.lora_aggregation,
            masked=self.secure_aggregation is not None,
        )
        for index, site, reason in decision.refused:
            log(WARNING, "Round %d: update of site %s refused: %s", server_round, site, reason)
            self.last_refusals[site if site not in self.last_refusals else f"{site}#{index}"] = reason
        self._refused_replies = [with_update[index] for index, _, _ in decision.refused]
        admitted = [with_update[i] for i in decision.admitted]
        self._admitted = (server_round, self._admitted[1] | {candidates[i].site for i in decision.admitted})
        if decision.refused and len(admitted) < self.min_train_nodes:
            log(
                WARNING,
                "Round %d: only %d update(s) admitted, %d refused; federation.min-sites = %d: nothing is "
                "aggregated this round and the global adapter is unchanged",
                server_round,
                len(admitted),
                len(decision.refused),
                self.min_train_nodes,
            )
            return []
        return admitted

    def _reply_rank(self, shapes: dict[str, tuple[int, ...]]) -> int | None:
        """The LoRA rank of a reply's packed arrays when it is not the global adapter's (None: the global rank or
        no rank fits; :func:`shared.protocol.record_rank`)."""
        layout = self.adapter_layout
        rank = record_rank(shapes, layout, self.lora_aggregation) if layout else None
        return None if rank is None or rank == layout_rank(layout) else rank

    def _at_rank(self, candidate: Candidate, reference: dict[str, np.ndarray]) -> Candidate:
        """``candidate`` with its LoRA rank when it is another than the global one, and under ``product`` the
        global adapter projected to that rank as its reference (what that site started from)."""
        if candidate.problem is not None:
            return candidate
        rank = self._reply_rank({name: tuple(a.shape) for name, a in candidate.arrays.items()})
        if rank is None or self.lora_aggregation != "product" or self.lora_scaling is None:
            return replace(candidate, rank=rank)
        layout = self.adapter_layout or {}
        global_rank = layout_rank(layout)
        tensors = record_to_adapter(
            ArrayRecord(dict(self.admission_reference.items())), layout, mode="product"
        )
        projected = project(
            tensors,
            rank=rank,
            scaling=self.lora_scaling,
            to_scaling=scaling_at_rank(self.lora_scaling, global_rank, rank),
        )
        packed = adapter_to_record(projected, mode="product")
        return replace(candidate, rank=rank, reference={name: a.numpy() for name, a in packed.items()})

    def _decode_updates(self, with_update: list[Message]) -> dict[int, str]:
        """Replace each update in place by the packed float32 adapter it encodes (``federation.compression``,
        :func:`shared.protocol.record_to_update`) and note its bytes as received; returns ``{id(message): reason}``
        of the updates that cannot be decoded (another encoding or layout: admission refuses them). Under ``none``
        only a record in a lossy encoding is looked at (refused, naming both); admission checks the rest."""
        self._upload_bytes, problems = {}, {}
        for msg in with_update:
            record = msg.content[ARRAYS]
            self._upload_bytes[site_of(msg, self.recipients)] = float(payload_bytes(record))
            encoding = record_encoding(record)
            if self.compression == "none" and (encoding == "none" or encoding not in COMPRESSIONS):
                continue  # admission checks layout and dtype as without compression
            try:
                msg.content[ARRAYS] = record_to_update(
                    record,
                    self.admission_reference,
                    self.adapter_layout or {},
                    mode=self.lora_aggregation,
                    compression=self.compression,
                )
            except AdapterMismatchError as exc:
                problems[id(msg)] = str(exc)
        return problems

    def train_metrics_of(self, replies: list[Message]) -> dict[str, dict[str, float]]:
        """Per-site training metrics of ``replies``, leaving out those of refused updates (not trusted), with the
        round's payload bytes (:data:`~shared.metric_names.UPLOAD_BYTES`, :data:`~shared.metric_names.DOWNLOAD_BYTES`)."""
        refused = {id(msg) for msg in self._refused_replies}
        metrics = metrics_by_site([msg for msg in replies if id(msg) not in refused], self.recipients)
        for site, values in metrics.items():
            values[metric_key(DOWNLOAD_BYTES, split=TRAIN)] = self._download_bytes
            if site in self._upload_bytes:
                values[metric_key(UPLOAD_BYTES, split=TRAIN)] = self._upload_bytes[site]
        return metrics

    @contextmanager
    def admitted_upstream(self) -> Iterator[None]:
        """While open, :meth:`aggregate_train` aggregates its replies as they are: a client-level DP wrapper
        admitted them before clipping (:class:`server.privacy.ClientDPHooks`)."""
        self._admitted_upstream = True
        try:
            yield
        finally:
            self._admitted_upstream = False

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round = self.rounds.federation(server_round)
        # in site order: a bit-identical aggregate whatever order the replies arrived in
        replies = in_site_order(replies, self.recipients)
        if self._admitted_upstream:
            return super().aggregate_train(server_round, replies)
        with_update = updates_of(server_round, replies, self.recipients)
        admitted = self.admit_updates(server_round, with_update)
        self.last_train_metrics = self.train_metrics_of(replies)
        if not with_update:
            log(WARNING, "Round %d: no site sent an update; the global adapter is unchanged", server_round)
        if admitted and self.secure_aggregation is not None:
            # Every admitted reply then carries the unmasked weighted mean: the strategy's mean returns it.
            admitted = self.secure_aggregation.unmask(
                self._train_grid, server_round, admitted, self.admission_reference
            )
        if not admitted:
            return None, None
        return super().aggregate_train(server_round, admitted)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        server_round = self.rounds.federation(server_round)
        replies = in_site_order(replies, self.recipients)
        self.last_eval_metrics = metrics_by_site(replies, self.recipients)
        for msg in replies:
            if msg.has_error():
                log(
                    WARNING,
                    "Round %d: evaluation failed at %s: %s",
                    server_round,
                    site_of(msg, self.recipients),
                    msg.error.reason,
                )
        return super().aggregate_evaluate(server_round, replies)

    def get_state(self) -> dict[str, np.ndarray]:
        """Optimizer state to checkpoint, flattened as ``attribute/array-name`` -> ndarray."""
        state = {}
        for attribute in _STATE_ATTRIBUTES:
            for key, value in (getattr(self, attribute, None) or {}).items():
                state[f"{attribute}/{key}"] = np.asarray(value)
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        for attribute in _STATE_ATTRIBUTES:
            values = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{attribute}/")}
            if values:
                setattr(self, attribute, values)

    def client_privacy_spent(self) -> tuple[float, float] | None:
        """Client-level (ε, δ) spent so far; None: this strategy adds no client-level DP."""
        return None

    def keep_privacy_journal(self, path: Path) -> None:
        """Client-level DP only: persist the privacy accountant at every release (nothing to keep here)."""

    def privacy_metrics(self) -> dict[str, float]:
        """Parent-run metrics of client-level DP for the round just done (none without client-level DP)."""
        return {}

    def aggregation_metrics(self) -> dict[str, float]:
        """Parent-run metrics of the last aggregation (``federation/lora_discarded_energy`` under ``product``)."""
        return dict(self.last_aggregation_metrics or {})


class ProductLoraMixin:
    """``federation.lora-aggregation = product``: placed between :class:`FedabusHooks` and FedAvg/FedProx.

    Flower's ``aggregate_train`` still aggregates the metrics; the arrays are replaced by
    :func:`shared.lora_aggregation.product_aggregate` of the sites' unpacked adapters, weighted by ``num-examples``.
    A reply whose record does not fit the global layout is left out with a warning naming the site."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        # Not FedAvg's aggregate_train: its element-wise mean cannot take replies at different LoRA ranks.
        replies, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not replies:
            return None, None
        metrics = self.train_metrics_aggr_fn([msg.content for msg in replies], self.weighted_by_key)
        if self.adapter_layout is None or self.lora_scaling is None:
            raise RuntimeError(
                "federation.lora-aggregation = 'product' needs the global adapter layout and LoRA scaling on the "
                "strategy (adapter_layout, lora_scaling); FederationRun.prepare sets them"
            )
        updates, weights, site_scaling = [], [], []
        global_rank = layout_rank(self.adapter_layout)
        for msg in replies:
            record = msg.content[ARRAYS]
            rank = self._reply_rank({key: tuple(record[key].shape) for key in record.keys()}) or global_rank
            try:
                layout = rank_layout(self.adapter_layout, rank)
                updates.append(record_to_adapter(record, layout, mode="product"))
            except AdapterMismatchError as exc:
                log(
                    WARNING,
                    "Round %d: update of %s left out: %s",
                    server_round,
                    site_of(msg, self.recipients),
                    exc,
                )
                continue
            weights.append(float(msg.content[METRICS][NUM_EXAMPLES]))
            site_scaling.append(scaling_at_rank(self.lora_scaling, global_rank, rank))
        if not updates:
            return None, metrics
        result = product_aggregate(
            updates, weights, layout=self.adapter_layout, scaling=self.lora_scaling, site_scaling=site_scaling
        )
        self.last_aggregation_metrics = {LORA_DISCARDED_ENERGY: result.discarded_energy}
        log(
            INFO,
            "Round %d: LoRA product aggregation of %d site(s), discarded energy %.3g",
            server_round,
            len(updates),
            result.discarded_energy,
        )
        return adapter_to_record(result.tensors, mode="product"), metrics


# Each Flower strategy with the hooks; under client-level DP (FedAvg, FedProx only) the fixed-denominator mean too.
class FedabusFedAvg(FedabusHooks, FedAvg):
    pass


class FedabusFedProx(FedabusHooks, FedProx):
    pass


class FedabusFedAdam(FedabusHooks, FedAdam):
    pass


class FedabusFedMedian(FedabusHooks, FedMedian):
    pass


class FedabusFedTrimmedAvg(FedabusHooks, FedTrimmedAvg):
    pass


class FedabusKrum(FedabusHooks, Krum):
    pass


class FedabusMultiKrum(FedabusHooks, MultiKrum):
    pass


class FedabusDPFedAvg(FedabusHooks, client_dp.FixedDenominatorMean, FedAvg):
    pass


class FedabusDPFedProx(FedabusHooks, client_dp.FixedDenominatorMean, FedProx):
    pass


_HOOKED: dict[type, type] = {
    FedAvg: FedabusFedAvg,
    FedProx: FedabusFedProx,
    FedAdam: FedabusFedAdam,
    FedMedian: FedabusFedMedian,
    FedTrimmedAvg: FedabusFedTrimmedAvg,
    Krum: FedabusKrum,
    MultiKrum: FedabusMultiKrum,
}
_HOOKED_DP: dict[type, type] = {FedAvg: FedabusDPFedAvg, FedProx: FedabusDPFedProx}


class FedabusProductFedAvg(FedabusHooks, ProductLoraMixin, FedAvg):
    pass


class FedabusProductFedProx(FedabusHooks, ProductLoraMixin, FedProx):
    pass


_HOOKED_PRODUCT: dict[type, type] = {FedAvg: FedabusProductFedAvg, FedProx: FedabusProductFedProx}


def check_lora_aggregation(federation: FederationConfig) -> str:
    """``federation.lora-aggregation``, checked against ``federation.strategy`` (:data:`LORA_AGGREGATION_SUPPORT`);
    raises :class:`~shared.config.ConfigError` naming both keys and the supported combinations."""
    mode, name = federation.lora_aggregation, federation.strategy.lower()
    if mode not in LORA_AGGREGATION_MODES:
        raise ConfigError(
            f"federation.lora-aggregation = {mode!r}; allowed: {', '.join(LORA_AGGREGATION_MODES)}"
        )
    supported = LORA_AGGREGATION_SUPPORT.get(name, ("naive",))
    if mode not in supported:
        combos = "; ".join(f"{s}: {', '.join(m)}" for s, m in LORA_AGGREGATION_SUPPORT.items())
        raise ConfigError(
            f"federation.lora-aggregation = {mode!r} cannot be combined with federation.strategy = {name!r}: "
            "product aggregation is a non-linear map of the updates (an SVD of their weighted ΔW sum), which only "
            f"FedAvg's and FedProx's weighted mean match. Supported (strategy: modes): {combos}"
        )
    return mode


#: What :func:`build_strategy` returns: the hooked strategy, or Flower's DP wrapper around it.
FederationStrategy: TypeAlias = "FedabusHooks | client_dp.ClientDPHooks"


def build_strategy(
    federation: FederationConfig,
    *,
    proximal_mu: float = 0.0,
    privacy: PrivacyConfig | None = None,
) -> FederationStrategy:
    """The Flower strategy ``federation.strategy`` names (``fedavg``, ``fedprox``, ``fedadam``, ``fedmedian``,
    ``fedtrimmedavg``, ``krum``, ``multikrum``) with the fedabus hooks. FedAvg weights by ``num-examples``
    (training cases).

    ``federation`` gives the sampling (``min-sites``, fractions, ``sample-timeout``; ``round-timeout`` is also
    how long sampling waits for sites still connecting), ``eval-interval`` and each strategy's own setting
    (``server-lr``, ``trim-beta``, ``num-malicious``); ``proximal_mu`` is FedProx's (``train.proximal-mu``, which
    the sites read too). With ``privacy.client_dp`` other than ``off`` the strategy is wrapped for client-level
    DP (see :mod:`server.privacy`): only ``fedavg`` and ``fedprox`` are accepted, and the adapter update is then
    the unweighted sum of the sites' clipped updates divided by the number of sampled sites, plus Gaussian noise.
    Raises :class:`~shared.config.ConfigError` naming the setting when the privacy settings are invalid.
    """
    name = federation.strategy.lower()
    try:
        base = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {federation.strategy!r}; expected one of {sorted(STRATEGIES)}"
        ) from None
    lora_mode = check_lora_aggregation(federation)
    check_secure_aggregation(federation, privacy if privacy is not None else PrivacyConfig())
    compression = federation.compression
    dp_mode = (
        client_dp.check_client_dp(privacy, name, lora_mode, compression) if privacy is not None else "off"
    )
    min_sites = federation.min_sites
    common: dict[str, Any] = {
        "fraction_train": federation.fraction_train,
        "fraction_evaluate": federation.fraction_evaluate,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites if federation.fraction_evaluate > 0 else 0,
        "min_available_nodes": min_sites,
    }
    if base is not FedMedian and base is not Krum and base is not MultiKrum:
        common["weighted_by_key"] = NUM_EXAMPLES
    extra: dict[str, Any] = {
        FedProx: {"proximal_mu": proximal_mu},
        FedAdam: {"eta": federation.server_lr},
        FedTrimmedAvg: {"beta": federation.trim_beta},
        Krum: {"num_malicious_nodes": federation.num_malicious},
        MultiKrum: {"num_malicious_nodes": federation.num_malicious},
    }.get(base, {})
    hooked = _HOOKED_PRODUCT if lora_mode == "product" else _HOOKED if dp_mode == "off" else _HOOKED_DP
    strategy = hooked[base](**common, **extra)
    strategy.recipients = Recipients()
    strategy.eval_interval = max(1, int(federation.eval_interval))
    strategy.sample_timeout = float(federation.sample_timeout)
    strategy.connect_timeout = float(federation.round_timeout)
    strategy.last_train_metrics = {}
    strategy.last_eval_metrics = {}
    strategy.admission_limits = AdmissionLimits.from_config(federation)
    strategy.last_refusals = {}
    strategy.last_aggregation_metrics = {}
    strategy.lora_aggregation, strategy.compression = lora_mode, compression
    strategy._upload_bytes = {}
    if federation.secure_aggregation:
        strategy.secure_aggregation = SecureAggregation(timeout=float(federation.round_timeout))
    if dp_mode == "off" or privacy is None:
        return strategy
    return client_dp.wrap_with_client_dp(strategy, privacy, num_sampled_sites=min_sites)
