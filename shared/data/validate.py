"""Check every case of a site and report each problem with the case id, the file and the reason.

Errors (the case is unusable): missing, empty, unreadable (permissions) or truncated file, or a folder where
a file should be; a volume that is not 3D grey-level or has a zero-size dimension; NaN/Inf intensities;
image/mask geometry mismatch (size, spacing, origin, direction beyond tolerance); empty or non-binary mask;
unknown label value; unknown split; duplicate case id. Warnings (the case is usable): placeholder header
spacing such as TDSC's (1, 1, 1) mm when the site config does not override it, implausible physical extent,
constant image.

Voxels are read one case at a time, image then mask, and scanned in slabs so that a check never holds more
than one volume in memory. Training and evaluation call :func:`usable_cases`, which runs the same checks and
logs how many cases it skips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from shared.atomic import write_text_atomic
from shared.config import SiteConfig
from shared.data.io import (
    VolumeHeader,
    VolumeReadError,
    check_file_complete,
    count_nonfinite,
    read_header,
    read_volume,
    volume_shape_problem,
)
from shared.data.layouts import CaseRecord, SiteIndex, discover_site, missing_file_problem, parse_split

__all__ = [
    "CaseCheck",
    "CaseResult",
    "DIRECTION_ATOL",
    "ORIGIN_TOL_VOXELS",
    "SPACING_RTOL",
    "ValidationReport",
    "case_fingerprint",
    "geometry_mismatches",
    "usable_cases",
    "validate_case",
    "validate_site",
]

logger = logging.getLogger(__name__)

#: Relative tolerance on each spacing component (image vs mask).
SPACING_RTOL = 1e-3
#: Origin tolerance as a fraction of the smallest voxel side (image vs mask).
ORIGIN_TOL_VOXELS = 0.01
#: Absolute tolerance on each direction-matrix element (image vs mask).
DIRECTION_ATOL = 1e-3
#: A physical extent (mm) above this on any axis is implausible for a breast ultrasound volume (warning).
MAX_PLAUSIBLE_EXTENT_MM = 400.0
#: Bump when the checks change, so that cached results (validate_site's ``cache``) are recomputed.
_CHECKS_VERSION = 1
#: Distinct mask values named in a non-binary-mask error.
_MAX_VALUES_SHOWN = 10
#: Voxels scanned per slab (bounds the temporaries of the intensity checks).
_SLAB_VOXELS = 1 << 22


@dataclass(frozen=True)
class CaseResult:
    """Outcome of checking one case; ``ok`` is False when there is at least one error."""

    case_id: str
    ok: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "case_id": self.case_id,
            "ok": self.ok,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class ValidationReport:
    """Results of :func:`validate_site`, one per case in CSV order; ``results[i]`` is about ``cases[i]``."""

    site: str
    layout: str
    site_dir: Path
    cases: tuple[CaseRecord, ...]
    results: tuple[CaseResult, ...]

    @property
    def ok(self) -> bool:
        """True when no case has an error."""
        return all(r.ok for r in self.results)

    @property
    def num_bad(self) -> int:
        return sum(not r.ok for r in self.results)

    def to_dict(self) -> dict[str, object]:
        """The ``--json`` object (case ids as written in the CSV).

        ``{"site": str, "layout": str, "cases": [{"case_id", "ok", "errors", "warnings"}]}``
        """
        return {"site": self.site, "layout": self.layout, "cases": [r.to_dict() for r in self.results]}

    def to_json(self, *, indent: int | None = 2) -> str:
        """The JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)


# ---------------------------------------------------------------- geometry


