"""The tri-plane classifier's inputs: which planes a model takes, and lesion planes as frame-triplets.

A lesion's planes are a float array **(3, F, S, S)** (transverse, sagittal, coronal; F frames; S × S pixels;
:mod:`shared.data.planes`); frame ``i`` of the three planes is one frame-triplet (3, 1, S, S). A model built
with fewer planes (seed 003 Table 3, ``train.cls-planes``) is fed only those, (P, 1, S, S) in canonical order.
Used by training and evaluation (:mod:`shared.training.cls`) and Grad-CAM (:mod:`shared.training.grad_cam`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from shared.config import TrainConfig
from shared.models.triplane import PLANES, TriPlaneClassifier

__all__ = [
    "checked_planes",
    "eval_mode",
    "frame_triplet_dataset",
    "lesion_frames",
    "model_device",
    "parse_cls_planes",
    "select_planes",
    "unwrap_classifier",
]


def unwrap_classifier(model: nn.Module) -> TriPlaneClassifier:
    """The :class:`TriPlaneClassifier` inside ``model``: itself, a PEFT wrapper or an Opacus GradSampleModule."""
    current = model
    for _ in range(8):
        if isinstance(current, TriPlaneClassifier):
            return current
        if callable(getattr(type(current), "get_base_model", None)):  # PEFT PeftModel
            current = current.get_base_model()
        elif "_module" in current._modules:  # Opacus GradSampleModule
            current = current._modules["_module"]
        else:
            break
    raise TypeError(
        f"expected a TriPlaneClassifier (plain, PEFT- or Opacus-wrapped), got {type(model).__name__}"
    )


def parse_cls_planes(text: str) -> tuple[str, ...]:
    """``train.cls-planes`` (comma-separated subset of transverse, sagittal, coronal) in canonical order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PLANES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"train.cls-planes = {text!r} is invalid: give one to three distinct planes out of {', '.join(PLANES)}"
        )
    return tuple(p for p in PLANES if p in names)


def checked_planes(model: nn.Module, config: TrainConfig) -> tuple[str, ...]:
    """The configured planes, after checking the model was built with exactly those."""
    planes = parse_cls_planes(config.cls_planes)
    built = unwrap_classifier(model).planes
    if built != planes:
        raise ValueError(
            f"train.cls-planes = {config.cls_planes!r} but the classifier was built with planes {built}; "
            "build it with build_triplane_classifier(planes=...) from the same setting"
        )
    return planes


def select_planes(frames: torch.Tensor, planes: tuple[str, ...]) -> torch.Tensor:
    """(B, 3, 1, S, S) or already selected (B, P, 1, S, S) -> (B, P, 1, S, S) holding only ``planes``."""
    if frames.ndim != 5 or frames.shape[2] != 1 or frames.shape[1] not in (len(PLANES), len(planes)):
        raise ValueError(
            f"frames of shape {tuple(frames.shape)} are invalid: expected (B, 3, 1, S, S) in plane order "
            f"{PLANES} or (B, {len(planes)}, 1, S, S) holding {planes}"
        )
    if frames.shape[1] == len(planes):
        return frames
    return frames[:, [PLANES.index(p) for p in planes]]


def lesion_frames(planes: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Lesion planes (N, 3, F, S, S) -> frame-triplets (N * F, 3, 1, S, S) float32, lesion-major order."""
    tensor = torch.as_tensor(np.asarray(planes) if not isinstance(planes, torch.Tensor) else planes)
    if tensor.ndim != 5 or tensor.shape[1] != len(PLANES):
        raise ValueError(
            f"lesion planes of shape {tuple(tensor.shape)} are invalid: expected (N, 3, F, S, S)"
        )
    n, _, frames, height, width = tensor.shape
    return tensor.float().permute(0, 2, 1, 3, 4).reshape(n * frames, len(PLANES), 1, height, width)


def frame_triplet_dataset(
    planes: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray | torch.Tensor
) -> TensorDataset:
    """Frame-level training set: lesion planes (N, 3, F, S, S) and labels (N,) -> N * F samples
    ``(frames (3, 1, S, S) float32, label () int64)``, the F frames of lesion 0 first."""
    frames = lesion_frames(planes)
    n_lesions, n_frames = int(np.shape(planes)[0]), int(np.shape(planes)[2])
    label_tensor = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    if label_tensor.numel() != n_lesions or not bool(((label_tensor == 0) | (label_tensor == 1)).all()):
        raise ValueError(f"labels must be {n_lesions} values in {{0, 1}} (one per lesion), got {labels!r}")
    return TensorDataset(frames, label_tensor.repeat_interleave(n_frames))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then the previous mode again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
