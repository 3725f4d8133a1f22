"""What may leave a site, enforced: adapter tensors of the agreed names and shapes, and aggregate metrics.

Every outgoing reply of the ClientApp passes through :func:`outgoing_adapter`, :func:`outgoing_metrics` and
:func:`outgoing_site_record` (the ``site`` record: the site's name, the round a train reply answers, why it
declined, and in the handshake its base fingerprint and fedabus version). Anything else — an extra tensor, a tensor of another shape or dtype, a non-finite value, a metric that is not
a number or whose name is not on the allow-list (case ids, paths, free text) — raises :class:`EgressRefused`
and nothing is sent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from shared.adapters import AdapterMismatchError, check_names_and_shapes
from shared.metric_names import (
    ACCURACY,
    AUC,
    AUC_CI_HIGH,
    AUC_CI_LOW,
    AUTO_NAMES,
    CLS_EPSILON,
    CLS_LOSS,
    DELTA,
    DICE,
    DICE_AUTO,
    F1,
    GT_PLANES,
    HD95_AUTO,
    HD95_MM,
    NAMESPACES,
    NOISE_MULTIPLIER_CLS,
    NOISE_MULTIPLIER_SEG,
    NPV,
    NUM_EXAMPLES,
    OVERLAP_NAMES,
    PPV,
    PRIVACY,
    SEG_EPSILON,
    SEG_LOSS,
    SENSITIVITY,
    SPECIFICITY,
    TEST,
    TRAIN,
    ci_names,
    dice_click_name,
    metric_key,
)
from shared.protocol import BASE_FINGERPRINT, DECLINED, FEDABUS_VERSION, SERVER_ROUND, SITE_ID

__all__ = [
    "AUTO_EVAL_METRIC_NAMES",
    "EVAL_METRIC_NAMES",
    "PRIVACY_METRIC_KEYS",
    "SITE_RECORD_KEYS",
    "TRAIN_METRIC_KEYS",
    "EgressRefused",
    "eval_metric_keys",
    "outgoing_adapter",
    "outgoing_metrics",
    "outgoing_site_record",
    "outgoing_update_norm",
    "train_metric_keys",
]

#: Training metrics a site reports (``num-examples`` is the number of training cases, FedAvg's weight).
TRAIN_METRIC_KEYS = (NUM_EXAMPLES, metric_key(SEG_LOSS, split=TRAIN), metric_key(CLS_LOSS, split=TRAIN))
#: Added under sample-level DP: cumulative ε per model at the site, δ and this round's noise multipliers.
PRIVACY_METRIC_KEYS = tuple(
    metric_key(name, split=PRIVACY)
    for name in (SEG_EPSILON, CLS_EPSILON, DELTA, NOISE_MULTIPLIER_SEG, NOISE_MULTIPLIER_CLS)
)
#: The classification part of the evaluation metrics (end to end and on ground-truth planes), for every segmenter.
CLS_EVAL_NAMES = (
    AUC,
    AUC_CI_LOW,
    AUC_CI_HIGH,
    AUC + GT_PLANES,
    *ci_names(AUC + GT_PLANES),
    SENSITIVITY,
    SPECIFICITY,
    PPV,
    NPV,
    ACCURACY,
    F1,
)
#: Evaluation metrics a site reports every evaluation round, under its split (``val/...`` each evaluation round,
#: ``test/...`` once for the chosen models): the same names at every site, NaN when undefined. Confidence
#: bounds are aggregates of the site's cases, like the values.
EVAL_METRIC_NAMES = (
    dice_click_name(1),
    *ci_names(dice_click_name(1)),
    DICE,
    *OVERLAP_NAMES,
    HD95_MM,
    *ci_names(HD95_MM),
    *CLS_EVAL_NAMES,
)
#: The evaluation names of a fully automatic segmenter (``model.seg-model = segresnet``): its whole-volume
#: metrics (:data:`~shared.metric_names.AUTO_NAMES`) with the bounds of Dice and HD95 in place of the click
#: ones, then the same classification names.
AUTO_EVAL_METRIC_NAMES = (
    DICE_AUTO,
    *ci_names(DICE_AUTO),
    *(name for name in AUTO_NAMES if name != DICE_AUTO),
    *ci_names(HD95_AUTO),
    *CLS_EVAL_NAMES,
)
#: Keys a reply's ``site`` record may hold (the server admits a train update only for the round it answers).
SITE_RECORD_KEYS = (SITE_ID, SERVER_ROUND, DECLINED, BASE_FINGERPRINT, FEDABUS_VERSION)
_NAME = re.compile(rf"^({re.escape(NUM_EXAMPLES)}|({'|'.join(NAMESPACES)})/[a-z0-9_.]+)$")


class EgressRefused(RuntimeError):
    """A reply would carry something that must not leave the site; nothing is sent."""


def train_metric_keys(sample_dp: bool) -> tuple[str, ...]:
    """The training keys every site sends (the privacy keys too when sample-level DP is on)."""
    return TRAIN_METRIC_KEYS + (PRIVACY_METRIC_KEYS if sample_dp else ())


def eval_metric_keys(eval_clicks: int, split: str = TEST, *, automatic: bool = False) -> tuple[str, ...]:
    """The evaluation keys of ``split`` including Dice after the configured number of click rounds; with
    ``automatic`` (an automatic segmenter) :data:`AUTO_EVAL_METRIC_NAMES` instead, no click key."""
    if automatic:
        return (NUM_EXAMPLES, *(metric_key(name, split=split) for name in AUTO_EVAL_METRIC_NAMES))
    names = list(EVAL_METRIC_NAMES)
    names.insert(3, dice_click_name(eval_clicks))
    return (NUM_EXAMPLES, *(metric_key(name, split=split) for name in dict.fromkeys(names)))


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


def outgoing_site_record(values: Mapping[str, object]) -> dict[str, str | int]:
    """The ``site`` record of a reply: only :data:`SITE_RECORD_KEYS`, text values and the integer round."""
    out: dict[str, str | int] = {}
    for key, value in values.items():
        if key not in SITE_RECORD_KEYS:
            raise EgressRefused(f"site record key {key!r} is not on the allow-list {SITE_RECORD_KEYS}")
        allowed = int if key == SERVER_ROUND else str
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise EgressRefused(f"site record {key!r} must be {allowed.__name__}, not {type(value).__name__}")
        out[key] = value
    return out


def outgoing_update_norm(norm: float, max_norm: float) -> None:
    """Under secure aggregation the server cannot measure a site's update, so the site applies
    ``federation.max-update-norm`` itself: :class:`EgressRefused` when ``norm`` (``‖adapter − global‖``, L2 over
    all arrays) exceeds ``max_norm`` (0 = off). The relative bound (``max-update-norm-ratio``) needs the other
    sites' norms and is given up under secure aggregation."""
    if max_norm > 0 and not norm <= max_norm:
        raise EgressRefused(
            f"outgoing update: norm {norm:.4g} > federation.max-update-norm {max_norm:.4g}; nothing sent"
        )
