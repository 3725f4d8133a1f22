"""Segmentation training (shared.training.seg) and block evaluation (shared.training.seg_eval).

Training runs the real SAM-Med3D architecture at a tiny size (32³ crops, patch 8, a 4³ token grid, so the
16³ low-resolution logits are upsampled as with the real presets) with LoRA, on ellipsoid phantoms, so that every test stays within a few seconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from shared.adapters import LoraSpec, attach_lora
from shared.config import DataConfig, TrainConfig
from shared.data.blocks import covering_blocks
from shared.metrics import overlap_metrics
from shared.models.sam_med3d import build_sam_med3d
from shared.training import seg as seg_module
from shared.training.seg import (
    parse_milestones,
    sam_parts,
    seg_click_loss,
    snapshot_parameters,
    train_segmentation,
    trainable_parameters,
)
from shared.training.seg_eval import SegCase, evaluate_segmentation
from tests.shared.tiny_sam import TINY_SAM as TINY
from tests.shared.tiny_sam import P


def tiny_model(seed: int = 0, spec: LoraSpec | None = None) -> nn.Module:
    torch.manual_seed(seed)
    return attach_lora(build_sam_med3d(TINY, attention_impl="fast"), spec or LoraSpec())


def ellipsoid(shape: tuple[int, int, int], centre, radii) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return (((grid - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1.0


def phantom(seed: int, shape=(P, P, P)) -> tuple[np.ndarray, np.ndarray]:
    """A hypoechoic ellipsoid lesion in noisy tissue: image (D, H, W) float32, mask (D, H, W) uint8."""
    rng = np.random.default_rng(seed)
    centre = np.asarray(shape) / 2 + rng.uniform(-3, 3, 3)
    mask = ellipsoid(shape, centre, rng.uniform(3.5, 6.5, 3))
    image = rng.normal(0.0, 1.0, shape) + np.where(mask, -1.5, 0.5)
    return image.astype(np.float32), mask.astype(np.uint8)


def crops(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [phantom(seed) for seed in range(n)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
    masks = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None].float()
    return images, masks


def batches(images: torch.Tensor, masks: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [{"image": images[i : i + size], "mask": masks[i : i + size]} for i in range(0, len(images), size)]


def episode_loss(model: nn.Module, images, masks, config: TrainConfig) -> float:
    model.eval()
    with torch.no_grad():
        return float(seg_click_loss(model, images, masks, config=config, rng=123))


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained() -> dict:
    images, masks = crops(6)
    model = tiny_model()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = snapshot_parameters(model)
    config = TrainConfig(
        seg_epochs=5,
        seg_lr=5e-3,
        seg_lr_milestones="4",
        seg_click_iterations=2,
        seg_clicks_per_step=2,
        progress=False,
    )
    loss_before = episode_loss(model, images, masks, config)
    result = train_segmentation(model, batches(images, masks, 2), config=config, device="cpu")
    return {
        "model": model,
        "result": result,
        "config": config,
        "loss_before": loss_before,
        "loss_after": episode_loss(model, images, masks, config),
        "frozen_before": frozen_before,
        "adapter_before": adapter_before,
    }


def test_loss_falls_on_a_tiny_synthetic_site(trained):
    assert trained["loss_after"] < 0.8 * trained["loss_before"], (
        trained["loss_before"],
        trained["loss_after"],
    )
    epoch_loss = trained["result"]["epoch_loss"]
    assert epoch_loss[-1] < epoch_loss[0]


def test_result_counts_steps_examples_and_decays_the_lr(trained):
    result, config = trained["result"], trained["config"]
    assert result["steps"] == 15 and len(result["loss_history"]) == 15
    assert result["examples"] == 30 and result["examples_per_epoch"] == [6] * 5
    assert result["skipped_empty_batches"] == 0
    assert result["lr"] == pytest.approx(config.seg_lr * config.seg_lr_decay)  # one milestone passed
    assert all(math.isfinite(v) for v in result["loss_history"])


def test_only_adapter_parameters_change(trained):
    model = trained["model"]
    params = dict(model.named_parameters())
    for name, before in trained["frozen_before"].items():
        assert torch.equal(params[name], before), f"frozen parameter {name} changed"
    after = trainable_parameters(model)
    assert set(after) == set(trained["adapter_before"])
    assert any("lora_" in name for name in after) and any(name.startswith("mask_decoder.") for name in after)
    changed = [name for name, p in after.items() if not torch.equal(p, trained["adapter_before"][name])]
    assert any("lora_B" in name for name in changed), "LoRA matrices were not trained"


def test_gradient_accumulation_matches_a_larger_batch(monkeypatch):
    """One step on a batch of 2 and one step accumulated over 2 batches of 1 see the same gradient."""
    images, masks = crops(2)
    config = TrainConfig(seg_epochs=1, seg_click_iterations=3, seg_clicks_per_step=1, progress=False)
    grads = {}

    def capture(tag):
        def hook(optimizer, args, kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            grads[tag] = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]

        return hook

    for tag, size, accumulation in (("batch2", 2, 1), ("accum2", 1, 2)):
        model = tiny_model(seed=1)
        handle = register_optimizer_step_pre_hook(capture(tag))
        try:
            result = train_segmentation(
                model,
                batches(images, masks, size),
                config=replace(config, seg_batch_size=size, seg_grad_accumulation=accumulation),
                device="cpu",
            )
        finally:
            handle.remove()
        assert result["steps"] == 1
    assert len(grads["batch2"]) == len(grads["accum2"])
    for a, b in zip(grads["batch2"], grads["accum2"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_clicks_of_a_sample_do_not_depend_on_its_batch(monkeypatch):
    images, masks = crops(2)
    config = TrainConfig(seg_click_iterations=3, seg_clicks_per_step=2)
    seen = []
    real_decode = seg_module.decode_clicks

    def recording_decode(model, embeddings, coords, labels, mask_logits):
        seen.append((coords.clone(), labels.clone()))
        return real_decode(model, embeddings, coords, labels, mask_logits)

    monkeypatch.setattr(seg_module, "decode_clicks", recording_decode)
    model = tiny_model().eval()
    with torch.no_grad():
        seg_click_loss(model, images, masks, config=config, rng=np.random.default_rng(5))
        together = seen[:]
        seen.clear()
        rng = np.random.default_rng(5)
        seg_click_loss(model, images[:1], masks[:1], config=config, rng=rng)
        seg_click_loss(model, images[1:], masks[1:], config=config, rng=rng)
    alone = seen[:3], seen[3:]
    for it in range(3):
        for sample in range(2):
            coords, labels = alone[sample][it]
            keep = labels[0] != -1
            joint_keep = together[it][1][sample] != -1
            assert torch.equal(together[it][0][sample][joint_keep], coords[0][keep])
            assert torch.equal(together[it][1][sample][joint_keep], labels[0][keep])


def test_click_loss_feeds_back_detached_logits_and_adds_corrective_clicks(monkeypatch):
    images, masks = crops(2)
    calls = []
    real_decode = seg_module.decode_clicks

    def recording_decode(model, embeddings, coords, labels, mask_logits):
        calls.append({"labels": labels.clone(), "mask_logits": mask_logits, "embeddings": embeddings})
        low_res, iou = real_decode(model, embeddings, coords, labels, mask_logits)
        calls[-1]["output"] = low_res
        return low_res, iou

    monkeypatch.setattr(seg_module, "decode_clicks", recording_decode)
    model = tiny_model()
    loss = seg_click_loss(
        model, images, masks, config=TrainConfig(seg_click_iterations=3, seg_clicks_per_step=2), rng=0
    )
    assert loss.ndim == 0 and loss.requires_grad
    assert len(calls) == 3
    assert calls[0]["mask_logits"] is None
    assert (calls[0]["labels"] == 1).all() and calls[0]["labels"].shape == (2, 1)
    for previous, call in zip(calls, calls[1:], strict=False):
        assert call["embeddings"] is calls[0]["embeddings"], "the image embedding must be computed once"
        assert torch.equal(call["mask_logits"], previous["output"].detach())
        assert not call["mask_logits"].requires_grad
        grown = (call["labels"] != -1).sum(1) - (previous["labels"] != -1).sum(1)
        assert ((grown >= 1) & (grown <= 2)).all()  # a random model errs: 1-2 corrective clicks per step


def test_proximal_term_pulls_towards_the_reference():
    images, masks = crops(2)
    config = TrainConfig(seg_epochs=2, seg_lr=1e-2, seg_click_iterations=1, progress=False)

    def distance_after(mu: float) -> tuple[float, float]:
        model = tiny_model(seed=2)
        reference = {n: p + 0.05 for n, p in snapshot_parameters(model).items()}
        params = trainable_parameters(model)
        before = sum(float((p.detach() - reference[n]).pow(2).sum()) for n, p in params.items())
        train_segmentation(
            model,
            batches(images, masks, 2),
            config=replace(config, proximal_mu=mu),
            device="cpu",
            proximal_ref=reference,
        )
        return before, sum(float((p.detach() - reference[n]).pow(2).sum()) for n, p in params.items())

    before, free = distance_after(0.0)
    _, pulled = distance_after(100.0)
    assert pulled < 0.9 * before
    assert pulled < free


def test_proximal_reference_defaults_to_the_starting_weights():
    images, masks = crops(2)
    config = TrainConfig(seg_epochs=3, seg_lr=1e-2, seg_click_iterations=1, progress=False)

    def drift(mu: float) -> float:
        model = tiny_model(seed=3)
        start = snapshot_parameters(model)
        train_segmentation(
            model, batches(images, masks, 2), config=replace(config, proximal_mu=mu), device="cpu"
        )
        return sum(
            float((p.detach() - start[n]).pow(2).sum()) for n, p in trainable_parameters(model).items()
        )

    assert drift(1e4) < 0.5 * drift(0.0)


def test_empty_batches_are_skipped():
    images, masks = crops(2)
    empty = {"image": images[:0], "mask": masks[:0]}
    config = TrainConfig(seg_epochs=1, seg_click_iterations=1, progress=False)
    result = train_segmentation(
        tiny_model(), [empty, *batches(images, masks, 2), empty], config=config, device="cpu"
    )
    assert result["skipped_empty_batches"] == 2 and result["steps"] == 1 and result["examples"] == 2


def test_batches_need_a_mask_and_never_read_the_class_label_as_one():
    images, masks = crops(1)
    config = TrainConfig(seg_epochs=1, seg_click_iterations=1, progress=False)
    with pytest.raises(KeyError, match="'mask'"):
        train_segmentation(tiny_model(), [{"image": images, "label": masks}], config=config, device="cpu")
    result = train_segmentation(tiny_model(), [(images, masks)], config=config, device="cpu")
    assert result["steps"] == 1


def test_a_model_without_adapter_is_refused():
    model = build_sam_med3d(TINY).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        train_segmentation(model, [], config=TrainConfig(progress=False), device="cpu")


def test_milestones_parse_and_reject_bad_values():
    assert parse_milestones("") == [] and parse_milestones("120, 180") == [120, 180]
    for bad in ("a,b", "180,120", "0"):
        with pytest.raises(ValueError, match="seg-lr-milestones"):
            parse_milestones(bad)


def test_runs_under_opacus_with_per_sample_gradients():
    from opacus import GradSampleModule

    model = GradSampleModule(tiny_model(spec=LoraSpec(trainable=())))
    assert sam_parts(model).image_encoder is not None
    images, masks = crops(3)
    loss = seg_click_loss(
        model, images, masks, config=TrainConfig(seg_click_iterations=2, seg_clicks_per_step=1), rng=0
    )
    with pytest.warns(UserWarning, match="backward hook"):  # frozen inputs: PyTorch's note, harmless here
        loss.backward()
    for name, p in trainable_parameters(model).items():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 3, name
        torch.testing.assert_close(p.grad_sample.mean(0), p.grad, rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------------------------- evaluation
class _FakePromptEncoder(nn.Module):
    """Passes the clicks through as the 'sparse embedding' (B, N, 4) = (z, y, x, label)."""

    input_image_size = (P, P, P)

    def forward(self, points, boxes, masks):
        coords, labels = points
        return torch.cat([coords, labels[..., None].float()], dim=-1), masks

    def get_dense_pe(self):
        return torch.zeros(1)


class _OracleDecoder(nn.Module):
    """Returns the 'embedding' itself, i.e. the block image, which the oracle cases set to GT logits."""

    def forward(
        self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output
    ):
        return image_embeddings, torch.ones(image_embeddings.shape[0], 1)


class _BallDecoder(nn.Module):
    """Paints a ball of radius 3 voxels around every positive click and clears one around negative ones."""

    def forward(
        self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output
    ):
        grid = torch.stack(torch.meshgrid(*[torch.arange(P)] * 3, indexing="ij"), dim=-1).float()
        logits = torch.full((sparse_prompt_embeddings.shape[0], 1, P, P, P), -5.0)
        for b, clicks in enumerate(sparse_prompt_embeddings):
            for z, y, x, label in clicks.tolist():
                ball = ((grid - torch.tensor([z, y, x])) ** 2).sum(-1) <= 9
                logits[b, 0][ball] = 5.0 if label == 1 else -5.0
        return logits, torch.ones(len(logits), 1)


def fake_sam(decoder: nn.Module) -> nn.Module:
    model = nn.Module()
    model.image_encoder = nn.Identity()
    model.prompt_encoder = _FakePromptEncoder()
    model.mask_decoder = decoder
    return model


def oracle_case(case_id: str, shape, centre, radii, birads: str) -> SegCase:
    mask = ellipsoid(shape, centre, radii).astype(np.uint8)
    return SegCase(
        case_id, np.where(mask > 0, 10.0, -10.0).astype(np.float32), mask, (0.5, 0.4, 0.6), -10.0, birads, 1
    )


EVAL_DATA = DataConfig(patch_size=P, block_min_lesion_voxels=1)


def test_oracle_prediction_stitched_over_overlapping_blocks_gives_dice_one():
    case = oracle_case("big", (40, 90, 50), (20, 45, 25), (12, 30, 16), "4B")  # lesion 61 voxels long on y
    blocks = covering_blocks(case.mask, patch_size=P, min_lesion_voxels=1)
    assert len(blocks) >= 2
    evaluation = evaluate_segmentation(
        fake_sam(_OracleDecoder()),
        [case],
        config=TrainConfig(progress=False),
        data_config=EVAL_DATA,
        device="cpu",
        n_clicks=3,
    )
    result = evaluation.cases[0]
    assert result.n_blocks == len(blocks)
    assert result.dice_curve == [1.0, 1.0, 1.0] and result.dice == 1.0 and result.hd95_mm == 0.0
    assert np.array_equal(result.prediction.full(), case.mask > 0)
    assert result.clicks_per_block == [1] * len(blocks)  # exact after the first click: no corrective click
    assert evaluation.metrics["test/dice_1click"] == 1.0 and evaluation.metrics["test/dice"] == 1.0
    for name in (
        "iou_1click",
        "iou",
        "seg_precision_1click",
        "seg_precision",
        "seg_recall_1click",
        "seg_recall",
    ):
        assert result.overlaps[name] == 1.0 == evaluation.metrics[f"test/{name}"]


def test_dice_vs_clicks_curve_shape_strata_and_json():
    cases = [
        oracle_case("a", (36, 70, 40), (18, 35, 20), (8, 22, 9), "4A"),
        oracle_case("b", (30, 30, 30), (15, 15, 15), (4, 5, 4), "5"),
    ]
    seen = []
    evaluation = evaluate_segmentation(
        fake_sam(_BallDecoder()),
        cases,
        config=TrainConfig(progress=False, seed=3),
        data_config=EVAL_DATA,
        device="cpu",
        n_clicks=4,
        keep_masks=False,
        on_case=lambda case, result: seen.append((case.case_id, result.prediction.full())),
    )
    assert [(case_id, mask.shape) for case_id, mask in seen] == [("a", (36, 70, 40)), ("b", (30, 30, 30))]
    assert len(evaluation.curve) == 4
    for case, result in zip(cases, evaluation.cases, strict=True):
        assert len(result.dice_curve) == 4 and result.prediction is None
        assert result.n_blocks == len(covering_blocks(case.mask, patch_size=P, min_lesion_voxels=1))
        assert all(1 <= n <= 4 for n in result.clicks_per_block)
        assert result.volume_cm3 == pytest.approx(case.mask.sum() * 0.5 * 0.4 * 0.6 / 1000)
    big = evaluation.cases[0]
    assert big.dice_curve[-1] > big.dice_curve[0]  # more positive balls cover more of the lesion
    assert [f"test/dice_{n}click" for n in range(1, 5)] == [
        k for k in evaluation.metrics if k.startswith("test/dice_")
    ]
    for case, result, (_, final) in zip(cases, evaluation.cases, seen, strict=True):
        # the overlaps are those of the full-volume prediction after the last and (via Dice) the first click
        assert result.overlaps["iou"] == pytest.approx(overlap_metrics(final, case.mask).iou)
        assert result.overlaps["seg_recall"] == pytest.approx(overlap_metrics(final, case.mask).recall)
        first = result.overlaps["iou_1click"]
        assert result.dice_curve[0] == pytest.approx(2 * first / (1 + first))
        assert result.record()["seg_precision_1click"] == result.overlaps["seg_precision_1click"]
    for name in (
        "iou_1click",
        "iou",
        "seg_precision_1click",
        "seg_precision",
        "seg_recall_1click",
        "seg_recall",
    ):
        expected = np.mean([r.overlaps[name] for r in evaluation.cases])
        assert evaluation.metrics[f"test/{name}"] == pytest.approx(expected)
    assert evaluation.metrics["test/dice_4click"] == pytest.approx(
        np.mean([r.dice for r in evaluation.cases])
    )
    assert set(evaluation.strata["birads"]) == {"4A", "5"} and set(evaluation.strata["volume"]) == {"0-5"}
    assert (
        "test/birads/4A/dice_mean" in evaluation.metrics
        and "test/volume/0-5/hd95_mm_mean" in evaluation.metrics
    )
    json.dumps(evaluation.to_json())


def test_evaluation_is_seeded_and_runs_the_real_model():
    cases = []
    for seed in (0, 1):
        image, mask = phantom(seed, shape=(36, 36, 40))
        cases.append(SegCase(f"c{seed}", image, mask, (1.0, 1.0, 1.0), 0.0, None, 0))
    model = tiny_model()
    model.train()
    runs = [
        evaluate_segmentation(
            model, cases, config=TrainConfig(progress=False), data_config=EVAL_DATA, device="cpu", n_clicks=2
        )
        for _ in range(2)
    ]
    assert model.training, "evaluation must restore the model's mode"
    assert runs[0].curve == runs[1].curve
    for result in runs[0].cases:
        assert result.prediction.full().dtype == bool and len(result.dice_curve) == 2
        assert 0.0 <= result.dice <= 1.0
    assert set(runs[0].strata["birads"]) == {"unknown"}


def test_loader_items_are_accepted_and_passed_to_the_callback():
    case = oracle_case("item", (32, 40, 36), (16, 20, 18), (5, 7, 6), "4C")
    item = {
        "image": torch.from_numpy(case.image)[None],
        "mask": torch.from_numpy(case.mask.astype(np.float32))[None],
        "spacing_mm": case.spacing_mm,
        "pad_value": case.pad_value,
        "case_id": "item",
        "label": -1,
        "birads": "4C",
        "grid": "kept for the caller",
    }
    seen = []
    evaluation = evaluate_segmentation(
        fake_sam(_OracleDecoder()),
        iter([item]),
        config=TrainConfig(progress=False),
        data_config=EVAL_DATA,
        device="cpu",
        n_clicks=2,
        on_case=lambda given, result: seen.append(given["grid"]),
    )
    assert seen == ["kept for the caller"]
    result = evaluation.cases[0]
    assert result.dice == 1.0 and result.label is None and result.birads == "4C"
    assert np.array_equal(result.prediction.full(), case.mask > 0)


def test_evaluation_refuses_a_patch_size_other_than_the_model_and_an_empty_mask():
    case = oracle_case("x", (32, 32, 32), (16, 16, 16), (4, 4, 4), "3")
    with pytest.raises(ValueError, match="patch-size"):
        evaluate_segmentation(
            fake_sam(_OracleDecoder()),
            [case],
            config=TrainConfig(progress=False),
            data_config=DataConfig(patch_size=64),
            device="cpu",
        )
    empty = replace(case, case_id="empty", mask=np.zeros_like(case.mask))
    with pytest.raises(ValueError, match="'empty'"):
        evaluate_segmentation(
            fake_sam(_OracleDecoder()),
            [empty],
            config=TrainConfig(progress=False),
            data_config=EVAL_DATA,
            device="cpu",
        )
