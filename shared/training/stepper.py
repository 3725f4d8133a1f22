"""The optimiser stepper shared by the segmentation and classification training loops (plain torch).

A :class:`Stepper` owns what both loops do around their loss: it zeroes the gradients before a window of
``accumulation`` batches, back-propagates each batch's loss divided by ``accumulation``, applies one step per
full window (and one for a partial window at the end of an epoch) with the FedProx gradient added
(:func:`shared.privacy.steps.optimizer_step`: after clipping and noising under Opacus), turns an empty batch
into a noise-only step under DP or skips it otherwise, steps the learning-rate schedule once per epoch, and
counts steps, samples and losses. It also owns mixed precision (:class:`shared.precision.Precision`): each
batch's forward and loss run under autocast, the loss is cast to float32, backward runs outside autocast, and
under ``fp16`` a GradScaler scales the loss and skips steps whose gradients overflowed. One
:meth:`Stepper.epoch` returns a frozen :class:`EpochResult`; the loops collect them into a :class:`TrainResult`
and report from it. What differs between the loops stays with them: how a batch is unpacked, the loss, the
optimiser and its schedule, the DP set-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from shared.config import check_precision
from shared.precision import FP32, Precision
from shared.privacy.steps import ProximalPull, is_dp_optimizer, noise_only_step, optimizer_step

__all__ = ["EpochResult", "Stepper", "TrainResult", "progress_bar"]

Batch = TypeVar("Batch")


@dataclass(frozen=True)
class EpochResult:
    """One pass over a loader.

    ``batch_losses`` holds each trained batch's mean loss and ``batch_sizes`` its samples, in order;
    ``step_losses`` the mean batch loss of each optimiser step that followed a backward pass (noise-only
    steps have none); ``steps`` counts every optimiser step, noise-only ones included.
    """

    batch_losses: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    step_losses: tuple[float, ...]
    steps: int
    noise_only_steps: int
    skipped_empty_batches: int

    @property
    def examples(self) -> int:
        """Samples trained on."""
        return sum(self.batch_sizes)

    @property
    def mean_batch_loss(self) -> float:
        """Mean of the batch losses (each batch weighs the same); NaN when no batch was trained."""
        return float(np.mean(self.batch_losses)) if self.batch_losses else math.nan

    @property
    def mean_sample_loss(self) -> float:
        """Mean loss per sample (batches weighted by their size); NaN when no batch was trained."""
        total = 0.0
        for loss, size in zip(self.batch_losses, self.batch_sizes, strict=True):
            total = total + loss * size
        return total / self.examples if self.batch_sizes else math.nan


@dataclass(frozen=True)
class TrainResult:
    """The epochs of one training call and the learning rate at its end."""

    epochs: tuple[EpochResult, ...]
    lr: float

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.epochs)

    @property
    def noise_only_steps(self) -> int:
        return sum(e.noise_only_steps for e in self.epochs)

    @property
    def skipped_empty_batches(self) -> int:
        return sum(e.skipped_empty_batches for e in self.epochs)

    @property
    def examples(self) -> int:
        """Samples trained on over all epochs."""
        return sum(e.examples for e in self.epochs)

    @property
    def step_losses(self) -> list[float]:
        """Mean loss of every optimiser step, over all epochs."""
        return [loss for e in self.epochs for loss in e.step_losses]


def progress_bar(iterable: Iterable[Any], *, enabled: bool, description: str, unit: str = "it") -> Any:
    """A tqdm bar over ``iterable`` that clears itself when done; a plain pass-through when not ``enabled``."""
    return tqdm(iterable, desc=description, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


class Stepper:
    """Steps ``optimizer`` (plain, or Opacus' DPOptimizer around it) over the batches of each epoch.

    Args:
        optimizer: over the trainable parameters; a DPOptimizer turns empty batches into noise-only steps.
        pull: the FedProx pull (:func:`shared.privacy.steps.proximal_pull`), or None.
        accumulation: batches per optimiser step (>= 1; the caller refuses it under DP).
        scheduler: stepped once at the end of every epoch, or None.
        before_step: called before every step that follows a backward pass (e.g. a check that every
            parameter got a per-sample gradient).
        precision: autocast around each ``loss(batch)`` and, for ``fp16``, gradient scaling (fp32: neither);
            only ``fp32`` with a DPOptimizer (ConfigError otherwise, see :func:`shared.config.check_precision`).
        split: DP only: a batch -> its physical batches (e.g. of at most ``train.seg-batch-size`` samples), for a
            Poisson batch larger than memory allows. Every physical batch but the last is back-propagated, then
            clipped and summed into the batch's gradient by a skipped step (Opacus' virtual step,
            ``signal_skip_step``); the last one's step adds the noise once and divides by the expected batch
            size, so the update and the accounting are those of the whole Poisson batch.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        pull: ProximalPull | None = None,
        accumulation: int = 1,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        before_step: Callable[[], None] | None = None,
        precision: Precision = FP32,
        split: Callable[[Any], Sequence[Any]] | None = None,
    ) -> None:
        if accumulation < 1:
            raise ValueError(f"gradient accumulation {accumulation} must be >= 1")
        self.optimizer, self.pull, self.accumulation = optimizer, pull, accumulation
        self.scheduler, self.before_step = scheduler, before_step
        self.dp = is_dp_optimizer(optimizer)
        if split is not None and not self.dp:
            raise ValueError("physical batches (split) are for DP-SGD; without DP use gradient accumulation")
        self.split = split
        check_precision(precision.name, device=precision.device_type, sample_dp=self.dp)
        self.precision, self.scaler = precision, precision.grad_scaler()

    @property
    def lr(self) -> float:
        """The current learning rate (of the first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _step(self) -> None:
        if self.before_step is not None:
            self.before_step()
        optimizer_step(self.optimizer, self.pull, scaler=self.scaler)
        self.optimizer.zero_grad(set_to_none=True)

    def _backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _forward_backward(
        self, batch: Batch, loss: Callable[[Batch], tuple[torch.Tensor, int]]
    ) -> tuple[float, int]:
        """Back-propagate ``batch`` (split into physical batches when ``split`` is set: every one but the last is
        clipped and summed by a skipped DP step); returns its mean loss per sample and its sample count."""
        parts = list(self.split(batch)) if self.split is not None else [batch]
        done: list[tuple[float, int]] = []
        for index, part in enumerate(parts):
            with self.precision.autocast():
                value, size = loss(part)
            value = value.float()
            self._backward(value / self.accumulation)
            done.append((float(value.detach()), size))
            if index + 1 < len(parts):
                self.optimizer.signal_skip_step(do_skip=True)
                self._step()
        if len(done) == 1:
            return done[0]
        count = sum(size for _, size in done)
        return sum(value * size for value, size in done) / count, count

    def epoch(
        self,
        batches: Iterable[Batch | None],
        loss: Callable[[Batch], tuple[torch.Tensor, int]],
        *,
        after_batch: Callable[[float], None] | None = None,
    ) -> EpochResult:
        """One pass: ``loss(batch)`` gives a batch's scalar mean loss (graph attached) and its sample count;
        it runs under the precision's autocast.

        ``batches`` yields unpacked batches, None for an empty one (Poisson sampling can draw none).
        ``after_batch(loss)`` is called with each trained batch's loss, e.g. to update a progress bar.
        """
        losses: list[float] = []
        sizes: list[int] = []
        step_losses: list[float] = []
        window: list[float] = []
        steps = noise_only = skipped = 0
        for batch in batches:
            if batch is None:
                if self.dp:
                    noise_only_step(self.optimizer, self.pull)
                    self.optimizer.zero_grad(set_to_none=True)
                    steps, noise_only = steps + 1, noise_only + 1
                else:
                    skipped += 1
                continue
            if not window:  # the caller's stale gradients never reach the first step
                self.optimizer.zero_grad(set_to_none=True)
            value, size = self._forward_backward(batch, loss)
            losses.append(value)
            sizes.append(size)
            window.append(losses[-1])
            if len(window) == self.accumulation:
                self._step()
                step_losses.append(float(np.mean(window)))
                steps, window = steps + 1, []
            if after_batch is not None:
                after_batch(losses[-1])
        if window:  # a partial accumulation at the end of the epoch is applied as is
            self._step()
            step_losses.append(float(np.mean(window)))
            steps += 1
        if self.scheduler is not None:
            self.scheduler.step()
        return EpochResult(tuple(losses), tuple(sizes), tuple(step_losses), steps, noise_only, skipped)
