"""Benchmark: one Byzantine site among five, FedAvg against the robust strategies (issue 17 item 2).

At the aggregation level, with real training: every round, each site trains the real adapter from the round's
global adapter with the project's own local training (:func:`shared.training.site.train_site`, ``small``
preset, synthetic sites of :func:`shared.data.synth.generate_consortium`). The last site is Byzantine: its
update is attacked (:data:`ATTACKS`), or for ``label_flip`` it trains on flipped benign/malignant labels.
The updates then go, as mocked Flower train replies, through the real strategy objects of
:func:`server.strategies.build_strategy` (``configure_train`` first, then ``aggregate_train``: update admission
included), with admission's norm-ratio bound on (``federation.max-update-norm-ratio`` 10, the default) and off
(0). Each distinct aggregate is evaluated once with :func:`shared.training.site.evaluate_site` on every site's
validation split (``--eval-sites N``: the first N sites; a site without validation cases, e.g. at 2 cases per
site, is evaluated on its training split: the smoke setting only). Cost on a 2-core CPU: about 16 s per site
and aggregate at 2 cases per site, and up to ~25 distinct aggregates per round with every strategy and attack.

The attack lasts one round from a shared trajectory: the honest updates of a round are trained once, from the
clean FedAvg aggregate of the round before, and every (strategy, attack, admission) aggregate of the round is
measured against the clean aggregate of the same strategy (``drop``) and against clean FedAvg
(``drop_vs_fedavg``). Drops are clean − attacked of the site mean, so positive = damage. The report is written
after every round (``complete``: false until the last), so a run stopped early keeps the rounds it finished.

    .venv/bin/python benchmarks/bench_byzantine.py --out benchmarks/results/byzantine.json
    .venv/bin/python benchmarks/bench_byzantine.py --rounds 1 --cases 2 --out /tmp/byzantine-smoke.json  # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from harness import REPO, Conditions, write_report

#: Packed adapter as it travels: one flat float32 array per model (``seg``, ``cls``).
Packed = dict[str, np.ndarray]

STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")
ATTACKS = ("sign_flip", "scale", "noise", "label_flip")
#: Admission's norm-ratio bound with admission "on" (the run config's default) and "off".
NORM_RATIO = {"on": 10.0, "off": 0.0}


# ------------------------------------------------------------------------------------------ attacks
def _deltas(update: Packed, reference: Packed) -> Packed:
    return {k: update[k].astype(np.float64) - reference[k].astype(np.float64) for k in reference}


def attack_update(
    attack: str,
    update: Packed,
    reference: Packed,
    *,
    rng: np.random.Generator,
    scale: float = 1e3,
    noise: float = 10.0,
) -> Packed:
    """The Byzantine site's packed adapter from its honest one, both against the global adapter ``reference``.

    ``sign_flip``: ``g − Δ``; ``scale``: ``g + scale · Δ``; ``noise``: ``g + N(0, s²)`` per element, with
    ``s = noise ×`` the honest update's RMS over all elements (Δ itself is discarded); ``label_flip``:
    unchanged (that site poisoned its training data instead). Δ = honest − g; float32 out, same shapes.
    """
    delta = _deltas(update, reference)
    if attack == "sign_flip":
        poisoned = {k: -d for k, d in delta.items()}
    elif attack == "scale":
        poisoned = {k: scale * d for k, d in delta.items()}
    elif attack == "noise":
        size = sum(d.size for d in delta.values())
        rms = math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in delta.values()) / max(size, 1))
        poisoned = {k: rng.normal(0.0, noise * rms, d.shape) for k, d in delta.items()}
    elif attack == "label_flip":
        poisoned = delta
    else:
        raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    return {k: (reference[k].astype(np.float64) + poisoned[k]).astype(np.float32) for k in reference}


def update_norm(update: Packed, reference: Packed) -> float:
    """L2 norm of ``update − reference`` over all arrays."""
    return math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in _deltas(update, reference).values()))


def drops(clean: dict[str, float], attacked: dict[str, float]) -> dict[str, float]:
    """``clean − attacked`` per metric present in both (NaN where either is NaN): positive = damage."""
    return {k: clean[k] - attacked[k] for k in clean if k in attacked}


def site_mean(per_site: dict[str, dict[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """Unweighted mean over sites of each key, ignoring NaN (NaN when no site has a value)."""
    out = {}
    for key in keys:
        values = [m[key] for m in per_site.values() if key in m and not math.isnan(m[key])]
        out[key] = float(np.mean(values)) if values else math.nan
    return out


# ------------------------------------------------------------------------------------------ models
def _config(args: argparse.Namespace):
    from shared.config import load_config

    return load_config(
        {
            "model.cls-depth": 18,
            "train.seg-epochs": args.local_epochs,
            "train.cls-epochs": args.local_epochs,
            "train.seg-lr": 6e-3,  # the demo's CPU schedule (shared/demo.py)
            "train.cls-lr": 5e-3,
            "train.eval-clicks": args.eval_clicks,
            "train.seg-click-iterations": 1,
            "train.progress": False,
        }
    )


class Sites:
    """The base, the config and the adapter layout: turns packed adapters into trained or evaluated models."""

    def __init__(self, base: Any, config: Any) -> None:
        from shared.adapters import extract_adapter, lora_specs_from_config
        from shared.base import working_copy, wrap_for_training
        from shared.protocol import layout_of

        self.base, self.config = base, config
        self.specs = lora_specs_from_config(config.adapter)
        models = wrap_for_training(working_copy(base, self.specs), self.specs)
        self.initial = extract_adapter(models, base_fingerprints=base.fingerprints)
        self.layout = layout_of(self.initial.tensors)

    def models(self, packed: Packed) -> dict[str, Any]:
        """Fresh models of the base with the packed adapter applied."""
        from shared.adapters import Adapter, apply_adapter
        from shared.base import working_copy, wrap_for_training
        from shared.protocol import record_to_adapter

        models = wrap_for_training(working_copy(self.base, self.specs), self.specs)
        tensors = record_to_adapter(to_record(packed), self.layout)
        adapter = Adapter(tensors, {"base_fingerprint": dict(self.base.fingerprints)})
        apply_adapter(models, adapter, base_fingerprints=self.base.fingerprints)
        return models

    def initial_packed(self) -> Packed:
        from shared.protocol import adapter_to_record

        return from_record(adapter_to_record(self.initial.tensors))

    def train(self, packed: Packed, site: Any, *, seed: int) -> Packed:
        """The site's packed adapter after local training from ``packed``."""
        import torch

        from shared.adapters import extract_adapter
        from shared.protocol import adapter_to_record
        from shared.training.site import train_site

        models = self.models(packed)
        train_site(models, site, self.config, device=torch.device("cpu"), seed=seed)
        tensors = extract_adapter(models, base_fingerprints=self.base.fingerprints).tensors
        return from_record(adapter_to_record(tensors))

    def evaluate(self, packed: Packed, sites: Sequence[Any]) -> dict[str, dict[str, float]]:
        """Every site's metrics of ``packed`` on its validation split (training split when it has none)."""
        import torch

        from shared.training.site import evaluate_site

        models = self.models(packed)
        return {
            site.name: evaluate_site(
                models, site, self.config, device=torch.device("cpu"), split=eval_split(site)
            )
            for site in sites
        }


