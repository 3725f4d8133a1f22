"""The 2D automatic segmenters (``model.seg-model = dynunet2d | u2net-lite``): their networks and deep-supervision
outputs, the loss over the heads, the config rules, the adapter they travel as, the training slices, and the
evaluation that predicts every sweep slice and stacks the frames back into the volume (shape, orientation,
a known mask round-trips)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shared.adapters import AdapterMismatchError, apply_adapter, extract_adapter, model_specs
from shared.base import build_random_base, working_copy, wrap_for_training
from shared.config import ConfigError, DataConfig, TrainConfig, load_config
from shared.data.slices2d import fit_square, unfit_square
from shared.models.auto_seg import AutoSegSpec, build_auto_segmenter
from shared.training.seg_auto import auto_seg_loss, evaluate_auto_segmentation, predict_volume
from shared.training.seg_eval import SegCase

#: Tiny 2D segmenters of the real architectures (what the CPU tests use).
UNET2D = {"model.seg-model": "dynunet2d", "model.auto-init-filters": 2, "model.dynunet-levels": 3}
U2NET = {"model.seg-model": "u2net-lite", "model.auto-init-filters": 2}


class Threshold(nn.Module):
    """A stand-in network: logit +10 where the frame is above 0.5, -10 elsewhere (it segments the image)."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.where(frames > 0.5, 10.0, -10.0)


def _oracle(kind: str = "u2net-lite") -> nn.Module:
    """An automatic segmenter of ``kind`` whose network is :class:`Threshold`."""
    model = build_auto_segmenter(AutoSegSpec(kind=kind, init_filters=2, levels=3), seed=0)
    model.net = Threshold()
    return model


def _asymmetric_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """A mask whose slices differ along every axis, so a transposed or flipped stack cannot match it."""
    mask = np.zeros(shape, dtype=bool)
    mask[3:9, 4:10, 5:20] = True
    mask[5:7, 12:16, 2:4] = True
    return mask


@pytest.mark.parametrize(("kind", "heads"), [("dynunet2d", 3), ("u2net-lite", 7)])
def test_a_2d_network_gives_its_deep_supervision_heads_in_training_and_one_output_in_eval(kind, heads):
    model = build_auto_segmenter(AutoSegSpec(kind=kind, init_filters=2, levels=4), seed=0)
    frames = torch.randn(3, 1, 32, 32)
    assert model(frames).shape == (3, heads, 1, 32, 32)
    model.eval()
    assert model(frames).shape == (3, 1, 32, 32)
    assert all(p.requires_grad for p in model.parameters()) and not list(model.buffers())  # GroupNorm only
    with pytest.raises(ValueError, match=r"takes \(B, 1, H, W\)"):
        model(torch.randn(1, 1, 8, 32, 32))


def test_the_2d_defaults_are_nnunets_first_width_and_seed_004s_u2netp():
    u2net = build_auto_segmenter(AutoSegSpec(kind="u2net-lite"), seed=0)
    assert (
        u2net.spec.init_filters == 16 and 1_100_000 < sum(p.numel() for p in u2net.parameters()) < 1_160_000
    )
    assert AutoSegSpec(kind="dynunet2d").describe()["init_filters"] == 32
    assert AutoSegSpec(kind="segresnet").describe()["init_filters"] == 8  # unchanged
    assert "blocks_down" not in AutoSegSpec(kind="u2net-lite").describe()  # only this kind's settings


def test_dynunet2d_refuses_a_frame_its_levels_cannot_halve():
    model = build_auto_segmenter(AutoSegSpec(kind="dynunet2d", init_filters=2, levels=3), seed=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 1, 30, 32))


@pytest.mark.parametrize(("kind", "weights"), [("dynunet2d", "exp"), ("u2net-lite", "same")])
def test_the_loss_sums_dice_ce_over_every_head_with_the_kinds_weights(kind, weights):
    from monai.losses import DiceCELoss

    heads = torch.randn(2, 3, 1, 16, 16)

    class Heads(nn.Module):
        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            return heads

    model = build_auto_segmenter(AutoSegSpec(kind=kind, init_filters=2, levels=3), seed=0)
    model.net = Heads()
    masks = (torch.rand(2, 1, 16, 16) > 0.7).float()
    loss_fn = DiceCELoss(sigmoid=True)
    factors = [1.0, 0.5, 0.25] if weights == "exp" else [1.0, 1.0, 1.0]
    expected = sum(f * loss_fn(heads[:, i], masks) for i, f in enumerate(factors))
    got = auto_seg_loss(model, torch.zeros(2, 1, 16, 16), masks, loss_fn=loss_fn)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    model.net = Threshold()  # a single output (eval, or no deep supervision): the plain loss
    single = auto_seg_loss(model, masks, masks, loss_fn=loss_fn)
    assert single.item() == pytest.approx(loss_fn(torch.where(masks > 0.5, 10.0, -10.0), masks).item())


