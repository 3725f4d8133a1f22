"""The GPU day in one command (issue 18, item 4): encoder, training steps and clicks on CUDA, one JSON file.

With random weights, on one device, in one process (CUDA peak memory is reset per measurement):

* ``encoder``: SAM-Med3D image encoder (``vit_b_ori``, one 1×1×128³ image), ``reference`` vs ``fast`` attention ×
  precision (``fp32``, ``bf16``, and ``fp16`` on CUDA) × ``forward`` (inference mode) and ``train`` (forward +
  backward, rank-4 LoRA on every ``qkv``, base frozen): median seconds and peak memory;
* ``exactness``: the largest |fast − reference| of the fp32 encoder output on this device;
* ``kernels`` (CUDA): whether the fast encoder's forward and training step run with SDPA restricted to the
  memory-efficient kernel, and to the flash kernel (expected to refuse: it takes no bias; docs/performance.md);
* ``train_step``: one optimiser step of each model through the real training code (``train_segmentation`` with
  click simulation, ``train_classifier``) per precision;
* ``clicks``: :class:`~shared.predictor.SamPredictor3D` on a 160³ volume: first click (image encoder included),
  cold and warm, and the median further click, per precision.

Run on a CUDA machine (``benchmarks/gpu.sh`` does exactly this)::

    .venv/bin/python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json

Without CUDA it exits with a message. ``--device cpu --quick`` proves the script here in under a minute (the
``small`` architecture at 32³, a ResNet-18 classifier, one repetition, one thread).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from harness import REPO, Conditions, write_report

__all__ = ["main"]

IMPLS = ("reference", "fast")
LORA_TARGETS = r"blocks\.\d+\.attn\.qkv"
#: What a full run and a ``--quick`` run measure: SAM-Med3D preset or config, classifier depth, plane side (px),
#: batch sizes, further clicks and the volume they are made in.
FULL = {
    "sam": "vit_b_ori",
    "cls_depth": 50,
    "plane_size": 64,
    "seg_batch": 2,
    "cls_batch": 8,
    "clicks": 10,
    "volume": (160, 160, 160),
}
#: Changes to the ``small`` preset for ``--quick``: 32³ crops (patch 8: a 4³ token grid in one padded 6³ window).
QUICK_SAM = {"img_size": 32, "input_image_size": [32] * 3, "image_embedding_size": [4] * 3, "window_size": 6}
QUICK = {
    "sam": "small + QUICK_SAM",
    "cls_depth": 18,
    "plane_size": 16,
    "seg_batch": 1,
    "cls_batch": 2,
    "clicks": 2,
    "volume": (48, 48, 48),
}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: Any, *, warmup: int, repeats: int) -> dict[str, Any]:
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs, and CUDA peak memory (MiB)."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        runs.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"median_s": statistics.median(runs), "runs_s": runs, "peak_mib": peak}


def _encoder(sam: str, impl: str, train: bool, device: Any) -> Any:
    """The image encoder (eval) or its rank-4 LoRA model (train), on ``device``."""
    import peft
    import torch

    from shared.models.sam_med3d import build_sam_med3d

    torch.manual_seed(0)
    encoder = build_sam_med3d(sam, attention_impl=impl).image_encoder.to(device)
    if not train:
        return encoder.eval()
    encoder.requires_grad_(False)
    return peft.get_peft_model(
        encoder, peft.LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS)
    ).train()


def _encoder_step(model: Any, image: Any, precision: Any, train: bool) -> Callable[[], None]:
    import torch

    def step() -> None:
        if not train:
            with torch.inference_mode(), precision.autocast():
                model(image)
            return
        model.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = model(image).float().square().mean()
        loss.backward()

    return step


def _encoder_rows(
    args: argparse.Namespace, sizes: dict[str, Any], device: Any, precisions: list[str]
) -> dict:
    import torch

    from shared.precision import Precision

    rows, outputs = [], {}
    for train in (False, True):
        for impl in IMPLS:
            model = _encoder(sizes["sam"], impl, train, device)
            size = (model.base_model.model if train else model).img_size
            image = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1)).to(device)
            if not train:
                with torch.inference_mode():
                    outputs[impl] = model(image).double().cpu()
            for name in precisions:
                step = _encoder_step(model, image, Precision.on(name, device), train)
                timing = _timed(step, device, warmup=args.warmup, repeats=args.repeats)
                rows.append(
                    {"mode": "train" if train else "forward", "impl": impl, "precision": name, **timing}
                )
                print(
                    f"encoder {rows[-1]['mode']:7s} {impl:9s} {name}: {timing['median_s']:.4f} s", flush=True
                )
            del model
    exactness = {
        "max_abs_fast_minus_reference_fp32": float((outputs["fast"] - outputs["reference"]).abs().max())
    }
    return {"encoder": rows, "exactness": exactness}


def _kernel_checks(sizes: dict[str, Any], device: Any) -> dict[str, str]:
    """CUDA only: run the fast encoder with SDPA restricted to one fused kernel; 'ok' or the error."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from shared.precision import Precision

    results = {}
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION):
        for train in (False, True):
            model = _encoder(sizes["sam"], "fast", train, device)
            size = (model.base_model.model if train else model).img_size
            image = torch.randn(1, 1, size, size, size, device=device)
            for name in ("fp32", "bf16"):
                key = f"{backend.name.lower()}/{'train' if train else 'forward'}/{name}"
                try:
                    with sdpa_kernel([backend]):
                        _encoder_step(model, image, Precision.on(name, device), train)()
                    results[key] = "ok"
                except RuntimeError as exc:
                    results[key] = f"refused: {str(exc).splitlines()[0][:300]}"
                print(f"kernel {key}: {results[key]}", flush=True)
    return results


