"""docker/ and docs/deployment.md checked without a Docker engine.

The compose file, the nginx fleet proxy, the Dockerfiles and the documented commands are checked against each
other and against the installed Flower 1.41 itself: its SuperLink routes, its argument parsers and its CLI.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
PROXY_CONF = DOCKER / "nginx" / "fleet-proxy.conf"
SITES = ("site-a", "site-b", "site-c")
LONG_RUNNING = ("superlink", "fleet-proxy", "mlflow", *SITES)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


# ------------------------------------------------------------------------------------------- nginx parsing


@dataclass
class Directive:
    name: str
    args: list[str]
    children: list[Directive] = field(default_factory=list)

    def find(self, name: str) -> Iterator[Directive]:
        for child in self.children:
            if child.name == name:
                yield child
            yield from child.find(name)


def _parse_nginx(text: str) -> Directive:
    """Minimal nginx config parser: directives with arguments and nested blocks (no includes needed)."""
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|[{};]|[^\s{};]+', re.sub(r"#[^\n]*", "", text))
    root = Directive("root", [])
    stack, current = [root], []
    for token in tokens:
        if token in (";", "{"):
            directive = Directive(current[0], [a.strip("\"'") for a in current[1:]])
            stack[-1].children.append(directive)
            if token == "{":
                stack.append(directive)
            current = []
        elif token == "}":
            stack.pop()
        else:
            current.append(token)
    assert len(stack) == 1 and not current, "unbalanced nginx config"
    return root


def _fleet_server(conf: Directive) -> Directive:
    servers = [s for s in conf.find("server") if any("ssl" in d.args for d in s.find("listen"))]
    assert len(servers) == 1
    return servers[0]


def _select_location(server: Directive, path: str) -> Directive | None:
    """The location nginx picks for ``path``: exact, then longest prefix (^~ stops), then regexes in order."""
    locations = [d for d in server.children if d.name == "location"]
    exact = [loc for loc in locations if loc.args[0] == "=" and loc.args[1] == path]
    if exact:
        return exact[0]
    prefixes = [loc for loc in locations if len(loc.args) == 1 or loc.args[0] == "^~"]
    matching = [loc for loc in prefixes if path.startswith(loc.args[-1])]
    longest = max(matching, key=lambda loc: len(loc.args[-1]), default=None)
    if longest is not None and longest.args[0] == "^~":
        return longest
    for loc in locations:
        if loc.args[0] in ("~", "~*"):
            flags = re.IGNORECASE if loc.args[0] == "~*" else 0
            if re.search(loc.args[1], path, flags):
                return loc
    return longest


def _proxies(location: Directive | None) -> bool:
    return location is not None and any(True for _ in location.find("proxy_pass"))


@pytest.fixture(scope="module")
def superlink_routes(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Every HTTP path the installed Flower SuperLink serves (path parameters filled in)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))
    try:
        from fastapi.routing import iter_route_contexts
        from flwr.superlink.main import create_app

        app = create_app()
        paths = {context.route.path for context in iter_route_contexts(app.routes)}
    finally:
        mp.undo()
    return sorted(re.sub(r"\{[^}]+\}", "x", p) for p in paths)


def test_proxy_forwards_exactly_the_fleet_api_and_health(superlink_routes: list[str]) -> None:
    server = _fleet_server(_parse_nginx(PROXY_CONF.read_text(encoding="utf-8")))
    fleet = {p for p in superlink_routes if p.startswith("/v1/fleet/")}
    assert len(fleet) >= 10, superlink_routes
    assert any(p.startswith("/v1/control/") for p in superlink_routes)
    forwarded = {p for p in superlink_routes if _proxies(_select_location(server, p))}
    assert forwarded == fleet | {"/health"}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/start-run",
        "/v1/control/register-node",
        "/v1/runtime/pull-task-input",
        "/docs",
        "/openapi.json",
        "/",
        "/v1/fleet/",
        "/v1/fleet/pull-messages/extra",
        "/v1/fleet/../control/start-run",
        "/v1/fleetx/pull-messages",
    ],
)
def test_proxy_blocks_everything_else(path: str) -> None:
    server = _fleet_server(_parse_nginx(PROXY_CONF.read_text(encoding="utf-8")))
    location = _select_location(server, path)
    assert not _proxies(location)
    assert location is not None and next(location.find("return")).args[0] == "404"


def test_proxy_fleet_location_is_post_only_and_forwards_the_normalised_path() -> None:
    server = _fleet_server(_parse_nginx(PROXY_CONF.read_text(encoding="utf-8")))
    fleet = _select_location(server, "/v1/fleet/pull-messages")
    assert fleet is not None
    assert [d.args for d in fleet.find("limit_except")] == [["POST"]]
    assert next(fleet.find("proxy_pass")).args[0].endswith("$uri")
    health = _select_location(server, "/health")
    assert health is not None and [d.args for d in health.find("limit_except")] == [["GET"]]


def test_proxy_verifies_the_superlink_and_uses_the_generated_credentials(services: dict) -> None:
    conf = _parse_nginx(PROXY_CONF.read_text(encoding="utf-8"))
    server = _fleet_server(conf)
    values = {d.name: d.args for d in server.children if not d.children}
    assert values["proxy_ssl_verify"] == ["on"]
    assert values["proxy_ssl_trusted_certificate"] == ["/certs/ca.crt"]
    assert values["ssl_certificate"] == ["/certs/superlink.crt"]
    assert values["ssl_certificate_key"] == ["/certs/superlink.key"]
    assert "credentials:/certs:ro" in services["fleet-proxy"]["volumes"]


# ------------------------------------------------------------------------------------------- compose


def test_every_service_has_a_buildable_or_pinned_image(services: dict) -> None:
    assert set(LONG_RUNNING) <= set(services)
    for name, service in services.items():
        assert service.get("image"), name
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == REPO, name
            assert (context / build["dockerfile"]).is_file(), name
        else:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), name


def _published(service: dict) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_coordinator_api_is_never_on_the_sites_network(compose: dict, services: dict) -> None:
    assert compose["networks"]["coordinator"]["internal"] is True
    on_sites = {name for name, s in services.items() if "sites" in s.get("networks", [])}
    assert on_sites == {"fleet-proxy", *SITES}
    for site in SITES:
        assert services[site]["networks"] == ["sites"]
    assert "sites" not in services["superlink"]["networks"]
    for name, service in services.items():
        for port in _published(service):
            if name != "fleet-proxy":
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert _published(services["superlink"]) == ["127.0.0.1:8000:8000"]


def test_site_data_is_mounted_read_only(services: dict) -> None:
    for site in SITES:
        data = [v for v in services[site]["volumes"] if isinstance(v, dict) and v["target"] == "/data"]
        assert (
            len(data) == 1
            and data[0]["read_only"] is True
            and data[0]["source"].endswith(site.replace("-", "_"))
        ), site
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and volume.startswith("credentials:") and name != "credentials":
                assert volume.endswith(":ro"), (name, volume)


def test_long_running_services_have_healthchecks_and_run_unprivileged(services: dict) -> None:
    for name in LONG_RUNNING:
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    assert services["fleet-proxy"]["user"] == "49999:49999"
    for dockerfile in ("Dockerfile.server", "Dockerfile.site"):
        assert "USER 49999:49999" in (DOCKER / dockerfile).read_text(encoding="utf-8")


def _flag(command: list[str], name: str) -> str:
    values = [c.split("=", 1)[1] for c in command if c.startswith(f"{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


def test_ports_and_names_agree_across_files(services: dict) -> None:
    conf = _parse_nginx(PROXY_CONF.read_text(encoding="utf-8"))
    superlink = services["superlink"]["command"]
    port = _flag(superlink, "--port")
    assert port == "8000" and _flag(superlink, "--host") == "0.0.0.0"
    assert [d.args for d in conf.find("upstream")] == [["superlink_fleet"]]
    assert [d.args for d in next(conf.find("upstream")).find("server")] == [[f"superlink:{port}"]]
    assert f"https://localhost:{port}/health" in services["superlink"]["healthcheck"]["test"]
    assert services["register-sites"]["environment"]["SUPERLINK_ADDRESS"] == f"superlink:{port}"
    assert services["register-sites"]["command"] == list(SITES) == services["credentials"]["command"]

    listen = next(_fleet_server(conf).find("listen")).args
    assert listen == ["8443", "ssl"]
    assert _published(services["fleet-proxy"]) == ["8443:8443"]
    names = (DOCKER / "scripts" / "demo-credentials.sh").read_text(encoding="utf-8")
    assert "--server-name superlink" in names and "--server-name fleet-proxy" in names
    for site in SITES:
        command = services[site]["command"]
        assert _flag(command, "--superlink") == "fleet-proxy:8443"
        assert _flag(command, "--auth-supernode-private-key") == f"/credentials/sites/{site}/{site}.key"
        assert _flag(command, "--node-config") == f'data-path="/data" site-id="{site}"'

    mlflow = services["mlflow"]["command"]
    assert _flag(mlflow, "--port") == "5000" and _flag(mlflow, "--workers") == "1"
    assert services["superlink"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "mlflow:5000" in _flag(mlflow, "--allowed-hosts").split(",")
    assert _flag(mlflow, "--backend-store-uri").startswith("sqlite:////mlflow/")


def test_compose_commands_parse_with_the_installed_flower(services: dict) -> None:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    superlink = _parse_args_run_superlink().parse_args(services["superlink"]["command"])
    assert superlink.enable_supernode_auth and not superlink.insecure
    assert superlink.database == "/var/lib/fedabus/state.db"
    assert superlink.runtime_dependency_install is False
    for site in SITES:
        supernode = _parse_args_run_supernode().parse_args(services[site]["command"])
        assert not supernode.insecure and supernode.root_certificates.endswith("ca.crt")
        assert f"http://127.0.0.1:{supernode.port}/health" in services[site]["healthcheck"]["test"]


def test_mlflow_command_parses_with_the_installed_mlflow(services: dict) -> None:
    from mlflow.cli import server

    assert services["mlflow"]["entrypoint"] == ["mlflow", "server"]
    context = server.make_context("server", list(services["mlflow"]["command"]))
    assert context.params["workers"] == "1"


# ------------------------------------------------------------------------------------------- Dockerfiles


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.site"])
def test_dockerfile_copies_files_that_exist(name: str) -> None:
    copies = [args for kind, args in _instructions(DOCKER / name) if kind == "COPY"]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for source in parts[:-1]:
            assert (REPO / source).exists(), f"{name}: COPY source {source} missing from the repository"


@pytest.mark.parametrize(
    ("name", "entrypoint"),
    [("Dockerfile.server", "flower-superlink"), ("Dockerfile.site", "flower-supernode")],
)
def test_dockerfile_entrypoint_and_torch_pin(name: str, entrypoint: str) -> None:
    instructions = _instructions(DOCKER / name)
    assert ("ENTRYPOINT", f'["{entrypoint}"]') in instructions
    runs = " ".join(args for kind, args in instructions if kind == "RUN")
    assert '-c constraints.txt "torch==2.13.0"' in runs
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text(encoding="utf-8")
    assert instructions[0][1].startswith("PYTHON_IMAGE=python:3.11")


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.site"])
def test_dockerignore_keeps_the_venv_and_secrets_out(name: str) -> None:
    lines = (DOCKER / f"{name}.dockerignore").read_text(encoding="utf-8").split()
    assert lines.index("*") < lines.index("!shared")
    assert not [line for line in lines if line.startswith("!") and ("venv" in line or "cert" in line)]


def test_helper_scripts_are_valid_shell_and_executable() -> None:
    for script in sorted((DOCKER / "scripts").glob("*.sh")):
        assert script.stat().st_mode & 0o111, script
        subprocess.run(["sh", "-n", str(script)], check=True)


# ------------------------------------------------------------------------------------------- docs


def _shell_commands(markdown: str) -> list[list[str]]:
    """Commands in the ```bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_documented_superlink_and_supernode_commands_parse_with_flower() -> None:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    commands = _shell_commands((REPO / "docs" / "deployment.md").read_text(encoding="utf-8"))
    superlinks = [c[1:] for c in commands if c[0] == "flower-superlink"]
    supernodes = [c[1:] for c in commands if c[0] == "flower-supernode"]
    assert superlinks and supernodes
    for argv in superlinks:
        args = _parse_args_run_superlink().parse_args(argv)
        assert args.enable_supernode_auth and args.database.endswith(".db") and args.ssl_ca_certfile
    for argv in supernodes:
        args = _parse_args_run_supernode().parse_args(argv)
        assert args.root_certificates and args.auth_supernode_private_key and "data-path=" in args.node_config


def _resolve_click(argv: list[str], parsed: list[str]) -> None:
    """Parse a ``flwr ...`` command line with Flower's own click/typer command tree (raises on bad usage)."""
    import typer
    from flwr.cli.app import app

    command: click.Command = typer.main.get_command(app)
    context = command.make_context("flwr", list(argv), resilient_parsing=False)
    while isinstance(command, click.Group):
        with warnings.catch_warnings():  # click 8.2 deprecates protected_args; 9.0 keeps all in args
            warnings.simplefilter("ignore", DeprecationWarning)
            remaining = [*context.protected_args, *context.args]
        if not remaining:
            break
        name, *rest = remaining
        sub = command.get_command(context, name)
        assert sub is not None, f"flwr has no command {name!r} in {argv}"
        command, context = sub, sub.make_context(name, rest, parent=context)
    parsed.append(context.command_path)


def test_documented_flwr_commands_parse_with_flower() -> None:
    parsed: list[str] = []
    for source in (REPO / "docs" / "deployment.md", DOCKER / "README.md"):
        for words in _shell_commands(source.read_text(encoding="utf-8")):
            if words[0] == "flwr":
                _resolve_click([w.replace("RUN_ID", "1").replace("NODE_ID", "1") for w in words[1:]], parsed)
    assert {"flwr run", "flwr supernode register", "flwr list", "flwr log", "flwr stop"} <= set(parsed)
    for argv in (["supernode", "register", "k.pub", "x", "--nme", "a"], ["runn", "."]):
        with pytest.raises((click.UsageError, AssertionError)):
            _resolve_click(argv, [])
