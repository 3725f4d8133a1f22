"""The self-contained HTML report of a cross-site study: figures, the table of numbers and findings in words.

:func:`render_report` writes one HTML page with no external CSS, JavaScript, fonts or images (figures are
matplotlib PNGs embedded as base64 ``data:`` URIs), so the page can be mailed or archived as one file.

Input contract (rows are mappings such as plain dicts; a missing key, ``None`` or NaN shows as "n/a"):

``results`` (:data:`RESULT_COLUMNS`): one row per (arm, fold, repeat, model, test_site, metric).
    ``arm`` str ("zero-shot", "local", "federated", "pooled", "loso"); ``model`` str ("local:site_a",
    "federated", "loso:-site_b"); ``fold``, ``repeat`` int; ``test_site`` str; ``internal`` bool (the model
    saw this site's training data); ``metric`` str (:data:`METRIC_LABELS` keys; others are shown by name);
    ``value``, ``ci_low``, ``ci_high`` float (NaN allowed); ``n`` int test cases.
``cases`` (:data:`CASE_COLUMNS`): one row per test case of one model in one fold and repeat.
    ``arm, model, fold, repeat, test_site, case_id``; ``label`` 0 benign / 1 malignant / None; ``prob`` float
    malignancy probability or None; ``pred`` 1 / 0 / None, the call at the arm's threshold; ``dice_curve``
    list of Dice after click 1..N; ``hd95_mm`` float (NaN allowed); ``birads`` str or None; ``volume_bin`` str
    ("0-5", "5-20", "20-100" cm³).
``comparisons`` (:data:`COMPARISON_COLUMNS`): paired tests between arms on the same test cases.
    ``test_site, metric, arm_a, arm_b`` str; ``diff`` (arm_a - arm_b), ``ci_low``, ``ci_high``, ``p_value``
    float; ``method`` str; McNemar's rows (metric ``accuracy``) also ``n`` and ``only_a``, ``only_b``, the
    cases only arm_a and only arm_b call correctly (None in other rows): the McNemar table.
``meta`` (:data:`META_KEYS`): ``title``, ``created`` (ISO time), ``sites`` and ``arms`` (lists, their order is
    the report's order), ``selection_rule`` str, ``notes`` list of str.

Aggregation: a (test site, model, metric) cell is the mean over folds and repeats of ``value``; its interval
is the mean of the runs' ``ci_low`` and ``ci_high`` (the run's own interval when there is one run). Heatmap
columns are models, grouped by arm, so that e.g. ``local:site_a`` at ``site_a`` (internal) and at ``site_b``
(external) stay apart.
"""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.atomic import write_text_atomic
from shared.decision_analysis import MCNEMAR_EXACT_BELOW
from shared.metric_names import (
    ACCURACY,
    AUC,
    BRIER,
    DICE,
    DICE_AUTO,
    ECE,
    F1,
    HD95_AUTO,
    HD95_MM,
    IOU,
    NPV,
    PPV,
    SEG_PRECISION,
    SEG_RECALL,
    SENSITIVITY,
    SPECIFICITY,
    auto_name,
    dice_click_name,
    first_click_name,
    metric_direction,
)
from shared.study import figures
from shared.study.figures import CaseRow

__all__ = [
    "CASE_COLUMNS",
    "COMPARISON_COLUMNS",
    "METRIC_LABELS",
    "META_KEYS",
    "RESULT_COLUMNS",
    "render_report",
]

Row = Mapping[str, object]
Pairs = Sequence[tuple[str, str]]  # (arm, model)

