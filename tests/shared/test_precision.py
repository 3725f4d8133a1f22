"""Mixed precision (shared/precision.py, ``train.precision``): the config checks, the Stepper's autocast and
fp16 gradient scaling, and bf16 autocast of both models on CPU against float32.

Tolerance of the bf16 forward passes (stated in docs/performance.md, "GPU path"): the relative L2 error of the
logits against float32, ``||bf16 - fp32|| / ||fp32||``, stays below 2e-2. bfloat16 keeps 8 significant bits
(relative rounding 2^-9 ≈ 2e-3 per op); a few dozen layers in a row land in the 1e-3 to 1e-2 range.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.adapters import LoraSpec, attach_lora
from shared.config import ConfigError, TrainConfig, load_config
from shared.models.sam_med3d import build_sam_med3d
from shared.models.triplane import build_triplane_classifier
from shared.precision import FP32, Precision
from shared.training.seg import decode_clicks, encode_images, snapshot_parameters, train_segmentation
from shared.training.stepper import Stepper

#: Largest relative L2 error of bf16-autocast logits against float32 (module docstring).
BF16_LOGITS_RTOL = 2e-2


def relative_l2(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact).norm() / exact.norm())


# ------------------------------------------------------------------------------------------------ config
def test_precision_defaults_to_fp32_and_rejects_unknown_values() -> None:
    assert load_config().train.precision == "fp32"
    assert Precision.on("bf16", "cpu").dtype is torch.bfloat16 and FP32.dtype is None
    with pytest.raises(ConfigError, match="train.precision = 'fp64'; allowed: fp32, bf16, fp16"):
        TrainConfig(precision="fp64")


def test_fp16_is_refused_on_cpu() -> None:
    with pytest.raises(ConfigError, match="'fp16' needs a CUDA device"):
        load_config({"train.precision": "fp16", "model.device": "cpu"})
    with pytest.raises(ConfigError, match="'fp16' needs a CUDA device"):
        Precision.on("fp16", "cpu")
    assert load_config({"train.precision": "fp16"}).train.precision == "fp16"  # model.device = auto


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_is_refused_under_sample_level_dp(precision: str) -> None:
    with pytest.raises(ConfigError, match="privacy.sample-dp = true: DP-SGD must clip per-sample"):
        load_config({"train.precision": precision, "privacy.sample-dp": True})


def test_the_stepper_refuses_autocast_with_a_dp_optimizer() -> None:
    """Opacus would run under autocast, but its per-sample gradients, their norms and the clipping would be
    bfloat16: a clipped gradient could exceed max-grad-norm, so the guarantee would not hold. Refused."""
    from opacus.optimizers import DPOptimizer

    model = nn.Linear(3, 1)
    dp = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=2,
    )
    with pytest.raises(ConfigError, match="DP-SGD must clip"):
        Stepper(dp, precision=Precision.on("bf16", "cpu"))
    assert Stepper(dp).precision == FP32


# ------------------------------------------------------------------------------------------------ stepper
class _ScaledFP32(Precision):
    """fp32 with a CPU GradScaler: the fp16 step logic, testable without CUDA."""

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", init_scale=2.0**10)


def _linear_steps(precision: Precision, inputs: torch.Tensor) -> tuple[torch.Tensor, Stepper]:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    stepper = Stepper(torch.optim.SGD(model.parameters(), lr=0.1), precision=precision)
    stepper.epoch([inputs], lambda x: (model(x).pow(2).mean(), len(x)))
    return torch.cat([model.weight.detach().ravel(), model.bias.detach()]), stepper


def test_gradient_scaling_unscales_before_the_step_and_skips_overflowing_steps() -> None:
    inputs = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    plain, _ = _linear_steps(FP32, inputs)
    scaled, stepper = _linear_steps(_ScaledFP32(), inputs)
    assert torch.equal(scaled, plain)  # a power-of-two scale is exact
    start, _ = _linear_steps(FP32, inputs[:0])  # the weights before any step
    overflow, stepper = _linear_steps(_ScaledFP32(), torch.full((8, 4), 1e30))
    assert torch.equal(overflow, start) and stepper.scaler.get_scale() < 2.0**10


# ------------------------------------------------------------------------------------ bf16 on both models
def test_bf16_autocast_forward_of_the_small_sam_preset_is_within_tolerance() -> None:
    torch.manual_seed(0)
    model = build_sam_med3d("small").eval()
    size = model.image_encoder.img_size
    image = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    coords = torch.tensor([[[size / 2, size / 2, size / 2]]])
    labels = torch.ones(1, 1, dtype=torch.int64)

    def logits(precision: Precision) -> torch.Tensor:
        with torch.no_grad(), precision.autocast():
            low_res, _ = decode_clicks(model, encode_images(model, image), coords, labels, None)
        return low_res

    exact, approx = logits(FP32), logits(Precision.on("bf16", "cpu"))
    assert 0 < relative_l2(approx, exact) < BF16_LOGITS_RTOL  # autocast ran, and within tolerance


def test_bf16_autocast_forward_of_the_classifier_is_within_tolerance() -> None:
    torch.manual_seed(0)
    model = build_triplane_classifier(depth=18, norm_groups=8).eval()
    frames = torch.randn(4, 3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(frames)
        with Precision.on("bf16", "cpu").autocast():
            approx = model(frames)
    assert 0 < relative_l2(approx, exact) < BF16_LOGITS_RTOL


def test_a_bf16_training_step_changes_only_the_adapter() -> None:
    from tests.shared.tiny_sam import TINY_SAM, P

    torch.manual_seed(0)
    model = attach_lora(build_sam_med3d(TINY_SAM), LoraSpec())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = snapshot_parameters(model)
    image = torch.randn(1, 1, P, P, P, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, P, P, P)
    mask[..., 12:20, 12:20, 12:20] = 1.0
    config = TrainConfig(seg_epochs=1, seg_click_iterations=1, precision="bf16", progress=False)
    result = train_segmentation(model, [(image, mask)], config=config, device="cpu")
    assert result["steps"] == 1 and all(torch.isfinite(torch.tensor(result["loss_history"])))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in frozen.items())
    assert all(p.dtype == torch.float32 for p in params.values())
    changed = [n for n, p in snapshot_parameters(model).items() if not torch.equal(p, adapter[n])]
    assert any("lora_B" in n for n in changed) and any(n.startswith("mask_decoder.") for n in changed)
