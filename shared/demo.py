"""``fedabus demo``: the main job on embedded defaults — a simulated multi-site federation with local MLflow.

Steps: generate a synthetic consortium (sites in both data layouts, each with its own domain shift; each site
holds out ``--test-fraction`` of its cases per class as its test split, 16 of 36 by default), make or reuse the
cached pretrained demo base, run a Flower simulation (a managed local SuperLink, one simulated SuperNode per
site) for a few rounds, then print every site's Dice, HD95 and AUC before and after federation and where the
MLflow run is. All output goes under ``--out`` (never inside the app folder, which Flower
bundles); the Flower home used is ``OUT/flwr-home``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from shared.config import parse_assignments
from shared.metric_names import (
    AUC,
    CLIENT_EPSILON,
    CLS_EPSILON,
    DELTA,
    DICE,
    DICE_AUTO,
    GT_PLANES,
    HD95_AUTO,
    HD95_MM,
    NUM_EXAMPLES,
    PRIVACY,
    SEG_EPSILON,
    dice_click_key,
    metric_key,
)
from shared.simulation import app_dir, run_simulation

if TYPE_CHECKING:
    from shared.data.synth import SynthOptions

__all__ = [
    "DEMO_TEST_FRACTION",
    "demo_run_config",
    "demo_synth_options",
    "held_out_counts",
    "print_site_table",
    "register",
    "run_demo",
]

TABLE_METRICS = (
    (dice_click_key(1), "Dice@1"),
    (metric_key(DICE), "Dice@N"),
    (metric_key(HD95_MM), "HD95 mm"),
    (metric_key(AUC + GT_PLANES), "AUC GT planes"),
    (metric_key(AUC), "AUC e2e"),
)
#: The table of a fully automatic segmenter (``model.seg-model = segresnet``): whole-volume metrics, no click.
AUTO_TABLE_METRICS = (
    (metric_key(DICE_AUTO), "Dice auto"),
    (metric_key(HD95_AUTO), "HD95 auto mm"),
    *TABLE_METRICS[3:],
)


def held_out_counts(sites_dir: Path) -> dict[str, tuple[int, int]]:
    """(benign, malignant) test cases per site, from the synthetic consortium's ``consortium.json``."""
    import json

    truth = json.loads((sites_dir / "consortium.json").read_text(encoding="utf-8"))
    counts = {}
    for record in truth["sites"]:
        labels = [case["label"] for case in record["cases"] if case["split"] == "test"]
        counts[record["style"]["name"]] = (labels.count(0), labels.count(1))
    return counts


TABLE_NOTE = """\
Test split: each site's held-out cases (benign/malignant), never trained on and tested once. Before: the
global adapter before round 1 (untrained adapter, fresh classifier head); after: the global adapter of the
round shown, chosen by the sites' validation split (mean Dice@1), not by test.
AUC GT planes: the classifier on planes cut around the ground-truth lesion (seed 003's setting).
AUC e2e: planes cut around the predicted mask (click -> mask -> malignancy); it also pays for every
segmentation error, so it follows Dice and moves less steadily than AUC GT planes."""


def print_site_table(
    summary: dict, *, test_counts: dict[str, tuple[int, int]] | None = None, file: TextIO = sys.stdout
) -> None:
    """Per-site metrics before and after federation, with each site's test split (benign/malignant)."""
    before, after = summary.get("before", {}), summary.get("after", {})
    counts = test_counts or {}
    automatic = any(metric_key(DICE_AUTO) in values for values in (*before.values(), *after.values()))
    table = AUTO_TABLE_METRICS if automatic else TABLE_METRICS
    sites = sorted(set(before) | set(after))
    after_round = summary.get("after_round", "?")
    print(f"{'site':10s} {'test':>6s} " + " ".join(f"{label:>17s}" for _, label in table), file=file)
    sub = f"before -> r{after_round}"
    print(f"{'':10s} {'B/M':>6s} " + " ".join(f"{sub:>17s}" for _ in table), file=file)
    for site in sites:
        cells = []
        for key, _ in table:
            b, a = before.get(site, {}).get(key, math.nan), after.get(site, {}).get(key, math.nan)
            cells.append(f"{b:7.3f} -> {a:6.3f}")
        split = "/".join(str(n) for n in counts[site]) if site in counts else "?"
        print(f"{site:10s} {split:>6s} " + " ".join(f"{c:>17s}" for c in cells), file=file)
    _print_privacy(summary, sites, file)
    print(f"\n{TABLE_NOTE}", file=file)


