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
    check_filled,
    load_base,
    save_base,
    working_copy,
    wrap_for_training,
)
from shared.models.sam_med3d import CheckpointError, build_sam_med3d, load_state_dict_strict
from shared.models.triplane import build_triplane_classifier
from tests.shared.tiny_sam import TINY_SAM


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


def _old_style_load(path):
    """How ``load_base`` built the models before: random initialisation, then the weights copied in."""
    tensors = load_file(str(path))
    sam = build_sam_med3d(TINY_SAM, attention_impl="reference")
    cls = build_triplane_classifier(depth=18, planes=("transverse", "sagittal", "coronal"), norm_groups=32)
    for prefix, model in (("seg", sam), ("cls", cls)):
        part = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        load_state_dict_strict(model, part)
    return sam, cls


def test_load_base_builds_on_meta_and_matches_the_old_construction(tmp_path):
    torch.manual_seed(5)
    tiny = BaseModels(
        build_sam_med3d(TINY_SAM, attention_impl="reference"),
        build_triplane_classifier(depth=18),
        TINY_SAM,
        {"depth": 18, "planes": ["transverse", "sagittal", "coronal"], "norm_groups": 32},
    )
    path = save_base(tiny, tmp_path / "tiny")
    old_sam, old_cls = _old_style_load(path)
    new = load_base(path, attention_impl="reference")
    for old, model in ((old_sam, new.sam), (old_cls, new.cls)):
        old_tensors = dict(old.named_parameters()) | dict(old.named_buffers())
        new_tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        assert old_tensors.keys() == new_tensors.keys()
        for name, value in old_tensors.items():
            got = new_tensors[name]
            assert got.device.type == "cpu" and got.dtype == value.dtype, name
            assert torch.equal(got, value), name
            assert isinstance(got, torch.nn.Parameter) == isinstance(value, torch.nn.Parameter), name
            if isinstance(value, torch.nn.Parameter):
                assert got.requires_grad == value.requires_grad, name
    # non-persistent buffers (not in the file) are rebuilt with their values
    assert torch.equal(new.sam.pixel_mean, old_sam.pixel_mean) and torch.equal(
        new.sam.pixel_std, old_sam.pixel_std
    )
    image = torch.randn(1, 1, 32, 32, 32)
    points = (torch.tensor([[[16.0, 16.0, 16.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        old_emb, new_emb = old_sam.image_encoder(image), new.sam.image_encoder(image)
        assert torch.equal(old_emb, new_emb)
        for a, b in zip(
            old_sam.decode(old_emb, points, None), new.sam.decode(new_emb, points, None), strict=True
        ):
            assert torch.equal(a, b)
        frames = torch.randn(2, 3, 1, 64, 64)
        assert torch.equal(old_cls.eval()(frames), new.cls.eval()(frames))


def test_empty_working_copy_must_be_filled_completely(base):
    specs = {"seg": LoraSpec(), "cls": LoraSpec(targets=r"branches\.\w+\..*conv\d*", trainable=("head",))}
    fingerprints = dict(base.refresh_fingerprints())
    working = working_copy(base, specs, empty=True)
    models = wrap_for_training(working, specs)
    trained = {
        f"{prefix}.{name}": p
        for prefix, model in models.items()
        for name, p in adapter_parameters(model).items()
    }
    left = {name for name in working.unfilled}
    assert left and all(name in trained for name in left)  # only fully trained parameters are left empty
    assert not any(".lora_" in name for name in left)
    shared_weight = base.sam.image_encoder.blocks[0].attn.qkv.weight
    qkv = models["seg"].get_base_model().image_encoder.blocks[0].attn.qkv.base_layer.weight
    assert qkv.data_ptr() == shared_weight.data_ptr()
    with pytest.raises(RuntimeError, match="never filled"):
        check_filled(working)
    with torch.no_grad():
        for name in sorted(left)[:-1]:
            trained[name].copy_(torch.zeros_like(trained[name]))
    with pytest.raises(RuntimeError, match="1 parameter"):
        check_filled(working)
    with torch.no_grad():
        last = sorted(left)[-1]
        trained[last].copy_(torch.ones_like(trained[last]))
    check_filled(working)
    assert base.refresh_fingerprints() == fingerprints


# --- classifier ablations in the base -------------------------------------------------------------------


def test_base_keeps_the_classifier_backbone_fusion_and_planes(tmp_path):
    """A 1-plane VGG-19 late-mean base, built by build_random_base (no hand-built base), is rebuilt as such."""
    made = build_random_base(
        TINY_SAM, cls_arch="vgg19", cls_fusion="late-mean", cls_planes=("coronal",), cls_norm_groups=8, seed=1
    )
    assert made.cls_config == {
        "backbone": "vgg19",
        "depth": 18,
        "planes": ["coronal"],
        "norm_groups": 8,
        "fusion": "late-mean",
    }
    loaded = load_base(save_base(made, tmp_path / "vgg"), attention_impl="reference")
    assert (loaded.cls.backbone, loaded.cls.fusion, loaded.cls.planes) == ("vgg19", "late-mean", ("coronal",))
    assert loaded.cls_config == made.cls_config and loaded.fingerprints == made.fingerprints
    frames = torch.randn(1, 3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.cls.eval()(frames), made.cls.eval()(frames))


def test_base_from_checkpoints_takes_the_classifier_ablation(tmp_path, base):
    ckpt = tmp_path / "sam.pth"
    torch.save({"model_state_dict": base.sam.state_dict()}, ckpt)
    made = base_from_checkpoints(
        ckpt, sam_config="small", cls_depth=18, cls_fusion="concat", cls_planes=("transverse", "sagittal")
    )
    assert (made.cls.backbone, made.cls.fusion, made.cls.planes) == (
        "resnet18",
        "concat",
        ("transverse", "sagittal"),
    )
    assert made.cls.head.reduce.in_features == 2 * 512


def test_pretrain_recipe_follows_the_config_and_keeps_old_cache_keys():
    from shared.config import load_config
    from shared.pretrain import PretrainRecipe

    default = PretrainRecipe.from_config(load_config({"model.cls-depth": 18}))
    assert (
        default == PretrainRecipe() and default.key() == "ba4f44341c39"
    )  # the key from before the ablations
    config = load_config(
        {
            "model.cls-backbone": "resnext50",
            "model.cls-fusion": "late-mean",
            "train.cls-planes": "coronal,sagittal",
            "adapter.lora-rank": 32,  # PEFT adapts ResNeXt's grouped convolutions only at a multiple of 32
        }
    )
    recipe = PretrainRecipe.from_config(config)
    assert (recipe.cls_arch, recipe.cls_fusion, recipe.cls_planes) == (
        "resnext50",
        "late-mean",
        ("sagittal", "coronal"),
    )
    assert len({recipe.key(), default.key(), PretrainRecipe(cls_planes=("coronal",)).key()}) == 3


def test_pretraining_runs_on_one_cpu_thread_and_gives_the_callers_count_back(monkeypatch, tmp_path):
    from shared import pretrain
    from shared.config import load_config

    seen = []
    monkeypatch.setattr(pretrain, "_pretrain", lambda *args: seen.append(torch.get_num_threads()) or tmp_path)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        recipe = pretrain.PretrainRecipe()
        assert pretrain.pretrain_base(tmp_path / "b", recipe, load_config(), device="cpu") == tmp_path
        assert seen == [pretrain.PRETRAIN_CPU_THREADS] == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
