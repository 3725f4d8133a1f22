"""The figures of the study report, each a matplotlib PNG returned as a base64 ``data:`` URI.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas (no pyplot, so no global state
and no display). Every function returns ``None`` when it has nothing to draw; the report then says "n/a".

Per-case figures (ROC, Dice vs clicks, box plots, calibration, decision curves, confusion matrices) read :class:`CaseRow` s, built from the
study's per-case rows by :func:`case_rows`. Curves are grouped by arm; where an arm holds both models that saw
a site's training data and models that did not (``local``, ``loso``), the two are drawn separately as
``"arm · internal"`` (solid) and ``"arm · external"`` (dashed).
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from sklearn.metrics import roc_auc_score, roc_curve

from shared.calibration import calibration_curve, ece_of
from shared.decision_analysis import decision_curve

__all__ = [
    "CALIBRATION_BINS",
    "CaseRow",
    "calibration_figure",
    "case_rows",
    "confusion_matrix_figure",
    "decision_curve_figure",
    "dice_vs_clicks_figure",
    "heatmap_figure",
    "roc_figure",
    "roc_skipped",
    "stratum_boxplot_figure",
]

#: Equal-width probability bins of the reliability plot.
CALIBRATION_BINS = 10
_PANELS_PER_ROW = 3


@dataclass(frozen=True)
class CaseRow:
    """One test case of one model, cleaned: NaN for a missing number, ``None`` for a missing category."""

    arm: str
    model: str
    test_site: str
    case_id: str
    label: int | None  # 1 = malignant, 0 = benign
    prob: float  # malignancy probability
    pred: int | None  # the call at the arm's threshold: 1 = malignant, 0 = benign
    dice_curve: tuple[float, ...]  # Dice after click 1..N
    birads: str | None
    volume_bin: str | None
    internal: bool | None  # the model saw this site's training data; None when the results do not say


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _label(value: object) -> int | None:
    number = _float(value)
    return int(number) if number in (0.0, 1.0) else None


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _category(value: object) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def _curve(value: object) -> tuple[float, ...]:
    if value is None or isinstance(value, str | bytes):
        return ()
    try:
        return tuple(_float(v) for v in value)  # type: ignore[union-attr]
    except TypeError:
        return ()


def case_rows(
    cases: Iterable[Mapping[str, object]], internal: Mapping[tuple[str, str, str], bool]
) -> list[CaseRow]:
    """Clean the study's per-case rows; ``internal`` maps ``(arm, model, test_site)`` to the results' flag."""
    rows = []
    for case in cases:
        arm, model, site = (_text(case.get(key)) for key in ("arm", "model", "test_site"))
        curve = _curve(case.get("dice_curve"))
        rows.append(
            CaseRow(
                arm=arm,
                model=model,
                test_site=site,
                case_id=_text(case.get("case_id")),
                label=_label(case.get("label")),
                prob=_float(case.get("prob")),
                pred=_label(case.get("pred")),
                dice_curve=curve,
                birads=_category(case.get("birads")),
                volume_bin=_category(case.get("volume_bin")),
                internal=internal.get((arm, model, site)),
            )
        )
    return rows


# ------------------------------------------------------------------------------------------------ helpers
def _data_uri(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _colour(arms: Sequence[str], arm: str) -> tuple[float, float, float, float]:
    index = arms.index(arm) if arm in arms else len(arms)
    return colormaps["tab10"](index % 10)


def _natural_key(text: str) -> list[object]:
    return [
        (0, int(part)) if part.isdigit() else (1, part.lower()) for part in re.split(r"(\d+)", text) if part
    ]


def _grouped(rows: Sequence[CaseRow], arms: Sequence[str]) -> list[tuple[str, str, str, list[CaseRow]]]:
    """``(label, arm, line style, rows)`` per arm, split into internal and external where the arm mixes."""
    groups = []
    for arm in arms:
        mine = [row for row in rows if row.arm == arm]
        if not mine:
            continue
        statuses = {row.internal for row in mine}
        if len(statuses) == 1:
            groups.append((arm, arm, "-", mine))
            continue
        for status, name, style in (
            (True, "internal", "-"),
            (False, "external", "--"),
            (None, "unknown", ":"),
        ):
            part = [row for row in mine if row.internal is status]
            if part:
                groups.append((f"{arm} · {name}", arm, style, part))
    return groups


def _panel_grid(count: int, width: float = 4.2, height: float = 3.8) -> tuple[Figure, list[Axes]]:
    cols = min(count, _PANELS_PER_ROW)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(count)]
    return fig, axes


# ------------------------------------------------------------------------------------------------ figures
def heatmap_figure(
    values: np.ndarray,
    internal: np.ndarray,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    decimals: int = 3,
) -> str | None:
    """Test sites (rows) × models (columns) of one metric; internal cells outlined and starred."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    low, high = float(finite.min()), float(finite.max())
    if high - low < 1e-9:
        low, high = low - 0.05, high + 0.05
    size = (max(4.5, 1.15 * len(col_labels) + 2.5), max(2.6, 0.65 * len(row_labels) + 1.8))
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=high, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    for (r, c), value in np.ndenumerate(values):
        bright = not np.isfinite(value) or (value - low) / (high - low) > 0.55
        text = "n/a" if not np.isfinite(value) else f"{value:.{decimals}f}" + ("*" if internal[r, c] else "")
        ax.text(c, r, text, ha="center", va="center", fontsize=9, color="black" if bright else "white")
        if internal[r, c]:
            ax.add_patch(Rectangle((c - 0.46, r - 0.46), 0.92, 0.92, fill=False, edgecolor="#d62728", lw=2.2))
    ax.set_xticks(range(len(col_labels)), labels=col_labels, rotation=30, ha="right", fontsize=9)
    ax.set_yticks(range(len(row_labels)), labels=row_labels, fontsize=9)
    ax.set_xlabel("model (arm)")
    ax.set_ylabel("test site")
    ax.set_title(title, fontsize=11)
    return _data_uri(fig)


