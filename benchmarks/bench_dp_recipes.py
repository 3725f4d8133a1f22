"""Benchmark: which sample-level DP-SGD recipe still teaches the segmenter (issue 15.5).

One demo site (the demo consortium's synthetic site, the cached pretrained demo base) trains its SAM-Med3D
adapter locally for ``--rounds`` planned rounds of the run config's local epochs — with DP-SGD planned and
accounted exactly as a federated site does (:func:`shared.privacy.planning.plan_private_round`, its ledger) —
once per recipe (arm), and its test split's Dice@1 is measured before and after. The classifier does not
train (``train.cls-epochs = 0``): this isolates the segmenter, whose learning DP-SGD stopped. Each arm is a
set of run-config overrides; ``--arms`` picks them by name (``--set ARM:KEY=VALUE`` adds or changes one). Not
a test: run it by hand on an idle machine; each arm's seconds are in the report.

    .venv/bin/python benchmarks/bench_dp_recipes.py --out benchmarks/results/dp_recipes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, machine, write_report

sys.path.insert(0, str(REPO))

#: The demo's local training (shared/demo.py), the classifier off, one-click evaluation.
COMMON = {
    "train.seg-lr": 6e-3,
    "train.seg-epochs": 3,
    "train.cls-epochs": 0,
    "train.eval-clicks": 1,
    "train.progress": False,
}
#: Arm name -> overrides (``eps`` is the target ε over all rounds; absent: no DP).
ARMS: dict[str, dict[str, object]] = {
    "no-dp": {},
    "no-dp-lora": {"adapter.seg-trainable": ""},
    "dp-b2": {"eps": 8},
    "dp-b10": {"eps": 8, "privacy.seg-batch-size": 10},
    "dp-b20": {"eps": 8, "privacy.seg-batch-size": 20},
    "dp-b10-lr2": {"eps": 8, "privacy.seg-batch-size": 10, "train.seg-lr": 2e-2},
    "dp-b20-lr2": {"eps": 8, "privacy.seg-batch-size": 20, "train.seg-lr": 2e-2},
    "dp-b10-lora": {"eps": 8, "privacy.seg-batch-size": 10, "privacy.seg-trainable": ""},
    "dp-b10-lora-lr2": {
        "eps": 8,
        "privacy.seg-batch-size": 10,
        "privacy.seg-trainable": "",
        "train.seg-lr": 2e-2,
    },
    "dp-b8-lora": {"eps": 8, "privacy.seg-batch-size": 8, "privacy.seg-trainable": ""},
    "dp-b8-lora-eps3": {"eps": 3, "privacy.seg-batch-size": 8, "privacy.seg-trainable": ""},
    "dp-b10-c01": {"eps": 8, "privacy.seg-batch-size": 10, "privacy.max-grad-norm": 0.1},
    "dp-b10-e1": {"eps": 8, "privacy.seg-batch-size": 10, "train.seg-epochs": 1},
}


def _overrides(arm: dict[str, object]) -> dict[str, object]:
    values = {key: value for key, value in arm.items() if key != "eps"}
    if "eps" in arm:
        values |= {"privacy.sample-dp": True, "privacy.target-epsilon": float(arm["eps"])}
    return {**COMMON, **values}


def dice_at_one(models, site, config) -> float:
    """Mean Dice@1 of ``models["seg"]`` on the site's test split."""
    import torch

    from shared.data.loaders import seg_eval_loader
    from shared.training.seg_eval import evaluate_segmentation

    loader = seg_eval_loader(list(site.test_cases), config.data, site_config=site.site_config)
    result = evaluate_segmentation(
        models["seg"].to(torch.device("cpu")),
        loader,
        config=config.train,
        data_config=config.data,
        device="cpu",
        n_clicks=1,
        keep_masks=False,
    )
    return float(result.metrics["test/dice_1click"])


def run_arm(name: str, arm: dict[str, object], base, site, rounds: int, state: Path) -> dict:
    """Train the site's adapter for ``rounds`` rounds with the arm's settings; Dice@1 before and after."""
    import torch

    from shared.adapters import lora_specs_from_config
    from shared.base import working_copy, wrap_for_training
    from shared.config import load_config
    from shared.privacy.ledger import PrivacyLedger
    from shared.privacy.planning import plan_private_round
    from shared.training.site import train_site

    config = load_config(_overrides(arm))
    specs = lora_specs_from_config(config.adapter)
    models = wrap_for_training(working_copy(base, specs), specs)
    started, sigma = time.monotonic(), 0.0
    for server_round in range(1, rounds + 1):
        plan = ledger = None
        if config.privacy.sample_dp:
            ledger = PrivacyLedger.open(state / name)
            plan = plan_private_round(
                config, len(site.train_cases), rounds, ledger, server_round=server_round
            )
            sigma = plan.seg.noise_multiplier
        train_site(
            models, site, config, device=torch.device("cpu"), seed=server_round, plan=plan, ledger=ledger
        )
    spent = PrivacyLedger.open(state / name).epsilon("seg", plan.delta) if plan else float("inf")
    result = {
        "arm": name,
        "overrides": {k: v for k, v in arm.items()},
        "noise_multiplier": sigma,
        "epsilon_spent": spent,
        "dice_1click": dice_at_one(models, site, config),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dp_recipes.json")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--site", type=int, default=1, help="which demo site (0-based)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], metavar="ARM:KEY=VALUE", help="add an arm's value"
    )
    args = parser.parse_args()
    import torch

    from shared.base import load_base
    from shared.config import load_config, parse_assignments
    from shared.data.synth import generate_consortium
    from shared.demo import demo_synth_options
    from shared.pretrain import ensure_base
    from shared.training.site import open_site

    torch.manual_seed(args.seed)
    arms = {name: dict(ARMS.get(name, {})) for name in args.arms.split(",")}
    for item in args.set:
        name, assignment = item.split(":", 1)
        arms.setdefault(name, {}).update(parse_assignments([assignment]))
    base = load_base(ensure_base(load_config({"model.cls-depth": 18, "train.progress": False})))
    with tempfile.TemporaryDirectory(prefix="fedabus-dp-recipes-") as tmp:
        sites = generate_consortium(
            Path(tmp) / "sites", sites=args.site + 1, cases=36, seed=args.seed, options=demo_synth_options()
        )
        site = open_site(sites[args.site])
        before = dice_at_one({"seg": base.sam}, site, load_config(_overrides({})))
        print(
            f"{site.name}: {len(site.train_cases)} training, {len(site.test_cases)} test cases, Dice@1 {before:.3f}"
        )
        results = [
            run_arm(name, arm, base, site, args.rounds, Path(tmp) / "state") for name, arm in arms.items()
        ]
    report = {
        "machine": machine(),
        "settings": {"rounds": args.rounds, "site": site.name, "seed": args.seed, "common": COMMON},
        "dice_1click_before": before,
        "results": results,
    }
    write_report(args.out, report, indent=1)
    lines = ["| arm | σ | ε spent | Dice@1 | gain | s |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['arm']} | {r['noise_multiplier']:.2f} | {r['epsilon_spent']:.2f} | {r['dice_1click']:.3f} | "
            f"{r['dice_1click'] - before:+.3f} | {r['seconds']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
