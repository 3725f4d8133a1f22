"""A real Flower 1.41 SuperLink with ``fedabus certs`` credentials: TLS, site authentication, fleet proxy.

Processes run on 127.0.0.1 with free ports and a temporary FLWR_HOME; each is started in its own session and
stopped by its process group. The fleet-proxy test runs the shipped nginx config (rewritten for loopback) when
nginx is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.certs import DEFAULT_SERVER_NAMES, CertPaths, make_certificates

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REGISTERED = ("site-a", "site-c")


@dataclass
class Deployment:
    root: Path
    creds: CertPaths
    port: int
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, argv: list[str], log_name: str) -> tuple[subprocess.Popen, Path]:
        log = self.root / log_name
        with log.open("wb") as handle:
            process = subprocess.Popen(
                argv, stdout=handle, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self.processes.append(process)
        return process, log

    def supernode(self, site: str, superlink: str) -> tuple[subprocess.Popen, Path]:
        site_paths = self.creds.sites[site]
        argv = [
            str(BIN / "flower-supernode"),
            "--superlink", superlink,
            "--root-certificates", str(site_paths.ca_cert),
            "--auth-supernode-private-key", str(site_paths.private_key),
            "--node-config", f'data-path="{self.root / site}" site-id="{site}"',
            "--port", str(_free_port()),
        ]  # fmt: skip
        return self.start(argv, f"supernode-{site}-{len(self.processes)}.log")

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True, timeout=60
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop a process we started, with everything in its session (SuperExec, app processes)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _get(url: str, ca: Path | None, timeout: float = 5.0) -> int:
    context = ssl.create_default_context(cafile=str(ca)) if ca else ssl.create_default_context()
    request = urllib.request.Request(url, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _post(url: str, ca: Path) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.3)
    details = log.read_text(errors="replace")[-3000:] if log else ""
    raise AssertionError(f"{what} did not happen within {timeout} s\n{details}")


def _healthy(port: int, ca: Path) -> bool:
    try:
        return _get(f"https://127.0.0.1:{port}/health", ca, timeout=2) == 200
    except (OSError, urllib.error.URLError):
        return False


def _node_id(log: Path) -> int | None:
    match = re.search(r"SuperNode ID: (\d+)", log.read_text(errors="replace"))
    return int(match.group(1)) if match else None


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deployment")
    # The same names as docker/scripts/demo-credentials.sh: the proxy verifies the SuperLink as "superlink".
    server_names = [*DEFAULT_SERVER_NAMES, "superlink", "fleet-proxy"]
    creds = make_certificates(
        root / "credentials", sites=["site-a", "site-b", "site-c"], server_names=server_names
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(root / "flwr_home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "CREDENTIALS_DIR": str(creds.out_dir),
    }
    port = _free_port()
    env["SUPERLINK_ADDRESS"] = f"127.0.0.1:{port}"
    deployment = Deployment(root=root, creds=creds, port=port, env=env)
    argv = [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(creds.ca_cert),
        "--ssl-certfile", str(creds.server_cert),
        "--ssl-keyfile", str(creds.server_key),
        "--enable-supernode-auth",
        "--database", str(root / "state.db"),
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    try:
        superlink, log = deployment.start(argv, "superlink.log")
        _wait_until(lambda: _healthy(port, creds.ca_cert), "SuperLink /health over TLS", 45, superlink, log)
        yield deployment
    finally:
        for process in reversed(deployment.processes):
            _stop(process)


@pytest.fixture(scope="module")
def registered(deployment: Deployment) -> str:
    """Run docker/scripts/register-sites.sh (the demo's registration step) against the real SuperLink."""
    result = subprocess.run(
        ["sh", str(REPO / "docker" / "scripts" / "register-sites.sh"), *REGISTERED],
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_tls_verifies_with_the_consortium_ca_only(deployment: Deployment) -> None:
    assert _get(f"https://localhost:{deployment.port}/health", deployment.creds.ca_cert) == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _get(f"https://127.0.0.1:{deployment.port}/health", None)


def test_register_script_is_idempotent(deployment: Deployment, registered: str) -> None:
    assert all(f"registered {site}" in registered for site in REGISTERED)
    config = (Path(deployment.env["FLWR_HOME"]) / "config.toml").read_text()
    assert f'address = "127.0.0.1:{deployment.port}"' in config
    again = subprocess.run(
        ["sh", str(REPO / "docker" / "scripts" / "register-sites.sh"), "site-a"],
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "site-a was already registered" in again.stdout, again.stderr


def test_registered_site_joins_and_unregistered_site_is_refused(
    deployment: Deployment, registered: str
) -> None:
    superlink = f"127.0.0.1:{deployment.port}"
    good, good_log = deployment.supernode("site-a", superlink)
    bad, bad_log = deployment.supernode("site-b", superlink)
    _wait_until(lambda: bad.poll() is not None, "unregistered SuperNode exit", 45, log=bad_log)
    # Flower logs "Exit Code: 305" (SUPERNODE_CONNECTION_ERROR); the process itself exits with status 1.
    assert bad.returncode != 0 and "Exit Code: 305" in bad_log.read_text(), bad_log.read_text()
    assert "Failed to activate SuperNode" in bad_log.read_text()
    _wait_until(lambda: _node_id(good_log) is not None, "registered SuperNode activation", 45, good, good_log)
    listing = deployment.flwr("supernode", "list", "demo", "--format", "json")
    nodes = {int(n["node-id"]): n["status"] for n in json.loads(listing.stdout)["nodes"]}
    assert nodes[_node_id(good_log)] == "online"
    assert len(nodes) == len(REGISTERED)


def _proxy_config(deployment: Deployment, listen: int, health: int) -> str:
    text = (REPO / "docker" / "nginx" / "fleet-proxy.conf").read_text()
    replacements = {
        "server superlink:8000;": f"server 127.0.0.1:{deployment.port};",
        "listen 8443 ssl;": f"listen 127.0.0.1:{listen} ssl;",
        "listen 127.0.0.1:8081;": f"listen 127.0.0.1:{health};",
        "/certs/": f"{deployment.creds.out_dir}/",
    }
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    root = deployment.root / "nginx"
    temp_paths = "\n".join(
        f"  {kind}_temp_path {root}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"worker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log info;\ndaemon off;\n"
        f"events {{ worker_connections 64; }}\n"
        f"http {{\n  access_log {root}/access.log;\n{temp_paths}\n{text}\n}}\n"
    )


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_fleet_proxy_exposes_only_the_fleet_api(deployment: Deployment, registered: str) -> None:
    listen, health = _free_port(), _free_port()
    (deployment.root / "nginx").mkdir()
    conf = deployment.root / "nginx" / "nginx.conf"
    conf.write_text(_proxy_config(deployment, listen, health))
    nginx = shutil.which("nginx")
    checked = subprocess.run(
        [nginx, "-t", "-c", str(conf), "-e", str(conf.parent / "error.log")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    proxy, log = deployment.start([nginx, "-c", str(conf), "-e", str(conf.parent / "error.log")], "nginx.log")
    ca, base = deployment.creds.ca_cert, f"https://localhost:{listen}"
    _wait_until(lambda: _healthy(listen, ca), "proxied /health", 20, proxy, log)
    assert _get(f"http://127.0.0.1:{health}/nginx-health", None) == 200
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/get-nodes", "/docs"):
        assert _post(base + path, ca) == 404, path
    assert _post(base + "/v1/fleet/get-run", ca) not in (403, 404)  # reaches the SuperLink (bad body)

    site, site_log = deployment.supernode("site-c", f"localhost:{listen}")
    _wait_until(
        lambda: _node_id(site_log) is not None, "SuperNode activation via the proxy", 45, site, site_log
    )
    access = (conf.parent / "access.log").read_text()
    assert "POST /v1/fleet/activate-node" in access
