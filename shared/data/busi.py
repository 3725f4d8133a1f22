"""The 2D BUSI site layout: index, read and validate a folder of breast-ultrasound PNG images with masks.

Layout (the public BUSI data set's convention, Al-Dhabyani et al. 2020)::

    SITE/benign/benign (1).png          SITE/benign/benign (1)_mask.png
    SITE/malignant/malignant (7).png    SITE/malignant/malignant (7)_mask.png  [+ _mask_1.png, _mask_2.png]
    SITE/normal/normal (3).png          SITE/normal/normal (3)_mask.png        (all black)

* Class folders are ``benign``, ``malignant`` and ``normal`` (matched case-insensitively; any of them may be
  absent). The label is the folder: benign 0, malignant 1 (as everywhere in fedabus), normal
  :data:`NORMAL_LABEL` (2). A case id is ``<folder>/<image stem>``, e.g. ``benign/benign (1)``.
* An image ``X.png`` has its mask in ``X_mask.png``; BUSI gives some images with several lesions extra masks
  ``X_mask_1.png``, ``X_mask_2.png``...: the lesion mask of the image is the **union** of all of them.
* A ``normal/`` image may have no mask file (its mask is then empty); a benign or malignant image must have one.
* Only ``*.png`` files are read (suffix in any case). Hidden files and folders, ``__MACOSX``, other files and
  subfolders inside the class folders are ignored.

Reading (:func:`read_png`) goes through SimpleITK's PNG reader: grey-level PNGs are read as they are; RGB(A)
PNGs (most BUSI files are RGB with three equal channels) become grey with the ITU-R BT.601 luma weights
(0.299 R + 0.587 G + 0.114 B, as Pillow's ``convert("L")``); an alpha channel is dropped. Masks are read the
same way and must hold only 0 and 255 (BUSI) or only 0 and 1; both become 0/1 (:func:`read_busi_mask`).

Validation (:func:`validate_busi_site`) reports every problem per image with the case id and the file, in the
:class:`~shared.data.validate.ValidationReport` of ``fedabus validate``; the reasons are in docs/data.md. A
folder that cannot be a BUSI site at all (missing, no class folder, an unknown folder or a PNG outside the
class folders, no image) raises :class:`~shared.data.layouts.SiteLayoutError`.

BUSI has no train/val/test split: every image is indexed as ``train`` and :func:`split_busi` carves stratified
validation and test images (:mod:`shared.data.splits`).
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from shared.data.io import VolumeReadError, itk_reason, read_header, require_readable
from shared.data.layouts import CaseRecord, SiteIndex, SiteLayoutError
from shared.data.splits import carve_validation
from shared.data.validate import CaseCheck, CaseResult, ValidationReport, usable_cases

__all__ = [
    "BUSI_CLASSES",
    "BUSI_LAYOUT",
    "CLASS_LABELS",
    "NORMAL_LABEL",
    "BusiImage",
    "discover_busi",
    "is_busi_site",
    "read_busi_mask",
    "read_png",
    "split_busi",
    "usable_busi_images",
    "validate_busi_image",
    "validate_busi_site",
]

logger = logging.getLogger(__name__)

BUSI_LAYOUT = "busi"
BUSI_CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")
#: Label of a ``normal/`` image (no lesion); benign is 0 and malignant 1 as in the 3D layouts.
NORMAL_LABEL = 2
CLASS_LABELS: dict[str, int] = {"benign": 0, "malignant": 1, "normal": NORMAL_LABEL}

_MASK_NAME = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<extra>\d+))?$", re.IGNORECASE)
_IGNORED_FOLDERS = {"__macosx"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: ITU-R BT.601 luma weights (R, G, B), as Pillow's ``convert("L")``.
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class BusiImage(CaseRecord):
    """One BUSI image: a :class:`CaseRecord` (``mask`` is the first mask file or None, ``label`` 0 benign,
    1 malignant, 2 normal, ``split`` ``train`` until :func:`split_busi`) with all its mask files (``masks``,
    ``X_mask.png`` first, then ``X_mask_1.png``... in number order) and its class folder name."""

    masks: tuple[Path, ...] = ()
    class_name: str = ""


# ---------------------------------------------------------------- reading


def _png_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete PNG file (bad signature, chunks cut short, no IEND), or None.

    Walks the chunk headers (length, type) without decompressing; ITK's own message for a cut file is only
    "Error while reading file".
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        if handle.read(8) != _PNG_SIGNATURE:
            return "not a PNG file (its first bytes are not the PNG signature)"
        position = 8
        while True:
            head = handle.read(8)
            if len(head) < 8:
                return f"truncated file: {size} bytes end before the PNG's IEND chunk"
            length, kind = struct.unpack(">I4s", head)
            position += 12 + length
            if position > size:
                return f"truncated file: {size} of the {position} bytes its chunks need"
            if kind == b"IEND":
                return None
            handle.seek(position)


def _to_grey(array: np.ndarray, components: int) -> np.ndarray:
    """(H, W) or (H, W, C) PNG pixels -> (H, W) float32 grey (module docstring)."""
    if components == 1:
        return array.astype(np.float32)
    if components == 2:  # grey + alpha
        return array[..., 0].astype(np.float32)
    rgb = array[..., :3].astype(np.float64)
    return (rgb @ _LUMA).astype(np.float32)


def read_png(path: str | Path) -> np.ndarray:
    """A PNG image as (H, W) float32 grey values in the file's range (0..255 for 8-bit files).

    Raises:
        VolumeReadError: missing, empty, unreadable (permissions), not a PNG, truncated or corrupt file, or a
            PNG that is not a 2D image with 1-4 channels; the error names the file and the reason.
    """
    path = Path(path)
    require_readable(path)  # missing, empty, a folder, permission denied
    problem = _png_problem(path)
    if problem:
        raise VolumeReadError(path, problem)
    header = read_header(path)
    if header.dimension != 2 or not 1 <= header.components <= 4:
        raise VolumeReadError(
            path, f"not a 2D image: {header.dimension}D, {header.components} channels (size {header.size})"
        )
    try:
        image = sitk.ReadImage(str(path), imageIO="PNGImageIO")
    except RuntimeError as exc:
        raise VolumeReadError(path, f"unreadable or truncated file ({itk_reason(exc)})") from None
    return _to_grey(sitk.GetArrayFromImage(image), header.components)


def _binary(grey: np.ndarray, path: Path) -> np.ndarray:
    """0/255 or 0/1 mask pixels -> (H, W) uint8 0/1; anything else raises VolumeReadError naming the values."""
    values = np.unique(np.rint(grey))
    if set(values.tolist()) <= {0.0, 255.0}:
        return (grey > 127).astype(np.uint8)
    if set(values.tolist()) <= {0.0, 1.0}:
        return (grey > 0.5).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in values[:10]) + (", ..." if values.size > 10 else "")
    raise VolumeReadError(path, f"non-binary mask: values {shown} (expected only 0 and 255, or only 0 and 1)")


def read_busi_mask(paths: Sequence[str | Path], shape: tuple[int, int] | None = None) -> np.ndarray:
    """The union of an image's mask files as (H, W) uint8 0/1.

    ``shape`` (H, W) is the image's: a mask of another size raises; with no path the mask is all 0 (a
    ``normal/`` image without a mask file), which needs ``shape``.

    Raises:
        VolumeReadError: a mask file cannot be read (:func:`read_png`), is not binary, or its size differs
            from ``shape`` (or from the first mask's).
        ValueError: no path and no ``shape``.
    """
    union: np.ndarray | None = None
    for path in map(Path, paths):
        mask = _binary(read_png(path), path)
        expected = shape if shape is not None else (None if union is None else union.shape)
        if expected is not None and mask.shape != tuple(expected):
            raise VolumeReadError(
                path,
                f"image/mask size mismatch: mask is {mask.shape[1]} x {mask.shape[0]} pixels, the image "
                f"{expected[1]} x {expected[0]} (width x height)",
            )
        union = mask if union is None else np.maximum(union, mask)
    if union is None:
        if shape is None:
            raise ValueError("read_busi_mask: no mask file and no image shape to make an empty mask")
        return np.zeros(shape, dtype=np.uint8)
    return union


# ---------------------------------------------------------------- indexing


def _visible_children(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and p.name.lower() not in _IGNORED_FOLDERS
    )


def _class_folders(site_dir: Path) -> dict[str, Path]:
    """``{class: folder}`` of the site; raises SiteLayoutError for a PNG or unknown folder at the top level."""
    folders: dict[str, Path] = {}
    for child in _visible_children(site_dir):
        name = child.name.lower()
        if child.is_dir() and name in BUSI_CLASSES:
            if name in folders:
                raise SiteLayoutError(
                    f"{site_dir}: two folders for the class {name!r}: {folders[name]}, {child}"
                )
            folders[name] = child
        elif child.is_dir():
            raise SiteLayoutError(
                f"{site_dir}: unknown class folder {child.name!r} (a BUSI site holds only "
                f"{', '.join(f'{c}/' for c in BUSI_CLASSES)}); rename or move it"
            )
        elif name.endswith(".png"):
            raise SiteLayoutError(
                f"{site_dir}: image {child.name!r} is outside the class folders; move it into benign/, "
                "malignant/ or normal/"
            )
    if not folders:
        raise SiteLayoutError(
            f"{site_dir}: not a BUSI site: no {', '.join(f'{c}/' for c in BUSI_CLASSES)} folder of PNG images"
        )
    return folders


def is_busi_site(site_dir: str | Path) -> bool:
    """True when ``site_dir`` holds at least one BUSI class folder (cheap; no file is opened)."""
    folder = Path(site_dir)
    return folder.is_dir() and any(p.is_dir() and p.name.lower() in BUSI_CLASSES for p in folder.iterdir())


def _mask_order(path: Path) -> int:
    extra = _MASK_NAME.match(path.stem)
    return -1 if extra is None or extra["extra"] is None else int(extra["extra"])


def _index_class(folder: Path, class_name: str) -> tuple[list[BusiImage], list[tuple[str, ...]]]:
    """Images of one class folder and each one's indexing problems (missing mask, orphan mask)."""
    pngs = [p for p in _visible_children(folder) if p.is_file() and p.suffix.lower() == ".png"]
    images: dict[str, Path] = {}
    masks: dict[str, list[Path]] = {}
    for path in pngs:
        match = _MASK_NAME.match(path.stem)
        if match:
            masks.setdefault(match["stem"], []).append(path)
        else:
            images[path.stem] = path
    records, problems = [], []
    for stem in sorted(images.keys() | masks.keys()):
        own = tuple(sorted(masks.get(stem, []), key=_mask_order))
        image = images.get(stem, folder / f"{stem}.png")
        found: list[str] = []
        if stem not in images:
            found.append(f"mask {own[0]}: no image for this mask (expected {image.name} in the same folder)")
        elif not own and class_name != "normal":
            found.append(f"mask: no mask file (expected {stem}_mask.png beside {image})")
        label = CLASS_LABELS[class_name]
        records.append(
            BusiImage(
                case_id=f"{class_name}/{stem}",
                image=image,
                mask=own[0] if own else None,
                label=label,
                split="train",
                raw_label=class_name,
                masks=own,
                class_name=class_name,
            )
        )
        problems.append(tuple(found))
    return records, problems


def discover_busi(site_dir: str | Path) -> SiteIndex:
    """Index a BUSI site folder (file names only; no image is opened).

    Returns a :class:`SiteIndex` with layout ``busi`` whose cases are :class:`BusiImage` records (by class,
    then file name) and whose ``case_problems`` hold missing masks and masks without an image.

    Raises:
        SiteLayoutError: the folder is missing, holds no class folder or no PNG image, or holds an unknown
            folder or a PNG outside the class folders.
    """
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise SiteLayoutError(f"{site_dir}: site folder does not exist or is not a folder")
    records: list[BusiImage] = []
    problems: list[tuple[str, ...]] = []
    for class_name, folder in sorted(
        _class_folders(site_dir).items(), key=lambda kv: BUSI_CLASSES.index(kv[0])
    ):
        found, issues = _index_class(folder, class_name)
        records += found
        problems += issues
    if not records:
        raise SiteLayoutError(f"{site_dir}: the class folders hold no PNG image")
    by_id: dict[str, list[str]] = {r.case_id: list(p) for r, p in zip(records, problems, strict=True) if p}
    return SiteIndex(
        site_dir=site_dir,
        name=site_dir.name,
        layout=BUSI_LAYOUT,
        cases=tuple(records),
        problems=by_id,
        case_problems=tuple(problems),
    )


# ---------------------------------------------------------------- validation


def _check_pixels(check: CaseCheck, record: BusiImage) -> None:
    try:
        image = read_png(record.image)
    except VolumeReadError as exc:
        check.error(f"image {exc.path}: {exc.reason}")
        image = None
    shape = None if image is None else image.shape
    masks = []
    for path in record.masks:
        try:
            masks.append(read_busi_mask([path], shape))
        except VolumeReadError as exc:
            check.error(f"mask {exc.path}: {exc.reason}")
    if image is None or len(masks) != len(record.masks):
        return
    lesion = int(np.count_nonzero(np.maximum.reduce(masks))) if masks else 0
    if record.label == NORMAL_LABEL and lesion:
        check.error(
            f"mask {record.mask}: mask of a normal/ image is not empty ({lesion} lesion pixels): a normal image "
            "has no lesion; move the image to benign/ or malignant/, or blank its mask"
        )
    elif record.label != NORMAL_LABEL and masks and not lesion:
        where = ", ".join(str(p) for p in record.masks)
        check.error(f"mask {where}: empty mask: no lesion pixel (every pixel is 0)")


def validate_busi_image(record: BusiImage, row_problems: Sequence[str] = ()) -> CaseResult:
    """Check one BUSI image: its indexing problems (``row_problems``), the image and every mask file
    (readable, complete PNG; masks binary and of the image's size) and the lesion (present in benign and
    malignant images, absent from normal ones). Never raises for bad data."""
    check = CaseCheck(record)
    for message in row_problems:
        check.error(message)
    if record.image.exists() or not row_problems:  # an orphan mask's image is already reported missing
        try:
            _check_pixels(check, record)
        except Exception as exc:  # a check must never crash a round: report the unexpected failure instead
            logger.exception("unexpected failure while checking BUSI image %r", record.case_id)
            check.error(f"unexpected failure while checking ({type(exc).__name__}: {exc})")
    return check.result()


def validate_busi_site(
    site_dir: str | Path,
    *,
    index: SiteIndex | None = None,
    progress: Callable[[int, int, CaseResult], None] | None = None,
) -> ValidationReport:
    """Check every image of a BUSI site (one image at a time) and return the report of ``fedabus validate``
    (layout ``busi``). Raises SiteLayoutError only when the folder is not a BUSI site (:func:`discover_busi`)."""
    index = index or discover_busi(site_dir)
    results = []
    for number, record in enumerate(index.cases):
        result = validate_busi_image(record, index.problems_of(number))
        results.append(result)
        if progress is not None:
            progress(number + 1, len(index.cases), result)
    return ValidationReport(index.name, index.layout, index.site_dir, index.cases, tuple(results))


def usable_busi_images(
    source: ValidationReport | str | Path, *, classes: Sequence[str] = BUSI_CLASSES
) -> list[BusiImage]:
    """Images without a validation error in the class folders ``classes`` (skips are logged, as for 3D sites).

    ``classes=("benign", "malignant")`` is the benign/malignant task (normal images excluded);
    all three classes give the three-class task of seed 004 and segmentation with lesion-free images.
    """
    unknown = [c for c in classes if c not in BUSI_CLASSES]
    if unknown or not classes:
        raise ValueError(f"classes={tuple(classes)!r}: choose one or more of {BUSI_CLASSES}")
    report = source if isinstance(source, ValidationReport) else validate_busi_site(source)
    chosen = [c for c in usable_cases(report) if isinstance(c, BusiImage) and c.class_name in classes]
    return chosen


def split_busi(
    images: Sequence[BusiImage], *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[tuple[BusiImage, ...], tuple[BusiImage, ...], tuple[BusiImage, ...]]:
    """``(train, val, test)``: stratified by class (:func:`shared.data.splits.carve_validation`, deterministic
    for a seed): ``test_fraction`` of each class's images become ``test``, then ``val_fraction`` of the rest
    ``val`` (each at least one image of a class with 3 or more, never a class's last two)."""
    rest, test = carve_validation(images, test_fraction, seed)
    train, val = carve_validation(rest, val_fraction, seed + 1)
    return (
        tuple(train),
        tuple(val),
        tuple(replace(c, split="test") for c in test),
    )
