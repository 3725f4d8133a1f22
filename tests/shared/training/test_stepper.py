"""The shared optimiser stepper (shared/training/stepper.py), and that both training loops step through it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from shared.adapters import LoraSpec, attach_lora
from shared.config import TrainConfig
from shared.models.sam_med3d import build_sam_med3d
from shared.models.triplane import build_triplane_classifier
from shared.privacy.steps import proximal_pull
from shared.training import stepper as stepper_module
from shared.training.cls import frame_triplet_dataset, train_classifier
from shared.training.seg import train_segmentation
from shared.training.stepper import EpochResult, Stepper, TrainResult
from tests.shared.tiny_sam import TINY_SAM, P


def _linear_problem(seed: int = 0) -> tuple[nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    data = [(torch.randn(n, 3), torch.randn(n, 1)) for n in (2, 4, 1)]
    return model, data


def _mse(model: nn.Module):
    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        x, y = batch
        return nn.functional.mse_loss(model(x), y), len(x)

    return loss


def test_accumulation_steps_per_window_and_once_for_a_partial_window() -> None:
    model, data = _linear_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = Stepper(optimizer, accumulation=2)
    result = stepper.epoch([data[0], None, data[1], data[2]], _mse(model))
    assert (result.steps, result.noise_only_steps, result.skipped_empty_batches) == (2, 0, 1)
    assert result.batch_sizes == (2, 4, 1) and result.examples == 7
    losses = result.batch_losses
    assert result.step_losses == (float(np.mean(losses[:2])), losses[2])
    assert result.mean_batch_loss == pytest.approx(sum(losses) / 3)
    assert result.mean_sample_loss == pytest.approx((2 * losses[0] + 4 * losses[1] + losses[2]) / 7)
    assert all(p.grad is None for p in model.parameters())  # no gradient held after a step


def test_one_accumulated_step_equals_plain_steps_by_hand() -> None:
    """One window of two batches: the mean of their gradients plus the FedProx pull, applied once."""
    model, data = _linear_problem(seed=1)
    reference = {n: p.detach() + 0.5 for n, p in model.named_parameters()}
    expected = nn.Linear(3, 1)
    expected.load_state_dict(model.state_dict())
    for p in model.parameters():  # a stale gradient from before the call must not leak into the step
        p.grad = torch.ones_like(p)
    pull = proximal_pull(dict(model.named_parameters()), reference, 0.3)
    Stepper(torch.optim.SGD(model.parameters(), lr=0.1), pull=pull, accumulation=2).epoch(
        data[:2], _mse(model)
    )
    grads = [torch.zeros_like(p) for p in expected.parameters()]
    for x, y in data[:2]:
        g = torch.autograd.grad(nn.functional.mse_loss(expected(x), y) / 2, list(expected.parameters()))
        grads = [a + b for a, b in zip(grads, g, strict=True)]
    with torch.no_grad():
        for (name, p), g in zip(expected.named_parameters(), grads, strict=True):
            p -= 0.1 * (g + 0.3 * (p - reference[name]))
    for a, b in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_the_schedule_steps_once_per_epoch_and_results_add_up() -> None:
    model, data = _linear_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1], gamma=0.5)
    stepper = Stepper(optimizer, scheduler=scheduler)
    seen: list[float] = []
    epochs = tuple(stepper.epoch(data, _mse(model), after_batch=seen.append) for _ in range(2))
    result = TrainResult(epochs, stepper.lr)
    assert result.lr == pytest.approx(0.05) and result.steps == 6 and result.examples == 14 and len(seen) == 6
    assert result.step_losses == [*epochs[0].batch_losses, *epochs[1].batch_losses]
    empty = EpochResult((), (), (), 0, 0, 2)
    assert math.isnan(empty.mean_batch_loss) and math.isnan(empty.mean_sample_loss)
    with pytest.raises(ValueError, match="accumulation"):
        Stepper(optimizer, accumulation=0)


def test_both_training_loops_step_through_the_stepper(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_epoch = Stepper.epoch

    def spy(self: Stepper, *args, **kwargs) -> EpochResult:
        result = real_epoch(self, *args, **kwargs)
        calls.append(result.steps)
        return result

    monkeypatch.setattr(stepper_module.Stepper, "epoch", spy)
    torch.manual_seed(0)
    sam = attach_lora(build_sam_med3d(TINY_SAM, attention_impl="fast"), LoraSpec())
    mask = torch.zeros(1, 1, P, P, P)
    mask[..., P // 2 - 2 : P // 2 + 2, P // 2 - 2 : P // 2 + 2, P // 2 - 2 : P // 2 + 2] = 1
    batch = {"image": torch.randn(1, 1, P, P, P), "mask": mask}
    config = TrainConfig(seg_epochs=1, cls_epochs=1, seg_click_iterations=1, progress=False)
    seg = train_segmentation(sam, [batch], config=config, device="cpu")
    assert calls == [1] and seg["steps"] == 1
    classifier = build_triplane_classifier(depth=18, planes=("coronal",), norm_groups=8)
    dataset = frame_triplet_dataset(np.random.default_rng(0).normal(size=(2, 3, 1, 32, 32)), [0, 1])
    config = TrainConfig(cls_epochs=1, cls_planes="coronal", progress=False)
    report = train_classifier(classifier, [dataset.tensors], config=config, device="cpu", progress=False)
    assert calls == [1, 1] and report["steps"] == 1 and report["samples_seen"] == 2
