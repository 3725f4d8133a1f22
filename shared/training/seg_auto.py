"""Training loss and whole-volume evaluation of the fully automatic segmenters (``model.seg-model = segresnet``,
``dynunet2d`` or ``u2net-lite``; :mod:`shared.models.auto_seg`).

**Training.** SegResNet uses exactly the SAM path's data: the lesion-centred ``P³`` crops of
:func:`shared.data.loaders.seg_train_loader` with the same augmentation and crop jitter. The 2D segmenters use
the chosen sweep slices of the training cases (:func:`shared.data.loaders2d.slice_train_loader`: every lesion
slice plus ``data.slice-negative-fraction`` lesion-free ones, ``data.slice-size`` square frames). All share
AdamW, schedule, FedProx and autocast (:func:`shared.training.seg.train_segmentation` runs them); only the loss
differs from the click path: MONAI's ``DiceCELoss(sigmoid=True)`` on the network's logits, with no click, and
for a deep-supervised 2D network MONAI's ``DeepSupervisionLoss`` of it over every head (:func:`auto_seg_loss`).

**Evaluation sees the whole volume, never the lesion's location.** Only "predict a volume" differs between the
3D and the 2D networks (:func:`predict_volume`): SegResNet sweeps the preprocessed volume with MONAI's
``sliding_window_inference`` (``P³`` windows, ``data.patch-size``, 25% overlap, Gaussian blending); a 2D
network predicts every sweep slice ``image[k]`` (H, W) as a ``data.slice-size`` frame
(:func:`shared.data.slices2d.fit_square`), whose probabilities are cut back to (H, W)
(:func:`~shared.data.slices2d.unfit_square`) and stacked along the sweep axis into (D, H, W). The probabilities
are thresholded at 0.5 into the full-volume prediction. Dice, IoU, precision, recall and HD95 (mm) are those of
that prediction against the whole ground truth, so every false positive anywhere in the volume counts. This is
harder than the click path's setting (its prediction lives only in the lesion-covering blocks that the ground
truth chooses and a click prompts), and the metrics carry their own names (``dice_auto``, ``hd95_mm_auto``,
``iou_auto`` …, :data:`shared.metric_names.AUTO_NAMES`): a click metric is never filled by an automatic
prediction.

The metrics are computed on the box holding every predicted and every lesion voxel plus one voxel (outside it
both masks are empty, so the values are those of the full volume); :class:`~shared.training.seg_eval.PredictedMask`
keeps that box for the classifier's planes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.config import DataConfig, TrainConfig
from shared.metric_names import DICE, DICE_AUTO, HD95_AUTO, HD95_MM, HD95_UNDEFINED, N_CASES_SEG, auto_name
from shared.metric_names import metric_key as _key
from shared.metrics import (
    GroupStats,
    hd95_mm,
    lesion_volume_cm3,
    overlap_metrics,
    stratified_metrics_dict,
    stratify,
    volume_bin,
)
from shared.models.auto_seg import SUPERVISION_WEIGHTS, auto_segmenter_of
from shared.statistics import Estimate, segmentation_estimates
from shared.training.seg_eval import PredictedMask, SegCase, evaluate_each

__all__ = [
    "SLIDING_WINDOW_OVERLAP",
    "AutoCaseResult",
    "AutoSegEvaluation",
    "auto_seg_loss",
    "auto_segmentation_estimates",
    "evaluate_auto_segmentation",
    "predict_volume",
]

#: Fraction by which neighbouring sliding windows overlap (MONAI's ``overlap``).
SLIDING_WINDOW_OVERLAP = 0.25
#: Slices per forward pass of a 2D segmenter's evaluation (memory: about 4 × this × slice-size² bytes per
#: feature channel).
SLICES_PER_FORWARD = 16


def auto_seg_loss(
    model: nn.Module, images: torch.Tensor, masks: torch.Tensor, *, loss_fn: nn.Module
) -> torch.Tensor:
    """``loss_fn(logits, masks)`` of the automatic segmenter on crops ``(B, 1, P, P, P)`` or frames
    ``(B, 1, S, S)``; masks of the same shape, binary. A deep-supervised 2D network's heads ``(B, K, 1, S, S)``
    are summed by MONAI's ``DeepSupervisionLoss(loss_fn)`` with its kind's weights
    (:data:`~shared.models.auto_seg.SUPERVISION_WEIGHTS`: halving per head for DynUNet, equal for U2NET-Lite).
    The logits are cast to float32 for the loss (as the click path does). Returns a scalar tensor."""
    if tuple(masks.shape) != tuple(images.shape):
        raise ValueError(f"masks shape {tuple(masks.shape)} differs from images shape {tuple(images.shape)}")
    logits = model(images).float()
    masks = masks.to(images.device, torch.float32)
    if logits.ndim == images.ndim + 1:  # deep supervision: (B, K, 1, ...), the main output first
        from monai.losses import DeepSupervisionLoss

        segmenter = auto_segmenter_of(model)
        weights = SUPERVISION_WEIGHTS[segmenter.spec.kind] if segmenter is not None else "exp"
        return DeepSupervisionLoss(loss_fn, weight_mode=weights)(list(logits.unbind(1)), masks)
    return loss_fn(logits, masks)


@dataclass(frozen=True)
class AutoCaseResult:
    """Evaluation of one case by the automatic segmenter: whole-volume ``dice`` and ``hd95_mm`` (NaN when the
    prediction or the lesion is empty), ``overlaps`` (``iou_auto``, ``seg_precision_auto``,
    ``seg_recall_auto``), the ground-truth lesion volume and its bin, and the ``prediction`` (None when the
    caller asked not to keep it). ``dice_curve`` is empty: no click round exists."""

    case_id: str
    dice: float
    hd95_mm: float
    volume_cm3: float
    volume_bin: str
    birads: str | None
    label: int | None
    prediction: PredictedMask | None
    overlaps: dict[str, float]
    dice_curve: tuple[float, ...] = ()

    def record(self) -> dict[str, Any]:
        """JSON-ready per-case values under the automatic names (no mask), also :func:`stratify`'s input."""
        return {
            "case_id": self.case_id,
            DICE_AUTO: self.dice,
            HD95_AUTO: self.hd95_mm,
            **self.overlaps,
            "dice_curve": [],
            "volume_cm3": self.volume_cm3,
            "volume_bin": self.volume_bin,
            "birads": self.birads,
            "label": self.label,
        }


