"""What may leave a site, enforced: adapter tensors of the agreed names and shapes, and aggregate metrics.

Every outgoing reply of the ClientApp passes through :func:`outgoing_adapter` and :func:`outgoing_metrics`.
Anything else — an extra tensor, a tensor of another shape or dtype, a non-finite value, a metric that is not
a number or whose name is not on the allow-list (case ids, paths, free text) — raises :class:`EgressRefused`
and nothing is sent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from shared.adapters import AdapterMismatchError, check_names_and_shapes

__all__ = [
    "EVAL_METRIC_NAMES",
    "PRIVACY_METRIC_KEYS",
    "TRAIN_METRIC_KEYS",
    "EgressRefused",
    "eval_metric_keys",
    "outgoing_adapter",
    "outgoing_metrics",
    "train_metric_keys",
]

#: Training metrics a site reports (``num-examples`` is the number of training cases, FedAvg's weight).
TRAIN_METRIC_KEYS = ("num-examples", "train/seg_loss", "train/cls_loss")
#: Added under sample-level DP: cumulative ε per model at the site, δ and this round's noise multipliers.
PRIVACY_METRIC_KEYS = (
    "privacy/seg_epsilon",
    "privacy/cls_epsilon",
    "privacy/delta",
    "privacy/noise_multiplier_seg",
    "privacy/noise_multiplier_cls",
)
#: Evaluation metrics a site reports every evaluation round, under its split (``val/...`` each evaluation round,
#: ``test/...`` once for the chosen models): the same names at every site, NaN when undefined. Confidence
#: bounds are aggregates of the site's cases, like the values.
EVAL_METRIC_NAMES = (
    "dice_1click",
    "dice_1click_ci_low",
    "dice_1click_ci_high",
    "dice",
    "hd95_mm",
    "hd95_mm_ci_low",
    "hd95_mm_ci_high",
    "auc",
    "auc_ci_low",
    "auc_ci_high",
    "auc_gt_planes",
    "auc_gt_planes_ci_low",
    "auc_gt_planes_ci_high",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "accuracy",
    "f1",
)
_NAME = re.compile(r"^(num-examples|(train|val|test|privacy)/[a-z0-9_.]+)$")


class EgressRefused(RuntimeError):
    """A reply would carry something that must not leave the site; nothing is sent."""


def train_metric_keys(sample_dp: bool) -> tuple[str, ...]:
    """The training keys every site sends (the privacy keys too when sample-level DP is on)."""
    return TRAIN_METRIC_KEYS + (PRIVACY_METRIC_KEYS if sample_dp else ())


def eval_metric_keys(eval_clicks: int, split: str = "test") -> tuple[str, ...]:
    """The evaluation keys of ``split`` including Dice after the configured number of click rounds."""
    names = list(EVAL_METRIC_NAMES)
    names.insert(3, f"dice_{eval_clicks}click")
    return ("num-examples", *(f"{split}/{name}" for name in dict.fromkeys(names)))


def outgoing_adapter(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Check adapter tensors against the names and shapes the server sent; return them as float32 CPU tensors."""
    try:
        check_names_and_shapes(tensors, expected, what="outgoing update")
    except AdapterMismatchError as exc:
        raise EgressRefused(str(exc)) from None
    out = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise EgressRefused(f"outgoing update: {name} has dtype {tensor.dtype}, expected float32")
        value = tensor.detach().to("cpu", torch.float32)
        if not torch.isfinite(value).all():
            raise EgressRefused(f"outgoing update: {name} holds NaN or Inf; training diverged, nothing sent")
        out[name] = value
    return out


def outgoing_metrics(metrics: Mapping[str, object], allowed: tuple[str, ...]) -> dict[str, float]:
    """Exactly the ``allowed`` keys (missing ones as NaN, so every site sends the same keys), as floats.

    Other local metrics (per-stratum numbers, per-case details) stay at the site."""
    out: dict[str, float] = {}
    for key in allowed:
        if not _NAME.match(key):
            raise EgressRefused(f"metric name {key!r} is not an aggregate metric name")
        value = metrics.get(key, math.nan)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EgressRefused(f"metric {key!r} is not a number ({type(value).__name__}); nothing sent")
        out[key] = float(value)
    return out
