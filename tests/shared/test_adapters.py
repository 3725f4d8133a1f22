"""The adapter format: parameter counts, trainable set, round trips, fingerprints, mismatch errors, merging."""

from __future__ import annotations

import json

import pytest
import torch

from shared.adapters import (
    Adapter,
    AdapterError,
    AdapterMismatchError,
    LoraSpec,
    adapter_parameters,
    apply_adapter,
    attach_lora,
    extract_adapter,
    ffa_lora_a,
    fingerprint_state_dict,
    load_adapter,
    lora_specs_from_config,
    save_adapter,
    set_ffa_lora_a,
)
from shared.config import AdapterConfig, TrainConfig
from shared.models.sam_med3d import build_sam_med3d


def small_seg(seed: int = 0, spec: LoraSpec | None = None):
    torch.manual_seed(seed)
    base = build_sam_med3d("small")
    fingerprint = fingerprint_state_dict(base.state_dict())
    return attach_lora(base, spec or LoraSpec()), fingerprint


def randomise_adapter(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_parameters(model).values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def test_vit_b_ori_rank4_seg_adapter_is_the_seed_customised_module():
    model = attach_lora(build_sam_med3d("vit_b_ori"), LoraSpec(rank=4))
    params = adapter_parameters(model)
    n = sum(p.numel() for p in params.values())
    assert n == 7_731_760
    assert n * 4 / 2**20 == pytest.approx(29.49, abs=0.01)  # MiB in fp32 (the seed's "29.56 MB")
    lora = sum(p.numel() for k, p in params.items() if ".lora_" in k)
    assert lora == 147_456
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(params)
    for name in trainable:
        assert ".lora_" in name or ".prompt_encoder." in name or ".mask_decoder." in name, name
    frozen_encoder = [p for n, p in model.named_parameters() if "image_encoder" in n and ".lora_" not in n]
    assert frozen_encoder and not any(p.requires_grad for p in frozen_encoder)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model, fp = small_seg()
    randomise_adapter(model)
    adapter = extract_adapter({"seg": model}, base_fingerprints={"seg": fp}, metadata={"round": 3})
    assert all(t.dtype == torch.float32 for t in adapter.tensors.values())
    assert all(k.startswith("seg.") for k in adapter.tensors)
    tensor_path, manifest_path = save_adapter(adapter, tmp_path / "global")
    loaded = load_adapter(tmp_path / "global.safetensors")
    assert set(loaded.tensors) == set(adapter.tensors)
    for name, tensor in adapter.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    assert manifest["base_fingerprint"] == {"seg": fp}
    assert manifest["peft"]["seg"]["rank"] == 4 and manifest["peft"]["seg"]["method"] == "lora"
    assert manifest["num_parameters"] == adapter.num_parameters
    assert manifest["metadata"] == {"round": 3}
    assert {t["name"] for t in manifest["tensors"]} == set(adapter.tensors)

    fresh, fp2 = small_seg()  # same seed: same base
    assert fp2 == fp
    apply_adapter({"seg": fresh}, loaded, base_fingerprints={"seg": fp})
    for name, param in adapter_parameters(fresh).items():
        assert torch.equal(param.detach(), adapter.tensors[f"seg.{name}"])


def test_wrong_base_or_shapes_are_refused(tmp_path):
    model, fp = small_seg()
    adapter = extract_adapter({"seg": model}, base_fingerprints={"seg": fp})
    other, other_fp = small_seg(seed=5)
    assert other_fp != fp
    with pytest.raises(AdapterMismatchError, match="trained on base"):
        apply_adapter({"seg": other}, adapter, base_fingerprints={"seg": other_fp})
    rank8, _ = small_seg(spec=LoraSpec(rank=8))
    with pytest.raises(AdapterMismatchError, match=r"PEFT config rank=4, but this model's is rank=8"):
        apply_adapter({"seg": rank8}, adapter, base_fingerprints={"seg": fp})
    # Tensors without a recorded PEFT config (a round's packed adapter): names and shapes are checked.
    bare = Adapter(adapter.tensors, {"base_fingerprint": {"seg": fp}})
    with pytest.raises(
        AdapterMismatchError, match=r"shape mismatch: seg\.image_encoder\.blocks\.0\.attn\.qkv\.lora_A"
    ):
        apply_adapter({"seg": rank8}, bare, base_fingerprints={"seg": fp})
    no_decoder, _ = small_seg(spec=LoraSpec(trainable=("prompt_encoder",)))
    with pytest.raises(AdapterMismatchError, match="unexpected: seg.mask_decoder"):
        apply_adapter({"seg": no_decoder}, bare, base_fingerprints={"seg": fp})


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    model, fp = small_seg()
    tensor_path, manifest_path = save_adapter(
        extract_adapter({"seg": model}, base_fingerprints={"seg": fp}), tmp_path / "a"
    )
    data = bytearray(tensor_path.read_bytes())
    data[-1] ^= 0xFF
    tensor_path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum"):
        load_adapter(tensor_path)
    manifest_path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(AdapterError, match="not a fedabus adapter"):
        load_adapter(tensor_path)
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(tmp_path / "missing")


def test_fingerprint_is_content_defined():
    torch.manual_seed(0)
    state = {"b": torch.randn(3, 4), "a": torch.randn(5)}
    fp = fingerprint_state_dict(state)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert fingerprint_state_dict(dict(reversed(list(state.items())))) == fp
    transposed = {"b": state["b"].t().contiguous().t(), "a": state["a"]}  # non-contiguous view, same values
    assert not transposed["b"].is_contiguous()
    assert fingerprint_state_dict(transposed) == fp
    changed = {k: v.clone() for k, v in state.items()}
    changed["a"][2] += 1e-6
    assert fingerprint_state_dict(changed) != fp
    assert fingerprint_state_dict({"b": state["b"].double(), "a": state["a"]}) != fp
    assert fingerprint_state_dict({"c": state["b"], "a": state["a"]}) != fp


def test_specs_from_config_and_bad_targets():
    specs = lora_specs_from_config(AdapterConfig(lora_rank=2, seg_trainable="mask_decoder"))
    assert specs["seg"].rank == 2 and specs["seg"].trainable == ("mask_decoder",)
    with pytest.raises(ValueError, match="matches no module"):
        attach_lora(build_sam_med3d("small"), LoraSpec(targets=r"nothing\.here"))
    with pytest.raises(AttributeError):
        attach_lora(build_sam_med3d("small"), LoraSpec(trainable=("no_such_module",)))
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0)


