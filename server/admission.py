"""Admission of site updates before any strategy sees them: what a train reply must be to be aggregated.

Every reply that carries an update is checked here, once, before FedAvg, FedMedian, Krum or the client-level DP
wrappers (clipping, noise) see it (:meth:`server.strategies.FedabusHooks.admit_updates` applies it). An update is
refused, with a reason that names what is wrong, when

* **layout**: its arrays are not exactly the global adapter's (names, lengths) or not float32, or the reply
  holds other array or metric records than the one of each that Flower aggregates; under a
  ``federation.compression`` the update is decoded before (:meth:`server.strategies.FedabusHooks.admit_updates`)
  and one that cannot be (another encoding or layout) is refused with the decoder's reason;
  a reply at another LoRA rank (a site's own ``adapter.lora-rank``: its arrays fit the global adapter's layout at
  that rank exactly, :func:`shared.protocol.record_rank`) is admitted only under
  ``federation.lora-aggregation = product``, and then checked against the global adapter projected to its rank
  (:func:`shared.lora_aggregation.project`, what that site started from);
* **values**: an array holds NaN or Inf;
* **round**: it does not say which round it answers, or answers another round (stale or replayed), or the
  site already sent an update this round (a second reply from one site: replayed or impersonated);
* **metrics**: ``num-examples`` is missing, negative or not finite; a Dice, AUC or other proportion lies
  outside [0, 1]; a loss is negative or infinite (NaN means "not measured" and passes, except for
  ``num-examples``);
* **masked** (``federation.secure-aggregation``): the arrays are uint64 ring elements of the global adapter's
  names and lengths; values and norms cannot be checked here and are not (the site applies
  ``max-update-norm`` before masking; ``max-update-norm-ratio`` is given up);
* **norm**: ``‖update − global‖`` (for a reply at another rank: the projected global) (L2 over all arrays) exceeds ``federation.max-update-norm`` (0 = off), or
  ``federation.max-update-norm-ratio`` (0 = off) times the median norm of the round's updates that passed the
  other checks. The relative bound needs three updates or more to bite (with two, neither is ten times their
  median), and is skipped when that median is 0.

This module is plain data and numpy (no Flower): a reply becomes a :class:`Candidate`
(:func:`server.replies.candidate_of`) and :func:`admit` decides for a whole round at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.config import ConfigError, FederationConfig
from shared.metric_names import NUM_EXAMPLES

__all__ = ["AdmissionLimits", "Candidate", "Decision", "admit", "check_metrics", "update_norms"]

#: Metric name stems (after ``split/``) that are proportions in [0, 1] (CI bounds and ``_gt_planes`` included).
_PROPORTIONS = ("dice", "auc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "f1")


@dataclass(frozen=True)
class AdmissionLimits:
    """The norm bounds of :func:`admit` (``federation.max-update-norm``, ``federation.max-update-norm-ratio``);
    0 turns a bound off."""

    max_norm: float = 0.0
    max_norm_ratio: float = 10.0

    def __post_init__(self) -> None:
        for key, value in (
            ("federation.max-update-norm", self.max_norm),
            ("federation.max-update-norm-ratio", self.max_norm_ratio),
        ):
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{key} = {value!r} must be a finite number >= 0 (0 turns the bound off)")

    @classmethod
    def from_config(cls, federation: FederationConfig) -> AdmissionLimits:
        return cls(float(federation.max_update_norm), float(federation.max_update_norm_ratio))


@dataclass(frozen=True)
class Candidate:
    """One train reply that carries an update, as admission sees it.

    ``arrays``: the update's arrays by name (the packed adapter, one flat array per model); ``metrics``: its
    metric record; ``server_round``: the round the reply says it answers (None: it says none); ``records``:
    the names of the reply's array and metric records (Flower aggregates exactly one of each); ``problem``: why
    its update could not be decoded (``federation.compression``), None when it was or needed no decoding.
    ``rank``: the LoRA rank its arrays fit when it is not the global adapter's (None: the global rank, or none);
    ``reference``: what such an update is measured against (the global adapter projected to ``rank``; None
    outside ``product`` mode)."""

    site: str
    server_round: int | None
    arrays: Mapping[str, np.ndarray]
    metrics: Mapping[str, float]
    records: tuple[tuple[str, ...], tuple[str, ...]] = (("arrays",), ("metrics",))
    problem: str | None = None
    rank: int | None = None
    reference: Mapping[str, np.ndarray] | None = None


@dataclass(frozen=True)
class Decision:
    """:func:`admit`'s answer: the indices of the admitted candidates, and ``(index, site, reason)`` of every
    refused one, both in the candidates' order; ``norms`` by index (NaN where not measured)."""

    admitted: list[int] = field(default_factory=list)
    refused: list[tuple[int, str, str]] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)


def _proportion(key: str) -> bool:
    stem = key.rsplit("/", 1)[-1]
    return stem.startswith(_PROPORTIONS)


def check_metrics(metrics: Mapping[str, float]) -> str | None:
    """Why ``metrics`` are out of range, or None when they are fine (see the module docstring)."""
    if NUM_EXAMPLES not in metrics:
        return f"no {NUM_EXAMPLES!r} metric"
    for key, raw in sorted(metrics.items()):
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            return f"metric {key!r} is not a number"
        value = float(raw)
        if key == NUM_EXAMPLES:
            if not math.isfinite(value) or value < 0:
                return f"{key} = {value!r} (must be finite and >= 0)"
        elif math.isnan(value):
            continue
        elif _proportion(key) and not 0.0 <= value <= 1.0:
            return f"{key} = {value!r} outside [0, 1]"
        elif key.endswith("loss") and (not math.isfinite(value) or value < 0):
            return f"{key} = {value!r} (a loss must be finite and >= 0)"
    return None


