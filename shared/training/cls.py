"""Training, inference and evaluation of the tri-plane benign/malignant classifier (seed 003), in plain torch.

Its inputs (planes, frame-triplets) live in :mod:`shared.training.cls_planes` and Grad-CAM in
:mod:`shared.training.grad_cam`; both are re-exported here. The optimiser steps are
:class:`shared.training.stepper.Stepper`'s, as for segmentation.

Data. A lesion is described by its tri-plane frames, a float array **(3, F, S, S)** (planes in the order
transverse, sagittal, coronal; F frames spread across the lesion; S × S pixels; see
:mod:`shared.data.planes`). Frame ``i`` of the three planes forms one *frame-triplet* (3, 1, S, S).

Training is frame-level (seed 003): every frame-triplet of a lesion is one sample carrying the lesion's label
(0 benign, 1 malignant); the loss is cross-entropy. A loader yields batches ``(frames, labels)`` with frames
(B, 3, 1, S, S) float and labels (B,) int — a tuple/list or a mapping with keys ``"frames"`` and ``"label"``;
:func:`frame_triplet_dataset` builds such a dataset from lesion planes. Frames may also hold only the model's
P planes, (B, P, 1, S, S), in canonical order. Lesion-level batches as :func:`shared.data.loaders.cls_loader`
yields them, ``{"planes": (B, 3, F, S, S), "label": (B,)}``, are split into their B * F frame-triplets
(not under Opacus, see below).

Inference is lesion-level: the lesion's malignancy probability is the mean of its frames' malignant
probabilities; it is called malignant when the probability exceeds ``train.cls-threshold`` (0.5).

Plane variants (seed 003 Table 3): ``train.cls-planes`` names the planes the model was built with
(``build_triplane_classifier(planes=...)``); only those planes are fed to it, and a model built with other
planes is refused.

Differential privacy (sample level, the privacy unit is one case): ``train_classifier(..., privacy=DPSettings)``
wraps the model and its optimizer with Opacus (:func:`shared.privacy.dp_sgd.private_training`) and needs a
Poisson loader (:func:`shared.privacy.sampling.poisson_loader`) over one sample per case: under DP a lesion
contributes ONE frame-triplet per draw (:class:`shared.privacy.sampling.OneFramePerCase` picks a frame at
random each time), not its F frames, so one case is one per-sample gradient. An empty Poisson batch becomes a
noise-only step (the accountant counts it). :func:`train_classifier` also runs on a model, optimizer and loader
returned by Opacus' ``PrivacyEngine.make_private`` (pass the returned optimizer as ``optimizer=``; the caller
then owns the sampling and the frame-per-case choice). In both cases the model has no BatchNorm, parameters are
never changed in place outside the optimizer, and the FedProx term is added to the gradient *after* clipping
and noising (:mod:`shared.privacy.steps`; it depends on no patient data, so it costs no privacy). Lesion-level
batches are refused under Opacus, because splitting them into frames inside the step would break Opacus'
per-sample bookkeeping and make a case count F times.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.config import TrainConfig
from shared.metrics import AucResult, BinaryMetrics, auc_with_ci, binary_metrics, classification_metrics_dict
from shared.models.triplane import PLANES, frame_probabilities_to_lesion, malignant_probabilities
from shared.precision import Precision
from shared.privacy.dp_sgd import DPSettings, check_poisson_loader, private_training
from shared.privacy.steps import ProximalPull, proximal_pull
from shared.training.cls_planes import (
    checked_planes,
    eval_mode,
    frame_triplet_dataset,
    lesion_frames,
    parse_cls_planes,
    select_planes,
    unwrap_classifier,
)
from shared.training.grad_cam import grad_cam, save_grad_cam_images
from shared.training.stepper import Stepper, TrainResult, progress_bar

__all__ = [
    "FRAMES_KEY",
    "GT_SOURCE",
    "LABEL_KEY",
    "NO_LESION_PROBABILITY",
    "PLANES_KEY",
    "PRED_SOURCE",
    "SOURCE_SUFFIXES",
    "ClsCase",
    "ClsEvaluation",
    "SourceEvaluation",
    "build_cls_optimizer",
    "evaluate_classifier",
    "frame_triplet_dataset",
    "grad_cam",
    "parse_cls_planes",
    "predict_frame_probabilities",
    "predict_lesions",
    "save_grad_cam_images",
    "train_classifier",
    "trainable_snapshot",
    "unwrap_classifier",
]

#: Keys of a mapping batch: frame-triplets (B, 3, 1, S, S) or whole lesions' planes (B, 3, F, S, S), and
#: labels (B,).
FRAMES_KEY = "frames"
PLANES_KEY = "planes"
LABEL_KEY = "label"
#: Plane sources of an evaluation case: planes cut from the ground-truth mask or from the predicted mask.
GT_SOURCE = "gt"
PRED_SOURCE = "pred"
#: Metric-name suffix per source: the end-to-end result (predicted mask) is the plain ``test/auc``.
SOURCE_SUFFIXES: dict[str, str] = {PRED_SOURCE: "", GT_SOURCE: "_gt_planes"}
#: Malignancy probability given to a lesion whose mask is empty (segmentation found nothing): the end-to-end
#: system calls it benign, and the case stays in the metrics instead of silently dropping out.
NO_LESION_PROBABILITY = 0.0
#: AdamW weight decay (``train.cls-optimizer = "adamw"``); SGD uses none.
ADAMW_WEIGHT_DECAY = 0.01
_OPTIMIZERS = ("sgd", "adamw")


# ------------------------------------------------------------------------------------------------ training
def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters under names without Opacus' ``_module.`` prefix."""
    return [(n.removeprefix("_module."), p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters, keyed as :func:`train_classifier` expects
    ``proximal_ref`` (names from ``named_parameters`` without Opacus' ``_module.`` prefix)."""
    return {name: param.detach().clone() for name, param in _trainable(model)}


def build_cls_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of ``train.cls-optimizer`` over the parameters that require grad.

    ``sgd``: SGD with momentum ``cls-momentum`` (seed 003: lr 1e-3); ``adamw``: AdamW, weight decay 0.01.
    """
    params = [p for _, p in _trainable(model)]
    if not params:
        raise ValueError("the classifier has no trainable parameter (attach an adapter or unfreeze a module)")
    if config.cls_optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.cls_lr, momentum=config.cls_momentum)
    if config.cls_optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.cls_lr, weight_decay=ADAMW_WEIGHT_DECAY)
    raise ValueError(
        f"train.cls-optimizer = {config.cls_optimizer!r} is unknown; choose one of {_OPTIMIZERS}"
    )


def _lesion_batch(batch: Mapping[str, Any], *, dp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A lesion-level batch {planes (B, 3, F, S, S), label (B,)} as frames (B * F, 3, 1, S, S) and labels."""
    if dp:
        raise ValueError(
            f"lesion-level batches ({PLANES_KEY!r}, e.g. shared.data.loaders.cls_loader) cannot train under "
            "Opacus: their frames would become separate per-sample gradients and the batch-size scaling would "
            "be wrong; train on frame_triplet_dataset (one frame-triplet per sample) instead"
        )
    planes, labels = torch.as_tensor(batch[PLANES_KEY]), torch.as_tensor(batch[LABEL_KEY]).reshape(-1)
    if planes.shape[0] == 0:
        return planes.new_zeros((0,)), labels
    return lesion_frames(planes), labels.repeat_interleave(planes.shape[2])


def _unpack_batch(batch: Any, *, dp: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(frames, labels) from a tuple/list or mapping batch; None for an empty batch (Poisson sampling)."""
    if isinstance(batch, Mapping) and LABEL_KEY in batch and PLANES_KEY in batch:
        frames, labels = _lesion_batch(batch, dp=dp)
    elif isinstance(batch, Mapping) and LABEL_KEY in batch and FRAMES_KEY in batch:
        frames, labels = batch[FRAMES_KEY], batch[LABEL_KEY]
    elif isinstance(batch, (list, tuple)) and len(batch) == 0:
        return None  # Opacus' collate gives [] when the very first Poisson batch is empty
    elif isinstance(batch, (list, tuple)) and len(batch) == 2:
        frames, labels = batch
    else:
        found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"a batch must be (frames, labels) or a mapping with {LABEL_KEY!r} and {FRAMES_KEY!r} or "
            f"{PLANES_KEY!r}; got {found}"
        )
    frames, labels = torch.as_tensor(frames), torch.as_tensor(labels)
    if frames.shape[0] == 0:
        return None
    if labels.reshape(-1).shape[0] != frames.shape[0]:
        raise ValueError(f"batch has {frames.shape[0]} frame-triplets but {labels.numel()} labels")
    return frames, labels.reshape(-1).long()


def _proximal(
    model: nn.Module, proximal_ref: Mapping[str, torch.Tensor] | None, mu: float
) -> ProximalPull | None:
    """The FedProx pull of the trainable parameters (on their device); None when it is off."""
    if mu < 0:
        raise ValueError(f"train.proximal-mu = {mu} must be >= 0")
    if mu == 0:
        return None
    if proximal_ref is None:
        warnings.warn(
            "train.proximal-mu > 0 but no proximal_ref given: training without FedProx", stacklevel=3
        )
        return None
    return proximal_pull(
        dict(_trainable(model)), proximal_ref, mu, hint="take it with trainable_snapshot(model)"
    )


def _train_epochs(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    pull: ProximalPull | None,
    planes: tuple[str, ...],
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
    """The epochs of :func:`train_classifier` and its report."""
    stepper = Stepper(optimizer, pull=pull, precision=Precision.on(config.precision, device))

    def batch_loss(unpacked: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        frames = select_planes(unpacked[0].to(device, torch.float32), planes)
        labels = unpacked[1].to(device)
        return F.cross_entropy(model(frames).float(), labels), len(labels)

    epochs = []
    bar = progress_bar(
        range(config.cls_epochs), enabled=progress and config.progress, description="classifier", unit="epoch"
    )
    for _ in bar:
        batches = (_unpack_batch(batch, dp=stepper.dp) for batch in loader)
        epochs.append(stepper.epoch(batches, batch_loss))
        bar.set_postfix(loss=f"{epochs[-1].mean_sample_loss:.4f}")
    result = TrainResult(tuple(epochs), stepper.lr)
    losses = [e.mean_sample_loss for e in result.epochs]
    dataset = getattr(loader, "dataset", None)
    per_epoch = len(dataset) if hasattr(dataset, "__len__") else result.examples // max(1, config.cls_epochs)
    return {
        "loss": losses[-1] if losses else math.nan,
        "epoch_losses": losses,
        "num_examples": int(per_epoch),
        "samples_seen": result.examples,
        "steps": result.steps,
        "noise_only_steps": result.noise_only_steps,
        "skipped_empty_batches": result.skipped_empty_batches,
    }


def train_classifier(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    config: TrainConfig,
    device: torch.device | str,
    proximal_ref: Mapping[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    privacy: DPSettings | None = None,
) -> dict[str, Any]:
    """Frame-level cross-entropy training of the classifier for ``train.cls-epochs`` epochs.

    Args:
        model: a TriPlaneClassifier built with the planes of ``train.cls-planes``; plain, PEFT-wrapped
            (only adapter parameters require grad) or, without ``privacy``, Opacus-wrapped. Moved to
            ``device``; left in train mode.
        loader: yields batches ``(frames (B, 3, 1, S, S), labels (B,))``, mappings with keys ``frames``
            and ``label``, or lesion-level mappings with ``planes`` (B, 3, F, S, S) and ``label`` (module
            docstring); empty batches (or ``[]``) are skipped, or become noise-only steps under DP. With
            ``privacy``: a Poisson loader at the settings' rate and step count over one frame-triplet per
            case (:func:`shared.privacy.sampling.poisson_loader` of a
            :class:`shared.privacy.sampling.OneFramePerCase`).
        config: ``cls-epochs``, ``cls-optimizer``, ``cls-lr``, ``cls-momentum``, ``cls-planes``,
            ``proximal-mu``, ``precision`` (:mod:`shared.precision`; only ``fp32`` under DP),
            ``progress``.
        device: where to train.
        proximal_ref: FedProx reference {name: tensor} (:func:`trainable_snapshot` of the global model);
            used when ``proximal-mu > 0``.
        optimizer: an optimizer over the trainable parameters, e.g. Opacus' DPOptimizer; built by
            :func:`build_cls_optimizer` when omitted. Not together with ``privacy``.
        progress: show a tqdm bar over epochs (also needs ``config.progress``).
        privacy: sample-level DP-SGD settings (module docstring); None trains without DP (or with the
            caller's Opacus objects).

    Returns:
        ``loss`` (mean cross-entropy of the last epoch), ``epoch_losses`` (list), ``num_examples``
        (``len(loader.dataset)``: frame-triplets for :func:`frame_triplet_dataset`, lesions for a
        lesion-level or one-frame-per-case loader; frame-triplets per epoch when the loader has no dataset),
        ``samples_seen`` (frame-triplets over all epochs), ``steps`` (optimizer steps, noise-only ones
        included), ``noise_only_steps``, ``skipped_empty_batches``; under ``privacy`` also
        ``privacy_history``, the accountant's ``[(noise_multiplier, sample_rate, steps)]``.
    """
    if privacy is not None and optimizer is not None:
        raise ValueError("train_classifier: pass privacy= (DP-SGD is set up here) or an optimizer=, not both")
    planes = checked_planes(model, config)
    device = torch.device(device)
    model.to(device)
    model.train()
    optimizer = optimizer if optimizer is not None else build_cls_optimizer(model, config)
    pull = _proximal(model, proximal_ref, config.proximal_mu)
    common = {"config": config, "pull": pull, "planes": planes, "device": device, "progress": progress}
    if privacy is None:
        return _train_epochs(model, loader, optimizer=optimizer, **common)
    check_poisson_loader(loader, privacy)
    with private_training(model, optimizer, privacy, what="tri-plane classifier") as private:
        report = _train_epochs(private.module, loader, optimizer=private.optimizer, **common)
        return {**report, "privacy_history": private.history()}


# ------------------------------------------------------------------------------------------------ inference
def predict_frame_probabilities(
    model: nn.Module,
    planes: np.ndarray | torch.Tensor,
    device: torch.device | str,
    *,
    batch_size: int = 64,
    precision: str = "fp32",
) -> np.ndarray:
    """Malignant probability of every frame-triplet: lesion planes (N, 3, F, S, S) -> (N, F) float64.

    Only the model's planes are fed (fewer-plane variants). The model is moved to ``device`` and run in eval
    mode without gradients, under ``precision``'s autocast (:mod:`shared.precision`; probabilities in float32);
    its previous train/eval mode is restored.
    """
    frames = lesion_frames(planes)
    n_lesions = int(np.shape(planes)[0])
    if n_lesions == 0:
        return np.zeros((0, 0))
    base = unwrap_classifier(model)
    frames = select_planes(frames, base.planes)
    device = torch.device(device)
    model.to(device)
    outputs = []
    with eval_mode(model), torch.no_grad(), Precision.on(precision, device).autocast():
        for start in range(0, frames.shape[0], batch_size):
            logits = model(frames[start : start + batch_size].to(device))
            outputs.append(malignant_probabilities(logits.float()).cpu())
    return torch.cat(outputs).double().reshape(n_lesions, -1).numpy()


def predict_lesions(
    model: nn.Module,
    planes: np.ndarray | torch.Tensor,
    device: torch.device | str,
    *,
    batch_size: int = 64,
    precision: str = "fp32",
) -> np.ndarray:
    """Lesion malignancy probabilities (seed 003): planes (N, 3, F, S, S) -> (N,) float64 in [0, 1], each the
    mean of the lesion's F frame probabilities (:func:`predict_frame_probabilities`)."""
    frame_probs = predict_frame_probabilities(
        model, planes, device, batch_size=batch_size, precision=precision
    )
    if frame_probs.shape[0] == 0:
        return np.zeros(0)
    return frame_probabilities_to_lesion(torch.from_numpy(frame_probs)).numpy()


# ----------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class ClsCase:
    """One test lesion for :func:`evaluate_classifier`.

    ``planes`` (3, F, S, S) come from the ground-truth mask (``source="gt"``) or from the predicted mask
    (``source="pred"``, end to end); ``None`` when that mask is empty (then the lesion scores
    :data:`NO_LESION_PROBABILITY`). ``label`` is 1 for malignant, 0 for benign.
    """

    case_id: str
    label: int
    planes: np.ndarray | None
    source: str = GT_SOURCE


@dataclass(frozen=True)
class SourceEvaluation:
    """Lesion-level results for the cases of one plane source.

    ``case_ids``, ``labels`` (N,) int and ``probabilities`` (N,) float are aligned; ``auc`` and ``binary``
    come from :mod:`shared.metrics`; ``n_missing_planes`` counts lesions whose mask was empty.
    """

    source: str
    case_ids: tuple[str, ...]
    labels: np.ndarray
    probabilities: np.ndarray
    auc: AucResult
    binary: BinaryMetrics
    n_missing_planes: int


@dataclass(frozen=True)
class ClsEvaluation:
    """Classifier evaluation: one :class:`SourceEvaluation` per plane source present in the cases."""

    planes: tuple[str, ...]
    threshold: float
    by_source: dict[str, SourceEvaluation] = field(default_factory=dict)

    def metrics_dict(self, *, split: str = "test") -> dict[str, float]:
        """Flat metrics: ``{split}/auc``, ``/auc_ci_low``, ... for predicted-mask planes and the same names
        with suffix ``_gt_planes`` for ground-truth planes (:data:`SOURCE_SUFFIXES`), plus
        ``{split}/n_missing_planes{suffix}``."""
        out: dict[str, float] = {}
        for source, result in self.by_source.items():
            suffix = SOURCE_SUFFIXES[source]
            out.update(classification_metrics_dict(result.auc, result.binary, split=split, suffix=suffix))
            out[f"{split}/n_missing_planes{suffix}"] = float(result.n_missing_planes)
        return out

    def per_case(self) -> list[dict[str, Any]]:
        """One JSON-ready row per lesion and source: case id, source, label, probability, prediction."""
        return [
            {
                "case_id": case_id,
                "source": source,
                "label": int(label),
                "probability": float(prob),
                "predicted_malignant": bool(prob > self.threshold),
            }
            for source, result in self.by_source.items()
            for case_id, label, prob in zip(result.case_ids, result.labels, result.probabilities, strict=True)
        ]


def _check_case(case: ClsCase) -> None:
    if case.source not in SOURCE_SUFFIXES:
        raise ValueError(
            f"case {case.case_id!r}: source {case.source!r} must be one of {tuple(SOURCE_SUFFIXES)}"
        )
    if case.label not in (0, 1):
        raise ValueError(f"case {case.case_id!r}: label {case.label!r} must be 0 (benign) or 1 (malignant)")
    if case.planes is not None and (np.ndim(case.planes) != 4 or np.shape(case.planes)[0] != len(PLANES)):
        raise ValueError(
            f"case {case.case_id!r}: planes of shape {np.shape(case.planes)}; expected (3, F, S, S)"
        )


def _case_probabilities(
    model: nn.Module, cases: Sequence[ClsCase], device: torch.device, precision: str
) -> np.ndarray:
    """Lesion probabilities (N,) of ``cases`` (one source); empty masks score NO_LESION_PROBABILITY."""
    probs = np.full(len(cases), NO_LESION_PROBABILITY, dtype=np.float64)
    present = [i for i, case in enumerate(cases) if case.planes is not None]
    shapes = {np.shape(cases[i].planes) for i in present}
    if len(shapes) > 1:
        raise ValueError(f"cases of source {cases[0].source!r} have different plane shapes {sorted(shapes)}")
    if present:
        stacked = np.stack([np.asarray(cases[i].planes, dtype=np.float32) for i in present])
        probs[present] = predict_lesions(model, stacked, device, precision=precision)
    return probs


def evaluate_classifier(
    model: nn.Module, cases: Iterable[ClsCase], *, config: TrainConfig, device: torch.device | str
) -> ClsEvaluation:
    """Lesion-level evaluation per plane source: AUC with a 95% bootstrap CI (seeded by ``train.seed``),
    sensitivity, specificity, PPV, NPV, accuracy and F1 at ``train.cls-threshold``.

    The model must be built with the planes of ``train.cls-planes``. Cases of both sources may be mixed;
    each source is evaluated on its own (see :meth:`ClsEvaluation.metrics_dict` for the names).
    """
    planes = checked_planes(model, config)
    cases = list(cases)
    if not cases:
        raise ValueError("evaluate_classifier: no cases given")
    for case in cases:
        _check_case(case)
    by_source: dict[str, SourceEvaluation] = {}
    for source in SOURCE_SUFFIXES:
        group = [c for c in cases if c.source == source]
        if not group:
            continue
        labels = np.array([c.label for c in group], dtype=np.int64)
        probs = _case_probabilities(model, group, torch.device(device), config.precision)
        by_source[source] = SourceEvaluation(
            source=source,
            case_ids=tuple(c.case_id for c in group),
            labels=labels,
            probabilities=probs,
            auc=auc_with_ci(labels, probs, seed=config.seed),
            binary=binary_metrics(labels, probs, threshold=config.cls_threshold),
            n_missing_planes=sum(c.planes is None for c in group),
        )
    return ClsEvaluation(planes=planes, threshold=config.cls_threshold, by_source=by_source)
