"""Click-driven training of SAM-Med3D adapters (seed 000), in plain torch.

One training sample is a lesion-centred crop ``(1, P, P, P)`` and its mask. :func:`seg_click_loss` plays an
interactive episode on it: the image embedding is computed once, then the first click (a random lesion voxel)
is decoded, and each further iteration adds corrective clicks placed on the false-negative / false-positive
voxels of the previous prediction and feeds the previous low-resolution logits back as the mask prompt. The
loss is MONAI's ``DiceCELoss(sigmoid=True)`` on the logits upsampled to the crop, averaged over iterations.

Choices worth knowing:

* **Click placement is not differentiated**: clicks come from the thresholded, detached prediction, and the
  low-resolution logits fed back as the mask prompt are detached too (each iteration back-propagates through
  the shared image embedding and its own decoder pass, not through earlier iterations).
* **Per-sample click streams**: every sample of a batch draws its clicks from its own child generator
  (``Generator.spawn``), so a sample's clicks do not depend on the other samples of its batch, and one batch
  of 2 draws the same clicks as two batches of 1 (gradient accumulation gives the same update).
* **Padding**: samples with fewer clicks than others in their batch get padding points (label -1, SAM's "not
  a point"). The decoder attends to them, so that count is the one coupling between samples of a batch. It
  vanishes when every sample gets the same number of clicks, e.g. with ``seg-clicks-per-step = 1``.
* **DP-ready** (Opacus): no BatchNorm (SAM-Med3D uses LayerNorm only), parameters are never modified in
  place outside the optimiser, the losses are per-sample means, the model parts are reached through Opacus'
  ``_module`` and PEFT wrappers, and empty batches (Poisson sampling) are skipped without a step. Two things
  stay with the DP wrapper: Opacus builds per-sample gradients only for parameters used through a module's
  forward (SAM's point/mask-token embeddings are read as ``.weight``, and the IoU head gets no gradient from
  this loss), and the FedProx gradient does not enter ``grad_sample``.
* The model stays in ``train()`` mode while training: LayerNorm has no running statistics, and the only
  dropout is LoRA's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from shared.adapters import adapter_parameters
from shared.clicks import DEFAULT_MAX_TOTAL_CLICKS, PAD_LABEL, ClickSession, as_generator
from shared.config import TrainConfig

__all__ = [
    "autocast_context",
    "decode_clicks",
    "encode_images",
    "parse_milestones",
    "patch_size_of",
    "proximal_term",
    "sam_parts",
    "seg_click_loss",
    "snapshot_parameters",
    "train_segmentation",
    "trainable_parameters",
    "upsample_logits",
]

_SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


# ---------------------------------------------------------------------------------- model access
def sam_parts(model: nn.Module) -> nn.Module:
    """The module that holds ``image_encoder``, ``prompt_encoder`` and ``mask_decoder``.

    Looks through Opacus' ``GradSampleModule`` (``._module``) and PEFT's ``PeftModel`` (``get_base_model()``);
    calling the parts of the returned module still runs LoRA layers and Opacus hooks, since those live on
    the parts themselves. Raises TypeError when no such module is found.
    """
    inner = model
    for _ in range(4):
        if all(isinstance(getattr(inner, name, None), nn.Module) for name in _SAM_PARTS):
            return inner
        if isinstance(getattr(inner, "_module", None), nn.Module):
            inner = inner._module
        elif isinstance(inner, PeftModel):
            inner = inner.get_base_model()
        else:
            break
    raise TypeError(f"{type(model).__name__} is not a SAM-Med3D model (needs {', '.join(_SAM_PARTS)})")


def patch_size_of(model: nn.Module) -> int:
    """Side P (voxels) of the cubic crop the model takes (its prompt encoder's ``input_image_size``)."""
    size = tuple(sam_parts(model).prompt_encoder.input_image_size)
    if len(set(size)) != 1:
        raise ValueError(f"SAM-Med3D input_image_size {size} is not a cube")
    return int(size[0])


def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Image embeddings ``(B, C, G, G, G)`` of crops ``(B, 1, P, P, P)`` (normalised intensities)."""
    return sam_parts(model).image_encoder(images)


def decode_clicks(
    model: nn.Module,
    embeddings: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
    mask_logits: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt round on precomputed embeddings (the official prompt-encoder + mask-decoder pattern).

    Args:
        embeddings: ``(B, C, G, G, G)`` from :func:`encode_images`.
        coords: ``(B, N, 3)`` float voxel indices ``(z, y, x)`` of the crop.
        labels: ``(B, N)`` int64, 1 positive, 0 negative, -1 padding.
        mask_logits: previous low-resolution logits ``(B, 1, 4G, 4G, 4G)`` or None (first round).

    Returns:
        low-resolution logits ``(B, 1, 4G, 4G, 4G)`` and predicted IoU ``(B, 1)``.
    """
    sam = sam_parts(model)
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_logits)
    return sam.mask_decoder(
        image_embeddings=embeddings,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )


