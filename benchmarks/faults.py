"""Fault injection on a real deployment: what a federation does when a site, the server or MLflow fails.

Just over 500 lines on purpose: one harness, one file — every fault's script and its measurement side by side,
so a reader sees what was done to the federation next to what was counted.

Each fault runs its own consortium on 127.0.0.1 — a SuperLink with TLS and site authentication, 3 SuperNodes,
``flwr run`` of a cheap federation (random small base, 8 synthetic cases per site, one local epoch) — made and
started with the deployment tests' helpers (``make_consortium``, ``start_consortium`` in
``tests/integration/processes.py``, imported from there: one copy).
Every wait has a bound; a run that does not end within ``--timeout`` is recorded as hung and stopped.

Faults (``--faults``, comma-separated; default all):

- ``kill-site``: SIGKILL 1 of 3 SuperNodes once it received its train message of round 1;
- ``kill-site-secure``: ``kill-site`` under ``federation.secure-aggregation`` (signed keys, as the deployment
  helpers configure every SuperNode): the killed site has exchanged keys and Shamir shares but sends no masked
  input, so the survivors' sum is unmasked with its rebuilt mask key, or the round is recorded as skipped;
- ``kill-all-but-one``: the same for 2 of 3 (``min-sites`` 1, so one site may go on);
- ``stall``: SIGSTOP 1 site at its round-1 train message, SIGCONT once ``--round-timeout`` has passed; with
  ``--rounds 3`` or more, whether it trains again in a later round (``stall_site_trained_rounds``, from its MLflow
  run) shows if it rejoins;
- ``kill-server``: SIGKILL the SuperLink (with its ServerApp) once round 1 is checkpointed, restart it and
  ``flwr run`` again (``federation.resume``);
- ``truncate-checkpoint``: as ``kill-server``, but once round 2 is checkpointed (round 1 with ``--rounds 2``), and
  the newest checkpoint's ``global.safetensors`` is truncated to half before the restart (a damaged disk): the
  server falls back to the round before and runs the rest again, or, with no earlier round kept, stops with a
  message naming the file;
- ``mlflow-down``: the run tracks to an ``mlflow server`` (sqlite backend, loopback) that is stopped once
  round 1 is done and restarted after the next round's train messages went out (or ``--mlflow-down`` s).

Per fault: ``hung``, ``rounds_done``, ``rounds_lost`` (asked − checkpointed), ``rounds_duplicated`` (parent-run
``federation/round`` steps logged twice), MLflow step continuity (steps of the parent's ``federation/round`` are
1..N exactly once, besides step 0 of the evaluation before round 1), adapter hash continuity (checkpoints
round-0001..N each hold a new global adapter, and ``final_adapter.safetensors`` is the last one), and whether
the server log (``flwr run --stream`` output) names the fault. JSON to ``--out`` (default ``benchmarks/results/faults.json``) and a table on stdout.

    /work/wt-gpu/.venv/bin/python benchmarks/faults.py --faults kill-site,stall --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.processes import (  # noqa: E402
    BIN,
    CONNECTION,
    Consortium,
    Deployment,
    free_port,
    make_consortium,
    start_consortium,
    stop,
)

SITES = ("site_a", "site_b", "site_c")
CHEAP = {
    "train.progress": False,
    "train.seg-epochs": 1,
    "train.cls-epochs": 1,
    "train.eval-clicks": 2,
    "train.seg-click-iterations": 1,
    "federation.final-test": False,
}
TRAIN_MESSAGE = "Receiving: train message"
#: The site the ``stall`` fault stops and resumes.
STALLED = "site_b"


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Fed:
    """One fault's consortium: deployment, SuperLink, SuperNodes, the work folder and the run's log(s)."""

    deployment: Deployment
    consortium: Consortium
    args: argparse.Namespace
    work: Path
    superlink: subprocess.Popen | None = None
    nodes: dict[str, tuple[subprocess.Popen, Path]] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)
    tracking_uri: str = ""
    notes: list[str] = field(default_factory=list)
    #: ``stall``: rounds checkpointed when the stopped site was resumed (SIGCONT).
    resumed_after_round: int | None = None
    #: Run-config overrides a fault adds (``kill-site-secure``: secure aggregation on).
    extra: dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        return {
            "num-server-rounds": self.args.rounds,
            "model.base-path": str(self.consortium.base),
            "model.cls-depth": 18,
            "federation.work-dir": str(self.work),
            "federation.tracking-uri": self.tracking_uri
            or f"sqlite:///{self.work.parent / (self.work.name + '-mlflow.db')}",
            "federation.min-sites": 1,
            "federation.sample-timeout": self.args.sample_timeout,
            "federation.round-timeout": self.args.round_timeout,
            "federation.checkpoint-keep": 1000,
            "federation.resume": True,
            **CHEAP,
            **self.extra,
        }

    def start(self) -> None:
        self.superlink, self.nodes = start_consortium(
            self.deployment, self.consortium, timeout=self.args.timeout
        )

    def run(self) -> tuple[subprocess.Popen, Path]:
        from shared.simulation import run_config_overrides

        argv = [
            str(BIN / "flwr"),
            "run",
            str(REPO),
            CONNECTION,
            "--stream",
            *run_config_overrides(self.overrides()),
        ]
        process, log = self.deployment.start(argv, f"flwr-run-{len(self.logs) + 1}.log")
        self.logs.append(log)
        return process, log

    def trains(self, site: str) -> int:
        return _text(self.nodes[site][1]).count(TRAIN_MESSAGE)

    def rounds_done(self) -> int:
        path = self.work / "summary.json"
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("rounds_done", 0) if path.is_file() else 0
        except (OSError, ValueError):
            return 0

    def output(self) -> str:
        return "\n".join(_text(log) for log in self.logs)


class Hung(Exception):
    """A bounded wait ran out: recorded as a hang."""


def bounded(
    check: Callable[[], bool], what: str, timeout: float, process: subprocess.Popen | None = None
) -> bool:
    """Poll ``check`` up to ``timeout`` s; False when ``process`` exited first, :class:`Hung` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        if process is not None and process.poll() is not None:
            return check()
        time.sleep(0.2)
    raise Hung(f"{what}: not within {timeout:.0f} s")


