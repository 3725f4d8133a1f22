"""Commands of one site's model work: ``train-local``, ``pretrain`` and ``make-base``."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from shared.config import CLS_BACKBONES, CLS_FUSIONS, ModelConfig
from shared.metric_names import AUC, DICE_AUTO, HD95_AUTO, HD95_MM, VAL, dice_click_key, metric_key

__all__ = ["register", "run_train_local"]


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train-local",
        help="train both models on one site and write the adapter and a metrics JSON",
        description="Trains segmentation and classification adapters on the site's training split in ROUNDS "
        "chunks of the configured epochs, keeps the chunk with the best validation metric (train.select-metric; "
        "a site without a val split gets one carved from train), tests the starting and the chosen adapter once "
        "on the test split, and writes OUT/adapter.safetensors (+ .json) and OUT/metrics.json.",
    )
    train.add_argument("--site-dir", required=True, type=Path)
    train.add_argument(
        "--config",
        type=Path,
        help="experiment TOML: the run-config keys as tables (e.g. configs/full-models.toml)",
    )
    train.add_argument(
        "--site-config", type=Path, help="site TOML (default: SITE_DIR/site.toml or SITE_DIR.toml)"
    )
    train.add_argument("--base", type=Path, help="base (.safetensors + .json); default: the cached demo base")
    train.add_argument("--adapter", type=Path, help="adapter to start from (default: a fresh one)")
    train.add_argument("--out", type=Path, default=Path("fedabus-local"), help="output folder")
    train.add_argument(
        "--rounds", type=int, default=1, help="chunks of train.seg-epochs/cls-epochs, validated after each"
    )
    train.add_argument(
        "--eval-every", type=int, default=1, help="validate after every N-th chunk (and the last)"
    )
    train.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: model.device)")
    train.add_argument(
        "--state-dir",
        type=Path,
        help="the site's state folder holding its privacy ledger (with privacy.sample-dp; "
        "default ~/.fedabus/site-state/<site folder>)",
    )
    train.set_defaults(func=run_train_local)

    pretrain = subparsers.add_parser(
        "pretrain",
        help="train the small demo base fully on a synthetic public set (cached)",
        description="Real sites use `fedabus make-base` with the official SAM-Med3D checkpoint instead.",
    )
    pretrain.add_argument("--config", type=Path)
    pretrain.add_argument("--out", type=Path, help="write the base here instead of the cache")
    pretrain.add_argument("--cache-dir", type=Path, help="cache folder (default ~/.cache/fedabus)")
    pretrain.set_defaults(func=run_pretrain)

    make = subparsers.add_parser(
        "make-base",
        help="make a base from the official SAM-Med3D checkpoint (+ optional ResNet weights)",
        description="The coordinator runs this once and gives the resulting pair of files to every site.",
    )
    make.add_argument("--sam-checkpoint", required=True, type=Path, help="e.g. sam_med3d_turbo.pth")
    make.add_argument(
        "--cls-backbone", type=Path, help="torchvision-format ImageNet weights of the --cls-arch branches"
    )
    make.add_argument(
        "--cls-depth",
        type=int,
        default=ModelConfig.cls_depth,
        choices=(18, 34, 50),
        help=f"ResNet depth of the classifier branches (default: model.cls-depth's default, {ModelConfig.cls_depth})",
    )
    make.add_argument(
        "--cls-arch",
        default=ModelConfig.cls_backbone,
        choices=CLS_BACKBONES,
        help="classifier branch architecture, as model.cls-backbone (default: resnet, depth --cls-depth)",
    )
    make.add_argument(
        "--cls-fusion",
        default=ModelConfig.cls_fusion,
        choices=CLS_FUSIONS,
        help="classifier plane fusion, as model.cls-fusion (default: ts+c)",
    )
    make.add_argument(
        "--cls-planes",
        default="transverse,sagittal,coronal",
        help="classifier planes, as train.cls-planes (default: all three)",
    )
    make.add_argument("--sam-preset", default="vit_b_ori")
    make.add_argument("--trust-checkpoint", action="store_true", help="allow pickled objects in the .pth")
    make.add_argument("--out", required=True, type=Path)
    make.set_defaults(func=run_make_base)


def run_train_local(args: argparse.Namespace) -> int:
    import torch

    from shared.adapters import extract_adapter, model_specs, save_adapter
    from shared.base import load_base, wrap_for_training
    from shared.config import FLOWER_KEYS, load_config
    from shared.device import resolve_device
    from shared.inference import adapted_models
    from shared.pretrain import ensure_base
    from shared.training.selection import train_with_selection
    from shared.training.site import evaluate_site, open_site, train_site

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(path=args.config, ignore=FLOWER_KEYS)
    device = resolve_device(args.device or config.model.device)
    selection_metric = metric_key(config.train.select_metric, split=VAL)
    site = open_site(
        args.site_dir,
        site_config_path=args.site_config,
        val_fraction=config.data.val_fraction,
        seed=config.train.seed,
    )
    base_path = args.base or ensure_base(config)
    base = load_base(base_path, attention_impl=config.model.attention_impl)
    if args.adapter:
        models = adapted_models(base, args.adapter)
    else:
        torch.manual_seed(config.train.seed)  # a fresh adapter (or automatic segmenter) from the run seed
        models = wrap_for_training(base, model_specs(config))
    carved = " (carved from train)" if site.val_carved else ""
    print(
        f"site {site.name}: {len(site.train_cases)} training, {len(site.val_cases)} validation{carved} and "
        f"{len(site.test_cases)} test cases; device {device}"
    )
    started = time.monotonic()
    before = evaluate_site(models, site, config, device=device)
    plan, ledger = _local_privacy_plan(args, config, site)
    if plan is not None:  # a DP run is one planned round against the ledger; no selection over chunks
        torch.manual_seed(config.train.seed)
        training = train_site(
            models, site, config, device=device, seed=config.train.seed, plan=plan, ledger=ledger
        )
        selection = None
    else:
        selection = train_with_selection(
            models,
            site,
            config,
            device=device,
            rounds=args.rounds,
            eval_every=args.eval_every,
            fingerprints=base.fingerprints,
            seed=config.train.seed,
            progress=lambda r, n, v: print(f"  round {r}/{n}: {selection_metric} {v:.3f}"),
        )
        training = selection.training[-1]
    after = evaluate_site(models, site, config, device=device)
    adapter = extract_adapter(models, base_fingerprints=base.fingerprints, metadata={"site": site.name})
    args.out.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter, args.out / "adapter")
    summary = {
        "site": site.name,
        "base": str(base_path),
        "training": training,
        "selection": None
        if selection is None
        else {
            "metric": selection.metric,
            "chosen_round": selection.chosen_round,
            "value": selection.value,
            "rounds": selection.rounds,
            "history": {str(r): m for r, m in selection.history.items()},
            "note": selection.note,
        },
        "before": before,
        "after": after,
        "seconds": round(time.monotonic() - started, 1),
    }
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=1, allow_nan=True) + "\n")
    seg_keys = (
        (metric_key(DICE_AUTO), metric_key(HD95_AUTO))
        if config.automatic_seg
        else (dice_click_key(1), dice_click_key(config.train.eval_clicks), metric_key(HD95_MM))
    )
    for key in (*seg_keys, metric_key(AUC)):
        print(
            f"  {key:22s} before {before.get(key, float('nan')):.3f}  after {after.get(key, float('nan')):.3f}"
        )
    if selection is not None:
        print(
            f"chosen: round {selection.chosen_round} of {selection.rounds} by {selection.metric} {selection.value:.3f}"
        )
    print(f"adapter: {args.out / 'adapter.safetensors'}; metrics: {args.out / 'metrics.json'}")
    return 0


def _local_privacy_plan(args: argparse.Namespace, config, site):
    """Under ``privacy.sample-dp`` a local run is one planned round against the site's ledger (its ε counts
    towards the same budget as federated rounds); (None, None) otherwise. Exits when the budget is spent."""
    if not config.privacy.sample_dp:
        return None, None
    from shared.privacy.ledger import PrivacyLedger
    from shared.privacy.planning import plan_private_round

    state_dir = args.state_dir or Path.home() / ".fedabus" / "site-state" / site.site_dir.name
    ledger = PrivacyLedger.open(state_dir)
    plan = plan_private_round(config, len(site.train_cases), 1, ledger, run="train-local")
    if not plan.allowed:
        raise SystemExit(f"{site.name}: not training, {plan.reason} (ledger {ledger.path})")
    print(
        f"sample-level DP: noise multiplier seg {plan.seg.noise_multiplier:.3f} / cls {plan.cls.noise_multiplier:.3f}, "
        f"ε after {plan.seg.epsilon_after:.3f} / {plan.cls.epsilon_after:.3f} at δ {plan.delta:.2g}; ledger {ledger.path}"
    )
    return plan, ledger


def run_pretrain(args: argparse.Namespace) -> int:
    from shared.config import FLOWER_KEYS, load_config
    from shared.pretrain import PretrainRecipe, ensure_base, pretrain_base

    config = load_config(path=args.config, ignore=FLOWER_KEYS)
    if args.out:
        recipe = PretrainRecipe.from_config(config)
        pretrain_base(args.out, recipe, config, device=config.model.device)
    else:
        print(f"base: {ensure_base(config, cache_dir=args.cache_dir)}")
    return 0


def run_make_base(args: argparse.Namespace) -> int:
    from shared.base import base_from_checkpoints, save_base
    from shared.training.cls_planes import parse_cls_planes

    base = base_from_checkpoints(
        args.sam_checkpoint,
        sam_config=args.sam_preset,
        cls_backbone=args.cls_backbone,
        cls_depth=args.cls_depth,
        cls_arch=args.cls_arch,
        cls_fusion=args.cls_fusion,
        cls_planes=parse_cls_planes(args.cls_planes),
        trust_pickle=args.trust_checkpoint,
    )
    path = save_base(base, args.out)
    print(
        f"base: {path}\nfingerprint: {base.fingerprint}\nGive both {path.name} and {path.with_suffix('.json').name} to every site."
    )
    return 0
