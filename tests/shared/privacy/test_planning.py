"""Round planning and budget checks (shared/privacy/planning.py), validation (validation.py), sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from shared.config import load_config
from shared.models.triplane import build_triplane_classifier
from shared.privacy.ledger import PrivacyLedger
from shared.privacy.planning import RoundPlan, plan_private_round, privacy_budget
from shared.privacy.sampling import OneFramePerCase, poisson_loader, poisson_sampling
from shared.privacy.validation import PrivacyConfigError, check_no_running_stats, validate_privacy

N_CASES = 20
#: Segmentation: batch 4 of 20 cases (q = 0.2, 5 steps per epoch), 2 epochs; classifier: batch 8 (q = 0.4,
#: 3 steps per epoch), 1 epoch.
TRAIN = {
    "privacy.seg-batch-size": 0,
    "train.seg-batch-size": 4,
    "train.seg-epochs": 2,
    "train.cls-batch-size": 8,
    "train.cls-epochs": 1,
}


def dp_config(**values: object):
    return load_config({"privacy.sample-dp": True, **TRAIN, **values})


def spend(ledger: PrivacyLedger, plan: RoundPlan) -> None:
    """Record the plan's steps as the site does after a successful round."""
    for name, model in plan.models.items():
        if model.steps == 0:
            continue
        ledger.record(
            name,
            noise_multiplier=model.noise_multiplier,
            sample_rate=model.sample_rate,
            steps=model.steps,
            accountant=plan.accountant,
            round=plan.server_round,
            run=plan.run,
        )
    ledger.save(budget=plan.budget, delta=plan.delta)


def test_target_epsilon_is_spread_over_the_planned_run(tmp_path) -> None:
    config = dp_config(**{"privacy.target-epsilon": 3.0})
    for server_round in (1, 2):
        ledger = PrivacyLedger.open(tmp_path)
        plan = plan_private_round(config, N_CASES, 2, ledger, server_round=server_round, run="study")
        assert plan.allowed and plan.reason == ""
        assert (plan.seg.sample_rate, plan.seg.steps_per_epoch, plan.seg.steps) == (0.2, 5, 10)
        assert (plan.cls.sample_rate, plan.cls.steps_per_epoch, plan.cls.steps) == (0.4, 3, 3)
        assert plan.delta == pytest.approx(1 / (10 * N_CASES)) and plan.budget == 3.0
        spend(ledger, plan)
        assert PrivacyLedger.open(tmp_path).epsilon("seg", plan.delta) == plan.seg.epsilon_after
    final = PrivacyLedger.open(tmp_path)
    for name, steps in (("seg", 20), ("cls", 6)):
        model = plan.models[name]
        assert 2.95 <= final.epsilon(name, plan.delta) <= 3.0
        accountant = RDPAccountant()
        accountant.history = [(model.noise_multiplier, model.sample_rate, steps)]
        assert final.epsilon(name, plan.delta) == accountant.get_epsilon(delta=plan.delta)
    extra = plan_private_round(config, N_CASES, 2, final, server_round=3)
    assert not extra.allowed
    assert "seg: ε would reach" in extra.reason and "cls:" in extra.reason and "budget 3" in extra.reason


def test_the_segmenter_has_its_own_dp_batch_trained_in_physical_batches(tmp_path) -> None:
    """privacy.seg-batch-size = 10 of 20 cases: q = 0.5, 2 steps per epoch, the noise divided by 10, and physical
    batches of train.seg-batch-size (4); the classifier keeps train.cls-batch-size."""
    config = dp_config(**{"privacy.seg-batch-size": 10, "privacy.target-epsilon": 8.0})
    plan = plan_private_round(config, N_CASES, 1, PrivacyLedger.open(tmp_path))
    seg = plan.seg
    assert (seg.sample_rate, seg.steps_per_epoch, seg.steps, seg.expected_batch_size) == (0.5, 2, 4, 10)
    assert seg.physical_batch_size == 4 and plan.settings("seg").physical_batch_size == 4
    assert plan.settings("seg").expected_batch_size == 10
    assert (plan.cls.sample_rate, plan.cls.expected_batch_size, plan.cls.physical_batch_size) == (0.4, 8, 8)
    default = plan_private_round(dp_config(), N_CASES, 1, PrivacyLedger.open(tmp_path / "b"))
    assert (default.seg.sample_rate, default.seg.expected_batch_size) == (0.2, 4)  # 0: train.seg-batch-size