def finish(run: subprocess.Popen, timeout: float) -> bool:
    """Wait for ``flwr run`` to end; False (and stopped) when it did not within ``timeout`` s: a hang."""
    try:
        run.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        stop(run)
        return False


def _signal_tree(process: subprocess.Popen, sig: signal.Signals) -> None:
    """``sig`` to the process group we started and to descendants that left it."""
    import psutil

    try:
        strays = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        strays = []
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    for child in strays:
        try:
            if os.getpgid(child.pid) != process.pid:
                child.send_signal(sig)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue


def _named(site: str) -> str:
    """A server-log line that names ``site`` together with a failure."""
    reason = r"(fail|offline|gone|timed out|timeout|error|no reply|missing)"
    return rf"{site}.*{reason}|{reason}.*{site}"


# --- the faults: each drives a started Fed and returns (finished, pattern naming the fault in the log) ---


def _kill_sites(fed: Fed, victims: list[str]) -> tuple[bool, str]:
    earlier = {site: fed.trains(site) for site in victims}
    run, _ = fed.run()
    for site in victims:
        bounded(
            lambda s=site: fed.trains(s) > earlier[s], f"{site} round-1 train message", fed.args.timeout, run
        )
        stop(fed.nodes[site][0], crash=True)
        fed.notes.append(f"SIGKILL {site} at t={time.monotonic():.0f}")
    return finish(run, fed.args.timeout), "|".join(_named(s) for s in victims)


def fault_kill_site(fed: Fed) -> tuple[bool, str]:
    return _kill_sites(fed, ["site_b"])


def fault_kill_site_secure(fed: Fed) -> tuple[bool, str]:
    fed.extra["federation.secure-aggregation"] = True
    return _kill_sites(fed, ["site_b"])


def fault_kill_all_but_one(fed: Fed) -> tuple[bool, str]:
    return _kill_sites(fed, ["site_b", "site_c"])


