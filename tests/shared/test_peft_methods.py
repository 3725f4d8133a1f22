"""PEFT methods (``adapter.method``: lora, dora, loha, lokr) and ``adapter.targets`` (qkv, proj, mlp): attach, train
one step through the seg stepper, round trip, refusal of another PEFT config, the fast attention path, the config
checks (aggregation modes, sample-level DP) and the per-sample gradients that make Opacus refuse dora/loha/lokr."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from shared.adapters import (
    Adapter,
    AdapterMismatchError,
    LoraSpec,
    adapter_parameters,
    apply_adapter,
    attach_lora,
    extract_adapter,
    fingerprint_state_dict,
    load_adapter,
    lora_specs_from_config,
    recorded_configs,
    save_adapter,
    seg_targets,
)
from shared.base import build_random_base, working_copy, wrap_for_training
from shared.config import ADAPTER_METHODS, AdapterConfig, ConfigError, TrainConfig, load_config
from shared.models.sam_med3d import build_sam_med3d
from shared.protocol import adapter_to_record, layout_of, record_to_adapter
from shared.training.seg import train_segmentation
from tests.shared.tiny_sam import TINY_SAM, P

ALL_TARGETS = seg_targets(AdapterConfig(targets="qkv,proj,mlp"))


def tiny_seg(method: str, *, targets: str = ALL_TARGETS, seed: int = 0, impl: str = "fast"):
    torch.manual_seed(seed)
    sam = build_sam_med3d(TINY_SAM, attention_impl=impl)
    fingerprint = fingerprint_state_dict(sam.state_dict())
    return attach_lora(sam, LoraSpec(method=method, targets=targets)), fingerprint


def randomise(model, seed: int = 1, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter_parameters(model).items():
            if "prompt_encoder" not in name and "mask_decoder" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def one_batch() -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    mask = torch.zeros(1, 1, P, P, P)
    mask[..., P // 2 - 3 : P // 2 + 3, P // 2 - 3 : P // 2 + 3, P // 2 - 3 : P // 2 + 3] = 1
    return [{"image": torch.randn(1, 1, P, P, P) + mask, "mask": mask}]


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_a_method_trains_one_step_through_the_seg_stepper_and_round_trips(method, tmp_path):
    model, fingerprint = tiny_seg(method)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    adapter_names = {name for name, p in model.named_parameters() if p.requires_grad}
    config = TrainConfig(seg_epochs=1, seg_click_iterations=1, seg_lr=1e-2, progress=False)
    report = train_segmentation(model, one_batch(), config=config, device="cpu")
    assert report["steps"] == 1 and all(map(torch.isfinite, torch.tensor(report["loss_history"])))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and changed <= adapter_names  # the frozen base is bit-exact
    peft_changed = {n for n in changed if "image_encoder" in n}
    assert peft_changed, f"{method}: no encoder adapter tensor trained"
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in adapter_names)

    adapter = extract_adapter({"seg": model}, base_fingerprints={"seg": fingerprint})
    assert adapter.manifest["peft"]["seg"]["method"] == method
    loaded = load_adapter(save_adapter(adapter, tmp_path / method)[0])
    assert loaded.manifest["peft"] == adapter.manifest["peft"]
    fresh, _ = tiny_seg(method, seed=0)
    apply_adapter({"seg": fresh}, loaded, base_fingerprints={"seg": fingerprint})
    for name, param in adapter_parameters(fresh).items():
        assert torch.equal(param.detach(), adapter.tensors[f"seg.{name}"]), name
    image = one_batch()[0]["image"]
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model.image_encoder(image), fresh.image_encoder(image))


def test_an_adapter_of_another_peft_config_is_refused_naming_both():
    dora, fingerprint = tiny_seg("dora", targets=seg_targets(AdapterConfig()))
    adapter = extract_adapter({"seg": dora}, base_fingerprints={"seg": fingerprint})
    lora, _ = tiny_seg("lora", targets=seg_targets(AdapterConfig()))
    with pytest.raises(
        AdapterMismatchError, match="PEFT config method='dora'.*, but this model's is method='lora'"
    ):
        apply_adapter({"seg": lora}, adapter, base_fingerprints={"seg": fingerprint})
    alpha8 = attach_lora(build_sam_med3d(TINY_SAM), LoraSpec(alpha=8.0))  # same tensors, other scaling
    plain = extract_adapter({"seg": lora}, base_fingerprints={"seg": fingerprint})
    with pytest.raises(AdapterMismatchError, match="alpha=4.0, but this model's is alpha=8.0"):
        apply_adapter({"seg": alpha8}, plain, base_fingerprints={"seg": fingerprint})


def test_targets_choose_the_encoder_linears_and_qkv_is_the_old_default():
    assert seg_targets(AdapterConfig()) == LoraSpec().targets == r"image_encoder\.blocks\.\d+\.attn\.qkv"
    assert seg_targets(AdapterConfig(targets="mlp, proj")) == seg_targets(AdapterConfig(targets="proj,mlp"))
    model = build_sam_med3d(TINY_SAM)
    expected = {
        "qkv": {"attn.qkv"},
        "proj": {"attn.proj"},
        "mlp": {"mlp.lin1", "mlp.lin2"},
        "qkv,proj,mlp": {"attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2"},
    }
    blocks = len(model.image_encoder.blocks)
    for targets, tails in expected.items():
        regex = seg_targets(AdapterConfig(targets=targets))
        matched = {n for n, _ in model.named_modules() if re.fullmatch(regex, n)}
        assert matched == {f"image_encoder.blocks.{i}.{t}" for i in range(blocks) for t in tails}, targets
    for bad in ("", "qkv,lin1", "patch_embed"):
        with pytest.raises(ConfigError, match="adapter.targets"):
            AdapterConfig(targets=bad)


def test_lora_default_is_the_adapter_of_before_bit_for_bit():
    """The default spec gives the names and initial values that PEFT's LoraConfig gave before adapter.method."""
    from peft import LoraConfig, get_peft_model

    spec = lora_specs_from_config(AdapterConfig())["seg"]
    assert spec == LoraSpec() and spec.method == "lora"
    torch.manual_seed(0)
    new = adapter_parameters(attach_lora(build_sam_med3d(TINY_SAM), spec))
    torch.manual_seed(0)
    old_config = LoraConfig(r=4, lora_alpha=4.0, lora_dropout=0.0, target_modules=spec.targets, bias="none")
    old = get_peft_model(build_sam_med3d(TINY_SAM), old_config)
    for name in ("prompt_encoder", "mask_decoder"):
        old.get_base_model().get_submodule(name).requires_grad_(True)
    old = adapter_parameters(old)
    assert list(new) == list(old)
    assert all(torch.equal(new[n], old[n]) for n in new)
    lora_names = {n for n in new if ".lora_" in n}
    assert lora_names == {
        f"image_encoder.blocks.{i}.attn.qkv.lora_{ab}.weight" for i in range(4) for ab in "AB"
    }


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_the_fast_attention_path_applies_every_target(method):
    """On the small preset (8³ tokens in padded 14³ windows, the fast path's case), each target's adapter changes
    the encoder output, and the fast path equals the reference implementation with the adapter on."""
    torch.manual_seed(0)
    image = torch.randn(1, 1, 64, 64, 64)
    for target in ("qkv", "proj", "mlp"):
        torch.manual_seed(0)
        sam = build_sam_med3d("small", attention_impl="fast")
        model = attach_lora(sam, LoraSpec(method=method, targets=seg_targets(AdapterConfig(targets=target))))
        model.eval()
        encoder = model.get_base_model().image_encoder
        with torch.no_grad():
            plain = encoder(image)
            randomise(model, scale=0.5)
            fast = encoder(image)
            encoder.set_attention_impl("reference")
            reference = encoder(image)
        assert (fast - plain).abs().max() > 1e-3, f"{method}/{target}: adapter not applied"
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def small_base():
    return build_random_base("small", cls_depth=18, cls_norm_groups=8)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_server_and_site_build_the_same_adapter_from_the_run_config(method, small_base):
    """The server wraps the base (federation_run._initial_adapter), a site an empty working copy (client.task);
    both from lora_specs_from_config of the one run config. A record of another method does not fit."""
    specs = lora_specs_from_config(AdapterConfig(method=method, targets="qkv,mlp"))
    server = extract_adapter(
        wrap_for_training(working_copy(small_base, specs), specs), base_fingerprints=small_base.fingerprints
    )
    site_models = wrap_for_training(working_copy(small_base, specs, empty=True), specs)
    site_layout = layout_of(
        {f"{p}.{n}": t for p, m in site_models.items() for n, t in adapter_parameters(m).items()}
    )
    assert layout_of(server.tensors) == site_layout
    assert {p: s.describe() for p, s in specs.items()} == server.manifest["peft"]
    assert any(name.startswith("cls.branches.") for name in site_layout)  # the classifier gets the method too
    if method != "lora":
        lora_specs = lora_specs_from_config(AdapterConfig(targets="qkv,mlp"))
        lora = wrap_for_training(working_copy(small_base, lora_specs), lora_specs)
        lora_layout = layout_of(
            {f"{p}.{n}": t for p, m in lora.items() for n, t in adapter_parameters(m).items()}
        )
        with pytest.raises(AdapterMismatchError, match="does not fit"):
            record_to_adapter(adapter_to_record(server.tensors), lora_layout)


