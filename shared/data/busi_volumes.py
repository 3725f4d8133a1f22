"""A BUSI folder as a manifest-layout site of one-frame volumes: how the study's 2D arms use a BUSI site.

:func:`convert_busi_site` reads a BUSI folder (:mod:`shared.data.busi`) and writes, in a folder of its own
(never into the BUSI folder), a site in the manifest layout that :func:`shared.training.site.open_site` opens
like any 3D site, so training, evaluation, federation and reports stay one code path:

* every usable **benign** (label 0) or **malignant** (label 1) image becomes one volume of shape (1, H, W) =
  (sweep, depth, lateral): the frame a hand-held transducer acquires is the transverse ABUS frame
  (:mod:`shared.data.slices2d`). Image ``images/<class>/<stem>.nii.gz`` (uint8 grey, float32 for 16-bit PNGs),
  mask ``masks/<class>/<stem>.nii.gz`` (the union of the image's mask files, 0/1), identity direction, case id
  as in BUSI (``benign/benign (1)``);
* ``normal/`` images have no lesion and are **left out** (the study's task is benign/malignant; logged and
  counted in ``busi-conversion.json``);
* images with a validation error (:func:`shared.data.busi.validate_busi_site`) are skipped, each logged with
  its case id, file and reason, and listed in ``busi-conversion.json``;
* **spacing**: BUSI files carry none. The volumes get :data:`ASSUMED_PIXEL_MM` (0.1 mm, a typical hand-held
  B-mode pixel: a 4-5 cm field of view over about 500 pixels) in-plane and :data:`FRAME_THICKNESS_MM` across
  the frame; the site TOML's ``spacing-y``/``spacing-x`` override them as for any site (they decide HD95 in
  mm, the classifier's margins in mm and any resampling to ``data.spacing-*``);
* **splits**: seeded and stratified by class (:func:`shared.data.busi.split_busi`): :data:`TEST_FRACTION` of
  each class is ``test``, then ``val_fraction`` of the rest ``val``; ``--folds`` re-deals them as for 3D
  sites.

Determinism and resumption: the output folder is ``ROOT/<key>/<BUSI folder name>``, ``key`` a digest of
every PNG's relative path, size and modification time plus the seed, fractions and spacing
(:func:`busi_source_key`). The same folder and seed give the same site (written once, then reused); a changed
file gives a new key, a new site and so a new study fingerprint. The site is written into a hidden temporary
folder and renamed into place only when complete, so an interrupted conversion never leaves a folder that is
later trusted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from shared.data.busi import (
    BusiImage,
    discover_busi,
    is_busi_site,
    read_busi_mask,
    read_png,
    split_busi,
    usable_busi_images,
    validate_busi_site,
)
from shared.data.io import write_volume
from shared.data.layouts import MANIFEST_NAME, TDSC_LABELS_NAME, SiteIndex, SiteLayoutError

__all__ = [
    "ASSUMED_PIXEL_MM",
    "CONVERSION_NAME",
    "FRAME_THICKNESS_MM",
    "TEST_FRACTION",
    "ConvertedBusi",
    "busi_source_key",
    "convert_busi_site",
    "is_busi_folder",
]

logger = logging.getLogger(__name__)

#: In-plane pixel spacing (mm) given to BUSI images, which carry none; a site TOML's spacing-y/-x override it.
ASSUMED_PIXEL_MM = 0.1
#: Spacing (mm) across the one frame (the sweep axis of a one-slice volume; nothing is resampled along it).
FRAME_THICKNESS_MM = 1.0
#: Share of each class's images in the converted site's test split.
TEST_FRACTION = 0.2
#: What the conversion wrote and left out, beside ``manifest.csv``.
CONVERSION_NAME = "busi-conversion.json"
_LESION_CLASSES = ("benign", "malignant")
_VERSION = 1  # bump when the written site changes for the same input


@dataclass(frozen=True)
class ConvertedBusi:
    """A converted BUSI folder: the manifest-layout ``site_dir``, the BUSI ``source``, the ``key`` it was made
    under, the images ``skipped`` for validation errors (case id -> reasons) and the ``normal`` images left
    out."""

    site_dir: Path
    source: Path
    key: str
    skipped: dict[str, list[str]]
    normal: int


def is_busi_folder(site_dir: str | Path) -> bool:
    """True for a BUSI folder (class folders, no ``manifest.csv``/``labels.csv``), as ``fedabus validate``."""
    folder = Path(site_dir)
    return is_busi_site(folder) and not any((folder / n).exists() for n in (MANIFEST_NAME, TDSC_LABELS_NAME))


def _files(index: SiteIndex) -> list[Path]:
    paths = {p for c in index.cases if isinstance(c, BusiImage) for p in (c.image, *c.masks)}
    return sorted(p for p in paths if p.is_file())


def busi_source_key(
    busi_dir: str | Path, *, seed: int, val_fraction: float, test_fraction: float = TEST_FRACTION
) -> str:
    """Digest of what decides the converted site (module docstring). Raises SiteLayoutError for a folder that
    is not a BUSI site."""
    busi_dir = Path(busi_dir)
    settings = [_VERSION, seed, val_fraction, test_fraction, ASSUMED_PIXEL_MM, FRAME_THICKNESS_MM]
    digest = hashlib.sha256(json.dumps(settings).encode())
    for path in _files(discover_busi(busi_dir)):
        stat = path.stat()
        digest.update(
            json.dumps([path.relative_to(busi_dir).as_posix(), stat.st_size, stat.st_mtime_ns]).encode()
        )
    return digest.hexdigest()[:16]


def _volume(array: np.ndarray) -> sitk.Image:
    """(H, W) pixels -> a (1, H, W) volume at the assumed spacing, identity direction."""
    image = sitk.GetImageFromArray(array[None])
    image.SetSpacing((ASSUMED_PIXEL_MM, ASSUMED_PIXEL_MM, FRAME_THICKNESS_MM))
    return image


def _write_case(record: BusiImage, site_dir: Path) -> tuple[str, str]:
    grey = read_png(record.image)
    mask = read_busi_mask(record.masks, grey.shape)
    if grey.max() <= 255:
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)  # 8-bit PNGs (RGB luma rounds to the grey)
    paths = (f"images/{record.case_id}.nii.gz", f"masks/{record.case_id}.nii.gz")
    write_volume(_volume(grey), site_dir / paths[0])
    write_volume(_volume(mask), site_dir / paths[1])
    return paths


def _skipped(busi_dir: Path, report) -> dict[str, list[str]]:
    skipped = {r.case_id: list(r.errors) for r in report.results if not r.ok}
    for errors in skipped.values():  # each error names the case id and the file
        logger.warning("%s: skipping BUSI image %s", busi_dir, "; ".join(errors))
    return skipped


def _write_site(
    busi_dir: Path, site_dir: Path, *, seed: int, val_fraction: float, test_fraction: float
) -> dict:
    """Write the manifest-layout site of ``busi_dir`` into ``site_dir``; returns what went into the conversion
    record. Raises SiteLayoutError when no benign or malignant image is usable."""
    index = discover_busi(busi_dir)
    report = validate_busi_site(busi_dir, index=index)
    skipped = _skipped(busi_dir, report)
    images = usable_busi_images(report, classes=_LESION_CLASSES)
    normal = sum(1 for c in index.cases if isinstance(c, BusiImage) and c.class_name == "normal")
    if normal:
        logger.info(
            "%s: %d normal/ image(s) left out (no lesion; the study's task is benign/malignant)",
            busi_dir,
            normal,
        )
    if not images:
        raise SiteLayoutError(
            f"{busi_dir}: no usable benign or malignant image (run `fedabus validate {busi_dir}` to see why)"
        )
    rows = []
    for split in split_busi(images, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed):
        for record in split:
            image, mask = _write_case(record, site_dir)
            rows.append([record.case_id, image, mask, record.class_name, record.split])
    with (site_dir / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerows([["case_id", "image", "mask", "label", "split"], *sorted(rows)])
    return {"source": str(busi_dir), "cases": len(rows), "normal_left_out": normal, "skipped": skipped}


def convert_busi_site(
    busi_dir: str | Path,
    root: str | Path,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float = TEST_FRACTION,
) -> ConvertedBusi:
    """The manifest-layout site of a BUSI folder under ``root`` (module docstring): written once per
    :func:`busi_source_key`, reused afterwards.

    Raises:
        SiteLayoutError: ``busi_dir`` is not a BUSI site or holds no usable benign or malignant image.
    """
    busi_dir = Path(busi_dir).resolve()
    root = Path(root)
    key = busi_source_key(busi_dir, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    final = root / key
    if not (final / busi_dir.name / CONVERSION_NAME).is_file():
        partial = root / f".partial-{key}-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        (partial / busi_dir.name).mkdir(parents=True)
        try:
            record = _write_site(
                busi_dir,
                partial / busi_dir.name,
                seed=seed,
                val_fraction=val_fraction,
                test_fraction=test_fraction,
            )
            (partial / busi_dir.name / CONVERSION_NAME).write_text(
                json.dumps({"key": key, **record}, indent=1)
            )
            shutil.rmtree(
                final, ignore_errors=True
            )  # an incomplete folder of this key (renamed by hand) is redone
            os.replace(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        logger.info(
            "%s: converted to a manifest site of one-frame volumes in %s", busi_dir, final / busi_dir.name
        )
    record = json.loads((final / busi_dir.name / CONVERSION_NAME).read_text(encoding="utf-8"))
    return ConvertedBusi(final / busi_dir.name, busi_dir, key, record["skipped"], record["normal_left_out"])
