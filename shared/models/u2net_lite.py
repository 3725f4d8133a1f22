"""U2NET-Lite: the lightweight U^2-Net of seed 004 (Qin et al. 2020, "U2-Net: going deeper with nested
U-structure for salient object detection"), written the MONAI way for 2D lesion segmentation.

Architecture (as the reference ``U2NETP``, the 4.7 MB "small" model seed 004 calls U2NET-Lite):

* **RSU-L** (residual U-block, :class:`RSU`): an input convolution ``in -> out``, then a small U-Net of height L
  on ``mid`` channels (L - 1 encoder convolutions separated by 2 x 2 max-pools, a dilation-2 bottom, decoder
  convolutions on the concatenated skip, bilinear upsampling to the skip's size), ``mid -> out`` at the top, and
  the input convolution's output added back. **RSU-LF** (``dilated=True``) replaces pooling by dilations
  1, 2, 4, ... (for the coarsest stages, where the map is already small).
* **U^2-Net** (:class:`U2NetLite`): encoder stages RSU-7, 6, 5, 4, 4F, 4F separated by max-pools, decoder
  stages RSU-4F, 4, 5, 6, 7 on ``concat(upsampled deeper stage, encoder skip)``; a 3 x 3 side convolution on each
  decoder stage and on the bottom stage gives six side logits, each upsampled to the input size, and a 1 x 1
  convolution over their concatenation gives the fused logits.
* Widths (``width``): ``"lite"`` = 16 inner and 64 outer channels in every stage (``U2NETP``, about 1.13 M
  parameters); ``"full"`` = the 176 MB ``U2NET`` table; or any :class:`U2NetWidths` (tests use tiny ones).
* Every convolution is MONAI's ``Convolution`` (conv 3 x 3, norm, ReLU). Norm: ``GroupNorm`` with up to
  ``norm_groups`` groups (default; per-sample, so DP-SGD/Opacus can train it, as the other fedabus models) or,
  with ``norm_groups=None``, BatchNorm as in the paper. No operation is in place.

Shapes: input (B, in_channels, H, W), any H, W >= 1 (odd sizes work: pooling rounds up and every upsampling
goes to the skip's exact size). Output, in ``eval()`` or without ``deep_supervision``: fused logits
(B, out_channels, H, W). In ``train()`` with ``deep_supervision`` (the default, as MONAI's ``DynUNet``):
(B, 7, out_channels, H, W) = [fused, side 1 (finest decoder stage), ..., side 6 (bottom stage)]. U^2-Net's loss
is the equal-weight sum of a loss over all seven, e.g.
``monai.losses.DeepSupervisionLoss(DiceCELoss(sigmoid=True), weight_mode="same")(list(out.unbind(1)), mask)``
(seed 004 trains with Dice loss, SGD momentum 0.9, lr 1e-3, weight decay 5e-4, batch 8). Outputs are logits:
apply a sigmoid (one channel) or softmax yourself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.nn import functional

from shared.models.cls_backbones import group_count

__all__ = ["FULL_WIDTHS", "LITE_WIDTHS", "RSU", "U2NetLite", "U2NetWidths", "build_u2net_lite"]

#: Heights L of the encoder stages 1-6 and the decoder stages 5d-1d, and which of them are RSU-LF.
_ENCODER_HEIGHTS = (7, 6, 5, 4, 4, 4)
_ENCODER_DILATED = (False, False, False, False, True, True)
_DECODER_HEIGHTS = (4, 4, 5, 6, 7)
_DECODER_DILATED = (True, False, False, False, False)
#: Side outputs plus the fused one.
NUM_OUTPUTS = 7


@dataclass(frozen=True)
class U2NetWidths:
    """(mid, out) channels of the six encoder stages (1 .. 6, fine to coarse) and of the five decoder stages
    (5d .. 1d, coarse to fine); input widths follow from these (a decoder stage takes the deeper stage's output
    concatenated with its encoder skip)."""

    encoder: tuple[tuple[int, int], ...]
    decoder: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if len(self.encoder) != 6 or len(self.decoder) != 5:
            raise ValueError(
                f"U2NetWidths needs 6 encoder and 5 decoder (mid, out) pairs, got {len(self.encoder)} and "
                f"{len(self.decoder)}"
            )
        if any(c < 1 for pair in self.encoder + self.decoder for c in pair):
            raise ValueError(f"U2NetWidths: every channel count must be >= 1 ({self})")

    @classmethod
    def uniform(cls, mid: int, out: int) -> U2NetWidths:
        """The same (mid, out) in every stage (``lite`` is ``uniform(16, 64)``)."""
        return cls(encoder=((mid, out),) * 6, decoder=((mid, out),) * 5)


LITE_WIDTHS = U2NetWidths.uniform(16, 64)
FULL_WIDTHS = U2NetWidths(
    encoder=((32, 64), (32, 128), (64, 256), (128, 512), (256, 512), (256, 512)),
    decoder=((256, 512), (128, 256), (64, 128), (32, 64), (16, 64)),
)
_PRESETS = {"lite": LITE_WIDTHS, "full": FULL_WIDTHS}


def _conv(in_channels: int, out_channels: int, dilation: int, norm_groups: int | None) -> Convolution:
    """3 x 3 convolution (``dilation``, same padding), norm, ReLU: (B, in, H, W) -> (B, out, H, W).

    GroupNorm groups hold at least two channels, so that the 1 x 1 maps of the deepest levels of a small input
    still have more than one value per group (PyTorch refuses one in training)."""
    if norm_groups is None:
        norm: str | tuple = "batch"
    else:
        groups = group_count(out_channels, max(1, min(norm_groups, out_channels // 2)))
        norm = ("group", {"num_groups": groups})
    return Convolution(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=3,
        dilation=dilation,
        norm=norm,
        act="RELU",
    )


def _upsample_like(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to ``target``'s (H, W) (a no-op when they match)."""
    if x.shape[2:] == target.shape[2:]:
        return x
    return functional.interpolate(x, size=target.shape[2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """Residual U-block RSU-L, or RSU-LF with ``dilated`` (module docstring):
    (B, in_channels, H, W) -> (B, out_channels, H, W)."""

    def __init__(
        self,
        height: int,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        *,
        dilated: bool = False,
        norm_groups: int | None = 8,
    ) -> None:
        super().__init__()
        if height < 2:
            raise ValueError(f"RSU height {height} must be at least 2")
        self.dilated = dilated

        def dilation(level: int) -> int:  # level 1 .. height
            if dilated:
                return 2 ** (level - 1)
            return 2 if level == height else 1

        self.conv_in = _conv(in_channels, out_channels, 1, norm_groups)
        self.encoder = nn.ModuleList(
            [_conv(out_channels, mid_channels, dilation(1), norm_groups)]
            + [_conv(mid_channels, mid_channels, dilation(k), norm_groups) for k in range(2, height + 1)]
        )
        self.decoder = nn.ModuleList(
            _conv(2 * mid_channels, mid_channels if k > 1 else out_channels, dilation(k), norm_groups)
            for k in range(height - 1, 0, -1)
        )
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W)."""
        top = self.conv_in(x)
        skips = []
        hidden = top
        for level, conv in enumerate(self.encoder[:-1]):
            if level > 0 and not self.dilated:
                hidden = self.pool(hidden)
            hidden = conv(hidden)
            skips.append(hidden)
        hidden = self.encoder[-1](hidden)  # the bottom, on the last skip's grid
        for conv, skip in zip(self.decoder, reversed(skips), strict=True):
            hidden = conv(torch.cat([_upsample_like(hidden, skip), skip], dim=1))
        return hidden + top


class U2NetLite(nn.Module):
    """U^2-Net with side outputs fused by a 1 x 1 convolution (module docstring for shapes and outputs).

    Args:
        in_channels: image channels (1 for grey ultrasound).
        out_channels: logit channels (1: lesion vs background with a sigmoid).
        width: ``"lite"`` (default, seed 004), ``"full"`` or a :class:`U2NetWidths`.
        norm_groups: GroupNorm groups per convolution (the largest divisor of its channels up to this);
            None: BatchNorm.
        deep_supervision: in ``train()``, return all seven outputs stacked on axis 1.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        width: str | U2NetWidths = "lite",
        norm_groups: int | None = 8,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(width, str):
            if width not in _PRESETS:
                raise ValueError(
                    f"width={width!r} is not a U2NET-Lite width: choose one of {sorted(_PRESETS)}"
                )
            width = _PRESETS[width]
        self.widths = width
        self.deep_supervision = deep_supervision
        channels = in_channels
        self.encoder = nn.ModuleList()
        for height, dilated, (mid, out) in zip(
            _ENCODER_HEIGHTS, _ENCODER_DILATED, width.encoder, strict=True
        ):
            self.encoder.append(RSU(height, channels, mid, out, dilated=dilated, norm_groups=norm_groups))
            channels = out
        skips = [out for _, out in width.encoder[:-1]]  # encoder stages 1 .. 5
        self.decoder = nn.ModuleList()
        for height, dilated, (mid, out), skip in zip(
            _DECODER_HEIGHTS, _DECODER_DILATED, width.decoder, reversed(skips), strict=True
        ):
            self.decoder.append(
                RSU(height, channels + skip, mid, out, dilated=dilated, norm_groups=norm_groups)
            )
            channels = out
        # side inputs: decoder stages 1d .. 5d, then the bottom stage 6
        side_inputs = [out for _, out in reversed(width.decoder)] + [width.encoder[-1][1]]
        self.sides = nn.ModuleList(nn.Conv2d(c, out_channels, 3, padding=1) for c in side_inputs)
        self.fuse = nn.Conv2d(len(side_inputs) * out_channels, out_channels, 1)
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> fused logits (B, out_channels, H, W), or in training with deep supervision
        (B, 7, out_channels, H, W): [fused, side 1, ..., side 6]."""
        skips = []
        hidden = x
        for stage, block in enumerate(self.encoder):
            if stage > 0:
                hidden = self.pool(hidden)
            hidden = block(hidden)
            skips.append(hidden)
        bottom = skips.pop()
        decoded = [bottom]
        hidden = bottom
        for block, skip in zip(self.decoder, reversed(skips), strict=True):
            hidden = block(torch.cat([_upsample_like(hidden, skip), skip], dim=1))
            decoded.append(hidden)
        features = list(reversed(decoded))  # 1d (finest), 2d, ..., 5d, stage 6 (bottom)
        sides = [_upsample_like(side(f), x) for side, f in zip(self.sides, features, strict=True)]
        fused = self.fuse(torch.cat(sides, dim=1))
        if self.training and self.deep_supervision:
            return torch.stack([fused, *sides], dim=1)
        return fused


def build_u2net_lite(
    in_channels: int = 1,
    out_channels: int = 1,
    *,
    width: str | U2NetWidths | Sequence[int] = "lite",
    norm_groups: int | None = 8,
    deep_supervision: bool = True,
) -> U2NetLite:
    """A :class:`U2NetLite`; ``width`` may also be a (mid, out) pair for :meth:`U2NetWidths.uniform`."""
    if not isinstance(width, str | U2NetWidths):
        mid, out = width
        width = U2NetWidths.uniform(int(mid), int(out))
    return U2NetLite(
        in_channels, out_channels, width=width, norm_groups=norm_groups, deep_supervision=deep_supervision
    )
