"""The fully automatic 3D segmenter (no click): MONAI ``SegResNet``, trained and federated as a whole network.

Seed 000 compares its click-prompted SAM-Med3D with a fully automatic 3D ResNet (Dice 0.44 on its ABUS data).
fedabus's comparator is MONAI's ``SegResNet`` (Myronenko 2018) because it is that kind of network — a residual
3D encoder-decoder — written and maintained by MONAI, small (about 1.2 M parameters at ``init_filters = 8``,
4.5 MiB fp32, so the whole network travels every round like an adapter does), and normalised with GroupNorm
only: no BatchNorm running statistics that FedAvg would have to average or that sample-level DP forbids.
``UNet`` (BatchNorm/InstanceNorm by default, plain blocks) and ``DynUNet`` (nnU-Net's, deep supervision, far
larger by default) fit the ResNet comparison less directly.

:class:`AutoSegmenter` maps a crop ``(B, 1, D, H, W)`` of normalised intensities to logits ``(B, 1, D, H, W)``
(one lesion channel, sigmoid), for any D, H, W divisible by ``2 ** (len(blocks_down) - 1)``. All its
parameters train; the adapter of ``model.seg-model = segresnet`` is every one of them under ``seg.net.``
(:mod:`shared.adapters`). The starting weights come from MONAI's own initialisation under ``torch.manual_seed``
of the run's ``train.seed`` (the server's starting adapter, a study's fresh model), exactly as LoRA's are; they
are not stored in the base. :class:`AutoSegSpec` is what the adapter manifest records for the model, so a
receiver built for SAM-Med3D (or for another SegResNet) refuses the adapter, naming the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shared.config import AUTO_SEG_MODELS

__all__ = [
    "AUTO_SEGMENTERS",
    "AutoSegSpec",
    "AutoSegmenter",
    "auto_segmenter_of",
    "build_auto_segmenter",
    "is_auto_segmenter",
    "parse_blocks",
]

#: Values of ``model.seg-model`` that are fully automatic (the other, ``sam-med3d``, is click-prompted).
AUTO_SEGMENTERS: tuple[str, ...] = AUTO_SEG_MODELS
#: GroupNorm groups of the SegResNet (MONAI's default, 8), lowered to divide ``init_filters`` when it is small.
_NORM_GROUPS = 8


def parse_blocks(text: str, *, where: str = "model.auto-blocks-down") -> tuple[int, ...]:
    """``"1,2,2,4"`` -> ``(1, 2, 2, 4)``: residual blocks per encoder level (at least 1 level, each >= 1)."""
    try:
        values = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{where} = {text!r}: give comma-separated block counts >= 1, e.g. '1,2,2,4'")
    return values


@dataclass(frozen=True)
class AutoSegSpec:
    """How the automatic segmenter is built and trained: what the adapter manifest records for ``seg``.

    ``kind`` is the ``model.seg-model`` value, ``init_filters`` the channels of the first level (doubled per
    level), ``blocks_down`` the residual blocks per encoder level (one decoder block per level below the top).
    ``trainable`` names the submodule trained fully (the whole network); no PEFT adapter is attached.
    """

    kind: str = "segresnet"
    init_filters: int = 8
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    trainable: tuple[str, ...] = ("net",)
    method: str = "full"

    def __post_init__(self) -> None:
        if self.kind not in AUTO_SEGMENTERS:
            raise ValueError(f"automatic segmenter {self.kind!r}; allowed: {', '.join(AUTO_SEGMENTERS)}")
        if self.init_filters < 1:
            raise ValueError(f"model.auto-init-filters = {self.init_filters} must be >= 1")
        parse_blocks(",".join(str(b) for b in self.blocks_down))

    @property
    def downsampling(self) -> int:
        """The factor every input side must be divisible by: ``2 ** (levels - 1)``."""
        return 2 ** (len(self.blocks_down) - 1)

    @property
    def norm_groups(self) -> int:
        """GroupNorm groups: MONAI's 8, or the largest divisor of 8 that divides ``init_filters``."""
        return math.gcd(_NORM_GROUPS, self.init_filters)

    def describe(self) -> dict[str, Any]:
        """The manifest entry (JSON types); compared key by key with the receiver's own (``apply_adapter``)."""
        return {
            "method": self.method,
            "segmenter": self.kind,
            "init_filters": self.init_filters,
            "blocks_down": list(self.blocks_down),
            "norm_groups": self.norm_groups,
            "trainable": list(self.trainable),
            "options": {},
        }


class AutoSegmenter(nn.Module):
    """A fully automatic lesion segmenter: ``net`` is MONAI's ``SegResNet`` with one output channel.

    ``forward(images)``: ``(B, 1, D, H, W)`` float -> logits ``(B, 1, D, H, W)`` (sigmoid gives the lesion
    probability); D, H, W must be divisible by :attr:`AutoSegSpec.downsampling`.
    """

    def __init__(self, spec: AutoSegSpec) -> None:
        super().__init__()
        from monai.networks.nets import SegResNet  # imported here: importing MONAI takes seconds

        self.spec = spec
        self.net = SegResNet(
            spatial_dims=3,
            init_filters=spec.init_filters,
            in_channels=1,
            out_channels=1,
            norm=("GROUP", {"num_groups": spec.norm_groups}),
            blocks_down=spec.blocks_down,
            blocks_up=(1,) * (len(spec.blocks_down) - 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        factor = self.spec.downsampling
        if images.ndim != 5 or images.shape[1] != 1 or any(s % factor for s in images.shape[2:]):
            raise ValueError(
                f"the automatic segmenter takes (B, 1, D, H, W) with D, H, W divisible by {factor}, "
                f"got {tuple(images.shape)}"
            )
        return self.net(images)


def build_auto_segmenter(spec: AutoSegSpec, *, seed: int | None = None) -> AutoSegmenter:
    """A fresh :class:`AutoSegmenter` with every parameter trainable; ``seed`` seeds torch's generator first
    (None: draws from its current state, as LoRA's initialisation does after the caller's ``manual_seed``).
    ``fedabus_lora_spec`` carries ``spec`` for :func:`shared.adapters.extract_adapter`'s manifest."""
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoSegmenter(spec)
    model.requires_grad_(True)
    model.fedabus_lora_spec = spec
    return model


def auto_segmenter_of(model: nn.Module) -> AutoSegmenter | None:
    """The :class:`AutoSegmenter` inside ``model`` (itself, or under Opacus' ``_module``), else None."""
    inner = model
    for _ in range(3):
        if isinstance(inner, AutoSegmenter):
            return inner
        inner = getattr(inner, "_module", None)
        if not isinstance(inner, nn.Module):
            return None
    return None


def is_auto_segmenter(model: nn.Module) -> bool:
    """Whether ``model`` is (or wraps) the fully automatic segmenter rather than SAM-Med3D."""
    return auto_segmenter_of(model) is not None
