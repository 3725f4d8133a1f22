"""The deployment path of ``bench_round.py``: one site on loopback with TLS, its messages watched from outside.

A SuperLink with TLS and site authentication and one SuperNode (``isolation=subprocess``: a fresh ClientApp process
per message), started with the helpers of the deployment tests (``tests/integration/processes.py``) on the cheap
consortium of ``benchmarks/faults.py`` (small random base, 8 synthetic cases per site), and ``flwr run`` of a few
rounds. A watcher thread timestamps, every 50 ms:

* the SuperNode log's ``Receiving: <type> message`` and ``Sending: <type> message`` lines (the message's wall time at
  the site: ClientApp process start, Flower's transfer of the message and reply between SuperNode and ClientApp,
  imports, the handler);
* the ``flwr-clientapp`` processes under the SuperNode: their lifetime;
* the server log's ``Round N/M done ... X s elapsed`` lines (``flwr run --stream``).

Per round, what the server saw minus the site's messages is the transfer between SuperLink and SuperNode (TLS,
the SuperNode's polling), the server's own work (admission, aggregation, checkpoint, MLflow) and the log stream's
delay.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faults import CHEAP, make_consortium  # puts the repository on sys.path first

from tests.integration.processes import BIN, CONNECTION, REPO, Deployment, node_id, stop, wait_until

__all__ = ["measure_deployment"]

SITE = "site_a"
_MESSAGE = re.compile(r"(Receiving|Sending): (\w+) message")
_ROUND = re.compile(r"Round (\d+)/\d+ done:.*?([\d.]+) s elapsed")


@dataclass
class _Watch:
    """Timestamped events seen while the run goes on."""

    node_log: Path
    server_log: Path
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (time, what, detail)
    rounds: dict[int, float] = field(default_factory=dict)  # round -> elapsed at the server (s)
    processes: dict[int, list[float]] = field(default_factory=dict)  # pid -> [created, last seen]
    done: threading.Event = field(default_factory=threading.Event)

    def run(self, supernode_pid: int) -> None:
        import psutil

        offsets = {self.node_log: 0, self.server_log: 0}
        while not self.done.is_set():
            now = time.time()
            for path in offsets:
                text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
                new, offsets[path] = text[offsets[path] :], len(text)
                for line in new.splitlines():
                    if (found := _MESSAGE.search(line)) and path == self.node_log:
                        self.events.append((now, found.group(1), found.group(2)))
                    if (found := _ROUND.search(line)) and path == self.server_log:
                        self.rounds[int(found.group(1))] = float(found.group(2))
            try:
                children = psutil.Process(supernode_pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            for child in children:
                try:
                    if "flwr-clientapp" in " ".join(child.cmdline()):
                        self.processes.setdefault(child.pid, [child.create_time(), now])[1] = now
                except psutil.Error:
                    continue
            time.sleep(0.05)

    def messages(self) -> list[dict[str, Any]]:
        """Each message at the SuperNode: type, wall seconds, and the ClientApp process's lifetime within it."""
        out, pending = [], {}
        for when, what, kind in self.events:
            if what == "Receiving":
                pending[kind] = when
            elif kind in pending:
                start = pending.pop(kind)
                lives = [
                    last - created for created, last in self.processes.values() if start <= created <= when
                ]
                out.append(
                    {
                        "kind": kind,
                        "at_supernode_s": round(when - start, 2),
                        "clientapp_process_s": round(max(lives), 2) if lives else None,
                    }
                )
        return out


def measure_deployment(root: Path, *, rounds: int, timeout: float = 1800.0) -> dict[str, Any]:
    """Run ``rounds`` rounds of one site on loopback with TLS; returns the messages, rounds and a summary."""
    from shared.simulation import run_config_overrides

    consortium = make_consortium(root)
    deployment = Deployment.create(root / "deployment", consortium.creds)
    deployment.root.mkdir(parents=True, exist_ok=True)
    work = root / "server"
    overrides = {
        "num-server-rounds": rounds,
        "model.base-path": str(consortium.base),
        "model.cls-depth": 18,
        "federation.work-dir": str(work),
        "federation.tracking-uri": f"sqlite:///{root / 'mlflow.db'}",
        "federation.min-sites": 1,
        "federation.sample-timeout": 120.0,
        **CHEAP,
    }
    try:
        deployment.start_superlink(timeout=120)
        deployment.register(SITE)
        node, node_log = deployment.supernode(SITE, data_path=consortium.sites_dir / SITE)
        wait_until(lambda: node_id(node_log) is not None, f"{SITE} activation", 300, node, node_log)
        argv = [str(BIN / "flwr"), "run", str(REPO), CONNECTION, "--stream", *run_config_overrides(overrides)]
        started = time.monotonic()
        run, server_log = deployment.start(argv, "flwr-run.log")
        watch = _Watch(node_log, server_log)
        watcher = threading.Thread(target=watch.run, args=(node.pid,), daemon=True)
        watcher.start()
        try:
            run.wait(timeout=timeout)
        finally:
            time.sleep(1.0)  # the last lines
            watch.done.set()
            watcher.join(timeout=10)
            if run.poll() is None:
                stop(run)
        wall = time.monotonic() - started
    finally:
        deployment.stop_all()
    messages = watch.messages()
    elapsed = [watch.rounds[r] for r in sorted(watch.rounds)]
    per_round = [b - a for a, b in zip([0.0, *elapsed], elapsed, strict=False)]
    summary = {
        "returncode": run.returncode,
        "flwr_run_wall_s": round(wall, 1),
        "round_s_at_server": [round(s, 1) for s in per_round],
    }
    for kind in ("query", "train", "evaluate"):
        walls = [m["at_supernode_s"] for m in messages if m["kind"] == kind]
        lives = [m["clientapp_process_s"] for m in messages if m["kind"] == kind and m["clientapp_process_s"]]
        if walls:
            summary[f"{kind}_at_supernode_s_median"] = round(statistics.median(walls), 2)
        if lives:
            summary[f"{kind}_clientapp_process_s_median"] = round(statistics.median(lives), 2)
    return {"site": SITE, "overrides": overrides, "messages": messages, "summary": summary}
