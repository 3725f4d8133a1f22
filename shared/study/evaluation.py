"""Testing a study's models on every site, and the numbers a reviewer accepts.

Every trained model is tested once on every site's test split. Per case, the Dice after each click, IoU,
precision and recall after the first and the last click, the HD95 (mm), the lesion's label, BI-RADS and volume
stratum, the malignancy probability (end to end: planes cut from the predicted mask; and from the ground-truth
mask) and the end-to-end call at the arm's ``train.cls-threshold`` (``pred``, 1 = malignant) are kept as
**case rows** (they stay in the study's own output folder). From them come the **result rows** (one per
model, test site and metric, with a 95% case-bootstrap or DeLong CI) and the **comparisons** (paired tests between two arms on the same test cases).

An arm with a fully automatic segmenter (``model.seg-model = segresnet``) has no click: its case rows hold the
whole-volume ``dice_auto``, ``iou_auto``, ``seg_precision_auto``, ``seg_recall_auto`` and ``hd95_mm_auto``
(:data:`~shared.metric_names.AUTO_NAMES`) and an empty ``dice_curve``, its result rows those metrics with the
same bootstrap, and two automatic arms are compared on ``dice_auto`` and ``hd95_mm_auto``. A click arm and an
automatic arm share the classification comparisons only (their segmentation metrics measure different tasks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from shared.config import FedabusConfig
from shared.decision_analysis import mcnemar
from shared.metric_names import (
    ACCURACY,
    AUC,
    AUTO_NAMES,
    DICE_AUTO,
    HD95_AUTO,
    HD95_MM,
    OVERLAP_NAMES,
    dice_click_name,
)
from shared.statistics import (
    Estimate,
    classification_estimates,
    delong_auc,
    delong_test,
    paired_bootstrap,
    segmentation_estimates,
)
from shared.training.site import SiteData, evaluate_site

__all__ = ["compare_arms", "result_rows", "test_on_sites"]

Row = dict[str, Any]


def test_on_sites(
    models: dict[str, Any],
    sites: Sequence[SiteData],
    config: FedabusConfig,
    *,
    device: torch.device,
    tags: Row,
) -> list[Row]:
    """Case rows of ``models`` on each site's test split; every row carries ``tags`` (arm, model, fold, repeat)."""
    rows = []
    for site in sites:
        details: dict[str, Any] = {}
        evaluate_site(models, site, config, device=device, split="test", details=details)
        probs = {(c["source"], c["case_id"]): c["probability"] for c in details["classification"]}
        calls = {
            c["case_id"]: int(c["predicted_malignant"])
            for c in details["classification"]
            if c["source"] == "pred"
        }
        for case in details["segmentation"]["cases"]:
            case_id = str(case["case_id"])
            rows.append(
                {
                    **tags,
                    "test_site": site.name,
                    "case_id": case_id,
                    "label": case["label"],
                    "prob": probs.get(("pred", case_id)),
                    "prob_gt": probs.get(("gt", case_id)),
                    "pred": calls.get(case_id),
                    **_segmentation_fields(case),
                    "birads": case["birads"],
                    "volume_bin": case["volume_bin"],
                }
            )
    return rows


def _segmentation_fields(case: Row) -> Row:
    """A case's segmentation values for its row: the click curve, overlaps and HD95, or, for an automatic
    segmenter (no curve), its ``*_auto`` values and an empty curve."""
    if DICE_AUTO in case:
        return {"dice_curve": [], **{name: float(case[name]) for name in AUTO_NAMES}}
    return {
        "dice_curve": [float(v) for v in case["dice_curve"]],
        **{name: float(case[name]) for name in OVERLAP_NAMES},
        "hd95_mm": float(case["hd95_mm"]),
    }


def _automatic(cases: Sequence[Row]) -> bool:
    """Whether case rows are an automatic segmenter's (no click curve)."""
    return all(not c["dice_curve"] for c in cases)


def _row(tags: Row, metric: str, estimate: Estimate) -> Row:
    return {
        **tags,
        "metric": metric,
        "value": estimate.value,
        "ci_low": estimate.ci_low,
        "ci_high": estimate.ci_high,
        "n": estimate.n,
        "method": estimate.method,
        "note": estimate.note,
    }