@dataclass(frozen=True)
class AutoSegEvaluation:
    """All cases of one split: per-case results, the flat ``metrics`` (``{split}/dice_auto`` …, strata
    ``{split}/volume/0-5/dice_auto_mean`` …) and the ``strata`` by BI-RADS and volume bin."""

    cases: list[AutoCaseResult]
    metrics: dict[str, float]
    strata: dict[str, dict[str, dict[str, GroupStats]]]
    curve: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Metrics and per-case records as plain JSON types (NaN stays a float)."""
        return {"metrics": dict(self.metrics), "curve": [], "cases": [c.record() for c in self.cases]}


def auto_segmentation_estimates(
    dice: Iterable[float],
    hd95: Iterable[float],
    *,
    overlaps: Mapping[str, Iterable[float]] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Case-bootstrap estimates of the automatic metrics (``dice_auto``, ``hd95_mm_auto`` and each overlap
    given under its automatic name): :func:`shared.statistics.segmentation_estimates` of one-value curves,
    under the automatic names."""
    dice = [float(v) for v in dice]
    estimates = segmentation_estimates(
        [[v] for v in dice],
        list(hd95),
        overlaps={k: list(v) for k, v in (overlaps or {}).items()},
        n_boot=n_boot,
        seed=seed,
    )
    out = {DICE_AUTO: estimates[DICE], HD95_AUTO: estimates[HD95_MM]}
    out.update({name: estimates[name] for name in overlaps or {}})
    return out


def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    *,
    data_config: DataConfig,
    pad_value: float,
    batch: int,
    device: torch.device,
) -> np.ndarray:
    """Binary prediction (D, H, W) of a whole preprocessed volume ``image`` (D, H, W) by the automatic segmenter
    (module docstring): sliding ``data.patch-size``³ windows (3D, ``batch`` windows per forward) or every sweep
    slice as a ``data.slice-size`` frame padded with ``pad_value`` (2D, :data:`SLICES_PER_FORWARD` per
    forward), stacked back along the sweep axis."""
    segmenter = auto_segmenter_of(model)
    if segmenter is not None and segmenter.spec.spatial_dims == 2:
        return _predict_slices(model, image, size=data_config.slice_size, pad_value=pad_value, device=device)
    from monai.inferers import sliding_window_inference  # imported here: importing MONAI takes seconds

    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    logits = sliding_window_inference(
        volume,
        roi_size=(data_config.patch_size,) * 3,
        sw_batch_size=max(1, batch),
        predictor=model,
        overlap=SLIDING_WINDOW_OVERLAP,
        mode="gaussian",
    )
    return (logits[0, 0].float() > 0).cpu().numpy()


def _predict_slices(
    model: nn.Module, image: np.ndarray, *, size: int, pad_value: float, device: torch.device
) -> np.ndarray:
    """A 2D network's prediction of every slice ``image[k]`` (H, W), stacked to (D, H, W) bool."""
    from shared.data.slices2d import fit_square, unfit_square

    depth, shape = image.shape[0], image.shape[1:]
    predicted = np.zeros(image.shape, dtype=bool)
    for start in range(0, depth, SLICES_PER_FORWARD):
        stop = min(start + SLICES_PER_FORWARD, depth)
        frames = np.stack([fit_square(image[k], size=size, pad_value=pad_value) for k in range(start, stop)])
        logits = model(torch.from_numpy(frames)[:, None].to(device)).float()
        probabilities = unfit_square(torch.sigmoid(logits), shape)  # (n, 1, H, W)
        predicted[start:stop] = (probabilities[:, 0] > 0.5).cpu().numpy()
    return predicted