def eval_split(site: Any) -> str:
    """``val``, or ``train`` for a site without validation cases (tiny smoke consortia)."""
    return "val" if site.val_cases else "train"


def to_record(packed: Packed):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in sorted(packed.items())})


def from_record(record) -> Packed:
    return {k: np.asarray(record[k].numpy(), dtype=np.float32) for k in record.keys()}


def flip_labels(site: Any) -> Any:
    """The site with its training cases' benign/malignant labels swapped (masks unchanged)."""
    flipped = tuple(replace(c, label=None if c.label is None else 1 - c.label) for c in site.train_cases)
    return replace(site, train_cases=flipped)


# ------------------------------------------------------------------------------------------ aggregation
def aggregate(
    strategy: str,
    admission: str,
    reference: Packed,
    updates: Sequence[tuple[str, Packed, int]],
    server_round: int,
) -> tuple[Packed | None, dict[str, str]]:
    """Aggregate ``(site, packed, training cases)`` updates with the real strategy: ``configure_train`` of
    ``server_round`` from ``reference`` (what admission measures against), then ``aggregate_train`` of mocked
    replies. Returns the new packed adapter (None when nothing was aggregated) and admission's refusals."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from server.strategies import build_strategy
    from shared.config import FederationConfig
    from shared.protocol import ARRAYS, METRICS, NUM_EXAMPLES, SERVER_ROUND, SITE, SITE_ID

    federation = FederationConfig(
        strategy=strategy,
        min_sites=2,
        num_malicious=1,
        trim_beta=0.2,
        max_update_norm_ratio=NORM_RATIO[admission],
    )
    built = build_strategy(federation)
    nodes = list(range(1, len(updates) + 1))
    messages = list(built.configure_train(server_round, to_record(reference), ConfigRecord(), _Grid(nodes)))
    by_node = {msg.metadata.dst_node_id: msg for msg in messages}
    replies = []
    for node, (site, packed, cases) in zip(nodes, updates, strict=True):
        content = RecordDict(
            {
                ARRAYS: to_record(packed),
                METRICS: MetricRecord({NUM_EXAMPLES: float(cases)}),
                SITE: ConfigRecord({SITE_ID: site, SERVER_ROUND: server_round}),
            }
        )
        replies.append(Message(content, reply_to=by_node[node]))
    arrays, _ = built.aggregate_train(server_round, replies)
    return (None if arrays is None else from_record(arrays)), dict(built.last_refusals)


class _Grid:
    """All sites online (what ``configure_train`` samples from); nothing is sent."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _set_task_identity() -> None:
    """Flower needs a task identity to build messages outside a running Flower process (as the tests do)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _digest(packed: Packed) -> str:
    sha = hashlib.sha256()
    for key in sorted(packed):
        sha.update(key.encode())
        sha.update(np.ascontiguousarray(packed[key]).tobytes())
    return sha.hexdigest()


# ------------------------------------------------------------------------------------------ the run
def _progress(started: float, text: str) -> None:
    print(f"[{time.time() - started:7.1f} s] {text}", flush=True)


def _round(
    args: argparse.Namespace,
    sites: Sites,
    data: list[Any],
    flipped: Any,
    global_: Packed,
    server_round: int,
    evaluate: Callable[[Packed], dict[str, Any]],
    started: float,
) -> tuple[list[dict[str, Any]], Packed]:
    """One round: honest training, every (attack, strategy, admission) aggregate evaluated; the rows and the
    clean FedAvg aggregate (the next round's global adapter)."""
    seed = 1000 * server_round
    honest = []
    for index, site in enumerate(data):
        honest.append(sites.train(global_, site, seed=seed + index))
        _progress(started, f"round {server_round}: trained {site.name} ({len(site.train_cases)} cases)")
    byzantine = {"none": honest[-1]}
    rng = np.random.default_rng(args.seed + server_round)
    for attack in args.attacks:
        source = honest[-1]
        if attack == "label_flip":
            source = sites.train(global_, flipped, seed=seed + len(data) - 1)
            _progress(started, f"round {server_round}: trained {flipped.name} on flipped labels")
        byzantine[attack] = attack_update(
            attack, source, global_, rng=rng, scale=args.scale, noise=args.noise
        )
    cases = [len(site.train_cases) for site in data]
    clean_updates = [(s.name, u, n) for s, u, n in zip(data, honest, cases, strict=True)]
    next_global, _ = aggregate("fedavg", "on", global_, clean_updates, server_round)
    rows, clean = [], {}
    for attack, poisoned in byzantine.items():
        updates = [(s.name, u, n) for s, u, n in zip(data, [*honest[:-1], poisoned], cases, strict=True)]
        for strategy in args.strategies:
            for admission in NORM_RATIO:
                packed, refused = aggregate(strategy, admission, global_, updates, server_round)
                result = evaluate(packed if packed is not None else global_)
                row = {
                    "round": server_round,
                    "attack": attack,
                    "strategy": strategy,
                    "admission": admission,
                    "byzantine_site": data[-1].name,
                    "byzantine_update_norm": update_norm(poisoned, global_),
                    "refused": refused,
                    "aggregated": packed is not None,
                    **result,
                }
                if attack == "none":
                    clean[(strategy, admission)] = row["mean"]
                row["drop"] = drops(clean[(strategy, admission)], row["mean"])
                row["drop_vs_fedavg"] = drops(clean.get(("fedavg", admission), {}), row["mean"])
                rows.append(row)
                _progress(
                    started,
                    f"round {server_round}: {attack:10s} {strategy:13s} admission {admission:3s} "
                    + " ".join(f"{k} {v:.3f}" for k, v in row["mean"].items())
                    + (f"  refused: {', '.join(refused)}" if refused else ""),
                )
    return rows, next_global if next_global is not None else global_


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the sites, run the rounds, return the report (rows per round, attack, strategy, admission)."""
    from shared.base import build_random_base, load_base
    from shared.data.synth import generate_consortium
    from shared.metric_names import AUC, dice_click_name, metric_key
    from shared.training.site import open_site

    conditions, started = Conditions(), time.time()
    _set_task_identity()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # keep admission's refusals, drop Flower's chatter
    config = _config(args)
    base = load_base(args.base) if args.base else build_random_base("small", cls_depth=18, seed=0)
    sites = Sites(base, config)
    with tempfile.TemporaryDirectory(prefix="fedabus-byzantine-") as tmp:
        folders = generate_consortium(Path(tmp) / "sites", sites=args.sites, cases=args.cases, seed=args.seed)
        data = [open_site(folder, seed=args.seed) for folder in folders]
        _progress(started, f"{len(data)} sites generated; {data[-1].name} is Byzantine")
        flipped = flip_labels(data[-1])
        evaluated = data[: args.eval_sites] if args.eval_sites else data
        cache: dict[str, dict[str, Any]] = {}

        def evaluate(packed: Packed) -> dict[str, Any]:
            digest = _digest(packed)
            if digest not in cache:
                metrics = sites.evaluate(packed, evaluated)
                names = (dice_click_name(1), AUC)
                per_site = {
                    s.name: {
                        n: metrics[s.name].get(metric_key(n, split=eval_split(s)), math.nan) for n in names
                    }
                    for s in evaluated
                }
                cache[digest] = {"sites": per_site, "mean": site_mean(per_site, names)}
            return cache[digest]

        rows, global_ = [], sites.initial_packed()
        splits = {s.name: eval_split(s) for s in evaluated}

        def report(complete: bool) -> dict[str, Any]:
            return {
                "benchmark": "byzantine",
                "complete": complete,
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "evaluated_on": splits,
                "rows": rows,
                "conditions": conditions.report(),
            }

        for server_round in range(1, args.rounds + 1):
            new_rows, global_ = _round(args, sites, data, flipped, global_, server_round, evaluate, started)
            rows += new_rows
            if server_round < args.rounds:  # a run stopped later still leaves the rounds it finished
                write_report(args.out, json_safe(report(complete=False)))
    return report(complete=True)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None (strict JSON), recursively through dicts and lists."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "byzantine.json")
    parser.add_argument("--sites", type=int, default=5, help="sites, the last one Byzantine (default 5)")
    parser.add_argument("--cases", type=int, default=12, help="synthetic cases per site (default 12)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--local-epochs", type=int, default=1, help="local epochs of both models per round")
    parser.add_argument(
        "--eval-sites", type=int, default=0, help="evaluate on the first N sites only (default 0: all)"
    )
    parser.add_argument("--eval-clicks", type=int, default=1, help="clicks per evaluated case (default 1)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--scale", type=float, default=1e3, help="factor of the scale attack (default 1e3)")
    parser.add_argument(
        "--noise", type=float, default=10.0, help="noise std / honest update RMS (default 10)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=Path, help="base to start from (default: a random small base)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.sites < 5:
        raise SystemExit(f"--sites {args.sites}: give 5 or more (Krum with one Byzantine site needs n > 4)")
    if str(REPO) not in sys.path:  # run as a script from anywhere: import the repository's packages
        sys.path.insert(0, str(REPO))
    report = run(args)
    write_report(args.out, json_safe(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