def _estimates(cases: Sequence[Row], *, n_boot: int, seed: int) -> dict[str, Estimate]:
    if _automatic(cases):
        from shared.training.seg_auto import auto_segmentation_estimates

        out = auto_segmentation_estimates(
            [c[DICE_AUTO] for c in cases],
            [c[HD95_AUTO] for c in cases],
            overlaps={
                name: [c[name] for c in cases] for name in AUTO_NAMES if name not in (DICE_AUTO, HD95_AUTO)
            },
            n_boot=n_boot,
            seed=seed,
        )
    else:
        out = _click_estimates(cases, n_boot=n_boot, seed=seed)
    return out | _classification_estimates(cases, n_boot=n_boot, seed=seed)


def _click_estimates(cases: Sequence[Row], *, n_boot: int, seed: int) -> dict[str, Estimate]:
    return dict(
        segmentation_estimates(
            [c["dice_curve"] for c in cases],
            [c["hd95_mm"] for c in cases],
            overlaps={name: [c.get(name, math.nan) for c in cases] for name in OVERLAP_NAMES},
            n_boot=n_boot,
            seed=seed,
        )
    )


def _classification_estimates(cases: Sequence[Row], *, n_boot: int, seed: int) -> dict[str, Estimate]:
    out: dict[str, Estimate] = {}
    labelled = [c for c in cases if c["label"] is not None and c["prob"] is not None]
    if labelled:
        labels = np.array([int(c["label"]) for c in labelled])
        out.update(
            classification_estimates(
                labels, np.array([c["prob"] for c in labelled]), n_boot=n_boot, seed=seed
            )
        )
        if all(c["prob_gt"] is not None for c in labelled):
            out["auc_gt_planes"] = delong_auc(labels, np.array([c["prob_gt"] for c in labelled]))
    return out


def result_rows(
    cases: Sequence[Row], internal: dict[str, set[str]], *, n_boot: int = 2000, seed: int = 0
) -> list[Row]:
    """One row per (arm, model, fold, repeat, test site, metric) with its 95% CI and ``n`` cases; rows with
    fold ``"all"`` pool a model's cases over every fold (each case was tested once) and carry the mean and SD of
    the per-fold values (``fold_mean``, ``fold_sd``). ``internal[model]`` are the sites it trained on."""
    groups: dict[tuple, list[Row]] = {}
    for case in cases:
        key = (case["arm"], case["model"], case["fold"], case["repeat"], case["test_site"])
        groups.setdefault(key, []).append(case)
    rows = []
    for (arm, model, fold, repeat, site), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        tags = {"arm": arm, "model": model, "fold": fold, "repeat": repeat, "test_site": site}
        tags["internal"] = site in internal.get(model, set())
        rows += [_row(tags, m, e) for m, e in _estimates(members, n_boot=n_boot, seed=seed).items()]
    folds = {case["fold"] for case in cases}
    if len(folds) > 1:
        rows += _pooled_fold_rows(cases, rows, internal, n_boot=n_boot, seed=seed)
    return rows


