"""Grad-CAM of the tri-plane classifier: which pixels of each plane drive its malignancy call.

One heatmap per plane the model uses, from the activations and gradients of a ResNet stage of that plane's
branch (``layer4`` by default), for one frame-triplet of a lesion; :func:`save_grad_cam_images` overlays them
on the frames as PNGs (``fedabus predict --gradcam-dir``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.models.triplane import PLANES
from shared.training.cls_planes import eval_mode, model_device, select_planes, unwrap_classifier

__all__ = ["grad_cam", "save_grad_cam_images"]

_STAGES = ("layer1", "layer2", "layer3", "layer4")


@contextmanager
def _opacus_hooks_off(model: nn.Module) -> Iterator[None]:
    """Pause Opacus' per-sample-gradient hooks (if ``model`` is a GradSampleModule) for the block."""
    enabled = getattr(model, "hooks_enabled", None)
    if enabled is None:
        yield
        return
    model.disable_hooks()
    try:
        yield
    finally:
        if enabled:
            model.enable_hooks()


def _cam(activation: torch.Tensor, gradient: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Grad-CAM of one branch: activation/gradient (1, C, h, w) -> heatmap (H, W) float32 in [0, 1]."""
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    return cam.clamp(0, 1).detach().cpu().numpy().astype(np.float32)


def grad_cam(
    model: nn.Module,
    planes: np.ndarray | torch.Tensor,
    *,
    frame: int = 0,
    target_class: int | None = None,
    stage: str | None = None,
) -> dict[str, np.ndarray]:
    """Grad-CAM heatmaps of one lesion's frame-triplet, one per plane the model uses.

    Args:
        model: the classifier (plain, PEFT- or Opacus-wrapped), on any device; run in eval mode.
        planes: the lesion's planes (3, F, S, S).
        frame: which frame (0 .. F-1) to explain.
        target_class: class whose logit is explained (1 malignant, 0 benign); default the predicted class.
        stage: branch stage whose output is used; default the last convolutional stage: ``layer4`` of the
            ResNet-family backbones (resolution S / 32; ``layer3`` gives S / 16), ``features`` of
            ``densenet161`` and ``vgg19`` (their only choice).

    Returns:
        {plane: heatmap (S, S) float32 in [0, 1]}, 1 at the most important location (all 0 when no location
        supports the class).
    """
    tensor = torch.as_tensor(np.asarray(planes) if not isinstance(planes, torch.Tensor) else planes).float()
    if tensor.ndim != 4 or tensor.shape[0] != len(PLANES) or not 0 <= frame < tensor.shape[1]:
        raise ValueError(
            f"grad_cam: planes of shape {tuple(tensor.shape)} with frame={frame}; expected (3, F, S, S)"
        )
    base = unwrap_classifier(model)
    stages = _STAGES if hasattr(base.branches[base.planes[0]], "layer4") else ("features",)
    stage = stage or stages[-1]
    if stage not in stages:
        raise ValueError(f"grad_cam: stage {stage!r} is not a {base.backbone} stage; choose one of {stages}")
    x = select_planes(tensor[:, frame : frame + 1].unsqueeze(0), base.planes)  # (1, P, 1, S, S)
    x = x.to(model_device(model)).requires_grad_(True)
    activations: dict[str, torch.Tensor] = {}
    handles = [
        base.branches[p]
        .get_submodule(stage)
        .register_forward_hook(lambda _m, _i, out, p=p: activations.__setitem__(p, out))
        for p in base.planes
    ]
    try:
        with eval_mode(model), _opacus_hooks_off(model), torch.enable_grad():
            logits = model(x)
            target = int(logits.argmax(dim=1)) if target_class is None else target_class
            grads = torch.autograd.grad(logits[0, target], [activations[p] for p in base.planes])
    finally:
        for handle in handles:
            handle.remove()
    size = (tensor.shape[-2], tensor.shape[-1])
    return {p: _cam(activations[p].detach(), g, size) for p, g in zip(base.planes, grads, strict=True)}


def _display(image: np.ndarray) -> np.ndarray:
    """Min-max scale a frame to [0, 1] for display."""
    low, high = float(np.min(image)), float(np.max(image))
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def save_grad_cam_images(
    heatmaps: Mapping[str, np.ndarray],
    planes: np.ndarray | torch.Tensor,
    out_dir: str | Path,
    case_id: str,
    *,
    frame: int = 0,
    alpha: float = 0.45,
) -> list[Path]:
    """Write one PNG per plane: the frame in grey with the heatmap overlaid (jet colours, ``alpha``).

    ``heatmaps`` is :func:`grad_cam`'s output for the same ``planes`` (3, F, S, S) and ``frame``. Files are
    ``{out_dir}/{case_id}_{plane}_gradcam.png`` (characters other than letters, digits, ``_ . -`` in the
    case id become ``_``); ``out_dir`` is created. Returns the written paths in plane order.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    array = np.asarray(planes.detach().cpu() if isinstance(planes, torch.Tensor) else planes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", case_id) or "case"
    written = []
    for plane in (p for p in PLANES if p in heatmaps):
        image = array[PLANES.index(plane), frame]
        if heatmaps[plane].shape != image.shape:
            raise ValueError(f"heatmap of {plane!r} has shape {heatmaps[plane].shape}, frame {image.shape}")
        figure = Figure(figsize=(3, 3), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_axes((0, 0, 1, 0.92))
        axes.imshow(_display(image), cmap="gray", vmin=0, vmax=1)
        axes.imshow(heatmaps[plane], cmap="jet", alpha=alpha, vmin=0, vmax=1)
        axes.set_axis_off()
        figure.suptitle(f"{case_id} · {plane} · frame {frame}", fontsize=8)
        path = out / f"{stem}_{plane}_gradcam.png"
        figure.savefig(path)
        written.append(path)
    return written