def _print_privacy(summary: dict, sites: list[str], file: TextIO) -> None:
    """Sample-level DP: the ε each site has spent per model (its ledger); client-level DP: the run's ε."""
    train = summary.get("train", {})
    seg_key, cls_key, delta_key, client_key = (
        metric_key(name, split=PRIVACY) for name in (SEG_EPSILON, CLS_EPSILON, DELTA, CLIENT_EPSILON)
    )
    if any(seg_key in train.get(site, {}) for site in sites):
        print("\nsample-level DP, ε spent per site (segmentation / classification, at δ):", file=file)
        for site in sites:
            values = train.get(site, {})
            seg, cls = values.get(seg_key, math.nan), values.get(cls_key, math.nan)
            stopped = "  (stopped at its budget)" if values.get(NUM_EXAMPLES) == 0.0 else ""
            delta = values.get(delta_key, math.nan)
            print(f"  {site:10s} ε {seg:6.3f} / {cls:6.3f}  δ {delta:.2g}{stopped}", file=file)
    client = summary.get("client_privacy", {})
    if client_key in client:
        print(f"\nclient-level DP: ε {client[client_key]:.3f} for the run", file=file)


#: Share of each site's cases, per class, that the demo holds out as the site's test split.
DEMO_TEST_FRACTION = 0.45
#: Share of each site's cases in its validation split (model selection).
DEMO_VAL_FRACTION = 0.15
#: ``data.case-cache-mb`` of the demo's processes: every site's 36 preprocessed cases (about 3 MiB each) stay in
#: its actor's memory for the whole run, and the pretraining's 32 public cases for all its epochs, instead of being
#: read and resampled again in every epoch and evaluation (the same values: shared/data/case_cache.py).
DEMO_CASE_CACHE_MB = 512


def demo_synth_options(test_fraction: float = DEMO_TEST_FRACTION) -> SynthOptions:
    """The demo consortium's :class:`~shared.data.synth.SynthOptions`: ``test_fraction`` of each class in the
    test split, :data:`DEMO_VAL_FRACTION` in the validation split (it chooses the round that is reported),
    the rest trains. With 36 cases per site that is 16 test lesions of both classes (AUC on 4 lesions is
    noise) and 5 validation cases."""
    from shared.data.synth import SynthOptions

    if not 0.0 < test_fraction < 1.0 - DEMO_VAL_FRACTION:
        raise ValueError(
            f"--test-fraction {test_fraction}: give a share of the cases between 0 and "
            f"{1.0 - DEMO_VAL_FRACTION:.2f} (the demo keeps {DEMO_VAL_FRACTION:.0%} for validation), e.g. 0.45"
        )
    return SynthOptions(
        split_fractions=(1.0 - test_fraction - DEMO_VAL_FRACTION, DEMO_VAL_FRACTION, test_fraction)
    )


def _eval_interval(args: argparse.Namespace) -> int:
    """``federation.eval-interval`` for ``--eval-every``; every round when that would skip the last round."""
    every = int(args.eval_every)
    if every < 1:
        raise SystemExit(f"--eval-every {every}: give a number of rounds >= 1")
    if args.rounds % every:
        print(f"--eval-every {every} does not divide --rounds {args.rounds}: evaluating every round")
        return 1
    return every


