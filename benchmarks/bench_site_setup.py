"""Benchmark: a site's setup per message, beyond Flower's own process start (issue 14 item 4).

What a message costs a site before it trains or evaluates: importing the handler module (``client.app``, with
torch, PEFT and MONAI; Flower's own imports are timed apart and not counted), opening the base (load, and
fingerprint unless a recorded stamp or the process cache holds it), opening the validated site, and building
the models with the global adapter applied. Measured for the small test base and for a ``vit_b_ori``-sized base
with random weights (both made with :func:`shared.base.build_random_base` in a temporary folder; nothing is
downloaded), on one synthetic site:

* ``cold``: a fresh process per message (deployment with ``isolation=subprocess``); the site's state folder
  already holds the recorded base fingerprints and validation results (every message after the run's first).
* ``cold query``: the same for the handshake, which hashes the weights again.
* ``cold first``: a fresh process and an empty state folder (a site's very first message).
* ``warm``: further messages in the same process (simulation's actors), median of the rest.
* ``before``: what each message did before the caches (load and hash the base, validate the site without a
  cache, build the models), cold and warm. It validates the site once per message; the old ``open_site``
  validated it three times, so these rows understate the old cost.

Not a test: run it by hand.

    .venv/bin/python benchmarks/bench_site_setup.py --out benchmarks/results/site_setup.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import REPO, Conditions, run_worker, write_report

BASES = {
    "small": {"sam_config": "small", "cls_depth": 18},
    "vit_b_ori": {"sam_config": "vit_b_ori", "cls_depth": 50},
}
PHASES = ("import_s", "base_s", "site_s", "models_s")


# ---------------------------------------------------------------------------------------------- the worker


def _worker(args: argparse.Namespace) -> None:
    """One process: import the handler module, then set up ``--messages`` train messages; prints JSON."""
    started = time.perf_counter()
    import flwr.app  # noqa: F401  (Flower's own process start, not counted)
    import flwr.clientapp  # noqa: F401

    flower = time.perf_counter()
    import client.app  # noqa: F401  (the handler module and all it imports)

    imported = time.perf_counter()
    from safetensors.torch import load_file

    from shared.protocol import adapter_to_record

    record = adapter_to_record(load_file(str(args.adapter)))
    messages = [_message(args, record) for _ in range(args.messages)]
    import resource

    result = {
        "flower_import_s": flower - started,
        "import_s": imported - flower,
        "messages": messages,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result))


def _message(args: argparse.Namespace, record: Any) -> dict[str, float]:
    """The setup of one message (``--mode cached``: the code in use; ``before``: without the caches, training
    the loaded base itself as the old code did)."""
    import client.task as task
    from shared.base import load_base
    from shared.config import load_config
    from shared.training.site import open_site

    config = load_config({"model.cls-depth": 18})
    settings = task.SiteSettings(args.site_dir, None, args.base, "cpu", args.state_dir)
    before = args.mode == "before"
    times = {}
    start = time.perf_counter()
    base = load_base(args.base) if before else task.base_of(settings, config, trust_stamp=not args.query)
    times["base_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if before:
        open_site(args.site_dir, val_fraction=config.data.val_fraction, seed=config.train.seed)
    else:
        task.open_site_of(settings, config, run="1")
    times["site_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if before:
        task.working_copy, kept = (lambda base, specs, **_: base), task.working_copy
        task._models(base, config, record)
        task.working_copy = kept
    else:
        task._models(base, config, record)
    times["models_s"] = time.perf_counter() - start
    return times


def _run_worker(base: Path, site: Path, state: Path, adapter: Path, *, mode: str, messages: int, query=False):
    arguments = [
        "--base", str(base),
        "--site-dir", str(site),
        "--state-dir", str(state),
        "--adapter", str(adapter),
        "--mode", mode,
        "--messages", str(messages),
    ]  # fmt: skip
    arguments += ["--query"] if query else []
    return run_worker(__file__, arguments, what=mode, env={**os.environ, "PYTHONPATH": str(REPO)})


# ---------------------------------------------------------------------------------------------- the driver


def prepare_base(tmp: Path, name: str) -> tuple[Path, Path]:
    """Save base ``name`` and a global adapter that fits it; returns (base path, adapter file)."""
    from safetensors.torch import save_file

    from shared.adapters import extract_adapter, lora_specs_from_config
    from shared.base import build_random_base, save_base, working_copy, wrap_for_training
    from shared.config import load_config

    base = build_random_base(**BASES[name], seed=0)
    path = save_base(base, tmp / name)
    specs = lora_specs_from_config(load_config({}).adapter)
    adapter = extract_adapter(
        wrap_for_training(working_copy(base, specs), specs), base_fingerprints=base.fingerprints
    )
    save_file(adapter.tensors, str(tmp / f"{name}-adapter.safetensors"))
    return path, tmp / f"{name}-adapter.safetensors"


def _total(worker: dict[str, Any], message: int, *, cold: bool) -> dict[str, float]:
    """Seconds of one message's phases; the handler import counts for a cold (first in process) message."""
    phases = dict(worker["messages"][message])
    phases["import_s"] = worker["import_s"] if cold else 0.0
    phases["total_s"] = sum(phases[k] for k in PHASES)
    return phases


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in (*PHASES, "total_s")}


