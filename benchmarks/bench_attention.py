"""Benchmark SAM-Med3D's encoder with ``reference`` vs ``fast`` padded-window attention (issue 7).

Measures, interleaved in one run, on one image (B, 1, S, S, S) with random weights on CPU:

* ``forward``: encoder forward under ``no_grad`` (eval mode);
* ``train``: encoder forward + backward with rank-4 PEFT LoRA on every block's ``qkv`` (base frozen);
* the peak resident memory (``ru_maxrss``) of each measurement.

Every measurement runs in a fresh subprocess (so each peak RSS is that measurement's own), with one untimed
warm-up step before the timed step; repetitions alternate the order of the two implementations. The medians
go to a JSON file together with the machine, the load average, analytic FLOPs of both implementations and the
command line. Not a test: run it by hand on an otherwise idle machine::

    .venv/bin/python benchmarks/bench_attention.py --repeats 3 --out benchmarks/results/attention.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from typing import Any

from harness import Conditions, interleaved, measurement_parser, run_measurements, run_worker

__all__ = ["encoder_flops", "main"]

IMPLS = ("reference", "fast")
MODES = ("forward", "train")
LORA_TARGETS = r"blocks\.\d+\.attn\.qkv"
#: Issue 7's targets on this CPU: forward and forward+backward speed-ups, training peak-memory ratio.
TARGETS = {"forward_speedup": 8.0, "train_speedup": 10.0, "train_peak_memory_ratio": 1 / 3}

FLOP_CONVENTION = (
    "forward FLOPs, 2 per multiply-add; explicit-softmax counting: the attention matmuls (Q·K^T and "
    "weights·V over every key the implementation uses, padded keys for reference, real keys plus the one "
    "virtual key for fast) and the relative-position einsums, the qkv/proj/MLP linears, the patch embedding "
    "and the neck convolutions are counted; softmax/log-sum-exp, LayerNorm, GELU, bias and residual adds "
    "are not"
)


# --------------------------------------------------------------------------------------------- FLOP counting


def _axis_windows(size: int, window: int) -> list[tuple[int, int]]:
    """(number of windows, real extent) runs along one axis: full windows, then the partial last one."""
    full, rest = divmod(size, window)
    return [(count, extent) for count, extent in ((full, window), (1 if rest else 0, rest)) if count]


def _attention_flops(tokens: int, keys: int, dim: int) -> int:
    """Q·K^T and weights·V for ``tokens`` queries over ``keys`` keys (all heads together: dim = heads·hd)."""
    return 2 * (2 * tokens * keys * dim)


def _window_block_flops(cfg: dict[str, Any], batch: int, impl: str) -> dict[str, int]:
    grid, ws, dim = cfg["img_size"] // cfg["patch_size"], cfg["window_size"], cfg["embed_dim"]
    real = batch * grid**3
    if impl == "reference":
        per_axis = -(-grid // ws)  # windows per axis after padding
        windows, tokens = batch * per_axis**3, batch * (per_axis * ws) ** 3
        attention = windows * _attention_flops(ws**3, ws**3, dim)
        rel_pos = 3 * 2 * tokens * ws * dim if cfg["use_rel_pos"] else 0
        qkv_tokens = proj_tokens = tokens
    else:
        attention = rel_pos = 0
        runs = _axis_windows(grid, ws)
        for (nd, ed), (nh, eh), (nw, ew) in ((a, b, c) for a in runs for b in runs for c in runs):
            windows, n = batch * nd * nh * nw, ed * eh * ew
            attention += windows * _attention_flops(n, n + (n < ws**3), dim)
            if cfg["use_rel_pos"]:  # T1 over (query, kw); G2, G3 over (a, b, ws, ws)
                rel_pos += windows * 2 * (n * ws + 2 * ed * eh * ws * ws) * dim
        qkv_tokens, proj_tokens = real + batch, real  # one zero token per sample gives q0, k0, v0
    return {
        "qkv": 2 * qkv_tokens * dim * 3 * dim,
        "attention": attention,
        "rel_pos": rel_pos,
        "proj": 2 * proj_tokens * dim * dim,
        "mlp": 2 * 2 * real * dim * int(dim * cfg["mlp_ratio"]),
    }


def _global_block_flops(cfg: dict[str, Any], batch: int) -> dict[str, int]:
    grid, dim = cfg["img_size"] // cfg["patch_size"], cfg["embed_dim"]
    tokens = batch * grid**3
    return {
        "qkv": 2 * tokens * dim * 3 * dim,
        "attention": batch * _attention_flops(grid**3, grid**3, dim),
        "rel_pos": 3 * 2 * tokens * grid * dim if cfg["use_rel_pos"] else 0,
        "proj": 2 * tokens * dim * dim,
        "mlp": 2 * 2 * tokens * dim * int(dim * cfg["mlp_ratio"]),
    }


def encoder_flops(cfg: dict[str, Any], impl: str, batch: int = 1) -> dict[str, int]:
    """Analytic forward FLOPs of the image encoder by component (see ``FLOP_CONVENTION``), plus ``total``."""
    grid, dim, out = cfg["img_size"] // cfg["patch_size"], cfg["embed_dim"], cfg["out_chans"]
    tokens = batch * grid**3
    counts = {"patch_embed": 2 * tokens * cfg["in_chans"] * cfg["patch_size"] ** 3 * dim}
    for index in range(cfg["depth"]):
        is_global = index in cfg["global_attn_indexes"] or cfg["window_size"] == 0
        block = _global_block_flops(cfg, batch) if is_global else _window_block_flops(cfg, batch, impl)
        for key, value in block.items():
            counts[key] = counts.get(key, 0) + value
    counts["neck"] = 2 * tokens * (dim * out + 27 * out * out)
    counts["total"] = sum(counts.values())
    return counts


# ------------------------------------------------------------------------------------------ one measurement


def _build(config: str, impl: str, mode: str, seed: int):
    import torch

    from shared.models.sam_med3d import build_sam_med3d

    torch.manual_seed(seed)
    encoder = build_sam_med3d(config, attention_impl=impl).image_encoder
    if mode == "forward":
        return encoder.eval(), encoder
    import peft

    encoder.requires_grad_(False)
    model = peft.get_peft_model(encoder, peft.LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    return model.train(), encoder


def _step(model, image, mode: str) -> None:
    import torch

    if mode == "forward":
        with torch.no_grad():
            model(image)
        return
    model.zero_grad(set_to_none=True)
    model(image).square().mean().backward()


def _worker(args: argparse.Namespace) -> None:
    """Run one measurement in this process and print one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, encoder = _build(args.config, args.impl, args.mode, args.seed)
    size = encoder.img_size
    image = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(args.seed))
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.warmup):
        _step(model, image, args.mode)
    start = time.perf_counter()
    _step(model, image, args.mode)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        json.dumps(
            {
                "impl": args.impl,
                "mode": args.mode,
                "seconds": seconds,
                "peak_rss_mib": peak / 1024,  # ru_maxrss is in KiB on Linux
                "rss_after_build_mib": rss_after_build / 1024,
                "threads": torch.get_num_threads(),
                "trainable_parameters": trainable,
            }
        )
    )


