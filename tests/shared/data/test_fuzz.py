"""Fuzzed site data (issue 17 item 4): a synthetic site with one file corrupted at random (seeded) per test.

For every corruption kind, on both layouts (manifest + NIfTI, TDSC + NRRD):

(a) ``fedabus validate --json`` names the case, the file and the reason, with exit status 1 and no traceback;
(b) the data path of a ClientApp round (:func:`shared.training.site.open_site`, then the loaders of
    ``train_site``/``evaluate_site``) skips the bad case and logs why, as docs/data.md promises; a site left
    without a training case declines with the reason; a real tiny round on a site holding every kind at once
    trains and evaluates on the good cases;
(c) nothing is written: every file of the site (the corrupted one included) is byte for byte what it was, and
    the files the corruption did not touch are still the generator's.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import math
import os
import random
import shutil
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared.cli import main
from shared.data import io as io_module
from shared.data.layouts import CaseRecord, discover_site
from shared.data.synth import SynthOptions, generate_consortium

OPTIONS = SynthOptions(shape=(24, 24, 28), lesion_median_cm3=0.05, second_lesion_prob=0.0)
LAYOUTS = ("site_a", "site_b")  # manifest + NIfTI, TDSC + NRRD (the generator's first two sites)
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------- the corruptions


@dataclass(frozen=True)
class Corruption:
    """What a corruption did: the case, the file it broke (named in the message), the expected reason and a
    detail the message must also hold (e.g. the offending mask value)."""

    case_id: str
    path: Path
    reason: str
    detail: str = ""


def _pick(case: CaseRecord, rng: random.Random) -> Path:
    """The image or the mask of ``case``, at random."""
    assert case.mask is not None
    return rng.choice((case.image, case.mask))


def _rewrite(path: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    """Replace the voxels of ``path`` by ``change(voxels)``, keeping its format and geometry."""
    image = sitk.ReadImage(str(path))
    out = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)))
    out.SetSpacing(image.GetSpacing())
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
    sitk.WriteImage(out, str(path), useCompression=True)


def truncated(case: CaseRecord, rng: random.Random) -> Corruption:
    path = _pick(case, rng)
    data = path.read_bytes()
    path.write_bytes(data[: rng.randint(1, len(data) - 1)])
    return Corruption(case.case_id, path, "unreadable or truncated file")


def broken_header(case: CaseRecord, rng: random.Random) -> Corruption:
    path = _pick(case, rng)
    data = bytearray(path.read_bytes())
    size = rng.randint(4, 48)
    data[:size] = rng.randbytes(size)
    path.write_bytes(bytes(data))
    return Corruption(case.case_id, path, "unreadable or truncated file")


def wrong_dimensions(case: CaseRecord, rng: random.Random) -> Corruption:
    """The mask loses or gains 1-4 voxels along one axis (same spacing and origin)."""
    assert case.mask is not None
    axis, by = rng.randrange(3), rng.randint(1, 4)

    def resize(mask: np.ndarray) -> np.ndarray:
        if rng.random() < 0.5:
            return np.take(mask, range(mask.shape[axis] - by), axis=axis)
        widths = [(0, by if a == axis else 0) for a in range(3)]
        return np.pad(mask, widths)

    _rewrite(case.mask, resize)
    return Corruption(case.case_id, case.mask, "image/mask geometry mismatch: size")


def nan_inf(case: CaseRecord, rng: random.Random) -> Corruption:
    """A few image voxels become NaN, +Inf or -Inf (the image is stored as float32)."""

    def poison(image: np.ndarray) -> np.ndarray:
        out = image.astype(np.float32)
        for _ in range(rng.randint(1, 5)):
            out[tuple(rng.randrange(n) for n in out.shape)] = rng.choice((math.nan, math.inf, -math.inf))
        return out

    _rewrite(case.image, poison)
    return Corruption(case.case_id, case.image, "NaN/Inf intensities")


def _mask_label(value: float, dtype: type) -> Callable[[CaseRecord, random.Random], Corruption]:
    """Some lesion voxels (or all of them) take ``value``; the mask is stored as ``dtype``."""

    def corrupt(case: CaseRecord, rng: random.Random) -> Corruption:
        assert case.mask is not None

        def relabel(mask: np.ndarray) -> np.ndarray:
            out = mask.astype(dtype)
            lesion = np.argwhere(out == 1)
            chosen = lesion if rng.random() < 0.3 else rng.sample(list(lesion), rng.randint(1, len(lesion)))
            for index in chosen:
                out[tuple(index)] = value
            return out

        _rewrite(case.mask, relabel)
        shown = f"{float(np.array(value, dtype)):g}"  # as the validator prints it
        return Corruption(case.case_id, case.mask, "non-binary mask: values", shown)

    return corrupt


def missing_image(case: CaseRecord, rng: random.Random) -> Corruption:
    case.image.unlink()
    return Corruption(case.case_id, case.image, "missing file (does not exist)")


def missing_mask(case: CaseRecord, rng: random.Random) -> Corruption:
    assert case.mask is not None
    case.mask.unlink()
    return Corruption(case.case_id, case.mask, "missing file (does not exist)")


def unreadable(case: CaseRecord, rng: random.Random) -> Corruption:
    """chmod 000. Root reads such a file anyway: the tests then deny the open itself (see ``deny_open``)."""
    path = _pick(case, rng)
    path.chmod(0)
    return Corruption(case.case_id, path, "unreadable: permission denied")


def empty_file(case: CaseRecord, rng: random.Random) -> Corruption:
    path = _pick(case, rng)
    path.write_bytes(b"")
    return Corruption(case.case_id, path, "empty file (0 bytes)")


def zero_size_dimension(case: CaseRecord, rng: random.Random) -> Corruption:
    """The header gives one axis a length of 0 (the voxel data is left as it was)."""
    path, axis = _pick(case, rng), rng.randrange(3)
    data = path.read_bytes()
    if path.name.endswith(".nii.gz"):
        header = bytearray(gzip.decompress(data))
        struct.pack_into("<h", header, 42 + 2 * axis, 0)  # dim[1 + axis] of the NIfTI-1 header
        path.write_bytes(gzip.compress(bytes(header)))
    else:
        end = data.index(b"\n\n")
        lines = data[:end].decode("latin-1").split("\n")
        sizes = next(i for i, line in enumerate(lines) if line.startswith("sizes:"))
        numbers = lines[sizes].split(":", 1)[1].split()
        numbers[axis] = "0"
        lines[sizes] = "sizes: " + " ".join(numbers)
        path.write_bytes("\n".join(lines).encode("latin-1") + data[end:])
    return Corruption(case.case_id, path, "zero-size dimension")


def directory(case: CaseRecord, rng: random.Random) -> Corruption:
    """The file is replaced by a folder of the same name (empty, or holding a stray text file)."""
    path = _pick(case, rng)
    path.unlink()
    path.mkdir()
    if rng.random() < 0.5:
        (path / "notes.txt").write_text("not a volume\n", encoding="utf-8")
    return Corruption(case.case_id, path, "a folder where a volume file is expected")


KINDS: dict[str, Callable[[CaseRecord, random.Random], Corruption]] = {
    "truncated": truncated,
    "broken_header": broken_header,
    "wrong_dimensions": wrong_dimensions,
    "nan_inf": nan_inf,
    "mask_label_2": _mask_label(2, np.uint8),
    "mask_label_255": _mask_label(255, np.uint8),
    "mask_label_negative": _mask_label(-1, np.int16),
    "mask_label_fraction": _mask_label(0.375, np.float32),
    "missing_image": missing_image,
    "missing_mask": missing_mask,
    "unreadable": unreadable,
    "empty_file": empty_file,
    "zero_size_dimension": zero_size_dimension,
    "directory": directory,
}


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny generated sites (6 cases each) and their site TOMLs, never modified."""
    root = tmp_path_factory.mktemp("pristine")
    generate_consortium(root, sites=2, cases=6, seed=11, options=OPTIONS)
    return root


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sites with enough cases for one corruption of every kind plus good training and test cases."""
    root = tmp_path_factory.mktemp("crowded")
    generate_consortium(root, sites=2, cases=len(KINDS) + 4, seed=12, options=OPTIONS)
    return root


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry under ``folder``: relative path -> ("dir", mode) or ("file", mode, sha256)."""
    entries: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            entries[str(path.relative_to(folder))] = ("dir", mode)
            continue
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except PermissionError:  # chmod 000 while not root: the size and mtime stand in for the bytes
            digest = f"size {path.stat().st_size}, mtime {path.stat().st_mtime_ns}"
        entries[str(path.relative_to(folder))] = ("file", mode, digest)
    return entries


