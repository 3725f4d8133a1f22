"""Evaluation of click-driven segmentation on the blocks covering each lesion (seed 000).

Per case (a preprocessed full volume with its mask):

1. the ``patch_size``³ blocks covering the lesion are chosen by :func:`shared.data.blocks.covering_blocks`
   (blocks with fewer than ``block-min-lesion-voxels`` lesion voxels dropped, the fullest always kept);
2. on every block an interactive episode runs with the simulated clicks of :mod:`shared.clicks`: the first
   click is a random voxel of the lesion part of that block, each later round adds corrective clicks placed
   on that block's errors, and the previous low-resolution logits are fed back as the mask prompt; the image
   embedding of a block is computed once;
3. after every click round the blocks' probabilities are stitched (overlaps averaged,
   :func:`shared.data.blocks.stitch`) and thresholded at 0.5 into the full-volume prediction, and its Dice
   against the full ground truth is recorded: the Dice-vs-clicks curve;
4. after the first and the last round: IoU, precision and recall of the prediction
   (:func:`shared.metrics.overlap_metrics`);
5. after the last round: Dice, HD95 in mm (MONAI, with the voxel spacing) and the lesion volume in cm³.

A click round adds at most ``clicks_per_round`` clicks per block (default 1: round ``r`` has exactly ``r``
clicks unless a block's prediction became exact, so ``dice_5click`` is the Dice after 5 clicks); ``None``
gives the seed's rounds of one click per slice of the error region. A block whose prediction is exact keeps
it for the remaining rounds.

The prediction outside the blocks is background, so everything is computed on the region spanned by the
blocks and the lesion (plus one voxel), which gives the same Dice, HD95 and volume as the full volume at a
fraction of the memory. :class:`PredictedMask` holds that region and rebuilds the full mask on request.

Aggregates (:class:`SegEvaluation`): the flat metrics of :func:`shared.metrics.segmentation_metrics_dict`
(``test/dice_1click`` … ``test/dice_{n}click``, ``test/dice``, ``test/iou_1click``, ``test/iou``,
``test/seg_precision[_1click]``, ``test/seg_recall[_1click]``, ``test/hd95_mm`` …) plus the strata by BI-RADS
category and by lesion-volume bin (0–5, 5–20, 20–100 cm³) of seed 000 Tables 4–5
(``test/birads/4A/dice_mean``, ``test/volume/0-5/hd95_mm_std`` …).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.clicks import ClickSession
from shared.config import DataConfig, TrainConfig
from shared.data.blocks import Block, covering_blocks, extract_blocks, lesion_bbox, stitch
from shared.data.transforms import Preprocessed
from shared.metric_names import DICE, HD95_MM, first_click_name
from shared.metrics import (
    GroupStats,
    dice_vs_clicks,
    hd95_mm,
    lesion_volume_cm3,
    overlap_metrics,
    segmentation_metrics_dict,
    stratified_metrics_dict,
    stratify,
    volume_bin,
)
from shared.models.auto_seg import is_auto_segmenter
from shared.precision import Precision
from shared.training.seg import decode_clicks, encode_images, patch_size_of, upsample_logits

__all__ = [
    "CaseResult",
    "PredictedMask",
    "SegCase",
    "SegEvaluation",
    "evaluate_each",
    "evaluate_segmentation",
]

#: Click budget per block when rounds are uncapped (``clicks_per_round=None``): effectively unlimited.
_UNLIMITED_CLICKS = 10**9


@dataclass(frozen=True)
class SegCase:
    """One evaluation case: ``image`` (D, H, W) float32 preprocessed, ``mask`` (D, H, W) 0/1 (non-empty),
    ``spacing_mm`` (z, y, x), the ``pad_value`` of blocks reaching past the volume, and for the strata its
    BI-RADS category (e.g. ``"4A"``) and label (1 malignant, 0 benign) when known."""

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    spacing_mm: tuple[float, float, float]
    pad_value: float = 0.0
    birads: str | None = None
    label: int | None = None

    @classmethod
    def from_preprocessed(
        cls, case: Preprocessed, *, case_id: str, birads: str | None = None, label: int | None = None
    ) -> SegCase:
        """A case from :func:`shared.data.transforms.preprocess_case` output (which must carry a mask)."""
        if case.mask is None:
            raise ValueError(
                f"case {case_id!r}: preprocessed without a mask; evaluation needs the ground truth"
            )
        return cls(case_id, case.image, case.mask, case.spacing_mm, case.pad_value, birads, label)

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> SegCase:
        """A case from an item of :func:`shared.data.loaders.seg_eval_loader` (``image``/``mask`` (1, D, H, W)
        tensors) or of ``LoadCased`` ((D, H, W) arrays): ``image``, ``mask``, ``spacing_mm``, ``case_id`` and
        optionally ``pad_value``, ``label`` (-1 or None: unknown) and ``birads``."""
        missing = [k for k in ("image", "mask", "spacing_mm", "case_id") if k not in item]
        if missing:
            raise KeyError(f"evaluation item lacks {missing}; it has {sorted(item)}")
        case_id = str(item["case_id"])
        image = _volume_array(item["image"], "image", case_id).astype(np.float32, copy=False)
        mask = (_volume_array(item["mask"], "mask", case_id) > 0).astype(np.uint8)
        label = item.get("label")
        label = None if label is None or int(label) < 0 else int(label)
        spacing = tuple(float(s) for s in item["spacing_mm"])
        pad_value = float(item.get("pad_value", 0.0))
        return cls(case_id, image, mask, spacing, pad_value, item.get("birads"), label)


def _volume_array(value: Any, key: str, case_id: Any) -> np.ndarray:
    """(D, H, W) numpy array from a (D, H, W) or (1, D, H, W) array or tensor."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(
            f"case {case_id!r}: {key} must be (D, H, W) or (1, D, H, W), got shape {array.shape}"
        )
    return array


