"""U2NET-Lite: the reference U2NETP size, documented shapes (odd sizes too), deep-supervision outputs, and a few
training steps that lower the loss on synthetic blobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from shared.models.u2net_lite import RSU, U2NetLite, U2NetWidths, build_u2net_lite

TINY = U2NetWidths.uniform(4, 8)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lite_and_full_match_the_reference_sizes() -> None:
    # U2NETP (seed 004's 4.7 MB "U2NET-Lite") has 1.13 M parameters, U2NET 44.0 M (3-channel input).
    assert 1.125e6 < _count(U2NetLite(3, 1, width="lite")) < 1.135e6
    assert 43.9e6 < _count(U2NetLite(3, 1, width="full")) < 44.1e6
    assert not any(isinstance(m, nn.BatchNorm2d) for m in U2NetLite(width=TINY).modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in U2NetLite(width=TINY, norm_groups=None).modules())


@pytest.mark.parametrize("shape", [(17, 23), (32, 32), (9, 40), (1, 1)])
def test_shapes_in_eval_and_training(shape: tuple[int, int]) -> None:
    model = build_u2net_lite(1, 2, width=(4, 8))
    x = torch.randn(2, 1, *shape)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 2, *shape)
    model.train()
    assert model(x).shape == (2, 7, 2, *shape)
    model.deep_supervision = False
    assert model(x[:1]).shape == (1, 2, *shape)  # one sample: every GroupNorm group still has > 1 value


@pytest.mark.parametrize("dilated", [False, True])
def test_rsu_keeps_the_spatial_size(dilated: bool) -> None:
    block = RSU(7 if not dilated else 4, 3, 4, 8, dilated=dilated)
    assert block(torch.randn(1, 3, 21, 14)).shape == (1, 8, 21, 14)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_group_norm_model_is_dp_ready_with_per_sample_gradients() -> None:
    model = U2NetLite(1, 1, width=TINY, deep_supervision=False)
    assert ModuleValidator.validate(model, strict=False) == []
    assert ModuleValidator.validate(U2NetLite(width=TINY, norm_groups=None), strict=False) != []
    grad_model = GradSampleModule(model, loss_reduction="sum")
    x = torch.randn(3, 1, 12, 10)
    grad_model(x).square().sum().backward()
    for p in model.parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 3
        torch.testing.assert_close(p.grad_sample.sum(dim=0), p.grad, rtol=1e-4, atol=1e-5)


def test_bad_widths_are_refused() -> None:
    with pytest.raises(ValueError, match="width='huge'"):
        U2NetLite(width="huge")
    with pytest.raises(ValueError, match="6 encoder and 5 decoder"):
        U2NetWidths(encoder=((4, 8),) * 5, decoder=((4, 8),) * 5)


def _blobs(count: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark discs on speckled bright background: images (B, 1, S, S), masks (B, 1, S, S)."""
    rows, cols = np.mgrid[0:size, 0:size]
    images, masks = [], []
    for _ in range(count):
        centre, radius = rng.uniform(size * 0.3, size * 0.7, 2), rng.uniform(size * 0.12, size * 0.25)
        mask = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
        image = np.where(mask, 0.2, 1.0) * rng.rayleigh(1.0, (size, size))
        images.append(image)
        masks.append(mask)
    as_tensor = lambda a: torch.tensor(np.stack(a)[:, None], dtype=torch.float32)  # noqa: E731
    return as_tensor(images), as_tensor(masks)


def test_a_few_training_steps_lower_the_deep_supervision_loss() -> None:
    torch.manual_seed(0)
    images, masks = _blobs(4, 24, np.random.default_rng(0))
    model = U2NetLite(1, 1, width=TINY)
    loss_fn = DeepSupervisionLoss(DiceCELoss(sigmoid=True), weight_mode="same")
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(25):
        optimiser.zero_grad()
        loss = loss_fn(list(model(images).unbind(dim=1)), masks)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    model.eval()
    with torch.no_grad():
        predicted = torch.sigmoid(model(images)) > 0.5
    dice = 2 * (predicted & masks.bool()).sum() / (predicted.sum() + masks.sum())
    assert dice > 0.5, float(dice)
