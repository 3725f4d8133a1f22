"""DP-SGD in the training loops: SAM-Med3D adapter (shared/training/seg.py) and classifier (cls.py).

SAM-Med3D is the ``small`` preset shrunk to 32³ crops (as in tests/shared/training/test_seg.py) with LoRA and
trainable prompt encoder and mask decoder; the classifier is a ResNet-18 tri-plane model on 32-pixel planes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from torch import nn

from shared import clicks as clicks_module
from shared.adapters import LoraSpec, attach_lora
from shared.config import TrainConfig
from shared.models.sam_med3d import build_sam_med3d
from shared.models.triplane import PLANES, build_triplane_classifier
from shared.privacy.accounting import epsilon_of
from shared.privacy.dp_sgd import DPSettings
from shared.privacy.sampling import OneFramePerCase, poisson_loader
from shared.privacy.validation import PrivacyConfigError
from shared.training.cls import train_classifier, trainable_snapshot, unwrap_classifier
from shared.training.seg import (
    DP_FROZEN_PARAMETERS,
    dp_frozen_parameters,
    seg_click_loss,
    snapshot_parameters,
    train_segmentation,
    trainable_parameters,
)
from tests.shared.tiny_sam import TINY_SAM, P

SEG_CONFIG = TrainConfig(
    seg_epochs=2, seg_lr=1e-2, seg_click_iterations=2, seg_clicks_per_step=2, progress=False, seed=0
)

DELTA = 1e-3




def sam(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return attach_lora(build_sam_med3d(TINY_SAM), LoraSpec())


def seg_cases(n: int) -> list[dict]:
    """Ellipsoid lesions in noise: items ``image``/``mask`` (1, P, P, P) float32 and a case id."""
    grid = np.stack(np.meshgrid(*[np.arange(P)] * 3, indexing="ij"), axis=-1)
    cases = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        mask = (((grid - (P / 2 + rng.uniform(-3, 3, 3))) / rng.uniform(3.5, 6.5, 3)) ** 2).sum(-1) <= 1
        image = rng.normal(0, 1, mask.shape) + np.where(mask, -1.5, 0.5)
        cases.append(
            {
                "image": torch.from_numpy(image[None].astype(np.float32)),
                "mask": torch.from_numpy(mask[None].astype(np.float32)),
                "case_id": f"case{seed}",
            }
        )
    return cases


def settings(n: int, batch: int, *, sigma: float = 1.0, rate: float | None = None, steps: int | None = None):
    rate = rate if rate is not None else batch / n
    steps = steps if steps is not None else -(-n // batch)
    return DPSettings(sigma, 1.0, rate, steps, batch, "rdp", seed=0)


def rdp_epsilon(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    for sigma, rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return accountant.get_epsilon(delta=DELTA)


# ----------------------------------------------------------------------------------------- segmentation
@pytest.mark.parametrize("iterations", [1, 2])
def test_the_frozen_parameters_are_exactly_those_opacus_cannot_handle(iterations) -> None:
    model = sam()
    config = replace(SEG_CONFIG, seg_click_iterations=iterations)
    frozen = set(dp_frozen_parameters(model, config))
    module = GradSampleModule(model)
    images = torch.stack([c["image"] for c in seg_cases(2)])
    masks = torch.stack([c["mask"] for c in seg_cases(2)])
    with pytest.warns(UserWarning, match="backward hook"):
        seg_click_loss(module, images, masks, config=config, rng=0, fixed_prompt_length=True).backward()
    probe = {name for name, p in trainable_parameters(module).items() if p.grad_sample is None}
    assert probe == frozen
    assert all(any(name.startswith(prefix) for name in frozen) for prefix in DP_FROZEN_PARAMETERS)
    assert any(name.startswith("prompt_encoder.mask_downscaling") for name in frozen) == (iterations == 1)
    module.cleanup()


def test_a_samples_gradient_does_not_depend_on_its_batch(monkeypatch) -> None:
    """With fixed prompt lengths (always under DP) case 0's per-sample gradient is the same alone or with case 1
    in its batch, even when case 1 gets more clicks (here: corrective clicks only for case 1)."""
    cases = seg_cases(2)
    case1_voxels = int(cases[1]["mask"].sum())

    def corrective(pred, gt, rng, *, max_clicks, slice_axis):
        n = min(2, max_clicks) if int(gt.sum()) == case1_voxels else 0
        return np.argwhere(gt)[:n].astype(np.int64), np.ones(n, dtype=np.int64)

    monkeypatch.setattr(clicks_module, "corrective_clicks", corrective)
    model = sam(seed=1)
    config = replace(SEG_CONFIG, seg_click_iterations=3, seg_clicks_per_step=2)
    for param in dp_frozen_parameters(model, config).values():
        param.requires_grad_(False)
    module = GradSampleModule(model)
    per_sample = []
    for members in ([0, 1], [0]):
        images = torch.stack([cases[i]["image"] for i in members])
        masks = torch.stack([cases[i]["mask"] for i in members])
        module.zero_grad()
        with pytest.warns(UserWarning, match="backward hook"):
            seg_click_loss(module, images, masks, config=config, rng=4, fixed_prompt_length=True).backward()
        per_sample.append({n: p.grad_sample[0].clone() for n, p in trainable_parameters(module).items()})
    for name, together in per_sample[0].items():
        torch.testing.assert_close(together, per_sample[1][name], rtol=1e-4, atol=1e-6, msg=name)
    module.cleanup()


def test_dp_segmentation_trains_the_adapter_and_its_accountant_is_exact() -> None:
    model = sam()
    before = snapshot_parameters(model)
    frozen = set(dp_frozen_parameters(model, SEG_CONFIG))
    cases = seg_cases(6)
    dp = settings(6, 2)
    for round_ in range(2):  # a second round in the same process wraps the model again
        loader = poisson_loader(
            cases, sample_rate=dp.sample_rate, steps_per_epoch=3, keys=("image", "mask"), seed=round_
        )
        result = train_segmentation(model, loader, config=SEG_CONFIG, device="cpu", privacy=dp)
        assert result["steps"] == 6 and result["privacy_history"] == [(1.0, 1 / 3, 6)]
        assert epsilon_of(result["privacy_history"], DELTA, "rdp") == rdp_epsilon([(1.0, 1 / 3, 6)])
    after = trainable_parameters(model)
    assert set(after) == set(before)  # frozen parameters are trainable (adapter) parameters again
    for name, value in after.items():
        assert torch.equal(value, before[name]) == (name in frozen), name
    assert not any(
        hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters()
    )  # Opacus cleaned up


def test_fedprox_survives_privatisation_in_segmentation() -> None:
    cases = seg_cases(4)
    config = replace(SEG_CONFIG, seg_epochs=2, seg_lr=5e-2)
    distances = {}
    for mu in (0.0, 20.0):
        model = sam(seed=2)
        reference = {n: p + 0.05 for n, p in snapshot_parameters(model).items()}
        loader = poisson_loader(cases, sample_rate=0.5, steps_per_epoch=2, keys=("image", "mask"), seed=0)
        train_segmentation(
            model,
            loader,
            config=replace(config, proximal_mu=mu),
            device="cpu",
            proximal_ref=reference,
            privacy=settings(4, 2, sigma=0.05),
        )
        params = trainable_parameters(model)
        distances[mu] = sum(float((p.detach() - reference[n]).pow(2).sum()) for n, p in params.items())
    assert distances[20.0] < 0.8 * distances[0.0]


def test_a_poisson_batch_in_physical_batches_is_one_noisy_step_with_the_same_update() -> None:
    """privacy.seg-batch-size above train.seg-batch-size: a Poisson batch of 4 cases trained as physical batches
    of 1 (Opacus' virtual steps: clipped and summed, then one noisy step) gives the update of the whole batch at
    once, with the same noise, and the accountant counts one step per Poisson batch."""
    cases = seg_cases(4)
    config = replace(SEG_CONFIG, seg_epochs=1)
    results, params = [], []
    for physical in (0, 1):
        model = sam(seed=3)
        loader = poisson_loader(cases, sample_rate=1.0, steps_per_epoch=2, keys=("image", "mask"), seed=0)
        dp = replace(settings(4, 4, steps=2), physical_batch_size=physical)
        results.append(train_segmentation(model, loader, config=config, device="cpu", privacy=dp))
        params.append({n: p.detach().clone() for n, p in trainable_parameters(model).items()})
    for result in results:
        assert (
            result["steps"] == 2 and result["examples"] == 8 and result["privacy_history"] == [(1.0, 1.0, 2)]
        )
    np.testing.assert_allclose(results[1]["loss_history"], results[0]["loss_history"], rtol=1e-4)
    for name, value in params[0].items():
        torch.testing.assert_close(params[1][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_empty_poisson_batches_are_noise_only_steps_and_accounted() -> None:
    model = sam()
    before = snapshot_parameters(model)
    dp = settings(2, 1, rate=1e-4, steps=3)
    loader = poisson_loader(seg_cases(2), sample_rate=1e-4, steps_per_epoch=3, keys=("image", "mask"), seed=0)
    result = train_segmentation(
        model, loader, config=replace(SEG_CONFIG, seg_epochs=1), device="cpu", privacy=dp
    )
    assert result["noise_only_steps"] == 3 and result["steps"] == 3 and result["examples"] == 0
    assert result["skipped_empty_batches"] == 0 and result["privacy_history"] == [(1.0, 1e-4, 3)]
    moved = [n for n, p in trainable_parameters(model).items() if not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved)  # the noise was applied


def test_dp_segmentation_refuses_other_loaders_and_gradient_accumulation() -> None:
    cases = seg_cases(2)
    dp = settings(2, 1)
    plain = [{"image": c["image"][None], "mask": c["mask"][None]} for c in cases]
    with pytest.raises(PrivacyConfigError, match="non-Poisson"):
        train_segmentation(sam(), plain, config=SEG_CONFIG, device="cpu", privacy=dp)
    wrong_rate = poisson_loader(cases, sample_rate=0.9, steps_per_epoch=2, keys=("image", "mask"), seed=0)
    with pytest.raises(PrivacyConfigError, match="accounts 2 at rate 0.5"):
        train_segmentation(sam(), wrong_rate, config=SEG_CONFIG, device="cpu", privacy=dp)
    loader = poisson_loader(cases, sample_rate=0.5, steps_per_epoch=2, keys=("image", "mask"), seed=0)
    model = sam()
    with pytest.raises(PrivacyConfigError, match="seg-grad-accumulation"):
        train_segmentation(
            model, loader, config=replace(SEG_CONFIG, seg_grad_accumulation=2), device="cpu", privacy=dp
        )
    assert all(p.requires_grad for p in trainable_parameters(model).values())  # the freeze was undone


# ----------------------------------------------------------------------------------------- classifier
CLS_LORA = LoraSpec(targets=r"branches\.\w+\..*conv\d*", trainable=("head",))
CLS_CONFIG = TrainConfig(cls_epochs=2, cls_lr=0.05, cls_batch_size=4, progress=False)


def classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return attach_lora(build_triplane_classifier(depth=18, planes=PLANES, norm_groups=8), CLS_LORA)


def lesions(n: int, frames: int = 3, size: int = 32) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "planes": torch.from_numpy(rng.normal(i % 2, 1.0, (3, frames, size, size)).astype(np.float32)),
            "label": torch.tensor(i % 2),
            "case_id": f"c{i}",
        }
        for i in range(n)
    ]


def test_dp_classifier_trains_on_one_frame_per_case_and_accounts_exactly() -> None:
    model = classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = trainable_snapshot(model)
    dataset = OneFramePerCase(lesions(8), seed=0)
    loader = poisson_loader(dataset, sample_rate=0.5, steps_per_epoch=2, seed=0)
    report = train_classifier(
        model, loader, config=CLS_CONFIG, device="cpu", privacy=settings(8, 4), proximal_ref=start
    )
    assert report["steps"] == 4 and report["num_examples"] == 8  # one sample per case
    assert report["privacy_history"] == [(1.0, 0.5, 4)]
    assert epsilon_of(report["privacy_history"], DELTA, "rdp") == rdp_epsilon([(1.0, 0.5, 4)])
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == ("lora_B" in name or "lora_A" in name or ".head." in name), name
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())


def test_dp_classifier_noise_only_steps_and_refusals() -> None:
    model = classifier()
    loader = poisson_loader(OneFramePerCase(lesions(2), seed=0), sample_rate=1e-4, steps_per_epoch=2, seed=0)
    dp = settings(2, 1, rate=1e-4, steps=2)
    report = train_classifier(model, loader, config=CLS_CONFIG, device="cpu", privacy=dp)
    assert (
        report["noise_only_steps"] == 4
        and report["steps"] == 4
        and report["privacy_history"] == [(1.0, 1e-4, 4)]
    )
    with pytest.raises(PrivacyConfigError, match="non-Poisson"):
        train_classifier(model, [], config=CLS_CONFIG, device="cpu", privacy=dp)
    with pytest.raises(ValueError, match="not both"):
        train_classifier(
            model,
            loader,
            config=CLS_CONFIG,
            device="cpu",
            privacy=dp,
            optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))]),
        )
    unwrap_classifier(model).branches["coronal"].extra_norm = nn.BatchNorm2d(3)
    with pytest.raises(PrivacyConfigError, match=r"branches\.coronal\.extra_norm"):
        train_classifier(model, loader, config=CLS_CONFIG, device="cpu", privacy=dp)
