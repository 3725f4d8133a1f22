"""Real Flower processes for integration tests: a TLS SuperLink with site authentication, SuperNodes, ``flwr``.

Everything runs on 127.0.0.1 with free ports and a private ``FLWR_HOME`` under the test's temporary folder.
Each process is started in its own session and stopped by its process group (SIGTERM, then SIGKILL), so
the SuperExec and app processes it spawned go with it; only processes started here are ever signalled.

A consortium (synthetic sites, a random small base, credentials: :func:`make_consortium`) and its start (SuperLink,
registered sites, activated SuperNodes: :func:`start_consortium`) are made here once for the deployment tests and
the fault-injection benchmark (benchmarks/faults.py).

Import as ``from tests.integration.processes import ...`` (pytest runs from the repository root).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from shared.certs import CertPaths

__all__ = [
    "BIN",
    "CONNECTION",
    "REPO",
    "Consortium",
    "Deployment",
    "flwr_env",
    "free_port",
    "healthy",
    "http_get",
    "http_post",
    "make_consortium",
    "node_id",
    "start_consortium",
    "stop",
    "wait_until",
]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: The connection name in ``$FLWR_HOME/config.toml`` (as docker/scripts/register-sites.sh writes it).
CONNECTION = "demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop(process: subprocess.Popen, *, grace: float = 10.0, crash: bool = False) -> None:
    """Stop a process we started with everything in its session (SuperExec, app processes).

    SIGTERM to the process group, then SIGKILL after ``grace`` seconds; ``crash`` sends SIGKILL at once (a
    machine failure, no clean shutdown). Descendants that left the session are killed too.
    """
    strays = _descendants(process.pid)
    signals = ((signal.SIGKILL, 5.0),) if crash else ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0))
    for sig, wait in signals:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    for child in strays:
        try:
            if child.is_running() and os.getpgid(child.pid) != process.pid:
                child.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue


def http_get(url: str, ca: Path | None, timeout: float = 5.0) -> int:
    """HTTP status of a GET, verifying TLS with ``ca`` (system roots when None)."""
    context = ssl.create_default_context(cafile=str(ca)) if ca else ssl.create_default_context()
    request = urllib.request.Request(url, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def http_post(url: str, ca: Path) -> int:
    """HTTP status of an empty POST, verifying TLS with ``ca``."""
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
    interval: float = 0.3,
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds or when ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if process is not None and process.poll() is not None:
            if check():
                return
            break
        time.sleep(interval)
    details = log.read_text(encoding="utf-8", errors="replace")[-4000:] if log and log.exists() else ""
    raise AssertionError(f"{what} did not happen within {timeout} s\n{details}")


def healthy(port: int, ca: Path) -> bool:
    try:
        return http_get(f"https://127.0.0.1:{port}/health", ca, timeout=2) == 200
    except (OSError, urllib.error.URLError):
        return False


def node_id(log: Path) -> int | None:
    """The SuperNode ID a SuperNode log announces (its latest one), else None."""
    found = re.findall(r"SuperNode ID: (\d+)", log.read_text(encoding="utf-8", errors="replace"))
    return int(found[-1]) if found else None


def flwr_env(flwr_home: Path, creds: CertPaths, port: int) -> dict[str, str]:
    """Environment for Flower processes and ``flwr``/register-sites.sh: own FLWR_HOME, no telemetry, and one
    torch/OpenMP thread per process.

    All sites share this machine's cores; with torch's default (a thread per core) in every ClientApp, two
    sites on 2 cores oversubscribe them and a round runs about 10x slower than with one thread each.
    """
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "CREDENTIALS_DIR": str(creds.out_dir),
        "SUPERLINK_ADDRESS": f"127.0.0.1:{port}",
    }


@dataclass
class Deployment:
    """A consortium on loopback: ``root`` (temp folder), credentials, the SuperLink's port and environment.

    ``processes`` holds every process started through :meth:`start`; :meth:`stop_all` stops them, newest first.
    """

    root: Path
    creds: CertPaths
    port: int
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(cls, root: Path, creds: CertPaths) -> Deployment:
        port = free_port()
        return cls(root=root, creds=creds, port=port, env=flwr_env(root / "flwr_home", creds, port))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, argv: list[str], log_name: str) -> tuple[subprocess.Popen, Path]:
        """Start ``argv`` in its own session with stdout+stderr appended to ``root/log_name``."""
        log = self.root / log_name
        with log.open("ab") as handle:
            process = subprocess.Popen(
                argv, stdout=handle, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self.processes.append(process)
        return process, log

    def start_superlink(self, timeout: float = 120.0) -> tuple[subprocess.Popen, Path]:
        """The SuperLink with TLS, site authentication and a persistent ``root/state.db``; waits for /health.

        Calling it again after the SuperLink was stopped restarts it on the same port and database.
        """
        creds = self.creds
        argv = [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(creds.ca_cert),
            "--ssl-certfile", str(creds.server_cert),
            "--ssl-keyfile", str(creds.server_key),
            "--enable-supernode-auth",
            "--database", str(self.root / "state.db"),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        process, log = self.start(argv, "superlink.log")
        wait_until(
            lambda: healthy(self.port, creds.ca_cert), "SuperLink /health over TLS", timeout, process, log
        )
        return process, log

    def register(self, *sites: str) -> str:
        """Run docker/scripts/register-sites.sh (writes the ``demo`` connection, registers the sites' keys)."""
        result = subprocess.run(
            ["sh", str(REPO / "docker" / "scripts" / "register-sites.sh"), *sites],
            env=self.env,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=90,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"register-sites.sh {' '.join(sites)} failed:\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    def supernode(
        self, site: str, superlink: str | None = None, *, data_path: Path | None = None
    ) -> tuple[subprocess.Popen, Path]:
        """A SuperNode authenticating with ``site``'s key; its node config names ``data_path`` (default
        ``root/site``), the site id, a state folder under ``root`` (not the home folder's), and the same key
        and the consortium's public keys for signed secure-aggregation keys (docs/privacy.md)."""
        site_paths = self.creds.sites[site]
        node_config = (
            f'data-path="{data_path or self.root / site}" site-id="{site}" state-dir="{self.root / "state" / site}" '
            f'secagg-signing-key="{site_paths.private_key}" secagg-trusted-keys="{site_paths.consortium}"'
        )
        argv = [
            str(BIN / "flower-supernode"),
            "--superlink", superlink or self.address,
            "--root-certificates", str(site_paths.ca_cert),
            "--auth-supernode-private-key", str(site_paths.private_key),
            "--node-config", node_config,
            "--port", str(free_port()),
        ]  # fmt: skip
        return self.start(argv, f"supernode-{site}-{len(self.processes)}.log")

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a ``flwr`` command to completion (output captured)."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
        )

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            stop(process)


