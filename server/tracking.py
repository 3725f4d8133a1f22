"""MLflow tracking of a federation: one parent run, one nested run per site, one batched write per run and round.

What ends up where (experiment ``fedabus`` by default)::

    parent run (tag fedabus.role=federation)
      params     the flat run config, federation.strategy, federation.sites, base-fingerprint.<model>,
                 code.fedabus-version, code.git-commit, code.git-dirty (values longer than MLflow's limit are
                 truncated; config/run_config.json holds them in full)
      metrics    global/<metric>_mean (example-weighted), global/<metric>_worst (worst site),
                 global/<count>_total, the caller's extra round metrics, federation/round; step = round
      artifacts  config/run_config.json, summary/rounds.json (updated every round), plots/dice.png,
                 plots/auc.png, adapters/final.{safetensors,json}, adapters/best.{safetensors,json}
    nested run per site (tags fedabus.site=<site>, mlflow.parentRunId=<parent>), created when the site
    first reports
      metrics    the site's evaluation metrics (test/dice_1click, test/auc, ...), its training metrics
                 (train/...), federation/eval_examples, federation/train_examples, federation/round

Every round is written with exactly one ``MlflowClient.log_batch`` per run (sites first, the parent last). Each
batch carries the sentinel metric ``federation/round`` (value = step = round), stored in the same database
transaction as the round's other metrics, so "last round logged to this run" is read back from MLflow itself:
logging a round that a run already holds is skipped. That makes :meth:`FederationTracker.log_round` idempotent,
and a resumed federation (:meth:`FederationTracker.resume`) can replay its last round without duplicating steps.

This module does not import Flower; the ServerApp turns replies into a :class:`RoundReport`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared import __version__
from shared.adapters import Adapter, save_adapter
from shared.mlflow_store import (
    DEFAULT_STORE_DIR,
    TrackingError,
    _artifact_location,
    describe_location,
    mlflow_client,
    resolve_tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_STORE_DIR",
    "GLOBAL_PREFIX",
    "ROUND_METRIC",
    "BestAdapter",
    "FederationTracker",
    "RoundReport",
    "SiteAggregate",
    "TrackingError",
    "aggregate_site_metrics",
    "code_version",
    "describe_location",
    "federation_params",
    "metric_direction",
    "plot_metric_by_round",
    "resolve_tracking_uri",
    "round_summary",
    "update_best",
]

DEFAULT_EXPERIMENT = "fedabus"
#: Prefix of the aggregates the server logs on the parent run.
GLOBAL_PREFIX = "global/"
#: Sentinel metric in every round batch: value = step = round; the last logged round of a run.
ROUND_METRIC = "federation/round"
EVAL_WEIGHT_METRIC = "federation/eval_examples"
TRAIN_WEIGHT_METRIC = "federation/train_examples"
TRAIN_PREFIX = "train/"
#: Training-side metrics of sample-level DP (cumulative ε per model at a site), logged as sent.
PRIVACY_PREFIX = "privacy/"
_SITE_RESERVED = frozenset({ROUND_METRIC, EVAL_WEIGHT_METRIC, TRAIN_WEIGHT_METRIC})

TAG_ROLE = "fedabus.role"
TAG_SITE = "fedabus.site"
TAG_SITES = "fedabus.sites"
TAG_PARENT = "mlflow.parentRunId"
ROLE_FEDERATION = "federation"
ROLE_SITE = "site"

# MLflow's limits (mlflow.utils.validation): param value length, entities per log_batch call.
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

Direction = Literal["higher", "lower", "count"]
_COUNT_NAME = re.compile(r"^(n|num)[_-]")
_LOWER_IS_BETTER = ("hd95", "hausdorff", "loss", "error", "distance", "epsilon")
_HIGHER_IS_BETTER = ("dice", "auc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "f1", "iou")
_DICE_CLICK = re.compile(r"^val/dice_(\d+)click$")
#: Final-test metrics: the test split's prefix, each site's test cases, and the rounds whose adapter was tested.
TEST_PREFIX = "test/"
TEST_WEIGHT_METRIC = "federation/test_examples"
TAG_TESTED = "fedabus.tested_rounds"


# ------------------------------------------------------------------------------------------ aggregation
def metric_direction(key: str) -> Direction | None:
    """How the worst site is chosen for a metric, from the last part of its name.

    ``"higher"`` (Dice, AUC, sensitivity, specificity, PPV, NPV, accuracy, F1, IoU: worst = minimum),
    ``"lower"`` (HD95, losses, errors, distances, DP epsilon: worst = maximum), ``"count"`` (``n_*`` /
    ``num_*``: summed, no worst) or None when the name says nothing (only the mean is reported).
    """
    name = key.rsplit("/", 1)[-1].lower()
    if _COUNT_NAME.match(name) or name.endswith("_examples"):
        return "count"
    if any(part in name for part in _LOWER_IS_BETTER):
        return "lower"
    if any(part in name for part in _HIGHER_IS_BETTER):
        return "higher"
    return None


@dataclass(frozen=True)
class SiteAggregate:
    """One metric summarised over sites; NaN site values are left out (``n_sites`` counts the others).

    ``mean`` is example-weighted (None for counts), ``worst``/``worst_site`` follow :func:`metric_direction`
    (None when it is unknown or a count), ``total`` is the sum (counts only). All NaN when no site has a value.
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

    ``evaluation``: ``{site: {metric: value}}`` of the global adapter on each site's test split (keys such as
    ``test/dice_1click``; none may start with ``train/``), weighted by ``evaluation_weights`` (test cases).
    ``training``: ``{site: {metric: value}}`` with keys starting ``train/`` (or ``privacy/``: the ε a site spent
    under sample-level DP), weighted by ``training_weights``.
    ``global_metrics``: extra parent-run metrics of the round (e.g. ``federation/replies``); their names may
    not start with ``global/`` (reserved for the aggregates).
    """

    server_round: int
    evaluation: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    evaluation_weights: Mapping[str, int] = field(default_factory=dict)
    training: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    training_weights: Mapping[str, int] = field(default_factory=dict)
    global_metrics: Mapping[str, float] = field(default_factory=dict)

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
                _SITE_RESERVED & (set(self.evaluation.get(site, {})) | set(self.training.get(site, {})))
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
        weight_key: str = "num-examples",
        global_metrics: Mapping[str, float] | None = None,
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
        return cls(server_round, ev, ev_w, tr, tr_w, _float_dict(global_metrics or {}))

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
        return _json_safe(
            {
                "round": self.server_round,
                "evaluation": self.evaluation,
                "evaluation_weights": self.evaluation_weights,
                "training": self.training,
                "training_weights": self.training_weights,
                "global_metrics": self.global_metrics,
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
        )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def round_summary(report: RoundReport) -> dict[str, Any]:
    """One entry of ``summary/rounds.json``: per-site metrics with example counts, aggregates with worst site."""
    return _json_safe(
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
        }
    )


# ------------------------------------------------------------------------------------------ best adapter
@dataclass(frozen=True)
class BestAdapter:
    """The best global adapter so far, by ``metric`` (an aggregate such as ``global/test/dice_1click_mean``)."""

    adapter: Adapter
    metric: str
    value: float
    server_round: int


def update_best(
    best: BestAdapter | None, *, adapter: Adapter, metric: str, value: float, server_round: int
) -> BestAdapter | None:
    """``best`` replaced by this round's adapter when ``value`` beats it (per :func:`metric_direction`).

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


