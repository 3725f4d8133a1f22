"""Atomic file writes: readers see the old file or the new one, never a torn one.

Every writer goes through a temporary file beside the target (same folder, so ``os.replace`` is an atomic
rename on one file system), named ``.fedabus-tmp-<random>-<name>``: hidden, recognisable as a leftover by
:func:`is_temp_file`, and ending in the target's name, so writers that pick a format from the suffix (ITK's
``.nii.gz``) still do. The temporary file is removed when the write fails.

* ``mode``: the temporary file gets exactly this mode before a byte is written, so the target never exists
  with looser permissions (private keys). Without it, the file gets the default mode of a newly created
  file (``0o666`` less the umask), as ``open(path, "w")`` would give it.
* ``fsync``: the data are flushed to disk before the rename, and the folder after it, so a power loss
  leaves the old file or the complete new one (a folder is not synced where the platform cannot open or
  sync folders).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "TMP_PREFIX",
    "atomic_write",
    "fsync_file",
    "fsync_folder",
    "is_temp_file",
    "write_bytes_atomic",
    "write_text_atomic",
]

#: Name prefix of the temporary files of an atomic write (left behind only by a killed process).
TMP_PREFIX = ".fedabus-tmp-"


def is_temp_file(path: Path) -> bool:
    """True for a temporary file of an atomic write (a leftover when no write is running)."""
    return path.name.startswith(TMP_PREFIX)


def fsync_file(path: Path) -> None:
    """Flush the data of the file at ``path`` to disk."""
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if (
            exc.errno != errno.EINVAL
        ):  # EINVAL: the file system cannot sync folders; anything else is an error
            raise
    finally:
        os.close(fd)


def _create_temp(path: Path, mode: int | None) -> Path:
    """Create an empty temporary file beside ``path`` (``mode`` set before it holds data) and return it."""
    for _ in range(100):
        tmp = path.with_name(f"{TMP_PREFIX}{secrets.token_hex(6)}-{path.name}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode & 0o777)
        except FileExistsError:
            continue
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # the umask may have removed bits the caller asked for
        finally:
            os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def atomic_write(
    path: str | Path, write: Callable[[Path], None], *, fsync: bool = False, mode: int | None = None
) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (it exists, empty), then move it into place.

    ``write`` may truncate or re-create ``tmp``; with ``mode`` the file is given that mode again before the
    move. The parent folder is created. Module docstring: ``fsync`` and ``mode``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path, mode)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_folder(path.parent)


def write_bytes_atomic(
    path: str | Path, data: bytes, *, fsync: bool = False, mode: int | None = None
) -> None:
    """Replace the file at ``path`` by ``data`` atomically (module docstring: ``fsync`` and ``mode``)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync, mode=mode)


def write_text_atomic(
    path: str | Path, text: str, *, fsync: bool = False, mode: int | None = None, encoding: str = "utf-8"
) -> None:
    """Replace the file at ``path`` by ``text`` (``encoding``, newlines written as given) atomically."""
    write_bytes_atomic(path, text.encode(encoding), fsync=fsync, mode=mode)
