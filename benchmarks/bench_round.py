"""Benchmark: the anatomy of a federated round at one site (issue 18 item 2).

Where a site's time goes in one round, message by message, for the small test base and a ``vit_b_ori``-sized base
with random weights (:func:`shared.base.build_random_base`, nothing downloaded), on one synthetic site of 6 cases:

* ``process_start_s``: from spawning the Python process to its first line (interpreter start), plus Flower's own
  imports (``flwr.app``, ``flwr.clientapp``): what a fresh ClientApp process pays before fedabus code runs;
* ``import_s``: importing the handler module ``client.app`` (and all it imports);
* per message, the real handler (``client.app.app``, mods included) on a message built as the server builds it,
  with its phases timed by wrapping the functions it calls (nothing in the code path changes):

  - ``setup_s``: the site's base and validated data (:mod:`client.site_setup`);
  - ``models_s``: the global adapter decoded and applied (working copy, PEFT wrapping);
  - ``data_s``: the loaders built and iterated (reading, preprocessing, augmentation);
  - ``train_s`` / ``eval_s``: training / evaluation without their data loading;
  - ``reply_s``: the update extracted, checked at egress and packed into its record (the compression);
  - ``handler_s``: the whole handler; ``other_s`` is what the phases above leave out of it;
  - ``serialise_s``: the server's message and the site's reply turned into the objects Flower transfers
    (``deflate`` of every nested object, hashes included) and back (``inflate``), both directions;
  - ``download_bytes`` / ``upload_bytes`` and ``objects``: what travels, as Flower's object store counts it.

* ``cold``: the first message of a fresh process (deployment with ``isolation=subprocess``: every message);
  ``warm``: further messages of the same process (simulation's Ray actors), median of them.

``--deployment`` also runs the deployment path on loopback: a SuperLink with TLS and site authentication and one
SuperNode (the helpers of the deployment tests, as ``benchmarks/faults.py``), ``flwr run`` of ``--rounds`` rounds
with the small base; the SuperNode log and the ClientApp processes are watched from outside: the wall time of each
message at the SuperNode (``Receiving`` to ``Sending``), the ClientApp process's lifetime within it, and the
round time the server saw. Not a test: run it by hand.

    .venv/bin/python benchmarks/bench_round.py --out benchmarks/results/round.json
    .venv/bin/python benchmarks/bench_round.py --bases small --warm-messages 2     # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SPAWNED = (
    time.time()
)  # the worker's first line, compared with the parent's clock at spawn (interpreter start)

from bench_site_setup import prepare_base, site_parser  # noqa: E402
from harness import REPO, Conditions, run_worker, write_report  # noqa: E402

#: The run config of a round here: one local epoch of each model, 3 evaluation clicks.
ROUND_CONFIG = {
    "train.seg-epochs": 1,
    "train.cls-epochs": 1,
    "train.eval-clicks": 3,
    "train.progress": False,
    "federation.final-test": False,
}
#: What the ``vit_b_ori`` base needs besides (configs/full-models.toml: SAM-Med3D's 128³ input, seed 000's batch).
PRESET_CONFIG = {
    "small": {"model.cls-depth": 18},
    "vit_b_ori": {
        "model.sam-preset": "vit_b_ori",
        "model.cls-depth": 50,
        "data.patch-size": 128,
        "train.seg-batch-size": 2,
    },
}
#: The messages a worker can be sent (``--messages``), by Flower's message type.
MESSAGE_TYPES = {"query": "query", "train": "train", "evaluate": "evaluate"}
HANDLER_PHASES = ("setup_s", "models_s", "data_s", "train_s", "eval_s", "reply_s")
MESSAGE_KEYS = (*HANDLER_PHASES, "other_s", "handler_s", "serialise_s")


# ---------------------------------------------------------------------------------------------- the worker


class _Clock:
    """Seconds per phase of the current message; :meth:`wrap` times a module's function under a phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def wrap(self, module: Any, name: str, phase: str, *, loader: bool = False) -> None:
        original = getattr(module, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)
            return _TimedLoader(result, self, phase) if loader else result

        setattr(module, name, timed)


