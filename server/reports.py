"""What the server reports per round: per-site metrics, their aggregates over sites, and the best adapter.

A :class:`RoundReport` holds one round's metrics as the sites sent them (``{site: {metric: value}}``) with each
site's example count; :func:`aggregate_site_metrics` summarises a metric over sites (example-weighted mean,
worst site, or total of a count, as :func:`shared.metric_names.metric_direction` declares it);
:func:`update_best` keeps the best global adapter by an aggregate. Everything here is plain data: the tracker
(:mod:`server.tracking`) writes it to MLflow and the checkpoint keeps :meth:`RoundReport.to_json`.

Names of what the server logs: a site's metrics keep their names (``val/...``, ``test/...``, ``train/...``,
``privacy/...``); each site's run also gets its example counts (``federation/eval_examples``,
``federation/train_examples``, ``federation/test_examples``), the parent the aggregates ``global/{key}_mean``,
``_worst`` and ``_total``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from shared.adapters import Adapter
from shared.metric_names import (
    EVAL_WEIGHT_METRIC,
    GLOBAL,
    NUM_EXAMPLES,
    PRIVACY,
    ROUND_METRIC,
    TEST,
    TRAIN,
    TRAIN_WEIGHT_METRIC,
    metric_direction,
)

__all__ = [
    "GLOBAL_PREFIX",
    "PRIVACY_PREFIX",
    "SITE_RESERVED",
    "TEST_PREFIX",
    "TRAIN_PREFIX",
    "BestAdapter",
    "RoundReport",
    "SiteAggregate",
    "aggregate_site_metrics",
    "json_safe",
    "round_summary",
    "update_best",
]

# The names are shared.metric_names': ROUND_METRIC (sentinel in every round batch: value = step = round) and
# the example counts in each site's run (EVAL_WEIGHT_METRIC, TRAIN_WEIGHT_METRIC, TEST_WEIGHT_METRIC).
#: Prefix of the aggregates the server logs on the parent run.
GLOBAL_PREFIX = f"{GLOBAL}/"
TRAIN_PREFIX = f"{TRAIN}/"
#: Training-side metrics of sample-level DP (cumulative ε per model at a site), logged as sent.
PRIVACY_PREFIX = f"{PRIVACY}/"
#: Final-test metrics: the test split's prefix.
TEST_PREFIX = f"{TEST}/"
#: Names a site's metrics may not use: the server writes them in the site's run.
SITE_RESERVED = frozenset({ROUND_METRIC, EVAL_WEIGHT_METRIC, TRAIN_WEIGHT_METRIC})


# ------------------------------------------------------------------------------------------ aggregation
@dataclass(frozen=True)
class SiteAggregate:
    """One metric summarised over sites; NaN site values are left out (``n_sites`` counts the others).

    ``mean`` is example-weighted (None for counts), ``worst``/``worst_site`` follow the metric's direction
    (:func:`~shared.metric_names.metric_direction`; None when it has none or is a count), ``total`` is the sum
    (counts only). All NaN when no site has a value.
    """

    mean: float | None
    worst: float | None
    worst_site: str | None
    total: float | None
    n_sites: int

    def as_metrics(self, key: str, *, prefix: str = GLOBAL_PREFIX) -> dict[str, float]:
        """MLflow metrics: ``{prefix}{key}_mean``, ``_worst`` and ``_total`` for the fields that are set."""
        values = {"mean": self.mean, "worst": self.worst, "total": self.total}
        return {f"{prefix}{key}_{name}": v for name, v in values.items() if v is not None}


def _weighted_mean(values: Mapping[str, float], weights: Mapping[str, int]) -> float:
    total = sum(weights[s] for s in values)
    if not values:
        return math.nan
    if total <= 0:
        return sum(values.values()) / len(values)
    return sum(v * weights[s] for s, v in values.items()) / total


def _aggregate_one(key: str, values: Mapping[str, float], weights: Mapping[str, int]) -> SiteAggregate:
    direction = metric_direction(key)
    valid = {s: v for s, v in sorted(values.items()) if not math.isnan(v)}
    if direction == "count":
        total = sum(valid.values()) if valid else math.nan
        return SiteAggregate(None, None, None, total, len(valid))
    mean = _weighted_mean(valid, weights)
    if direction is None:
        return SiteAggregate(mean, None, None, None, len(valid))
    if not valid:
        return SiteAggregate(mean, math.nan, None, None, 0)
    pick = min if direction == "higher" else max
    worst_site = pick(valid, key=lambda s: valid[s])
    return SiteAggregate(mean, valid[worst_site], worst_site, None, len(valid))


def aggregate_site_metrics(
    per_site: Mapping[str, Mapping[str, float]], weights: Mapping[str, int]
) -> dict[str, SiteAggregate]:
    """Summarise per-site metrics (``{site: {metric: value}}``) per metric, over the sites that report it.

    ``weights`` gives each site's example count (the mean's weight); every site in ``per_site`` needs one,
    weights must be >= 0, and when the sites with a value all weigh 0 the mean is unweighted. NaN values are
    ignored; a metric that every site reports as NaN aggregates to NaN.
    """
    for site in per_site:
        if site not in weights:
            raise ValueError(f"no example weight for site {site!r} (weights given for {sorted(weights)})")
        if weights[site] < 0:
            raise ValueError(f"example weight of site {site!r} is {weights[site]}; it must be >= 0")
    keys = sorted({k for metrics in per_site.values() for k in metrics})
    return {
        key: _aggregate_one(
            key,
            {s: float(m[key]) for s, m in per_site.items() if key in m},
            {s: weights[s] for s in per_site},
        )
        for key in keys
    }


# ------------------------------------------------------------------------------------------ round reports
def _float_dict(values: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in values.items()}


@dataclass(frozen=True)
class RoundReport:
    """Everything logged for one server round.

    ``evaluation``: ``{site: {metric: value}}`` of the global adapter on each site's validation split (keys such
    as ``val/dice_1click``; ``test/...`` in the final test; none may start with ``train/``), weighted by
    ``evaluation_weights`` (the cases evaluated).
    ``training``: ``{site: {metric: value}}`` with keys starting ``train/`` (or ``privacy/``: the ε a site spent
    under sample-level DP), weighted by ``training_weights``.
    ``global_metrics``: extra parent-run metrics of the round (e.g. ``federation/refused_updates``); their names
    may not start with ``global/`` (reserved for the aggregates).
    ``refused``: ``{site: reason}`` of the updates admission refused this round (:mod:`server.admission`).
    """

    server_round: int
    evaluation: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    evaluation_weights: Mapping[str, int] = field(default_factory=dict)
    training: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    training_weights: Mapping[str, int] = field(default_factory=dict)
    global_metrics: Mapping[str, float] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (
            isinstance(self.server_round, bool)
            or not isinstance(self.server_round, int)
            or self.server_round < 0
        ):
            raise ValueError(f"server_round must be an int >= 0, got {self.server_round!r}")
        for site, metrics in self.evaluation.items():
            bad = [k for k in metrics if k.startswith(TRAIN_PREFIX)]
            if bad:
                raise ValueError(f"evaluation metrics of site {site!r} use the training prefix: {bad}")
        for site, metrics in self.training.items():
            bad = [k for k in metrics if not k.startswith((TRAIN_PREFIX, PRIVACY_PREFIX))]
            if bad:
                raise ValueError(
                    f"training metrics of site {site!r} must start with {TRAIN_PREFIX!r} or {PRIVACY_PREFIX!r}: {bad}"
                )
        for site in self.sites:
            clash = sorted(
                SITE_RESERVED & (set(self.evaluation.get(site, {})) | set(self.training.get(site, {})))
            )
            if clash:
                raise ValueError(f"metrics of site {site!r} use names fedabus reserves: {clash}")
        reserved = [k for k in self.global_metrics if k.startswith(GLOBAL_PREFIX) or k == ROUND_METRIC]
        if reserved:
            raise ValueError(
                f"global_metrics {reserved} use a reserved name ({GLOBAL_PREFIX}*, {ROUND_METRIC})"
            )
        for what, per_site, weights in (
            ("evaluation", self.evaluation, self.evaluation_weights),
            ("training", self.training, self.training_weights),
        ):
            missing = sorted(set(per_site) - set(weights))
            if missing:
                raise ValueError(f"{what} metrics of site(s) {missing} have no {what}_weights entry")

    @classmethod
    def from_site_metrics(
        cls,
        server_round: int,
        *,
        evaluation: Mapping[str, Mapping[str, float]] | None = None,
        training: Mapping[str, Mapping[str, float]] | None = None,
        weight_key: str = NUM_EXAMPLES,
        global_metrics: Mapping[str, float] | None = None,
        refused: Mapping[str, str] | None = None,
    ) -> RoundReport:
        """Build a report from the metric dicts sites send (``{site: MetricRecord as dict}``).

        Each site's ``weight_key`` entry becomes its weight (missing: ValueError naming the site); training
        metric names other than ``train/...`` and ``privacy/...`` get the ``train/`` prefix.
        """

        def split(per_site: Mapping[str, Mapping[str, float]], what: str, prefix: str = ""):
            metrics, weights = {}, {}
            for site, values in per_site.items():
                if weight_key not in values:
                    raise ValueError(
                        f"{what} metrics of site {site!r} carry no {weight_key!r} (its example count)"
                    )
                weights[site] = int(values[weight_key])
                metrics[site] = {
                    (k if k.startswith((prefix, PRIVACY_PREFIX)) else prefix + k): float(v)
                    for k, v in values.items()
                    if k != weight_key
                }
            return metrics, weights

        ev, ev_w = split(evaluation or {}, "evaluation")
        tr, tr_w = split(training or {}, "training", TRAIN_PREFIX)
        refused_text = {str(site): str(reason) for site, reason in (refused or {}).items()}
        return cls(server_round, ev, ev_w, tr, tr_w, _float_dict(global_metrics or {}), refused_text)

    @property
    def sites(self) -> list[str]:
        return sorted(set(self.evaluation) | set(self.training))

    def site_metrics(self, site: str) -> dict[str, float]:
        """What the site's run gets this round: evaluation and training metrics and both example counts."""
        out = {**_float_dict(self.evaluation.get(site, {})), **_float_dict(self.training.get(site, {}))}
        if site in self.evaluation:
            out[EVAL_WEIGHT_METRIC] = float(self.evaluation_weights[site])
        if site in self.training:
            out[TRAIN_WEIGHT_METRIC] = float(self.training_weights[site])
        return out

    def aggregates(self) -> dict[str, SiteAggregate]:
        """Evaluation metrics aggregated with the test weights, training metrics with the training weights."""
        return {
            **aggregate_site_metrics(self.evaluation, self.evaluation_weights),
            **aggregate_site_metrics(self.training, self.training_weights),
        }

    def parent_metrics(self) -> dict[str, float]:
        """What the parent run gets this round: the aggregates and the extra global metrics."""
        out = _float_dict(self.global_metrics)
        for key, aggregate in self.aggregates().items():
            out.update(aggregate.as_metrics(key))
        return out

    def merged_with(self, logged: RoundReport, logged_sites: Iterable[str]) -> RoundReport:
        """This report with the data of ``logged_sites`` taken from ``logged`` (what MLflow already holds)."""
        keep = set(logged_sites)

        def pick(new: Mapping[str, Any], old: Mapping[str, Any]) -> dict[str, Any]:
            return {
                **{s: v for s, v in new.items() if s not in keep},
                **{s: v for s, v in old.items() if s in keep},
            }

        return replace(
            self,
            evaluation=pick(self.evaluation, logged.evaluation),
            evaluation_weights=pick(self.evaluation_weights, logged.evaluation_weights),
            training=pick(self.training, logged.training),
            training_weights=pick(self.training_weights, logged.training_weights),
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (NaN and infinities become null), e.g. to keep in a checkpoint's ``extra``."""
        return json_safe(
            {
                "round": self.server_round,
                "evaluation": self.evaluation,
                "evaluation_weights": self.evaluation_weights,
                "training": self.training,
                "training_weights": self.training_weights,
                "global_metrics": self.global_metrics,
                "refused": self.refused,
            }
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundReport:
        """Inverse of :meth:`to_json` (null values come back as NaN)."""

        def metrics(per_site: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
            return {
                s: {k: math.nan if v is None else float(v) for k, v in m.items()} for s, m in per_site.items()
            }

        return cls(
            int(data["round"]),
            metrics(data.get("evaluation", {})),
            {s: int(w) for s, w in data.get("evaluation_weights", {}).items()},
            metrics(data.get("training", {})),
            {s: int(w) for s, w in data.get("training_weights", {}).items()},
            {k: math.nan if v is None else float(v) for k, v in data.get("global_metrics", {}).items()},
            {str(s): str(r) for s, r in data.get("refused", {}).items()},
        )


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (recursively), so that it is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def round_summary(report: RoundReport) -> dict[str, Any]:
    """One entry of ``summary/rounds.json``: per-site metrics with example counts, aggregates with worst site."""
    return json_safe(
        {
            "round": report.server_round,
            "sites": {site: report.site_metrics(site) for site in report.sites},
            "aggregates": {
                key: {
                    "mean": a.mean,
                    "worst": a.worst,
                    "worst_site": a.worst_site,
                    "total": a.total,
                    "n_sites": a.n_sites,
                }
                for key, a in report.aggregates().items()
            },
            "global": dict(report.global_metrics),
            "refused": dict(report.refused),
        }
    )


# ------------------------------------------------------------------------------------------ best adapter
@dataclass(frozen=True)
class BestAdapter:
    """The best global adapter so far, by ``metric`` (an aggregate such as ``global/val/dice_1click_mean``)."""

    adapter: Adapter
    metric: str
    value: float
    server_round: int


def update_best(
    best: BestAdapter | None, *, adapter: Adapter, metric: str, value: float, server_round: int
) -> BestAdapter | None:
    """``best`` replaced by this round's adapter when ``value`` beats it (by the metric's declared direction,
    :func:`~shared.metric_names.metric_direction`).

    NaN never wins. Raises ValueError for a metric whose direction is unknown or a count. The adapter is kept
    by reference: pass one that is not modified afterwards.
    """
    direction = metric_direction(metric)
    if direction not in ("higher", "lower"):
        raise ValueError(f"cannot rank adapters by {metric!r}: it is not a higher- or lower-is-better metric")
    if best is not None and best.metric != metric:
        raise ValueError(f"best adapter is ranked by {best.metric!r}, not {metric!r}")
    if math.isnan(value):
        return best
    if best is None or math.isnan(best.value):
        return BestAdapter(adapter, metric, float(value), server_round)
    better = value > best.value if direction == "higher" else value < best.value
    return BestAdapter(adapter, metric, float(value), server_round) if better else best