def upsample_logits(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """Low-resolution logits ``(B, 1, L, L, L)`` -> ``(B, 1, size, size, size)`` (trilinear; identity if L == size)."""
    if tuple(low_res.shape[-3:]) == (size,) * 3:
        return low_res
    return F.interpolate(low_res, size=(size,) * 3, mode="trilinear", align_corners=False)


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when ``enabled``; a no-op elsewhere (CPU bf16 is slow and not what sites use)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------- clicks of a batch
class _BatchClicks:
    """One :class:`ClickSession` per sample, each with its own generator, merged into padded prompts."""

    def __init__(self, masks: torch.Tensor, rng: np.random.Generator | int, *, max_per_step: int | None):
        children = as_generator(rng).spawn(masks.shape[0])
        gt = masks.detach().to("cpu") > 0.5
        self.sessions = [
            ClickSession(
                gt[i : i + 1],
                child,
                max_total_clicks=DEFAULT_MAX_TOTAL_CLICKS,
                max_clicks_per_step=max_per_step,
            )
            for i, child in enumerate(children)
        ]
        for session in self.sessions:
            session.step()

    def step(self, predictions: torch.Tensor) -> None:
        """Add corrective clicks from binary predictions ``(B, 1, P, P, P)``."""
        pred = predictions.detach().to("cpu").numpy()
        for i, session in enumerate(self.sessions):
            session.step(pred[i : i + 1])

    def prompts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """coords ``(B, N, 3)`` float32 and labels ``(B, N)`` int64, padded with :data:`PAD_LABEL`."""
        per_sample = [session.points(0) for session in self.sessions]
        n = max(len(labels) for _, labels in per_sample)
        coords = np.zeros((len(per_sample), n, 3), dtype=np.float32)
        labels = np.full((len(per_sample), n), PAD_LABEL, dtype=np.int64)
        for i, (points, point_labels) in enumerate(per_sample):
            coords[i, : len(point_labels)] = points
            labels[i, : len(point_labels)] = point_labels
        return torch.from_numpy(coords).to(device), torch.from_numpy(labels).to(device)


def _default_loss() -> nn.Module:
    from monai.losses import DiceCELoss  # imported here: importing MONAI takes seconds

    return DiceCELoss(sigmoid=True)


def _check_batch(images: torch.Tensor, masks: torch.Tensor, patch_size: int) -> None:
    expected = (1, patch_size, patch_size, patch_size)
    if images.ndim != 5 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"images must have shape (B, 1, {patch_size}, {patch_size}, {patch_size}), got {tuple(images.shape)}"
        )
    if tuple(masks.shape) != tuple(images.shape):
        raise ValueError(f"masks shape {tuple(masks.shape)} differs from images shape {tuple(images.shape)}")


def seg_click_loss(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    config: TrainConfig,
    rng: np.random.Generator | int,
    loss_fn: nn.Module | None = None,
) -> torch.Tensor:
    """DiceCE loss of one click episode per sample, averaged over ``config.seg_click_iterations`` iterations.

    Args:
        images: ``(B, 1, P, P, P)`` normalised crops; P is the model's input size.
        masks: ``(B, 1, P, P, P)`` binary lesion masks (float or bool); each must hold a lesion voxel.
        config: ``seg_click_iterations`` (>= 1) and ``seg_clicks_per_step`` (cap per corrective iteration;
            0 or less means one click per slice of the error region, uncapped) are used; a sample never gets
            more than 11 clicks in total (seed 000).
        rng: generator (or seed) the per-sample click generators are spawned from.
        loss_fn: ``(logits, target) -> loss``; default MONAI ``DiceCELoss(sigmoid=True)``.

    Returns:
        a scalar tensor (mean over the batch and the iterations).
    """
    iterations = config.seg_click_iterations
    if iterations < 1:
        raise ValueError(f"train config: seg-click-iterations = {iterations} must be >= 1")
    patch = patch_size_of(model)
    _check_batch(images, masks, patch)
    loss_fn = loss_fn if loss_fn is not None else _default_loss()
    target = masks.to(images.device, torch.float32)
    per_step = config.seg_clicks_per_step if config.seg_clicks_per_step > 0 else None
    clicks = _BatchClicks(masks, rng, max_per_step=per_step)
    embeddings = encode_images(model, images)
    previous: torch.Tensor | None = None
    total = images.new_zeros((), dtype=torch.float32)
    for iteration in range(iterations):
        coords, labels = clicks.prompts(images.device)
        low_res, _ = decode_clicks(model, embeddings, coords, labels, previous)
        logits = upsample_logits(low_res, patch).float()
        total = total + loss_fn(logits, target)
        previous = low_res.detach()
        if iteration + 1 < iterations:
            clicks.step(logits.detach() > 0)
    return total / iterations