def test_config_of_the_2d_segmenters():
    config = load_config(UNET2D)
    assert config.automatic_seg and config.train.select_metric == "dice_auto"
    with pytest.raises(
        ConfigError, match="data.slice-size = 36 must be divisible by 16 .*dynunet-levels = 5"
    ):
        load_config({"model.seg-model": "dynunet2d", "data.slice-size": 36})
    assert load_config({**U2NET, "data.slice-size": 36}).data.slice_size == 36  # U2NET-Lite takes any size
    with pytest.raises(ConfigError, match="model.dynunet-levels = 2"):
        load_config({**UNET2D, "model.dynunet-levels": 2})
    with pytest.raises(
        ConfigError, match="privacy.sample-dp = true is not supported with model.seg-model = 'u2net"
    ):
        load_config({**U2NET, "privacy.sample-dp": True})
    with pytest.raises(ConfigError, match="data.slice-negative-fraction"):
        load_config({**U2NET, "data.slice-negative-fraction": -1})
    with pytest.raises(ConfigError, match="auto-init-filters = -1"):
        load_config({**U2NET, "model.auto-init-filters": -1})


def test_the_2d_network_travels_whole_and_a_receiver_of_another_segmenter_refuses_it():
    base = build_random_base("small", cls_depth=18, seed=0)

    def fresh(values: dict) -> dict:
        specs = model_specs(load_config(values))
        return wrap_for_training(working_copy(base, specs), specs)

    torch.manual_seed(0)
    models = fresh(U2NET)
    adapter = extract_adapter(models, base_fingerprints=base.fingerprints)
    seg = {k: v for k, v in adapter.tensors.items() if k.startswith("seg.")}
    assert seg and all(k.startswith("seg.net.") for k in seg)
    assert sum(v.numel() for v in seg.values()) == sum(p.numel() for p in models["seg"].parameters())
    assert adapter.manifest["peft"]["seg"]["segmenter"] == "u2net-lite"
    with pytest.raises(
        AdapterMismatchError, match="of the segmenter 'u2net-lite', this model is 'dynunet2d'"
    ):
        apply_adapter(fresh(UNET2D), adapter, base_fingerprints=base.fingerprints)
    deeper = fresh({**UNET2D, "model.dynunet-levels": 4})
    unet = extract_adapter(fresh(UNET2D), base_fingerprints=base.fingerprints)
    with pytest.raises(AdapterMismatchError, match="levels=3.*levels=4"):
        apply_adapter(deeper, unet, base_fingerprints=base.fingerprints)


@pytest.mark.parametrize("size", [30, 64])
def test_frames_cut_back_to_their_slice_recover_a_known_mask(size):
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[4:13, 6:25] = 1
    frame = fit_square(mask, size=size, is_mask=True).astype(np.float32)
    back = unfit_square(torch.from_numpy(frame)[None, None], mask.shape)[0, 0].numpy() > 0.5
    assert back.shape == mask.shape
    if size == 30:  # no resize: cutting the padding off gives the mask exactly
        assert np.array_equal(back, mask > 0)
    else:  # resized up and back: the edges may move by a pixel
        assert 2 * (back & (mask > 0)).sum() / (back.sum() + mask.sum()) > 0.95


@pytest.mark.parametrize("size", [32, 64])
def test_every_slice_is_predicted_and_stacked_back_in_sweep_order(size):
    mask = _asymmetric_mask((12, 20, 32))
    image = mask.astype(np.float32)  # the stand-in network segments exactly this
    data = DataConfig(slice_size=size)
    predicted = predict_volume(_oracle(), image, data_config=data, pad_value=0.0, batch=1, device="cpu")
    assert predicted.shape == mask.shape and predicted.dtype == bool
    if size == 32:  # the longer side is the frame: no resize, an exact round trip
        assert np.array_equal(predicted, mask)
    else:
        assert 2 * (predicted & mask).sum() / (predicted.sum() + mask.sum()) > 0.95
        assert not predicted[:3].any() and not predicted[9:].any()  # lesion-free slices stay empty


def test_the_2d_evaluation_gives_the_same_whole_volume_metrics_as_the_3d_one():
    mask = _asymmetric_mask((12, 20, 32))
    image = mask.astype(np.float32)
    image[0, 0, 0] = 1.0  # one false-positive voxel far from the lesion
    case = SegCase("c0", image, mask.astype(np.uint8), (1.0, 0.5, 0.5), label=1)
    config = TrainConfig(progress=False)
    result = evaluate_auto_segmentation(
        _oracle("dynunet2d"), [case], config=config, data_config=DataConfig(slice_size=32), device="cpu"
    )
    (only,) = result.cases
    assert only.dice == pytest.approx(2 * mask.sum() / (2 * mask.sum() + 1))
    assert only.overlaps["seg_recall_auto"] == 1.0 and only.overlaps["seg_precision_auto"] < 1.0
    assert only.prediction.full()[0, 0, 0]  # kept, though one voxel lies below HD95's 95th percentile
    assert np.isfinite(only.hd95_mm)
    assert {"test/dice_auto", "test/iou_auto", "test/hd95_mm_auto"} <= set(result.metrics)


def test_sample_level_dp_is_refused_for_a_2d_segmenter_naming_it():
    from shared.privacy.dp_sgd import DPSettings
    from shared.privacy.validation import PrivacyConfigError
    from shared.training.seg import train_segmentation

    model = build_auto_segmenter(AutoSegSpec(kind="u2net-lite", init_filters=2), seed=0)
    settings = DPSettings(
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps_per_epoch=1, expected_batch_size=1
    )
    with pytest.raises(PrivacyConfigError, match="model.seg-model = 'u2net-lite'.*client-level DP"):
        train_segmentation(model, [], config=TrainConfig(progress=False), device="cpu", privacy=settings)
