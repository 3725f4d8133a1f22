"""Benchmark interactive click latency of SAM-Med3D ``vit_b_ori`` on CPU (issue 18, item 1).

Measures, with random weights and ``fast`` attention, each in a fresh subprocess:

* ``clicks``: a 160³ volume. The **first click** (crop, image encoder, prompt encoder, mask decoder,
  upsampling and the stitch into the full volume): once as the first call of the process (``cold``) and
  once for a new crop in a process that has already run the model (``warm``). Then ``--clicks`` **further
  clicks** in the same crop (prompt encoder + mask decoder, upsampling, stitch): per-click wall time of
  :meth:`SamPredictor3D.predict` and, inside it, the prompt encoder + mask decoder alone.
* ``predict``: what ``fedabus predict`` does on a full-size synthetic ABUS volume (``--abus-shape``, uint8
  NIfTI): read, preprocess, 3 clicks one after the other, mask planes, tri-plane ResNet50, mask restored onto
  the file's grid and written as .nii.gz. Wall time and peak RSS (``ru_maxrss``) of the subprocess.

Each runs with the predictor as it is (``optimised``) and with the per-click path it replaced
(``unoptimised``: ``decode_clicks`` recomputing the dense positional encoding, a full-size mask for every
click, the mask volume counted over the whole volume), interleaved with alternating order. Medians go to a
JSON file with the machine, the load average and the command. Not a test: run it by hand::

    .venv/bin/python benchmarks/bench_clicks.py --repeats 3 --out benchmarks/results/clicks.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import REPO, Conditions, interleaved, measurement_parser, run_measurements, run_worker

__all__ = ["main"]

VARIANTS = ("optimised", "unoptimised")
MODES = ("clicks", "predict")
#: Issue 18's targets on this CPU (seconds): median further click and first click.
TARGETS = {"further_click_s": 0.030, "first_click_s": 1.0}
VOLUME_SHAPE = (160, 160, 160)
ABUS_SPACING_MM = (0.5, 0.2, 0.2)  # (z, y, x) of the synthetic ABUS file


def _predictor_class(variant: str):
    """The predictor class of ``variant`` (the unoptimised one replays the old per-click path)."""
    import numpy as np
    import torch

    from shared.data.blocks import Block
    from shared.metrics import lesion_volume_cm3
    from shared.predictor import Prediction, SamPredictor3D
    from shared.training.seg import decode_clicks, upsample_logits

    if variant == "optimised":
        return SamPredictor3D

    class Unoptimised(SamPredictor3D):
        def _run_decoder(self, embedding, coords, labels, previous):
            return decode_clicks(self.model, embedding, coords, labels, previous)

        def predict_sequential(self, clicks, labels):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                for count in range(1, len(clicks)):
                    self.predict(clicks[:count], labels[:count])
            return self.predict(clicks, labels)

        def _prediction(self, start, low_res, iou, clicks_used, ignored):
            volume = self._require_image()
            with torch.inference_mode():
                crop_mask = (upsample_logits(low_res, self.patch_size)[0, 0] > 0).cpu().numpy()
            mask = np.zeros(volume.shape, dtype=bool)
            inside, part = Block(start, self.patch_size, 0).overlap(volume.shape)
            mask[inside] = crop_mask[part]
            cm3 = None if self._spacing_mm is None else lesion_volume_cm3(mask, self._spacing_mm)
            return Prediction(mask, iou, start, low_res.detach().cpu(), clicks_used, ignored, cm3)

    return Unoptimised


def _timed_decoder(predictor) -> list[float]:
    """Wrap ``predictor._run_decoder`` so that each call's wall time (s) is appended to the returned list."""
    seconds: list[float] = []
    inner = predictor._run_decoder

    def timed(*args):
        start = time.perf_counter()
        out = inner(*args)
        seconds.append(time.perf_counter() - start)
        return out

    predictor._run_decoder = timed
    return seconds