def geometry_mismatches(image: VolumeHeader, mask: VolumeHeader) -> list[str]:
    """Differences between image and mask grids beyond the tolerances (empty when they match)."""
    if image.size != mask.size:
        return [f"size {mask.size} differs from the image's {image.size} (x, y, z voxels)"]
    problems = []
    if any(
        not math.isclose(a, b, rel_tol=SPACING_RTOL, abs_tol=1e-9)
        for a, b in zip(image.spacing, mask.spacing, strict=True)
    ):
        problems.append(f"spacing {_fmt(mask.spacing)} differs from the image's {_fmt(image.spacing)} mm")
    origin_tol = ORIGIN_TOL_VOXELS * min(image.spacing)
    if any(abs(a - b) > origin_tol for a, b in zip(image.origin, mask.origin, strict=True)):
        problems.append(f"origin {_fmt(mask.origin)} differs from the image's {_fmt(image.origin)} mm")
    if any(abs(a - b) > DIRECTION_ATOL for a, b in zip(image.direction, mask.direction, strict=True)):
        problems.append(f"direction {_fmt(mask.direction)} differs from the image's {_fmt(image.direction)}")
    return problems


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


# ---------------------------------------------------------------- voxel scans


def _slabs(image: sitk.Image) -> Iterator[np.ndarray]:
    """Consecutive z-slabs of the image's (D, H, W) array view (no copy of the whole volume)."""
    array = sitk.GetArrayViewFromImage(image)
    per_slice = max(1, array[0].size)
    step = max(1, _SLAB_VOXELS // per_slice)
    for start in range(0, array.shape[0], step):
        yield array[start : start + step]


def _intensity_problems(image: sitk.Image, path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the image's voxels: NaN/Inf counts (errors), constant image (warning).

    NaN/Inf of NIfTI files are counted from the file's bytes, because ITK reads them as 0.
    """
    n_nan, n_inf = count_nonfinite(path)
    low, high = math.inf, -math.inf
    floating = np.issubdtype(sitk.GetArrayViewFromImage(image).dtype, np.floating)
    for slab in _slabs(image):
        if floating:
            n_nan += int(np.count_nonzero(np.isnan(slab)))
            n_inf += int(np.count_nonzero(np.isinf(slab)))
            finite = slab[np.isfinite(slab)]
            if finite.size:
                low, high = min(low, float(finite.min())), max(high, float(finite.max()))
        else:
            low, high = min(low, float(slab.min())), max(high, float(slab.max()))
    errors = [f"NaN/Inf intensities: {n_nan} NaN and {n_inf} Inf voxels"] if n_nan or n_inf else []
    warnings = [f"constant image: every finite voxel is {low:g}"] if low == high else []
    return errors, warnings


def _mask_problems(mask: sitk.Image, path: Path) -> list[str]:
    """Errors about mask values: non-binary (naming the values found) or empty (no voxel equal to 1)."""
    ones = 0
    n_nan, n_inf = count_nonfinite(path)  # NIfTI NaN/Inf, which ITK reads as 0
    other: set[float] = ({math.nan} if n_nan else set()) | ({math.inf} if n_inf else set())
    has_zero = False
    for slab in _slabs(mask):
        ones += int(np.count_nonzero(slab == 1))
        has_zero = has_zero or bool(np.any(slab == 0))
        odd = slab[(slab != 0) & (slab != 1)]
        if odd.size and len(other) <= _MAX_VALUES_SHOWN:
            other.update(np.unique(odd).tolist())
    if other:
        found = other | ({0.0} if has_zero else set()) | ({1.0} if ones else set())
        values = sorted(found, key=lambda v: (math.isnan(v), v))
        shown = ", ".join(f"{v:g}" for v in values[:_MAX_VALUES_SHOWN])
        more = ", ..." if len(values) > _MAX_VALUES_SHOWN else ""
        return [f"non-binary mask: values {shown}{more} (expected only 0 and 1)"]
    if ones == 0:
        return ["empty mask: no lesion voxel (every voxel is 0)"]
    return []


def _spacing_warnings(header: VolumeHeader, site_config: SiteConfig | None) -> list[str]:
    overridden = site_config is not None and any(site_config.spacing_override_xyz())
    warnings = []
    if not overridden and all(s == 1.0 for s in header.file_spacing):
        warnings.append(
            "header spacing is exactly (1, 1, 1) mm, a placeholder value (TDSC-ABUS headers carry it; real "
            "ABUS voxels are about 0.07-0.5 mm): set spacing-z/-y/-x in the site config"
        )
    extent = [n * s for n, s in zip(header.size, header.spacing, strict=True)]
    if max(extent) > MAX_PLAUSIBLE_EXTENT_MM:
        warnings.append(
            f"physical extent {_fmt(extent)} mm exceeds {MAX_PLAUSIBLE_EXTENT_MM:g} mm: check the spacing"
        )
    return warnings


# ---------------------------------------------------------------- one case


class CaseCheck:
    """Collects the errors and warnings of one case, each prefixed with the case id."""

    def __init__(self, case: CaseRecord) -> None:
        self.case = case
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, message: str) -> None:
        text = f"case {self.case.case_id!r}: {message}"
        if text not in self.errors:
            self.errors.append(text)

    def warn(self, message: str) -> None:
        self.warnings.append(f"case {self.case.case_id!r}: {message}")

    def result(self) -> CaseResult:
        return CaseResult(self.case.case_id, not self.errors, self.errors, self.warnings)


def _read_checked(
    check: CaseCheck, kind: str, path: Path, site_config: SiteConfig | None
) -> tuple[VolumeHeader | None, sitk.Image | None]:
    """Header and voxels of one file, or (header-or-None, None) after recording why they are unusable."""
    if not path.exists():
        check.error(missing_file_problem(kind, path))
        return None, None
    try:
        header = read_header(path, site_config=site_config)
        problem = volume_shape_problem(header)
        if problem:
            check.error(f"{kind} {path}: {problem}")
            return None, None
        check_file_complete(path, thorough=True)
        return header, read_volume(path, site_config=site_config, check_complete=False)
    except VolumeReadError as exc:
        check.error(f"{kind} {path}: {exc.reason}")
        return None, None


def _check_row(check: CaseCheck, case: CaseRecord) -> None:
    """Label and split checks for a case validated on its own (without its site index)."""
    if case.label not in (0, 1):
        check.error(f"unknown label value {case.raw_label!r} (expected benign/malignant, B/M or 0/1)")
    if parse_split(case.split) is None:
        check.error(f"unknown split value {case.split!r} (expected train, val or test)")
    if case.mask is None:
        check.error("mask: no mask path given")


def validate_case(
    case: CaseRecord,
    site_config: SiteConfig | None = None,
    *,
    row_problems: Sequence[str] | None = None,
    row_warnings: Sequence[str] = (),
) -> CaseResult:
    """Check one case: its row (label, split), image and mask files, voxels and geometry.

    ``row_problems`` are the problems found for this case while indexing (:attr:`SiteIndex.problems`); when
    None, the label and split are checked from the record itself; ``row_warnings`` are indexing warnings
    (:meth:`SiteIndex.notes_of`). Never raises for bad data.
    """
    check = CaseCheck(case)
    for message in row_warnings:
        check.warn(message)
    if row_problems is None:
        _check_row(check, case)
    for message in row_problems or ():
        check.error(message)
    try:
        _check_volumes(check, case, site_config)
    except Exception as exc:  # a check must never crash a round: report the unexpected failure instead
        logger.exception("unexpected failure while checking case %r", case.case_id)
        check.error(f"unexpected failure while checking ({type(exc).__name__}: {exc})")
    return check.result()


def _check_volumes(check: CaseCheck, case: CaseRecord, site_config: SiteConfig | None) -> None:
    image_header, image = _read_checked(check, "image", case.image, site_config)
    if image is not None and image_header is not None:
        errors, warnings = _intensity_problems(image, case.image)
        for message in errors:
            check.error(f"image {case.image}: {message}")
        for message in warnings + _spacing_warnings(image_header, site_config):
            check.warn(f"image {case.image}: {message}")
    del image
    if case.mask is None:
        return
    mask_header, mask = _read_checked(check, "mask", case.mask, site_config)
    if mask is None or mask_header is None:
        return
    if image_header is not None:
        for message in geometry_mismatches(image_header, mask_header):
            check.error(f"mask {case.mask}: image/mask geometry mismatch: {message}")
    for message in _mask_problems(mask, case.mask):
        check.error(f"mask {case.mask}: {message}")


# ---------------------------------------------------------------- a site


def _stat_entries(path: Path) -> list[list[object]]:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()]


def case_fingerprint(case: CaseRecord, site_config: SiteConfig | None) -> str:
    """Hash of what reading a case depends on: its files (path, size, mtime) and the geometry overrides."""
    config = site_config or SiteConfig()
    payload = {
        "image": _stat_entries(case.image),
        "mask": _stat_entries(case.mask) if case.mask else None,
        "spacing": config.spacing_override_xyz(),
        "direction": config.direction_override(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cache_key(
    case: CaseRecord, site_config: SiteConfig | None, problems: list[str], notes: list[str]
) -> str:
    payload = [_CHECKS_VERSION, case_fingerprint(case, site_config), repr(case), problems, notes]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _load_cache(path: Path | None) -> dict[str, dict]:
    if path is None:
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("entries", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _save_cache(path: Path, entries: dict[str, dict]) -> None:
    write_text_atomic(path, json.dumps({"version": _CHECKS_VERSION, "entries": entries}))


def validate_site(
    site_dir: str | Path,
    site_config: SiteConfig | None = None,
    *,
    index: SiteIndex | None = None,
    progress: Callable[[int, int, CaseResult], None] | None = None,
    cache: str | Path | None = None,
) -> ValidationReport:
    """Check every case of a site folder (either layout), one case at a time.

    Raises SiteLayoutError only when the folder is in neither layout; bad cases are reported, not raised.
    ``progress(i, n, result)`` is called after each case. ``cache`` (a JSON file outside the site folder,
    e.g. in the client's work folder) keeps results keyed by the case's files (size, mtime) and overrides, so
    that repeated checks (every round) re-read only cases that changed.
    """
    index = index or discover_site(site_dir, site_config)
    cache_path = Path(cache) if cache is not None else None
    cached, fresh = _load_cache(cache_path), {}
    results = []
    for number, case in enumerate(index.cases):
        problems, notes = index.problems_of(number), index.notes_of(number)
        key = _cache_key(case, site_config, problems, notes) if cache_path else ""
        if key in cached:
            result = CaseResult(**cached[key])
        else:
            result = validate_case(case, site_config, row_problems=problems, row_warnings=notes)
        fresh[key] = result.to_dict()
        results.append(result)
        if progress is not None:
            progress(number + 1, len(index.cases), result)
    if cache_path is not None:
        _save_cache(cache_path, fresh)
    return ValidationReport(index.name, index.layout, index.site_dir, index.cases, tuple(results))


def usable_cases(
    source: ValidationReport | SiteIndex | str | Path,
    site_config: SiteConfig | None = None,
    *,
    splits: Sequence[str] | None = None,
    cache: str | Path | None = None,
) -> list[CaseRecord]:
    """Cases without errors (optionally only those in ``splits``), logging how many were skipped and why.

    ``source`` is a finished report, or a site index / folder to validate first (``cache`` as in
    :func:`validate_site`).
    """
    if isinstance(source, ValidationReport):
        report = source
    elif isinstance(source, SiteIndex):
        report = validate_site(source.site_dir, site_config, index=source, cache=cache)
    else:
        report = validate_site(source, site_config, cache=cache)
    chosen = [
        (c, r) for c, r in zip(report.cases, report.results, strict=True) if not splits or c.split in splits
    ]
    bad = [r for _, r in chosen if not r.ok]
    if bad:
        logger.warning(
            "site %s: skipping %d of %d cases with validation errors (first: %s)",
            report.site,
            len(bad),
            len(chosen),
            bad[0].errors[0],
        )
    return [c for c, r in chosen if r.ok]