def _measure(
    tmp: Path, name: str, site: Path, repeats: int, warm_messages: int, *, before: bool = True
) -> dict[str, Any]:
    base, adapter = prepare_base(tmp, name)
    state = tmp / f"state-{name}"
    rows: dict[str, list[dict[str, float]]] = {}
    rss: dict[str, float] = {}

    def record(case: str, worker: dict[str, Any], message: int, cold: bool) -> None:
        rows.setdefault(case, []).append(_total(worker, message, cold=cold))
        rss[case] = max(rss.get(case, 0.0), worker["max_rss_mib"])

    for _ in range(repeats):
        shutil.rmtree(state, ignore_errors=True)
        record("cold first", _run_worker(base, site, state, adapter, mode="cached", messages=1), 0, True)
        record("cold", _run_worker(base, site, state, adapter, mode="cached", messages=1), 0, True)
        record(
            "cold query",
            _run_worker(base, site, state, adapter, mode="cached", messages=1, query=True),
            0,
            True,
        )
        warm = _run_worker(base, site, state, adapter, mode="cached", messages=warm_messages)
        for message in range(1, warm_messages):
            record("warm", warm, message, False)
        if before:
            old = _run_worker(base, site, state, adapter, mode="before", messages=warm_messages)
            record("before cold", old, 0, True)
            for message in range(1, warm_messages):
                record("before warm", old, message, False)
    return {
        "base_bytes": base.stat().st_size,
        "median": {case: _median(r) for case, r in rows.items()},
        "max_rss_mib": {case: round(v) for case, v in rss.items()},
        "runs": rows,
    }


def site_parser(doc: str, *, out: str, repeats: int) -> argparse.ArgumentParser:
    """The options of a benchmark over the bases on one site: ``--out`` (``benchmarks/results/OUT``),
    ``--bases``, ``--repeats``, and the hidden ones of its worker (``--worker``, the base, site, state folder and
    adapter)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / out)
    parser.add_argument("--bases", default="small,vit_b_ori", help="comma-separated: small, vit_b_ori")
    parser.add_argument("--repeats", type=int, default=repeats, help="fresh-process measurements per case")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for option in ("--base", "--site-dir", "--state-dir", "--adapter"):
        parser.add_argument(option, type=Path, help=argparse.SUPPRESS)
    return parser


def main() -> int:
    parser = site_parser(__doc__, out="site_setup.json", repeats=3)
    parser.add_argument(
        "--warm-messages", type=int, default=4, help="messages per warm process (first is cold)"
    )
    parser.add_argument(
        "--no-before", action="store_true", help="skip the rows of the code before the caches"
    )
    parser.add_argument("--mode", default="cached", help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--query", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return 0
    sys.path.insert(0, str(REPO))
    from shared.data.synth import generate_consortium

    conditions = Conditions()
    with tempfile.TemporaryDirectory(prefix="fedabus-bench-") as tmp:
        site = generate_consortium(Path(tmp) / "sites", sites=1, cases=6, seed=11)[0]
        results = {
            name: _measure(Path(tmp), name, site, args.repeats, args.warm_messages, before=not args.no_before)
            for name in args.bases.split(",")
        }
    report = {"site_cases": 6, "target_s": 1.0, "bases": results, **conditions.report()}
    write_report(args.out, report, indent=1)
    print(json.dumps({name: r["median"] for name, r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
