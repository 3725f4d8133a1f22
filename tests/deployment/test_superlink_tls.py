"""A real Flower SuperLink with ``fedabus certs`` credentials: TLS, site authentication, fleet proxy.

Processes run on 127.0.0.1 with free ports and a temporary FLWR_HOME; each is started in its own session and
stopped by its process group. The fleet-proxy test runs the shipped nginx config (rewritten for loopback) when
nginx is installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.certs import DEFAULT_SERVER_NAMES, make_certificates
from tests.integration.processes import (
    REPO,
    Deployment,
    free_port,
    healthy,
    http_get,
    http_post,
    node_id,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REGISTERED = ("site-a", "site-c")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deployment")
    # The same names as docker/scripts/demo-credentials.sh: the proxy verifies the SuperLink as "superlink".
    server_names = [*DEFAULT_SERVER_NAMES, "superlink", "fleet-proxy"]
    creds = make_certificates(
        root / "credentials", sites=["site-a", "site-b", "site-c"], server_names=server_names
    )
    deployment = Deployment.create(root, creds)
    try:
        deployment.start_superlink()
        yield deployment
    finally:
        deployment.stop_all()


@pytest.fixture(scope="module")
def registered(deployment: Deployment) -> str:
    """Run docker/scripts/register-sites.sh (the demo's registration step) against the real SuperLink."""
    return deployment.register(*REGISTERED)


def test_tls_verifies_with_the_consortium_ca_only(deployment: Deployment) -> None:
    assert http_get(f"https://localhost:{deployment.port}/health", deployment.creds.ca_cert) == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        http_get(f"https://127.0.0.1:{deployment.port}/health", None)


def test_register_script_is_idempotent(deployment: Deployment, registered: str) -> None:
    assert all(f"registered {site}" in registered for site in REGISTERED)
    config = (Path(deployment.env["FLWR_HOME"]) / "config.toml").read_text(encoding="utf-8")
    assert f'address = "127.0.0.1:{deployment.port}"' in config
    assert "site-a was already registered" in deployment.register("site-a")


def test_registered_site_joins_and_unregistered_site_is_refused(
    deployment: Deployment, registered: str
) -> None:
    superlink = f"127.0.0.1:{deployment.port}"
    good, good_log = deployment.supernode("site-a", superlink)
    bad, bad_log = deployment.supernode("site-b", superlink)
    wait_until(lambda: bad.poll() is not None, "unregistered SuperNode exit", 120, log=bad_log)
    # Flower logs "Exit Code: 305" (SUPERNODE_CONNECTION_ERROR); the process itself exits with status 1.
    refused = bad_log.read_text(encoding="utf-8")
    assert bad.returncode != 0 and "Exit Code: 305" in refused, refused
    assert "Failed to activate SuperNode" in refused
    wait_until(lambda: node_id(good_log) is not None, "registered SuperNode activation", 120, good, good_log)
    listing = deployment.flwr("supernode", "list", "demo", "--format", "json")
    nodes = {int(n["node-id"]): n["status"] for n in json.loads(listing.stdout)["nodes"]}
    assert nodes[node_id(good_log)] == "online"
    assert len(nodes) == len(REGISTERED)


def _proxy_config(deployment: Deployment, listen: int, health: int) -> str:
    text = (REPO / "docker" / "nginx" / "fleet-proxy.conf").read_text(encoding="utf-8")
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
    listen, health = free_port(), free_port()
    (deployment.root / "nginx").mkdir()
    conf = deployment.root / "nginx" / "nginx.conf"
    conf.write_text(_proxy_config(deployment, listen, health))
    nginx = shutil.which("nginx")
    checked = subprocess.run(
        [nginx, "-t", "-c", str(conf), "-e", str(conf.parent / "error.log")],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    assert checked.returncode == 0, checked.stderr
    proxy, log = deployment.start([nginx, "-c", str(conf), "-e", str(conf.parent / "error.log")], "nginx.log")
    ca, base = deployment.creds.ca_cert, f"https://localhost:{listen}"
    wait_until(lambda: healthy(listen, ca), "proxied /health", 60, proxy, log)
    assert http_get(f"http://127.0.0.1:{health}/nginx-health", None) == 200
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/get-nodes", "/docs"):
        assert http_post(base + path, ca) == 404, path
    assert http_post(base + "/v1/fleet/get-run", ca) not in (403, 404)  # reaches the SuperLink (bad body)

    site, site_log = deployment.supernode("site-c", f"localhost:{listen}")
    wait_until(
        lambda: node_id(site_log) is not None, "SuperNode activation via the proxy", 120, site, site_log
    )
    access = (conf.parent / "access.log").read_text(encoding="utf-8")
    assert "POST /v1/fleet/activate-node" in access