def _measure(args: argparse.Namespace, impl: str, mode: str) -> dict[str, Any]:
    arguments = ["--impl", impl, "--mode", mode, "--config", args.config, "--threads", str(args.threads)]
    arguments += ["--warmup", str(args.warmup), "--seed", str(args.seed)]
    return run_worker(__file__, arguments, what=f"{impl}/{mode}")


# ---------------------------------------------------------------------------------------------- the report


def _summarise(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for impl in IMPLS:
        for mode in MODES:
            rows = [m for m in measurements if m["impl"] == impl and m["mode"] == mode]
            summary.setdefault(impl, {})[mode] = {
                "seconds_median": statistics.median(m["seconds"] for m in rows),
                "seconds_min": min(m["seconds"] for m in rows),
                "seconds_all": [round(m["seconds"], 3) for m in rows],
                "peak_rss_mib_median": statistics.median(m["peak_rss_mib"] for m in rows),
                "rss_after_build_mib_median": statistics.median(m["rss_after_build_mib"] for m in rows),
            }
    ref, fast = summary["reference"], summary["fast"]
    ratios = {
        "forward_speedup": ref["forward"]["seconds_median"] / fast["forward"]["seconds_median"],
        "train_speedup": ref["train"]["seconds_median"] / fast["train"]["seconds_median"],
        "forward_peak_memory_ratio": fast["forward"]["peak_rss_mib_median"]
        / ref["forward"]["peak_rss_mib_median"],
        "train_peak_memory_ratio": fast["train"]["peak_rss_mib_median"] / ref["train"]["peak_rss_mib_median"],
    }
    # the fastest run of each is the least disturbed by other processes on a shared machine
    best = {f"{mode}_speedup": ref[mode]["seconds_min"] / fast[mode]["seconds_min"] for mode in MODES}
    return {"per_impl": summary, "ratios": ratios, "ratios_of_fastest_runs": best}


def _meets(ratios: dict[str, float]) -> dict[str, bool]:
    return {
        "forward_speedup": ratios["forward_speedup"] >= TARGETS["forward_speedup"],
        "train_speedup": ratios["train_speedup"] >= TARGETS["train_speedup"],
        "train_peak_memory_ratio": ratios["train_peak_memory_ratio"] <= TARGETS["train_peak_memory_ratio"],
    }


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from shared.models.sam_med3d import resolve_config

    cfg = resolve_config(args.config)
    conditions = Conditions()
    measurements = []
    for repeat, mode, impl in interleaved(args.repeats, MODES, IMPLS):
        row = _measure(args, impl, mode)
        print(
            f"[{repeat + 1}/{args.repeats}] {mode:7s} {impl:9s} {row['seconds']:8.2f} s  "
            f"peak RSS {row['peak_rss_mib']:7.0f} MiB",
            flush=True,
        )
        measurements.append({"repeat": repeat, **row})
    summary = _summarise(measurements)
    flops = {impl: encoder_flops(cfg, impl) for impl in IMPLS}
    return {
        "what": "SAM-Med3D image encoder, reference vs fast padded-window attention (issue 7)",
        "config": args.config,
        "input_shape": [1, cfg["in_chans"], cfg["img_size"], cfg["img_size"], cfg["img_size"]],
        "lora": {"rank": 4, "alpha": 4, "targets": LORA_TARGETS, "base": "frozen"},
        "method": (
            "each measurement in a fresh subprocess: build the encoder (random weights, seed "
            f"{args.seed}), {args.warmup} untimed warm-up step(s), one timed step; peak RSS = ru_maxrss of "
            "that subprocess; repetitions interleaved with alternating order; medians reported"
        ),
        "threads": args.threads or "torch default",
        "repeats": args.repeats,
        **conditions.report(),
        "measurements": measurements,
        **summary,
        "targets": TARGETS,
        "meets_targets": _meets(summary["ratios"]),
        "flops": {"convention": FLOP_CONVENTION, **flops},
        "flops_ratio_reference_over_fast": flops["reference"]["total"] / flops["fast"]["total"],
    }


def _parser() -> argparse.ArgumentParser:
    parser = measurement_parser(
        __doc__, out="attention.json", hidden_choices={"--impl": IMPLS, "--mode": MODES}
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed one")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    report = run_measurements(args, worker=_worker, run=_run)
    if report is None:  # a worker process
        return 0
    ratios, flops = report["ratios"], report["flops"]
    print(
        f"forward {ratios['forward_speedup']:.1f}x, forward+backward (LoRA) {ratios['train_speedup']:.1f}x, "
        f"training peak memory {ratios['train_peak_memory_ratio']:.2f} of reference; GFLOPs "
        f"{flops['reference']['total'] / 1e9:.1f} -> {flops['fast']['total'] / 1e9:.1f}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