@dataclass(frozen=True)
class PredictedMask:
    """A full-volume prediction stored as the region that can be non-zero.

    ``region`` (d, h, w) bool starts at voxel ``start`` (z, y, x) of a volume of ``shape``; every voxel
    outside it is background.
    """

    shape: tuple[int, int, int]
    start: tuple[int, int, int]
    region: np.ndarray

    def full(self) -> np.ndarray:
        """The prediction as a (D, H, W) bool array of the case's volume."""
        out = np.zeros(self.shape, dtype=bool)
        out[tuple(slice(s, s + n) for s, n in zip(self.start, self.region.shape, strict=True))] = self.region
        return out


@dataclass(frozen=True)
class CaseResult:
    """Evaluation of one case.

    ``dice_curve[r]`` is the full-volume Dice after click round ``r + 1``; ``dice`` and ``hd95_mm`` (NaN when
    the prediction is empty) are those of the last round; ``overlaps`` the IoU, precision and recall after the
    first (``iou_1click`` …) and the last round (``iou`` …); ``volume_cm3`` is the ground-truth lesion volume;
    ``clicks_per_block`` the clicks each block received; ``prediction`` the final mask (None when the caller
    asked not to keep it).
    """

    case_id: str
    dice_curve: list[float]
    dice: float
    hd95_mm: float
    volume_cm3: float
    volume_bin: str
    birads: str | None
    label: int | None
    n_blocks: int
    clicks_per_block: list[int]
    prediction: PredictedMask | None
    overlaps: dict[str, float]

    def record(self) -> dict[str, Any]:
        """JSON-ready per-case values (no mask), also the input of :func:`shared.metrics.stratify`."""
        return {
            "case_id": self.case_id,
            DICE: self.dice,
            HD95_MM: self.hd95_mm,
            **self.overlaps,
            "dice_curve": list(self.dice_curve),
            "volume_cm3": self.volume_cm3,
            "volume_bin": self.volume_bin,
            "birads": self.birads,
            "label": self.label,
            "n_blocks": self.n_blocks,
            "clicks_per_block": list(self.clicks_per_block),
        }