@dataclass(frozen=True)
class Consortium:
    """Synthetic sites (``sites_dir/<site>``), a random small base (``base``), credentials for each site."""

    sites_dir: Path
    base: Path
    creds: CertPaths
    sites: tuple[str, ...]


def make_consortium(root: Path, sites: tuple[str, ...], *, cases: int = 8, seed: int = 5) -> Consortium:
    """``cases`` synthetic cases per site (8: 2 train, 2 validation, 4 test), the small random base with a
    ResNet-18 classifier (``model.cls-depth = 18`` in the run config), and certificates, under ``root``."""
    from shared.base import build_random_base, save_base
    from shared.certs import make_certificates
    from shared.data.synth import SynthOptions, generate_consortium

    options = SynthOptions(split_fractions=(0.34, 0.33, 0.33))
    folders = generate_consortium(root / "sites", sites=len(sites), cases=cases, seed=seed, options=options)
    if tuple(f.name for f in folders) != tuple(sites):
        raise AssertionError(f"synthetic sites {[f.name for f in folders]} are not {list(sites)}")
    save_base(build_random_base("small", cls_depth=18, seed=0), root / "base")
    creds = make_certificates(root / "credentials", sites=list(sites))
    return Consortium(root / "sites", root / "base", creds, tuple(sites))


def start_consortium(
    deployment: Deployment, consortium: Consortium, *, timeout: float = 180.0
) -> tuple[subprocess.Popen, dict[str, tuple[subprocess.Popen, Path]]]:
    """The SuperLink (TLS, site authentication), every site registered and its SuperNode activated (within
    ``timeout`` s each); returns the SuperLink and ``{site: (SuperNode process, its log)}``."""
    superlink, _ = deployment.start_superlink(timeout=timeout)
    deployment.register(*consortium.sites)
    nodes = {
        site: deployment.supernode(site, data_path=consortium.sites_dir / site) for site in consortium.sites
    }
    for site, (process, log) in nodes.items():
        wait_until(
            lambda log=log: node_id(log) is not None, f"SuperNode {site} activation", timeout, process, log
        )
    return superlink, nodes