# ------------------------------------------------------------------------------------------ params
def code_version(code_dir: str | Path | None = None) -> dict[str, str]:
    """fedabus version and, when ``code_dir`` (default: this package) is in a git checkout, its commit and
    whether tracked files differ from it. Read-only git calls; ``unknown`` when git is not available."""
    folder = Path(code_dir) if code_dir is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(folder), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "fedabus-version": __version__,
        "git-commit": commit or "unknown",
        "git-dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
    }


def _param_value(value: Any) -> str:
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value)
        if isinstance(value, list | dict)
        else str(value)
    )
    if len(text) <= MAX_PARAM_VALUE:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    note = f"... [truncated from {len(text)} chars, sha256 {digest}; full value in config/run_config.json]"
    return text[: MAX_PARAM_VALUE - len(note)] + note


def federation_params(
    config: Mapping[str, Any],
    *,
    strategy: str,
    sites: Sequence[str] = (),
    base_fingerprint: str | Mapping[str, str] = "",
    code: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """All parent-run params, untruncated: the flat config plus ``federation.*``, ``base-fingerprint*`` and
    ``code.*``. A config key that holds another value than one of those raises ValueError."""
    fingerprints = (
        {"base-fingerprint": base_fingerprint}
        if isinstance(base_fingerprint, str)
        else {f"base-fingerprint.{k}": v for k, v in sorted(base_fingerprint.items())}
    )
    ours: dict[str, Any] = {
        "federation.strategy": strategy,
        "federation.sites": ",".join(sites),
        **fingerprints,
        **{f"code.{k}": v for k, v in (code if code is not None else code_version()).items()},
    }
    clash = sorted(k for k in set(config) & set(ours) if str(config[k]) != str(ours[k]))
    if clash:
        raise ValueError(f"config keys {clash} collide with parameters fedabus logs itself")
    return {**dict(config), **ours}


# ------------------------------------------------------------------------------------------ plots
_MEAN = "weighted mean"


def _series(history: Sequence[RoundReport], key: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for report in history:
        for site, metrics in report.evaluation.items():
            if key in metrics:
                rounds, values = out.setdefault(site, ([], []))
                rounds.append(report.server_round)
                values.append(metrics[key])
    means = [(r.server_round, r.aggregates()[key].mean) for r in history if key in r.aggregates()]
    if means:
        out[_MEAN] = ([r for r, _ in means], [float(v) for _, v in means])
    return out


def plot_metric_by_round(
    history: Sequence[RoundReport], keys: Sequence[str], *, title: str, ylabel: str, path: Path
) -> None:
    """PNG of per-site values of ``keys`` against rounds: one colour per site (the example-weighted mean in
    black), one line style per key."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    sites = sorted({site for report in history for site in report.evaluation})
    colours = {site: f"C{i % 10}" for i, site in enumerate(sites)} | {_MEAN: "black"}
    for key, style in zip(keys, ("-", "--", ":", "-."), strict=False):
        for site, (rounds, values) in _series(history, key).items():
            axes.plot(rounds, values, style, marker="o", color=colours[site], label=f"{site}: {key}")
    if axes.lines:
        axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        axes.text(0.5, 0.5, f"no {', '.join(keys)} values yet", ha="center", transform=axes.transAxes)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(title=title, xlabel="server round", ylabel=ylabel)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def _dice_keys(history: Sequence[RoundReport]) -> list[str]:
    """``val/dice_1click`` and the largest click count reported."""
    clicks = sorted(
        {
            int(m[1])
            for r in history
            for site in r.evaluation.values()
            for k in site
            if (m := _DICE_CLICK.match(k))
        }
    )
    return (
        [f"val/dice_{n}click" for n in dict.fromkeys([clicks[0], clicks[-1]])]
        if clicks
        else ["val/dice_1click"]
    )


# ------------------------------------------------------------------------------------------ the tracker
def _now_ms() -> int:
    return int(time.time() * 1000)


class FederationTracker:
    """One federation's MLflow runs. Create with :meth:`start` or :meth:`resume`; then call
    :meth:`log_round` once per server round and :meth:`finish` at the end."""

    def __init__(
        self,
        client: MlflowClient,
        *,
        tracking_uri: str,
        experiment_id: str,
        run_id: str,
        site_runs: Mapping[str, str] | None = None,
        last_logged_round: int = -1,
        history: Mapping[int, RoundReport] | None = None,
        upload_summary_every_round: bool = True,
    ) -> None:
        self.client = client
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.site_runs: dict[str, str] = dict(site_runs or {})
        self._last_logged_round = last_logged_round
        self._history: dict[int, RoundReport] = dict(history or {})
        self.upload_summary_every_round = upload_summary_every_round

    # ---------------------------------------------------------------- creation
    @classmethod
    def start(
        cls,
        *,
        config: Mapping[str, Any],
        strategy: str,
        sites: Sequence[str] = (),
        base_fingerprint: str | Mapping[str, str] = "",
        tracking_uri: str = "",
        default_dir: str | Path | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str = "federation",
        code: Mapping[str, str] | None = None,
        upload_summary_every_round: bool = True,
    ) -> FederationTracker:
        """Create the parent run and log its params (in batches of MLflow's maximum of 100).

        ``config`` is the flat run config (e.g. ``to_flat_dict(config)`` or Flower's run config); see
        :func:`federation_params` and :func:`resolve_tracking_uri` for the other arguments.
        """
        uri = resolve_tracking_uri(tracking_uri, default_dir=default_dir)
        client = mlflow_client(uri)
        params = federation_params(
            config, strategy=strategy, sites=sites, base_fingerprint=base_fingerprint, code=code
        )
        experiment_id = cls._experiment_id(client, uri, experiment)
        tags = {TAG_ROLE: ROLE_FEDERATION, "fedabus.strategy": strategy}
        if params.get("code.git-commit", "unknown") != "unknown":
            tags["mlflow.source.git.commit"] = params["code.git-commit"]
        run = client.create_run(experiment_id, tags=tags, run_name=run_name)
        tracker = cls(
            client,
            tracking_uri=uri,
            experiment_id=experiment_id,
            run_id=run.info.run_id,
            upload_summary_every_round=upload_summary_every_round,
        )
        tracker._log_params(params)
        return tracker

    @staticmethod
    def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
        from mlflow.exceptions import MlflowException

        existing = client.get_experiment_by_name(name)
        if existing is not None and existing.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {name!r} in {uri} is deleted; restore it or choose another name"
            )
        if existing is not None:
            return existing.experiment_id
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException:  # created concurrently by another process
            existing = client.get_experiment_by_name(name)
            if existing is None:
                raise
            return existing.experiment_id

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
        self._log_json_artifact({"params": _json_safe(dict(params))}, "config", "run_config.json")

    @classmethod
    def resume(
        cls,
        run_id: str,
        *,
        tracking_uri: str = "",
        default_dir: str | Path | None = None,
        upload_summary_every_round: bool = True,
    ) -> FederationTracker:
        """Reopen a federation's parent run and its site runs (found by tag) and reload the logged rounds.

        Raises TrackingError when the run does not exist in the store or is not a fedabus federation run.
        """
        from mlflow.exceptions import MlflowException

        uri = resolve_tracking_uri(tracking_uri, default_dir=default_dir)
        client = mlflow_client(uri)
        try:
            parent = client.get_run(run_id)
        except MlflowException as exc:
            raise TrackingError(f"cannot open MLflow run {run_id!r} in {uri}: {exc.message}") from None
        if parent.data.tags.get(TAG_ROLE) != ROLE_FEDERATION:
            raise TrackingError(
                f"MLflow run {run_id!r} in {uri} is not a fedabus federation run (no {TAG_ROLE} tag)"
            )
        if parent.info.lifecycle_stage != "active":
            raise TrackingError(f"MLflow run {run_id!r} in {uri} is deleted; restore it in the UI to resume")
        site_runs = cls._find_site_runs(client, parent)
        runs = [parent, *site_runs.values()]
        tracker = cls(
            client,
            tracking_uri=uri,
            experiment_id=parent.info.experiment_id,
            run_id=run_id,
            site_runs={site: r.info.run_id for site, r in site_runs.items()},
            last_logged_round=int(parent.data.metrics.get(ROUND_METRIC, -1)),
            history=_rebuild_history(client, parent, site_runs),
            upload_summary_every_round=upload_summary_every_round,
        )
        resumes = int(parent.data.tags.get("fedabus.resumes", "0")) + 1
        for r in runs:
            client.update_run(r.info.run_id, status="RUNNING")
        client.set_tag(run_id, "fedabus.resumes", str(resumes))
        return tracker

    @staticmethod
    def _find_site_runs(client: MlflowClient, parent: Run) -> dict[str, Run]:
        """Nested runs of ``parent`` by their site tag; the earliest one wins if a site has several."""
        found: dict[str, Run] = {}
        token = None
        while True:
            page = client.search_runs(
                [parent.info.experiment_id],
                filter_string=f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'",
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            for run in page:
                site = run.data.tags.get(TAG_SITE)
                if site is not None and site not in found:
                    found[site] = run
            token = page.token
            if not token:
                return found

    # ---------------------------------------------------------------- rounds
    @property
    def history(self) -> list[RoundReport]:
        """The rounds logged so far (including those before a resume), in round order."""
        return [self._history[r] for r in sorted(self._history)]

    @property
    def last_logged_round(self) -> int:
        """The last round fully logged (the parent run holds it); -1 when none."""
        return self._last_logged_round

    def _site_run(self, site: str) -> str:
        if site not in self.site_runs:
            run = self.client.create_run(
                self.experiment_id,
                tags={TAG_PARENT: self.run_id, TAG_SITE: site, TAG_ROLE: ROLE_SITE},
                run_name=site,
            )
            self.site_runs[site] = run.info.run_id
        return self.site_runs[site]

    def _log_round_batch(
        self,
        run_id: str,
        server_round: int,
        metrics: Mapping[str, float],
        tags: Sequence[tuple[str, str]] = (),
        *,
        sentinel: bool = True,
    ) -> None:
        """One ``log_batch`` with the round's metrics and the sentinel (more only beyond 1000 metrics)."""
        from mlflow.entities import Metric, RunTag

        stamp = _now_ms()
        items = [Metric(k, float(v), stamp, server_round) for k, v in metrics.items()]
        if sentinel:
            items.append(Metric(ROUND_METRIC, float(server_round), stamp, server_round))
        tag_items = [RunTag(k, v) for k, v in tags]
        # Only rounds beyond MLflow's 1000 entities per call are split; the sentinel is last, so it lands
        # with the final chunk.
        size = MAX_METRICS_PER_BATCH - len(tag_items)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        for i, chunk in enumerate(chunks):
            self.client.log_batch(run_id, metrics=chunk, tags=tag_items if i == len(chunks) - 1 else ())

    def log_round(self, report: RoundReport) -> bool:
        """Log one round: one ``log_batch`` on each reporting site's run, then one on the parent.

        A round is complete in MLflow once the parent holds it. Rounds up to the parent's last logged round
        are skipped (returns False), so replaying a round after a resume never duplicates steps. When an
        earlier attempt stopped part-way (some site runs hold the round, the parent does not), those sites are
        not logged again and the parent's aggregates combine what they hold with the new report.
        """
        r = report.server_round
        if r <= self.last_logged_round:
            return False
        partial = self._history.get(r)
        done = set(partial.sites) if partial is not None else set()
        merged = report.merged_with(partial, done) if partial is not None else report
        for site in report.sites:
            if site not in done:
                self._log_round_batch(self._site_run(site), r, report.site_metrics(site))
        sites_tag = ",".join(sorted(self.site_runs))
        self._log_round_batch(self.run_id, r, merged.parent_metrics(), tags=[(TAG_SITES, sites_tag)])
        self._last_logged_round = r
        self._history[r] = merged
        if self.upload_summary_every_round:
            self._log_json_artifact(self.summary(), "summary", "rounds.json")
        return True

    def log_test(self, report: RoundReport) -> bool:
        """Log the final-test metrics of the adapter of round ``report.server_round`` at that step: one batch
        per site run (``test/...`` and ``federation/test_examples``) and one on the parent (``global/test/...``).

        No round sentinel: a test is not a round. Idempotent: a round the parent's tag ``fedabus.tested_rounds``
        lists is skipped (returns False), so a resumed server never logs a test twice.
        """
        tested = self.tested_rounds()
        r = report.server_round
        if r in tested:
            return False
        for site in report.sites:
            metrics = {**report.evaluation[site], TEST_WEIGHT_METRIC: float(report.evaluation_weights[site])}
            self._log_round_batch(self._site_run(site), r, metrics, sentinel=False)
        parent = {
            k: v for k, v in report.parent_metrics().items() if k.startswith(GLOBAL_PREFIX + TEST_PREFIX)
        }
        tag = ",".join(str(x) for x in sorted(tested | {r}))
        self._log_round_batch(self.run_id, r, parent, tags=[(TAG_TESTED, tag)], sentinel=False)
        return True

    def tested_rounds(self) -> set[int]:
        """Rounds whose adapter has its final-test metrics in MLflow."""
        text = self.client.get_run(self.run_id).data.tags.get(TAG_TESTED, "")
        return {int(x) for x in text.split(",") if x}

    def summary(self) -> dict[str, Any]:
        """The content of ``summary/rounds.json``."""
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "rounds": [round_summary(report) for report in self.history],
        }

    # ---------------------------------------------------------------- artifacts and the end
    def _log_json_artifact(self, content: Mapping[str, Any], folder: str, name: str) -> None:
        with tempfile.TemporaryDirectory(prefix="fedabus-mlflow-") as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(content, indent=1, allow_nan=False) + "\n")
            self.client.log_artifacts(self.run_id, tmp, folder)

    def log_adapter(self, adapter: Adapter, name: str, *, metadata: Mapping[str, Any] | None = None) -> None:
        """Log ``adapters/<name>.safetensors`` and ``adapters/<name>.json`` (manifest, ``metadata`` added)."""
        with tempfile.TemporaryDirectory(prefix="fedabus-mlflow-") as tmp:
            self._write_adapter(Path(tmp), adapter, name, metadata)
            self.client.log_artifacts(self.run_id, tmp, "adapters")

    @staticmethod
    def _write_adapter(folder: Path, adapter: Adapter, name: str, metadata: Mapping[str, Any] | None) -> None:
        manifest = dict(adapter.manifest)
        manifest["metadata"] = {**manifest.get("metadata", {}), **dict(metadata or {})}
        save_adapter(Adapter(adapter.tensors, manifest), folder / name)

    def finish(
        self,
        *,
        final_adapter: Adapter | None = None,
        best: BestAdapter | None = None,
        status: str = "FINISHED",
    ) -> None:
        """Log the summary, the plots and the final/best adapters in one upload, then end every run.

        ``status`` is an MLflow run status (``FINISHED``, ``FAILED``, ``KILLED``).
        """
        from mlflow.entities import RunTag

        with tempfile.TemporaryDirectory(prefix="fedabus-mlflow-") as tmp:
            self._write_final_artifacts(Path(tmp), final_adapter, best)
            self.client.log_artifacts(self.run_id, tmp)
        tags = [RunTag("fedabus.final_round", str(self.last_logged_round))]
        if best is not None:
            tags += [
                RunTag("fedabus.best_round", str(best.server_round)),
                RunTag("fedabus.best_metric", best.metric),
            ]
        self.client.log_batch(self.run_id, tags=tags)
        for run_id in [*self.site_runs.values(), self.run_id]:
            self.client.set_terminated(run_id, status=status)

    def _write_final_artifacts(
        self, root: Path, final_adapter: Adapter | None, best: BestAdapter | None
    ) -> None:
        """``summary/rounds.json``, ``plots/{dice,auc}.png`` and ``adapters/{final,best}.*`` under ``root``."""
        for sub in ("summary", "plots", "adapters"):
            (root / sub).mkdir()
        summary = json.dumps(self.summary(), indent=1, allow_nan=False)
        (root / "summary" / "rounds.json").write_text(summary + "\n")
        history = self.history
        plot_metric_by_round(
            history,
            _dice_keys(history),
            title="Validation Dice per site",
            ylabel="Dice",
            path=root / "plots" / "dice.png",
        )
        plot_metric_by_round(
            history, ["val/auc"], title="AUC per site", ylabel="AUC", path=root / "plots" / "auc.png"
        )
        if final_adapter is not None:
            self._write_adapter(root / "adapters", final_adapter, "final", {"round": self.last_logged_round})
        if best is not None:
            info = {"round": best.server_round, "metric": best.metric, "value": _json_safe(best.value)}
            self._write_adapter(root / "adapters", best.adapter, "best", info)

    def describe_location(self) -> str:
        """Where this federation's run is and how to open it in the MLflow UI."""
        return describe_location(self.tracking_uri, experiment_id=self.experiment_id, run_id=self.run_id)


# ------------------------------------------------------------------------------------------ history rebuild
def _metric_steps(client: MlflowClient, run: Run) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` of a run's metrics (the latest value when a step was logged twice)."""
    by_step: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for metric in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp):
            by_step.setdefault(metric.step, {})[key] = metric.value
    return {step: values for step, values in by_step.items() if ROUND_METRIC in values}


def _rebuild_history(
    client: MlflowClient, parent: Run, site_runs: Mapping[str, Run]
) -> dict[int, RoundReport]:
    """The :class:`RoundReport` of every round the runs hold, read back from MLflow's metric history."""
    rounds: dict[int, dict[str, Any]] = {}

    def entry(step: int) -> dict[str, Any]:
        return rounds.setdefault(step, {"ev": {}, "ev_w": {}, "tr": {}, "tr_w": {}, "global": {}})

    for site, run in site_runs.items():
        for step, values in _metric_steps(client, run).items():
            e = entry(step)
            if EVAL_WEIGHT_METRIC in values:
                e["ev_w"][site] = int(values[EVAL_WEIGHT_METRIC])
                e["ev"][site] = {
                    k: v
                    for k, v in values.items()
                    if not k.startswith((TRAIN_PREFIX, TEST_PREFIX))
                    and k not in _SITE_RESERVED | {TEST_WEIGHT_METRIC}
                }
            if TRAIN_WEIGHT_METRIC in values:
                e["tr_w"][site] = int(values[TRAIN_WEIGHT_METRIC])
                e["tr"][site] = {k: v for k, v in values.items() if k.startswith(TRAIN_PREFIX)}
    for step, values in _metric_steps(client, parent).items():
        entry(step)["global"] = {
            k: v for k, v in values.items() if not k.startswith(GLOBAL_PREFIX) and k != ROUND_METRIC
        }
    return {
        step: RoundReport(step, e["ev"], e["ev_w"], e["tr"], e["tr_w"], e["global"])
        for step, e in sorted(rounds.items())
    }
