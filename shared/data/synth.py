"""A synthetic consortium of ABUS-like sites (``fedabus synth``) for tests, demos and benchmarks.

Every case is drawn by :func:`shared.data.synth_case.generate_case` (tissue, ultrasound physics, benign and
malignant lesions, BI-RADS-like categories: that module's docstring). This module gives each site its style and
cases, splits them and writes the site folders.

Sites differ (domain shift) in spacing, gain, dynamic range, speckle size, attenuation, noise and the
benign/malignant mix (:class:`SiteStyle`). Even-numbered sites use the manifest layout (NIfTI; every fourth
site stores its volumes flipped along the sweep axis, ``LPI``, to exercise direction handling); odd-numbered
sites use the TDSC-ABUS layout (``Train/Validation/Test`` folders of NRRD with the placeholder (1, 1, 1) mm
header spacing, the real spacing given by a site TOML ``<out>/<site>.toml``, as for real TDSC data).

Determinism: every random draw comes from ``numpy.random.SeedSequence([seed, purpose, site, case])``, so the
same seed gives the same arrays byte for byte, and adding sites leaves the existing sites unchanged (labels
and splits depend on the number of cases per site).

``<out>/consortium.json`` records the options, each site's style and the truth of every case (label, split,
BI-RADS, lesion volume in cm³, drawn features).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from shared.data.io import write_volume
from shared.data.synth_case import (
    LABEL_STREAM,
    SITE_STREAM,
    SPLIT_STREAM,
    SiteStyle,
    SynthCase,
    SynthOptions,
    generate_case,
    rng_for,
)

# SynthOptions and SiteStyle are the parameter types of generate_consortium, so they are exported here too.
__all__ = [
    "SiteStyle",
    "SynthOptions",
    "assign_splits",
    "generate_consortium",
    "register",
    "site_styles",
]

_TDSC_FOLDERS = {"train": "Train", "val": "Validation", "test": "Test"}


def _site_name(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return f"site_{letters}"


def site_styles(sites: int, seed: int) -> list[SiteStyle]:
    """The default style of each of ``sites`` sites (deterministic per seed; module docstring)."""
    styles = []
    for index in range(sites):
        rng = rng_for(seed, SITE_STREAM, index)
        layout = "tdsc" if index % 2 else "manifest"
        speckle = rng.uniform(0.7, 1.5)
        styles.append(
            SiteStyle(
                name=_site_name(index),
                layout=layout,
                orientation="LPI" if index % 4 == 2 else "LPS",
                spacing_mm=tuple(
                    round(float(rng.uniform(lo, hi)), 3) for lo, hi in ((0.5, 0.7), (0.35, 0.5), (0.4, 0.55))
                ),
                gain_db=round(float(rng.uniform(-4.0, 4.0)), 2),
                dynamic_range_db=round(float(rng.uniform(45.0, 60.0)), 2),
                speckle_mm=tuple(round(speckle * base, 3) for base in (0.9, 0.3, 0.6)),
                attenuation_db_per_mm=round(float(rng.uniform(0.05, 0.2)), 3),
                noise=round(float(rng.uniform(0.02, 0.08)), 3),
                malignant_fraction=round(float(rng.uniform(0.35, 0.65)), 3),
            )
        )
    return styles


def _labels(style: SiteStyle, cases: int, seed: int, site: int) -> list[int]:
    """Shuffled labels with round(malignant_fraction × cases) malignant, at least one of each class if ≥ 2."""
    malignant = int(round(style.malignant_fraction * cases))
    if cases >= 2:
        malignant = min(max(malignant, 1), cases - 1)
    labels = np.array([1] * malignant + [0] * (cases - malignant))
    return [int(v) for v in rng_for(seed, LABEL_STREAM, site).permutation(labels)]


def assign_splits(labels: Sequence[int], options: SynthOptions, rng: np.random.Generator) -> list[str]:
    """Stratified train/val/test split of ``labels`` (module docstring and :class:`SynthOptions`)."""
    fractions = np.asarray(options.split_fractions, dtype=float) / sum(options.split_fractions)
    splits = [""] * len(labels)
    for value in sorted(set(labels)):
        members = [i for i, v in enumerate(labels) if v == value]
        count = len(members)
        test = (
            min(count - 1, max(round(fractions[2] * count), options.min_test_per_class)) if count >= 3 else 0
        )
        val = min(count - test - 1, round(fractions[1] * count)) if count >= 3 else 0
        order = rng.permutation(members)
        for rank, index in enumerate(order):
            splits[index] = "test" if rank < test else "val" if rank < test + val else "train"
    return splits


# ---------------------------------------------------------------- writing


def _canonical_image(array: np.ndarray, spacing_zyx: Sequence[float], origin: Sequence[float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    image.SetOrigin(tuple(float(o) for o in origin))
    return image


def _write_manifest_case(
    site_dir: Path, case_id: str, case: SynthCase, style: SiteStyle, origin
) -> tuple[str, str]:
    paths = (f"images/{case_id}.nii.gz", f"masks/{case_id}.nii.gz")
    for array, relative in zip((case.image, case.mask), paths, strict=True):
        image = sitk.DICOMOrient(_canonical_image(array, case.spacing_mm, origin), style.orientation)
        write_volume(image, site_dir / relative)
    return paths


def _write_tdsc_case(site_dir: Path, number: int, split: str, case: SynthCase) -> tuple[str, str]:
    folder = site_dir / _TDSC_FOLDERS[split]
    paths = (f"DATA\\DATA_{number:03d}.nrrd", f"MASK\\MASK_{number:03d}.nrrd")
    for array, relative in zip((case.image, case.mask), paths, strict=True):
        image = _canonical_image(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))  # placeholder spacing, as TDSC
        write_volume(image, folder / relative.replace("\\", "/"))
    return paths


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_site_toml(path: Path, style: SiteStyle) -> None:
    lines = ["[site]", f'name = "{style.name}"']
    if style.layout == "tdsc":
        spacing = dict(zip("zyx", style.spacing_mm, strict=True))
        lines.insert(
            0, "# The NRRD headers carry the placeholder spacing (1, 1, 1) mm, as real TDSC-ABUS data."
        )
        lines += [f"spacing-{axis} = {spacing[axis]}" for axis in "zyx"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


_MANIFEST_HEADER = ("case_id", "image", "mask", "label", "split", "birads")
_TDSC_HEADER = ("case_id", "label", "data_path", "mask_path")


def _write_case(
    site_dir: Path, style: SiteStyle, number: int, split: str, case: SynthCase, origin
) -> list[str]:
    """Write one case's image and mask; return its CSV row (case id first)."""
    if style.layout == "tdsc":
        data, mask = _write_tdsc_case(site_dir, number, split, case)
        return [str(number), "M" if case.label else "B", data, mask]
    case_id = f"{style.name}_{number:03d}"
    image, mask = _write_manifest_case(site_dir, case_id, case, style, origin)
    return [case_id, image, mask, "malignant" if case.label else "benign", split, case.birads]


