"""Benchmark: one epoch of SAM-Med3D training on 1 vs 2 torch threads, idle or with one core kept busy.

Why the demo's pretraining runs on one thread (``shared.pretrain.PRETRAIN_CPU_THREADS``, docs/performance.md,
"The demo's budget"): each worker, a fresh process, trains the randomly initialised ``--config`` preset (default
``small``, the demo base's) for one epoch over ``--cases`` synthetic cases at the demo's data settings
(``configs/local-demo.toml``), with ``--threads-list`` intra-op threads; with ``--busy`` a ``yes`` process keeps
one core busy around every measurement. Writes the wall and CPU seconds of every run and their medians.

    .venv/bin/python benchmarks/bench_torch_threads.py --busy --out benchmarks/results/torch_threads_busy.json
    .venv/bin/python benchmarks/bench_torch_threads.py --out benchmarks/results/torch_threads_idle.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time

from harness import REPO, Conditions, interleaved, measurement_parser, run_measurements, run_worker


def _worker(args) -> None:
    from dataclasses import replace

    import torch

    from shared.base import build_random_base
    from shared.config import load_config
    from shared.data.loaders import seg_train_loader, site_cases
    from shared.training.seg import train_segmentation

    torch.set_num_threads(args.threads)
    config = load_config(path=REPO / "configs" / "local-demo.toml")
    cases = site_cases(args.site, None)[: args.cases]
    base = build_random_base(args.config, cls_depth=18, seed=args.seed)
    train = replace(config.train, seg_epochs=1, progress=False)
    loader = seg_train_loader(cases, replace(config.data, augment=False), batch_size=train.seg_batch_size)
    list(loader)  # read and preprocess every case first: the epoch below times training only
    wall, cpu = time.perf_counter(), time.process_time()
    train_segmentation(base.sam.requires_grad_(True), loader, config=train, device=torch.device("cpu"))
    print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}))


def _run(args) -> dict:
    conditions = Conditions()
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedabus-threads-") as tmp:
        from shared.data.synth import generate_consortium

        site = generate_consortium(tmp, sites=1, cases=args.cases, seed=args.seed)[0]
        threads = [str(t) for t in args.threads_list.split(",")]
        for repeat, _, count in interleaved(args.repeats, ["train"], threads):
            busy = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if args.busy else None
            try:
                extra = ["--site", str(site), "--cases", str(args.cases), "--config", args.config]
                extra += ["--threads", count, "--seed", str(args.seed)]
                result = run_worker(__file__, extra, what=f"{count} thread(s)")
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            runs.append({"repeat": repeat, "threads": int(count), **result})
            print(f"threads {count}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU", flush=True)
    medians = {
        count: statistics.median(r["wall_s"] for r in runs if str(r["threads"]) == count) for count in threads
    }
    return {**conditions.report(), "busy_core": args.busy, "runs": runs, "median_wall_s": medians}


def main() -> None:
    parser = measurement_parser(__doc__, out="torch_threads.json", hidden_choices={})
    parser.set_defaults(config="small", repeats=2)
    parser.add_argument("--busy", action="store_true", help="keep one core busy with `yes` while measuring")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--threads-list", default="1,2", help="thread counts to compare (comma-separated)")
    parser.add_argument("--site", help=argparse.SUPPRESS)
    run_measurements(parser.parse_args(), worker=_worker, run=_run)


if __name__ == "__main__":
    main()
