"""The study report: one self-contained HTML page from a small synthetic 3-site, 3-arm study."""

from __future__ import annotations

import base64
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from shared import atomic
from shared.study import report
from shared.study.figures import _reliability
from shared.study.report import render_report

SITES = ["site_a", "site_b", "site_c"]
ARMS = ["local", "federated", "pooled"]
BIRADS = ["3", "4A", "4B", "5"]
VOLUME_BINS = ["0-5", "5-20", "20-100"]
# Federated is best everywhere: the findings must say so.
DICE_1 = {"local": 0.70, "federated": 0.80, "pooled": 0.78}
AUC = {"local": 0.72, "federated": 0.86, "pooled": 0.83}
FIGURES = 9  # two heatmaps, ROC, Dice vs clicks, two box plots, calibration, decision curves, confusion
PER_CASE_CLS_FIGURES = 4  # ROC, calibration, decision curves, confusion matrices: need labelled cases
DATA_PNG = re.compile(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _models(arm: str) -> list[str]:
    return [f"local:{site}" for site in SITES] if arm == "local" else [arm]


def _internal(model: str, site: str) -> bool:
    return model in ("federated", "pooled") or model == f"local:{site}"


def _study(cases_per_site: int = 20, folds: int = 2, seed: int = 0) -> tuple[list, list, list, dict]:
    rng = np.random.default_rng(seed)
    results, cases = [], []
    for arm in ARMS:
        for model in _models(arm):
            for fold in range(folds):
                for site in SITES:
                    internal = _internal(model, site)
                    bonus = 0.03 if internal else 0.0
                    common = {"arm": arm, "model": model, "fold": fold, "repeat": 0, "test_site": site}
                    for metric, value, width in (
                        ("dice_1click", DICE_1[arm] + bonus, 0.03),
                        ("dice_5click", DICE_1[arm] + bonus + 0.1, 0.03),
                        ("hd95_mm", 12.0 - 10 * bonus, 2.0),
                        ("auc", AUC[arm] + bonus, 0.05),
                        ("sensitivity", 0.8, 0.1),
                    ):
                        row = {
                            "metric": metric,
                            "value": value,
                            "ci_low": value - width,
                            "ci_high": value + width,
                        }
                        results.append({**common, "internal": internal, "n": cases_per_site, **row})
                    for i in range(cases_per_site):
                        label = i % 2
                        logit = (2 * label - 1) * 3 * (AUC[arm] - 0.5) * 2 + rng.normal(0, 1)
                        start = DICE_1[arm] + bonus + rng.normal(0, 0.05)
                        clicks = 5 if i % 4 else 3  # some cases stop early: padded with their last Dice
                        curve = [min(0.99, start + 0.03 * k) for k in range(clicks)]
                        cases.append({
                            **common, "case_id": f"{site}-{i:03d}", "label": label,
                            "prob": float(1 / (1 + math.exp(-logit))), "pred": int(logit > 0), "dice_curve": curve,
                            "hd95_mm": float(rng.uniform(3, 20)), "birads": BIRADS[i % 4],
                            "volume_bin": VOLUME_BINS[i % 3],
                        })  # fmt: skip
    comparisons = []
    for site in SITES:
        pair = {"test_site": site, "arm_a": "federated"}
        comparisons.append({**pair, "metric": "dice_1click", "arm_b": "local", "diff": 0.042, "ci_low": 0.010,
                            "ci_high": 0.071, "p_value": 0.012, "method": "paired bootstrap"})  # fmt: skip
        comparisons.append({**pair, "metric": "auc", "arm_b": "pooled", "diff": 0.03, "ci_low": -0.02,
                            "ci_high": 0.08, "p_value": 0.31, "method": "DeLong"})  # fmt: skip
        comparisons.append({**pair, "metric": "accuracy", "arm_b": "local", "diff": 0.15, "ci_low": 0.02,
                            "ci_high": 0.28, "p_value": 0.0213, "method": "exact McNemar (binomial)", "n": 40,
                            "only_a": 9, "only_b": 3})  # fmt: skip
    meta = {
        "title": "Synthetic cross-site study",
        "created": "2025-01-02T03:04:05+00:00",
        "sites": SITES,
        "arms": ARMS,
        "selection_rule": "last round",
        "notes": ["pooled is a research upper bound: it needs all sites' data in one place"],
    }
    return results, cases, comparisons, meta


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report") / "nested" / "report.html"
    assert render_report(*_study(), out) == out
    return out, out.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    start = text.index(f"<h2>{heading}</h2>")
    end = text.find("<h2>", start + 1)
    return text[start : end if end > 0 else None]


def test_the_page_is_self_contained_with_every_figure_embedded_as_png(page: tuple[Path, str]) -> None:
    out, text = page
    assert text.startswith("<!DOCTYPE html>")
    assert 'src="http' not in text and "<link" not in text and "<script" not in text
    assert "url(" not in text  # no CSS fetches (fonts, images) either
    images = DATA_PNG.findall(text)
    assert len(images) == FIGURES
    assert all(base64.b64decode(image).startswith(PNG_SIGNATURE) for image in images)
    assert "could not draw" not in text and 'class="na"' not in text
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left behind


def test_the_header_shows_title_date_sites_arms_rule_and_notes(page: tuple[Path, str]) -> None:
    text = page[1]
    for expected in ("Synthetic cross-site study", "2025-01-02T03:04:05+00:00", "site_a, site_b, site_c",
                     "local, federated, pooled", "last round", "research upper bound"):  # fmt: skip
        assert expected in text


def test_the_table_holds_every_site_and_model_with_intervals(page: tuple[Path, str]) -> None:
    table = _section(page[1], "Table of numbers")
    rows = re.findall(r'<tr class="(internal|external)"><td>(\w+)</td><td>(\w+)</td><td>([\w:]+)</td>', table)
    expected = {(site, arm, model) for site in SITES for arm in ARMS for model in _models(arm)}
    assert {row[1:] for row in rows} == expected and len(rows) == len(expected)
    status = {row[1:]: row[0] for row in rows}
    assert status[("site_a", "local", "local:site_a")] == "internal"
    assert status[("site_a", "local", "local:site_b")] == "external"
    # Dice@1 of federated at a site: mean of 2 folds, its interval the mean of their bounds.
    assert ">0.830 [0.800, 0.860]<" in table
    assert re.search(r">\d+\.\d \[\d+\.\d, \d+\.\d\]<", table)  # HD95 in mm to one decimal
    assert "<th>Dice@1</th>" in table and "<th>HD95 (mm)</th>" in table and "<th>AUC</th>" in table


def test_the_findings_name_the_best_arm_and_the_significant_differences(page: tuple[Path, str]) -> None:
    findings = _section(page[1], "Findings")
    for site in SITES:
        assert f"At {site}, the best Dice@1 is federated: 0.830 (internal)" in findings
        assert f"At {site}, the best AUC is federated: 0.890 (internal)" in findings
        assert (
            f"federated vs local at {site}: Dice@1 +0.042 [0.010, 0.071], p = 0.012, significant" in findings
        )
        assert (
            f"federated vs pooled at {site}: AUC +0.030 [-0.020, 0.080], p = 0.310, not significant"
            in findings
        )


def test_the_mcnemar_table_has_each_arm_against_the_reference_with_discordant_counts(
    page: tuple[Path, str],
) -> None:
    section = _section(page[1], "McNemar tests at the operating point")
    numbers = '<td class="num">40</td><td class="num">9</td><td class="num">3</td>'
    numbers += '<td class="num">+0.150 [0.020, 0.280]</td>'
    for site in SITES:
        names = f"<td>{site}</td><td>federated</td><td>local</td>"
        assert f"{names}{numbers}<td>exact McNemar (binomial)</td><td>p = 0.021</td>" in section
    assert section.count('<tr class="sig">') == len(SITES) and "p = 0.021" in section
    assert "fewer than 25 cases" in section


def test_decision_curves_and_confusion_matrices_are_drawn(page: tuple[Path, str]) -> None:
    for heading in ("Decision curves", "Confusion matrices"):
        section = _section(page[1], heading)
        assert len(DATA_PNG.findall(section)) == 1 and f'alt="{heading}"' in section
    assert "treat-all and treat-none" in _section(page[1], "Decision curves")


def test_without_mcnemar_rows_the_table_says_n_a(tmp_path: Path) -> None:
    results, _, comparisons, meta = _study(cases_per_site=6, folds=1)
    kept = [row for row in comparisons if row["metric"] != "accuracy"]
    text = render_report(results, [], kept, meta, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "n/a: no McNemar tests" in _section(text, "McNemar tests at the operating point")


def test_every_string_from_the_study_is_escaped(tmp_path: Path) -> None:
    results, _, comparisons, meta = _study(cases_per_site=6, folds=1)
    meta = {**meta, "title": "<script>alert(1)</script>", "notes": ["a < b & c"]}
    comparisons[0] = {**comparisons[0], "method": "<b>bold</b>"}
    text = render_report(results, [], comparisons, meta, tmp_path / "r.html").read_text(encoding="utf-8")  # no cases: fast
    assert "<script>" not in text and "<b>bold</b>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "a &lt; b &amp; c" in text


def _one_arm(study):
    results, cases, comparisons, meta = study
    keep = lambda rows: [r for r in rows if r["arm"] == "federated"]
    return keep(results), keep(cases), [], {**meta, "arms": ["federated"]}


def _one_site(study):
    results, cases, comparisons, meta = study
    keep = lambda rows: [r for r in rows if r["test_site"] == "site_b"]
    return keep(results), keep(cases), keep(comparisons), {**meta, "sites": ["site_b"]}


def _one_class(study):
    results, cases, comparisons, meta = study
    return results, [{**c, "label": 0} for c in cases], comparisons, meta


def _no_labels(study):
    results, cases, comparisons, meta = study
    return results, [{**c, "label": None, "prob": None} for c in cases], comparisons, meta


def _nans(study):
    results, cases, comparisons, meta = study
    nan = math.nan
    results = [{**r, "value": nan, "ci_low": nan, "ci_high": nan} for r in results]
    cases = [{**c, "prob": nan, "hd95_mm": nan, "dice_curve": [nan, nan], "birads": None} for c in cases]
    comparisons = [{**c, "diff": nan, "p_value": nan, "ci_low": nan} for c in comparisons]
    return results, cases, comparisons, meta


def _no_cases(study):
    results, _, comparisons, meta = study
    return results, [], comparisons, meta


def _missing_metrics(study):
    results, cases, comparisons, meta = study
    results = [r for r in results if r["metric"] not in ("auc", "dice_1click")]
    return results, [{k: v for k, v in c.items() if k != "dice_curve"} for c in cases], comparisons, meta


def _nothing(study):
    return [], [], [], {}


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    ("make", "figures", "expected"),
    [
        (_one_arm, FIGURES, ["the best Dice@1 is federated", "n/a: no paired comparisons"]),
        (_one_site, FIGURES, ["At site_b, the best AUC is federated"]),
        (_one_class, FIGURES, ["No ROC at site_a: one class only."]),  # ROC image with titled, empty panels
        (_no_labels, FIGURES - PER_CASE_CLS_FIGURES, ["n/a: no cases with both a label and a probability."]),
        (
            _nans,
            0,
            ["best Dice@1: n/a", "Dice@1 n/a [n/a, 0.071], p = n/a, significance n/a", "no Dice@1 values."],
        ),
        (_no_cases, 2, ["n/a: no Dice curves in the cases.", "n/a: no BI-RADS categories."]),
        (
            _missing_metrics,
            PER_CASE_CLS_FIGURES,
            ["the best AUC: n/a", "n/a: no AUC values.", "n/a: no Dice curves"],
        ),
        (_nothing, 0, ["Cross-site study", "n/a: no results.", "n/a: no paired comparisons"]),
    ],
)
def test_degenerate_studies_render_with_n_a(tmp_path: Path, make, figures: int, expected: list[str]) -> None:
    text = render_report(*make(_study(cases_per_site=8, folds=1)), tmp_path / "r.html").read_text(encoding="utf-8")
    assert len(DATA_PNG.findall(text)) == figures
    assert "could not draw" not in text
    for phrase in expected:
        assert phrase in text, phrase


def test_a_failed_write_keeps_the_old_report_and_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "report.html"
    out.write_text("old")

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        render_report([], [], [], {}, out)
    assert out.read_text(encoding="utf-8") == "old" and [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_cells_average_folds_and_read_flags_written_as_text() -> None:
    common = {"arm": "local", "model": "local:site_a", "test_site": "site_a", "metric": "auc", "n": 10}
    rows = [
        {**common, "fold": 0, "internal": "True", "value": 0.7, "ci_low": 0.6, "ci_high": 0.8},
        {**common, "fold": 1, "internal": "True", "value": 0.9, "ci_low": math.nan, "ci_high": 1.0},
        {**common, "test_site": "site_b", "internal": "False", "value": "bad", "ci_low": None},
    ]
    cells = report.summarise(rows)
    a, b = (
        cells[("site_a", "local", "local:site_a", "auc")],
        cells[("site_b", "local", "local:site_a", "auc")],
    )
    assert (a.value, a.ci_low, a.ci_high, a.runs, a.n, a.internal) == pytest.approx(
        (0.8, 0.6, 0.9, 2, 10, True)
    )
    assert math.isnan(b.value) and not b.internal


def test_the_reliability_bins_and_ece() -> None:
    probs = np.array([0.05, 0.05, 0.95, 0.95, 1.0])
    labels = np.array([0.0, 1.0, 1.0, 1.0, 1.0])
    confidence, observed, ece = _reliability(labels, probs)
    np.testing.assert_allclose(confidence, [0.05, (0.95 + 0.95 + 1.0) / 3])
    np.testing.assert_allclose(observed, [0.5, 1.0])
    assert ece == pytest.approx(0.4 * 0.45 + 0.6 * (1.0 - 2.9 / 3))


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)"
)
def test_a_headless_browser_renders_the_page_with_its_images(page: tuple[Path, str], tmp_path: Path) -> None:
    import matplotlib.image

    out = page[0]
    base = ["chromium", *CHROMIUM_FLAGS]
    shot = tmp_path / "shot.png"
    run = lambda *args, profile: subprocess.run(
        [*base, f"--user-data-dir={tmp_path / profile}", *args, f"file://{out}"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120, check=False,
    )  # fmt: skip
    screenshot = run(f"--screenshot={shot}", "--window-size=1280,2000", profile="profile-shot")
    assert shot.is_file(), screenshot.stderr[-2000:]
    assert shot.stat().st_size > 50_000
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 0.05 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # not one flat colour
    saturated = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.4
    assert saturated.mean() > 0.01  # the heatmaps' colours; broken images would leave text only (< 0.1%)
    dom = run("--dump-dom", profile="profile-dom")
    assert len(DATA_PNG.findall(dom.stdout)) == FIGURES, dom.stderr[-2000:]
