"""``fedabus predict``: a radiologist's clicks -> a 3D mask with the input's geometry -> a malignancy probability.

Click indices are given in the array order of the file as SimpleITK returns it (``GetArrayFromImage``:
``z, y, x``); they are mapped through physical space onto the preprocessed grid (canonical orientation,
configured spacing), so any file orientation works. The mask is mapped back onto the file's own grid and
written as NIfTI (opens in ITK-SNAP / 3D Slicer on top of the input).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from shared.adapters import apply_adapter, attach_spec, load_adapter, recorded_configs, spec_from_manifest
from shared.base import BaseModels, load_base
from shared.config import FedabusConfig, SiteConfig
from shared.data.io import read_volume, write_volume
from shared.data.planes import planes_from_config
from shared.data.transforms import Grid, Preprocessed, preprocess_case, restore_geometry
from shared.predictor import SamPredictor3D
from shared.training.cls import predict_lesions

__all__ = ["CasePrediction", "adapted_models", "file_index_to_processed", "predict_case"]


def adapted_models(base: BaseModels, adapter_path: str | Path | None) -> dict[str, torch.nn.Module]:
    """The base models with an adapter applied (its PEFT config read from the adapter's manifest).

    Without an adapter the plain base models are returned (e.g. the pretrained demo base).
    """
    if adapter_path is None:
        return {"seg": base.sam, "cls": base.cls}
    adapter = load_adapter(adapter_path)
    specs = recorded_configs(adapter.manifest)
    models = {}
    for prefix, model in (("seg", base.sam), ("cls", base.cls)):
        spec = specs.get(prefix)
        if spec is None:
            models[prefix] = model
            continue
        models[prefix] = attach_spec(model, spec_from_manifest(spec))
    present = {k: v for k, v in models.items() if specs.get(k) is not None}
    apply_adapter(present, adapter, base_fingerprints=base.fingerprints)
    return models


def file_index_to_processed(
    index_zyx: Sequence[int], original: sitk.Image, processed: Grid
) -> tuple[int, ...]:
    """A voxel index (z, y, x) of the file's array -> the nearest (z, y, x) voxel of the processed grid."""
    x, y, z = (int(v) for v in reversed(tuple(index_zyx)))
    size = original.GetSize()
    if not all(0 <= v < s for v, s in zip((x, y, z), size, strict=True)):
        raise ValueError(
            f"click {tuple(index_zyx)} (z, y, x) lies outside the image of array shape {tuple(reversed(size))}"
        )
    point = original.TransformIndexToPhysicalPoint((x, y, z))
    target = processed.image_of(np.zeros(processed.shape_zyx, dtype=np.uint8))
    ix, iy, iz = target.TransformPhysicalPointToIndex(point)
    return (iz, iy, ix)


@dataclass(frozen=True)
class CasePrediction:
    """The mask on the file's grid, the malignancy probability (None without a lesion) and details."""

    mask: sitk.Image
    probability: float | None
    volume_cm3: float
    clicks_used: int
    planes: np.ndarray | None = None


def predict_case(
    image_path: str | Path,
    clicks: Sequence[Sequence[int]],
    labels: Sequence[int],
    *,
    models: dict[str, torch.nn.Module],
    config: FedabusConfig,
    site_config: SiteConfig | None = None,
    device: torch.device | str = "cpu",
) -> CasePrediction:
    """Segment the lesion the clicks point at and classify it (planes from the predicted mask).

    ``models``: ``{"seg": SAM-Med3D, "cls": classifier}`` with or without adapter (:func:`adapted_models`).
    """
    original = read_volume(image_path, site_config=site_config)
    processed: Preprocessed = preprocess_case(original, None, config.data)
    points = [file_index_to_processed(c, original, processed.grid) for c in clicks]
    precision = config.train.precision
    predictor = SamPredictor3D(models["seg"], device=device, precision=precision)
    predictor.set_image(processed.image, processed.spacing_mm, pad_value=processed.pad_value)
    result = predictor.predict_sequential(points, labels)
    probability, planes = None, None
    if result.mask.any():
        planes = planes_from_config(
            processed.image,
            result.mask,
            config.data,
            spacing_mm=processed.spacing_mm,
            pad_value=processed.pad_value,
        )
        cls = models["cls"].to(device).eval()
        probability = float(predict_lesions(cls, planes[None], torch.device(device), precision=precision)[0])
    mask = restore_geometry(
        result.mask.astype(np.uint8), processed=processed.grid, original=Grid.of(original)
    )
    return CasePrediction(mask, probability, float(result.volume_cm3 or 0.0), result.clicks_used, planes)


def _click(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"click {text!r} must be z,y,x voxel indices, e.g. 40,61,72")
    try:
        return tuple(int(p) for p in parts)  # type: ignore[return-value]
    except ValueError:
        raise argparse.ArgumentTypeError(f"click {text!r} must be three integers z,y,x") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment a lesion from clicks and print its malignancy probability",
        description="Clicks are voxel indices z,y,x in the file's array order (SimpleITK); the first must lie "
        "inside the lesion. The mask is written with exactly the input's geometry.",
    )
    parser.add_argument(
        "--image", required=True, type=Path, help="NIfTI/NRRD/MHA file or DICOM series folder"
    )
    parser.add_argument("--click", action="append", required=True, type=_click, help="positive click z,y,x")
    parser.add_argument("--negative-click", action="append", default=[], type=_click, help="background click")
    parser.add_argument("--adapter", type=Path, help="adapter (.safetensors + .json); default: base only")
    parser.add_argument(
        "--base", type=Path, help="base (.safetensors + .json); default: the cached demo base"
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="experiment TOML: the run-config keys as tables (e.g. configs/full-models.toml)",
    )
    parser.add_argument("--site-config", type=Path, help="site TOML (spacing/orientation overrides)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: model.device)")
    parser.add_argument("--out", required=True, type=Path, help="output mask (.nii.gz)")
    parser.add_argument(
        "--gradcam-dir", type=Path, help="also save Grad-CAM heatmaps of the three planes here"
    )
    parser.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from shared.config import FLOWER_KEYS, load_config, load_site_config
    from shared.device import resolve_device
    from shared.pretrain import ensure_base

    config = load_config(path=args.config, ignore=FLOWER_KEYS)
    device = resolve_device(args.device or config.model.device)
    base_path = args.base or ensure_base(config)
    base = load_base(base_path, attention_impl=config.model.attention_impl)
    site_config = load_site_config(args.site_config) if args.site_config else None
    clicks = list(args.click) + list(args.negative_click)
    labels = [1] * len(args.click) + [0] * len(args.negative_click)
    models = adapted_models(base, args.adapter)
    result = predict_case(
        args.image, clicks, labels, models=models, config=config, site_config=site_config, device=device
    )
    write_volume(result.mask, args.out)
    print(f"mask: {args.out} ({result.volume_cm3:.2f} cm³, {result.clicks_used} click(s) used)")
    if result.probability is None:
        print("malignancy probability: n/a (empty mask: click inside the lesion)")
    else:
        verdict = "malignant" if result.probability > config.train.cls_threshold else "benign"
        print(
            f"malignancy probability: {result.probability:.3f} ({verdict} at threshold {config.train.cls_threshold})"
        )
    return 0
