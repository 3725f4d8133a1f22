"""Reading and writing volumes with SimpleITK: NIfTI, NRRD, MHA/MHD and DICOM series folders.

Geometry is SimpleITK's: ``size``, ``spacing`` (mm), ``origin`` (mm) and ``direction`` (row-major 3×3) are in
(x, y, z) order, while ``sitk.GetArrayFromImage`` gives numpy arrays in (z, y, x) = (D, H, W) order. A site's
:class:`~shared.config.SiteConfig` can override spacing and direction; overrides are applied on every read so
images and masks of a site stay consistent.

Headers are read without voxels (:func:`read_header`); volumes are read one at a time (:func:`read_volume`).
ITK does not notice a truncated NIfTI file (it pads the missing voxels) and reads NaN/Inf of float NIfTI as
0: :func:`check_file_complete` and :func:`count_nonfinite` check the file's bytes instead. Every error is a
:class:`VolumeReadError` naming the file and the reason.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import SimpleITK as sitk

from shared.atomic import atomic_write, is_temp_file
from shared.config import SiteConfig

__all__ = [
    "VolumeHeader",
    "VolumeReadError",
    "apply_site_geometry",
    "check_file_complete",
    "count_nonfinite",
    "is_temp_file",
    "itk_reason",
    "read_header",
    "read_volume",
    "require_readable",
    "volume_shape_problem",
    "write_volume",
]

#: Formats :func:`write_volume` can write atomically (single-file formats).
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_CHUNK_BYTES = 16 << 20
#: Names of single-file volumes (a folder so named is a mistake, not a DICOM series folder).
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class VolumeReadError(ValueError):
    """A volume cannot be read or written; ``path`` and ``reason`` say which file and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class VolumeHeader:
    """Geometry and voxel type of a volume, read without its voxels.

    ``size`` (voxels), ``spacing`` (mm), ``origin`` (mm) are in SimpleITK (x, y, z) order; ``direction`` is
    the row-major direction matrix (9 numbers for 3D). ``file_spacing`` is the spacing as the file says it,
    before a site override. The numpy array of the volume has shape ``shape_zyx``.
    """

    path: Path
    dimension: int
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    pixel_type: str
    components: int
    file_spacing: tuple[float, ...]

    @property
    def shape_zyx(self) -> tuple[int, ...]:
        """Shape of ``sitk.GetArrayFromImage`` of this volume: (D, H, W) for 3D."""
        return tuple(reversed(self.size))

    @property
    def num_voxels(self) -> int:
        count = 1
        for n in self.size:
            count *= n
        return count


def itk_reason(exc: Exception) -> str:
    """The most informative line of an ITK exception message (ITK's class/address prefixes removed)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [
        re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\): |sitk::ERROR: )", "", line) for line in lines[1:] or lines
    ]
    if len(lines) > 1 and lines[-1].startswith("Reason:"):
        lines.pop()  # MetaIO adds errno text ("No such file or directory") that misleads for a truncated file
    return (lines[-1] if lines else "no detail").removeprefix("[nrrd] ")[:300]


def require_readable(path: Path) -> None:
    """Raise VolumeReadError when ``path`` is missing, an empty file, or cannot be opened by this process.

    Checked before ITK sees the file: ITK reports a file it may not open as "does not exist" and an empty one
    as "Unable to determine ImageIO reader".
    """
    if not path.exists():
        raise VolumeReadError(path, "missing file (does not exist)")
    try:
        if path.is_dir():
            next(os.scandir(path), None)
            return
        if path.stat().st_size == 0:
            raise VolumeReadError(path, "empty file (0 bytes)")
        with open(path, "rb"):
            pass
    except PermissionError:
        raise VolumeReadError(
            path, "unreadable: permission denied (give the account that runs fedabus read access)"
        ) from None
    except OSError as exc:
        raise VolumeReadError(path, f"unreadable ({exc.strerror or exc})") from None


# ---------------------------------------------------------------- DICOM series


def _dicom_files(folder: Path) -> tuple[str, ...]:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise VolumeReadError(folder, f"unreadable DICOM folder ({itk_reason(exc)})") from None
    if not series:
        if folder.name.lower().endswith(_VOLUME_SUFFIXES):
            raise VolumeReadError(
                folder, "a folder where a volume file is expected (it holds no DICOM series)"
            )
        raise VolumeReadError(folder, "unreadable: folder holds no DICOM series (and is not a volume file)")
    if len(series) > 1:
        raise VolumeReadError(
            folder,
            f"folder holds {len(series)} DICOM series ({', '.join(series)}); give one series per folder",
        )
    return tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def _dicom_header(folder: Path) -> VolumeHeader:
    """Series geometry from the first and last slice headers (no voxels read), as ITK's series reader does."""
    files = _dicom_files(folder)
    first, last = (_file_header(Path(f)) for f in (files[0], files[-1]))
    if first.dimension != 3 or first.size[2] != 1:
        return replace(first, path=folder)
    count = len(files)
    spacing_z = first.spacing[2]
    if count > 1:
        normal = first.direction[2::3]
        step = [(b - a) / (count - 1) for a, b in zip(first.origin, last.origin, strict=True)]
        spacing_z = abs(sum(n * s for n, s in zip(normal, step, strict=True))) or spacing_z
    spacing = (first.spacing[0], first.spacing[1], spacing_z)
    size = (first.size[0], first.size[1], count)
    return replace(first, path=folder, size=size, spacing=spacing, file_spacing=spacing)


