"""The fully automatic segmenter (model.seg-model = segresnet): build, shapes, config rules, the adapter it
travels as (every parameter, its spec in the manifest) and the refusal of an adapter of the other segmenter."""

from __future__ import annotations

import pytest
import torch

from client.egress import eval_metric_keys
from shared.adapters import (
    AdapterMismatchError,
    apply_adapter,
    extract_adapter,
    load_adapter,
    model_specs,
    save_adapter,
)
from shared.base import build_random_base, working_copy, wrap_for_training
from shared.config import ConfigError, load_config
from shared.inference import adapted_models
from shared.metric_names import metric_direction
from shared.models.auto_seg import AutoSegmenter, AutoSegSpec, build_auto_segmenter, is_auto_segmenter

#: A SegResNet of two levels and 4 filters (about 6 k parameters): what every CPU test uses.
TINY = {"model.seg-model": "segresnet", "model.auto-init-filters": 4, "model.auto-blocks-down": "1,1"}


@pytest.fixture(scope="module")
def base():
    return build_random_base("small", cls_depth=18, seed=0)


def fresh(base, config):
    """The models of ``config`` on a working copy of ``base`` (LoRA is attached in place)."""
    specs = model_specs(config)
    return wrap_for_training(working_copy(base, specs), specs)


def test_segresnet_maps_a_crop_to_one_channel_of_logits_of_the_same_size():
    model = build_auto_segmenter(AutoSegSpec(init_filters=4, blocks_down=(1, 1)), seed=0)
    out = model(torch.randn(2, 1, 16, 24, 32))
    assert out.shape == (2, 1, 16, 24, 32) and torch.isfinite(out).all()
    assert all(p.requires_grad for p in model.parameters()) and not list(model.buffers())  # GroupNorm only
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 1, 15, 16, 16))
    again = build_auto_segmenter(AutoSegSpec(init_filters=4, blocks_down=(1, 1)), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    default = AutoSegmenter(AutoSegSpec())  # MONAI's default SegResNet: about 1.2 M parameters
    assert 1_000_000 < sum(p.numel() for p in default.parameters()) < 1_500_000


def test_config_selects_by_dice_auto_and_refuses_what_cannot_run():
    config = load_config(TINY)
    assert config.automatic_seg and config.train.select_metric == "dice_auto"
    assert load_config({**TINY, "train.select-metric": "auc"}).train.select_metric == "auc"
    assert not load_config({}).automatic_seg and load_config({}).train.select_metric == "dice_1click"
    with pytest.raises(ConfigError, match="model.seg-model = 'unet'"):
        load_config({"model.seg-model": "unet"})
    with pytest.raises(ConfigError, match="dice_auto' needs an automatic segmenter"):
        load_config({"train.select-metric": "dice_auto"})
    with pytest.raises(ConfigError, match="data.patch-size = 36 must be divisible by 8"):
        load_config({"model.seg-model": "segresnet", "data.patch-size": 36})
    with pytest.raises(ConfigError, match="privacy.sample-dp = true is not supported"):
        load_config({**TINY, "privacy.sample-dp": True})
    with pytest.raises(ConfigError, match="auto-blocks-down"):
        load_config({**TINY, "model.auto-blocks-down": "1,0"})


def test_the_automatic_metrics_have_their_own_names_and_directions():
    assert metric_direction("val/dice_auto") == "higher"
    assert metric_direction("test/hd95_mm_auto") == "lower"
    assert metric_direction("global/val/dice_auto_mean") == "higher"
    assert metric_direction("test/dice_auto_ci_low") is None
    keys = eval_metric_keys(5, split="val", automatic=True)
    assert "val/dice_auto" in keys and "val/hd95_mm_auto_ci_high" in keys and "val/auc" in keys
    assert not any("click" in key for key in keys)  # no click metric is filled by an automatic prediction
    assert "val/dice_auto" not in eval_metric_keys(5, split="val")


def test_the_whole_network_travels_as_the_seg_adapter_and_round_trips(base, tmp_path):
    config = load_config(TINY)
    torch.manual_seed(0)
    models = fresh(base, config)
    assert is_auto_segmenter(models["seg"])
    adapter = extract_adapter(models, base_fingerprints=base.fingerprints)
    seg = {k: v for k, v in adapter.tensors.items() if k.startswith("seg.")}
    assert seg and all(k.startswith("seg.net.") for k in seg)
    assert sum(v.numel() for v in seg.values()) == sum(p.numel() for p in models["seg"].parameters())
    assert adapter.manifest["peft"]["seg"]["segmenter"] == "segresnet"
    save_adapter(adapter, tmp_path / "auto")

    loaded = adapted_models(working_copy(base, model_specs(config)), tmp_path / "auto")  # from the manifest
    assert is_auto_segmenter(loaded["seg"])
    for name, param in loaded["seg"].named_parameters():
        assert torch.equal(param, adapter.tensors[f"seg.{name}"])


def test_a_receiver_of_the_other_segmenter_or_shape_refuses_the_adapter(base, tmp_path):
    torch.manual_seed(0)
    auto = extract_adapter(fresh(base, load_config(TINY)), base_fingerprints=base.fingerprints)
    save_adapter(auto, tmp_path / "auto")
    sam_models = fresh(base, load_config({}))
    with pytest.raises(AdapterMismatchError, match="of the segmenter 'segresnet', this model is 'sam-med3d'"):
        apply_adapter(sam_models, load_adapter(tmp_path / "auto"), base_fingerprints=base.fingerprints)
    wider = fresh(base, load_config({**TINY, "model.auto-init-filters": 8}))
    with pytest.raises(AdapterMismatchError, match="init_filters=4.*this model's is init_filters=8"):
        apply_adapter(wider, load_adapter(tmp_path / "auto"), base_fingerprints=base.fingerprints)
    with pytest.raises(AdapterMismatchError, match="does not fit the model"):  # a bare record: names, shapes
        apply_adapter(wider, type(auto)(auto.tensors, {"base_fingerprint": auto.manifest["base_fingerprint"]}),
                      base_fingerprints=base.fingerprints)  # fmt: skip