class _TimedLoader:
    """A loader whose iteration (the next batch: reading and transforming) counts as its phase."""

    def __init__(self, loader: Any, clock: _Clock, phase: str) -> None:
        self._loader, self._clock, self._phase = loader, clock, phase

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        iterator = iter(self._loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self._clock.add(self._phase, time.perf_counter() - start)
            yield batch


def _instrument(clock: _Clock) -> None:
    """Time the functions the handlers call (in the namespaces they are called from)."""
    import client.task as task
    import shared.training.site as site

    site._load_training()  # the training code is imported lazily; time it with the first message's training
    clock.wrap(task, "_setup", "setup_s")
    clock.wrap(task, "_models", "models_s")
    for name in ("seg_train_loader", "cls_loader", "seg_eval_loader"):
        clock.wrap(site, name, "data_s", loader=True)
    clock.wrap(task, "train_site", "train_total_s")
    clock.wrap(task, "evaluate_site", "eval_total_s")
    clock.wrap(task, "extract_adapter", "reply_s")
    clock.wrap(task, "outgoing_adapter", "reply_s")
    clock.wrap(task, "_reply_record", "reply_s")


def _wire(message: Any) -> tuple[float, float, int, int]:
    """(seconds to deflate, seconds to inflate, bytes, objects) of ``message`` as Flower's object store moves it."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    start = time.perf_counter()
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    deflated = time.perf_counter()
    size, count = sum(len(c) for c in contents.values()), len(contents)
    inflate_object_from_contents(message.object_id, contents)
    return deflated - start, time.perf_counter() - deflated, size, count


def _worker(args: argparse.Namespace) -> None:
    started = SPAWNED
    import flwr.app  # noqa: F401  (Flower's own process start)
    import flwr.clientapp  # noqa: F401

    flower = time.time()
    import client.app

    imported = time.time()
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import load_file

    from shared.protocol import ARRAYS, BASE_FINGERPRINT, CONFIG, SERVER_ROUND, SPLIT, adapter_to_record

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 5, 1  # as a Flower process has them
    clock = _Clock()
    _instrument(clock)
    run_config = {**ROUND_CONFIG, **PRESET_CONFIG[args.preset], "model.base-path": str(args.base)}
    run_config["num-server-rounds"] = 1
    node = {"data-path": str(args.site_dir), "state-dir": str(args.state_dir), "device": "cpu"}
    context = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config=run_config)
    adapter = adapter_to_record(load_file(str(args.adapter)))
    messages = []
    for index, kind in enumerate(args.messages.split(",")):
        clock.seconds = {}
        config = {SERVER_ROUND: index + 1, BASE_FINGERPRINT: args.fingerprint}
        config |= {SPLIT: "val"} if kind == "evaluate" else {}
        content = (
            RecordDict({ARRAYS: adapter, CONFIG: ConfigRecord(config)}) if kind != "query" else RecordDict()
        )
        message = Message(content=content, dst_node_id=5, message_type=MESSAGE_TYPES[kind])
        down = _wire(message)
        start = time.perf_counter()
        reply = client.app.app(message, context)
        handler = time.perf_counter() - start
        if reply.has_error():
            raise RuntimeError(f"{kind} message failed at the site: {reply.error.reason}")
        up = _wire(reply)
        seconds = dict(clock.seconds)
        data = seconds.get("data_s", 0.0)  # a message trains or evaluates: its loaders are that work's
        seconds["train_s"] = max(0.0, seconds.pop("train_total_s", 0.0) - (data if kind == "train" else 0.0))
        seconds["eval_s"] = max(0.0, seconds.pop("eval_total_s", 0.0) - (data if kind == "evaluate" else 0.0))
        seconds = {phase: seconds.get(phase, 0.0) for phase in HANDLER_PHASES}
        seconds["handler_s"] = handler
        seconds["other_s"] = max(0.0, handler - sum(seconds[p] for p in HANDLER_PHASES))
        seconds["serialise_s"] = down[0] + down[1] + up[0] + up[1]
        messages.append(
            {
                "kind": kind,
                **seconds,
                "download_bytes": down[2],
                "upload_bytes": up[2],
                "objects": down[3] + up[3],
            }
        )
    import resource

    print(
        json.dumps(
            {
                "process_start_s": flower - args.spawned,
                "interpreter_s": started - args.spawned,
                "flower_import_s": flower - started,
                "import_s": imported - flower,
                "messages": messages,
                "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def _run_worker(paths: dict[str, Path], preset: str, messages: str) -> dict[str, Any]:
    arguments = [
        "--base", str(paths["base"]),
        "--site-dir", str(paths["site"]),
        "--state-dir", str(paths["state"]),
        "--adapter", str(paths["adapter"]),
        "--preset", preset,
        "--messages", messages,
        "--spawned", repr(time.time()),
    ]  # fmt: skip
    return run_worker(
        __file__, arguments, what=f"{preset} {messages}", env={**os.environ, "PYTHONPATH": str(REPO)}
    )


# ---------------------------------------------------------------------------------------------- the driver


def _row(worker: dict[str, Any], message: int, *, cold: bool) -> dict[str, float]:
    """One message's numbers; a cold (first in process) message carries the process start and the import."""
    row = dict(worker["messages"][message])
    row["process_start_s"] = worker["process_start_s"] if cold else 0.0
    row["import_s"] = worker["import_s"] if cold else 0.0
    work = row["train_s"] + row["eval_s"]
    row["overhead_s"] = row["import_s"] + row["handler_s"] - work + row["serialise_s"]
    row["total_s"] = row["process_start_s"] + row["import_s"] + row["handler_s"] + row["serialise_s"]
    return row


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in rows[0].items() if isinstance(v, int | float)]
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in keys}