def _layout_problem(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], masked: bool = False
) -> str | None:
    missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"arrays {sorted(arrays)} are not the global adapter's {sorted(reference)}"
    for name, expected in reference.items():
        found = arrays[name]
        if found.shape != expected.shape:
            return f"array {name!r} has shape {found.shape}, the global adapter's is {expected.shape}"
        expected_dtype = np.uint64 if masked else np.float32
        if found.dtype != expected_dtype:
            return f"array {name!r} has dtype {found.dtype}, expected {np.dtype(expected_dtype).name}"
    if masked:
        return None  # ring elements: every value is valid, and says nothing
    for name, found in arrays.items():
        if not np.isfinite(found).all():
            return f"array {name!r} holds NaN or Inf"
    return None


def update_norms(
    candidates: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
) -> list[float]:
    """``‖arrays − reference‖`` (L2 over all arrays, float64) of each candidate's arrays; ``reference`` is one for
    all, or one per candidate."""
    references = [reference] * len(candidates) if isinstance(reference, Mapping) else list(reference)
    norms = []
    for arrays, reference in zip(candidates, references, strict=True):
        total = 0.0
        for name, base in reference.items():
            diff = (
                np.asarray(arrays[name], dtype=np.float64).ravel()
                - np.asarray(base, dtype=np.float64).ravel()
            )
            total += float(np.dot(diff, diff))
        norms.append(math.sqrt(total))
    return norms


def _rank_problem(candidate: Candidate, lora_aggregation: str) -> str | None:
    if candidate.rank is None:
        return None
    if lora_aggregation != "product":
        return (
            f"the update is at LoRA rank {candidate.rank}, not the global adapter's: a site may train at its own "
            f"adapter.lora-rank only with federation.lora-aggregation = 'product' (this run: {lora_aggregation!r})"
        )
    if candidate.reference is None:
        return f"the update is at LoRA rank {candidate.rank} and no reference at that rank was given"
    return None


def _first_problem(
    candidate: Candidate,
    reference: Mapping[str, np.ndarray],
    server_round: int,
    seen: set[str],
    lora_aggregation: str = "naive",
    masked: bool = False,
) -> str | None:
    arrays_records, metric_records = candidate.records
    if len(arrays_records) != 1 or len(metric_records) != 1:
        return f"reply holds array records {list(arrays_records)} and metric records {list(metric_records)}"
    if candidate.server_round is None:
        return "the reply does not say which round it answers"
    if candidate.server_round != server_round:
        return f"the reply answers round {candidate.server_round}, not this round (stale or replayed)"
    if candidate.site in seen:
        return f"a second update from this site in round {server_round} (replayed?)"
    return (
        candidate.problem
        or _rank_problem(candidate, lora_aggregation)
        or _layout_problem(candidate.arrays, _reference_of(candidate, reference), masked)
        or check_metrics(candidate.metrics)
    )


def _reference_of(candidate: Candidate, reference: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    return candidate.reference if candidate.reference is not None else reference


def admit(
    candidates: Iterable[Candidate],
    *,
    reference: Mapping[str, np.ndarray],
    server_round: int,
    limits: AdmissionLimits,
    seen: Iterable[str] = (),
    lora_aggregation: str = "naive",
    masked: bool = False,
) -> Decision:
    """Decide which of one round's updates may be aggregated.

    ``reference``: the global adapter sent this round (arrays by name); ``server_round``: the round the replies
    must answer; ``seen``: sites whose update this round was already admitted (a later one is a replay). The
    first update of a site wins over later ones. Norm bounds apply to the updates that pass every other check.
    ``lora_aggregation``: ``federation.lora-aggregation`` (a reply at another LoRA rank needs ``product``).
    ``masked``: ``federation.secure-aggregation``; the arrays are uint64 ring elements, so values and norms are
    not checked here (the site bounds its own norm, :func:`client.egress.outgoing_update_norm`).
    """
    candidates = list(candidates)
    seen_sites = set(seen)
    problems: dict[int, str] = {}
    for index, candidate in enumerate(candidates):
        problem = _first_problem(candidate, reference, server_round, seen_sites, lora_aggregation, masked)
        if problem is not None:
            problems[index] = problem
        else:
            seen_sites.add(candidate.site)
    sound = [] if masked else [i for i in range(len(candidates)) if i not in problems]
    measured = update_norms(
        [candidates[i].arrays for i in sound], [_reference_of(candidates[i], reference) for i in sound]
    )
    norms = [math.nan] * len(candidates)
    for index, norm in zip(sound, measured, strict=True):
        norms[index] = norm
    median = float(np.median(measured)) if measured else math.nan
    for index in sound:
        norm = norms[index]
        if limits.max_norm > 0 and norm > limits.max_norm:
            problems[index] = f"update norm {norm:.4g} > federation.max-update-norm {limits.max_norm:.4g}"
        elif limits.max_norm_ratio > 0 and median > 0 and norm > limits.max_norm_ratio * median:
            problems[index] = (
                f"update norm {norm:.4g} > {limits.max_norm_ratio:g} x the round's median update norm "
                f"{median:.4g} (federation.max-update-norm-ratio)"
            )
    refused = [(i, candidates[i].site, problems[i]) for i in sorted(problems)]
    admitted = [i for i in range(len(candidates)) if i not in problems]
    return Decision(admitted, refused, norms)