def fault_stall(fed: Fed) -> tuple[bool, str]:
    site = STALLED
    earlier = fed.trains(site)
    run, _ = fed.run()
    bounded(lambda: fed.trains(site) > earlier, f"{site} round-1 train message", fed.args.timeout, run)
    process = fed.nodes[site][0]
    _signal_tree(process, signal.SIGSTOP)
    stopped = time.monotonic()
    fed.notes.append(f"SIGSTOP {site}")
    try:
        # SIGCONT once the round timeout has passed (or the run ended earlier)
        wait = fed.args.round_timeout + 10.0
        while time.monotonic() - stopped < wait and run.poll() is None:
            time.sleep(0.5)
    finally:
        _signal_tree(process, signal.SIGCONT)
        fed.resumed_after_round = fed.rounds_done()
        fed.notes.append(
            f"SIGCONT {site} after {time.monotonic() - stopped:.0f} s, {fed.resumed_after_round} round(s) checkpointed"
        )
    return finish(run, fed.args.timeout), _named(site)


def _kill_server_after_round(fed: Fed, server_round: int = 1) -> tuple[subprocess.Popen, bool]:
    run, _ = fed.run()
    ok = bounded(
        lambda: fed.rounds_done() >= server_round, f"round {server_round} checkpointed", fed.args.timeout, run
    )
    stop(fed.superlink, crash=True)
    fed.notes.append(f"SIGKILL SuperLink+ServerApp after round {fed.rounds_done()}")
    stop(run)
    return run, ok


def fault_kill_server(fed: Fed) -> tuple[bool, str]:
    _kill_server_after_round(fed, 1)
    fed.superlink, _ = fed.deployment.start_superlink(timeout=fed.args.timeout)
    run, _ = fed.run()
    return finish(run, fed.args.timeout), r"Resuming after round \d+"


