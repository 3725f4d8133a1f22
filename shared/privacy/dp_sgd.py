"""Opacus DP-SGD around one model's local training: per-sample gradients, clipping, noise, accounting.

:func:`private_training` assembles what Opacus' ``PrivacyEngine.make_private`` assembles — a
``GradSampleModule`` (per-sample gradients, mean loss reduction, gradient accumulation forbidden), a
``DPOptimizer`` around the caller's optimiser (flat clipping at ``max_grad_norm``, Gaussian noise of std
σ × ``max_grad_norm``, division by the expected batch size) and an accountant (``rdp`` or ``prv``) counting every
step at the *planned* sample rate — from Opacus' public classes, because ``make_private`` derives the sample
rate as 1 / len(loader) and its loader's step count as int(1 / q), neither of which is the plan's
(:mod:`shared.privacy.sampling`). It checks the model first (no BatchNorm or running statistics anywhere) and
removes Opacus' hooks and attributes afterwards, so the model can be evaluated or wrapped again.

The noise uses Opacus' ``secure_mode`` sampling (robust to floating-point attacks) from a generator seeded by
the operating system's entropy; a fixed seed is for tests only.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shared.privacy.accounting import HistoryEntry
from shared.privacy.opacus_loader import load_opacus
from shared.privacy.sampling import secret_seed
from shared.privacy.validation import ACCOUNTANTS, PrivacyConfigError, check_no_running_stats

__all__ = [
    "DPSettings",
    "PrivateModel",
    "check_poisson_loader",
    "frozen_parameters",
    "physical_batches",
    "private_training",
]


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD of one model for one round (from :class:`shared.privacy.planning.ModelPlan`).

    ``noise_multiplier`` σ (noise std = σ × ``max_grad_norm``); ``max_grad_norm`` the per-sample L2 clipping
    norm; ``sample_rate`` q and ``steps_per_epoch`` of the Poisson loader; ``expected_batch_size`` q × n (the
    divisor of the summed clipped gradients); ``accountant`` ``rdp`` or ``prv``; ``seed`` of the noise generator
    (None: OS entropy, always in production); ``physical_batch_size``: the most samples one forward/backward
    pass takes (a larger Poisson batch is split and summed by Opacus' virtual steps, one noisy step per Poisson
    batch; 0: no limit).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_epoch: int
    expected_batch_size: int
    accountant: str = "rdp"
    seed: int | None = None
    physical_batch_size: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise PrivacyConfigError(
                f"DP-SGD noise multiplier {self.noise_multiplier!r} must be finite and > 0"
            )
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise PrivacyConfigError(f"privacy.max-grad-norm = {self.max_grad_norm!r} must be finite and > 0")
        if not 0.0 < self.sample_rate <= 1.0:
            raise PrivacyConfigError(f"DP-SGD sample rate {self.sample_rate!r} must lie in (0, 1]")
        if self.steps_per_epoch < 1 or self.expected_batch_size < 1:
            raise PrivacyConfigError(
                f"DP-SGD needs steps_per_epoch >= 1 and expected_batch_size >= 1, got {self.steps_per_epoch}, "
                f"{self.expected_batch_size}"
            )
        if self.physical_batch_size < 0:
            raise PrivacyConfigError(
                f"physical batch size {self.physical_batch_size} must be >= 0 (0: no limit)"
            )
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(
                f"privacy.accountant = {self.accountant!r} is unknown; choose one of {', '.join(ACCOUNTANTS)}"
            )


def physical_batches(settings: DPSettings, batch: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """``batch`` (tensors with the samples along dimension 0) as physical batches of at most
    ``settings.physical_batch_size`` samples, in order (one part when it fits or there is no limit)."""
    size = settings.physical_batch_size
    if size < 1 or len(batch[0]) <= size:
        return [tuple(batch)]
    return list(zip(*(tensor.split(size) for tensor in batch), strict=True))


@dataclass
class PrivateModel:
    """What :func:`private_training` yields: train ``module`` (Opacus ``GradSampleModule`` around the model)
    with ``optimizer`` (``DPOptimizer``); ``accountant`` counts the steps."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    accountant: Any
    names: dict[int, str]

    def history(self) -> list[HistoryEntry]:
        """The accountant's ``(noise_multiplier, sample_rate, steps)`` entries so far."""
        return [(float(s), float(q), int(n)) for s, q, n in self.accountant.history]

    def check_per_sample_gradients(self) -> None:
        """Raise RuntimeError naming the optimised parameters that got no per-sample gradient in the last
        backward pass (read outside their module's forward, e.g. an embedding's ``.weight``, or unused by the
        loss): DP-SGD cannot bound their sensitivity, so they must be frozen under DP."""
        missing = [
            self.names.get(id(p), "<unnamed>")
            for p in self.optimizer.params
            if getattr(p, "grad_sample", None) is None
        ]
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise RuntimeError(
                f"Opacus computed no per-sample gradient for {', '.join(missing[:5])}{more}: such parameters "
                "are read outside their module's forward or unused by the loss; freeze them under DP"
            )