def _clicks_worker(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from shared.models.sam_med3d import build_sam_med3d

    torch.manual_seed(args.seed)
    model = build_sam_med3d(args.config, attention_impl="fast")
    predictor = _predictor_class(args.variant)(model)
    rng = np.random.default_rng(args.seed)
    predictor.set_image(rng.normal(0.0, 1.0, VOLUME_SHAPE).astype(np.float32), (1.0, 1.0, 1.0))
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    decoder_seconds = _timed_decoder(predictor)
    centre = tuple(n // 2 for n in VOLUME_SHAPE)

    start = time.perf_counter()
    predictor.predict([centre], [1])  # first call of the process: one-time costs included
    cold = time.perf_counter() - start
    clicks, labels = [(40, 40, 40)], [1]  # a new crop: a new embedding in a warm process
    start = time.perf_counter()
    predictor.predict(clicks, labels)
    warm = time.perf_counter() - start
    further, decoder_seconds[:] = [], []
    corner = predictor.crop_start(clicks[0])
    lo, hi = min(corner) + 2, max(corner) + predictor.patch_size - 2  # clicks inside that crop
    for index in range(args.clicks):
        clicks.append(tuple(int(v) for v in rng.integers(lo, hi, 3)))
        labels.append(index % 2)
        start = time.perf_counter()
        predictor.predict(clicks, labels)
        further.append(time.perf_counter() - start)
    return {
        "first_click_cold_s": cold,
        "first_click_warm_s": warm,
        "further_click_s": further,
        "further_click_median_s": statistics.median(further),
        "decoder_s": list(decoder_seconds),
        "decoder_median_s": statistics.median(decoder_seconds),
        "encoder_calls": predictor.encoder_calls,
        "rss_after_build_mib": rss_after_build / 1024,
    }


def _synthetic_abus(path: Path, shape: tuple[int, int, int], seed: int) -> list[tuple[int, int, int]]:
    """Write a uint8 ABUS-like volume (speckle, one dark lesion) to ``path``; returns 3 clicks (z, y, x)."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    array = rng.integers(60, 200, size=shape, dtype=np.uint8)
    centre = np.array(shape) // 2
    radius = np.array([12, 30, 30])
    box = tuple(slice(c - r, c + r) for c, r in zip(centre, radius, strict=True))
    grid = np.ogrid[tuple(slice(-r, r) for r in radius)]
    inside = sum((g / r) ** 2 for g, r in zip(grid, radius, strict=True)) <= 1.0
    array[box][inside] = rng.integers(5, 40, size=int(inside.sum()), dtype=np.uint8)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(ABUS_SPACING_MM)))
    sitk.WriteImage(image, str(path))
    z, y, x = (int(v) for v in centre)
    return [(z, y, x), (z + 4, y + 10, x - 8), (z - 3, y - 12, x + 6)]


def _predict_worker(args: argparse.Namespace) -> dict[str, Any]:
    import shared.inference as inference
    from shared.base import build_random_base
    from shared.config import FLOWER_KEYS, load_config
    from shared.data.io import write_volume

    config = load_config(path=REPO / "configs" / "full-models.toml", ignore=FLOWER_KEYS)
    with tempfile.TemporaryDirectory(prefix="bench_clicks_") as folder:
        image_path = Path(folder) / "abus.nii"
        clicks = _synthetic_abus(image_path, tuple(args.abus_shape), args.seed)
        base = build_random_base(config.model.sam_preset, cls_depth=config.model.cls_depth, seed=args.seed)
        inference.SamPredictor3D = _predictor_class(args.variant)  # what predict_case constructs
        models = {"seg": base.sam, "cls": base.cls}
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        result = inference.predict_case(image_path, clicks, [1, 1, 0], models=models, config=config)
        write_volume(result.mask, Path(folder) / "mask.nii.gz")
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_predict_mib": rss_before / 1024,
        "classified": result.probability is not None,
        "mask_cm3": result.volume_cm3,
        "clicks_used": result.clicks_used,
    }


def _worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    row = _clicks_worker(args) if args.mode == "clicks" else _predict_worker(args)
    row.update(variant=args.variant, mode=args.mode, threads=torch.get_num_threads())
    row.setdefault("peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(row))


def _measure(args: argparse.Namespace, variant: str, mode: str) -> dict[str, Any]:
    arguments = [
        "--variant",
        variant,
        "--mode",
        mode,
        "--config",
        args.config,
        "--threads",
        str(args.threads),
    ]
    arguments += ["--clicks", str(args.clicks), "--seed", str(args.seed)]
    arguments += ["--abus-shape", *(str(n) for n in args.abus_shape)]
    return run_worker(__file__, arguments, what=f"{variant}/{mode}")


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def _summarise(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for variant in VARIANTS:
        clicks = [m for m in measurements if m["variant"] == variant and m["mode"] == "clicks"]
        predict = [m for m in measurements if m["variant"] == variant and m["mode"] == "predict"]
        summary[variant] = {}
        if clicks:
            summary[variant]["clicks"] = {
                key: _median(clicks, key)
                for key in (
                    "first_click_cold_s",
                    "first_click_warm_s",
                    "further_click_median_s",
                    "decoder_median_s",
                    "peak_rss_mib",
                )
            }
            # the median of every further click of every repetition, and the least disturbed repetition
            summary[variant]["clicks"]["further_click_all_median_s"] = statistics.median(
                s for m in clicks for s in m["further_click_s"]
            )
            summary[variant]["clicks"]["further_click_best_run_median_s"] = min(
                m["further_click_median_s"] for m in clicks
            )
        if predict:
            summary[variant]["predict"] = {
                "seconds_median": _median(predict, "seconds"),
                "seconds_all": [round(m["seconds"], 2) for m in predict],
                "peak_rss_mib_median": _median(predict, "peak_rss_mib"),
            }
    return summary


def _meets(summary: dict[str, Any]) -> dict[str, bool]:
    clicks = summary["optimised"].get("clicks")
    if not clicks:
        return {}
    return {
        "further_click_s": clicks["further_click_median_s"] <= TARGETS["further_click_s"],
        "first_click_s (warm)": clicks["first_click_warm_s"] <= TARGETS["first_click_s"],
        "first_click_s (cold)": clicks["first_click_cold_s"] <= TARGETS["first_click_s"],
    }


def _run(args: argparse.Namespace) -> dict[str, Any]:
    conditions = Conditions()
    measurements = []
    for repeat, mode, variant in interleaved(args.repeats, args.modes, VARIANTS):
        row = _measure(args, variant, mode)
        if mode == "clicks":
            text = (
                f"first {row['first_click_cold_s']:.2f} s cold / {row['first_click_warm_s']:.2f} s warm, "
                f"further {1000 * row['further_click_median_s']:.1f} ms "
                f"(decoder {1000 * row['decoder_median_s']:.1f} ms)"
            )
        else:
            text = f"{row['seconds']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB"
        print(f"[{repeat + 1}/{args.repeats}] {mode:7s} {variant:11s} {text}", flush=True)
        measurements.append({"repeat": repeat, "load_1min": os.getloadavg()[0], **row})
    summary = _summarise(measurements)
    return {
        "what": "SAM-Med3D interactive click latency and fedabus-predict cost on CPU (issue 18, item 1)",
        "config": args.config,
        "volume_shape": list(VOLUME_SHAPE),
        "abus_shape": list(args.abus_shape),
        "abus_spacing_mm": list(ABUS_SPACING_MM),
        "method": (
            "each measurement in a fresh subprocess, random weights (seed "
            f"{args.seed}), fast attention; clicks: first click cold (first call of the process) and warm "
            f"(new crop after that), then {args.clicks} further clicks in the warm crop; predict: "
            "predict_case + write_volume on a synthetic uint8 NIfTI, peak RSS = ru_maxrss of the "
            "subprocess; variants interleaved with alternating order; medians reported"
        ),
        "threads": args.threads or "torch default",
        "repeats": args.repeats,
        **conditions.report(),
        "measurements": measurements,
        **summary,
        "targets": TARGETS,
        "meets_targets": _meets(summary),
    }


def _parser() -> argparse.ArgumentParser:
    parser = measurement_parser(
        __doc__, out="clicks.json", hidden_choices={"--variant": VARIANTS, "--mode": MODES}
    )
    parser.add_argument("--clicks", type=int, default=10, help="further clicks per repetition")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--abus-shape", nargs=3, type=int, default=[350, 600, 850], metavar=("Z", "Y", "X"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.repeats < 1 or args.clicks < 1:
        raise SystemExit(f"--repeats and --clicks must be >= 1, got {args.repeats} and {args.clicks}")
    report = run_measurements(args, worker=_worker, run=_run)
    if report is None:  # a worker process
        return 0
    print(json.dumps({k: report[k] for k in (*VARIANTS, "meets_targets")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
