"""Run a federation in Flower's simulation engine, as ``flwr run`` with a managed local SuperLink does.

Used by ``fedabus demo`` and by the federated arms of ``fedabus study``. The run's Flower home is a folder of the
caller's (never the user's ``~/.flwr``). Flower's managed local SuperLink listens on a fixed port (39091, control
API 39093) unless ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``/``FLWR_LOCAL_CONTROL_API_PORT`` name others; each run
here gets its own free ports, so simulations can run side by side, and its SuperLink is stopped afterwards.
``keep_superlink`` keeps Flower's default ports instead, so that ``flwr`` commands find the SuperLink later.
Run-config values go in as one ``-c`` string (:func:`run_config_overrides`).

Flower gives its managed SuperLink a fixed 15 s to start; on a heavily loaded machine it can miss that (Python
alone may take longer to import Flower), and ``flwr run`` then fails before any round. :func:`run_simulation`
starts the run again in that one case (:data:`SUPERLINK_START_ATTEMPTS` in all), saying so.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from shared.noise import pythonwarnings

__all__ = [
    "LOCAL_SUPERLINK_PORT",
    "SUPERLINK_START_ATTEMPTS",
    "SUPERLINK_START_FAILED",
    "app_dir",
    "local_superlink_ports",
    "run_config_overrides",
    "run_simulation",
    "ray_cpus",
    "write_local_connection",
]


def app_dir() -> Path:
    """The Flower app folder (the checkout holding pyproject.toml)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise RuntimeError(f"{root}: no pyproject.toml; run the demo from a fedabus source checkout")
    return root


def _listening_pids(port: int) -> set[int]:
    import psutil

    pids = set()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            pids.add(conn.pid)
    return pids


#: Flower's default port for the managed local SuperLink (its HTTP API); the control API is on 39093.
LOCAL_SUPERLINK_PORT = 39091
_PORT_VARIABLES = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_superlink_ports(env: dict[str, str], *, private: bool) -> dict[str, str]:
    """The port variables Flower's CLI reads for its managed local SuperLink: those already in ``env`` win; with
    ``private`` the others are free ports of this machine, else Flower's defaults apply (nothing set)."""
    chosen = {name: env[name] for name in _PORT_VARIABLES if env.get(name)}
    if private:
        for name in _PORT_VARIABLES:
            chosen.setdefault(name, str(_free_port()))
    return chosen


def _stop_local_superlink(pids: set[int]) -> None:
    """Stop the managed local SuperLink processes this demo started (never one that was already running),
    with their child processes (the SuperExec and simulation runtimes)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        proc.kill()


def ray_cpus(sites: int, cpus: int | None = None) -> int:
    """The logical CPUs Ray is started with (``init-args-num-cpus``), so that every site of a small federation
    trains at once: with one CPU per site (``client-resources-num-cpus = 1``; Flower takes only whole CPUs there)
    Flower runs that many actors, here ``max(cpus, min(sites, 2 * cpus))``: one torch thread each, at most two
    per core (each actor holds its own copy of the models).

    With Ray's own count, 3 sites on 2 cores trained in two waves and the third site trained alone while a core
    idled: a round lasted two sites' training instead of one and a half (docs/performance.md, "The demo's
    budget"). Which actor runs a site does not change its result."""
    if cpus is None:
        cpus = os.cpu_count() or 1  # what Ray counts on a machine without CPU limits
    return max(cpus, min(sites, 2 * cpus))


def flwr_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONWARNINGS"] = pythonwarnings(env.get("PYTHONWARNINGS", ""))
    # Simulated sites run side by side with one torch thread each; torch's default thread pool per site would
    # oversubscribe the cores and slow every site down several times.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def write_local_connection(flwr_home: Path, name: str = "fedabus-local") -> str:
    """A ``config.toml`` whose connection ``name`` is Flower's managed local simulation."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = ":local:"\n', encoding="utf-8"
    )
    return name


def run_config_overrides(values: dict[str, object]) -> list[str]:
    """``-c`` arguments for ``flwr run``: ONE string of ``key=value`` pairs (TOML values).

    Flower 1.41 merges repeated ``-c`` options with a shallow dict update, so ``-c a.x=1 -c a.y=2`` would
    keep only ``a.y``; a single string keeps every key.
    """
    pairs = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            if '"' in str(value):
                raise ValueError(f"run config value {value!r} of {key} may not contain a double quote")
            text = f'"{value}"'
        pairs.append(f"{key}={text}")
    return ["-c", " ".join(pairs)]


#: What ``flwr run`` prints when its managed SuperLink did not answer within Flower's start-up timeout.
SUPERLINK_START_FAILED = "Failed to start local SuperLink"
#: ``flwr run`` attempts when the managed SuperLink fails to start (module docstring); nothing else is retried.
SUPERLINK_START_ATTEMPTS = 3


def run_simulation(
    overrides: dict[str, object],
    *,
    sites: int,
    flwr_home: Path,
    cwd: Path,
    keep_superlink: bool = False,
    on_line: Callable[[str], None] | None = None,
    log_path: Path | None = None,
) -> int:
    """``flwr run`` of the app on ``sites`` simulated SuperNodes (one CPU each of :func:`ray_cpus`) with ``overrides``; returns its
    exit code. Without ``on_line``/``log_path`` the output streams to this console; with them every line goes
    to ``log_path`` and ``on_line`` sees it (e.g. to relay the per-round progress)."""
    connection = write_local_connection(flwr_home)
    command = [
        "flwr",
        "run",
        str(app_dir()),
        connection,
        "--stream",
        *run_config_overrides(overrides),
        "--federation-config",
        f"num-supernodes={sites} client-resources-num-cpus=1 init-args-num-cpus={ray_cpus(sites)}",
    ]
    env = flwr_env(flwr_home)
    env.update(local_superlink_ports(env, private=not keep_superlink))
    port = int(env.get(_PORT_VARIABLES[0], LOCAL_SUPERLINK_PORT))
    before = _listening_pids(port)
    try:
        for attempt in range(1, SUPERLINK_START_ATTEMPTS + 1):
            failed_start: list[str] = []
            code = _run_logged(command, env, cwd, _watcher(on_line, log_path, failed_start), log_path)
            if code == 0 or not failed_start or attempt == SUPERLINK_START_ATTEMPTS:
                return code
            _watcher(on_line, log_path, [])(
                f"fedabus: Flower's local SuperLink did not start in time (machine busy?); "
                f"starting the run again ({attempt + 1}/{SUPERLINK_START_ATTEMPTS})"
            )
        return code
    finally:
        started_here = _listening_pids(port) - before
        if not keep_superlink:
            _stop_local_superlink(started_here)


def _watcher(
    on_line: Callable[[str], None] | None, log_path: Path | None, failed_start: list[str]
) -> Callable[[str], None]:
    """What sees each output line of ``flwr run``: notes a failed SuperLink start in ``failed_start``, then hands
    the line to ``on_line``, or prints it when neither ``on_line`` nor ``log_path`` is given."""

    def watch(line: str) -> None:
        if SUPERLINK_START_FAILED in line:
            failed_start.append(line)
        if on_line is not None:
            on_line(line)
        elif log_path is None:
            print(line, flush=True)

    return watch


def _run_logged(
    command: list[str],
    env: dict[str, str],
    cwd: Path,
    on_line: Callable[[str], None] | None,
    log_path: Path | None,
) -> int:
    log = log_path.open("a", encoding="utf-8") if log_path is not None else None
    try:
        with subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                if log is not None:
                    log.write(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            return process.wait()
    finally:
        if log is not None:
            log.close()