# ---------------------------------------------------------------- headers


def _file_header(path: Path) -> VolumeHeader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        reason = itk_reason(exc)
        if "size is zero" in reason:  # NRRD: "_nrrdSizeCheck: axis 1 size is zero!"
            raise VolumeReadError(
                path, f"zero-size dimension: the volume holds no voxel ({reason})"
            ) from None
        _check_nifti_size(path)  # NIfTI with dim[1] = 0: "not recognized as a NIFTI file"
        if reason.startswith("Unable to determine ImageIO reader"):
            reason = "no reader recognises it: not a volume file, or its header is corrupt"
        raise VolumeReadError(path, f"unreadable or truncated file ({reason})") from None
    _check_nifti_size(path)
    spacing = tuple(reader.GetSpacing())
    return VolumeHeader(
        path=path,
        dimension=reader.GetDimension(),
        size=tuple(reader.GetSize()),
        spacing=spacing,
        origin=tuple(reader.GetOrigin()),
        direction=tuple(reader.GetDirection()),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        components=reader.GetNumberOfComponents(),
        file_spacing=spacing,
    )


def read_header(path: str | Path, *, site_config: SiteConfig | None = None) -> VolumeHeader:
    """Read size, spacing, origin, direction and voxel type of a file or DICOM series folder (no voxels).

    The site's spacing/direction overrides are applied to 3D headers. Raises VolumeReadError (missing,
    unreadable).
    """
    path = Path(path)
    require_readable(path)
    header = _dicom_header(path) if path.is_dir() else _file_header(path)
    if site_config is None or header.dimension != 3:
        return header
    spacing, direction = _overridden(header.spacing, header.direction, site_config)
    return replace(header, spacing=spacing, direction=direction)


def _overridden(
    spacing: tuple[float, ...], direction: tuple[float, ...], site_config: SiteConfig
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(spacing, direction) after the site's overrides (a 0 spacing or empty orientation keeps the file's)."""
    override = site_config.spacing_override_xyz()
    return (
        tuple(o or s for o, s in zip(override, spacing, strict=True)),
        site_config.direction_override() or direction,
    )


def volume_shape_problem(header: VolumeHeader) -> str | None:
    """Why a header is not a usable 3D grey-level volume (not 3D, an x or y axis of length 1, vector voxels),
    or None. A single frame along z, (1, H, W) in array order, is usable: it is how a 2D image (a BUSI image,
    :mod:`shared.data.busi_volumes`) reaches the 2D arms; only they can learn from it."""
    if header.dimension != 3:
        return f"not 3D: the file holds a {header.dimension}D image of size {header.size}"
    if min(header.size[:2]) < 2:
        return f"not 3D: size {header.size} (x, y, z) has an axis of length {min(header.size[:2])}"
    if header.components != 1:
        return f"{header.components} components per voxel (colour/vector image); expected a grey-level volume"
    return None


# ---------------------------------------------------------------- completeness (NIfTI truncation)


@dataclass(frozen=True)
class _NiftiLayout:
    """Where a NIfTI-1/2 file keeps its voxels: byte offset, voxel count and size, float dtype if any, and the
    header's size per axis (x, y, z, ...) as written (ITK reads a 0 there as 1)."""

    offset: int
    count: int
    itemsize: int
    float_dtype: np.dtype | None
    size: tuple[int, ...] = ()

    @property
    def needed(self) -> int:
        return self.offset + self.count * self.itemsize


