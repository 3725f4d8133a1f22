"""The 2D image classifier (seed 004's ResNeXt-50 32x4d) built on the tri-plane classifier's backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.models.cls_backbones import build_branch, map_torchvision_state
from shared.models.image_classifier import ImageClassifier2d, build_image_classifier


def test_resnext50_on_grey_frames_gives_benign_malignant_logits() -> None:
    model = build_image_classifier()
    assert model.architecture == "resnext50"
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 32]
    assert len(grouped) == 16  # one 32-group 3x3 convolution per bottleneck (3 + 4 + 6 + 3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_three_channels_and_three_classes() -> None:
    model = ImageClassifier2d("resnet", depth=18, in_channels=3, num_classes=3, norm_groups=8)
    assert model.backbone.conv1.in_channels == 3
    assert model(torch.randn(2, 3, 32, 40)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"expected input \(B, 3, H, W\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="in_channels = 2"):
        ImageClassifier2d(in_channels=2)


def test_an_rgb_stem_keeps_torchvision_rgb_weights() -> None:
    branch = build_branch("resnet18", 8, in_channels=3)
    state = {k: torch.randn_like(v) for k, v in branch.state_dict().items()}
    mapped, missing, unexpected, mismatched = map_torchvision_state(state, branch.state_dict(), {})
    assert not (missing or unexpected or mismatched)
    assert torch.equal(mapped["conv1.weight"], state["conv1.weight"])
