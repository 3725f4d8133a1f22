"""A site's private round end to end (shared/training/site.py): plan, DP-SGD of both models, ledger, metrics.

The SAM-Med3D base is the ``small`` preset shrunk to 32³ crops and the classifier a ResNet-18 on 32-pixel
planes, on a synthetic site, so a round takes a few seconds on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from shared.adapters import extract_adapter
from shared.config import load_config
from shared.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger
from shared.privacy.planning import plan_private_round
from shared.privacy.validation import PrivacyConfigError
from shared.training import site as site_module
from shared.training.seg import dp_untrained_parameters
from shared.training.site import train_site
from tests.shared.tiny_sam import TINY_RUN

RUN = {
    **TINY_RUN,
    "train.seg-click-iterations": 2,
    "train.seg-clicks-per-step": 2,
    "privacy.sample-dp": True,
    "privacy.target-epsilon": 20.0,
}
METRICS = {
    "num-examples",
    "privacy/seg_epsilon",
    "privacy/cls_epsilon",
    "privacy/delta",
    "privacy/noise_multiplier_seg",
    "privacy/noise_multiplier_cls",
}


# tiny_*: tests/shared/conftest.py


@pytest.fixture
def site(tiny_site):
    return tiny_site


@pytest.fixture
def fresh_models(tiny_models):
    return lambda: tiny_models(load_config(RUN).adapter)


def adapter(base, models) -> dict[str, torch.Tensor]:
    return extract_adapter(models, base_fingerprints=base.fingerprints).tensors


def test_private_rounds_spend_the_budget_and_record_it(site, fresh_models, tmp_path) -> None:
    config = load_config(RUN)
    n = len(site.train_cases)
    base, models = fresh_models()
    start = adapter(base, models)
    metrics = []
    for server_round in (1, 2):
        plan = plan_private_round(
            config, n, 2, PrivacyLedger.open(tmp_path), server_round=server_round, run="t"
        )
        assert plan.allowed
        metrics.append(
            train_site(
                models,
                site,
                config,
                device=torch.device("cpu"),
                seed=server_round,
                proximal=True,
                plan=plan,
                ledger=PrivacyLedger.open(tmp_path),
            )
        )
    assert set(metrics[0]) == METRICS and metrics[0]["num-examples"] == n
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    assert 0 < metrics[0]["privacy/seg_epsilon"] < metrics[1]["privacy/seg_epsilon"] <= 20.0
    assert metrics[1]["privacy/delta"] == pytest.approx(1 / (10 * n))
    ledger = PrivacyLedger.open(tmp_path)
    for name in ("seg", "cls"):
        entries = ledger.entries(name)
        assert [e.round for e in entries] == [1, 2] and {e.run for e in entries} == {"t"}
        sigma = metrics[1][f"privacy/noise_multiplier_{name}"]
        accountant = RDPAccountant()
        accountant.history = [(sigma, plan.models[name].sample_rate, 2 * plan.models[name].steps)]
        expected = accountant.get_epsilon(delta=plan.delta)
        assert ledger.epsilon(name, plan.delta) == metrics[1][f"privacy/{name}_epsilon"] == expected
    after = adapter(base, models)
    assert set(after) == set(start)  # frozen parameters still travel
    frozen = "seg.prompt_encoder.point_embeddings.0.weight"
    assert torch.equal(after[frozen], start[frozen])
    assert any(not torch.equal(after[k], start[k]) for k in start if k.startswith("seg.") and "lora_B" in k)
    assert any(not torch.equal(after[k], start[k]) for k in start if k.startswith("cls.head."))
    over = plan_private_round(config, n, 2, ledger, server_round=3)
    assert not over.allowed
    with pytest.raises(PrivacyBudgetExceeded, match="budget"):
        train_site(models, site, config, device=torch.device("cpu"), plan=over, ledger=ledger)
    assert PrivacyLedger.open(tmp_path).steps("seg") == 2 * plan.seg.steps


def test_nothing_is_recorded_when_a_round_fails(site, fresh_models, tmp_path, monkeypatch) -> None:
    config = load_config(RUN)
    _, models = fresh_models()
    plan = plan_private_round(config, len(site.train_cases), 2, PrivacyLedger.open(tmp_path))

    def broken(*args, **kwargs):
        raise RuntimeError("classifier training failed")

    monkeypatch.setattr(site_module, "train_classifier", broken)
    ledger = PrivacyLedger.open(tmp_path)
    with pytest.raises(RuntimeError, match="classifier training failed"):
        train_site(models, site, config, device=torch.device("cpu"), plan=plan, ledger=ledger)
    assert PrivacyLedger.open(tmp_path).steps("seg") == 0 and not ledger.path.exists()


def test_a_private_round_needs_a_plan_and_a_ledger(site, fresh_models, tmp_path) -> None:
    _, models = fresh_models()
    with pytest.raises(ValueError, match="plan="):
        train_site(models, site, load_config(RUN), device=torch.device("cpu"))
    other = plan_private_round(load_config(RUN), len(site.train_cases) + 1, 2, PrivacyLedger.open(tmp_path))
    with pytest.raises(ValueError, match="training cases"):
        train_site(
            models,
            site,
            load_config(RUN),
            device=torch.device("cpu"),
            plan=other,
            ledger=PrivacyLedger.open(tmp_path),
        )


def test_the_dp_recipe_keys_batch_and_trainable_set(site, fresh_models, tmp_path) -> None:
    """privacy.seg-batch-size = 6 (every case each step, in physical batches of 2) and privacy.seg-trainable = ""
    (LoRA only): one DP step per epoch at q = 1, the mask decoder keeps its value and still travels, LoRA B moves."""
    config = load_config({**RUN, "privacy.seg-batch-size": 6, "privacy.seg-trainable": ""})
    base, models = fresh_models()
    start = adapter(base, models)
    plan = plan_private_round(config, len(site.train_cases), 2, PrivacyLedger.open(tmp_path))
    assert (plan.seg.sample_rate, plan.seg.steps, plan.seg.physical_batch_size) == (1.0, 1, 2)
    train_site(
        models, site, config, device=torch.device("cpu"), plan=plan, ledger=PrivacyLedger.open(tmp_path)
    )
    after = adapter(base, models)
    assert set(after) == set(start)
    decoder = [k for k in start if k.startswith("seg.mask_decoder.")]
    assert decoder and all(torch.equal(after[k], start[k]) for k in decoder)
    assert any(not torch.equal(after[k], start[k]) for k in start if k.startswith("seg.") and "lora_B" in k)
    with pytest.raises(PrivacyConfigError, match="privacy.seg-trainable names 'image_encoder'"):
        dp_untrained_parameters(models["seg"], "image_encoder")
