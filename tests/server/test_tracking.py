"""MLflow tracking: runs, steps, batching, artifacts, resume, aggregates — against a temporary SQLite store, plus
one integration test against a real ``mlflow server`` on loopback."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from client.egress import EVAL_METRIC_NAMES, PRIVACY_METRIC_KEYS, TRAIN_METRIC_KEYS, eval_metric_keys
from server.reports import RoundReport, aggregate_site_metrics, update_best
from server.tracking import (
    FederationTracker,
    TrackingError,
    code_version,
    describe_location,
    resolve_tracking_uri,
)
from server.tracking_outage import HTTP_POLICY, apply_http_policy, is_unreachable
from shared import __version__
from shared.adapters import ADAPTER_FORMAT, Adapter, load_adapter
from shared.config import SELECT_METRICS
from shared.metric_names import (
    EVAL_WEIGHT_METRIC,
    ROUND_METRIC,
    TEST_WEIGHT_METRIC,
    TRAIN_WEIGHT_METRIC,
    metric_direction,
)
from shared.protocol import NUM_EXAMPLES

CODE = {"fedabus-version": __version__, "git-commit": "0123abc", "git-dirty": "false"}
CONFIG = {"train.seg-lr": 0.0002, "adapter.lora-rank": 4, "num-server-rounds": 4}


def make_adapter(seed: int) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "seg.image_encoder.blocks.0.attn.qkv.lora_A.weight": torch.randn(4, 16, generator=generator),
        "cls.head.weight": torch.randn(2, 8, generator=generator),
    }
    return Adapter(
        tensors, {"format": ADAPTER_FORMAT, "format_version": 1, "base_fingerprint": {"seg": "sha256:0"}}
    )


def site_eval(dice: float, auc: float, n: int) -> dict[str, float]:
    return {
        "num-examples": n,
        "val/dice_1click": dice,
        "val/dice_5click": dice + 0.1,
        "val/auc": auc,
        "val/hd95_mm": 10.0 * (1.0 - dice),
        "val/n_cases_seg": n,
    }


def report(
    server_round: int, sites: tuple[str, ...] = ("site-a", "site-b"), shift: float = 0.0
) -> RoundReport:
    """Deterministic metrics that improve with the round; site-b has no AUC in round 1 (NaN)."""
    evaluation = {
        site: site_eval(
            0.4 + 0.1 * server_round + 0.05 * i + shift,
            math.nan if (site == "site-b" and server_round == 1) else 0.6 + 0.05 * server_round,
            10 * (i + 1),
        )
        for i, site in enumerate(sites)
    }
    training = {site: {"num-examples": 20, "loss": 1.0 / server_round} for site in sites}
    return RoundReport.from_site_metrics(
        server_round,
        evaluation=evaluation,
        training=training,
        global_metrics={"federation/replies": len(sites)},
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite store for the module (creating one takes seconds); tests use their own experiment."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def experiment(store: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    for key in HTTP_POLICY:  # the tracker sets MLflow's HTTP policy in os.environ: restored after the test
        monkeypatch.setenv(key, os.environ.get(key, HTTP_POLICY[key]))
    return request.node.name


def start(experiment: str, **kwargs) -> FederationTracker:
    return FederationTracker.start(
        config=CONFIG,
        strategy="fedavg",
        sites=("site-a", "site-b"),
        code=CODE,
        experiment=experiment,
        **kwargs,
    )


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def site_runs(client: MlflowClient, tracker: FederationTracker) -> dict[str, str]:
    runs = client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.run_id}'"
    )
    return {run.data.tags["fedabus.site"]: run.info.run_id for run in runs}


# ------------------------------------------------------------------------------------------ aggregates
def test_aggregates_are_example_weighted_with_the_worst_site_per_direction():
    per_site = {
        "a": {
            "val/dice_1click": 0.8,
            "val/hd95_mm": 5.0,
            "val/auc": 0.9,
            "val/n_cases_seg": 10,
            "x": 1.0,
        },
        "b": {
            "val/dice_1click": 0.6,
            "val/hd95_mm": 9.0,
            "val/auc": math.nan,
            "val/n_cases_seg": 30,
            "x": 3.0,
        },
    }
    agg = aggregate_site_metrics(per_site, {"a": 10, "b": 30})
    assert agg["val/dice_1click"].mean == pytest.approx((0.8 * 10 + 0.6 * 30) / 40)
    assert (agg["val/dice_1click"].worst, agg["val/dice_1click"].worst_site) == (0.6, "b")
    assert (agg["val/hd95_mm"].worst, agg["val/hd95_mm"].worst_site) == (9.0, "b")  # lower is better
    auc = agg["val/auc"]  # NaN at b is left out, not propagated
    assert (auc.mean, auc.worst, auc.worst_site, auc.n_sites) == (0.9, 0.9, "a", 1)
    count = agg["val/n_cases_seg"]
    assert (count.total, count.mean, count.worst) == (40.0, None, None)
    assert agg["x"].worst is None and agg["x"].mean == pytest.approx(2.5)  # unknown direction: mean only
    assert agg["val/dice_1click"].as_metrics("val/dice_1click") == {
        "global/val/dice_1click_mean": pytest.approx(0.65),
        "global/val/dice_1click_worst": 0.6,
    }


def test_aggregates_of_all_nan_zero_weights_and_bad_weights():
    agg = aggregate_site_metrics({"a": {"val/auc": math.nan}, "b": {"val/auc": math.nan}}, {"a": 1, "b": 1})
    assert math.isnan(agg["val/auc"].mean) and math.isnan(agg["val/auc"].worst)
    assert agg["val/auc"].worst_site is None and agg["val/auc"].n_sites == 0
    unweighted = aggregate_site_metrics({"a": {"val/auc": 0.5}, "b": {"val/auc": 1.0}}, {"a": 0, "b": 0})
    assert unweighted["val/auc"].mean == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no example weight for site 'b'"):
        aggregate_site_metrics({"a": {"val/auc": 0.5}, "b": {"val/auc": 1.0}}, {"a": 1})
    with pytest.raises(ValueError, match="'a' is -1"):
        aggregate_site_metrics({"a": {"val/auc": 0.5}}, {"a": -1})


@pytest.mark.parametrize(
    ("key", "direction"),
    [
        ("val/dice_1click", "higher"),
        ("val/auc", "higher"),
        ("val/specificity", "higher"),
        ("global/val/dice_5click_mean", "higher"),
        ("val/hd95_mm", "lower"),
        ("train/loss", "lower"),
        ("val/n_cases_cls", "count"),
        ("federation/eval_examples", "count"),
        ("train/lr", None),
    ],
)
def test_metric_direction(key, direction):
    assert metric_direction(key) == direction


@pytest.mark.parametrize("split", ["val", "test"])
def test_every_metric_a_site_sends_has_a_declared_direction(split: str):
    keys = {*eval_metric_keys(5, split=split), *TRAIN_METRIC_KEYS, *PRIVACY_METRIC_KEYS}
    assert {f"{split}/{name}" for name in EVAL_METRIC_NAMES} <= keys
    bounds = {k for k in keys if k.endswith(("_ci_low", "_ci_high"))}
    assert bounds and all(
        metric_direction(k) is None for k in bounds
    )  # a confidence bound has no better side
    undeclared = sorted(k for k in keys - bounds if metric_direction(k) is None)
    assert not undeclared, f"declare their direction in shared.metric_names.DIRECTIONS: {undeclared}"
    for key in keys - bounds:  # the server's aggregates keep the direction
        assert metric_direction(f"global/{key}_mean") == metric_direction(key)


@pytest.mark.parametrize(
    ("key", "direction"),
    [
        (NUM_EXAMPLES, "count"),
        (EVAL_WEIGHT_METRIC, "count"),
        (TRAIN_WEIGHT_METRIC, "count"),
        (TEST_WEIGHT_METRIC, "count"),
        ("val/dice_5click", "higher"),
        ("test/dice_12click", "higher"),
        ("val/auc_gt_planes", "higher"),
        ("val/auc_gt_planes_ci_low", None),
        ("global/val/hd95_mm_worst", "lower"),
        ("global/val/n_cases_seg_total", "count"),
        ("train/seg_loss", "lower"),
        ("privacy/seg_epsilon", "lower"),
        ("privacy/client_epsilon", "lower"),
        ("privacy/noise_multiplier_cls", "higher"),
        ("test/birads/4A/dice_mean", "higher"),
        ("test/volume/0-5/hd95_mm_std", None),
        ("test/volume/0-5/hd95_mm_count", "count"),
        ("val/hd95_undefined", "count"),
        ("federation/replies", None),
        ("val/dice_0click", None),
        ("val/dicey", None),
        ("global/val/dice", None),
    ],
)
def test_metric_direction_is_looked_up_not_guessed(key, direction):
    assert metric_direction(key) == direction


@pytest.mark.parametrize("name", SELECT_METRICS)
def test_every_selection_metric_can_rank_rounds(name: str):
    assert metric_direction(f"global/val/{name}_mean") == "higher"


def test_round_report_validation_and_json_round_trip():
    original = report(1)
    assert original.evaluation_weights == {"site-a": 10, "site-b": 20}
    assert original.training["site-a"] == {"train/loss": 1.0}
    back = RoundReport.from_json(json.loads(json.dumps(original.to_json(), allow_nan=False)))
    assert back.to_json() == original.to_json() and math.isnan(back.evaluation["site-b"]["val/auc"])
    with pytest.raises(ValueError, match="no evaluation_weights entry"):
        RoundReport(1, evaluation={"a": {"val/auc": 0.5}})
    with pytest.raises(ValueError, match="must start with 'train/' or 'privacy/'"):
        RoundReport(1, training={"a": {"loss": 0.5}}, training_weights={"a": 1})
    with pytest.raises(ValueError, match="reserved"):
        RoundReport(1, global_metrics={"global/x": 1.0})
    with pytest.raises(ValueError, match="carry no 'num-examples'"):
        RoundReport.from_site_metrics(1, evaluation={"a": {"val/auc": 0.5}})


def test_privacy_metrics_of_a_site_keep_their_name_in_its_run():
    training = {"a": {"num-examples": 4.0, "seg_loss": 0.3, "privacy/seg_epsilon": 1.5}}
    report_ = RoundReport.from_site_metrics(1, training=training)
    assert report_.site_metrics("a")["privacy/seg_epsilon"] == 1.5
    assert report_.site_metrics("a")["train/seg_loss"] == 0.3


def test_update_best_follows_the_metric_direction_and_ignores_nan():
    a, b = make_adapter(1), make_adapter(2)
    best = update_best(None, adapter=a, metric="global/val/dice_1click_mean", value=0.5, server_round=1)
    assert update_best(best, adapter=b, metric=best.metric, value=0.4, server_round=2) is best
    assert update_best(best, adapter=b, metric=best.metric, value=math.nan, server_round=2) is best
    assert update_best(best, adapter=b, metric=best.metric, value=0.6, server_round=2).adapter is b
    hd = update_best(None, adapter=a, metric="global/val/hd95_mm_mean", value=5.0, server_round=1)
    assert update_best(hd, adapter=b, metric=hd.metric, value=4.0, server_round=2).server_round == 2
    with pytest.raises(ValueError, match="cannot rank"):
        update_best(None, adapter=a, metric="train/lr", value=1.0, server_round=1)


# ------------------------------------------------------------------------------------------ location
def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"  # config wins
    assert resolve_tracking_uri("") == "http://127.0.0.1:5999"  # then the environment
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert (
        resolve_tracking_uri(default_dir=tmp_path / "home") == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    )
    assert (tmp_path / "home").is_dir()
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///rel/m.db") == f"sqlite:///{tmp_path.resolve() / 'rel' / 'm.db'}"
    with pytest.raises(TrackingError, match="inside the Flower app folder"):
        resolve_tracking_uri("sqlite:///app/mlflow.db", app_dir=tmp_path / "app")
    repo = Path(__file__).resolve().parents[2]
    with pytest.raises(TrackingError, match="Flower bundles"):
        resolve_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")  # default guard: the folder holding server/


def test_describe_location_says_how_to_open_the_ui():
    text = describe_location("sqlite:////data/mlflow.db", experiment_id="3", run_id="abc")
    assert "mlflow ui --backend-store-uri sqlite:////data/mlflow.db" in text
    assert "#/experiments/3/runs/abc" in text
    remote = describe_location("http://127.0.0.1:5000/", experiment_id="3", run_id="abc")
    assert "http://127.0.0.1:5000/#/experiments/3/runs/abc" in remote


def test_code_version_names_the_fedabus_version_and_commit(tmp_path: Path):
    assert code_version(tmp_path) == {
        "fedabus-version": __version__,
        "git-commit": "unknown",
        "git-dirty": "unknown",
    }
    here = code_version()
    assert here["fedabus-version"] == __version__ and here["git-dirty"] in ("true", "false", "unknown")


# ------------------------------------------------------------------------------------------ runs and steps
def test_parent_and_lazy_site_runs_with_a_step_per_round(experiment: str):
    long_value = "x" * 7000
    tracker = FederationTracker.start(
        config={**CONFIG, "data.note": long_value},
        strategy="fedadam",
        sites=("site-a", "site-b"),
        base_fingerprint={"seg": "sha256:aa", "cls": "sha256:bb"},
        code=CODE,
        experiment=experiment,
    )
    for r in (1, 2, 3):
        assert tracker.log_round(report(r, ("site-a", "site-b") if r < 2 else ("site-a", "site-b", "site-c")))
    client = MlflowClient()
    parent = client.get_run(tracker.run_id)
    params = parent.data.params
    assert params["federation.strategy"] == "fedadam" and params["federation.sites"] == "site-a,site-b"
    assert params["base-fingerprint.seg"] == "sha256:aa" and params["code.git-commit"] == "0123abc"
    assert params["train.seg-lr"] == "0.0002" and len(params["data.note"]) == 6000
    assert "truncated from 7000 chars" in params["data.note"]
    assert parent.data.tags["mlflow.source.git.commit"] == "0123abc"
    assert parent.data.tags["fedabus.sites"] == "site-a,site-b,site-c"
    runs = site_runs(client, tracker)
    assert set(runs) == {"site-a", "site-b", "site-c"}
    assert steps(client, runs["site-a"], "val/dice_1click") == [1, 2, 3]
    assert steps(client, runs["site-c"], "val/auc") == [2, 3]  # created when it first reported
    assert steps(client, runs["site-a"], "train/loss") == [1, 2, 3]
    assert client.get_run(runs["site-c"]).data.tags["mlflow.runName"] == "site-c"
    mean = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "global/val/dice_1click_mean")}
    assert mean[1] == pytest.approx((0.5 * 10 + 0.55 * 20) / 30)
    worst = {
        m.step: m.value for m in client.get_metric_history(tracker.run_id, "global/val/dice_1click_worst")
    }
    assert worst == {1: pytest.approx(0.5), 2: pytest.approx(0.6), 3: pytest.approx(0.7)}
    assert client.get_metric_history(tracker.run_id, "global/val/auc_mean")[0].value == pytest.approx(0.65)
    assert steps(client, tracker.run_id, "federation/replies") == [1, 2, 3]
    assert steps(client, tracker.run_id, "global/val/n_cases_seg_total") == [1, 2, 3]
    assert tracker.last_logged_round == 3


def test_each_round_is_one_log_batch_per_run(experiment: str, monkeypatch: pytest.MonkeyPatch):
    tracker = start(experiment)
    calls: list[tuple[str, int]] = []
    original = MlflowClient.log_batch

    def spy(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        calls.append((run_id, len(metrics)))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(MlflowClient, "log_batch", spy)
    for r in (1, 2):
        calls.clear()
        tracker.log_round(report(r))
        per_run = Counter(run_id for run_id, _ in calls)
        assert len(per_run) == 3 and set(per_run.values()) == {1}, per_run  # parent + 2 sites, once each
        site_metrics = report(r).site_metrics("site-a")
        assert (tracker.site_runs["site-a"], len(site_metrics) + 1) in calls  # all metrics + round sentinel
    before = len(calls)
    assert tracker.log_round(report(2)) is False  # already logged: nothing written
    assert len(calls) == before


def test_finish_logs_adapters_summary_plots_and_ends_the_runs(experiment: str, tmp_path: Path):
    tracker = start(experiment)
    for r in (1, 2):
        tracker.log_round(report(r))
    final, best_adapter = make_adapter(1), make_adapter(2)
    best = update_best(
        None, adapter=best_adapter, metric="global/val/dice_1click_mean", value=0.6, server_round=1
    )
    tracker.finish(final_adapter=final, best=best)
    client = MlflowClient()
    listed = {
        f.path
        for folder in ("adapters", "summary", "plots", "config")
        for f in client.list_artifacts(tracker.run_id, folder)
    }
    assert listed == {
        "adapters/final.safetensors",
        "adapters/final.json",
        "adapters/best.safetensors",
        "adapters/best.json",
        "summary/rounds.json",
        "plots/dice.png",
        "plots/auc.png",
        "config/run_config.json",
    }
    local = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path)))
    loaded = load_adapter(local / "adapters" / "best")
    assert all(torch.equal(loaded.tensors[k], best_adapter.tensors[k]) for k in best_adapter.tensors)
    assert loaded.manifest["metadata"] == {"round": 1, "metric": "global/val/dice_1click_mean", "value": 0.6}
    assert load_adapter(local / "adapters" / "final").manifest["metadata"] == {"round": 2}
    summary = json.loads((local / "summary" / "rounds.json").read_text(encoding="utf-8"))
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    first = summary["rounds"][0]
    assert first["sites"]["site-b"]["val/auc"] is None  # NaN is written as null (valid JSON)
    assert first["aggregates"]["val/dice_1click"]["worst_site"] == "site-a"
    for name in ("dice", "auc"):
        assert (local / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        json.loads((local / "config" / "run_config.json").read_text(encoding="utf-8"))["params"][
            "train.seg-lr"
        ]
        == 0.0002
    )
    statuses = {client.get_run(r).info.status for r in [tracker.run_id, *tracker.site_runs.values()]}
    assert statuses == {"FINISHED"}
    assert client.get_run(tracker.run_id).data.tags["fedabus.best_round"] == "1"


# ------------------------------------------------------------------------------------------ resume
def test_resume_continues_the_same_runs_without_duplicate_or_missing_steps(experiment: str):
    first = start(experiment)
    for r in (1, 2):
        first.log_round(report(r))
    parent_id = first.run_id  # what the server checkpoint keeps
    del first  # the server "crashes" here; the runs stay RUNNING

    tracker = FederationTracker.resume(parent_id)
    assert tracker.last_logged_round == 2 and set(tracker.site_runs) == {"site-a", "site-b"}
    assert [r.to_json() for r in tracker.history] == [report(1).to_json(), report(2).to_json()]
    assert tracker.log_round(report(2)) is False  # replaying the checkpointed round is a no-op
    for r in (3, 4):
        assert tracker.log_round(report(r))
    tracker.finish(final_adapter=make_adapter(0))

    client = MlflowClient()
    assert steps(client, parent_id, ROUND_METRIC) == [1, 2, 3, 4]
    assert steps(client, parent_id, "global/val/dice_1click_mean") == [1, 2, 3, 4]
    for run_id in site_runs(client, tracker).values():
        assert steps(client, run_id, "val/dice_1click") == [1, 2, 3, 4]
    assert len(site_runs(client, tracker)) == 2  # no second run per site
    assert client.get_run(parent_id).data.tags["fedabus.resumes"] == "1"
    assert client.get_run(parent_id).info.status == "FINISHED"
    summary = tracker.summary()
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]


def test_resume_after_a_crash_in_the_middle_of_a_round(experiment: str, monkeypatch: pytest.MonkeyPatch):
    first = start(experiment)
    first.log_round(report(1))
    original = MlflowClient.log_batch

    def crash_on_parent(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if run_id == first.run_id:
            raise KeyboardInterrupt  # the ServerApp process dies here (an unreachable server would be waited out)
        return original(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(MlflowClient, "log_batch", crash_on_parent)
    with pytest.raises(KeyboardInterrupt):
        first.log_round(report(2))  # both site runs hold round 2, the parent does not
    monkeypatch.setattr(MlflowClient, "log_batch", original)

    tracker = FederationTracker.resume(first.run_id)
    assert tracker.last_logged_round == 1
    assert tracker.log_round(report(2, shift=0.2))  # the redone round has other values
    client = MlflowClient()
    runs = site_runs(client, tracker)
    history = client.get_metric_history(runs["site-a"], "val/dice_1click")
    assert [m.step for m in history] == [1, 2] and history[1].value == pytest.approx(
        0.6
    )  # first attempt kept
    assert steps(client, first.run_id, ROUND_METRIC) == [1, 2]
    mean = client.get_metric_history(first.run_id, "global/val/dice_1click_mean")[-1].value
    assert mean == pytest.approx((0.6 * 10 + 0.65 * 20) / 30)  # aggregates match what the sites hold


def test_resume_refuses_unknown_and_non_federation_runs(experiment: str):
    tracker = start(experiment)
    tracker.log_round(report(1))
    with pytest.raises(TrackingError, match="cannot open MLflow run '0+'"):
        FederationTracker.resume("0" * 32)
    with pytest.raises(TrackingError, match="not a fedabus federation run"):
        FederationTracker.resume(tracker.site_runs["site-a"])


# ------------------------------------------------------------------------------------------ integration
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_health(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"mlflow server exited with {process.returncode}:\n{log.read_text(encoding='utf-8')[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"mlflow server not healthy after {timeout_s} s:\n{log.read_text(encoding='utf-8')[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def _start_mlflow_server(db: Path, folder: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` with the SQLite store ``db``, healthy; its log in ``folder``."""
    executable = Path(sys.executable).parent / "mlflow"
    if not executable.exists():
        pytest.skip(f"no mlflow executable next to {sys.executable}")
    log = folder / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [str(executable), "server", "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination"]
    command += [str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_for_health(f"http://127.0.0.1:{port}", process, log)
    except BaseException:
        _stop(process)
        raise
    return process


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_round_through_a_real_mlflow_server(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    db = tmp_path / "server.db"
    shutil.copy(store, db)  # an already migrated store: the server starts faster
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start_mlflow_server(db, tmp_path, port)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        _bounded_http_policy(monkeypatch, retries="1")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        tracker = start("integration")
        assert tracker.tracking_uri == url
        assert tracker.log_round(report(1))
        tracker.finish(final_adapter=make_adapter(3))
        assert url in tracker.describe_location()

        reopened = FederationTracker.resume(tracker.run_id)  # read back through the REST API
        assert [r.to_json() for r in reopened.history] == [report(1).to_json()]
        client = MlflowClient(tracking_uri=url)
        runs = site_runs(client, tracker)
        assert steps(client, runs["site-b"], "val/auc") == [1]
        assert math.isnan(client.get_metric_history(runs["site-b"], "val/auc")[0].value)
        assert steps(client, tracker.run_id, "global/val/dice_1click_mean") == [1]
        assert {f.path for f in client.list_artifacts(tracker.run_id, "adapters")} >= {
            "adapters/final.safetensors"
        }
        assert any((tmp_path / "artifacts").rglob("final.safetensors"))
    finally:
        _stop(process)


# ------------------------------------------------------------------------------------------ tracking server down
def _bounded_http_policy(monkeypatch: pytest.MonkeyPatch, retries: str) -> None:
    """The policy :func:`server.tracking_outage.apply_http_policy` sets, restored after the test."""
    for key, value in HTTP_POLICY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", retries)


def test_the_http_policy_bounds_mlflow_retries_and_keeps_an_operators_values():
    environ = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    assert apply_http_policy(environ) == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    }
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    assert {MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, MLFLOW_HTTP_REQUEST_TIMEOUT.name} <= set(HTTP_POLICY)


def test_an_unreachable_server_is_told_from_a_refused_request():
    import requests
    from mlflow.exceptions import MlflowException

    refused = "API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed with exception "
    assert is_unreachable(MlflowException(refused + "HTTPConnectionPool: Max retries exceeded"))
    assert is_unreachable(requests.exceptions.ConnectionError("refused"))
    assert not is_unreachable(MlflowException("Run 'abc' not found", error_code="RESOURCE_DOES_NOT_EXIST"))
    assert not is_unreachable(ValueError("API request to x failed with exception y"))


def test_rounds_logged_while_the_tracking_server_is_unreachable_are_kept_and_sent_in_order(
    experiment: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="flwr")
    _bounded_http_policy(monkeypatch, retries="0")
    tracker = start(experiment, upload_summary_every_round=False)
    store_client = tracker.client
    assert tracker.log_round(report(1))
    tracker.client = MlflowClient(tracking_uri=f"http://127.0.0.1:{_free_port()}")  # nobody listens there
    started = time.monotonic()
    assert not tracker.log_round(report(2)) and not tracker.log_round(report(3))
    tracker.log_stop({"reason": "federation-stalled", "round": 4, "message": "round 4 stopped"})
    assert time.monotonic() - started < 30  # bounded: no minutes of silent retries
    assert [r.server_round for r in tracker.backlog] == [2, 3]
    assert caplog.text.count("is unreachable") == 1  # said once per outage, naming the round first kept
    assert "round 2 and what follows are kept" in caplog.text
    tracker.finish_patience_s = 0.0
    assert not tracker.finish()  # gives up without raising, naming what MLflow lacks
    assert "MLflow lacks round 2, round 3, fedabus.stop_message" in caplog.text

    tracker.client = store_client  # the server is back
    assert tracker.log_round(report(4)) and tracker.backlog == []
    assert (
        "reachable again" in caplog.text and "sent what it missed: round 2, round 3, fedabus." in caplog.text
    )
    client = MlflowClient()
    assert steps(client, tracker.run_id, ROUND_METRIC) == [1, 2, 3, 4]  # each step once, in order
    for site, run_id in site_runs(client, tracker).items():
        assert steps(client, run_id, "val/dice_1click") == [1, 2, 3, 4], site
    assert client.get_run(tracker.run_id).data.tags["fedabus.stop_reason"] == "federation-stalled"


def test_a_round_cut_off_between_two_site_batches_sends_each_site_once(
    experiment: str, monkeypatch: pytest.MonkeyPatch
):
    from mlflow.exceptions import MlflowException

    tracker = start(experiment, upload_summary_every_round=False)
    assert tracker.log_round(report(1))
    real_log_batch, calls = tracker.client.log_batch, []

    def cut_after_first_site(run_id, metrics=(), params=(), tags=(), synchronous=None):
        calls.append(run_id)
        if len(calls) > 1:
            raise MlflowException("API request to http://mlflow/api failed with exception Connection refused")
        return real_log_batch(run_id, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(tracker.client, "log_batch", cut_after_first_site)
    assert not tracker.log_round(report(2))
    monkeypatch.setattr(tracker.client, "log_batch", real_log_batch)
    assert tracker.log_round(report(3))
    client = MlflowClient()
    for site, run_id in site_runs(client, tracker).items():
        assert steps(client, run_id, ROUND_METRIC) == [1, 2, 3], site  # site-a's round 2 not sent twice
    assert steps(client, tracker.run_id, ROUND_METRIC) == [1, 2, 3]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_tracking_server_stopped_and_restarted_mid_federation(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="flwr")
    db = tmp_path / "server.db"
    shutil.copy(store, db)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    _bounded_http_policy(monkeypatch, retries=HTTP_POLICY["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    process = _start_mlflow_server(db, tmp_path, port)
    try:
        tracker = start("outage")
        assert tracker.log_round(report(1))
        _stop(process)  # the tracking server goes down after round 1
        started = time.monotonic()
        assert not tracker.log_round(report(2))
        down_for = time.monotonic() - started
        assert down_for < 30, f"a round waited {down_for:.0f} s on the unreachable tracking server"
        assert f"MLflow tracking server {url} is unreachable" in caplog.text
        process = _start_mlflow_server(db, tmp_path, port)  # back on the same port and store
        assert tracker.log_round(report(3)) and tracker.backlog == []
        assert tracker.finish(final_adapter=make_adapter(3))
        assert f"MLflow tracking server {url} is reachable again" in caplog.text
        client = MlflowClient(tracking_uri=url)
        assert steps(client, tracker.run_id, ROUND_METRIC) == [1, 2, 3]
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
        print(f"\na round logged while the tracking server was down returned after {down_for:.1f} s")
    finally:
        _stop(process)


def test_final_test_metrics_are_logged_once_at_the_tested_rounds_without_a_round_sentinel(experiment: str):
    tracker = start(experiment)
    for r in (1, 2):
        tracker.log_round(report(r))
    test = RoundReport.from_site_metrics(
        1,
        evaluation={
            "site-a": {"num-examples": 4, "test/dice_1click": 0.7},
            "site-b": {"num-examples": 6, "test/dice_1click": 0.5},
        },
    )
    assert tracker.log_test(test) and not tracker.log_test(test)  # a resumed server never logs it twice
    assert tracker.tested_rounds() == {1}
    client = MlflowClient()
    runs = site_runs(client, tracker)
    assert steps(client, runs["site-a"], "test/dice_1click") == [1]
    assert steps(client, runs["site-a"], "federation/test_examples") == [1]
    assert steps(client, tracker.run_id, "global/test/dice_1click_mean") == [1]
    mean = client.get_metric_history(tracker.run_id, "global/test/dice_1click_mean")[0].value
    assert mean == pytest.approx((0.7 * 4 + 0.5 * 6) / 10)
    assert steps(client, tracker.run_id, "federation/round") == [1, 2]  # a test is not a round
    resumed = FederationTracker.resume(tracker.run_id)
    assert [r.server_round for r in resumed.history] == [1, 2]
    assert all(not k.startswith("test/") for r in resumed.history for m in r.evaluation.values() for k in m)


def test_refused_updates_are_a_parent_metric_and_a_tag_with_site_and_reason(experiment: str):
    tracker = start(experiment, upload_summary_every_round=False)
    refused = {"site-b": "array 'seg' holds NaN or Inf"}
    tracker.log_round(
        RoundReport.from_site_metrics(
            1,
            training={"site-a": {"num-examples": 4, "train/seg_loss": 0.3}},
            global_metrics={"federation/refused_updates": 1.0},
            refused=refused,
        )
    )
    parent = tracker.client.get_run(tracker.run_id)
    assert parent.data.metrics["federation/refused_updates"] == 1.0
    assert parent.data.tags["fedabus.refused_updates.round-1"] == "site-b: array 'seg' holds NaN or Inf"


def test_an_early_stop_is_a_warning_a_summary_entry_and_parent_tags(experiment: str, tmp_path: Path):
    from flwr.app import ConfigRecord

    from server.round_end import RoundEnd

    tracker = start(experiment, upload_summary_every_round=False)
    adapter = Adapter({"seg.w": torch.zeros(2)})
    end = RoundEnd(
        grid=None,
        strategy=None,
        tracker=tracker,
        checkpoints=None,
        initial=adapter,
        global_adapter=adapter,
        best=None,
        flat_config={},
        resumable_keys=(),
        select_metric="dice_1click",
        num_rounds=5,
        round_timeout=1.0,
        evaluate_config=ConfigRecord({}),
        summary_path=tmp_path / "summary.json",
        summary={"rounds_done": 3},
    )
    stop = {
        "reason": "client-privacy-budget",
        "round": 4,
        "epsilon_spent": 2.9,
        "message": "round 4 is not started",
    }
    end.record_stop(stop)
    assert json.loads(end.summary_path.read_text()) == {"rounds_done": 3, "stopped": stop}
    tags = tracker.client.get_run(tracker.run_id).data.tags
    assert (
        tags["fedabus.stop_reason"] == "client-privacy-budget" and tags["fedabus.stopped_before_round"] == "4"
    )
    assert tags["fedabus.stop_message"] == "round 4 is not started"