def test_config_refuses_what_only_lora_supports():
    for mode in ("ffa", "product"):
        with pytest.raises(
            ConfigError, match=f"lora-aggregation = '{mode}' works with adapter.method = 'lora'"
        ):
            load_config({"adapter.method": "dora", "federation.lora-aggregation": mode})
    for method in ("dora", "loha", "lokr"):
        with pytest.raises(
            ConfigError, match=f"sample-dp = true works with adapter.method = 'lora' only.*{method}"
        ):
            load_config({"adapter.method": method, "privacy.sample-dp": True})
        config = load_config({"adapter.method": method, "privacy.client-dp": "server-fixed"})
        assert config.adapter.method == method
    with pytest.raises(ConfigError, match="adapter.method = 'ia3'; allowed: lora, dora, loha, lokr"):
        load_config({"adapter.method": "ia3"})
    with pytest.raises(ConfigError, match="lora-dropout"):
        load_config({"adapter.method": "loha", "adapter.lora-dropout": 0.1})
    assert load_config({"adapter.method": "dora", "adapter.lora-dropout": 0.1}).adapter.lora_dropout == 0.1


@pytest.mark.parametrize("method", ["dora", "loha", "lokr"])
def test_opacus_gets_no_correct_per_sample_gradients_for_the_other_methods(method):
    """Why privacy.sample-dp refuses them: DoRA's magnitude layer is called with keyword arguments Opacus cannot
    replay (an error), LoHa/LoKr keep their tensors in parameter dicts that are never called as modules (no
    per-sample gradient at all). LoRA's are exact (tests/shared/training/test_seg.py)."""
    from opacus import GradSampleModule

    model, _ = tiny_seg(method, targets=seg_targets(AdapterConfig()))
    randomise(model)
    encoder = model.get_base_model().image_encoder
    params = [p for p in encoder.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = GradSampleModule(encoder)
        try:
            wrapped(torch.randn(2, 1, P, P, P)).square().sum().backward()
        except TypeError:
            assert method == "dora"
            return
        finally:
            wrapped._close()
    assert method != "dora" and all(getattr(p, "grad_sample", None) is None for p in params)


def test_a_manifest_from_before_adapter_method_reads_as_lora():
    lora, fingerprint = tiny_seg("lora", targets=seg_targets(AdapterConfig()))
    adapter = extract_adapter({"seg": lora}, base_fingerprints={"seg": fingerprint})
    old = {k: v for k, v in adapter.manifest["peft"]["seg"].items() if k not in ("method", "options")}
    manifest = {k: v for k, v in adapter.manifest.items() if k != "peft"}
    legacy = Adapter(adapter.tensors, {**manifest, "lora": {"seg": old}})
    assert recorded_configs(legacy.manifest) == adapter.manifest["peft"]
    apply_adapter({"seg": lora}, legacy, base_fingerprints={"seg": fingerprint})
    dora, _ = tiny_seg("dora", targets=seg_targets(AdapterConfig()))
    with pytest.raises(AdapterMismatchError, match="method='lora'"):
        apply_adapter({"seg": dora}, legacy, base_fingerprints={"seg": fingerprint})
