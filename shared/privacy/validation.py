"""Refuse privacy settings and models that would silently break differential privacy.

:func:`validate_privacy` is the one check of the ``[privacy]`` section (the ClientApp calls it with the site's
number of training cases, the server without); :func:`check_no_running_stats` refuses models whose
normalisation mixes the samples of a batch. Two more refusals live where the objects are: non-Poisson
sampling under DP (:func:`shared.privacy.dp_sgd.check_poisson_loader`) and gradient accumulation under DP
(here, and again in the segmentation loop).
"""

from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from shared.config import ConfigError, FedabusConfig, PrivacyConfig

__all__ = [
    "ACCOUNTANTS",
    "CLIENT_DP_MODES",
    "PrivacyConfigError",
    "check_no_running_stats",
    "resolve_delta",
    "validate_privacy",
]

#: Opacus accountants a ledger can compose exactly (``privacy.accountant``).
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
#: Values of ``privacy.client-dp`` (client-level DP on adapter updates; see shared/config.py).
CLIENT_DP_MODES: tuple[str, ...] = (
    "off",
    "server-fixed",
    "client-fixed",
    "server-adaptive",
    "client-adaptive",
)


class PrivacyConfigError(ConfigError):
    """A privacy setting (or a model under DP) would break differential privacy; the message names it."""


def resolve_delta(privacy: PrivacyConfig, n_train_cases: int) -> float:
    """δ of sample-level DP at a site with ``n_train_cases`` cases: ``privacy.delta``, or 1 / (10 n) when it is 0."""
    if n_train_cases < 1:
        raise PrivacyConfigError(f"sample-level DP needs at least one training case, got {n_train_cases}")
    return privacy.delta if privacy.delta > 0 else 1.0 / (10.0 * n_train_cases)


def _finite(value: float, key: str, *, minimum: float, inclusive: bool) -> None:
    ok = math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = ">=" if inclusive else ">"
        raise PrivacyConfigError(f"privacy.{key} = {value!r} must be finite and {bound} {minimum}")


def _check_client_dp(privacy: PrivacyConfig) -> None:
    mode = privacy.client_dp.strip().lower()
    if mode not in CLIENT_DP_MODES:
        raise PrivacyConfigError(
            f"privacy.client-dp = {privacy.client_dp!r} is unknown; choose one of {', '.join(CLIENT_DP_MODES)}"
        )
    if mode == "off":
        return
    _finite(privacy.client_noise_multiplier, "client-noise-multiplier", minimum=0.0, inclusive=True)
    _finite(privacy.client_clip_norm, "client-clip-norm", minimum=0.0, inclusive=False)
    if not 0.0 < privacy.client_delta < 1.0:
        raise PrivacyConfigError(f"privacy.client-delta = {privacy.client_delta!r} must lie in (0, 1)")


def _check_noise(privacy: PrivacyConfig) -> None:
    if privacy.accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(
            f"privacy.accountant = {privacy.accountant!r} is unknown; choose one of {', '.join(ACCOUNTANTS)}"
        )
    _finite(privacy.max_grad_norm, "max-grad-norm", minimum=0.0, inclusive=False)
    _finite(privacy.target_epsilon, "target-epsilon", minimum=0.0, inclusive=True)
    _finite(privacy.epsilon_budget, "epsilon-budget", minimum=0.0, inclusive=True)
    if privacy.target_epsilon == 0:
        if not (math.isfinite(privacy.noise_multiplier) and privacy.noise_multiplier > 0):
            raise PrivacyConfigError(
                f"privacy.noise-multiplier = {privacy.noise_multiplier!r} must be finite and > 0 when "
                "privacy.target-epsilon is 0 (without noise DP-SGD gives no privacy); or set target-epsilon"
            )