def _box(predicted: np.ndarray, mask: np.ndarray) -> tuple[tuple[int, ...], tuple[slice, ...]]:
    """Start and slices of the box holding every voxel of ``predicted`` or ``mask``, plus one voxel."""
    either = np.argwhere(predicted | mask)
    if either.size == 0:
        return (0, 0, 0), tuple(slice(0, 0) for _ in mask.shape)
    low = np.maximum(either.min(axis=0) - 1, 0)
    high = np.minimum(either.max(axis=0) + 2, mask.shape)
    return tuple(int(v) for v in low), tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))


def _evaluate_case(
    model: nn.Module, case: SegCase, *, data_config: DataConfig, batch: int, device: torch.device
) -> AutoCaseResult:
    mask = np.asarray(case.mask) > 0
    if mask.shape != np.shape(case.image) or mask.ndim != 3:
        raise ValueError(
            f"case {case.case_id!r}: mask shape {mask.shape} differs from image shape {np.shape(case.image)}"
        )
    predicted = predict_volume(
        model, case.image, data_config=data_config, pad_value=case.pad_value, batch=batch, device=device
    )
    start, box = _box(predicted, mask)
    pred_box, gt_box = predicted[box], mask[box]
    overlap = overlap_metrics(pred_box, gt_box)
    volume = lesion_volume_cm3(mask, case.spacing_mm)
    return AutoCaseResult(
        case_id=case.case_id,
        dice=overlap.dice,
        hd95_mm=hd95_mm(pred_box, gt_box, case.spacing_mm),
        volume_cm3=volume,
        volume_bin=volume_bin(volume),
        birads=case.birads,
        label=case.label,
        prediction=PredictedMask(tuple(int(v) for v in mask.shape), start, pred_box),
        overlaps=overlap.named(auto_name),
    )


def _aggregate(results: list[AutoCaseResult], split: str) -> AutoSegEvaluation:
    if not results:
        raise ValueError("evaluate_auto_segmentation: no case to evaluate")
    records = [r.record() for r in results]
    names = (DICE_AUTO, HD95_AUTO)
    strata = {
        "birads": stratify(records, "birads", metrics=names),
        "volume": stratify(records, "volume_bin", metrics=names),
    }
    hd95 = np.array([r.hd95_mm for r in results], dtype=np.float64)
    defined = hd95[~np.isnan(hd95)]
    metrics = {
        _key(DICE_AUTO, split=split): float(np.mean([r.dice for r in results])),
        **{
            _key(n, split=split): float(np.mean([r.overlaps[n] for r in results]))
            for n in results[0].overlaps
        },
        _key(HD95_AUTO, split=split): float(defined.mean()) if defined.size else float("nan"),
        _key(auto_name(HD95_UNDEFINED), split=split): float(hd95.size - defined.size),
        _key(N_CASES_SEG, split=split): float(len(results)),
    }
    for by, groups in strata.items():
        metrics.update(stratified_metrics_dict(groups, by=by, split=split))
    return AutoSegEvaluation(results, metrics, strata)


def evaluate_auto_segmentation(
    model: nn.Module,
    cases: Iterable[SegCase | Mapping[str, Any]],
    *,
    config: TrainConfig,
    data_config: DataConfig,
    device: torch.device | str,
    split: str = "test",
    keep_masks: bool = True,
    on_case: Callable[[Any, AutoCaseResult], None] | None = None,
    progress: bool | None = None,
) -> AutoSegEvaluation:
    """Evaluate the automatic segmenter on whole cases (module docstring); arguments as
    :func:`shared.training.seg_eval.evaluate_segmentation` (which calls this for an automatic model), without
    clicks: ``data_config.patch_size`` is the window side (3D; ``data_config.slice_size`` the frame side in 2D),
    ``config.seg_batch_size`` the windows per forward, ``config.precision`` the autocast."""
    if auto_segmenter_of(model) is None:
        raise TypeError(f"{type(model).__name__} is not the automatic segmenter (shared.models.auto_seg)")
    device = torch.device(device)

    def one(case: SegCase) -> AutoCaseResult:
        return _evaluate_case(
            model, case, data_config=data_config, batch=config.seg_batch_size, device=device
        )

    options = {"keep_masks": keep_masks, "on_case": on_case, "progress": progress}
    results = evaluate_each(
        model, cases, one, config=config, device=device, description="auto seg eval", **options
    )
    return _aggregate(results, split)