def _nifti_layout(head: bytes) -> _NiftiLayout | None:
    """Voxel layout from the first 540 bytes of a NIfTI-1/2 file; None when the bytes are not NIfTI."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            offset = max(int(struct.unpack(endian + "f", head[108:112])[0]), 352)
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = max(struct.unpack(endian + "q", head[168:176])[0], 544)
            break
    else:
        return None
    size = tuple(int(n) for n in dims[1 : max(1, min(dims[0], 7)) + 1])
    count = 1
    for n in size:
        count *= max(n, 1)
    floats = {16: "f4", 64: "f8"}
    float_dtype = np.dtype(endian + floats[datatype]) if datatype in floats else None
    return _NiftiLayout(offset, count, max(bitpix, 8) // 8, float_dtype, size)


def _open_nifti(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _is_nifti(path: Path) -> bool:
    return not path.is_dir() and path.name.lower().endswith((".nii", ".nii.gz"))


def _check_nifti_size(path: Path) -> None:
    """Raise VolumeReadError when a NIfTI header gives an axis of length 0 (a volume without voxels)."""
    if not _is_nifti(path):
        return
    try:
        with _open_nifti(path) as stream:
            layout = _nifti_layout(stream.read(540))
    except (EOFError, OSError, zlib.error, struct.error):
        return  # corrupt data: check_file_complete reports it
    if layout is not None and 0 in layout.size:
        raise VolumeReadError(
            path,
            f"zero-size dimension: the header gives size {layout.size} (x, y, z); the volume holds no voxel",
        )


def _gzip_length(path: Path) -> int:
    """Uncompressed length of a gzip file, decompressing it in chunks (raises on truncation or corruption)."""
    total = 0
    with gzip.open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            total += len(chunk)
    return total


def _compressed_data_error(path: Path, exc: Exception) -> VolumeReadError:
    return VolumeReadError(
        path, f"unreadable or truncated file (compressed data incomplete or corrupt: {exc})"
    )


def check_file_complete(path: str | Path, *, thorough: bool = False) -> None:
    """Raise VolumeReadError when a file is shorter than its header says (truncated) or its data is corrupt.

    ``.nii``: compares the file size with the header. ``.nii.gz``: compares the gzip trailer's length and,
    when it disagrees or ``thorough`` is set, decompresses the whole file in chunks (also verifies the CRC).
    ``.nrrd`` with gzip-encoded data (``thorough`` only): decompresses it, verifying CRC and length, since
    ITK accepts a file that lost its last bytes. Other formats are checked by ITK while reading.
    """
    path = Path(path)
    if thorough and not path.is_dir() and path.name.lower().endswith(".nrrd"):
        _check_nrrd_gzip(path)
    if not _is_nifti(path):
        return
    try:
        with _open_nifti(path) as stream:
            layout = _nifti_layout(stream.read(540))
        if not path.name.lower().endswith(".gz"):
            actual = path.stat().st_size
        else:
            with open(path, "rb") as stream:
                stream.seek(-4, os.SEEK_END)
                trailer = struct.unpack("<I", stream.read(4))[0]
            quick = layout is not None and trailer == layout.needed % (1 << 32) and not thorough
            actual = layout.needed if quick and layout is not None else _gzip_length(path)
    except (EOFError, OSError, zlib.error, struct.error) as exc:
        raise _compressed_data_error(path, exc) from None
    if layout is not None and actual < layout.needed:
        raise VolumeReadError(path, f"truncated file: {actual} of the {layout.needed} bytes its header needs")


def _check_nrrd_gzip(path: Path) -> None:
    """Decompress the attached gzip data of a NRRD file (no-op for other encodings or detached data)."""
    with open(path, "rb") as stream:
        head = stream.read(1 << 16)
        end = head.find(b"\n\n")
        if end < 0 or not head.startswith(b"NRRD"):
            return
        fields = {}
        for line in head[:end].decode("latin-1").splitlines()[1:]:
            key, sep, value = line.partition(":")
            if sep and not line.startswith("#"):
                fields[key.strip().lower()] = value.strip("= ").lower()
        if fields.get("encoding") not in ("gzip", "gz") or "data file" in fields or "datafile" in fields:
            return
        stream.seek(end + 2)
        try:
            with gzip.GzipFile(fileobj=stream, mode="rb") as data:
                while data.read(_CHUNK_BYTES):
                    pass
        except (EOFError, OSError, zlib.error) as exc:
            raise _compressed_data_error(path, exc) from None


def count_nonfinite(path: str | Path) -> tuple[int, int]:
    """(NaN, ±Inf) voxel counts stored in a float NIfTI file, read from its raw bytes in chunks.

    ITK replaces NaN/Inf by 0 when it reads NIfTI, so they cannot be seen in the image it returns. Other
    formats keep them (count on the image instead): (0, 0) is returned for them and for integer NIfTI.
    """
    path = Path(path)
    if not _is_nifti(path):
        return 0, 0
    n_nan = n_inf = 0
    try:
        with _open_nifti(path) as stream:
            layout = _nifti_layout(stream.read(540))
            if layout is None or layout.float_dtype is None:
                return 0, 0
            stream.seek(layout.offset)
            left = layout.count * layout.itemsize
            chunk_bytes = _CHUNK_BYTES - _CHUNK_BYTES % layout.itemsize
            while left > 0 and (chunk := stream.read(min(chunk_bytes, left))):
                left -= len(chunk)
                values = np.frombuffer(chunk[: len(chunk) - len(chunk) % layout.itemsize], layout.float_dtype)
                n_nan += int(np.count_nonzero(np.isnan(values)))
                n_inf += int(np.count_nonzero(np.isinf(values)))
    except (EOFError, OSError, zlib.error, struct.error) as exc:
        raise _compressed_data_error(path, exc) from None
    return n_nan, n_inf


# ---------------------------------------------------------------- volumes


def apply_site_geometry(image: sitk.Image, site_config: SiteConfig | None) -> sitk.Image:
    """Apply the site's spacing/direction overrides to a 3D image in place and return it."""
    if site_config is None or image.GetDimension() != 3:
        return image
    spacing, direction = _overridden(image.GetSpacing(), image.GetDirection(), site_config)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def read_volume(
    path: str | Path, *, site_config: SiteConfig | None = None, check_complete: bool = True
) -> sitk.Image:
    """Read a 3D grey-level volume (file or DICOM series folder) with the site's overrides applied.

    Array view: ``sitk.GetArrayFromImage(result)`` has shape (D, H, W) = (z, y, x). Raises VolumeReadError
    when the file is missing, unreadable or truncated, or not a 3D single-component volume.
    """
    path = Path(path)
    header = read_header(path)
    problem = volume_shape_problem(header)
    if problem:
        raise VolumeReadError(path, problem)
    if check_complete:
        check_file_complete(path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_files(path))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise VolumeReadError(path, f"unreadable or truncated file ({itk_reason(exc)})") from None
    return apply_site_geometry(image, site_config)


def write_volume(image: sitk.Image, path: str | Path, *, compress: bool = True) -> Path:
    """Write ``image`` atomically and durably (:func:`shared.atomic.atomic_write` with ``fsync``).

    An interrupted write never leaves a partial file under ``path``. Supported suffixes: WRITABLE_SUFFIXES.
    """
    path = Path(path)
    if not path.name.lower().endswith(WRITABLE_SUFFIXES):
        raise VolumeReadError(
            path, f"cannot write this format atomically; use one of {', '.join(WRITABLE_SUFFIXES)}"
        )
    try:
        atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=compress), fsync=True)
    except RuntimeError as exc:
        raise VolumeReadError(path, f"cannot write ({itk_reason(exc)})") from None
    return path