def test_noise_multiplier_and_delta_as_given_and_no_budget(tmp_path) -> None:
    config = dp_config(**{"privacy.noise-multiplier": 1.3, "privacy.delta": 1e-3})
    ledger = PrivacyLedger.open(tmp_path)
    for _ in range(5):
        plan = plan_private_round(config, N_CASES, 1, ledger)
        assert plan.allowed and plan.budget == math.inf
        assert plan.seg.noise_multiplier == 1.3 and plan.delta == 1e-3
        spend(ledger, plan)
    assert plan.seg.epsilon_after > plan.seg.epsilon_before > 0


def test_the_budget_counts_earlier_runs_and_the_site_budget(tmp_path) -> None:
    config = dp_config(**{"privacy.epsilon-budget": 50.0, "train.cls-epochs": 0})
    ledger = PrivacyLedger.open(tmp_path)
    spend(ledger, plan_private_round(config, N_CASES, 10, ledger, run="earlier"))
    free = plan_private_round(config, N_CASES, 10, PrivacyLedger.open(tmp_path))
    assert free.allowed and free.budget == 50.0
    assert free.cls.steps == 0 and free.cls.noise_multiplier == 0.0 and free.cls.epsilon_after == 0.0
    # a site budget between seg's ε before and after the round: seg may not train, cls (no step) may
    tight = (free.seg.epsilon_before + free.seg.epsilon_after) / 2
    plan = plan_private_round(config, N_CASES, 10, PrivacyLedger.open(tmp_path), site_budget=tight)
    assert plan.budget == tight and not plan.seg.allowed and plan.cls.allowed and not plan.allowed
    assert plan.reason.startswith("seg:") and "cls" not in plan.reason


@pytest.mark.parametrize(
    ("epsilon_budget", "target", "site", "expected"),
    [
        (5.0, 8.0, 0.0, 5.0),
        (0.0, 8.0, 6.0, 6.0),
        (0.0, 8.0, 9.0, 8.0),
        (0.0, 0.0, 4.0, 4.0),
        (0.0, 0.0, 0.0, math.inf),
    ],
)
def test_budget_is_the_smallest_one_given(epsilon_budget, target, site, expected) -> None:
    config = dp_config(**{"privacy.epsilon-budget": epsilon_budget, "privacy.target-epsilon": target})
    assert privacy_budget(config.privacy, site) == expected


def test_a_negative_site_budget_is_refused() -> None:
    with pytest.raises(PrivacyConfigError, match="epsilon-budget"):
        privacy_budget(dp_config().privacy, -1.0)


@pytest.mark.parametrize(
    ("values", "setting"),
    [
        ({"privacy.accountant": "moments"}, "privacy.accountant"),
        ({"privacy.delta": 1 / N_CASES}, "privacy.delta"),
        ({"privacy.delta": 1.5}, "privacy.delta"),
        ({"privacy.max-grad-norm": 0.0}, "privacy.max-grad-norm"),
        ({"privacy.noise-multiplier": 0.0}, "privacy.noise-multiplier"),
        ({"privacy.target-epsilon": -1.0}, "privacy.target-epsilon"),
        ({"privacy.epsilon-budget": float("inf")}, "privacy.epsilon-budget"),
        ({"privacy.client-dp": "sometimes"}, "privacy.client-dp"),
        ({"privacy.client-dp": "server-fixed", "privacy.client-clip-norm": 0.0}, "privacy.client-clip-norm"),
        ({"train.seg-grad-accumulation": 2}, "train.seg-grad-accumulation"),
        ({"train.cls-batch-size": 0}, "train.cls-batch-size"),
        ({"privacy.seg-batch-size": -1}, "privacy.seg-batch-size"),
    ],
)
def test_misconfigurations_are_refused_naming_the_setting(tmp_path, values, setting) -> None:
    config = dp_config(**values)
    with pytest.raises(PrivacyConfigError, match=setting):
        validate_privacy(config, N_CASES)
    with pytest.raises(PrivacyConfigError, match=setting):
        plan_private_round(config, N_CASES, 1, PrivacyLedger.open(tmp_path))


