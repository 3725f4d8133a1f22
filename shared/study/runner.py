"""Running a study: every (arm, fold, repeat) job trains its models, tests them on every site, and is kept.

A job's models and case rows are written to ``OUT/jobs/<job>.json`` with a key made of everything that decides
them (the arm, fold, repeat, the arm's config, the base and every site's data fingerprint). An interrupted study
run again with the same settings reuses every finished job whose key still matches; anything else is redone.
At the end come ``OUT/results.csv`` (tidy rows), ``OUT/cases.csv`` (per-case rows; they never leave this
folder), ``OUT/study.json`` and ``OUT/report.html``, and one MLflow parent run (tag ``fedabus.role=study``)
with a nested run per job holding its metrics (the federated arms' own runs beneath it).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from shared.base import load_base
from shared.config import FedabusConfig, load_config, to_flat_dict
from shared.inference import adapted_models
from shared.metric_names import AUTO_NAMES, HD95_AUTO, OVERLAP_NAMES
from shared.study.arms import ArmContext, TrainedModel, arm_kind, train_arm
from shared.study.evaluation import compare_arms, result_rows, test_on_sites
from shared.study.sites import StudyError, StudySite, fold_site

__all__ = ["Study", "StudyJob", "run_study"]

RESULT_COLUMNS = (
    "arm",
    "model",
    "fold",
    "repeat",
    "test_site",
    "internal",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "method",
    "note",
    "fold_mean",
    "fold_sd",
)
CASE_COLUMNS = (
    "arm",
    "model",
    "fold",
    "repeat",
    "test_site",
    "case_id",
    "label",
    "prob",
    "prob_gt",
    "pred",
    "dice_curve",
    *OVERLAP_NAMES,
    "hd95_mm",
    *AUTO_NAMES,
    "birads",
    "volume_bin",
)
SELECTION_RULE = (
    "Each model is chosen on validation data only: the round (federated, loso) or epoch chunk (local, pooled) "
    "with the best validation {metric} (site-weighted mean for a federation); each chosen model is then tested "
    "once on every site's test split. No number here was used to choose a model."
)


@dataclass(frozen=True)
class StudyJob:
    """One arm in one fold and repeat."""

    arm: str
    fold: int | None
    repeat: int

    @property
    def name(self) -> str:
        fold = "all" if self.fold is None else f"f{self.fold}"
        return f"{self.arm}-{fold}-r{self.repeat}"


@dataclass
class Study:
    """A study's settings: the sites, the arms, the base, how many folds, repeats and rounds, the config of
    every arm (``arm_configs``; all arms share the study's config unless overridden), where to write."""

    sites: list[StudySite]
    arms: list[str]
    base_path: Path
    out: Path
    config: FedabusConfig
    rounds: int
    folds: int = 1
    repeats: int = 1
    arm_configs: dict[str, FedabusConfig] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    n_boot: int = 2000
    say: Callable[[str], None] = print

    def __post_init__(self) -> None:
        kinds = {arm_kind(arm) for arm in self.arms}  # refuses an unknown arm, naming it
        if len(set(self.arms)) != len(self.arms):
            raise StudyError(f"an arm is listed twice in {self.arms}")
        if self.folds < 1 or self.repeats < 1 or self.rounds < 1:
            raise StudyError(
                f"--folds, --repeats and --rounds must be >= 1 (got {self.folds}, {self.repeats}, {self.rounds})"
            )
        if len(self.sites) < 2 and {"federated", "loso"} & kinds:
            raise StudyError("the federated and loso arms need at least 2 sites")

    def config_of(self, arm: str) -> FedabusConfig:
        return self.arm_configs.get(arm, self.config)

    def jobs(self) -> list[StudyJob]:
        folds: list[int | None] = [None] if self.folds == 1 else list(range(self.folds))
        return [
            StudyJob(arm, fold, repeat)
            for repeat in range(self.repeats)
            for fold in folds
            for arm in self.arms
        ]

    def key(self, job: StudyJob) -> str:
        """What decides a job's models and numbers; a finished job is reused only while this is unchanged."""
        content = {
            "job": dataclasses.asdict(job),
            "folds": self.folds,
            "rounds": self.rounds,
            "config": to_flat_dict(self.config_of(job.arm)),
            "base": hashlib.sha256(self.base_path.with_suffix(".json").read_bytes()).hexdigest(),
            "sites": {s.name: s.fingerprint for s in self.sites},
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _views(study: Study, job: StudyJob, config: FedabusConfig, seed: int):
    return [fold_site(site, job.fold, study.folds, config, seed) for site in study.sites]


def _test_models(
    study: Study, job: StudyJob, models: list[TrainedModel], views, config: FedabusConfig
) -> list[dict]:
    rows = []
    for model in models:
        base = load_base(study.base_path, attention_impl=config.model.attention_impl)
        adapted = adapted_models(base, model.adapter_path)
        tags = {
            "arm": job.arm,
            "model": model.name,
            "fold": "all" if job.fold is None else job.fold,
            "repeat": job.repeat,
        }
        study.say(f"    testing {model.name} on every site's test split")
        rows += test_on_sites(adapted, views, config, device=study.device, tags=tags)
    return rows


def _run_job(study: Study, job: StudyJob, tracking: _Tracking) -> dict[str, Any]:
    """Train and test one job, or reuse its saved result when its key matches."""
    path = study.out / "jobs" / f"{job.name}.json"
    key = study.key(job)
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            study.say(f"  {job.name}: finished earlier with the same settings and data; reused")
            return {**saved, "reused": True}
        study.say(f"  {job.name}: settings or data changed since it ran; running it again")
    config = study.config_of(job.arm)
    seed = config.train.seed + job.repeat
    views = _views(study, job, config, seed)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    run_id = tracking.job_run(job)
    context = ArmContext(
        config=config,
        base_path=study.base_path,
        sites=study.sites,
        views=views,
        out=study.out / "models" / job.name,
        device=study.device,
        seed=seed,
        rounds=study.rounds,
        say=study.say,
        tracking_uri=tracking.uri,
        experiment=tracking.experiment,
        parent_run_id=run_id,
    )
    models = train_arm(job.arm, context)
    cases = _test_models(study, job, models, views, config)
    result = {
        "key": key,
        "job": dataclasses.asdict(job),
        "models": [
            {
                "name": m.name,
                "trained_on": list(m.trained_on),
                "adapter": str(m.adapter_path),
                "selection": m.selection,
            }
            for m in models
        ],
        "cases": cases,
        "mlflow_run_id": run_id,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(path)
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def run_study(study: Study) -> dict[str, Any]:
    """Run (or resume) every job, then write the tables, the report and MLflow; returns ``study.json``."""
    study.out.mkdir(parents=True, exist_ok=True)
    tracking = _Tracking.open(study)
    jobs = study.jobs()
    started, done, spent = time.monotonic(), [], []  # spent: seconds of each job that ran (not reused)
    for number, job in enumerate(jobs, start=1):
        eta = f", ETA {sum(spent) / len(spent) * (len(jobs) - number + 1) / 60:.1f} min" if spent else ""
        study.say(f"[{number}/{len(jobs)}] {job.name}{eta}")
        job_started = time.monotonic()
        result = _run_job(study, job, tracking)
        if not result.get("reused"):
            spent.append(time.monotonic() - job_started)
        done.append(result)
    cases = [_restore_nans(case) for result in done for case in result["cases"]]
    trained_on = {m["name"]: set(m["trained_on"]) for result in done for m in result["models"]}
    results = result_rows(cases, trained_on, n_boot=study.n_boot, seed=study.config.train.seed)
    comparisons = compare_arms(
        cases, _reference(study.arms), n_boot=study.n_boot, seed=study.config.train.seed
    )
    summary = _write_outputs(study, done, cases, results, comparisons)
    tracking.finish(done, results, study.out)
    study.say(f"done in {(time.monotonic() - started) / 60:.1f} min")
    return summary


def _reference(arms: Sequence[str]) -> str:
    """The arm the others are compared with: federated when present (the consortium's question), the plain arm
    before its variants."""
    for kind in ("federated", "loso", "pooled", "local", "zero-shot"):
        if kind in arms:
            return kind
        variants = [arm for arm in arms if arm_kind(arm) == kind]
        if variants:
            return variants[0]
    return arms[0]


def _mlflow_name(name: str) -> str:
    """A result's MLflow metric name: ``local@auto:site_a/site_b/dice_auto`` -> ``local-auto.site_a/site_b/
    dice_auto`` (MLflow refuses ``@``; ``:`` becomes ``.`` as before)."""
    return name.replace(":", ".").replace("@", "-")


def _restore_nans(case: dict[str, Any]) -> dict[str, Any]:
    """HD95 values saved as null (JSON has no NaN) back to NaN: ``hd95_mm`` and, for an automatic segmenter's
    case, ``hd95_mm_auto``."""
    restored = {
        key: math.nan if case.get(key) is None else float(case[key])
        for key in ("hd95_mm", HD95_AUTO)
        if key in case or key == "hd95_mm"
    }
    return {**case, **restored}


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    tmp.replace(path)


def _write_outputs(study: Study, done, cases, results, comparisons) -> dict[str, Any]:
    from shared.study.report import render_report

    _write_csv(study.out / "results.csv", results, RESULT_COLUMNS)
    _write_csv(study.out / "cases.csv", cases, CASE_COLUMNS)
    rule = SELECTION_RULE.format(metric=study.config.train.select_metric)
    notes = []
    if any(arm_kind(arm) == "pooled" for arm in study.arms):
        notes.append(
            "pooled is a research upper bound: it needs every site's data in one place, which a real "
            "consortium cannot do; it exists here because the study sees every folder."
        )
    if study.folds > 1:
        notes.append(
            f"{study.folds}-fold cross-validation per site; rows with fold 'all' pool each model's test "
            "cases over the folds (every case tested once) and give the mean and SD over folds."
        )
    notes.append(
        "CIs: 95% case-level bootstrap (2000 resamples); AUC by DeLong. Comparisons are paired on the "
        "same test cases and not adjusted for multiple comparisons."
    )
    meta = {
        "title": f"fedabus study: {', '.join(study.arms)} on {len(study.sites)} sites",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "sites": [s.name for s in study.sites],
        "arms": list(study.arms),
        "selection_rule": rule,
        "notes": notes,
    }
    render_report(results, cases, comparisons, meta, study.out / "report.html")
    summary = {
        **meta,
        "config": to_flat_dict(study.config),
        "arm_configs": {arm: to_flat_dict(c) for arm, c in study.arm_configs.items()},
        "rounds": study.rounds,
        "folds": study.folds,
        "repeats": study.repeats,
        "base": str(study.base_path),
        "site_fingerprints": {s.name: s.fingerprint for s in study.sites},
        "jobs": [{"job": r["job"], "key": r["key"], "models": r["models"]} for r in done],
        "results": results,
        "comparisons": comparisons,
    }
    tmp = study.out / "study.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(study.out / "study.json")
    return summary


@dataclass
class _Tracking:
    """The study's MLflow runs: one parent (``fedabus.role=study``), one nested run per job."""

    client: Any
    uri: str
    experiment: str
    experiment_id: str
    run_id: str

    @classmethod
    def open(cls, study: Study) -> _Tracking:
        from shared.mlflow_store import mlflow_client, resolve_tracking_uri

        uri = resolve_tracking_uri(study.config.federation.tracking_uri, default_dir=study.out)
        client = mlflow_client(uri)
        experiment = f"{study.config.federation.experiment}-study"
        existing = client.get_experiment_by_name(experiment)
        experiment_id = existing.experiment_id if existing else client.create_experiment(experiment)
        marker = study.out / "mlflow_run_id"
        if marker.is_file():
            run_id = marker.read_text(encoding="utf-8").strip()
            client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, tags={"fedabus.role": "study"}, run_name=study.out.name)
            run_id = run.info.run_id
            marker.write_text(run_id + "\n", encoding="utf-8")
        return cls(client, uri, experiment, experiment_id, run_id)

    def job_run(self, job: StudyJob) -> str:
        tags = {
            "mlflow.parentRunId": self.run_id,
            "fedabus.role": "study-arm",
            "fedabus.arm": job.arm,
            "fedabus.fold": str(job.fold),
            "fedabus.repeat": str(job.repeat),
        }
        return self.client.create_run(self.experiment_id, tags=tags, run_name=job.name).info.run_id

    def finish(self, done, results, out: Path) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        runs = {
            (r["job"]["arm"], "all" if r["job"]["fold"] is None else r["job"]["fold"], r["job"]["repeat"]): r[
                "mlflow_run_id"
            ]
            for r in done
        }
        for (arm, fold, repeat), run_id in runs.items():
            metrics = []
            for row in results:
                if (row["arm"], row["fold"], row["repeat"]) != (arm, fold, repeat) or not math.isfinite(
                    row["value"]
                ):
                    continue
                name = _mlflow_name(f"{row['model']}/{row['test_site']}/{row['metric']}")
                metrics.append(Metric(name, float(row["value"]), stamp, 0))
                for bound in ("ci_low", "ci_high"):
                    if math.isfinite(row[bound]):
                        metrics.append(Metric(f"{name}_{bound}", float(row[bound]), stamp, 0))
            if metrics:
                self.client.log_batch(run_id, metrics=metrics)
            self.client.set_terminated(run_id)
        for name in ("results.csv", "study.json", "report.html"):
            self.client.log_artifact(self.run_id, str(out / name))
        self.client.set_terminated(self.run_id)

    def describe(self) -> str:
        from shared.mlflow_store import describe_location

        return describe_location(self.uri, experiment_id=self.experiment_id, run_id=self.run_id)


def load_study_config(
    path: Path | None, sets: dict[str, Any], arms: Sequence[str]
) -> tuple[FedabusConfig, dict[str, FedabusConfig]]:
    """The study's config (``--config`` file, then ``--set key=value``) and per-arm configs (``--set
    arm:key=value`` on top of the study's)."""
    from shared.config import FLOWER_KEYS

    common = {k: v for k, v in sets.items() if ":" not in k}
    per_arm: dict[str, dict[str, Any]] = {}
    for key, value in sets.items():
        if ":" in key:
            arm, _, name = key.partition(":")
            try:
                arm_kind(arm)
            except StudyError as error:
                raise StudyError(f"--set {key}=...: {error}") from None
            per_arm.setdefault(arm, {})[name] = value
    config = load_config(common, path=path, ignore=FLOWER_KEYS)
    arm_configs = {
        arm: load_config({**common, **values}, path=path, ignore=FLOWER_KEYS)
        for arm, values in per_arm.items()
        if arm in arms
    }
    return config, arm_configs