def _write_site_rows(site_dir: Path, style: SiteStyle, rows: list[list[str]], splits: list[str]) -> None:
    if style.layout == "manifest":
        _write_csv(site_dir / "manifest.csv", _MANIFEST_HEADER, rows)
        return
    for split, folder in _TDSC_FOLDERS.items():
        chosen = [row for row, s in zip(rows, splits, strict=True) if s == split]
        if chosen:
            _write_csv(site_dir / folder / "labels.csv", _TDSC_HEADER, chosen)


def _make_case(
    site_dir: Path,
    style: SiteStyle,
    number: int,
    label: int,
    split: str,
    seed: int,
    site: int,
    options: SynthOptions,
    origin: tuple[float, ...],
) -> tuple[list[str], dict[str, object]]:
    """Generate and write one case; return its CSV row and its truth record. Deterministic in its arguments,
    so cases may be made in any order and in any process."""
    case = generate_case(style, label, seed=seed, site=site, case=number, options=options)
    row = _write_case(site_dir, style, number, split, case, origin)
    truth: dict[str, object] = {"case_id": row[0], "label": label, "split": split, "birads": case.birads}
    truth.update(case.features)
    return row, truth


def _site_jobs(
    out_dir: Path, style: SiteStyle, *, site: int, cases: int, seed: int, options: SynthOptions
) -> tuple[Path, list[str], list[tuple]]:
    """A site's folder, its cases' splits and the :func:`_make_case` arguments of each of its cases."""
    site_dir = out_dir / style.name
    labels = _labels(style, cases, seed, site)
    splits = assign_splits(labels, options, rng_for(seed, SPLIT_STREAM, site))
    origin = tuple(
        round(float(v), 2) for v in rng_for(seed, SITE_STREAM, site, 1).uniform(-60.0, 60.0, size=3)
    )
    jobs = [
        (site_dir, style, number, label, split, seed, site, options, origin)
        for number, (label, split) in enumerate(zip(labels, splits, strict=True))
    ]
    return site_dir, splits, jobs