def _train_steps(args: argparse.Namespace, sizes: dict[str, Any], device: Any, precisions: list[str]) -> list:
    """One optimiser step of each model through the training code, per precision."""
    import torch

    from shared.adapters import LoraSpec, attach_lora
    from shared.config import AdapterConfig, TrainConfig
    from shared.models.sam_med3d import build_sam_med3d
    from shared.models.triplane import build_triplane_classifier
    from shared.training.cls import train_classifier
    from shared.training.seg import patch_size_of, train_segmentation

    torch.manual_seed(0)
    seg = attach_lora(build_sam_med3d(sizes["sam"]), LoraSpec()).to(device)
    size = patch_size_of(seg)
    images = torch.randn(sizes["seg_batch"], 1, size, size, size)
    masks = torch.zeros_like(images)
    masks[..., size // 3 : 2 * size // 3, size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = 1.0
    adapter = AdapterConfig()
    cls_spec = LoraSpec(targets=adapter.cls_lora_targets, trainable=tuple(adapter.cls_trainable.split(",")))
    cls = attach_lora(build_triplane_classifier(depth=sizes["cls_depth"]), cls_spec).to(device)
    side = sizes["plane_size"]
    frames = torch.randn(sizes["cls_batch"], 3, 1, side, side)
    labels = torch.arange(sizes["cls_batch"]) % 2
    rows = []
    for name in precisions:
        config = TrainConfig(seg_epochs=1, cls_epochs=1, precision=name, progress=False)
        steps = {
            "seg": partial(train_segmentation, seg, [(images, masks)], config=config, device=device),
            "cls": partial(train_classifier, cls, [(frames, labels)], config=config, device=device),
        }
        for model, step in steps.items():
            timing = _timed(step, device, warmup=args.warmup, repeats=args.repeats)
            rows.append({"model": model, "precision": name, **timing})
            print(f"train step {model} {name}: {timing['median_s']:.4f} s", flush=True)
    return rows


def _clicks(sizes: dict[str, Any], device: Any, precisions: list[str]) -> list:
    """First click (cold: first of the process for this precision; warm: a new crop) and further clicks."""
    import numpy as np
    import torch

    from shared.models.sam_med3d import build_sam_med3d
    from shared.predictor import SamPredictor3D

    torch.manual_seed(0)
    model = build_sam_med3d(sizes["sam"])
    volume = np.random.default_rng(0).normal(0.0, 1.0, sizes["volume"]).astype(np.float32)
    centre = tuple(n // 2 for n in sizes["volume"])
    rows = []
    for name in precisions:
        predictor = SamPredictor3D(model, device=device, precision=name)
        predictor.set_image(volume, (1.0, 1.0, 1.0))
        first = []
        for click in (centre, (10, 10, 10)):
            start = time.perf_counter()
            predictor.predict([click], [1])
            _sync(device)
            first.append(time.perf_counter() - start)
        clicks, labels, further = [(10, 10, 10)], [1], []
        corner = predictor.crop_start(clicks[0])
        rng = np.random.default_rng(1)
        for index in range(sizes["clicks"]):  # clicks inside that crop: the embedding is reused
            offset = rng.integers(2, predictor.patch_size - 2, 3)
            clicks.append(tuple(int(c + v) for c, v in zip(corner, offset, strict=True)))
            labels.append(index % 2)
            start = time.perf_counter()
            predictor.predict(clicks, labels)
            _sync(device)
            further.append(time.perf_counter() - start)
        rows.append(
            {
                "precision": name,
                "first_click_cold_s": first[0],
                "first_click_warm_s": first[1],
                "further_click_median_s": statistics.median(further),
                "further_click_s": further,
            }
        )
        print(f"clicks {name}: first {first[1]:.4f} s, further {rows[-1]['further_click_median_s']:.4f} s")
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --quick")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition: a smoke test")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu.json")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before the timed ones")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"bench_gpu: no CUDA device here (torch {torch.__version__}); this benchmark is for the GPU day. "
            "Prove the script with: .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick",
            file=sys.stderr,
        )
        return 2
    if device.type != "cuda" and not args.quick:
        print("bench_gpu: off CUDA only --quick runs (the full sizes take hours on a CPU)", file=sys.stderr)
        return 2
    if args.quick:  # one thread: on shared CPU cores, tiny ops wait for descheduled worker threads
        args.repeats, args.warmup = 1, 1
        torch.set_num_threads(1)
    conditions = Conditions()
    sizes = FULL
    if args.quick:
        from shared.models.sam_med3d import resolve_config

        sizes = {**QUICK, "sam": {**resolve_config("small"), **QUICK_SAM}}
    precisions = ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda,
        "sizes": sizes,
        "precisions": precisions,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    report.update(_encoder_rows(args, sizes, device, precisions))
    if device.type == "cuda":
        report["kernels"] = _kernel_checks(sizes, device)
    report["train_step"] = _train_steps(args, sizes, device, precisions)
    report["clicks"] = _clicks(sizes, device, precisions)
    report.update(conditions.report())
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