@dataclass(frozen=True)
class BrokenSite:
    """A copied site after its corruptions: ``before``/``after`` are snapshots of the copy around them."""

    site_dir: Path
    toml: Path
    bad: list[Corruption]
    before: dict[str, object]
    after: dict[str, object]


#: Which corruptions to apply, given the site's cases: (kind, seed, case or None for a case drawn by the seed).
Plan = Callable[[list[CaseRecord]], list[tuple[str, int, CaseRecord | None]]]


@pytest.fixture
def break_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``break_site(root, name, plan)``: copy the generated site ``name`` (and its TOML, where open_site finds
    it) into tmp_path and apply ``plan``. For root, who reads a chmod 000 file anyway, opening such a file in
    shared.data.io fails with EACCES, as the kernel makes it fail for anyone else. Permissions are restored
    afterwards."""
    denied: set[Path] = set()

    def guarded_open(file, *args, **kwargs):
        if Path(file) in denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(io_module, "open", guarded_open, raising=False)

    def make(root: Path, name: str, plan: Plan) -> BrokenSite:
        site_dir = tmp_path / name
        shutil.copytree(root / name, site_dir)
        shutil.copy2(root / f"{name}.toml", tmp_path / f"{name}.toml")
        before = snapshot(site_dir)
        cases = sorted(discover_site(site_dir).cases, key=lambda c: c.case_id)
        bad = []
        for kind, seed, case in plan(cases):
            rng = random.Random(seed)
            bad.append(KINDS[kind](case or rng.choice(cases), rng))
            if kind == "unreadable" and os.geteuid() == 0:
                denied.add(bad[-1].path)
        return BrokenSite(site_dir, tmp_path / f"{name}.toml", bad, before, snapshot(site_dir))

    yield make
    for path in tmp_path.rglob("*"):
        if path.is_file() and not stat.S_IMODE(path.stat().st_mode):
            path.chmod(0o644)


# ---------------------------------------------------------------- one corruption at a time


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_corrupted_file_is_named_skipped_and_left_alone(
    kind: str,
    seed: int,
    pristine: Path,
    break_site,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from shared.training.site import open_site

    site = break_site(pristine, LAYOUTS[seed % 2], lambda cases: [(kind, seed, None)])
    (bad,) = site.bad

    # (a) validation names the case, the file and the reason, and exits 1 without a traceback
    status = main(["validate", str(site.site_dir), "--site-config", str(site.toml), "--json"])
    out, err = capsys.readouterr()
    assert status == 1 and "Traceback" not in out + err
    results = {entry["case_id"]: entry for entry in json.loads(out)["cases"]}
    assert [c for c, r in results.items() if not r["ok"]] == [bad.case_id]
    errors = results[bad.case_id]["errors"]
    assert any(str(bad.path) in e and bad.reason in e and bad.detail in e for e in errors), (bad, errors)
    assert all(e.startswith(f"case {bad.case_id!r}: ") and "unexpected failure" not in e for e in errors)

    # (b) the round's data path skips exactly that case and logs why
    with caplog.at_level(logging.WARNING):
        data = open_site(site.site_dir)
    kept = [c.case_id for split in ("train", "val", "test") for c in data.cases(split)]
    assert bad.case_id not in kept and len(kept) == len(results) - 1
    assert "skipping 1 of" in caplog.text and bad.reason in caplog.text and str(bad.path) in caplog.text

    # (c) nothing was written: the site is as the corruption left it, and the rest is the generator's
    assert snapshot(site.site_dir) == site.after
    broken = str(bad.path.relative_to(site.site_dir))
    untouched = {k: v for k, v in site.before.items() if k != broken and not k.startswith(broken + os.sep)}
    assert untouched == {k: v for k, v in site.after.items() if k in untouched}


# ---------------------------------------------------------------- a site that cannot train


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_site_whose_training_cases_are_all_bad_declines_with_the_reason(
    name: str, pristine: Path, break_site, caplog: pytest.LogCaptureFixture
) -> None:
    from shared.training.site import open_site

    kinds = sorted(KINDS)
    site = break_site(
        pristine,
        name,
        lambda cases: [(kinds[i], i, c) for i, c in enumerate(c for c in cases if c.split == "train")],
    )
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="no usable training case"):
        open_site(site.site_dir)
    assert f"skipping {len(site.bad)} of {len(site.bad)} cases" in caplog.text
    assert site.bad[0].reason in caplog.text
    assert snapshot(site.site_dir) == site.after


# ---------------------------------------------------------------- every kind at once, through a real round


def _every_kind(cases: list[CaseRecord]) -> list[tuple[str, int, CaseRecord | None]]:
    """One case of each kind, sparing the first training and the first test case."""
    keep = {next(c for c in cases if c.split == split).case_id for split in ("train", "test")}
    victims = random.Random(len(cases)).sample([c for c in cases if c.case_id not in keep], len(KINDS))
    return [(kind, i, case) for i, (kind, case) in enumerate(zip(sorted(KINDS), victims, strict=True))]


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_round_on_a_site_with_every_kind_of_bad_file_trains_and_evaluates_on_the_rest(
    name: str, crowded: Path, break_site, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    from shared.adapters import lora_specs_from_config
    from shared.base import build_random_base, wrap_for_training
    from shared.config import load_config
    from shared.training.site import evaluate_site, open_site, train_site
    from tests.shared.tiny_sam import TINY_SAM, P

    site = break_site(crowded, name, _every_kind)
    config = load_config(
        {
            "data.patch-size": P,
            "data.crop-jitter-voxels": 2,
            "data.planes-frames": 1,
            "data.planes-size": 32,
            "data.block-min-lesion-voxels": 1,
            "model.cls-depth": 18,
            "model.cls-norm-groups": 8,
            "train.seg-epochs": 1,
            "train.seg-batch-size": 2,
            "train.seg-click-iterations": 1,
            "train.cls-epochs": 1,
            "train.cls-batch-size": 2,
            "train.eval-clicks": 1,
            "train.progress": False,
        }
    )
    with caplog.at_level(logging.WARNING):
        data = open_site(site.site_dir)
    kept = {c.case_id for split in ("train", "val", "test") for c in data.cases(split)}
    everyone = {c.case_id for c in discover_site(site.site_dir).cases}
    assert kept == everyone - {b.case_id for b in site.bad} and "skipping" in caplog.text

    base = build_random_base(TINY_SAM, cls_depth=18, cls_norm_groups=8, seed=0)
    torch.manual_seed(0)
    models = wrap_for_training(base, lora_specs_from_config(config.adapter))
    cpu = torch.device("cpu")
    trained = train_site(models, data, config, device=cpu, seed=1)
    assert trained["num-examples"] == len(data.train_cases) > 0
    assert all(math.isfinite(v) for v in trained.values()), trained
    tested = evaluate_site(models, data, config, device=cpu, split="test")
    assert tested["num-examples"] == len(data.test_cases) > 0
    assert snapshot(site.site_dir) == site.after
