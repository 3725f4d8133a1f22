"""Optimiser steps shared by the segmentation and classification training loops (plain torch, no Opacus import).

* **FedProx**: the gradient of the proximal term ``(mu / 2) * ||w - w_ref||²``, i.e. ``mu * (w - w_ref)``, is
  added to the parameters' gradients right before the update. With Opacus' ``DPOptimizer`` it is added *after*
  per-sample clipping and noising (``pre_step``): the term depends on no patient data, so it costs no privacy,
  whereas a proximal term inside the loss would be silently dropped from Opacus' per-sample gradients.
* **Noise-only steps**: Poisson sampling can draw an empty batch. Skipping it would leave the accountant one
  step short (and skipping reveals that the batch was empty), so under DP an empty batch becomes a step with
  zero-length per-sample gradients: Opacus clips nothing, adds the Gaussian noise, scales by the expected batch
  size, and its accountant hook counts the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ProximalPull", "is_dp_optimizer", "noise_only_step", "optimizer_step", "proximal_pull"]


@dataclass(frozen=True, eq=False)
class ProximalPull:
    """FedProx pairs (trainable parameter, its reference tensor on the same device and dtype) and ``mu``."""

    pairs: tuple[tuple[nn.Parameter, torch.Tensor], ...]
    mu: float

    def add_to_gradients(self) -> None:
        """``grad += mu * (w - w_ref)`` for every pair (a missing gradient becomes the pull alone)."""
        for param, reference in self.pairs:
            pull = self.mu * (param.detach() - reference)
            param.grad = pull if param.grad is None else param.grad + pull


def proximal_pull(
    params: Mapping[str, nn.Parameter],
    reference: Mapping[str, torch.Tensor],
    mu: float,
    *,
    hint: str = "",
) -> ProximalPull | None:
    """The FedProx pull of ``params`` towards ``reference`` (same names and shapes); None when ``mu`` is 0.

    Raises ValueError when ``mu`` < 0 or when a parameter has no reference of its shape (``hint`` is appended to
    that message, e.g. how to take a reference).
    """
    if mu < 0:
        raise ValueError(f"train.proximal-mu = {mu} must be >= 0")
    if mu == 0:
        return None
    pairs = []
    for name, param in params.items():
        ref = reference.get(name)
        if ref is None or tuple(ref.shape) != tuple(param.shape):
            found = tuple(ref.shape) if ref is not None else "missing"
            raise ValueError(
                f"proximal_ref does not fit trainable parameter {name!r} {tuple(param.shape)} (found: {found})"
                + (f"; {hint}" if hint else "")
            )
        pairs.append((param, ref.detach().to(device=param.device, dtype=param.dtype)))
    return ProximalPull(tuple(pairs), float(mu))


def is_dp_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """True for Opacus' DPOptimizer (duck-typed: no Opacus import needed)."""
    return hasattr(optimizer, "pre_step") and hasattr(optimizer, "original_optimizer")


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    pull: ProximalPull | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """One update from the current gradients, with the FedProx gradient added (after clipping and noising
    for a DPOptimizer, whose accountant hook counts the step inside ``pre_step``).

    With an fp16 ``scaler`` (never under DP) the gradients are unscaled first, so the pull is added to the true
    gradients, and the step is skipped when they overflowed (the scaler then lowers its scale).
    """
    if is_dp_optimizer(optimizer):
        if scaler is not None:
            raise ValueError("gradient scaling (train.precision = 'fp16') is not supported under DP-SGD")
        if optimizer.pre_step():
            if pull is not None:
                pull.add_to_gradients()
            optimizer.original_optimizer.step()
        return
    if scaler is not None:
        scaler.unscale_(optimizer)
    if pull is not None:
        pull.add_to_gradients()
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def noise_only_step(optimizer: torch.optim.Optimizer, pull: ProximalPull | None = None) -> None:
    """The DP-SGD step of an empty Poisson batch: zero-length per-sample gradients ``(0, *param.shape)``, so
    the update is Gaussian noise (plus the FedProx pull) and the accountant counts the step.

    Raises TypeError for an optimizer that is not Opacus' DPOptimizer (a non-private loop skips empty batches).
    """
    if not is_dp_optimizer(optimizer):
        raise TypeError(f"a noise-only step needs Opacus' DPOptimizer, got {type(optimizer).__name__}")
    optimizer.zero_grad(set_to_none=True)
    for param in optimizer.params:
        param.grad_sample = param.new_zeros((0, *param.shape))
    optimizer_step(optimizer, pull)