@dataclass(frozen=True)
class SegEvaluation:
    """All cases of one split: per-case results, the mean Dice-vs-clicks ``curve`` (one value per round), the
    flat ``metrics`` for logging and the ``strata`` ``{"birads": …, "volume": …}`` of
    :func:`shared.metrics.stratify`."""

    cases: list[CaseResult]
    curve: list[float]
    metrics: dict[str, float]
    strata: dict[str, dict[str, dict[str, GroupStats]]]

    def to_json(self) -> dict[str, Any]:
        """Metrics, curve and per-case records as plain JSON types (NaN stays a float)."""
        return {
            "metrics": dict(self.metrics),
            "curve": list(self.curve),
            "cases": [c.record() for c in self.cases],
        }


class _BlockEpisode:
    """The click episode of one block: embedding computed once, clicks and mask prompt carried over rounds."""

    def __init__(
        self,
        model: nn.Module,
        image: np.ndarray,
        mask: np.ndarray,
        rng: np.random.Generator,
        *,
        clicks_per_round: int | None,
        max_clicks: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
        self.session = ClickSession(
            mask[None, None] > 0, rng, max_total_clicks=max_clicks, max_clicks_per_step=clicks_per_round
        )
        self.device = device
        self.embedding: torch.Tensor | None = None
        self.low_res: torch.Tensor | None = None
        self.prediction: np.ndarray | None = None
        self.probabilities: np.ndarray | None = None

    def advance(self) -> np.ndarray:
        """Place the next clicks, predict, and return the block's probabilities (P, P, P) float32."""
        if self.embedding is None:
            self.embedding = encode_images(self.model, self.image)
            self.session.step()
        elif not any(self.session.step(self.prediction[None, None])):
            return self.probabilities  # exact prediction or click budget spent: nothing changes
        coords, labels = self.session.prompts(self.device)
        self.low_res, _ = decode_clicks(self.model, self.embedding, coords, labels, self.low_res)
        logits = upsample_logits(self.low_res.float(), self.image.shape[-1])[0, 0]  # metrics in float32
        self.prediction = (logits > 0).cpu().numpy()
        self.probabilities = torch.sigmoid(logits).cpu().numpy()
        return self.probabilities

    @property
    def n_clicks(self) -> int:
        return self.session.n_clicks[0]


def _region(blocks: list[Block], mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...], list[Block]]:
    """The box holding every in-volume block voxel and every lesion voxel, plus 1 voxel: its (start, shape),
    and the blocks with starts relative to it."""
    shape = np.asarray(mask.shape)
    box = lesion_bbox(mask)
    low = np.minimum(np.min([b.start for b in blocks], axis=0), box[0]) - 1
    high = np.maximum(np.max([np.asarray(b.start) + b.size for b in blocks], axis=0), box[1]) + 1
    low, high = np.clip(low, 0, shape), np.clip(high, 0, shape)
    shifted = [
        Block(tuple(int(v) for v in np.asarray(b.start) - low), b.size, b.lesion_voxels) for b in blocks
    ]
    return tuple(int(v) for v in low), tuple(int(v) for v in high - low), shifted


def _case_blocks(case: SegCase, data_config: DataConfig) -> list[Block]:
    mask = np.asarray(case.mask)
    if mask.shape != np.shape(case.image) or mask.ndim != 3:
        raise ValueError(
            f"case {case.case_id!r}: mask shape {mask.shape} differs from image shape {np.shape(case.image)}"
        )
    try:
        blocks = covering_blocks(
            mask, patch_size=data_config.patch_size, min_lesion_voxels=data_config.block_min_lesion_voxels
        )
    except ValueError as exc:
        raise ValueError(f"case {case.case_id!r}: {exc}") from None
    return [b for b in blocks if b.lesion_voxels > 0]


@dataclass(frozen=True)
class _Settings:
    data_config: DataConfig
    n_rounds: int
    clicks_per_round: int | None
    device: torch.device


