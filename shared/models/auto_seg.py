"""The fully automatic segmenters (no click), trained and federated as whole networks.

* ``segresnet`` (3D, seed 000's comparator): seed 000 compares its click-prompted SAM-Med3D with a fully
  automatic 3D ResNet (Dice 0.44 on its ABUS data). fedabus's comparator is MONAI's ``SegResNet`` (Myronenko
  2018) because it is that kind of network — a residual 3D encoder-decoder — written and maintained by MONAI,
  small (about 1.2 M parameters at ``init_filters = 8``, 4.5 MiB fp32, so the whole network travels every round
  like an adapter does), and normalised with GroupNorm only: no BatchNorm running statistics that FedAvg would
  have to average or that sample-level DP forbids.
* ``dynunet2d`` (2D, seed 001's deep-supervised UNet): MONAI's ``DynUNet(spatial_dims=2, deep_supervision=True)``,
  ``levels`` resolution levels (3 × 3 kernels, stride 2 below the first), filters ``init_filters`` doubled per
  level up to 16×, GroupNorm, ``levels - 2`` deep-supervision heads. Seed 001 pretrained its UNet on a large
  ultrasound corpus; that pretraining is out of reach here, so it starts from MONAI's initialisation.
* ``u2net-lite`` (2D, seed 004): :class:`~shared.models.u2net_lite.U2NetLite` with inner/outer channels
  ``(init_filters, 4 × init_filters)`` in every stage (16 gives the paper's U2NETP) and six side outputs.

:class:`AutoSegmenter` maps a crop ``(B, 1, D, H, W)`` (3D) or a frame ``(B, 1, H, W)`` (2D) of normalised
intensities to logits of the same shape (one lesion channel, sigmoid); every side must be divisible by
:attr:`AutoSegSpec.downsampling`. In ``train()`` a 2D network returns its deep-supervision outputs stacked on
axis 1, ``(B, K, 1, H, W)`` with the main output first (:func:`shared.training.seg_auto.auto_seg_loss` sums a
loss over them). All parameters train; the adapter of an automatic segmenter is every one of them under
``seg.net.`` (:mod:`shared.adapters`). The starting weights come from MONAI's own initialisation under
``torch.manual_seed`` of the run's ``train.seed`` (the server's starting adapter, a study's fresh model), exactly
as LoRA's are; they are not stored in the base. :class:`AutoSegSpec` is what the adapter manifest records for
the model, so a receiver built for SAM-Med3D (or for another automatic segmenter) refuses the adapter, naming
the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shared.config import AUTO_SEG_MODELS, SLICE_SEG_MODELS

__all__ = [
    "AUTO_SEGMENTERS",
    "AutoSegSpec",
    "AutoSegmenter",
    "DEFAULT_INIT_FILTERS",
    "SUPERVISION_WEIGHTS",
    "auto_segmenter_of",
    "build_auto_segmenter",
    "is_auto_segmenter",
    "parse_blocks",
]

#: Values of ``model.seg-model`` that are fully automatic (the other, ``sam-med3d``, is click-prompted).
AUTO_SEGMENTERS: tuple[str, ...] = AUTO_SEG_MODELS
#: GroupNorm groups (MONAI's SegResNet default, 8), lowered to divide ``init_filters`` when it is small.
_NORM_GROUPS = 8
#: ``init_filters`` when the config gives 0: MONAI's SegResNet, nnU-Net's 2D UNet, seed 004's U2NETP.
DEFAULT_INIT_FILTERS = {"segresnet": 8, "dynunet2d": 32, "u2net-lite": 16}
#: How the deep-supervision losses are weighted (MONAI ``DeepSupervisionLoss``'s ``weight_mode``): nnU-Net's
#: halving per level for DynUNet, U^2-Net's equal-weight sum for U2NET-Lite.
SUPERVISION_WEIGHTS = {"dynunet2d": "exp", "u2net-lite": "same"}


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

    ``kind`` is the ``model.seg-model`` value, ``init_filters`` the channels of the first level (0: the kind's
    :data:`DEFAULT_INIT_FILTERS`; module docstring for what they mean per kind), ``blocks_down`` SegResNet's
    residual blocks per encoder level (one decoder block per level below the top), ``levels`` DynUNet's
    resolution levels. ``trainable`` names the submodule trained fully (the whole network); no PEFT adapter is
    attached.
    """

    kind: str = "segresnet"
    init_filters: int = 0
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    levels: int = 5
    trainable: tuple[str, ...] = ("net",)
    method: str = "full"

    def __post_init__(self) -> None:
        if self.kind not in AUTO_SEGMENTERS:
            raise ValueError(f"automatic segmenter {self.kind!r}; allowed: {', '.join(AUTO_SEGMENTERS)}")
        if self.init_filters < 0:
            raise ValueError(f"model.auto-init-filters = {self.init_filters} must be >= 1 (0: the default)")
        if self.init_filters == 0:
            object.__setattr__(self, "init_filters", DEFAULT_INIT_FILTERS[self.kind])
        parse_blocks(",".join(str(b) for b in self.blocks_down))
        if self.levels < 3:
            raise ValueError(f"model.dynunet-levels = {self.levels} must be >= 3")

    @property
    def spatial_dims(self) -> int:
        """3 for SegResNet (crops of the volume), 2 for the slice segmenters (sweep slices)."""
        return 2 if self.kind in SLICE_SEG_MODELS else 3

    @property
    def downsampling(self) -> int:
        """The factor every input side must be divisible by: ``2 ** (levels - 1)`` (1 for U2NET-Lite)."""
        if self.kind == "segresnet":
            return 2 ** (len(self.blocks_down) - 1)
        return 2 ** (self.levels - 1) if self.kind == "dynunet2d" else 1

    @property
    def norm_groups(self) -> int:
        """GroupNorm groups: MONAI's 8, or the largest divisor of 8 that divides ``init_filters``."""
        return math.gcd(_NORM_GROUPS, self.init_filters)

    def describe(self) -> dict[str, Any]:
        """The manifest entry (JSON types); compared key by key with the receiver's own (``apply_adapter``).
        Only the settings of this kind are recorded (``blocks_down`` for SegResNet, ``levels`` for DynUNet)."""
        shape: dict[str, Any] = {
            "segresnet": {"blocks_down": list(self.blocks_down)},
            "dynunet2d": {"levels": self.levels},
        }.get(self.kind, {})
        return {
            "method": self.method,
            "segmenter": self.kind,
            "init_filters": self.init_filters,
            **shape,
            "norm_groups": self.norm_groups,
            "trainable": list(self.trainable),
            "options": {},
        }


