"""Convert a site folder (either layout, DICOM series included) into a canonical manifest-layout folder.

Output (``OUT``)::

    OUT/manifest.csv            case_id, image, mask, label (benign|malignant), split, birads
    OUT/images/<case>.nii.gz    the image, site spacing/direction overrides applied, voxel type kept
    OUT/masks/<case>.nii.gz     the mask as uint8 0/1 on exactly the image's grid
    OUT/.fedabus-prepare.json   what was converted from what (makes re-runs skip up-to-date cases)

The source is only read. Each case is validated first (:func:`~shared.data.validate.validate_case`) and
skipped with its validation errors when it has any. Re-running converts only cases whose source files, site
overrides or outputs changed; every file is written atomically, so an interrupted run leaves no partial file.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from shared.atomic import write_text_atomic
from shared.config import SiteConfig
from shared.data.io import VolumeReadError, is_temp_file, read_volume, write_volume
from shared.data.layouts import MANIFEST_NAME, CaseRecord, SiteIndex, discover_site
from shared.data.validate import case_fingerprint, validate_case

__all__ = ["PrepareError", "PrepareResult", "prepare_site"]

STATE_NAME = ".fedabus-prepare.json"
_STATE_VERSION = 1
_MANIFEST_COLUMNS = ("case_id", "image", "mask", "label", "split", "birads")
#: Paths this tool writes (only such paths recorded in the state file are ever deleted).
_OUTPUT_PATH = re.compile(r"(images|masks)/[A-Za-z0-9._-]+\.nii\.gz")


class PrepareError(ValueError):
    """The source/output folders cannot be used (e.g. the output lies inside the source)."""


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare_site` did; case ids as written in the source CSV."""

    out_dir: Path
    manifest: Path
    layout: str
    written: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        """Human-readable report: counts, then each skipped case with its reasons."""
        lines = [
            f"prepared {self.out_dir} from a {self.layout}-layout site: {len(self.written)} written, "
            f"{len(self.up_to_date)} up to date (skipped, unchanged), {len(self.skipped)} skipped as invalid"
        ]
        for case_id, reasons in self.skipped.items():
            lines += [
                f"  skipped {case_id}: {reason.removeprefix(f'case {case_id!r}: ')}" for reason in reasons
            ]
        for case_id, messages in self.warnings.items():
            lines += [f"  warning {case_id}: {m.removeprefix(f'case {case_id!r}: ')}" for m in messages]
        lines += [
            f"  removed stale outputs of {case_id} (no longer usable in the source)"
            for case_id in self.removed
        ]
        return lines


# ---------------------------------------------------------------- fingerprints and state


