"""What the benchmark scripts share: the machine they ran on, workers in fresh processes and the report file.

The scripts import it as ``harness`` (a script's own folder comes first on ``sys.path``); it imports nothing
from the repository's packages, so the scripts can put the repository on ``sys.path`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "REPO",
    "Conditions",
    "interleaved",
    "machine",
    "measurement_parser",
    "run_measurements",
    "run_worker",
    "write_report",
]

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """The CPU, the CPUs this process may use, and the torch and Python versions."""
    import torch

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


@dataclass(frozen=True)
class Conditions:
    """The load average and the clock when a benchmark started (made at its start)."""

    load_before: tuple[float, float, float] = field(default_factory=os.getloadavg)
    started: float = field(default_factory=time.time)

    def report(self) -> dict[str, Any]:
        """The command line, the machine, the load average before and now, and the wall time so far (s)."""
        return {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(),
            "load_average_1_5_15min": {"before": self.load_before, "after": os.getloadavg()},
            "wall_seconds": time.time() - self.started,
        }


def run_worker(
    script: str, arguments: Sequence[str], *, what: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``script --worker ARGUMENTS`` in a fresh Python process; return the JSON of its last output line."""
    command = [sys.executable, str(Path(script).resolve()), "--worker", *arguments]
    result = subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=REPO, env=env
    )
    if result.returncode != 0:
        raise RuntimeError(f"benchmark worker {what} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def interleaved(
    repeats: int, modes: Sequence[str], variants: Sequence[str]
) -> Iterator[tuple[int, str, str]]:
    """(repeat, mode, variant) for every measurement; the variants' order alternates between repeats."""
    for repeat in range(repeats):
        for mode in modes:
            yield from ((repeat, mode, v) for v in (variants if repeat % 2 == 0 else variants[::-1]))


def measurement_parser(
    doc: str, *, out: str, hidden_choices: dict[str, Sequence[str]]
) -> argparse.ArgumentParser:
    """Options of a benchmark that measures in fresh worker processes: ``--out`` (default
    ``benchmarks/results/OUT``), ``--config``, ``--repeats``, ``--threads``, ``--seed``, and the hidden
    ``--worker`` with the choices it is given (``hidden_choices``: flag -> choices)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / out)
    parser.add_argument("--config", default="vit_b_ori", help="SAM-Med3D preset (default vit_b_ori)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag, choices in hidden_choices.items():
        parser.add_argument(flag, choices=choices, help=argparse.SUPPRESS)
    return parser


def run_measurements(
    args: argparse.Namespace,
    *,
    worker: Callable[[argparse.Namespace], None],
    run: Callable[[argparse.Namespace], dict[str, Any]],
) -> dict[str, Any] | None:
    """In a worker process (``--worker``) run ``worker``; otherwise run ``run`` and write its report to
    ``args.out``. Returns the report (None in a worker). The repository goes on ``sys.path`` first."""
    if str(REPO) not in sys.path:  # run as a script from anywhere: import the repository's packages
        sys.path.insert(0, str(REPO))
    if args.worker:
        worker(args)
        return None
    report = run(args)
    write_report(args.out, report)
    return report


def write_report(out: Path, report: dict[str, Any], *, indent: int = 2) -> None:
    """Write ``report`` as JSON to ``out`` (its folder is created)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=indent) + "\n", encoding="utf-8")