def measure_anatomy(tmp: Path, name: str, site: Path, repeats: int, warm_messages: int) -> dict[str, Any]:
    """The in-process anatomy of ``name``'s messages: cold (fresh process) and warm, median of ``repeats``."""
    base, adapter = tmp / f"{name}.safetensors", tmp / f"{name}-adapter.safetensors"
    if not (base.is_file() and adapter.is_file()):  # kept in --work from an earlier run
        base, adapter = prepare_base(tmp, name)
    paths = {"base": base, "adapter": adapter, "site": site, "state": tmp / f"state-{name}"}
    rows: dict[str, list[dict[str, Any]]] = {}
    rss = 0.0
    for _ in range(repeats):
        cases = [("cold query", "query"), ("cold evaluate", "evaluate")]
        cases += [("cold train", ",".join(["train", "evaluate"] * warm_messages))] if warm_messages else []
        for case, messages in cases:
            worker = _run_worker(paths, name, messages)
            rss = max(rss, worker["max_rss_mib"])
            rows.setdefault(case, []).append(_row(worker, 0, cold=True))
            for index in range(1, len(worker["messages"])):
                kind = worker["messages"][index]["kind"]
                rows.setdefault(f"warm {kind}", []).append(_row(worker, index, cold=False))
    return {
        "base_bytes": base.stat().st_size,
        "median": {case: _median(r) for case, r in rows.items()},
        "max_rss_mib": round(rss),
        "runs": rows,
    }


def main() -> int:
    parser = site_parser(__doc__, out="round.json", repeats=1)
    parser.add_argument(
        "--warm-messages",
        type=int,
        default=2,
        help="train + evaluate pairs per warm process (first is cold; 0: no training, query and evaluate only)",
    )
    parser.add_argument("--deployment", action="store_true", help="also the deployment path (small base)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the deployment run")
    parser.add_argument(
        "--work", type=Path, help="keep the bases, adapters and site here (reused by the next run)"
    )
    parser.add_argument("--preset", default="small", help=argparse.SUPPRESS)
    parser.add_argument("--messages", default="train", help=argparse.SUPPRESS)
    parser.add_argument("--fingerprint", default="", help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, default=SPAWNED, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return 0
    sys.path.insert(0, str(REPO))
    from shared.data.synth import generate_consortium

    conditions = Conditions()
    report: dict[str, Any] = {"site_cases": 6, "round_config": ROUND_CONFIG, "preset_config": PRESET_CONFIG}
    with tempfile.TemporaryDirectory(prefix="fedabus-bench-") as scratch:
        tmp = args.work or Path(scratch)
        site = tmp / "sites" / "site_a"
        if not site.is_dir():
            site = generate_consortium(tmp / "sites", sites=1, cases=6, seed=11)[0]
        report["bases"] = {
            name: measure_anatomy(tmp, name, site, args.repeats, args.warm_messages)
            for name in args.bases.split(",")
        }
        if args.deployment:
            from round_deployment import measure_deployment

            report["deployment"] = measure_deployment(Path(scratch) / "deployment", rounds=args.rounds)
    report |= conditions.report()
    write_report(args.out, report, indent=1)
    print(json.dumps({name: r["median"] for name, r in report["bases"].items()}, indent=1))
    if "deployment" in report:
        print(json.dumps(report["deployment"]["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