def _check_delta(privacy: PrivacyConfig, n_train_cases: int | None) -> None:
    if not (math.isfinite(privacy.delta) and 0.0 <= privacy.delta < 1.0):
        raise PrivacyConfigError(f"privacy.delta = {privacy.delta!r} must lie in [0, 1) (0: 1 / (10 n))")
    if n_train_cases is None:
        return
    if n_train_cases < 1:
        raise PrivacyConfigError(f"sample-level DP needs at least one training case, got {n_train_cases}")
    if privacy.delta >= 1.0 / n_train_cases:
        raise PrivacyConfigError(
            f"privacy.delta = {privacy.delta!r} is not below 1/n = {1.0 / n_train_cases:.3g} for this site's "
            f"{n_train_cases} training cases (such a δ allows publishing a whole case); choose a smaller δ or "
            "0 for 1 / (10 n)"
        )


def _check_training(config: FedabusConfig) -> None:
    train = config.train
    if train.seg_grad_accumulation != 1:
        raise PrivacyConfigError(
            f"train.seg-grad-accumulation = {train.seg_grad_accumulation}: gradient accumulation is not "
            "supported with privacy.sample-dp (each Poisson batch is one DP-SGD step); set it to 1 and raise "
            "privacy.seg-batch-size instead (larger Poisson batches, trained in physical batches of "
            "train.seg-batch-size)"
        )
    for key, value in (("seg-batch-size", train.seg_batch_size), ("cls-batch-size", train.cls_batch_size)):
        if value < 1:
            raise PrivacyConfigError(f"train.{key} = {value} must be >= 1 (the expected Poisson batch size)")
    if config.privacy.seg_batch_size < 0:
        raise PrivacyConfigError(
            f"privacy.seg-batch-size = {config.privacy.seg_batch_size} must be >= 0 (0: train.seg-batch-size)"
        )
    for key, value in (("seg-epochs", train.seg_epochs), ("cls-epochs", train.cls_epochs)):
        if value < 0:
            raise PrivacyConfigError(f"train.{key} = {value} must be >= 0")


def validate_privacy(config: FedabusConfig, n_train_cases: int | None = None) -> None:
    """Raise :class:`PrivacyConfigError` (naming the setting) for privacy settings that would break DP.

    Always: ``privacy.client-dp`` must be a known mode (and its numbers valid when on). With
    ``privacy.sample-dp``: a known accountant; ``max-grad-norm`` > 0; ``noise-multiplier`` > 0 unless
    ``target-epsilon`` > 0; non-negative ε settings; 0 <= ``delta`` < 1 and, when ``n_train_cases`` is given,
    ``delta`` < 1/n; ``train.seg-grad-accumulation`` = 1; batch sizes >= 1. The server, which does not know the
    sites' case counts, passes ``n_train_cases=None``.
    """
    privacy = config.privacy
    _check_client_dp(privacy)
    if not privacy.sample_dp:
        return
    _check_noise(privacy)
    _check_delta(privacy, n_train_cases)
    _check_training(config)


def _has_running_stats(module: nn.Module) -> bool:
    if isinstance(module, _BatchNorm):
        return True
    if isinstance(module, _NormBase) and module.track_running_stats:
        return True
    return any(name.startswith("running_") for name, _ in module.named_buffers(recurse=False))


def check_no_running_stats(model: nn.Module, *, what: str = "model") -> None:
    """Refuse BatchNorm and any module with running statistics anywhere in ``model``.

    The training loops keep the whole model in train mode, where such a module normalises with the statistics
    of the batch (so one case's output depends on the others and per-sample gradients are no longer
    per-sample) and updates running statistics from patient data without noise. Opacus only checks modules
    with trainable parameters; this checks all of them. Raises :class:`PrivacyConfigError` naming the modules.
    """
    offenders = [name or "<root>" for name, module in model.named_modules() if _has_running_stats(module)]
    if offenders:
        more = f" (+{len(offenders) - 3} more)" if len(offenders) > 3 else ""
        raise PrivacyConfigError(
            f"{what}: {', '.join(offenders[:3])}{more} normalise with batch or running statistics, which breaks "
            "sample-level DP; use GroupNorm/LayerNorm (the classifier's model.cls-norm-groups) instead"
        )