def _finish_site(
    out_dir: Path, style: SiteStyle, site_dir: Path, splits: list[str], made: list[tuple[list[str], dict]]
) -> dict[str, object]:
    """Write a site's case table and site TOML once its cases are made; return its consortium record."""
    rows = [row for row, _ in made]
    _write_site_rows(site_dir, style, rows, splits)
    toml = out_dir / f"{style.name}.toml"
    _write_site_toml(toml, style)
    cases = [truth for _, truth in made]
    return {"style": asdict(style), "site_dir": str(site_dir), "site_config": str(toml), "cases": cases}


#: Fewest cases per worker process worth its start-up (a spawned worker imports numpy, SciPy and SimpleITK,
#: about a second; a demo case takes about 0.3–0.7 CPU seconds).
_CASES_PER_WORKER = 12


def _workers(total_cases: int, workers: int | None) -> int:
    """Processes for ``total_cases`` cases: ``workers`` when given, else one per CPU when every process gets at
    least :data:`_CASES_PER_WORKER` cases (else 1: this process)."""
    if workers is not None:
        return max(1, workers)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, total_cases // _CASES_PER_WORKER))


def generate_consortium(
    out_dir: str | Path,
    *,
    sites: int,
    cases: int,
    seed: int,
    options: SynthOptions | None = None,
    styles: Sequence[SiteStyle] | None = None,
    workers: int | None = 1,
) -> list[Path]:
    """Write ``sites`` synthetic site folders of ``cases`` cases each under ``out_dir``; return their paths.

    Cases are made in ``workers`` processes (1: this process alone; None: one per CPU when each gets a dozen
    cases or more). Every case depends only on its own seeds, so the files are the same either way. Worker
    processes are spawned, and a spawned process imports the caller's main module: call with several workers
    only from a main module guarded by ``if __name__ == "__main__"`` (the ``fedabus`` commands are).
    """
    if sites < 1 or cases < 1:
        raise ValueError(
            f"synth: need at least 1 site and 1 case per site (got sites={sites}, cases={cases})"
        )
    options = options or SynthOptions()
    styles = list(styles) if styles is not None else site_styles(sites, seed)
    if len(styles) != sites:
        raise ValueError(f"synth: {len(styles)} site styles given for {sites} sites")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = [
        _site_jobs(out_dir, style, site=index, cases=cases, seed=seed, options=options)
        for index, style in enumerate(styles)
    ]
    jobs = [job for _, _, site_jobs in plans for job in site_jobs]
    processes = _workers(len(jobs), workers)
    if processes > 1:  # spawned, not forked: the caller may hold torch's or ITK's threads
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            made = list(pool.map(_make_case, *zip(*jobs, strict=True), chunksize=4))
    else:
        made = [_make_case(*job) for job in jobs]
    records, start = [], 0
    for style, (site_dir, splits, site_jobs) in zip(styles, plans, strict=True):
        records.append(_finish_site(out_dir, style, site_dir, splits, made[start : start + len(site_jobs)]))
        start += len(site_jobs)
    summary = {"seed": seed, "options": asdict(options), "sites": records}
    (out_dir / "consortium.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return [Path(r["site_dir"]) for r in records]


# ---------------------------------------------------------------- command line


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"--shape {text!r}: give three integers D,H,W (e.g. 64,96,96)")
    return tuple(int(p) for p in parts)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synth`` sub-command."""
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic multi-site ABUS consortium",
        description="Write N synthetic ABUS site folders (manifest and TDSC layouts, with site TOMLs and "
        "consortium.json) under OUT. Deterministic per seed. See docs/data.md.",
        allow_abbrev=False,
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if needed)")
    parser.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    parser.add_argument("--cases", type=int, default=12, help="cases per site (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--shape", type=_shape, default=SynthOptions.shape, help="volume size D,H,W in voxels"
    )
    parser.add_argument(
        "--separation",
        type=float,
        default=1.0,
        help="benign/malignant feature separation (0 none, 1 default)",
    )
    parser.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    """Generate the consortium and print one line per site; exit status 2 for invalid arguments."""
    try:
        options = replace(SynthOptions(), shape=args.shape, class_separation=args.separation)
        site_dirs = generate_consortium(
            args.out, sites=args.sites, cases=args.cases, seed=args.seed, options=options, workers=None
        )
    except ValueError as exc:
        print(f"fedabus synth: error: {exc}", file=sys.stderr)
        return 2
    summary = json.loads((Path(args.out) / "consortium.json").read_text(encoding="utf-8"))
    for site_dir, record in zip(site_dirs, summary["sites"], strict=True):
        labels = [c["label"] for c in record["cases"]]
        style = record["style"]
        print(
            f"{site_dir}  {style['layout']:<8} {sum(labels)} malignant / {len(labels) - sum(labels)} benign  "
            f"spacing {tuple(style['spacing_mm'])} mm  site config {record['site_config']}"
        )
    return 0
