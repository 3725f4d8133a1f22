"""``fedabus demo``: the main job on embedded defaults — a simulated multi-site federation with local MLflow.

Steps: generate a synthetic consortium (sites in both data layouts, each with its own domain shift), make or
reuse the cached pretrained demo base, run a Flower simulation (a managed local SuperLink, one simulated
SuperNode per site) for a few rounds, then print every site's Dice, HD95 and AUC before and after federation
and where the MLflow run is. All output goes under ``--out`` (never inside the app folder, which Flower
bundles); the Flower home used is ``OUT/flwr-home``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["app_dir", "print_site_table", "register", "run_demo"]

TABLE_METRICS = (
    ("test/dice_1click", "Dice@1"),
    ("test/dice", "Dice@N"),
    ("test/hd95_mm", "HD95 mm"),
    ("test/auc", "AUC e2e"),
    ("test/auc_gt_planes", "AUC GT planes"),
)


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


#: The managed local SuperLink of Flower's simulation serves its control API on this fixed port.
LOCAL_SUPERLINK_PORT = 39091


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


def _flwr_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Simulated sites run side by side with one CPU each; torch's default thread pool per site would
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


def _parse_sets(items: list[str]) -> dict[str, object]:
    """``--set key=value`` options as run-config overrides (values parsed as TOML, else kept as strings)."""
    import tomllib

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.seg-lr=1e-3")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def print_site_table(summary: dict, *, file=sys.stdout) -> None:
    """Per-site metrics before and after federation."""
    before, after = summary.get("before", {}), summary.get("after", {})
    sites = sorted(set(before) | set(after))
    header = f"{'site':10s} " + " ".join(f"{label:>17s}" for _, label in TABLE_METRICS)
    print(header, file=file)
    print(f"{'':10s} " + " ".join(f"{'before -> after':>17s}" for _ in TABLE_METRICS), file=file)
    for site in sites:
        cells = []
        for key, _ in TABLE_METRICS:
            b, a = before.get(site, {}).get(key, math.nan), after.get(site, {}).get(key, math.nan)
            cells.append(f"{b:7.3f} -> {a:6.3f}")
        print(f"{site:10s} " + " ".join(f"{c:>17s}" for c in cells), file=file)


def run_demo(args: argparse.Namespace) -> int:
    from shared.config import load_config
    from shared.data.synth import generate_consortium
    from shared.pretrain import ensure_base

    out = Path(args.out).expanduser().resolve()
    app = app_dir()
    if out == app or app in out.parents:
        raise SystemExit(
            f"--out {out} is inside the app folder {app}; Flower would bundle it. Pick another folder."
        )
    started = time.monotonic()
    sites_dir = out / "sites"
    if args.fresh and out.exists():
        shutil.rmtree(out)
    print(f"[1/4] synthetic consortium: {args.sites} sites x {args.cases} cases -> {sites_dir}")
    generate_consortium(sites_dir, sites=args.sites, cases=args.cases, seed=args.seed)
    config = load_config({"model.cls-depth": 18, "train.progress": False})
    print("[2/4] pretrained demo base (cached after the first run)")
    base_path = Path(args.base).resolve() if args.base else ensure_base(config)
    flwr_home = out / "flwr-home"
    connection = write_local_connection(flwr_home)
    work = out / "server"
    overrides = {
        "num-server-rounds": args.rounds,
        "model.base-path": str(base_path),
        "federation.sites-dir": str(sites_dir),
        "federation.work-dir": str(work),
        "federation.min-sites": args.sites,
        "federation.resume": False,
        "federation.sample-timeout": 120.0,
        "federation.round-timeout": 900.0,
        "train.seg-epochs": args.local_epochs,
        "train.cls-epochs": args.local_epochs,
        # A few CPU epochs need larger steps than the seed's GPU schedule (configs/local-demo.toml).
        "train.seg-lr": 3e-3,
        "train.cls-lr": 5e-3,
        "train.eval-clicks": 3,
        **_parse_sets(args.set),
    }
    if work.exists():
        shutil.rmtree(work)
    command = [
        "flwr",
        "run",
        str(app),
        connection,
        "--stream",
        *run_config_overrides(overrides),
        "--federation-config",
        f"num-supernodes={args.sites} client-resources-num-cpus=1",
    ]
    print(f"[3/4] federation: {args.rounds} rounds, {args.sites} simulated sites (Flower simulation)")
    before = _listening_pids(LOCAL_SUPERLINK_PORT)
    env = _flwr_env(flwr_home)
    try:
        result = subprocess.run(command, env=env, cwd=out, check=False)
    finally:
        started_here = _listening_pids(LOCAL_SUPERLINK_PORT) - before
        if not args.keep_superlink:
            _stop_local_superlink(started_here)
    summary_path = work / "summary.json"
    if result.returncode != 0 or not summary_path.is_file():
        print(f"federation failed (exit {result.returncode}); see the log above", file=sys.stderr)
        return 1
    import json

    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    print(
        f"\n[4/4] results after {summary.get('rounds_done')} rounds ({time.monotonic() - started:.0f} s in all)\n"
    )
    print_site_table(summary)
    print(f"\n{summary.get('mlflow', '')}")
    print(f"Final global adapter: {work / 'final_adapter.safetensors'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a simulated multi-site federation on synthetic data and print per-site results",
        description=__doc__,
    )
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--cases", type=int, default=20, help="cases per site")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=3, help="local epochs per round (both models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=Path, help="use this base instead of the cached pretrained demo base")
    parser.add_argument("--out", type=Path, default=Path.home() / ".fedabus" / "demo")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra run-config value (repeatable)"
    )
    parser.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running")
    parser.set_defaults(func=run_demo)