def test_valid_settings_pass_and_client_dp_is_checked_without_sample_dp(tmp_path) -> None:
    validate_privacy(dp_config(**{"privacy.noise-multiplier": 0.0, "privacy.target-epsilon": 2.0}), N_CASES)
    validate_privacy(dp_config(), None)  # the server does not know the sites' case counts
    with pytest.raises(PrivacyConfigError, match="client-dp"):
        validate_privacy(load_config({"privacy.client-dp": "on"}))
    with pytest.raises(ValueError, match="sample-dp"):
        plan_private_round(load_config({}), N_CASES, 1, PrivacyLedger.open(tmp_path))


def test_modules_with_running_statistics_are_refused() -> None:
    with pytest.raises(PrivacyConfigError, match=r"head\.1 normalise"):
        check_no_running_stats(_with_bn())
    with pytest.raises(PrivacyConfigError, match="0 normalise"):
        check_no_running_stats(nn.Sequential(nn.InstanceNorm2d(2, track_running_stats=True)))
    check_no_running_stats(nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.InstanceNorm2d(2)))
    check_no_running_stats(build_triplane_classifier(depth=18, norm_groups=8))


def _with_bn() -> nn.Module:
    model = nn.Module()
    model.conv = nn.Conv2d(1, 2, 3)
    model.head = nn.Sequential(
        nn.ReLU(), nn.BatchNorm2d(2).requires_grad_(False)
    )  # frozen still mixes samples
    return model


def test_poisson_loader_draws_the_planned_steps_and_yields_empty_batches() -> None:
    assert poisson_sampling(20, 8) == (0.4, 3) and poisson_sampling(5, 8) == (1.0, 1)
    assert poisson_sampling(93, 1)[1] == 93  # Opacus' int(1 / q) would give 92
    items = [{"x": torch.tensor([float(i)]), "case_id": f"c{i}"} for i in range(10)]
    loader = poisson_loader(items, sample_rate=0.1, steps_per_epoch=7, keys=("x",), seed=3)
    batches = list(loader)
    assert len(loader) == 7 and len(batches) == 7
    sizes = [0 if batch == [] else len(batch["x"]) for batch in batches]
    assert 0 in sizes and sum(sizes) > 0
    assert all(batch == [] or set(batch) == {"x"} for batch in batches)
    with pytest.raises(ValueError, match="sample rate"):
        poisson_loader(items, sample_rate=0.0, steps_per_epoch=1)


def test_one_frame_per_case_draws_a_single_frame_triplet() -> None:
    planes = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 3, 4, 2, 2)
    lesions = [{"planes": planes[i], "label": torch.tensor(i), "case_id": str(i)} for i in range(2)]
    dataset = OneFramePerCase(lesions, seed=0)
    assert len(dataset) == 2
    frames_seen = set()
    for _ in range(20):
        frames, label = dataset[1]
        assert frames.shape == (3, 1, 2, 2) and label.item() == 1 and label.dtype == torch.int64
        frame = int(np.argwhere((planes[1, 0] == frames[0, 0]).all(dim=(1, 2)).numpy())[0, 0])
        assert torch.equal(frames[:, 0], planes[1, :, frame])  # the same frame of all three planes
        frames_seen.add(frame)
    assert len(frames_seen) > 1
