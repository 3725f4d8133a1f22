"""Fixtures of the tests that train a whole site round on the tiny models (tests/shared/tiny_sam.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_site(tmp_path_factory):
    """One synthetic site of 6 small cases (40×48×48 voxels, one lesion of about 0.3 cm³ each, seed 3), opened
    with :func:`shared.training.site.open_site` (read-only for the tests)."""
    from shared.data.synth import SynthOptions, generate_consortium
    from shared.training.site import open_site

    options = SynthOptions(shape=(40, 48, 48), lesion_median_cm3=0.3, second_lesion_prob=0.0)
    site_dir = generate_consortium(
        tmp_path_factory.mktemp("tiny-site"), sites=1, cases=6, seed=3, options=options
    )[0]
    return open_site(site_dir)


@pytest.fixture
def tiny_models():
    """``build(adapter_config) -> (base, models)``: a fresh random tiny SAM-Med3D and ResNet-18 tri-plane base
    (seed 0) and both models wrapped for training as ``adapter_config`` (``[adapter]``) says."""
    from shared.adapters import lora_specs_from_config
    from shared.base import build_random_base, wrap_for_training
    from tests.shared.tiny_sam import TINY_SAM

    def build(adapter_config):
        base = build_random_base(TINY_SAM, cls_depth=18, cls_norm_groups=8, seed=0)
        return base, wrap_for_training(base, lora_specs_from_config(adapter_config))

    return build
