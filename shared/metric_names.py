"""The names fedabus logs and sends its metrics under, and whether each is better high or low.

Every logged value has a flat key ``"{namespace}/{name}"``: the namespace is an evaluation split (``val``,
``test``), ``train`` (training losses) or ``privacy`` (sample-level and client-level DP), e.g.
``test/dice_1click``, ``val/auc``, ``train/seg_loss``, ``privacy/seg_epsilon``. Build keys with
:func:`metric_key`, :func:`dice_click_key` and :func:`ci_names`, never by hand, so that sites, server, MLflow
and the benchmark use the same names. A few keys are whole: :data:`NUM_EXAMPLES` (the example count Flower's
FedAvg weighs a site by; :mod:`shared.protocol` sends it) and the server's ``federation/...`` counts. The
server's aggregates over sites are ``global/{key}_{mean|worst|total}`` (:func:`aggregate_key`).

Whether a metric is better high or low, or is a count, is declared here too (:data:`DIRECTIONS`, read by
:func:`metric_direction`): the server picks the worst site and the best round by it. This module imports
nothing heavy (no torch, no Flower), so the server and the sites' egress check can use it freely.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

__all__ = [
    "ACCURACY",
    "AUC",
    "AUC_CI_HIGH",
    "AUC_CI_LOW",
    "BRIER",
    "CLIENT_CLIP_NORM",
    "CLIENT_EPSILON",
    "CLIENT_EPSILON_NO_AMPLIFICATION",
    "CLIENT_NOISE_STD",
    "CLS_EPSILON",
    "CLS_LOSS",
    "DELTA",
    "DICE",
    "DIRECTIONS",
    "Direction",
    "ECE",
    "EVAL_WEIGHT_METRIC",
    "F1",
    "GLOBAL",
    "GT_PLANES",
    "HD95_MM",
    "HD95_UNDEFINED",
    "IOU",
    "LORA_DISCARDED_ENERGY",
    "LOSS",
    "NOISE_MULTIPLIER_CLS",
    "NOISE_MULTIPLIER_SEG",
    "NPV",
    "NUM_EXAMPLES",
    "OVERLAP_NAMES",
    "NAMESPACES",
    "N_CASES_CLS",
    "N_CASES_SEG",
    "PPV",
    "PRIVACY",
    "REFUSED_UPDATES_METRIC",
    "ROUND_METRIC",
    "SENSITIVITY",
    "SEG_EPSILON",
    "SEG_LOSS",
    "SEG_PRECISION",
    "SEG_RECALL",
    "SPECIFICITY",
    "TEST",
    "TEST_WEIGHT_METRIC",
    "TRAIN",
    "TRAIN_WEIGHT_METRIC",
    "DOWNLOAD_BYTES",
    "UPLOAD_BYTES",
    "VAL",
    "AUTO_NAMES",
    "DICE_AUTO",
    "HD95_AUTO",
    "aggregate_key",
    "auto_name",
    "ci_names",
    "dice_click_count",
    "dice_click_key",
    "dice_click_name",
    "first_click_name",
    "metric_direction",
    "metric_key",
]

# ------------------------------------------------------------------------------------------------ namespaces
#: Evaluation splits: validation each evaluation round, test once for the chosen models.
VAL = "val"
TEST = "test"
#: Training metrics of a site (its losses).
TRAIN = "train"
#: Differential privacy: a site's ε, δ and noise multipliers; the server's client-level ε on the parent run.
PRIVACY = "privacy"
#: The server's aggregates over sites on the parent run (:func:`aggregate_key`).
GLOBAL = "global"
#: Namespaces a site's metric key may start with: training, the evaluation splits and DP.
NAMESPACES: tuple[str, ...] = (TRAIN, VAL, TEST, PRIVACY)

#: Whole key: the number of examples behind a site's metrics (training cases in a training reply, cases
#: evaluated in an evaluation reply); Flower's FedAvg weighs by it.
NUM_EXAMPLES = "num-examples"
#: Whole keys the server logs in each site's run: the example counts of the evaluation, the training and the
#: final test, and the round sentinel (value = step = round; the last logged round of a run).
EVAL_WEIGHT_METRIC = "federation/eval_examples"
TRAIN_WEIGHT_METRIC = "federation/train_examples"
TEST_WEIGHT_METRIC = "federation/test_examples"
ROUND_METRIC = "federation/round"
#: Parent-run metric per round: the updates refused by admission (server/admission.py).
REFUSED_UPDATES_METRIC = "federation/refused_updates"
#: Parent-run metric under ``federation.lora-aggregation = product``: Σ discarded σ² / Σ σ² of the round's
#: rank truncation (0: the global adapter is the exact mean of the sites' ΔW).
LORA_DISCARDED_ENERGY = "federation/lora_discarded_energy"

# ----------------------------------------------------------------------------------------------- metric names
#: Payload of one train round per site, in bytes of array data (server/strategies.py measures them, logged as
#: ``train/upload_bytes`` and ``train/download_bytes`` in the site's run; their sum over sites on the parent run
#: as ``global/train/..._total``): the update the site sent, as it travelled (``federation.compression``), and
#: the global adapter the site was sent.
UPLOAD_BYTES = "upload_bytes"
DOWNLOAD_BYTES = "download_bytes"
#: Mean Dice after the last click round.
DICE = "dice"
#: Mean HD95 in millimetres over the cases where it is defined (see :func:`shared.metrics.hd95_mm`).
HD95_MM = "hd95_mm"
#: Number of cases whose HD95 is undefined (empty prediction), i.e. left out of ``hd95_mm``.
HD95_UNDEFINED = "hd95_undefined"
N_CASES_SEG = "n_cases_seg"
#: Voxel overlap of the predicted mask with the ground truth (:func:`shared.metrics.overlap_metrics`): mean
#: Jaccard index |P∩G|/|P∪G|, precision |P∩G|/|P| and recall |P∩G|/|G| over cases, after the last click; with
#: :func:`first_click_name` (``iou_1click``) after the first click, as ``dice_1click`` is for Dice.
IOU = "iou"
SEG_PRECISION = "seg_precision"
SEG_RECALL = "seg_recall"
AUC = "auc"
AUC_CI_LOW = "auc_ci_low"
AUC_CI_HIGH = "auc_ci_high"
SENSITIVITY = "sensitivity"
SPECIFICITY = "specificity"
PPV = "ppv"
NPV = "npv"
ACCURACY = "accuracy"
F1 = "f1"
N_CASES_CLS = "n_cases_cls"
#: Brier score: mean squared error of the predicted malignancy probability (lower is better).
BRIER = "brier"
#: Expected calibration error with equal-width probability bins (lower is better).
ECE = "ece"
#: Suffix of a classification metric on planes cut from the ground-truth mask (``auc_gt_planes``); without
#: it the planes come from the predicted mask (end to end).
GT_PLANES = "_gt_planes"
#: Training losses of the last epoch (``train/...``); ``loss`` is what a site that names no model reports.
SEG_LOSS = "seg_loss"
CLS_LOSS = "cls_loss"
LOSS = "loss"
#: Sample-level DP at a site (``privacy/...``): cumulative ε per model, δ, this round's noise multipliers.
SEG_EPSILON = "seg_epsilon"
CLS_EPSILON = "cls_epsilon"
DELTA = "delta"
NOISE_MULTIPLIER_SEG = "noise_multiplier_seg"
NOISE_MULTIPLIER_CLS = "noise_multiplier_cls"
#: Client-level DP on the parent run (``privacy/...``): ε at the sampling rate and without amplification,
#: the clip norm and the noise std of the last round.
CLIENT_EPSILON = "client_epsilon"
CLIENT_EPSILON_NO_AMPLIFICATION = "client_epsilon_no_amplification"
CLIENT_CLIP_NORM = "client_clip_norm"
CLIENT_NOISE_STD = "client_noise_std"

#: Suffix of the metrics of a fully automatic segmenter (``model.seg-model = segresnet``): its prediction of the
#: whole volume without any click, so the click metrics (``dice_1click`` …) are never filled by it. Same
#: direction as the metric without it (``dice_auto`` higher, ``hd95_mm_auto`` lower).
AUTO_SUFFIX = "_auto"

_NAME_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")
_CI_BOUNDS = ("_ci_low", "_ci_high")
_FIRST_CLICK = "_1click"


def _check_name_part(value: str, what: str) -> str:
    if not _NAME_PART.match(value):
        raise ValueError(
            f"metric {what} {value!r} must be non-empty and use only letters, digits, '_', '.', '-'"
        )
    return value


def metric_key(name: str, *, split: str = TEST) -> str:
    """Return the flat metric key ``"{split}/{name}"``, e.g. ``metric_key(AUC) == "test/auc"``.

    ``split`` is any namespace: :data:`VAL`, :data:`TEST`, :data:`TRAIN` or :data:`PRIVACY`."""
    return f"{_check_name_part(split, 'split')}/{_check_name_part(name, 'name')}"


def dice_click_name(n_clicks: int) -> str:
    """Return the name (no split) of the mean Dice after click round ``n_clicks`` (1-based): ``dice_{n}click``."""
    if n_clicks < 1:
        raise ValueError(f"n_clicks must be >= 1 (round 1 is the first click), got {n_clicks}")
    return f"dice_{n_clicks}click"


def first_click_name(name: str) -> str:
    """The name of metric ``name`` after the first click round: ``{name}_1click`` (``iou_1click``); for Dice
    it equals ``dice_click_name(1)``."""
    return f"{_check_name_part(name, 'name')}{_FIRST_CLICK}"


#: The overlap metrics of a case and a split, each after the first and the last click: ``iou_1click``, ``iou``,
#: ``seg_precision_1click``, ``seg_precision``, ``seg_recall_1click``, ``seg_recall``.
OVERLAP_NAMES: tuple[str, ...] = tuple(
    name for base in (IOU, SEG_PRECISION, SEG_RECALL) for name in (first_click_name(base), base)
)


def auto_name(name: str) -> str:
    """The name of metric ``name`` for a fully automatic segmenter: ``{name}_auto`` (``dice_auto``)."""
    return f"{_check_name_part(name, 'name')}{AUTO_SUFFIX}"


#: Mean whole-volume Dice and HD95 (mm) of a fully automatic segmenter (no click, no lesion location given).
DICE_AUTO = auto_name(DICE)
HD95_AUTO = auto_name(HD95_MM)
#: A fully automatic segmenter's metrics of a split, in place of the click ones: Dice, the overlaps, HD95.
AUTO_NAMES: tuple[str, ...] = tuple(auto_name(n) for n in (DICE, IOU, SEG_PRECISION, SEG_RECALL, HD95_MM))


def dice_click_key(n_clicks: int, *, split: str = TEST) -> str:
    """Return the key of the mean Dice after click round ``n_clicks`` (1-based): ``test/dice_{n}click``."""
    return metric_key(dice_click_name(n_clicks), split=split)


def ci_names(name: str) -> tuple[str, str]:
    """The names of the lower and upper confidence bounds of ``name``: ``{name}_ci_low``, ``{name}_ci_high``."""
    low, high = _CI_BOUNDS
    return f"{name}{low}", f"{name}{high}"


def aggregate_key(key: str, stat: Literal["mean", "worst", "total"]) -> str:
    """The server's aggregate over sites of ``key`` on the parent run: ``global/{key}_{stat}``,
    e.g. ``aggregate_key("val/dice_1click", "mean") == "global/val/dice_1click_mean"``."""
    return f"{GLOBAL}/{key}_{stat}"


# ---------------------------------------------------------------------------------------------- directions
#: How the server ranks a metric over sites and rounds: ``"higher"`` or ``"lower"`` is better (the worst site
#: is the minimum or the maximum), ``"count"`` is summed over sites (no worst).
Direction = Literal["higher", "lower", "count"]

#: The direction of every metric fedabus logs: base names (looked up after :func:`metric_direction` strips
#: the split and the suffixes) and a few whole keys. Dice after each click round (``dice_{n}click``) is
#: higher-is-better; a confidence bound (``*_ci_low``, ``*_ci_high``) has no direction.
DIRECTIONS: dict[str, Direction] = {
    DICE: "higher",
    HD95_MM: "lower",
    HD95_UNDEFINED: "count",
    N_CASES_SEG: "count",
    IOU: "higher",
    SEG_PRECISION: "higher",
    SEG_RECALL: "higher",
    AUC: "higher",
    SENSITIVITY: "higher",
    SPECIFICITY: "higher",
    PPV: "higher",
    NPV: "higher",
    ACCURACY: "higher",
    F1: "higher",
    N_CASES_CLS: "count",
    BRIER: "lower",
    ECE: "lower",
    # Training losses under train/: produced by shared/training/site.py, sent per client/egress.py.
    SEG_LOSS: "lower",
    CLS_LOSS: "lower",
    LOSS: "lower",
    # Sample-level DP under privacy/: better = more private, so the worst site is the least private one.
    SEG_EPSILON: "lower",
    CLS_EPSILON: "lower",
    DELTA: "lower",
    NOISE_MULTIPLIER_SEG: "higher",
    NOISE_MULTIPLIER_CLS: "higher",
    # Client-level DP on the parent run, produced by server/privacy.py.
    CLIENT_EPSILON: "lower",
    CLIENT_EPSILON_NO_AMPLIFICATION: "lower",
    # Payload bytes of a round (server/strategies.py): additive, so summed over sites.
    UPLOAD_BYTES: "count",
    DOWNLOAD_BYTES: "count",
    # Whole keys: the example counts.
    NUM_EXAMPLES: "count",
    EVAL_WEIGHT_METRIC: "count",
    TRAIN_WEIGHT_METRIC: "count",
    TEST_WEIGHT_METRIC: "count",
}

_AGGREGATE_PREFIX = f"{GLOBAL}/"
_AGGREGATE_STATS = ("_mean", "_worst", "_total")
#: Per-group statistics of :func:`shared.metrics.stratified_metrics_dict`: ``{by}/{group}/{metric}_{stat}``.
_STRATUM_STATS = ("_mean", "_std", "_count")
#: Input variants of a classification metric (shared/training/cls.py SOURCE_SUFFIXES): same direction.
_SOURCE_SUFFIXES = (GT_PLANES,)
_DICE_CLICK_NAME = re.compile(r"dice_([1-9][0-9]*)click")


def _cut_suffix(name: str, suffixes: Sequence[str]) -> tuple[str, str | None]:
    """``name`` without the first of ``suffixes`` it ends with, and that suffix (None when none)."""
    for suffix in suffixes:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return name, None


def _base_direction(name: str) -> Direction | None:
    if _cut_suffix(name, _CI_BOUNDS)[1] is not None:
        return None
    name = _cut_suffix(name, _SOURCE_SUFFIXES)[0]
    if dice_click_count(name) is not None:
        return "higher"
    return DIRECTIONS.get(_cut_suffix(name, (_FIRST_CLICK, AUTO_SUFFIX))[0])


def dice_click_count(name: str) -> int | None:
    """The click round ``n`` of a name ``dice_{n}click`` (no split), or None for any other name."""
    match = _DICE_CLICK_NAME.fullmatch(name)
    return int(match[1]) if match else None


def metric_direction(key: str) -> Direction | None:
    """The declared direction of a logged metric (:data:`DIRECTIONS`), or None when it has none.

    Understands the keys fedabus writes: a whole key of :data:`DIRECTIONS` (``num-examples``,
    ``federation/eval_examples``); ``[{split}/]{name}`` with split ``train``, ``val``, ``test`` or ``privacy``
    and the name possibly ending in ``_gt_planes``; a stratum ``{split}/{by}/{group}/{name}_{mean|std|count}``
    (the mean keeps the direction, the spread has none, the count is a count); and the server's aggregates
    ``global/{key}_{mean|worst|total}``. Confidence bounds and undeclared names give None (the server then
    reports only a mean).
    """
    if key in DIRECTIONS:
        return DIRECTIONS[key]
    if key.startswith(_AGGREGATE_PREFIX):
        inner, stat = _cut_suffix(key.removeprefix(_AGGREGATE_PREFIX), _AGGREGATE_STATS)
        return metric_direction(inner) if stat is not None else None
    namespace, _, rest = key.partition("/")
    parts = rest.split("/") if namespace in NAMESPACES else key.split("/")
    if len(parts) == 1:
        return _base_direction(parts[0])
    if len(parts) == 3:
        name, stat = _cut_suffix(parts[2], _STRATUM_STATS)
        return _base_direction(name) if stat == "_mean" else "count" if stat == "_count" else None
    return None