def _segresnet(spec: AutoSegSpec) -> nn.Module:
    from monai.networks.nets import SegResNet  # imported here: importing MONAI takes seconds

    return SegResNet(
        spatial_dims=3,
        init_filters=spec.init_filters,
        in_channels=1,
        out_channels=1,
        norm=("GROUP", {"num_groups": spec.norm_groups}),
        blocks_down=spec.blocks_down,
        blocks_up=(1,) * (len(spec.blocks_down) - 1),
    )


def _dynunet2d(spec: AutoSegSpec) -> nn.Module:
    from monai.networks.nets import DynUNet

    strides = [1] + [2] * (spec.levels - 1)
    return DynUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        kernel_size=[3] * spec.levels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=[spec.init_filters * 2 ** min(level, 4) for level in range(spec.levels)],
        norm_name=("GROUP", {"num_groups": spec.norm_groups}),
        deep_supervision=True,
        deep_supr_num=spec.levels - 2,
    )


def _u2net_lite(spec: AutoSegSpec) -> nn.Module:
    from shared.models.u2net_lite import build_u2net_lite

    return build_u2net_lite(width=(spec.init_filters, 4 * spec.init_filters), norm_groups=spec.norm_groups)


#: ``model.seg-model`` -> the builder of its network (``net``).
_NETWORKS = {"segresnet": _segresnet, "dynunet2d": _dynunet2d, "u2net-lite": _u2net_lite}


class AutoSegmenter(nn.Module):
    """A fully automatic lesion segmenter: ``net`` is the network of ``spec.kind`` with one output channel.

    ``forward(images)``: ``(B, 1, D, H, W)`` (3D) or ``(B, 1, H, W)`` (2D) float -> logits of the same shape
    (sigmoid gives the lesion probability), or in ``train()`` for a 2D network its deep-supervision outputs
    ``(B, K, 1, H, W)``, main output first; every side must be divisible by :attr:`AutoSegSpec.downsampling`.
    """

    def __init__(self, spec: AutoSegSpec) -> None:
        super().__init__()
        self.spec = spec
        self.net = _NETWORKS[spec.kind](spec)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        factor, dims = self.spec.downsampling, self.spec.spatial_dims
        if images.ndim != dims + 2 or images.shape[1] != 1 or any(s % factor for s in images.shape[2:]):
            layout = "(B, 1, D, H, W) with D, H, W" if dims == 3 else "(B, 1, H, W) with H, W"
            raise ValueError(
                f"the automatic segmenter {self.spec.kind!r} takes {layout} divisible by {factor}, "
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
