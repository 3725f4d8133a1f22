"""Benchmark: the utility cost of sample-level DP on the synthetic consortium (issue 6).

Runs the demo federation (``fedabus demo``: same consortium, base, rounds and local epochs every time) once per
target ε — sample-level DP-SGD at every site with ``privacy.target-epsilon = ε`` over the whole run — and once
without DP (ε = ∞), then writes every site's Dice@1, Dice@N, HD95, AUC and the ε each site spent, before and
after federation, to a JSON file and a Markdown table beside it. Not a test: run it by hand (about 4 × the demo's
federation time).

    .venv/bin/python benchmarks/bench_privacy.py --out benchmarks/results/privacy.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, machine, write_report

KEYS = ("test/dice_1click", "test/dice", "test/hd95_mm", "test/auc", "test/auc_gt_planes")
PRIVACY_KEYS = ("privacy/seg_epsilon", "privacy/cls_epsilon")


def run_one(epsilon: float, args: argparse.Namespace, tmp: Path) -> dict:
    """One demo federation at target ``epsilon`` (inf: no DP); returns its summary and wall time."""
    label = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
    out = tmp / f"eps-{label}"
    sets = [f"privacy.sample-dp={'false' if math.isinf(epsilon) else 'true'}"]
    if not math.isinf(epsilon):
        sets += [f"privacy.target-epsilon={epsilon}", f"privacy.max-grad-norm={args.max_grad_norm}"]
    command = [sys.executable, "-m", "shared.cli", "demo", "--out", str(out), "--fresh"]
    command += ["--seed", str(args.seed), "--rounds", str(args.rounds)]
    for item in sets + args.set:
        command += ["--set", item]
    print(f"== epsilon {label}: {' '.join(command[3:])}", flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=REPO)
    summary = json.loads((out / "server" / "summary.json").read_text(encoding="utf-8"))
    return {"epsilon_target": label, "seconds": round(time.monotonic() - started, 1), "summary": summary}


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else "-"


def markdown(results: list[dict]) -> str:
    """One row per (target ε, site): metrics after federation (before in brackets) and the ε spent."""
    head = "| target ε | site | " + " | ".join(KEYS) + " | ε spent (seg / cls) |"
    lines = [head, "|" + "---|" * (len(KEYS) + 3)]
    for result in results:
        before, after = result["summary"].get("before", {}), result["summary"].get("after", {})
        train = result["summary"].get("train", {})
        for site in sorted(after):
            cells = [f"{_fmt(after[site].get(k))} ({_fmt(before.get(site, {}).get(k))})" for k in KEYS]
            spent = " / ".join(_fmt(train.get(site, {}).get(k)) for k in PRIVACY_KEYS)
            lines.append(f"| {result['epsilon_target']} | {site} | " + " | ".join(cells) + f" | {spent} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "privacy.json")
    parser.add_argument("--epsilons", default="1,3,8,inf", help="comma-separated target ε values")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to the demo")
    args = parser.parse_args()
    epsilons = [float(e) for e in args.epsilons.split(",")]
    with tempfile.TemporaryDirectory(prefix="fedabus-privacy-") as tmp:
        results = [run_one(eps, args, Path(tmp)) for eps in epsilons]
    report = {
        "machine": machine(),
        "settings": {
            "rounds": args.rounds,
            "seed": args.seed,
            "max_grad_norm": args.max_grad_norm,
            "set": args.set,
        },
        "results": results,
    }
    write_report(args.out, report, indent=1)
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    print(f"written: {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