RESULT_COLUMNS = (
    "arm", "model", "fold", "repeat", "test_site", "internal", "metric", "value", "ci_low", "ci_high", "n",
)  # fmt: skip
CASE_COLUMNS = (
    "arm", "model", "fold", "repeat", "test_site", "case_id", "label", "prob", "pred", "dice_curve", "hd95_mm",
    "birads", "volume_bin",
)  # fmt: skip
COMPARISON_COLUMNS = (
    "test_site", "metric", "arm_a", "arm_b", "diff", "ci_low", "ci_high", "p_value", "method", "n", "only_a",
    "only_b",
)  # fmt: skip
META_KEYS = ("title", "created", "sites", "arms", "selection_rule", "notes")

#: Display names, in the table's column order; metrics not listed follow by name.
METRIC_LABELS = {
    dice_click_name(1): "Dice@1",
    dice_click_name(5): "Dice@5",
    DICE: "Dice",
    first_click_name(IOU): "IoU@1",
    IOU: "IoU",
    first_click_name(SEG_PRECISION): "Precision@1",
    SEG_PRECISION: "Precision",
    first_click_name(SEG_RECALL): "Recall@1",
    SEG_RECALL: "Recall",
    HD95_MM: "HD95 (mm)",
    # A fully automatic segmenter's whole-volume metrics (no click; shared.training.seg_auto).
    DICE_AUTO: "Dice (auto)",
    auto_name(IOU): "IoU (auto)",
    auto_name(SEG_PRECISION): "Precision (auto)",
    auto_name(SEG_RECALL): "Recall (auto)",
    HD95_AUTO: "HD95 auto (mm)",
    AUC: "AUC",
    SENSITIVITY: "Sensitivity",
    SPECIFICITY: "Specificity",
    PPV: "PPV",
    NPV: "NPV",
    F1: "F1",
    ACCURACY: "Accuracy",
    BRIER: "Brier",
    ECE: "ECE",
}
#: Metrics whose best value is the smallest (as :data:`shared.metric_names.DIRECTIONS` declares them).
LOWER_IS_BETTER = frozenset(name for name in METRIC_LABELS if metric_direction(name) == "lower")
#: Metrics named in the findings' "best arm" sentences (``dice_auto`` only when an arm has an automatic
#: segmenter).
FINDING_METRICS = (dice_click_name(1), DICE_AUTO, AUC)
ALPHA = 0.05

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}dl.meta dt{font-weight:600}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}.na{color:#888;font-style:italic}
table{border-collapse:collapse;font-size:.82em}th,td{border:1px solid #ddd;padding:3px 6px;white-space:nowrap}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.internal td{background:#eef4fb}
.sig{color:#0a6b2d;font-weight:600}.table-wrap{overflow-x:auto}
"""


@dataclass(frozen=True)
class Cell:
    """One (test site, model, metric) over folds and repeats."""

    value: float
    ci_low: float
    ci_high: float
    runs: int
    n: int
    internal: bool


Cells = Mapping[tuple[str, str, str, str], Cell]  # (test_site, arm, model, metric) -> Cell


# ------------------------------------------------------------------------------------------- reading input
def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _text(row: Row, key: str) -> str:
    value = row.get(key)
    return "" if value is None else str(value)


def _flag(value: object) -> bool:
    """A boolean column, also as read from CSV ("True", "1")."""
    return value.strip().lower() in ("true", "1", "yes") if isinstance(value, str) else bool(value)


def _ordered(preferred: object, seen: Iterable[str]) -> list[str]:
    """``preferred`` (a list from ``meta``) first, then the others in the order they were seen."""
    first = [str(x) for x in preferred] if isinstance(preferred, list | tuple) else []
    return list(dict.fromkeys([*first, *(s for s in seen if s)]))


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarise(results: Iterable[Row]) -> dict[tuple[str, str, str, str], Cell]:
    """``(test_site, arm, model, metric) -> Cell``: means over folds and repeats."""
    groups: dict[tuple[str, str, str, str], list[Row]] = {}
    for row in results:
        key = tuple(_text(row, k) for k in ("test_site", "arm", "model", "metric"))
        groups.setdefault(key, []).append(row)
    cells = {}
    for key, rows in groups.items():
        n = _mean([_float(row.get("n")) for row in rows])
        cells[key] = Cell(
            value=_mean([_float(row.get("value")) for row in rows]),
            ci_low=_mean([_float(row.get("ci_low")) for row in rows]),
            ci_high=_mean([_float(row.get("ci_high")) for row in rows]),
            runs=len(rows),
            n=round(n) if math.isfinite(n) else 0,
            internal=any(_flag(row.get("internal")) for row in rows),
        )
    return cells


def _models_by_arm(results: Sequence[Row], arms: Sequence[str]) -> list[tuple[str, str]]:
    """``(arm, model)`` pairs: arms in report order, models sorted within an arm."""
    pairs = {(_text(row, "arm"), _text(row, "model")) for row in results}
    return sorted(pairs, key=lambda p: (arms.index(p[0]) if p[0] in arms else len(arms), p[0], p[1]))


# --------------------------------------------------------------------------------------------- formatting
def _decimals(metric: str) -> int:
    return 1 if metric in (HD95_MM, HD95_AUTO) else 3


def _num(value: float, decimals: int = 3, sign: bool = False) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:+.{decimals}f}" if sign else f"{value:.{decimals}f}"


def _interval(low: float, high: float, decimals: int) -> str:
    if not (math.isfinite(low) or math.isfinite(high)):
        return ""
    return f" [{_num(low, decimals)}, {_num(high, decimals)}]"


def _p_value(p: float) -> str:
    if not math.isfinite(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _model_name(arm: str, model: str) -> str:
    return arm if model in ("", arm) else model


# ------------------------------------------------------------------------------------------------- sections
def _meta_section(meta: Mapping[str, object], sites: Sequence[str], arms: Sequence[str]) -> str:
    e = html.escape
    items = [
        ("Created", e(str(meta.get("created") or "n/a"))),
        ("Test sites", e(", ".join(sites) or "n/a")),
        ("Arms", e(", ".join(arms) or "n/a")),
        ("Model selection", e(str(meta.get("selection_rule") or "n/a"))),
    ]
    out = ['<dl class="meta">', *(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items), "</dl>"]
    notes = meta.get("notes")
    if isinstance(notes, list | tuple) and notes:
        out += ["<h3>Notes</h3><ul>", *(f"<li>{e(str(note))}</li>" for note in notes), "</ul>"]
    return "\n".join(out)


def _best_sentence(cells: Cells, site: str, metric: str, pairs: Pairs) -> str:
    found = ((cells.get((site, arm, model, metric)), arm, model) for arm, model in pairs)
    scored = [
        (cell, arm, model) for cell, arm, model in found if cell is not None and math.isfinite(cell.value)
    ]
    label, decimals = _label(metric), _decimals(metric)
    if not scored:
        return f"At {site}, the best {label}: n/a (no values)."
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    scored.sort(key=lambda s: sign * s[0].value)
    best, arm, model = scored[0]
    where = "internal" if best.internal else "external"
    name = arm if model in ("", arm) else f"{arm} ({model})"
    text = f"At {site}, the best {label} is {name}: {_num(best.value, decimals)} ({where})"
    if len(scored) > 1:
        runner, arm2, model2 = scored[1]
        text += f"; next {_model_name(arm2, model2)}: {_num(runner.value, decimals)}"
    return text + "."


def _comparison_sentence(row: Row) -> str:
    metric = _text(row, "metric")
    decimals, p = _decimals(metric), _float(row.get("p_value"))
    verdict = (
        "significance n/a" if not math.isfinite(p) else ("significant" if p < ALPHA else "not significant")
    )
    method = f" ({_text(row, 'method')})" if _text(row, "method") else ""
    return (
        f"{_text(row, 'arm_a')} vs {_text(row, 'arm_b')} at {_text(row, 'test_site')}: {_label(metric)} "
        f"{_num(_float(row.get('diff')), decimals, sign=True)}"
        f"{_interval(_float(row.get('ci_low')), _float(row.get('ci_high')), decimals)}, "
        f"{_p_value(p)}, {verdict}{method}"
    )


def _findings_section(cells: Cells, sites: Sequence[str], pairs: Pairs, comparisons: Sequence[Row]) -> str:
    e = html.escape
    present = {key[3] for key in cells}
    metrics = [m for m in FINDING_METRICS if m != DICE_AUTO or m in present]
    best = [_best_sentence(cells, site, metric, pairs) for site in sites for metric in metrics]
    out = ['<h3>Best arm per test site</h3><ul class="best">', *(f"<li>{e(s)}</li>" for s in best), "</ul>"]
    out.append(f"<h3>Paired comparisons (significance at {ALPHA})</h3>")
    if not comparisons:
        out.append('<p class="na">n/a: no paired comparisons in this study.</p>')
        return "\n".join(out)
    out.append('<ul class="comparisons">')
    for row in comparisons:
        sentence, p = _comparison_sentence(row), _float(row.get("p_value"))
        css = ' class="sig"' if math.isfinite(p) and p < ALPHA else ""
        out.append(f"<li{css}>{e(sentence)}</li>")
    return "\n".join([*out, "</ul>"])


def _mcnemar_section(comparisons: Sequence[Row]) -> str:
    """Each arm against the reference arm at every test site: McNemar's discordant counts and p-value."""
    rows = [row for row in comparisons if _text(row, "metric") == ACCURACY and row.get("only_a") is not None]
    if not rows:
        return '<p class="na">n/a: no McNemar tests (no cases with a label and a call from both arms).</p>'
    e = html.escape
    heads = [
        "Test site",
        "Arm A",
        "Arm B",
        "Cases",
        "Only A right",
        "Only B right",
        "Accuracy A − B",
        "Test",
        "p",
    ]
    out = ['<div class="table-wrap"><table class="mcnemar">', "<thead><tr>"]
    out += [*(f"<th>{e(h)}</th>" for h in heads), "</tr></thead><tbody>"]
    for row in rows:
        p = _float(row.get("p_value"))
        diff = _num(_float(row.get("diff")), 3, sign=True)
        diff += _interval(_float(row.get("ci_low")), _float(row.get("ci_high")), 3)
        texts = [_text(row, k) for k in ("test_site", "arm_a", "arm_b")]
        numbers = [_text(row, k) or "n/a" for k in ("n", "only_a", "only_b")] + [diff]
        css = ' class="sig"' if math.isfinite(p) and p < ALPHA else ""
        tds = "".join(f"<td>{e(t)}</td>" for t in texts) + "".join(
            f'<td class="num">{e(t)}</td>' for t in numbers
        )
        out.append(f"<tr{css}>{tds}<td>{e(_text(row, 'method'))}</td><td>{e(_p_value(p))}</td></tr>")
    return "\n".join([*out, "</tbody></table></div>"])


def _table_section(cells: Cells, sites: Sequence[str], pairs: Pairs, metrics: Sequence[str]) -> str:
    e = html.escape
    if not metrics or not pairs:
        return '<p class="na">n/a: no results.</p>'
    head = "".join(
        f"<th>{e(h)}</th>" for h in ["Test site", "Arm", "Model", "Site data", *map(_label, metrics)]
    )
    out = ['<div class="table-wrap"><table class="results">', f"<thead><tr>{head}</tr></thead><tbody>"]
    for site in sites:
        for arm, model in pairs:
            row_cells = [cells.get((site, arm, model, m)) for m in metrics]
            if not any(row_cells):
                continue
            status = "internal" if any(c.internal for c in row_cells if c) else "external"
            tds = "".join(f"<td>{td}</td>" for td in (e(site), e(arm), e(model), status))
            nums = "".join(_table_cell(c, _decimals(m)) for m, c in zip(metrics, row_cells, strict=True))
            out.append(f'<tr class="{status}">{tds}{nums}</tr>')
    return "\n".join([*out, "</tbody></table></div>"])


def _table_cell(cell: Cell | None, decimals: int) -> str:
    if cell is None or not math.isfinite(cell.value):
        return '<td class="num na">n/a</td>'
    text = _num(cell.value, decimals) + _interval(cell.ci_low, cell.ci_high, decimals)
    tip = f"n = {cell.n} cases, {cell.runs} run(s)"
    return f'<td class="num" title="{html.escape(tip)}">{html.escape(text)}</td>'


def _figure(uri: str | None, alt: str, caption: str, missing: str) -> str:
    e = html.escape
    if uri is None:
        return f'<p class="na">n/a: {e(missing)}</p>'
    return f'<figure><img alt="{e(alt)}" src="{uri}"><figcaption>{e(caption)}</figcaption></figure>'


def _safe_figure(draw: Callable[[], str | None], name: str) -> str | None:
    """Draw one figure; a failure becomes a warning and "n/a", so one bad figure never loses the report."""
    try:
        return draw()
    except Exception as error:  # reported in the page and as a warning
        warnings.warn(f"study report: could not draw the {name}: {error!r}", RuntimeWarning, stacklevel=2)
        return None


def _heatmap(cells: Cells, sites: Sequence[str], pairs: Pairs, metric: str) -> str | None:
    values = np.full((len(sites), len(pairs)), np.nan)
    internal = np.zeros(values.shape, dtype=bool)
    for r, site in enumerate(sites):
        for c, (arm, model) in enumerate(pairs):
            cell = cells.get((site, arm, model, metric))
            if cell is not None:
                values[r, c], internal[r, c] = cell.value, cell.internal
    labels = [_model_name(arm, model) for arm, model in pairs]
    title = f"{_label(metric)} (mean over folds × repeats; * = internal)"
    return figures.heatmap_figure(values, internal, row_labels=sites, col_labels=labels, title=title)


def _no_roc(rows: Sequence[CaseRow], sites: Sequence[str]) -> str:
    skipped = figures.roc_skipped(rows, sites)
    return "".join(f" No ROC at {site}: {why}." for site, why in skipped.items())


def _figure_sections(
    cells: Cells, sites: list[str], arms: list[str], pairs: Pairs, rows: list[CaseRow]
) -> list[str]:
    internal = "Starred, red-outlined cells: the model saw this site's training data (internal)."
    split = "Arms holding both internal and external models are split: solid internal, dashed external."
    per_case = "Dice after the last click, per case (all test sites, models, folds and repeats)."
    no_probs = "no cases with both a label and a probability."

    def boxes(key: Callable[[CaseRow], str | None], title: str) -> Callable[[], str | None]:
        return lambda: figures.stratum_boxplot_figure(rows, arms, key=key, title=title)

    specs: list[tuple[str, str, Callable[[], str | None], str, str]] = [
        ("Dice after one click", "Dice@1 heatmap",
         lambda: _heatmap(cells, sites, pairs, dice_click_name(1)), internal, "no Dice@1 values."),
        ("ROC AUC", "AUC heatmap", lambda: _heatmap(cells, sites, pairs, AUC), internal, "no AUC values."),
        ("ROC curves per test site", "ROC curves", lambda: figures.roc_figure(rows, sites, arms),
         f"Cases of all an arm's models, folds and repeats pooled. {split}{_no_roc(rows, sites)}", no_probs),
        ("Dice vs clicks", "Dice vs clicks", lambda: figures.dice_vs_clicks_figure(rows, arms),
         f"Mean over cases; a case whose clicking stopped early keeps its last Dice. {split}",
         "no Dice curves in the cases."),
        ("Dice by BI-RADS category and by lesion volume", "Dice by BI-RADS category",
         boxes(lambda r: r.birads, "Dice by BI-RADS category"), per_case, "no BI-RADS categories."),
        ("", "Dice by lesion volume",
         boxes(lambda r: r.volume_bin, "Dice by lesion volume (cm³)"), per_case, "no volume bins."),
        ("Calibration", "Calibration", lambda: figures.calibration_figure(rows, arms),
         f"{figures.CALIBRATION_BINS} equal-width probability bins; dashed: perfect calibration.", no_probs),
        ("Decision curves", "Decision curves", lambda: figures.decision_curve_figure(rows, arms),
         "Net benefit = TP/n − FP/n · pt/(1 − pt) of biopsying the lesions whose probability exceeds the "
         "threshold pt; an arm is useful where it lies above both treat-all and treat-none. "
         f"{split}", no_probs),
        ("Confusion matrices", "Confusion matrices", lambda: figures.confusion_matrix_figure(rows, arms),
         "Calls at each arm's threshold (train.cls-threshold); cases of all an arm's models, test sites, "
         "folds and repeats pooled.", "no cases with a label, a probability and a call."),
    ]  # fmt: skip
    out = []
    for heading, name, draw, caption, missing in specs:
        if heading:
            out.append(f"<h2>{html.escape(heading)}</h2>")
        out.append(_figure(_safe_figure(draw, name), name, caption, missing))
    return out


# --------------------------------------------------------------------------------------------------- page
def build_html(results: Sequence[Row], cases: Sequence[Row], comparisons: Sequence[Row], meta: Row) -> str:
    """The report page as one string (see :func:`render_report`)."""
    sites = _ordered(meta.get("sites"), (_text(r, "test_site") for r in [*results, *cases]))
    arms = _ordered(meta.get("arms"), (_text(r, "arm") for r in [*results, *cases]))
    cells = summarise(results)
    pairs = _models_by_arm(results, arms)
    seen_metrics = {key[3] for key in cells}
    metrics = [m for m in METRIC_LABELS if m in seen_metrics] + sorted(seen_metrics - set(METRIC_LABELS))
    internal = {(arm, model, site): cell.internal for (site, arm, model, _), cell in cells.items()}
    rows = figures.case_rows(cases, internal)
    title = html.escape(str(meta.get("title") or "Cross-site study"))
    body = [
        f"<h1>{title}</h1>",
        _meta_section(meta, sites, arms),
        "<h2>Findings</h2>",
        _findings_section(cells, sites, pairs, comparisons),
        "<h2>McNemar tests at the operating point</h2>",
        "<p>Each arm against the reference arm on the same labelled test cases, with every model calling "
        "malignant above its threshold: the exact binomial test when fewer than "
        f"{MCNEMAR_EXACT_BELOW} cases are called right by only one of the two, else the continuity-corrected "
        "chi-square.</p>",
        _mcnemar_section(comparisons),
        *_figure_sections(cells, sites, arms, pairs, rows),
        "<h2>Table of numbers</h2>",
        "<p>Mean over folds and repeats [mean of the runs' 95% CI bounds]; HD95 in mm. Shaded rows: internal "
        "(the model saw this site's training data). Hover a cell for its number of cases and runs.</p>",
        _table_section(cells, sites, pairs, metrics),
    ]
    head = f'<meta charset="utf-8"><title>{title}</title><style>{_CSS}</style>'
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head><body>\n'
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def render_report(
    results: Iterable[Row], cases: Iterable[Row], comparisons: Iterable[Row], meta: Row, out_path: str | Path
) -> Path:
    """Write the study's self-contained HTML report to ``out_path`` atomically and return its path.

    See the module docstring for the rows' columns. Missing metrics, NaN values, a single arm or site and
    cases without labels render as "n/a"; a figure that fails to draw becomes "n/a" and a ``RuntimeWarning``.
    """
    page = build_html(list(results), list(cases), list(comparisons), meta)
    out = Path(out_path)
    write_text_atomic(out, page, fsync=True, mode=0o644)
    return out
