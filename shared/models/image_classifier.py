"""2D image classifier: seed 004's "DeepCardinal-50" (a ResNeXt-50 32x4d) on a whole BUSI image or ABUS slice.

The backbone is one branch of the tri-plane classifier's (:func:`shared.models.cls_backbones.build_branch`,
torchvision's ``resnext50_32x4d`` layout on MONAI's ``ResNet``, every BatchNorm a GroupNorm, no in-place ReLU,
so DP-SGD/Opacus can train it); any other backbone of ``model.cls-backbone`` works too (seed 004 compares
ResNet-34/50). A linear layer maps the pooled features (B, F) to logits (B, K):

* ``num_classes=2``: 0 benign, 1 malignant (as :mod:`shared.models.triplane`);
* ``num_classes=3``: seed 004's benign / malignant / normal task, index 2 normal
  (:data:`shared.data.busi.NORMAL_LABEL`).

Input (B, in_channels, H, W): ``in_channels`` 1 for grey frames (:mod:`shared.data.loaders2d`), 3 for RGB
or a grey frame repeated to three channels (the layout of torchvision ImageNet weights); H, W >= 32.
Module names: ``backbone.conv1``, ``backbone.layer1.0.conv2`` ... (torchvision's), ``head``.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.models.cls_backbones import branch_width, build_branch, resolve_backbone

__all__ = ["ImageClassifier2d", "build_image_classifier"]


class ImageClassifier2d(nn.Module):
    """Backbone branch, dropout, linear head: (B, in_channels, H, W) -> logits (B, num_classes).

    Args:
        backbone: ``resnext50`` (default, seed 004) or any ``model.cls-backbone`` name; ``depth`` picks the
            ``resnet`` depth.
        in_channels: 1 or 3 (module docstring).
        num_classes: 2 (benign/malignant) or 3 (with normal).
        norm_groups: GroupNorm groups replacing each BatchNorm.
        dropout: dropout probability before the head.
    """

    def __init__(
        self,
        backbone: str = "resnext50",
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        norm_groups: int = 32,
        depth: int = 50,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels = {in_channels}: a 2D frame has 1 (grey) or 3 (RGB) channels")
        if num_classes < 2:
            raise ValueError(f"num_classes = {num_classes} must be at least 2")
        self.architecture = resolve_backbone(backbone, depth)
        self.in_channels = in_channels
        self.backbone = build_branch(self.architecture, norm_groups, in_channels=in_channels)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(branch_width(self.architecture), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> logits (B, num_classes)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self.head(self.dropout(self.backbone(x)))


def build_image_classifier(
    backbone: str = "resnext50",
    *,
    in_channels: int = 1,
    num_classes: int = 2,
    norm_groups: int = 32,
    depth: int = 50,
) -> ImageClassifier2d:
    """An :class:`ImageClassifier2d` (seed 004's ResNeXt-50 32x4d by default)."""
    return ImageClassifier2d(
        backbone, in_channels=in_channels, num_classes=num_classes, norm_groups=norm_groups, depth=depth
    )