def check_poisson_loader(loader: Any, settings: DPSettings) -> None:
    """Refuse a loader that does not draw Poisson batches at the plan's rate and step count.

    Accepts loaders from :func:`shared.privacy.sampling.poisson_loader` (and Opacus' ``DPDataLoader`` when its
    rate and length match). Raises :class:`PrivacyConfigError` otherwise: with shuffled fixed-size batches the
    accountant's subsampling analysis does not hold.
    """
    load_opacus()
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, UniformWithReplacementSampler):
        raise PrivacyConfigError(
            f"non-Poisson sampling under DP: the loader ({type(loader).__name__}) does not draw Poisson batches; "
            "build it with shared.privacy.sampling.poisson_loader"
        )
    if sampler.sample_rate != settings.sample_rate or len(sampler) != settings.steps_per_epoch:
        raise PrivacyConfigError(
            f"the Poisson loader draws {len(sampler)} batches at rate {sampler.sample_rate} per epoch, but the "
            f"privacy plan accounts {settings.steps_per_epoch} at rate {settings.sample_rate}"
        )


def _noise_generator(params: Iterable[nn.Parameter], seed: int | None) -> torch.Generator:
    device = next(iter(params)).device
    return torch.Generator(device=device).manual_seed(secret_seed() if seed is None else int(seed))


def _optimised_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The optimizer's parameters, after checking they are exactly the model's trainable ones (a frozen one
    would get no per-sample gradient; a trainable one outside the optimizer would be hooked for nothing)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if {id(p) for p in params} != trainable or len(params) != len(trainable):
        raise ValueError(
            f"the optimizer holds {len(params)} parameters but the model has {len(trainable)} trainable ones; "
            "build the optimizer over exactly the parameters that require grad"
        )
    return params


def _wrap(model: nn.Module) -> nn.Module:
    load_opacus()
    from opacus import GradSampleModule

    if isinstance(model, GradSampleModule):
        raise ValueError("the model is already wrapped by Opacus; pass the plain (PEFT) model")
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    module.forbid_grad_accumulation()
    return module


@contextlib.contextmanager
def private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: DPSettings,
    *,
    what: str = "model",
) -> Iterator[PrivateModel]:
    """Wrap ``model`` and ``optimizer`` (over the parameters to train, already frozen as needed) for DP-SGD.

    Inside the block, train the yielded ``module`` with the yielded ``optimizer``; every ``optimizer.step()``
    (or ``pre_step()``) clips, noises and is counted by ``accountant``. On exit Opacus' hooks and per-parameter
    attributes are removed from ``model``. Raises :class:`PrivacyConfigError` for a model with BatchNorm or
    running statistics (``what`` names it in the message).
    """
    load_opacus()
    from opacus.accountants import create_accountant
    from opacus.optimizers import DPOptimizer

    check_no_running_stats(model, what=what)
    params = _optimised_parameters(model, optimizer)
    module = _wrap(model)
    try:
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=settings.expected_batch_size,
            loss_reduction="mean",
            generator=_noise_generator(params, settings.seed),
            secure_mode=True,
        )
        accountant = create_accountant(mechanism=settings.accountant)
        dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=settings.sample_rate))
        names = {id(p): name for name, p in model.named_parameters()}
        with warnings.catch_warnings():
            # PyTorch notes that full backward hooks fire on modules whose inputs need no gradient (the frozen
            # base feeds the adapter): expected here, and harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield PrivateModel(module, dp_optimizer, accountant, names)
    finally:
        module.cleanup()
        for param in params:  # DPOptimizer's last summed clipped gradient
            if hasattr(param, "summed_grad"):
                del param.summed_grad


@contextlib.contextmanager
def frozen_parameters(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` off for ``params`` during the block and on again afterwards: they are not trained (and
    get no Opacus hooks when the model is wrapped inside the block), keep their value, and still count as
    trainable, i.e. adapter, parameters after it."""
    params = [p for p in params if p.requires_grad]
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in params:
            param.requires_grad_(True)