def _episodes(
    model: nn.Module, case: SegCase, blocks: list[Block], rng: np.random.Generator, settings: _Settings
) -> list[_BlockEpisode]:
    images = extract_blocks(np.asarray(case.image, dtype=np.float32), blocks, pad_value=case.pad_value)
    masks = extract_blocks((np.asarray(case.mask) > 0).astype(np.uint8), blocks, pad_value=0)
    per_round = settings.clicks_per_round
    budget = settings.n_rounds * per_round if per_round else _UNLIMITED_CLICKS
    return [
        _BlockEpisode(
            model, image, mask, child, clicks_per_round=per_round, max_clicks=budget, device=settings.device
        )
        for image, mask, child in zip(images, masks, rng.spawn(len(blocks)), strict=True)
    ]


def _evaluate_case(
    model: nn.Module, case: SegCase, rng: np.random.Generator, settings: _Settings
) -> CaseResult:
    mask = np.asarray(case.mask) > 0
    blocks = _case_blocks(case, settings.data_config)
    episodes = _episodes(model, case, blocks, rng, settings)
    start, region_shape, shifted = _region(blocks, mask)
    gt = mask[tuple(slice(a, a + n) for a, n in zip(start, region_shape, strict=True))]
    curve, overlaps = [], {}
    for round_index in range(settings.n_rounds):
        predicted = stitch([e.advance() for e in episodes], shifted, region_shape).values > 0.5
        overlap = overlap_metrics(predicted, gt)
        curve.append(overlap.dice)
        if round_index == 0:
            overlaps.update(overlap.named(first_click_name))
    overlaps.update(overlap.named())
    volume = lesion_volume_cm3(mask, case.spacing_mm)
    return CaseResult(
        case_id=case.case_id,
        dice_curve=curve,
        dice=curve[-1],
        hd95_mm=hd95_mm(predicted, gt, case.spacing_mm),
        volume_cm3=volume,
        volume_bin=volume_bin(volume),
        birads=case.birads,
        label=case.label,
        n_blocks=len(blocks),
        clicks_per_block=[e.n_clicks for e in episodes],
        prediction=PredictedMask(tuple(int(v) for v in mask.shape), start, predicted),
        overlaps=overlaps,
    )


def _aggregate(results: list[CaseResult], split: str) -> SegEvaluation:
    if not results:
        raise ValueError("evaluate_segmentation: no case to evaluate")
    curves = [r.dice_curve for r in results]
    records = [r.record() for r in results]
    strata = {"birads": stratify(records, "birads"), "volume": stratify(records, "volume_bin")}
    overlaps = {name: [r.overlaps[name] for r in results] for name in results[0].overlaps}
    metrics = segmentation_metrics_dict(curves, [r.hd95_mm for r in results], overlaps=overlaps, split=split)
    for by, groups in strata.items():
        metrics.update(stratified_metrics_dict(groups, by=by, split=split))
    return SegEvaluation(results, [float(v) for v in dice_vs_clicks(curves)], metrics, strata)


