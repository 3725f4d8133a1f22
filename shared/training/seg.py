"""Click-driven training of SAM-Med3D adapters (seed 000), in plain torch.

(Just over 500 lines on purpose: the click episode, its DP rules and the loop that runs them share private
helpers and one long docstring of choices; splitting them would only make those helpers public.)

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
  vanishes with ``fixed_prompt_length`` (always on under DP, below): every sample is then padded to the most
  clicks the configuration allows at that iteration.
* **Sample-level DP** (``train_segmentation(..., privacy=DPSettings)``, Opacus): one sample is one case's
  crop, drawn by Poisson sampling (:func:`shared.privacy.sampling.poisson_loader`; other loaders are refused).
  The AdamW optimiser is wrapped by Opacus' DPOptimizer (per-sample clipping, Gaussian noise, accountant);
  an empty Poisson batch becomes a noise-only step, so the accountant counts every drawn step; gradient
  accumulation is refused. Three things keep each sample's gradient its own: (1) every sample's prompt is
  padded to the most clicks the configuration allows at that iteration (``fixed_prompt_length``), so no
  sample's padding depends on the others of its batch; (2) parameters Opacus cannot give per-sample gradients
  are frozen for the call (:data:`DP_FROZEN_PARAMETERS`: SAM's point / not-a-point / no-mask embeddings and
  the IoU and mask tokens are read as ``.weight``; the IoU head gets no gradient from this loss; with one
  click iteration the mask-prompt path is unused too) — they keep the global value and still travel, and a
  parameter that gets no per-sample gradient anyway stops training with an error naming it; (3) the FedProx
  gradient is added after clipping and noising (:mod:`shared.privacy.steps`; it depends on no patient data).
  No BatchNorm (SAM-Med3D uses LayerNorm only; checked), parameters are never modified in place outside the
  optimiser, the losses are per-sample means, and the model parts are reached through Opacus' ``_module``
  and PEFT wrappers. Without DP, empty batches are skipped without a step.
* The model stays in ``train()`` mode while training: LayerNorm has no running statistics, and the only
  dropout is LoRA's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from shared.adapters import adapter_parameters
from shared.clicks import DEFAULT_MAX_TOTAL_CLICKS, PAD_LABEL, ClickSession, as_generator
from shared.config import TrainConfig
from shared.models.auto_seg import auto_segmenter_of, is_auto_segmenter
from shared.precision import Precision
from shared.privacy.dp_sgd import (
    DPSettings,
    check_poisson_loader,
    frozen_parameters,
    physical_batches,
    private_training,
)
from shared.privacy.steps import ProximalPull, proximal_pull
from shared.privacy.validation import PrivacyConfigError
from shared.training.stepper import Stepper, TrainResult, progress_bar

__all__ = [
    "DP_FROZEN_PARAMETERS",
    "MASK_PROMPT_PARAMETERS",
    "decode_clicks",
    "dp_frozen_parameters",
    "dp_untrained_parameters",
    "encode_images",
    "max_prompt_clicks",
    "parse_milestones",
    "patch_size_of",
    "sam_parts",
    "seg_click_loss",
    "snapshot_parameters",
    "train_segmentation",
    "trainable_parameters",
    "upsample_logits",
]

_SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
#: Name prefixes (in the un-wrapped SAM-Med3D) of parameters frozen under DP: Opacus builds per-sample gradients
#: only through a module's forward, and these embeddings are read as ``.weight`` (points, padding, no-mask,
#: IoU and mask tokens), while the IoU head gets no gradient from the click loss. Checked against the model
#: (each prefix must name a parameter) and, in the tests, against a probe of which parameters get none.
DP_FROZEN_PARAMETERS: tuple[str, ...] = (
    "prompt_encoder.point_embeddings.",
    "prompt_encoder.not_a_point_embed.",
    "prompt_encoder.no_mask_embed.",
    "mask_decoder.iou_token.",
    "mask_decoder.mask_tokens.",
    "mask_decoder.iou_prediction_head.",
)
#: The mask-prompt path: used from the second click iteration on, so also frozen under DP with one iteration.
MASK_PROMPT_PARAMETERS = "prompt_encoder.mask_downscaling."


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

    def prompts(self, device: torch.device, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """coords ``(B, N, 3)`` float32 and labels ``(B, N)`` int64, padded with :data:`PAD_LABEL` to N = the
        batch's largest click count, or to ``length`` when given (then no sample's padding depends on others)."""
        per_sample = [session.points(0) for session in self.sessions]
        n = max(len(labels) for _, labels in per_sample)
        if length is not None:
            if length < n:
                raise ValueError(f"a sample has {n} clicks, more than the fixed prompt length {length}")
            n = length
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


def max_prompt_clicks(iteration: int, config: TrainConfig) -> int:
    """The most clicks a sample can have at click iteration ``iteration`` (0 = first click): 1 plus
    ``seg-clicks-per-step`` per corrective iteration (uncapped when <= 0), at most 11 in total (seed 000)."""
    per_step = config.seg_clicks_per_step if config.seg_clicks_per_step > 0 else DEFAULT_MAX_TOTAL_CLICKS
    return min(DEFAULT_MAX_TOTAL_CLICKS, 1 + iteration * per_step)


def seg_click_loss(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    config: TrainConfig,
    rng: np.random.Generator | int,
    loss_fn: nn.Module | None = None,
    fixed_prompt_length: bool = False,
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
        fixed_prompt_length: pad every sample's prompt to :func:`max_prompt_clicks` of the iteration instead of
            the batch's largest click count, so that a sample's loss does not depend on the other samples of
            its batch (required for per-sample gradients under DP).

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
        length = max_prompt_clicks(iteration, config) if fixed_prompt_length else None
        coords, labels = clicks.prompts(images.device, length)
        low_res, _ = decode_clicks(model, embeddings, coords, labels, previous)
        logits = upsample_logits(low_res.float(), patch)  # the loss is computed in float32
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


def dp_frozen_parameters(model: nn.Module, config: TrainConfig) -> dict[str, nn.Parameter]:
    """The trainable parameters to freeze under DP, by name in the un-wrapped SAM-Med3D.

    Those under :data:`DP_FROZEN_PARAMETERS`, plus :data:`MASK_PROMPT_PARAMETERS` when
    ``seg-click-iterations`` is 1 (no mask prompt is ever fed). Raises ValueError when a prefix names no
    parameter of the model: the list no longer fits the architecture and must be updated.
    """
    sam = sam_parts(model)
    if isinstance(sam, PeftModel):  # PEFT forwards the parts' names to its base model
        sam = sam.get_base_model()
    named = dict(sam.named_parameters())
    prefixes = DP_FROZEN_PARAMETERS
    if config.seg_click_iterations == 1:
        prefixes = (*prefixes, MASK_PROMPT_PARAMETERS)
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in named):
            raise ValueError(
                f"SAM-Med3D has no parameter under {prefix!r}: the DP freeze list (shared.training.seg."
                "DP_FROZEN_PARAMETERS) no longer fits the architecture"
            )
    return {name: p for name, p in named.items() if p.requires_grad and name.startswith(prefixes)}


def dp_untrained_parameters(model: nn.Module, keep: str) -> dict[str, nn.Parameter]:
    """The fully trained (non-LoRA) parameters of ``model`` outside the comma-separated submodules ``keep``
    (``privacy.seg-trainable``, e.g. ``mask_decoder``; empty: none), by :func:`trainable_parameters` name: frozen
    for DP-SGD, so that fewer dimensions share the noise; they keep the global value and still travel. Raises
    ConfigError naming ``privacy.seg-trainable`` for a submodule the model does not train."""
    names = tuple(part.strip() for part in keep.split(",") if part.strip())
    params = {
        key: p
        for key, p in trainable_parameters(model).items()
        if ".lora_A." not in key and ".lora_B." not in key
    }
    for name in names:
        if not any(key.startswith(f"{name}.") for key in params):
            raise PrivacyConfigError(
                f"privacy.seg-trainable names {name!r}, which the segmenter does not train fully "
                "(adapter.seg-trainable)"
            )
    kept = tuple(f"{name}." for name in names)
    return {key: p for key, p in params.items() if not key.startswith(kept)}


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
def _batch_tensors(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, masks) from a dict batch with ``image`` and ``mask`` (:func:`shared.data.loaders.seg_train_loader`)
    or an ``(image, mask)`` pair; None for an empty batch (no rows, or ``[]`` from a Poisson loader). ``label``
    is never read as a mask: in fedabus it is the malignancy label."""
    if isinstance(batch, Mapping):
        if "image" not in batch or "mask" not in batch:
            raise KeyError(f"a segmentation batch needs keys 'image' and 'mask'; got {sorted(batch)}")
        images, masks = batch["image"], batch["mask"]
    elif isinstance(batch, Sequence) and len(batch) == 0:
        return None
    elif isinstance(batch, Sequence) and len(batch) == 2:
        images, masks = batch
    else:
        raise TypeError(
            f"a segmentation batch must be a dict or an (image, mask) pair, got {type(batch).__name__}"
        )
    images, masks = torch.as_tensor(images), torch.as_tensor(masks)
    if images.shape[0] == 0:
        return None
    return images.to(device, torch.float32), masks.to(device)


