"""``fedabus study``: local vs federated vs pooled vs leave-one-site-out on site folders, with honest model
selection and confidence intervals (see docs/studies.md).

Examples::

    fedabus study --sites /data/site_a /data/site_b /data/site_c --arms zero-shot,local,federated,pooled,loso \\
        --base base.safetensors --rounds 10 --folds 5 --out study-1
    fedabus study --demo --out ~/.fedabus/study-demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.metric_names import AUC, DICE_AUTO, dice_click_name

__all__ = ["register", "run_study_command"]

DEFAULT_ARMS = "zero-shot,local,federated,pooled,loso"
DEMO_ARMS = "local,federated,pooled"
#: The demo study: a small synthetic consortium and the demo's CPU settings, within ~20 minutes on 2 cores.
DEMO_SITES, DEMO_CASES, DEMO_ROUNDS, DEMO_EPOCHS = 3, 24, 4, 2
DEMO_SETTINGS = {
    "model.cls-depth": 18,
    "train.seg-lr": 6e-3,
    "train.cls-lr": 5e-3,
    "train.eval-clicks": 3,
    "train.progress": False,
    "federation.eval-interval": 1,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "study",
        help="compare zero-shot, local, federated, pooled and leave-one-site-out training across sites",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sites",
        nargs="+",
        type=Path,
        default=[],
        help="site folders (either 3D layout, or BUSI for the 2D arms)",
    )
    parser.add_argument(
        "--site-config", nargs="*", type=Path, default=[], help="site TOMLs (matched by name)"
    )
    parser.add_argument(
        "--arms", default=None, help=f"comma-separated arms (default {DEFAULT_ARMS}; demo {DEMO_ARMS})"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (reused to resume)")
    parser.add_argument("--config", type=Path, help="experiment TOML (same keys as the run config)")
    parser.add_argument(
        "--base", type=Path, help="base (.safetensors + .json); default: the cached demo base"
    )
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds = local epoch chunks")
    parser.add_argument(
        "--folds", type=int, default=1, help="case-level K-fold cross-validation per site (1: off)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="repeats with seeds train.seed, +1, ...")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: model.device)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[ARM:]KEY=VALUE",
        help="config value for every arm, or for one arm (e.g. federated:federation.strategy=fedprox)",
    )
    parser.add_argument(
        "--demo", action="store_true", help="generate a synthetic 3-site consortium and study it"
    )
    parser.set_defaults(func=run_study_command)


def _demo_sites(out: Path, seed: int) -> list[Path]:
    from shared.data.synth import generate_consortium
    from shared.demo import demo_synth_options

    folder = out / "sites"
    if (folder / "consortium.json").is_file():
        return sorted(p for p in folder.iterdir() if p.is_dir())
    return generate_consortium(
        folder,
        sites=DEMO_SITES,
        cases=DEMO_CASES,
        seed=seed,
        options=demo_synth_options(),
        workers=None,
    )


def run_study_command(args: argparse.Namespace) -> int:
    from shared.config import parse_assignments
    from shared.device import resolve_device
    from shared.pretrain import ensure_base
    from shared.study.runner import Study, load_study_config, run_study
    from shared.study.sites import StudyError, check_busi_arms, open_study_sites

    out = args.out.expanduser().resolve()
    sets = parse_assignments(args.set)
    if args.demo:
        sets = {**DEMO_SETTINGS, "train.seg-epochs": DEMO_EPOCHS, "train.cls-epochs": DEMO_EPOCHS, **sets}
    arms = [
        a.strip() for a in (args.arms or (DEMO_ARMS if args.demo else DEFAULT_ARMS)).split(",") if a.strip()
    ]
    try:
        config, arm_configs = load_study_config(args.config, sets, arms)
        site_dirs = _demo_sites(out, config.train.seed) if args.demo else list(args.sites)
        if not site_dirs:
            raise StudyError("no site folders: give --sites DIR [DIR ...] or --demo")
        check_busi_arms(site_dirs, arms, {arm: arm_configs.get(arm, config) for arm in arms})
        sites = open_study_sites(site_dirs, args.site_config, config, busi_root=out / "busi-sites")
        base = args.base.resolve() if args.base else ensure_base(config)
        study = Study(
            sites=sites,
            arms=arms,
            base_path=base,
            out=out,
            config=config,
            rounds=args.rounds or (DEMO_ROUNDS if args.demo else 3),
            folds=args.folds,
            repeats=args.repeats,
            arm_configs=arm_configs,
            device=resolve_device(args.device or config.model.device),
        )
        print(
            f"study: arms {', '.join(arms)}; sites {', '.join(s.name for s in sites)}; {study.rounds} rounds, "
            f"{study.folds} fold(s), {study.repeats} repeat(s); output {out}"
        )
        summary = run_study(study)
    except StudyError as exc:
        raise SystemExit(f"fedabus study: {exc}") from None
    _print_table(summary)
    print(f"\nresults: {out / 'results.csv'}\nreport:  {out / 'report.html'}\nstudy:   {out / 'study.json'}")
    return 0


def _print_table(summary: dict) -> None:
    """Per test site and model: Dice@1 (``dice_auto`` for an automatic segmenter, marked ``(auto)``) and AUC
    with their 95% CIs (pooled over folds when there are folds)."""
    shown = (dice_click_name(1), DICE_AUTO, AUC)
    rows = [r for r in summary["results"] if r["metric"] in shown and r["repeat"] == 0]
    folds = {r["fold"] for r in rows}
    rows = [r for r in rows if r["fold"] == ("all" if "all" in folds else next(iter(folds), None))]
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        ci = f"{_num(r['value'])} [{_num(r['ci_low'])}, {_num(r['ci_high'])}]"
        mark = "" if r["internal"] else " (ext)"
        metric = dice_click_name(1) if r["metric"] == DICE_AUTO else r["metric"]
        ci += " (auto)" if r["metric"] == DICE_AUTO else ""
        cells.setdefault((r["test_site"], r["model"] + mark), {})[metric] = ci
    print(f"\n{'test site':10s} {'model':22s} {'Dice@1 [95% CI]':>24s} {'AUC [95% CI]':>24s}")
    for (site, model), values in sorted(cells.items()):
        print(
            f"{site:10s} {model:22s} {values.get(dice_click_name(1), 'n/a'):>24s} {values.get(AUC, 'n/a'):>24s}"
        )


def _num(value) -> str:
    try:
        return f"{float(value):.3f}" if value == value else "n/a"
    except (TypeError, ValueError):
        return "n/a"