def _pooled_fold_rows(
    cases: Sequence[Row], per_fold: Sequence[Row], internal: dict[str, set[str]], *, n_boot: int, seed: int
) -> list[Row]:
    groups: dict[tuple, list[Row]] = {}
    for case in cases:
        groups.setdefault((case["arm"], case["model"], case["repeat"], case["test_site"]), []).append(case)
    rows = []
    for (arm, model, repeat, site), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        tags = {"arm": arm, "model": model, "fold": "all", "repeat": repeat, "test_site": site}
        tags["internal"] = site in internal.get(model, set())
        for metric, estimate in _estimates(members, n_boot=n_boot, seed=seed).items():
            values = [
                r["value"]
                for r in per_fold
                if (r["arm"], r["model"], r["repeat"], r["test_site"], r["metric"])
                == (arm, model, repeat, site, metric)
                and not math.isnan(r["value"])
            ]
            row = _row(tags, metric, estimate)
            row["fold_mean"] = float(np.mean(values)) if values else math.nan
            row["fold_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
            rows.append(row)
    return rows


def _representative(models: Iterable[str], arm: str, site: str) -> str | None:
    """The model of ``arm`` that speaks for it at ``site``: its own local model, the LOSO model that left the
    site out, or the arm's single model."""
    names = [m for m in models if m.split(":", 1)[0] == arm]
    for wanted in (f"{arm}:{site}", f"{arm}:-{site}"):  # a local model, a LOSO model (also as KIND@LABEL)
        if wanted in names:
            return wanted
    return names[0] if len(names) == 1 else None


def compare_arms(
    cases: Sequence[Row], reference: str = "federated", *, n_boot: int = 2000, seed: int = 0
) -> list[Row]:
    """Paired comparisons of ``reference`` against every other arm at every test site, on the same test cases
    (pooled over folds, per repeat): Dice@1 by paired case bootstrap, HD95 likewise, AUC by DeLong's test,
    accuracy at each arm's threshold by McNemar's test (rows with ``only_a``/``only_b``, the discordant
    counts). ``diff`` is reference minus the other arm."""
    index: dict[tuple, dict[str, Row]] = {}
    for case in cases:
        index.setdefault((case["repeat"], case["test_site"], case["model"]), {})[
            f"{case['fold']}/{case['case_id']}"
        ] = case
    rows = []
    for repeat, site in sorted({(c["repeat"], c["test_site"]) for c in cases}, key=str):
        models = {m for (r, s, m) in index if (r, s) == (repeat, site)}
        arms = sorted({m.split(":", 1)[0] for m in models})
        ref = _representative(models, reference, site)
        if ref is None:
            continue
        for arm in arms:
            other = _representative(models, arm, site)
            if arm == reference or other is None:
                continue
            rows += _compare(
                index[(repeat, site, ref)],
                index[(repeat, site, other)],
                n_boot=n_boot,
                seed=seed,
                tags={
                    "repeat": repeat,
                    "test_site": site,
                    "arm_a": reference,
                    "arm_b": arm,
                    "model_a": ref,
                    "model_b": other,
                },
            )
    return rows


def _comparison_row(tags: Row, metric: str, result: Any) -> Row:
    fields = ("diff", "ci_low", "ci_high", "p_value", "n", "method", "only_a", "only_b")
    return {**tags, "metric": metric, **{name: getattr(result, name, None) for name in fields}}


def _compare(a: dict[str, Row], b: dict[str, Row], *, n_boot: int, seed: int, tags: Row) -> list[Row]:
    shared = sorted(set(a) & set(b))
    out = []
    automatic = {_automatic([a[k] for k in shared]), _automatic([b[k] for k in shared])}
    if automatic == {False}:
        picks = ((dice_click_name(1), lambda c: c["dice_curve"][0]), (HD95_MM, lambda c: c["hd95_mm"]))
    elif automatic == {True}:
        picks = ((DICE_AUTO, lambda c: c[DICE_AUTO]), (HD95_AUTO, lambda c: c[HD95_AUTO]))
    else:  # a click arm against an automatic one: different tasks, no paired segmentation test
        picks = ()
    for metric, pick in picks:
        result = paired_bootstrap(
            np.array([pick(a[k]) for k in shared]),
            np.array([pick(b[k]) for k in shared]),
            n_boot=n_boot,
            seed=seed,
        )
        out.append(_comparison_row(tags, metric, result))
    labelled = [
        k
        for k in shared
        if a[k]["label"] is not None and a[k]["prob"] is not None and b[k]["prob"] is not None
    ]
    if labelled:
        result = delong_test(
            np.array([int(a[k]["label"]) for k in labelled]),
            np.array([a[k]["prob"] for k in labelled]),
            np.array([b[k]["prob"] for k in labelled]),
        )
        out.append(_comparison_row(tags, AUC, result))
    called = [k for k in labelled if a[k].get("pred") is not None and b[k].get("pred") is not None]
    if called:
        result = mcnemar(
            np.array([int(a[k]["label"]) for k in called]),
            np.array([int(a[k]["pred"]) for k in called]),
            np.array([int(b[k]["pred"]) for k in called]),
        )
        out.append(_comparison_row(tags, ACCURACY, result))
    return out
