"""Model selection looks at validation only: poisoning the test split changes nothing that selection saw or
chose; the chosen adapter is the one left in the models."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from shared.adapters import lora_specs_from_config
from shared.base import build_random_base, wrap_for_training
from shared.config import load_config
from shared.data.synth import generate_consortium
from shared.training.selection import train_with_selection
from shared.training.site import evaluate_site, open_site

CONFIG = {
    "model.cls-depth": 18,
    "train.seg-epochs": 1,
    "train.cls-epochs": 1,
    "train.eval-clicks": 2,
    "train.seg-click-iterations": 1,
    "train.seg-lr": 5e-3,
    "train.progress": False,
}


def _select(site, config):
    base = build_random_base("small", cls_depth=18, seed=0)
    torch.manual_seed(0)
    models = wrap_for_training(base, lora_specs_from_config(config.adapter))
    selection = train_with_selection(
        models, site, config, device=torch.device("cpu"), rounds=2, fingerprints=base.fingerprints, seed=0
    )
    return models, selection


def _poison(site) -> None:
    """Every test image becomes noise: anything ranking on test would see a different world."""
    rng = np.random.default_rng(0)
    for case in site.test_cases:
        image = sitk.ReadImage(str(case.image))
        noise = sitk.GetImageFromArray(
            rng.normal(size=sitk.GetArrayFromImage(image).shape).astype(np.float32)
        )
        noise.CopyInformation(image)
        sitk.WriteImage(noise, str(case.image))


@pytest.mark.slow
def test_selection_is_unchanged_when_the_test_split_is_poisoned(tmp_path):
    site_dir = generate_consortium(tmp_path / "sites", sites=1, cases=10, seed=2)[0]
    config = load_config(CONFIG)
    site = open_site(site_dir)
    assert site.val_cases and site.test_cases and not site.val_carved
    models, clean = _select(site, config)
    assert set(clean.history) == {0, 1, 2} and clean.metric == "val/dice_1click"
    chosen = evaluate_site(models, site, config, device=torch.device("cpu"), split="val")
    assert chosen["val/dice_1click"] == pytest.approx(clean.history[clean.chosen_round]["val/dice_1click"])

    _poison(site)
    _, poisoned = _select(open_site(site_dir), config)
    assert poisoned.chosen_round == clean.chosen_round
    assert poisoned.history == clean.history


def test_a_site_without_validation_cases_gets_them_carved_from_train(tmp_path):
    site_dir = generate_consortium(tmp_path / "sites", sites=1, cases=10, seed=2)[0]
    manifest = site_dir / "manifest.csv"
    assert manifest.is_file(), "the first synthetic site uses the manifest layout"
    manifest.write_text(  # every val case becomes a training case
        manifest.read_text(encoding="utf-8").replace(",val,", ",train,"), encoding="utf-8"
    )
    plain = open_site(site_dir, val_fraction=0.0)
    carved = open_site(site_dir, val_fraction=0.25, seed=1)
    assert not plain.val_cases and carved.val_carved and carved.val_cases
    assert len(carved.train_cases) + len(carved.val_cases) == len(plain.train_cases)
    assert open_site(site_dir, val_fraction=0.25, seed=1).val_cases == carved.val_cases