def test_ffa_lora_a_is_shared_frozen_and_unchanged_by_a_training_step():
    from shared.models.sam_med3d import build_sam_med3d as build
    from shared.training.seg import train_segmentation
    from tests.shared.tiny_sam import TINY_SAM, P

    models = {}
    for torch_seed in (0, 1):  # two sites whose PEFT initialisations differ
        torch.manual_seed(torch_seed)
        models[torch_seed] = attach_lora(build(TINY_SAM, attention_impl="fast"), LoraSpec())
        set_ffa_lora_a(
            {"seg": models[torch_seed]}, seed=3, base_fingerprints={"seg": "sha256:f"}, freeze=True
        )
    sam = models[0]
    a_of = {n: p for n, p in sam.named_parameters() if "lora_A" in n}
    assert a_of and not any(p.requires_grad for p in a_of.values())
    other = dict(models[1].named_parameters())
    assert all(torch.equal(p, other[n]) for n, p in a_of.items())  # same A at every site, not sent
    name = "seg.image_encoder.blocks.0.attn.qkv.lora_A.weight"
    shape = tuple(a_of["base_model.model.image_encoder.blocks.0.attn.qkv.lora_A.default.weight"].shape)
    assert not torch.equal(
        ffa_lora_a(name, shape, seed=3, base_fingerprint="sha256:f"),
        ffa_lora_a(name, shape, seed=4, base_fingerprint="sha256:f"),
    )
    assert not any("lora_A" in n for n in adapter_parameters(sam))  # nor extracted, nor expected on apply
    before = {n: p.detach().clone() for n, p in sam.named_parameters()}
    mask = torch.zeros(1, 1, P, P, P)
    mask[..., P // 2 - 2 : P // 2 + 2, P // 2 - 2 : P // 2 + 2, P // 2 - 2 : P // 2 + 2] = 1
    config = TrainConfig(seg_epochs=1, seg_click_iterations=1, progress=False, seg_lr=1e-2)
    train_segmentation(
        sam, [{"image": torch.randn(1, 1, P, P, P), "mask": mask}], config=config, device="cpu"
    )
    after = dict(sam.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in a_of)
    assert any(not torch.equal(after[n], before[n]) for n in after if "lora_B" in n)