def fault_truncate_checkpoint(fed: Fed) -> tuple[bool, str]:
    _kill_server_after_round(fed, 2 if fed.args.rounds >= 3 else 1)  # round 1 kept to fall back to
    folder = fed.work / "checkpoints"
    latest = _text(folder / "LATEST").strip()
    target = folder / latest / "global.safetensors"
    size = target.stat().st_size
    with target.open("r+b") as handle:
        handle.truncate(size // 2)
    fed.notes.append(f"truncated {latest}/global.safetensors {size} -> {size // 2} bytes")
    fed.superlink, _ = fed.deployment.start_superlink(timeout=fed.args.timeout)
    run, _ = fed.run()
    return finish(
        run, fed.args.timeout
    ), r"Checkpoint .*global\.safetensors.* is damaged|global\.safetensors.*corrupt"


def _mlflow_server(fed: Fed, port: int, root: Path) -> subprocess.Popen:
    argv = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    process, log = fed.deployment.start(argv, "mlflow-server.log")
    fed.deployment.env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

    def up() -> bool:
        from tests.integration.processes import http_get

        try:
            return http_get(f"http://127.0.0.1:{port}/health", None, timeout=2) == 200
        except OSError:
            return False

    bounded(up, "mlflow server /health", fed.args.timeout, process)
    return process


def fault_mlflow_down(fed: Fed) -> tuple[bool, str]:
    port, root = free_port(), fed.work.parent / "mlflow-server"
    root.mkdir(parents=True, exist_ok=True)
    fed.deployment.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    server = _mlflow_server(fed, port, root)
    fed.tracking_uri = f"http://127.0.0.1:{port}"
    run, _ = fed.run()
    bounded(lambda: fed.rounds_done() >= 1, "round 1 done", fed.args.timeout, run)
    stop(server)
    down = time.monotonic()
    fed.notes.append("mlflow server stopped after round 1")
    earlier = fed.trains("site_a")
    try:
        bounded(lambda: fed.trains("site_a") > earlier, "round-2 train message", fed.args.mlflow_down, run)
    except Hung:
        pass
    while time.monotonic() - down < fed.args.mlflow_down and run.poll() is None:
        time.sleep(0.5)
    _mlflow_server(fed, port, root)
    fed.notes.append(f"mlflow server restarted after {time.monotonic() - down:.0f} s")
    return finish(run, fed.args.timeout), MLFLOW_DOWN


#: An MLflow failure in the server log (not the ordinary "MLflow run ... is on the tracking server" lines).
MLFLOW_DOWN = (
    r"MLflow tracking server \S+ is (unreachable|reachable again)|Connection refused|MlflowException"
)


#: What the server logs of a secure round: its setup, the unmasked sum (with the dropped sites) or a skip.
SECURE_ROUND = (
    r"secure aggregation (set up|unmasked)|secure-aggregation threshold|cannot unmask|Secure aggregation"
)

#: What a site logs when it checks the relayed round keys (client/secure_aggregation.py).
SITE_KEY_CHECK = (
    r"Round \d+: secure-aggregation keys of [^\n]*(?:verified against|taken unverified)|fail signature"
)


FAULTS: dict[str, Callable[[Fed], tuple[bool, str]]] = {
    "kill-site": fault_kill_site,
    "kill-site-secure": fault_kill_site_secure,
    "kill-all-but-one": fault_kill_all_but_one,
    "stall": fault_stall,
    "kill-server": fault_kill_server,
    "truncate-checkpoint": fault_truncate_checkpoint,
    "mlflow-down": fault_mlflow_down,
}


# --- what a run left behind ---


def adapter_chain(work: Path, rounds_done: int) -> dict[str, Any]:
    folder = work / "checkpoints"
    chain = {}
    for path in sorted(folder.glob("round-*")):
        file = path / "global.safetensors"
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        chain[int(path.name.split("-")[1])] = {
            "sha256": _sha256(file)[:16] if file.is_file() else None,
            "state_round": state.get("server_round"),
        }
    rounds = sorted(chain)
    hashes = [chain[r]["sha256"] for r in rounds]
    final = work / "final_adapter.safetensors"
    final_hash = _sha256(final)[:16] if final.is_file() else None
    continuous = (
        rounds == list(range(1, rounds_done + 1))
        and all(chain[r]["state_round"] == r for r in rounds)
        and None not in hashes
        and len(set(hashes)) == len(hashes)
    )
    return {
        "rounds": rounds,
        "hashes": hashes,
        "final_sha256": final_hash,
        "final_is_last": bool(hashes) and final_hash == hashes[-1],
        "continuous": continuous,
    }


def mlflow_steps(tracking_uri: str, run_id: str | None) -> list[int] | None:
    if not run_id or not tracking_uri:
        return None
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        return sorted(m.step for m in client.get_metric_history(run_id, "federation/round"))
    except Exception as exc:  # noqa: BLE001 - recorded, not raised
        print(f"  MLflow read failed: {exc}", file=sys.stderr)
        return None


def site_trained_rounds(tracking_uri: str, run_id: str | None, site: str) -> list[int] | None:
    """Rounds whose training metrics of ``site`` the federation logged (its nested run's
    ``federation/train_examples`` steps); None when MLflow could not be read."""
    if not run_id or not tracking_uri:
        return None
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        parent = client.get_run(run_id)
        runs = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`fedabus.site` = '{site}'",
        )
        histories = [client.get_metric_history(r.info.run_id, "federation/train_examples") for r in runs]
        return sorted({m.step for history in histories for m in history})
    except Exception as exc:  # noqa: BLE001 - recorded, not raised
        print(f"  MLflow read failed: {exc}", file=sys.stderr)
        return None


def steps_continuous(steps: list[int] | None, rounds_done: int) -> bool | None:
    """The parent's ``federation/round`` holds rounds 1..N once each (step 0, the evaluation before round 1,
    may be there too); None when MLflow could not be read."""
    if steps is None:
        return None
    return [s for s in steps if s >= 1] == list(range(1, rounds_done + 1)) and steps.count(0) <= 1