def _optimisation(
    model: nn.Module, config: TrainConfig, proximal_ref: Mapping[str, torch.Tensor] | None
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.MultiStepLR, ProximalPull | None]:
    """AdamW over the trainable parameters, its step decay and the FedProx pull (None when off)."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError(
            "the model has no trainable parameter: attach an adapter (shared.adapters.attach_lora) first"
        )
    if config.seg_grad_accumulation < 1:
        raise ValueError(f"train config: seg-grad-accumulation = {config.seg_grad_accumulation} must be >= 1")
    optimizer = torch.optim.AdamW(params.values(), lr=config.seg_lr, weight_decay=config.seg_weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=parse_milestones(config.seg_lr_milestones), gamma=config.seg_lr_decay
    )
    reference = None
    if config.proximal_mu > 0:
        reference = proximal_ref if proximal_ref is not None else snapshot_parameters(model)
    hint = "take it with snapshot_parameters(model)"
    pull = proximal_pull(params, reference, config.proximal_mu, hint=hint) if reference else None
    return optimizer, scheduler, pull


def _show_loss_and_lr(bar: Any, stepper: Stepper) -> Callable[[float], None]:
    return lambda loss: bar.set_postfix(loss=f"{loss:.4f}", lr=f"{stepper.lr:.2e}")


def _train(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    config: TrainConfig,
    device: torch.device,
    stepper: Stepper,
    show: bool,
) -> dict[str, Any]:
    """The epochs of :func:`train_segmentation` (model in train mode, then back to its mode) and its report."""
    loss_fn = _default_loss()
    rng = np.random.default_rng(config.seed)

    automatic = is_auto_segmenter(model)

    def batch_loss(tensors: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        images, masks = tensors
        if automatic:  # no click: the network's own prediction of the crop (shared.training.seg_auto)
            from shared.training.seg_auto import auto_seg_loss

            return auto_seg_loss(model, images, masks, loss_fn=loss_fn), int(images.shape[0])
        loss = seg_click_loss(
            model, images, masks, config=config, rng=rng, loss_fn=loss_fn, fixed_prompt_length=stepper.dp
        )
        return loss, int(images.shape[0])

    epochs = []
    was_training = model.training
    model.train()
    try:
        for epoch in range(config.seg_epochs):
            bar = progress_bar(loader, enabled=show, description=f"seg epoch {epoch + 1}/{config.seg_epochs}")
            batches = (_batch_tensors(batch, device) for batch in bar)
            epochs.append(stepper.epoch(batches, batch_loss, after_batch=_show_loss_and_lr(bar, stepper)))
    finally:
        model.train(was_training)
    result = TrainResult(tuple(epochs), stepper.lr)
    return {
        "loss_history": result.step_losses,
        "epoch_loss": [e.mean_batch_loss for e in result.epochs],
        "examples_per_epoch": [e.examples for e in result.epochs],
        "skipped_empty_batches": result.skipped_empty_batches,
        "steps": result.steps,
        "noise_only_steps": result.noise_only_steps,
        "examples": result.examples,
        "lr": result.lr,
    }


def train_segmentation(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    config: TrainConfig,
    device: torch.device | str,
    proximal_ref: Mapping[str, torch.Tensor] | None = None,
    progress: bool | None = None,
    privacy: DPSettings | None = None,
) -> dict[str, Any]:
    """Train the trainable (adapter) parameters of SAM-Med3D on click episodes for ``config.seg_epochs``, or
    the fully automatic segmenter (:mod:`shared.models.auto_seg`) on the same crops without clicks
    (:func:`shared.training.seg_auto.auto_seg_loss`; not under ``privacy``).

    Args:
        model: SAM-Med3D with an adapter attached (PEFT), or any SAM-Med3D whose parameters to train require
            grad (e.g. a fully trained base), or the automatic segmenter; already on ``device``. Without
            ``privacy`` it may also come wrapped by Opacus; with ``privacy`` pass the plain (PEFT) model.
        loader: yields batches ``{"image": (B, 1, P, P, P), "mask": (B, 1, P, P, P), ...}`` (as
            :func:`shared.data.loaders.seg_train_loader`) or ``(image, mask)`` pairs, once per epoch; the
            loader sets the batch size (``seg-batch-size``). Empty batches (or ``[]``) are skipped without a
            step, or become noise-only steps under DP. With ``privacy`` it must be a Poisson loader
            (:func:`shared.privacy.sampling.poisson_loader`) at the settings' rate and step count.
        config: AdamW with ``seg_lr`` / ``seg_weight_decay``; the learning rate is multiplied by
            ``seg_lr_decay`` at each epoch in ``seg_lr_milestones``; ``seg_grad_accumulation`` micro-batches
            per optimiser step (each loss scaled by 1/accumulation; a partial accumulation at the end of an
            epoch is applied as is; refused under DP); FedProx when ``proximal_mu > 0`` (its gradient
            ``mu * (w - w_ref)`` is added at each step, after clipping and noising under DP); autocast by
            ``precision`` (:mod:`shared.precision`; only ``fp32`` under DP); click streams seeded by ``seed``.
        proximal_ref: FedProx reference by :func:`trainable_parameters` names (see
            :func:`snapshot_parameters`); None takes the weights the model has when the call starts (the
            global weights a federated round begins with).
        progress: show a progress bar per epoch (None: ``config.progress``).
        privacy: DP-SGD settings (module docstring, "Sample-level DP"); None trains without DP.

    Returns:
        ``{"loss_history": [mean loss per optimiser step], "epoch_loss": [mean per epoch], "steps": int
        (optimiser steps, noise-only ones included), "noise_only_steps": int, "examples": int (samples
        processed over all epochs), "examples_per_epoch": [int], "skipped_empty_batches": int, "lr": final
        learning rate}``, and under DP ``"privacy_history"``: the accountant's ``[(noise_multiplier,
        sample_rate, steps)]``; losses exclude the proximal term.
    """
    device = torch.device(device)
    show = config.progress if progress is None else progress
    accumulation = config.seg_grad_accumulation
    precision = Precision.on(config.precision, device)
    if privacy is None:
        optimizer, scheduler, pull = _optimisation(model, config, proximal_ref)
        stepper = Stepper(
            optimizer, pull=pull, accumulation=accumulation, scheduler=scheduler, precision=precision
        )
        return _train(model, loader, config=config, device=device, stepper=stepper, show=show)
    segmenter = auto_segmenter_of(model)
    if segmenter is not None:
        raise PrivacyConfigError(
            "privacy.sample-dp is not supported with an automatic segmenter (model.seg-model = "
            f"{segmenter.spec.kind!r}) yet: DP-SGD is wired for SAM-Med3D's adapter; use client-level DP"
        )
    check_poisson_loader(loader, privacy)
    if accumulation != 1:
        raise PrivacyConfigError(
            f"train.seg-grad-accumulation = {accumulation}: gradient accumulation is not supported "
            "under sample-level DP; set it to 1 and raise privacy.seg-batch-size instead"
        )
    with frozen_parameters(dp_frozen_parameters(model, config).values()):
        optimizer, scheduler, pull = _optimisation(model, config, proximal_ref)
        with private_training(model, optimizer, privacy, what="SAM-Med3D") as private:
            stepper = Stepper(
                private.optimizer,
                pull=pull,
                scheduler=scheduler,
                before_step=private.check_per_sample_gradients,
                precision=precision,
                split=lambda batch: physical_batches(privacy, batch),
            )
            result = _train(private.module, loader, config=config, device=device, stepper=stepper, show=show)
            return {**result, "privacy_history": private.history()}
