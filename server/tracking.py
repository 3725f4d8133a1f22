"""MLflow tracking of a federation: one parent run, one nested run per site, one batched write per run and round.

Over 500 lines on purpose: it is everything fedabus does with MLflow (runs, resume, params, metrics, artifacts,
tags) and nothing else; reports and plots live in server/reports.py and server/plots.py.

What ends up where (experiment ``fedabus`` by default)::

    parent run (tag fedabus.role=federation)
      params     the flat run config, federation.strategy, federation.sites, base-fingerprint.<model>,
                 code.fedabus-version, code.git-commit, code.git-dirty (values longer than MLflow's limit are
                 truncated; config/run_config.json holds them in full)
      metrics    global/val/<metric>_mean (example-weighted), global/val/<metric>_worst (worst site),
                 global/<count>_total, the caller's extra round metrics (federation/refused_updates, ...),
                 federation/round; step = round; after the last round global/test/<metric>_mean at the step
                 of each tested adapter
      tags       fedabus.refused_updates.round-<r>: "site: reason; ..." in a round where admission refused
                 updates (also under "refused" in summary/rounds.json); fedabus.stop_reason,
                 fedabus.stopped_before_round, fedabus.stop_message when the run ended early (e.g. at the
                 client-level DP budget; also "stopped" in the work folder's summary.json)
      artifacts  config/run_config.json, summary/rounds.json (updated every round), plots/dice.png,
                 plots/auc.png, adapters/final.{safetensors,json}, adapters/best.{safetensors,json}
    nested run per site (tags fedabus.site=<site>, mlflow.parentRunId=<parent>), created when the site
    first reports
      metrics    the site's validation metrics (val/dice_1click, val/auc, ...), its training metrics
                 (train/...), federation/eval_examples, federation/train_examples, federation/round; after the
                 last round its test metrics (test/...) and federation/test_examples at each tested round

Every round is written with exactly one ``MlflowClient.log_batch`` per run (sites first, the parent last). Each
batch carries the sentinel metric ``federation/round`` (value = step = round), stored in the same database
transaction as the round's other metrics, so "last round logged to this run" is read back from MLflow itself:
logging a round that a run already holds is skipped. That makes :meth:`FederationTracker.log_round` idempotent,
and a resumed federation (:meth:`FederationTracker.resume`) can replay its last round without duplicating steps.
Final-test metrics (:meth:`FederationTracker.log_test`) carry no sentinel; the parent's tag
``fedabus.tested_rounds`` makes them idempotent too.

**The tracking server may be down** (:mod:`server.tracking_outage`): MLflow's HTTP retries are bounded to seconds,
and a round that cannot be logged because the server does not answer is kept (:attr:`FederationTracker.backlog`,
also saved in each checkpoint) and sent, in round order and with its own step, before the next round once the server
answers again; the server log says when it became unreachable and when it came back. Training never waits for it.
Only a refused request (a real error) raises.

This module holds the MLflow side only: the runs, their params (:func:`federation_params`) and reading the
logged rounds back on resume. What a round holds and how sites are aggregated is :mod:`server.reports`, the
plots are :mod:`server.plots`. It does not import Flower; the ServerApp turns replies into a
:class:`~server.reports.RoundReport`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.plots import write_round_plots
from server.reports import (
    GLOBAL_PREFIX,
    SITE_RESERVED,
    TEST_PREFIX,
    TRAIN_PREFIX,
    BestAdapter,
    RoundReport,
    json_safe,
    round_summary,
)
from server.tracking_outage import TrackingOutage, apply_http_policy, is_unreachable
from shared import __version__
from shared.adapters import Adapter, save_adapter
from shared.metric_names import EVAL_WEIGHT_METRIC, ROUND_METRIC, TEST_WEIGHT_METRIC, TRAIN_WEIGHT_METRIC
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
    "FederationTracker",
    "TrackingError",
    "code_version",
    "describe_location",
    "federation_params",
    "resolve_tracking_uri",
]

DEFAULT_EXPERIMENT = "fedabus"
#: Flower's logger by name (the server log), without importing Flower.
_LOG = logging.getLogger("flwr")

TAG_ROLE = "fedabus.role"
TAG_SITE = "fedabus.site"
TAG_SITES = "fedabus.sites"
TAG_PARENT = "mlflow.parentRunId"
#: The rounds whose adapter has its final-test metrics logged (parent run).
TAG_TESTED = "fedabus.tested_rounds"
#: Parent-run tag ``fedabus.refused_updates.round-<r>``: the sites whose update admission refused, with reasons.
TAG_REFUSED = "fedabus.refused_updates"
#: Parent-run tags of a run that ended before its last round (:meth:`FederationTracker.log_stop`).
TAG_STOP_REASON = "fedabus.stop_reason"
TAG_STOPPED_BEFORE = "fedabus.stopped_before_round"
TAG_STOP_MESSAGE = "fedabus.stop_message"
#: Parent-run tag: rounds run again after a resume fell back to an earlier checkpoint (their MLflow steps hold the
#: first attempt; summary.json and the checkpoints hold the re-run).
TAG_RERUN = "fedabus.rerun_rounds"
ROLE_FEDERATION = "federation"
ROLE_SITE = "site"

#: MLflow's limit on a param value's length (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH); longer values are
#: truncated with a note. Batch sizes need no limit here: ``MlflowClient.log_batch`` splits a batch into store
#: calls of at most 100 params or tags and 1000 entities itself (mlflow/tracking/_tracking_service/client.py),
#: for every store (SQLite, REST).
MAX_PARAM_VALUE = 6000
#: Kept well below MLflow's limit on a tag value's length.
MAX_TAG_VALUE = 5000


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
                encoding="utf-8",
                errors="replace",
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


# ------------------------------------------------------------------------------------------ the tracker
def _now_ms() -> int:
    return int(time.time() * 1000)


def _unreachable_at_start(uri: str, error: BaseException) -> TrackingError:
    """A run cannot start or resume while its tracking server does not answer: say so, naming it."""
    reason = str(getattr(error, "message", error)).splitlines()[0][:300]
    return TrackingError(
        f"MLflow tracking server {uri} is unreachable ({reason}); start it, or set federation.tracking-uri to "
        "one that answers, and start the run again"
    )


class FederationTracker:
    """One federation's MLflow runs. Create with :meth:`start` or :meth:`resume`; then call
    :meth:`log_round` once per server round and :meth:`finish` at the end."""

    #: How long :meth:`finish` waits for an unreachable tracking server, and how often it tries (seconds).
    finish_patience_s: float = 120.0
    finish_retry_s: float = 10.0

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
        self.outage = TrackingOutage(tracking_uri)
        #: Rounds not yet sent because the tracking server did not answer, in round order.
        self._backlog: list[RoundReport] = []
        #: Sites whose batch of a round in the backlog already reached MLflow (not sent twice).
        self._sent_sites: dict[int, set[str]] = {}
        #: Parent-run tags and final-test reports kept during an outage.
        self._pending_tags: dict[str, str] = {}
        self._pending_tests: list[RoundReport] = []

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
        """Create the parent run and log its params.

        ``config`` is the flat run config (e.g. ``to_flat_dict(config)`` or Flower's run config); see
        :func:`federation_params` and :func:`resolve_tracking_uri` for the other arguments.
        """
        uri = resolve_tracking_uri(tracking_uri, default_dir=default_dir)
        apply_http_policy()
        client = mlflow_client(uri)
        params = federation_params(
            config, strategy=strategy, sites=sites, base_fingerprint=base_fingerprint, code=code
        )
        try:
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
        except Exception as exc:
            if is_unreachable(exc):
                raise _unreachable_at_start(uri, exc) from None
            raise
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

        self.client.log_batch(self.run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])
        self._log_json_artifact({"params": json_safe(dict(params))}, "config", "run_config.json")

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
        apply_http_policy()
        client = mlflow_client(uri)
        try:
            return cls._reopen(client, uri, run_id, upload_summary_every_round)
        except TrackingError:
            raise
        except MlflowException as exc:
            if is_unreachable(exc):
                raise _unreachable_at_start(uri, exc) from None
            raise TrackingError(f"cannot open MLflow run {run_id!r} in {uri}: {exc.message}") from None
        except Exception as exc:
            if is_unreachable(exc):
                raise _unreachable_at_start(uri, exc) from None
            raise

    @classmethod
    def _reopen(
        cls, client: MlflowClient, uri: str, run_id: str, upload_summary_every_round: bool
    ) -> FederationTracker:
        """The body of :meth:`resume`: find the runs, rebuild the history, mark the runs running again."""
        parent = client.get_run(run_id)
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
        """One ``log_batch`` with the round's metrics and the sentinel.

        MLflow writes it in one store call (one transaction) up to 1000 entities, far more than a round holds.
        A larger batch it splits itself, metrics in order (the sentinel, last, lands with the last ones) and the
        tags with the first part.
        """
        from mlflow.entities import Metric, RunTag

        stamp = _now_ms()
        items = [Metric(k, float(v), stamp, server_round) for k, v in metrics.items()]
        if sentinel:
            items.append(Metric(ROUND_METRIC, float(server_round), stamp, server_round))
        self.client.log_batch(run_id, metrics=items, tags=[RunTag(k, v) for k, v in tags])

    @property
    def backlog(self) -> list[RoundReport]:
        """Rounds kept because the tracking server did not answer (sent by the next :meth:`log_round` or
        :meth:`flush` that reaches it), in round order."""
        return list(self._backlog)

    def log_round(self, report: RoundReport) -> bool:
        """Log one round: one ``log_batch`` on each reporting site's run, then one on the parent.

        A round is complete in MLflow once the parent holds it. Rounds up to the parent's last logged round
        are skipped (returns False), so replaying a round after a resume never duplicates steps. When an
        earlier attempt stopped part-way (some site runs hold the round, the parent does not), those sites are
        not logged again and the parent's aggregates combine what they hold with the new report.

        When the tracking server does not answer, the round is kept (:attr:`backlog`) and False returned; kept
        rounds go first, in order, once it answers. True when this round reached MLflow.
        """
        r = report.server_round
        if r <= self.last_logged_round or any(kept.server_round == r for kept in self._backlog):
            return False
        self._backlog.append(report)
        self.flush(new_round=r)
        return r <= self.last_logged_round

    def flush(self, *, new_round: int | None = None) -> bool:
        """Send what was kept during an outage (rounds, then final-test metrics and tags); True when nothing is
        left. ``new_round``: the round just added (not one the outage delayed). Raises only on an error that is
        not the tracking server being unreachable."""
        late = [kept.server_round for kept in self._backlog if kept.server_round != new_round]
        sent_late = [f"round {r}" for r in late] if self.outage.down else []
        rounds_to_send = bool(self._backlog)
        try:
            while self._backlog:
                self._send_round(self._backlog[0])
                self._sent_sites.pop(self._backlog.pop(0).server_round, None)
            while self._pending_tests:
                self._send_test(self._pending_tests[0])
                sent_late.append(f"test of round {self._pending_tests.pop(0).server_round}")
            if self._pending_tags:
                self._send_tags(self._pending_tags)
                sent_late += sorted(self._pending_tags)
                self._pending_tags = {}
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            what = f"round {self._backlog[0].server_round}" if self._backlog else "the final-test metrics"
            self.outage.failed(what, exc)
            return False
        self.outage.reachable(sent_late)
        if rounds_to_send and self.upload_summary_every_round:
            self._upload_summary()
        return True

    def _send_round(self, report: RoundReport) -> None:
        r = report.server_round
        partial = self._history.get(r)
        done = (set(partial.sites) if partial is not None else set()) | self._sent_sites.get(r, set())
        merged = report.merged_with(partial, set(partial.sites)) if partial is not None else report
        for site in report.sites:
            if site not in done:
                self._log_round_batch(self._site_run(site), r, report.site_metrics(site))
                self._sent_sites.setdefault(r, set()).add(site)
        tags = [(TAG_SITES, ",".join(sorted(self.site_runs)))]
        if report.refused:  # who was refused and why, readable in the run's tags
            text = "; ".join(f"{site}: {reason}" for site, reason in sorted(report.refused.items()))
            tags.append((f"{TAG_REFUSED}.round-{r}", text[:MAX_TAG_VALUE]))
        self._log_round_batch(self.run_id, r, merged.parent_metrics(), tags=tags)
        self._last_logged_round = r
        self._history[r] = merged

    def _upload_summary(self) -> None:
        """``summary/rounds.json``; a failure to reach the server only postpones it to the next round."""
        try:
            self._log_json_artifact(self.summary(), "summary", "rounds.json")
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self.outage.failed("summary/rounds.json", exc)

    def _send_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _tag(self, tags: Mapping[str, str]) -> None:
        """Parent-run tags now, or with the next flush when the tracking server does not answer."""
        self._pending_tags.update(tags)
        self.flush()

    def note_rerun_rounds(self, rounds: Sequence[int]) -> None:
        """Tag the parent with rounds run again after a checkpoint fallback (their steps keep the first attempt:
        logging them again would duplicate steps)."""
        if rounds:
            self._tag({TAG_RERUN: ",".join(str(r) for r in rounds)})

    def log_test(self, report: RoundReport) -> bool:
        """Log the final-test metrics of the adapter of round ``report.server_round`` at that step: one batch
        per site run (``test/...`` and ``federation/test_examples``) and one on the parent (``global/test/...``).

        No round sentinel: a test is not a round. Idempotent: a round the parent's tag ``fedabus.tested_rounds``
        lists is skipped (returns False), so a resumed server never logs a test twice. Kept for the next flush
        (False) when the tracking server does not answer.
        """
        if self._backlog or self._pending_tests or self._pending_tags:  # an outage is on: keep the order
            self._pending_tests.append(report)
            self.flush()
            return False
        try:
            return self._send_test(report)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self._pending_tests.append(report)
            self.outage.failed(f"the final test of round {report.server_round}", exc)
            return False

    def _send_test(self, report: RoundReport) -> bool:
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

    def log_stop(self, stop: Mapping[str, Any]) -> None:
        """Tag the parent run with why and before which round the run ended early (``stop``: ``reason``,
        ``round``, ``message``, as :meth:`server.round_end.RoundEnd.record_stop` receives it); kept for the next
        flush when the tracking server does not answer."""
        self._tag(
            {
                TAG_STOP_REASON: str(stop["reason"]),
                TAG_STOPPED_BEFORE: str(stop["round"]),
                TAG_STOP_MESSAGE: str(stop["message"])[:MAX_TAG_VALUE],
            }
        )

    def finish(
        self,
        *,
        final_adapter: Adapter | None = None,
        best: BestAdapter | None = None,
        status: str = "FINISHED",
    ) -> bool:
        """Send what an outage kept, log the summary, the plots and the final/best adapters in one upload, then
        end every run; True when MLflow holds it all.

        ``status`` is an MLflow run status (``FINISHED``, ``FAILED``, ``KILLED``). While the tracking server does
        not answer, it is tried again every :attr:`finish_retry_s` seconds for up to :attr:`finish_patience_s`;
        after that a WARNING names what MLflow lacks (the runs stay RUNNING there; summary.json, the checkpoints
        and the adapter files in the work folder hold it all) and nothing is raised.
        """
        deadline = time.monotonic() + self.finish_patience_s
        while True:
            try:
                if self.flush():
                    self._send_final(final_adapter, best, status)
                    return True
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
                self.outage.failed("the final adapters and run status", exc)
            if time.monotonic() >= deadline:
                break
            time.sleep(min(self.finish_retry_s, max(0.0, deadline - time.monotonic())))
        missing = [f"round {kept.server_round}" for kept in self._backlog]
        missing += [f"test of round {kept.server_round}" for kept in self._pending_tests]
        missing += [*sorted(self._pending_tags), "the final adapters, plots and run status"]
        _LOG.log(
            WARNING,
            "MLflow tracking server %s still unreachable after %.0f s; MLflow lacks %s (the work folder's "
            "summary.json, checkpoints and adapter files hold them)",
            self.tracking_uri,
            self.finish_patience_s,
            ", ".join(missing),
        )
        return False

    def _send_final(self, final_adapter: Adapter | None, best: BestAdapter | None, status: str) -> None:
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
        (root / "summary" / "rounds.json").write_text(summary + "\n", encoding="utf-8")
        write_round_plots(self.history, root / "plots")
        if final_adapter is not None:
            self._write_adapter(root / "adapters", final_adapter, "final", {"round": self.last_logged_round})
        if best is not None:
            info = {"round": best.server_round, "metric": best.metric, "value": json_safe(best.value)}
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
                    and k not in SITE_RESERVED | {TEST_WEIGHT_METRIC}
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
