"""``fedabus validate`` and ``fedabus prepare``: a site operator's first contact with their data.

Exit status of ``validate``: 0 when every case is usable, 1 when any case has an error, 2 when the folder or
site config cannot be used at all. ``prepare``: 0 when every case was prepared (or already up to date), 1
when some cases were skipped as invalid, 2 for unusable folders or config.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shared.config import ConfigError, SiteConfig, load_site_config

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``validate`` and ``prepare`` sub-commands."""
    validate = subparsers.add_parser(
        "validate",
        help="check every case of a site folder and report each problem",
        description="Check every case of a site folder (manifest or TDSC-ABUS layout, see sites/README.md; or a "
        "2D BUSI folder of benign/, malignant/, normal/ PNGs, see docs/data.md): files, voxels, image/mask "
        "geometry, labels and splits. Exit status 1 when any case has an error.",
        allow_abbrev=False,
    )
    validate.add_argument("site_dir", metavar="SITE_DIR", type=Path, help="the site folder")
    _add_site_config(validate)
    validate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    validate.set_defaults(func=run_validate)

    prepare = subparsers.add_parser(
        "prepare",
        help="convert a site folder into the canonical manifest layout of .nii.gz",
        description="Convert SOURCE (either layout, DICOM series folders included) into OUT: images/, masks/ "
        "and manifest.csv, site overrides applied. Never modifies SOURCE; re-running skips up-to-date cases.",
        allow_abbrev=False,
    )
    prepare.add_argument("source", metavar="SOURCE", type=Path, help="the site folder to convert (read only)")
    prepare.add_argument("out", metavar="OUT", type=Path, help="the folder to write (created if needed)")
    _add_site_config(prepare)
    prepare.set_defaults(func=run_prepare)


def _add_site_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--site-config",
        metavar="TOML",
        type=Path,
        help="site TOML (spacing/orientation/split overrides; see sites/README.md)",
    )


def _site_config(args: argparse.Namespace) -> SiteConfig | None:
    return load_site_config(args.site_config) if args.site_config else None


def _quiet_itk() -> None:
    """Keep ITK's own warnings off the terminal; every problem is reported by our messages instead."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)


def _emit(lines: list[str] | str) -> None:
    """Print to stdout; a reader that went away (``| head``) is not an error."""
    try:
        print(lines if isinstance(lines, str) else "\n".join(lines), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(command: str, exc: Exception) -> int:
    print(f"fedabus {command}: error: {exc}", file=sys.stderr)
    return 2


def _progress(enabled: bool):
    def report(number: int, total: int, *_: object) -> None:
        print(f"\rchecking case {number}/{total}", end="" if number < total else "\n", file=sys.stderr)

    return report if enabled else None


def run_validate(args: argparse.Namespace) -> int:
    """Validate a site folder; print a table (or ``--json``); return 0, 1 (case errors) or 2 (unusable)."""
    from shared.data.busi import validate_busi_site
    from shared.data.busi_volumes import is_busi_folder
    from shared.data.layouts import SiteLayoutError
    from shared.data.validate import validate_site

    _quiet_itk()
    progress = _progress(sys.stderr.isatty())
    try:
        if is_busi_folder(args.site_dir):
            report = validate_busi_site(args.site_dir, progress=progress)  # 2D PNGs: no site config applies
        else:
            report = validate_site(args.site_dir, _site_config(args), progress=progress)
    except (ConfigError, SiteLayoutError) as exc:
        return _fail("validate", exc)
    _emit(report.to_json() if args.json else format_report(report))
    return 0 if report.ok else 1


def format_report(report) -> list[str]:
    """Lines of the human-readable validation table: one row per case, then each problem indented."""
    width = max([len("CASE")] + [len(r.case_id) for r in report.results])
    lines = [f"site {report.site} ({report.layout} layout): {report.site_dir}", f"{'CASE':<{width}}  STATUS"]
    for result in report.results:
        status = "ok" if result.ok else f"ERROR ({len(result.errors)})"
        if result.ok and result.warnings:
            status = f"ok, {len(result.warnings)} warning(s)"
        lines.append(f"{result.case_id:<{width}}  {status}")
        prefix = f"case {result.case_id!r}: "
        lines += [f"{'':<{width}}    error: {e.removeprefix(prefix)}" for e in result.errors]
        lines += [f"{'':<{width}}    warning: {w.removeprefix(prefix)}" for w in result.warnings]
    n = len(report.results)
    lines.append(f"{n} case(s): {n - report.num_bad} usable, {report.num_bad} with errors")
    return lines


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare a canonical site folder; print what was written and skipped; return 0, 1 (skips) or 2."""
    from shared.data.layouts import SiteLayoutError
    from shared.data.prepare import PrepareError, prepare_site

    _quiet_itk()
    try:
        result = prepare_site(
            args.source, args.out, _site_config(args), progress=_progress(sys.stderr.isatty())
        )
    except (ConfigError, SiteLayoutError, PrepareError, OSError) as exc:
        return _fail("prepare", exc)
    _emit(result.summary_lines())
    return 1 if result.skipped else 0