def run_fault(name: str, consortium: Consortium, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    deployment = Deployment.create(root, consortium.creds)
    fed = Fed(deployment, consortium, args, work=root / "server")
    started = time.monotonic()
    row: dict[str, Any] = {"fault": name, "rounds": args.rounds, "root": str(root)}
    finished, pattern, error, hung = False, "", None, False
    try:
        fed.start()
        finished, pattern = FAULTS[name](fed)
    except Hung as exc:
        error, hung = str(exc), True
    except Exception as exc:  # noqa: BLE001 - a harness failure is recorded with the fault
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        deployment.stop_all()
    output = fed.output()
    rounds_done = fed.rounds_done()
    summary_path = fed.work / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    uri = summary.get("tracking_uri", "")
    if name == "mlflow-down":  # the mlflow server is stopped by now: read its store
        uri = f"sqlite:///{root / 'mlflow-server' / 'mlflow.db'}"
    steps = mlflow_steps(uri, summary.get("run_id"))
    chain = adapter_chain(fed.work, rounds_done)
    named = bool(pattern) and re.search(pattern, output) is not None
    if name == "stall":
        trained = site_trained_rounds(uri, summary.get("run_id"), STALLED)
        row["stall_site_trained_rounds"] = trained
        row["stall_resumed_after_round"] = fed.resumed_after_round
        row["stall_site_rejoined"] = (
            None
            if trained is None or fed.resumed_after_round is None or fed.resumed_after_round >= args.rounds
            else any(r > fed.resumed_after_round for r in trained)
        )
    row |= {
        "hung": hung or (error is None and not finished),
        "error": error,
        "seconds": round(time.monotonic() - started, 1),
        "rounds_done": rounds_done,
        "rounds_lost": args.rounds - rounds_done,
        "mlflow_steps": steps,
        "rounds_duplicated": None if steps is None else len(steps) - len(set(steps)),
        "mlflow_continuous": steps_continuous(steps, rounds_done),
        "adapter_chain": chain,
        "adapter_continuous": None
        if not rounds_done
        else chain["continuous"] and (chain["final_is_last"] or rounds_done < args.rounds),
        "fault_in_server_log": named,
        "fault_log_lines": [
            line.strip()[:300] for line in output.splitlines() if pattern and re.search(pattern, line)
        ][:12],
        "resumes": len(re.findall(r"Resuming after round", output)),
        "fallbacks": re.findall(
            r"Falling back to the previous good checkpoint: resuming after round \d+", output
        ),
        "secure_aggregation": [
            line.strip()[:300] for line in output.splitlines() if re.search(SECURE_ROUND, line)
        ],
        "site_key_checks": {
            site: re.findall(SITE_KEY_CHECK, _text(log)) for site, (_, log) in fed.nodes.items()
        },
        "stopped": summary.get("stopped"),
        "notes": fed.notes,
        "log_tail": output[-3000:],
    }
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("fault", "hung", "done", "lost", "dup", "mlflow 1..N", "adapter chain", "named in log", "s")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(
            " | ".join(
                str(v)
                for v in (
                    r["fault"],
                    r["hung"],
                    f"{r['rounds_done']}/{r['rounds']}",
                    r["rounds_lost"],
                    r["rounds_duplicated"],
                    r["mlflow_continuous"],
                    r["adapter_continuous"],
                    r["fault_in_server_log"],
                    r["seconds"],
                )
            )  # fmt: skip
        )
    return "\n".join(f"| {line} |" for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="bound of every wait, seconds")
    parser.add_argument("--round-timeout", type=float, default=120.0, help="federation.round-timeout")
    parser.add_argument(
        "--sample-timeout",
        type=float,
        default=120.0,
        help="federation.sample-timeout: raise it on a loaded machine, where the handshake alone can take minutes",
    )
    parser.add_argument(
        "--mlflow-down", type=float, default=60.0, help="seconds the mlflow server stays down"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "faults.json")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, work dirs)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    os.chdir(REPO)  # flwr run bundles this working tree
    temp = Path(tempfile.mkdtemp(prefix="fedabus-faults-"))
    print(f"work folder {temp}", flush=True)
    consortium = make_consortium(temp / "consortium", SITES)
    rows: list[dict[str, Any]] = []
    report = {
        "command": " ".join(sys.argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_before": os.getloadavg(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"== {name}", flush=True)
        rows.append(run_fault(name, consortium, temp / name, args))
        report["load_after"] = os.getloadavg()
        args.out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        print(table(rows[-1:]), flush=True)
    print(table(rows))
    print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
