"""Benchmark: local training on one synthetic site, quality before and after (issue 4).

Generates a synthetic site, makes (or reuses) the pretrained demo base, runs ``fedabus train-local`` with
``configs/local-demo.toml`` and writes Dice at 1 and 5 clicks, HD95 and AUC before and after training, the
wall time and the machine to a JSON file. Not a test: run it by hand.

    .venv/bin/python benchmarks/bench_local_training.py --out benchmarks/results/local_training.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, machine, write_report

KEYS = ("test/dice_1click", "test/dice_5click", "test/hd95_mm", "test/auc", "test/auc_gt_planes")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "local_training.json")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--base", type=Path, help="base to fine-tune (default: the cached pretrained demo base)"
    )
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "local-demo.toml")
    args = parser.parse_args()
    fedabus = [sys.executable, "-m", "shared.cli"]
    with tempfile.TemporaryDirectory(prefix="fedabus-bench-") as tmp:
        subprocess.run(
            [
                *fedabus,
                "synth",
                "--out",
                f"{tmp}/sites",
                "--sites",
                "1",
                "--cases",
                str(args.cases),
                "--seed",
                str(args.seed),
            ],
            check=True,
            cwd=REPO,
        )
        command = [
            *fedabus,
            "train-local",
            "--site-dir",
            f"{tmp}/sites/site_a",
            "--config",
            str(args.config),
            "--out",
            f"{tmp}/local",
        ]
        if args.base:
            command += ["--base", str(args.base)]
        started = time.monotonic()
        subprocess.run(command, check=True, cwd=REPO)
        seconds = time.monotonic() - started
        metrics = json.loads(Path(tmp, "local", "metrics.json").read_text(encoding="utf-8"))
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "site_cases": args.cases,
        "train_cases": metrics["training"]["num-examples"],
        "seconds_train_and_eval": round(seconds, 1),
        "before": {k: metrics["before"].get(k) for k in KEYS},
        "after": {k: metrics["after"].get(k) for k in KEYS},
        "machine": {**machine(), "load_1min": os.getloadavg()[0]},
    }
    write_report(args.out, result, indent=1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