def evaluate_segmentation(
    model: nn.Module,
    cases: Iterable[SegCase | Mapping[str, Any]],
    *,
    config: TrainConfig,
    data_config: DataConfig,
    device: torch.device | str,
    n_clicks: int | None = None,
    clicks_per_round: int | None = 1,
    split: str = "test",
    keep_masks: bool = True,
    on_case: Callable[[Any, CaseResult], None] | None = None,
    progress: bool | None = None,
) -> SegEvaluation:
    """Evaluate SAM-Med3D (with or without adapter) on full cases, as the module docstring describes; an
    automatic segmenter (:mod:`shared.models.auto_seg`) is evaluated on the whole volume without clicks instead
    (:func:`shared.training.seg_auto.evaluate_auto_segmentation`: ``n_clicks`` and ``clicks_per_round`` do not
    apply, the result is an :class:`~shared.training.seg_auto.AutoSegEvaluation` with ``*_auto`` metrics).

    Args:
        model: SAM-Med3D (plain, PEFT-wrapped or Opacus-wrapped), already on ``device``; it is put in eval mode
            for the call and restored afterwards.
        cases: :class:`SegCase` s or items of :func:`shared.data.loaders.seg_eval_loader` (converted by
            :meth:`SegCase.from_item`), iterated once: a loader or generator keeps one case in memory at a time.
        config: ``eval_clicks`` (rounds when ``n_clicks`` is None), ``seed`` (click streams: case ``i`` block
            ``j`` uses ``SeedSequence(seed)`` child ``i``, grandchild ``j``), ``precision`` (autocast, :mod:`shared.precision`).
        data_config: ``patch_size`` (must equal the model's input size) and ``block_min_lesion_voxels``.
        n_clicks: number of click rounds (the length of every Dice curve).
        clicks_per_round: cap on the clicks a round adds per block (1: one click per round; None: one per
            slice of the error region, as seed 000).
        split: metric key prefix (``test/dice_1click``).
        keep_masks: keep each case's :class:`PredictedMask` in the result (for end-to-end classifier planes).
        on_case: called with each case as given (e.g. the loader item, with its ``grid``/``original``) and its
            result (prediction included) as soon as it is evaluated.
        progress: progress bar over cases (None: ``config.progress``).
    """
    if is_auto_segmenter(model):  # no click: the whole volume, under the automatic metric names
        from shared.training.seg_auto import evaluate_auto_segmentation

        return evaluate_auto_segmentation(
            model,
            cases,
            config=config,
            data_config=data_config,
            device=device,
            split=split,
            keep_masks=keep_masks,
            on_case=on_case,
            progress=progress,
        )
    rounds = config.eval_clicks if n_clicks is None else n_clicks
    if rounds < 1:
        raise ValueError(f"evaluation needs at least one click round, got n_clicks = {rounds}")
    if clicks_per_round is not None and clicks_per_round < 1:
        raise ValueError(f"clicks_per_round must be >= 1 or None, got {clicks_per_round}")
    if patch_size_of(model) != data_config.patch_size:
        raise ValueError(
            f"data config: patch-size = {data_config.patch_size} but the model takes {patch_size_of(model)}³ crops"
        )
    settings = _Settings(data_config, rounds, clicks_per_round, torch.device(device))
    seeds = np.random.SeedSequence(config.seed)

    def one(case: SegCase) -> CaseResult:
        return _evaluate_case(model, case, np.random.default_rng(seeds.spawn(1)[0]), settings)

    options = {"keep_masks": keep_masks, "on_case": on_case, "progress": progress}
    return _aggregate(
        evaluate_each(model, cases, one, config=config, device=settings.device, **options), split
    )


def evaluate_each(
    model: nn.Module,
    cases: Iterable[SegCase | Mapping[str, Any]],
    evaluate: Callable[[SegCase], Any],
    *,
    config: TrainConfig,
    device: torch.device,
    keep_masks: bool,
    on_case: Callable[[Any, Any], None] | None,
    progress: bool | None,
    description: str = "seg eval",
) -> list[Any]:
    """``evaluate(case)`` of every case (as :class:`SegCase`), in order, with ``model`` in eval mode (restored
    afterwards), under ``inference_mode`` and the autocast of ``config.precision``; ``on_case(case as given,
    result)`` after each; results keep their ``prediction`` only with ``keep_masks``. Shared by the click and the
    automatic evaluation (:mod:`shared.training.seg_auto`)."""
    from tqdm.auto import tqdm

    enabled = config.progress if progress is None else progress
    results = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), Precision.on(config.precision, device).autocast():
            for case in tqdm(
                cases, desc=description, unit="case", disable=not enabled, leave=False, dynamic_ncols=True
            ):
                result = evaluate(case if isinstance(case, SegCase) else SegCase.from_item(case))
                if on_case is not None:
                    on_case(case, result)
                results.append(result if keep_masks else replace(result, prediction=None))
    finally:
        model.train(was_training)
    return results