def demo_run_config(
    args: argparse.Namespace, *, base_path: Path, sites_dir: Path, work: Path, eval_interval: int
) -> dict[str, object]:
    """The run-config overrides of the demo's simulation: its small CPU settings, set explicitly (the run
    config's defaults are the real sites'), then the user's ``--set`` values.

    ``model.cls-*`` are copied from the base's manifest so that the run's recorded config describes the base
    that is used (a loaded base's architecture comes from its manifest, never from these keys).
    """
    from shared.base import read_base_manifest

    cls_config = read_base_manifest(base_path)["cls_config"]
    return {
        "num-server-rounds": args.rounds,
        "model.base-path": str(base_path),
        "model.cls-depth": int(cls_config["depth"]),
        "model.cls-norm-groups": int(cls_config["norm_groups"]),
        "model.cls-backbone": str(cls_config.get("backbone", "resnet")),
        "model.cls-fusion": str(cls_config.get("fusion", "ts+c")),
        "federation.sites-dir": str(sites_dir),
        "federation.work-dir": str(work),
        "federation.min-sites": args.sites,
        "federation.resume": False,
        "federation.sample-timeout": 120.0,
        "federation.round-timeout": 900.0,
        "federation.eval-interval": eval_interval,
        "train.seg-epochs": args.local_epochs,
        "train.cls-epochs": args.local_epochs,
        # A few CPU epochs need much larger steps than the seed's GPU schedule (seg-lr 2e-4 for 200 epochs):
        # 6 rounds x 3 epochs at 6e-3 raise Dice@1 by about 0.15-0.2 per site (docs/operations.md).
        "train.seg-lr": 6e-3,
        "train.cls-lr": 5e-3,
        "train.eval-clicks": 3,
        "train.progress": False,
        "data.case-cache-mb": DEMO_CASE_CACHE_MB,
        **parse_assignments(args.set),
    }


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
    try:
        synth_options = demo_synth_options(args.test_fraction)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    eval_interval = _eval_interval(args)
    sites_dir = out / "sites"
    if args.fresh and out.exists():
        shutil.rmtree(out)
    print(f"[1/4] synthetic consortium: {args.sites} sites x {args.cases} cases -> {sites_dir}")
    generate_consortium(
        sites_dir, sites=args.sites, cases=args.cases, seed=args.seed, options=synth_options, workers=None
    )
    config = load_config(
        {"model.cls-depth": 18, "train.progress": False, "data.case-cache-mb": DEMO_CASE_CACHE_MB}
    )
    print("[2/4] pretrained demo base (cached after the first run)")
    base_path = Path(args.base).resolve() if args.base else ensure_base(config)
    flwr_home = out / "flwr-home"
    work = out / "server"
    overrides = demo_run_config(
        args, base_path=base_path, sites_dir=sites_dir, work=work, eval_interval=eval_interval
    )
    if work.exists():
        shutil.rmtree(work)
    print(f"[3/4] federation: {args.rounds} rounds, {args.sites} simulated sites (Flower simulation)")
    returncode = run_simulation(
        overrides, sites=args.sites, flwr_home=flwr_home, cwd=out, keep_superlink=args.keep_superlink
    )
    summary_path = work / "summary.json"
    if returncode != 0 or not summary_path.is_file():
        print(f"federation failed (exit {returncode}); see the log above", file=sys.stderr)
        return 1
    import json

    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    print(
        f"\n[4/4] results after {summary.get('rounds_done')} rounds ({time.monotonic() - started:.0f} s in all)\n"
    )
    print_site_table(summary, test_counts=held_out_counts(sites_dir))
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
    parser.add_argument("--cases", type=int, default=36, help="cases per site")
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=DEMO_TEST_FRACTION,
        help="share of each site's cases (per class) held out as its test split (default 0.45: 16 of 36)",
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-epochs", type=int, default=3, help="local epochs per round (both models)")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=2,
        help="evaluate the global adapter at every site every N rounds (always before round 1 and after the "
        "last round; N must divide --rounds, else every round)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=Path, help="use this base instead of the cached pretrained demo base")
    parser.add_argument("--out", type=Path, default=Path.home() / ".fedabus" / "demo")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra run-config value (repeatable)"
    )
    parser.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running")
    parser.set_defaults(func=run_demo)