# ---------------------------------------------------------------------------------- parameters
def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with ``requires_grad``, by name.

    For a PEFT model (possibly inside Opacus' ``GradSampleModule``) the names are the canonical adapter names
    of :func:`shared.adapters.adapter_parameters` (no ``seg.`` prefix), e.g.
    ``image_encoder.blocks.0.attn.qkv.lora_A.weight``; for any other module, ``named_parameters`` names.
    """
    inner = model
    while isinstance(getattr(inner, "_module", None), nn.Module) and not isinstance(inner, PeftModel):
        inner = inner._module
    if isinstance(inner, PeftModel):
        return adapter_parameters(inner)
    return {name: p for name, p in inner.named_parameters() if p.requires_grad}


def snapshot_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of :func:`trainable_parameters` (a FedProx reference: the global adapter of the round)."""
    return {name: p.detach().clone() for name, p in trainable_parameters(model).items()}


def proximal_term(
    params: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx term ``mu / 2 * sum ||w - w_ref||²`` over ``params`` (every name must be in ``reference``)."""
    missing = sorted(set(params) - set(reference))
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise KeyError(
            f"proximal reference lacks {len(missing)} trainable parameter(s): {', '.join(missing[:3])}{more}"
        )
    squares = [(p - reference[name].to(p.device, p.dtype)).pow(2).sum() for name, p in params.items()]
    return 0.5 * mu * torch.stack(squares).sum()


def parse_milestones(text: str) -> list[int]:
    """``"120,180"`` -> ``[120, 180]`` (epochs, increasing); empty -> ``[]``."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(
            f"train config: seg-lr-milestones = {text!r} must be comma-separated epochs, e.g. '120,180'"
        ) from None
    if any(v < 1 for v in values) or values != sorted(set(values)):
        raise ValueError(f"train config: seg-lr-milestones = {text!r} must be increasing epochs >= 1")
    return values


# ---------------------------------------------------------------------------------- training loop
def _batch_tensors(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, masks) from a dict batch with ``image`` and ``mask`` (:func:`shared.data.loaders.seg_train_loader`)
    or an ``(image, mask)`` pair. ``label`` is never read as a mask: in fedabus it is the malignancy label."""
    if isinstance(batch, Mapping):
        if "image" not in batch or "mask" not in batch:
            raise KeyError(f"a segmentation batch needs keys 'image' and 'mask'; got {sorted(batch)}")
        images, masks = batch["image"], batch["mask"]
    elif isinstance(batch, Sequence) and len(batch) == 2:
        images, masks = batch
    else:
        raise TypeError(
            f"a segmentation batch must be a dict or an (image, mask) pair, got {type(batch).__name__}"
        )
    return torch.as_tensor(images).to(device, torch.float32), torch.as_tensor(masks).to(device)


def _progress_bar(loader: Iterable[Any], *, enabled: bool, description: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(loader, desc=description, disable=not enabled, leave=False, dynamic_ncols=True)


class _Stepper:
    """AdamW + step decay over the trainable parameters, with gradient accumulation and FedProx."""

    def __init__(
        self, model: nn.Module, config: TrainConfig, proximal_ref: Mapping[str, torch.Tensor] | None
    ) -> None:
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError(
                "the model has no trainable parameter: attach an adapter (shared.adapters.attach_lora) first"
            )
        if config.seg_grad_accumulation < 1:
            raise ValueError(
                f"train config: seg-grad-accumulation = {config.seg_grad_accumulation} must be >= 1"
            )
        self.optimizer = torch.optim.AdamW(
            self.params.values(), lr=config.seg_lr, weight_decay=config.seg_weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=parse_milestones(config.seg_lr_milestones), gamma=config.seg_lr_decay
        )
        self.mu = config.proximal_mu
        self.reference: Mapping[str, torch.Tensor] | None = None
        if self.mu > 0:
            self.reference = proximal_ref if proximal_ref is not None else snapshot_parameters(model)
        self.accumulation = config.seg_grad_accumulation
        self.pending = 0
        self.steps = 0

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def backward(self, loss: torch.Tensor) -> bool:
        """Back-propagate one micro-batch (loss scaled by 1/accumulation, proximal term added); return whether
        an optimiser step followed."""
        if self.reference is not None:
            loss = loss + proximal_term(self.params, self.reference, self.mu)
        (loss / self.accumulation).backward()
        self.pending += 1
        return self.step() if self.pending == self.accumulation else False

    def step(self) -> bool:
        """Apply the accumulated gradients (also at the end of an epoch with a partial accumulation)."""
        if self.pending == 0:
            return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        self.steps += 1
        return True


class _Run:
    """One :func:`train_segmentation` call: the stepper, the click generator and the history it fills."""

    def __init__(
        self, model: nn.Module, config: TrainConfig, device: torch.device, stepper: _Stepper
    ) -> None:
        self.model, self.config, self.device, self.stepper = model, config, device, stepper
        self.loss_fn = _default_loss()
        self.rng = np.random.default_rng(config.seed)
        self.history: dict[str, Any] = {
            "loss_history": [],
            "epoch_loss": [],
            "examples_per_epoch": [],
            "skipped_empty_batches": 0,
        }

    def epoch(self, loader: Iterable[Any], bar_description: str, show: bool) -> None:
        losses: list[float] = []
        pending: list[float] = []
        examples = 0
        bar = _progress_bar(loader, enabled=show, description=bar_description)
        for batch in bar:
            images, masks = _batch_tensors(batch, self.device)
            if images.shape[0] == 0:  # Poisson sampling (Opacus) can draw no sample
                self.history["skipped_empty_batches"] += 1
                continue
            with autocast_context(self.device, self.config.bf16):
                loss = seg_click_loss(
                    self.model, images, masks, config=self.config, rng=self.rng, loss_fn=self.loss_fn
                )
            stepped = self.stepper.backward(loss)
            losses.append(float(loss.detach()))
            pending.append(losses[-1])
            examples += int(images.shape[0])
            if stepped:
                self.history["loss_history"].append(float(np.mean(pending)))
                pending = []
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{self.stepper.lr:.2e}")
        if self.stepper.step():
            self.history["loss_history"].append(float(np.mean(pending)))
        self.history["epoch_loss"].append(float(np.mean(losses)) if losses else math.nan)
        self.history["examples_per_epoch"].append(examples)


def train_segmentation(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    config: TrainConfig,
    device: torch.device | str,
    proximal_ref: Mapping[str, torch.Tensor] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train the trainable (adapter) parameters of SAM-Med3D on click episodes for ``config.seg_epochs``.

    Args:
        model: SAM-Med3D with an adapter attached (PEFT), possibly wrapped by Opacus, or any SAM-Med3D whose
            parameters to train require grad (e.g. a fully trained base); already on ``device``.
        loader: yields batches ``{"image": (B, 1, P, P, P), "mask": (B, 1, P, P, P), ...}`` (as
            :func:`shared.data.loaders.seg_train_loader`) or ``(image, mask)`` pairs, once per epoch; the
            loader sets the batch size (``seg-batch-size``). Empty batches are skipped without a step.
        config: AdamW with ``seg_lr`` / ``seg_weight_decay``; the learning rate is multiplied by
            ``seg_lr_decay`` at each epoch in ``seg_lr_milestones``; ``seg_grad_accumulation`` micro-batches
            per optimiser step (each loss scaled by 1/accumulation; a partial accumulation at the end of an
            epoch is applied as is); FedProx when ``proximal_mu > 0``; bf16 autocast on CUDA when ``bf16``;
            click streams seeded by ``seed``.
        proximal_ref: FedProx reference by :func:`trainable_parameters` names (see
            :func:`snapshot_parameters`); None takes the weights the model has when the call starts (the
            global weights a federated round begins with).
        progress: show a progress bar per epoch (None: ``config.progress``).

    Returns:
        ``{"loss_history": [mean loss per optimiser step], "epoch_loss": [mean per epoch], "steps": int,
        "examples": int (samples processed over all epochs), "examples_per_epoch": [int],
        "skipped_empty_batches": int, "lr": final learning rate}``; losses exclude the proximal term.
    """
    run = _Run(model, config, torch.device(device), _Stepper(model, config, proximal_ref))
    show = config.progress if progress is None else progress
    was_training = model.training
    model.train()
    try:
        for epoch in range(config.seg_epochs):
            run.epoch(loader, f"seg epoch {epoch + 1}/{config.seg_epochs}", show)
            run.stepper.scheduler.step()
    finally:
        model.train(was_training)
    history = run.history
    return {
        **history,
        "steps": run.stepper.steps,
        "examples": int(sum(history["examples_per_epoch"])),
        "lr": run.stepper.lr,
    }
