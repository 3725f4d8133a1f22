"""The frozen base bundle: save/load, fingerprints, making a base from official-format checkpoints."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.adapters import LoraSpec, adapter_parameters
from shared.base import (
    BaseModels,
    base_from_checkpoints,
    base_stamp,
    build_random_base,
    load_base,
    save_base,
    working_copy,
    wrap_for_training,
)
from shared.models.sam_med3d import CheckpointError


@pytest.fixture(scope="module")
def base():
    return build_random_base("small", cls_depth=18, seed=3)


def test_save_load_round_trip_keeps_weights_and_fingerprints(tmp_path, base):
    path = save_base(base, tmp_path / "base")
    loaded = load_base(path, attention_impl="reference")
    assert loaded.fingerprints == base.fingerprints
    assert loaded.fingerprint.startswith("seg=sha256:")
    for key, value in base.sam.state_dict().items():
        assert torch.equal(loaded.sam.state_dict()[key], value), key
    assert loaded.cls_config == base.cls_config


def test_tampered_base_is_refused(tmp_path, base):
    path = save_base(base, tmp_path / "base")
    tensors = load_file(str(path))
    tensors["seg.image_encoder.pos_embed"] = tensors["seg.image_encoder.pos_embed"] + 1e-3
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="fingerprints"):
        load_base(path)
    with pytest.raises(CheckpointError, match="base not found"):
        load_base(tmp_path / "nothing")


def test_seeded_random_bases_agree_and_differ_by_seed(base):
    again = build_random_base("small", cls_depth=18, seed=3)
    other = build_random_base("small", cls_depth=18, seed=4)
    assert again.fingerprints == base.fingerprints
    assert other.fingerprints["seg"] != base.fingerprints["seg"]


def test_base_from_official_format_checkpoint(tmp_path, base):
    ckpt = tmp_path / "sam.pth"
    torch.save({"model_state_dict": base.sam.state_dict(), "epoch": 1}, ckpt)
    made = base_from_checkpoints(ckpt, sam_config="small", cls_depth=18, seed=3)
    assert made.fingerprints["seg"] == base.fingerprints["seg"]
    assert made.provenance["sam_checkpoint"] == "sam.pth"
    bad = tmp_path / "wrong.pth"
    torch.save({"model_state_dict": {"image_encoder.pos_embed": torch.zeros(1)}}, bad)
    with pytest.raises(CheckpointError, match="wrong.pth"):
        base_from_checkpoints(bad, sam_config="small", cls_depth=18)


def test_wrap_for_training_marks_only_adapters_trainable():
    fresh = build_random_base("small", cls_depth=18, seed=0)
    models = wrap_for_training(
        fresh,
        {
            "seg": LoraSpec(),
            "cls": LoraSpec(targets=r"branches\.\w+\..*conv\d*", trainable=("head",)),
        },
    )
    for name, model in models.items():
        params = adapter_parameters(model)
        assert params, name
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen, name
    cls_names = set(adapter_parameters(models["cls"]))
    assert any(n.startswith("head.") for n in cls_names)
    assert any(".lora_A." in n and n.startswith("branches.coronal.") for n in cls_names)


def test_trusted_fingerprints_skip_hashing_but_must_match_the_manifest(tmp_path, base, monkeypatch):
    path = save_base(base, tmp_path / "base")
    monkeypatch.setattr(BaseModels, "refresh_fingerprints", lambda self: pytest.fail("weights were hashed"))
    loaded = load_base(path, fingerprints=dict(base.fingerprints))
    assert loaded.fingerprints == base.fingerprints
    with pytest.raises(CheckpointError, match="fingerprints"):
        load_base(path, fingerprints={"seg": "sha256:0", "cls": "sha256:0"})


def test_base_stamp_changes_when_a_file_is_rewritten_or_swapped(tmp_path, base):
    path = save_base(base, tmp_path / "base")
    first = base_stamp(path)
    assert base_stamp(tmp_path / "base") == first  # X, X.safetensors and X.json name the same base
    other = save_base(build_random_base("small", cls_depth=18, seed=4), tmp_path / "other")
    st = os.stat(path)
    os.replace(other, path)  # same size; give it the old mtime too
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    swapped = base_stamp(path)
    assert swapped["safetensors"][0] == first["safetensors"][0]
    assert swapped["safetensors"][1] == first["safetensors"][1]
    assert swapped != first
    with pytest.raises(CheckpointError, match="base not found"):
        base_stamp(tmp_path / "nothing")


def test_working_copy_shares_frozen_weights_and_copies_what_trains(base):
    specs = {"seg": LoraSpec(), "cls": LoraSpec(targets=r"branches\.\w+\..*conv\d*", trainable=("head",))}
    fingerprints = dict(base.refresh_fingerprints())
    models = wrap_for_training(working_copy(base, specs), specs)
    copied = dict(models["seg"].get_base_model().named_parameters())
    qkv = "image_encoder.blocks.0.attn.qkv.base_layer.weight"
    assert copied[qkv].data_ptr() == base.sam.image_encoder.blocks[0].attn.qkv.weight.data_ptr()
    with torch.no_grad():
        for model in models.values():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(1.0)
    assert base.refresh_fingerprints() == fingerprints
    assert not any(name.startswith("base_model") for name, _ in base.sam.named_modules())