def _labelled(rows: Iterable[CaseRow]) -> list[CaseRow]:
    return [row for row in rows if row.label is not None and np.isfinite(row.prob)]


def _unique_cases(rows: Sequence[CaseRow]) -> dict[tuple[str, str], int | None]:
    """``(test_site, case_id) -> label``: each test case once, however many models and runs saw it."""
    return {(row.test_site, row.case_id or f"#{i}"): row.label for i, row in enumerate(rows)}


def roc_skipped(rows: Sequence[CaseRow], sites: Sequence[str]) -> dict[str, str]:
    """``site -> why`` for the test sites whose labelled cases hold fewer than two classes (no ROC)."""
    skipped = {}
    for site in sites:
        labelled = _labelled(row for row in rows if row.test_site == site)
        if len({row.label for row in labelled}) < 2:
            skipped[site] = "one class only" if labelled else "no labelled cases"
    return skipped


def _roc_panel(ax: Axes, site: str, rows: Sequence[CaseRow], arms: Sequence[str]) -> None:
    labelled = _labelled(rows)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="1 - specificity", ylabel="sensitivity")
    skipped = roc_skipped(labelled, [site])
    if skipped:
        ax.set_title(f"{site}: {skipped[site]}, no ROC", fontsize=10)
        return
    for name, arm, style, group in _grouped(labelled, arms):
        labels = np.array([row.label for row in group])
        probs = np.array([row.prob for row in group])
        if len(set(labels.tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, probs)
        auc = roc_auc_score(labels, probs)
        ax.plot(fpr, tpr, ls=style, color=_colour(arms, arm), lw=1.6, label=f"{name} (AUC {auc:.2f})")
    labels = _unique_cases(labelled)
    n_pos = sum(label == 1 for label in labels.values())
    ax.set_title(f"{site} ({n_pos} malignant / {len(labels) - n_pos} benign cases)", fontsize=10)
    ax.legend(loc="lower right", fontsize=7)


def roc_figure(rows: Sequence[CaseRow], sites: Sequence[str], arms: Sequence[str]) -> str | None:
    """One ROC panel per test site, one curve per arm (cases of all its models, folds and repeats pooled)."""
    if not _labelled(rows):
        return None
    fig, axes = _panel_grid(len(sites))
    for ax, site in zip(axes, sites, strict=True):
        _roc_panel(ax, site, [row for row in rows if row.test_site == site], arms)
    return _data_uri(fig)


def _padded(curves: Sequence[tuple[float, ...]]) -> np.ndarray:
    rounds = max(len(curve) for curve in curves)
    return np.array([list(curve) + [curve[-1]] * (rounds - len(curve)) for curve in curves], dtype=np.float64)


def dice_vs_clicks_figure(rows: Sequence[CaseRow], arms: Sequence[str]) -> str | None:
    """Mean Dice after click 1..N per arm over all test sites; a short curve keeps its last Dice."""
    rows = [row for row in rows if np.isfinite(row.dice_curve).any()]
    if not rows:
        return None
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name, arm, style, group in _grouped(rows, arms):
        curves = _padded([row.dice_curve for row in group])
        counts = np.isfinite(curves).sum(axis=0)
        curve = np.where(counts > 0, np.nansum(curves, axis=0) / np.maximum(counts, 1), np.nan)
        clicks = np.arange(1, curve.size + 1)
        ax.plot(
            clicks, curve, ls=style, marker="o", color=_colour(arms, arm), label=f"{name} (n={len(group)})"
        )
    ax.set(xlabel="clicks", ylabel="mean Dice", title="Dice vs clicks (all test sites)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _data_uri(fig)


def stratum_boxplot_figure(
    rows: Sequence[CaseRow], arms: Sequence[str], *, key: Callable[[CaseRow], str | None], title: str
) -> str | None:
    """Box plots of each case's final Dice per category of ``key`` (BI-RADS, volume bin), one box per arm."""
    rows = [
        row for row in rows if row.dice_curve and np.isfinite(row.dice_curve[-1]) and key(row) is not None
    ]
    categories = sorted({key(row) for row in rows}, key=_natural_key)  # type: ignore[arg-type]
    present = [arm for arm in arms if any(row.arm == arm for row in rows)]
    if not categories or not present:
        return None
    fig = Figure(
        figsize=(max(6.0, 0.9 * len(categories) * len(present) ** 0.5 + 2), 4.2), layout="constrained"
    )
    ax = fig.add_subplot()
    width = 0.8 / len(present)
    for a, arm in enumerate(present):
        for c, category in enumerate(categories):
            dice = [row.dice_curve[-1] for row in rows if row.arm == arm and key(row) == category]
            if not dice:
                continue
            box = ax.boxplot(
                [dice], positions=[c - 0.4 + width * (a + 0.5)], widths=width * 0.85, patch_artist=True
            )
            for patch in box["boxes"]:
                patch.set(facecolor=_colour(arms, arm), alpha=0.75)
            for median in box["medians"]:
                median.set(color="black")
    counts = [len(_unique_cases([row for row in rows if key(row) == category])) for category in categories]
    tick_labels = [f"{category}\n({n} cases)" for category, n in zip(categories, counts, strict=True)]
    ax.set_xticks(range(len(categories)), labels=tick_labels)
    ax.set_xlim(-0.6, len(categories) - 0.4)
    ax.set(ylabel="Dice after the last click", title=title)
    ax.grid(axis="y", alpha=0.3)
    handles = [Patch(facecolor=_colour(arms, arm), alpha=0.75, label=arm) for arm in present]
    fig.legend(handles=handles, fontsize=8, loc="outside right upper")
    return _data_uri(fig)


def _reliability(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean probability and observed malignant fraction of each non-empty bin, and the ECE."""
    curve = calibration_curve(labels, np.clip(probs, 0.0, 1.0), CALIBRATION_BINS)
    return curve.mean_predicted, curve.observed_fraction, ece_of(curve)


def calibration_figure(rows: Sequence[CaseRow], arms: Sequence[str]) -> str | None:
    """A reliability plot per arm: 10 equal-width probability bins against the diagonal."""
    labelled = _labelled(rows)
    if not labelled:
        return None
    fig, axes = _panel_grid(len(arms), width=3.6, height=3.5)
    for ax, arm in zip(axes, arms, strict=True):
        mine = [row for row in labelled if row.arm == arm]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(
            xlim=(0, 1), ylim=(-0.02, 1.02), xlabel="mean predicted probability", ylabel="fraction malignant"
        )
        if not mine:
            ax.set_title(f"{arm}: no labelled cases", fontsize=10)
            continue
        labels = np.array([row.label for row in mine], dtype=np.float64)
        confidence, observed, ece = _reliability(labels, np.array([row.prob for row in mine]))
        ax.plot(confidence, observed, marker="o", color=_colour(arms, arm))
        ax.set_title(f"{arm} ({len(mine)} predictions, ECE {ece:.3f})", fontsize=10)
    return _data_uri(fig)


def decision_curve_figure(rows: Sequence[CaseRow], arms: Sequence[str]) -> str | None:
    """Net benefit against the threshold probability (:func:`shared.statistics.decision_curve`) per arm over
    all test sites, with the treat-all and treat-none references of the test cases (each counted once)."""
    labelled = _labelled(rows)
    if not labelled:
        return None
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    labels = [label for label in _unique_cases(labelled).values() if label is not None]
    reference = decision_curve(labels, [0.5] * len(labels))
    ax.plot(reference.thresholds, reference.treat_all, color="black", lw=1.0, label="treat all")
    ax.plot(reference.thresholds, reference.treat_none, color="grey", lw=1.0, ls="--", label="treat none")
    for name, arm, style, group in _grouped(labelled, arms):
        curve = decision_curve([row.label for row in group], [row.prob for row in group])
        ax.plot(
            curve.thresholds,
            curve.model,
            ls=style,
            color=_colour(arms, arm),
            label=f"{name} (n={len(group)})",
        )
    top = max(reference.prevalence, 0.05)
    ax.set(xlim=(0, 1), ylim=(-0.1 * top - 0.02, 1.1 * top + 0.02), xlabel="threshold probability")
    ax.set(ylabel="net benefit (true positives per case)", title="Decision curves (all test sites)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return _data_uri(fig)


def confusion_matrix_figure(rows: Sequence[CaseRow], arms: Sequence[str]) -> str | None:
    """A 2 × 2 confusion matrix per arm at its operating threshold (cases of all its models, sites, folds and
    repeats pooled), from the labelled cases with a call."""
    called = [row for row in _labelled(rows) if row.pred is not None]
    if not called:
        return None
    fig, axes = _panel_grid(len(arms), width=3.7, height=3.2)
    for ax, arm in zip(axes, arms, strict=True):
        mine = [row for row in called if row.arm == arm]
        counts = np.zeros((2, 2), dtype=int)  # rows: truth benign/malignant; columns: call benign/malignant
        for row in mine:
            counts[row.label, row.pred] += 1
        ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
        for (r, c), count in np.ndenumerate(counts):
            bright = count > counts.max() / 2
            ax.text(
                c, r, str(count), ha="center", va="center", fontsize=12, color="white" if bright else "black"
            )
        ticks = ["benign", "malignant"]
        ax.set_xticks([0, 1], labels=ticks)
        ax.set_yticks([0, 1], labels=ticks)
        ax.set(xlabel="called", ylabel="truth")
        tp, fn, tn, fp = counts[1, 1], counts[1, 0], counts[0, 0], counts[0, 1]
        sens = f"{tp / (tp + fn):.2f}" if tp + fn else "n/a"
        spec = f"{tn / (tn + fp):.2f}" if tn + fp else "n/a"
        ax.set_title(f"{arm} (n={len(mine)}): sens {sens}, spec {spec}", fontsize=9)
    return _data_uri(fig)
