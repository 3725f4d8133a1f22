"""data.case-cache-mb: loaders give the same items with and without the process cache of preprocessed cases; the
cache hands out copies, notices changed files, and stays within its limit."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import ConfigError, DataConfig, load_config, load_site_config
from shared.data.case_cache import MIB, PROCESS_CACHE, CaseCache, case_key
from shared.data.loaders import LoadCased, cls_loader, seg_eval_loader, seg_train_loader, site_cases
from shared.data.synth import SynthOptions, generate_consortium
from tests.shared.data.test_loaders import CONFIG  # the small data config of the loader tests

CACHED = dataclasses.replace(CONFIG, case_cache_mb=64)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("sites")
    options = SynthOptions(shape=(32, 40, 40), lesion_median_cm3=0.2, second_lesion_prob=0.0)
    (site_dir,) = generate_consortium(out, sites=1, cases=4, seed=7, options=options)
    return site_dir, load_site_config(out / f"{site_dir.name}.toml")


@pytest.fixture(autouse=True)
def empty_cache():
    PROCESS_CACHE.clear()
    yield
    PROCESS_CACHE.clear()


def _epochs(make_loader, epochs: int = 2) -> list[dict]:
    loader = make_loader()
    return [batch for _ in range(epochs) for batch in loader]


def _assert_same(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
            elif isinstance(a[key], np.ndarray):
                assert np.array_equal(a[key], b[key]), key
            elif key != "blocks":
                assert a[key] == b[key], key


@pytest.mark.parametrize("kind", ["seg", "cls", "eval"])
def test_items_are_the_same_with_the_cache(site, kind) -> None:
    site_dir, site_config = site
    cases = site_cases(site_dir, site_config)

    def make(config: DataConfig):
        if kind == "seg":  # augmented, two epochs: the random draws after loading stay as they were
            return lambda: seg_train_loader(cases, config, batch_size=2, site_config=site_config, seed=3)
        if kind == "cls":
            return lambda: cls_loader(cases, config, batch_size=2, site_config=site_config, seed=3)
        return lambda: seg_eval_loader(cases, config, site_config=site_config)

    plain = _epochs(make(CONFIG))
    assert len(PROCESS_CACHE) == 0  # data.case-cache-mb = 0 keeps nothing
    cached_first = _epochs(make(CACHED))
    assert PROCESS_CACHE.misses == len(cases) and PROCESS_CACHE.hits == len(cases)  # epoch 2 read nothing
    cached_again = _epochs(make(CACHED))  # a later message of the same process: every case from memory
    assert PROCESS_CACHE.hits == 3 * len(cases)
    _assert_same(plain, cached_first)
    _assert_same(plain, cached_again)


def test_a_hit_is_a_copy_and_a_changed_file_is_read_again(site) -> None:
    site_dir, site_config = site
    case = site_cases(site_dir, site_config)[0]
    load = LoadCased(CACHED, site_config)
    first = load({"case": case})
    first["image"][...] = 0.0  # a transform writing into its item cannot change what the next reader gets
    second = load({"case": case})
    assert PROCESS_CACHE.hits == 1 and second["image"].any()
    second["mask"][...] = 0
    assert load({"case": case})["mask"].any()
    stat = case.image.stat()
    os.utime(case.image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the file changed
    load({"case": case})
    assert PROCESS_CACHE.misses == 2


def test_the_key_is_the_files_the_config_and_the_overrides(site) -> None:
    site_dir, site_config = site
    case = site_cases(site_dir, site_config)[0]
    assert case_key(case, CONFIG, site_config) == case_key(case, CACHED, site_config)  # the limit is no part
    assert case_key(case, CONFIG, site_config) != case_key(
        case, dataclasses.replace(CONFIG, spacing_z=0.5), site_config
    )
    assert case_key(case, CONFIG, site_config) != case_key(case, CONFIG, None)


def test_least_recently_used_beyond_the_limit_and_never_an_oversized_item() -> None:
    cache = CaseCache()
    item = lambda n: {"image": np.zeros(n, dtype=np.uint8), "case_id": "x"}  # noqa: E731
    for key in "abc":
        cache.load(key, lambda: item(MIB // 2), max_bytes=MIB)
    assert len(cache) == 2 and cache.nbytes == MIB  # "a" went first
    cache.load("b", lambda: item(MIB // 2), max_bytes=MIB)  # "b" is now the most recent
    cache.load("d", lambda: item(MIB // 2), max_bytes=MIB)
    cache.load("b", lambda: pytest.fail("b was dropped"), max_bytes=MIB)
    cache.load("c", lambda: item(MIB // 2), max_bytes=MIB)  # "c" went when "d" came; now "d" goes
    assert cache.misses == 5
    big = cache.load("e", lambda: item(2 * MIB), max_bytes=MIB)
    assert big["image"].size == 2 * MIB and cache.nbytes <= MIB and len(cache) == 2


def test_the_setting_is_a_run_config_key() -> None:
    assert load_config({"data.case-cache-mb": 256}).data.case_cache_mb == 256
    with pytest.raises(ConfigError, match="case-cache-mb"):
        load_config({"data.case-cache-mb": -1})
