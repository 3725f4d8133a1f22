"""Atomic writes (shared/atomic.py): old content survives a failed write, modes, fsync, no temp leftovers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shared import atomic
from shared.atomic import atomic_write, is_temp_file, write_bytes_atomic, write_text_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_crash_during_the_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_text_atomic(target, "old\n")

    def crash(tmp: Path) -> None:
        tmp.write_text("half of the n")
        raise KeyboardInterrupt  # a BaseException, like the interrupt of a real crash

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash, fsync=True)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_the_new_content_replaces_the_old_and_folders_are_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "image.nii.gz"
    write_bytes_atomic(target, b"first")
    seen: list[str] = []
    atomic_write(target, lambda tmp: (seen.append(tmp.name), tmp.write_bytes(b"second")))
    assert target.read_bytes() == b"second"
    assert is_temp_file(Path(seen[0])) and seen[0].endswith("-image.nii.gz")  # the suffix picks ITK's format
    assert [p.name for p in target.parent.iterdir()] == ["image.nii.gz"]


def test_mode_is_set_before_the_first_byte_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "site.key"
    modes: list[int] = []
    old_umask = os.umask(0)  # a permissive umask must not widen the file, even for a moment
    try:
        atomic_write(target, lambda tmp: (modes.append(_mode(tmp)), tmp.write_bytes(b"secret")), mode=0o600)
        write_bytes_atomic(tmp_path / "site.pub", b"public", mode=0o644)
    finally:
        os.umask(old_umask)
    assert modes == [0o600] and _mode(target) == 0o600
    assert _mode(tmp_path / "site.pub") == 0o644


def test_without_a_mode_the_file_gets_the_default_of_a_new_file(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old_umask)
    assert _mode(tmp_path / "report.html") == 0o644


def test_fsync_flushes_the_file_and_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", recording_fsync)
    write_text_atomic(tmp_path / "LATEST", "round-0001\n")
    assert synced == []
    write_text_atomic(tmp_path / "LATEST", "round-0002\n", fsync=True)
    assert synced == ["file", "folder"]
    assert (tmp_path / "LATEST").read_text() == "round-0002\n"
