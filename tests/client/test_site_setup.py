"""The site's per-process setup: a base is hashed and a site validated once, and again when their files change."""

from __future__ import annotations

import os
import shutil

import pytest

import shared.data.validate as validate
from client.site_setup import BASE_STAMPS, VALIDATION_CACHE, SiteSetup
from client.task import SiteSettings
from shared.base import build_random_base, save_base
from shared.config import load_config
from shared.data.synth import generate_consortium

CONFIG = load_config({"model.cls-depth": 18})


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two small bases of the same architecture (same file size), saved once; tests copy them."""
    root = tmp_path_factory.mktemp("bases")
    return {
        seed: (
            save_base(base := build_random_base("small", cls_depth=18, seed=seed), root / f"b{seed}"),
            base,
        )
        for seed in (0, 1)
    }


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    return generate_consortium(tmp_path_factory.mktemp("sites") / "sites", sites=1, cases=6, seed=11)[0]


def _install(bases, seed: int, where) -> os.PathLike:
    """Copy base ``seed`` to ``where`` (a stem); returns the tensor file's path."""
    tensor, _ = bases[seed]
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(tensor.with_suffix(suffix), where.with_suffix(suffix))
    return where.with_suffix(".safetensors")


def _base(setup: SiteSetup, path, state, *, trust: bool = True):
    return setup.base(path, state, attention_impl="fast", trust_stamp=trust)


def test_a_base_is_hashed_once_per_process_and_again_when_swapped(tmp_path, bases):
    path, state = _install(bases, 0, tmp_path / "base"), tmp_path / "state"
    setup = SiteSetup()
    first = _base(setup, path, state, trust=False)
    assert _base(setup, path, state, trust=False) is first
    assert setup.hashed == 1
    assert first.fingerprints == bases[0][1].fingerprints

    old = os.stat(path)
    _install(bases, 1, tmp_path / "swap")
    os.replace(tmp_path / "swap.safetensors", path)  # same size, and the old mtime
    os.replace(tmp_path / "swap.json", path.with_suffix(".json"))
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    swapped = _base(setup, path, state)
    assert swapped is not first
    assert swapped.fingerprints == bases[1][1].fingerprints
    assert setup.hashed == 2


def test_a_fresh_process_trusts_the_recorded_stamp_except_for_the_query(tmp_path, bases):
    path, state = _install(bases, 0, tmp_path / "base"), tmp_path / "state"
    _base(SiteSetup(), path, state, trust=False)
    assert (state / BASE_STAMPS).is_file()

    fresh = SiteSetup()
    assert _base(fresh, path, state).fingerprints == bases[0][1].fingerprints
    assert fresh.hashed == 0
    query = SiteSetup()
    _base(query, path, state, trust=False)
    assert query.hashed == 1

    _install(bases, 1, tmp_path / "base")  # rewritten in place: size equal, mtime and ctime new
    after = SiteSetup()
    assert _base(after, path, state).fingerprints == bases[1][1].fingerprints
    assert after.hashed == 1


def test_another_path_is_another_base(tmp_path, bases):
    state = tmp_path / "state"
    one, two = _install(bases, 0, tmp_path / "one"), _install(bases, 0, tmp_path / "two")
    setup = SiteSetup()
    first = _base(setup, one, state)
    assert _base(setup, two, state) is not first
    assert setup.hashed == 2  # the stamp recorded for one says nothing about two
    assert set(setup.bases) == {str(two.resolve())}  # a process holds the base it used last only
    _base(setup, one, state)
    assert setup.hashed == 2  # one's recorded stamp still holds


def _settings(site_dir, state) -> SiteSettings:
    return SiteSettings(site_dir, None, site_dir / "unused", "cpu", state)


def test_a_site_is_validated_once_per_run_and_again_when_its_files_change(tmp_path, site_dir, monkeypatch):
    copy = shutil.copytree(site_dir, tmp_path / "site")
    settings, setup = _settings(copy, tmp_path / "state"), SiteSetup()
    first = setup.site(settings, CONFIG, run="1")
    assert setup.site(settings, CONFIG, run="1") is first
    assert setup.validated == 1
    assert (tmp_path / "state" / VALIDATION_CACHE).is_file()

    setup.site(settings, CONFIG, run="2")
    assert setup.validated == 2

    checked, real = [], validate.validate_case

    def counting(case, *args, **kwargs):
        checked.append(case.case_id)
        return real(case, *args, **kwargs)

    monkeypatch.setattr(validate, "validate_case", counting)
    image = first.train_cases[0].image
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 10**9))
    changed = setup.site(settings, CONFIG, run="2")
    assert setup.validated == 3
    assert checked == [first.train_cases[0].case_id]  # the others come from the validation cache
    assert changed is not first
    assert changed.train_cases == first.train_cases


def test_a_fresh_process_reads_no_unchanged_volume_again(tmp_path, site_dir, monkeypatch):
    settings = _settings(site_dir, tmp_path / "state")
    first = SiteSetup().site(settings, CONFIG, run="1")
    monkeypatch.setattr(validate, "validate_case", lambda *a, **k: pytest.fail("a case was re-read"))
    again = SiteSetup().site(settings, CONFIG, run="1")
    assert again.train_cases == first.train_cases
    assert again.val_cases == first.val_cases


def test_another_site_folder_is_validated_on_its_own(tmp_path, site_dir):
    other = shutil.copytree(site_dir, tmp_path / "other")
    setup = SiteSetup()
    setup.site(_settings(site_dir, tmp_path / "a"), CONFIG, run="1")
    site = setup.site(_settings(other, tmp_path / "b"), CONFIG, run="1")
    assert setup.validated == 2
    assert site.site_dir == other