def _load_state(out_dir: Path) -> dict[str, dict[str, str]]:
    try:
        state = json.loads((out_dir / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        return {}
    cases = state.get("cases")
    return cases if isinstance(cases, dict) else {}


# ---------------------------------------------------------------- folders


def _check_folders(source: Path, out: Path) -> None:
    if not source.is_dir():
        raise PrepareError(f"{source}: source site folder does not exist")
    source_r, out_r = source.resolve(), out.resolve()
    if out_r == source_r or source_r in out_r.parents:
        raise PrepareError(
            f"{out}: output folder lies inside the source {source}; choose a folder outside it"
        )
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder")


def _remove_leftover_temps(out: Path) -> None:
    for folder in (out, out / "images", out / "masks"):
        if folder.is_dir():
            for path in folder.iterdir():
                if is_temp_file(path):
                    path.unlink(missing_ok=True)


def _file_stems(index: SiteIndex) -> list[str]:
    """Output file stem of every case: the case id made file-name safe, unique within the site."""
    stems: list[str] = []
    for case in index.cases:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", case.case_id).strip("._") or "case"
        candidate, n = stem, 2
        while candidate.lower() in (s.lower() for s in stems):
            candidate, n = f"{stem}-{n}", n + 1
        stems.append(candidate)
    return stems


# ---------------------------------------------------------------- one case


def _convert(case: CaseRecord, site_config: SiteConfig | None, image_out: Path, mask_out: Path) -> None:
    """Write one case's image (voxel type kept) and mask (uint8 on the image's exact grid)."""
    image = read_volume(case.image, site_config=site_config)
    write_volume(image, image_out)
    if case.mask is None:
        raise PrepareError(f"case {case.case_id!r}: no mask")
    mask = read_volume(case.mask, site_config=site_config)
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    mask.CopyInformation(image)
    del image
    write_volume(mask, mask_out)


def _manifest_text(rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def prepare_site(
    source_dir: str | Path,
    out_dir: str | Path,
    site_config: SiteConfig | None = None,
    *,
    progress: Callable[[int, int, str], None] | None = None,
) -> PrepareResult:
    """Convert ``source_dir`` (either layout) into a manifest-layout folder of ``.nii.gz`` at ``out_dir``.

    Never writes inside ``source_dir``. Cases whose outputs are up to date are not re-validated or rewritten;
    invalid cases are skipped with their validation errors. ``progress(i, n, case_id)`` is called per case.
    Raises PrepareError / SiteLayoutError for unusable folders only.
    """
    source, out = Path(source_dir), Path(out_dir)
    _check_folders(source, out)
    index = discover_site(source, site_config)
    out.mkdir(parents=True, exist_ok=True)
    _remove_leftover_temps(out)
    previous = _load_state(out)
    result = PrepareResult(out, out / MANIFEST_NAME, index.layout)
    state: dict[str, dict[str, str]] = {}
    rows: list[dict[str, str]] = []
    for number, (case, stem) in enumerate(zip(index.cases, _file_stems(index), strict=True)):
        if progress is not None:
            progress(number + 1, len(index.cases), case.case_id)
        entry = _prepare_case(case, stem, index, number, site_config, out, previous, result)
        if entry is not None:
            state[case.case_id] = entry
            rows.append(_manifest_row(case, entry))
    _remove_stale(out, previous, state, result)
    write_text_atomic(out / MANIFEST_NAME, _manifest_text(rows), fsync=True)
    write_text_atomic(
        out / STATE_NAME, json.dumps({"version": _STATE_VERSION, "cases": state}, indent=1), fsync=True
    )
    return result


def _prepare_case(
    case: CaseRecord,
    stem: str,
    index: SiteIndex,
    number: int,
    site_config: SiteConfig | None,
    out: Path,
    previous: dict[str, dict[str, str]],
    result: PrepareResult,
) -> dict[str, str] | None:
    """Convert one case unless up to date; return its state entry, or None when it is skipped as invalid."""
    problems = index.problems_of(number)
    fingerprint = case_fingerprint(case, site_config)
    entry = {"fingerprint": fingerprint, "image": f"images/{stem}.nii.gz", "mask": f"masks/{stem}.nii.gz"}
    old = previous.get(case.case_id)
    if not problems and old == entry and (out / entry["image"]).is_file() and (out / entry["mask"]).is_file():
        result.up_to_date.append(case.case_id)
        return entry
    check = validate_case(case, site_config, row_problems=problems, row_warnings=index.notes_of(number))
    if check.warnings:
        result.warnings[case.case_id] = check.warnings
    if not check.ok:
        reasons = result.skipped.setdefault(case.case_id, [])
        reasons.extend(e for e in check.errors if e not in reasons)
        return None
    try:
        _convert(case, site_config, out / entry["image"], out / entry["mask"])
    except (VolumeReadError, PrepareError) as exc:  # e.g. the source changed since it was validated
        result.skipped.setdefault(case.case_id, []).append(f"case {case.case_id!r}: {exc}")
        return None
    result.written.append(case.case_id)
    return entry


def _manifest_row(case: CaseRecord, entry: dict[str, str]) -> dict[str, str]:
    return {
        "case_id": case.case_id,
        "image": entry["image"],
        "mask": entry["mask"],
        "label": "malignant" if case.label == 1 else "benign",
        "split": case.split,
        "birads": case.birads or "",
    }


def _remove_stale(
    out: Path, previous: dict[str, dict[str, str]], state: dict[str, dict[str, str]], result: PrepareResult
) -> None:
    """Delete outputs this tool wrote earlier for cases that are no longer usable (never other files)."""
    kept = {entry[kind] for entry in state.values() for kind in ("image", "mask")}
    for case_id, entry in previous.items():
        stale = [entry.get(kind, "") for kind in ("image", "mask")]
        stale = [
            rel for rel in stale if _OUTPUT_PATH.fullmatch(rel) and rel not in kept and (out / rel).is_file()
        ]
        for rel in stale:
            (out / rel).unlink()
        if stale and case_id not in state:
            result.removed.append(case_id)
