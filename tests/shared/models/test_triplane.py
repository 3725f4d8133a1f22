"""Tests of the tri-plane classifier: shapes, seed-003 fusion, DP-safety, torchvision weight loading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from shared.config import AdapterConfig
from shared.models.triplane import (
    PLANES,
    TriPlaneClassifier,
    build_triplane_classifier,
    frame_probabilities_to_lesion,
    load_backbone_weights,
    malignant_probabilities,
)

SIZE = 32  # pixels per side of the test images: small and fast, enough for 5 stride-2 stages


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _images(batch: int = 2, planes: int = 3) -> torch.Tensor:
    """Random frame-triplets (B, P, 1, SIZE, SIZE)."""
    return torch.randn(batch, planes, 1, SIZE, SIZE)


def _capture_branch_features(model: TriPlaneClassifier) -> dict[str, torch.Tensor]:
    """Register forward hooks that store each branch's output (B, F) under its plane name."""
    captured: dict[str, torch.Tensor] = {}
    for plane, branch in model.branches.items():
        branch.register_forward_hook(lambda _m, _i, out, plane=plane: captured.__setitem__(plane, out))
    return captured


# --- shapes and construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "feature_dim"), [(18, 512), (34, 512)])
def test_output_shape_small_depths(depth: int, feature_dim: int) -> None:
    model = build_triplane_classifier(depth=depth)
    assert model(_images(batch=2)).shape == (2, 2)
    assert model.feature_dim == feature_dim
    assert (model.head.reduce.in_features, model.head.reduce.out_features) == (2 * feature_dim, feature_dim)


def test_output_shape_depth_50() -> None:
    model = build_triplane_classifier(depth=50)
    assert model(_images(batch=1)).shape == (1, 2)
    assert model.feature_dim == 2048
    assert model.head.reduce.weight.shape == (2048, 4096)
    assert model.head.out.weight.shape == (2, 2048)
    assert model.branches["coronal"].layer1[0].conv3.weight.shape == (256, 64, 1, 1)
    assert model.branches["coronal"].layer2[0].conv2.stride == (2, 2)  # torchvision (v1.5) stride placement


def test_branches_have_one_input_channel_and_no_fc() -> None:
    model = build_triplane_classifier(depth=18)
    assert list(model.branches) == list(PLANES)
    for branch in model.branches.values():
        assert branch.conv1.weight.shape == (64, 1, 7, 7)
        assert branch.conv1.stride == (2, 2)
        assert branch.fc is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depth": 101},
        {"planes": ("axial",)},
        {"planes": ()},
        {"planes": ("coronal", "coronal")},
        {"norm_groups": 0},
        {"dropout": 1.0},
    ],
)
def test_invalid_constructor_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        build_triplane_classifier(**{"depth": 18, **kwargs})


# --- fusion ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("planes", "fuse"),
    [
        (PLANES, lambda f: torch.cat([f["transverse"] + f["sagittal"], f["coronal"]], dim=1)),
        (("sagittal", "transverse"), lambda f: f["transverse"] + f["sagittal"]),
        (("coronal", "sagittal"), lambda f: torch.cat([f["sagittal"], f["coronal"]], dim=1)),
        (("coronal",), lambda f: f["coronal"]),
    ],
)
def test_fusion_matches_hand_computation(planes: tuple[str, ...], fuse) -> None:
    model = build_triplane_classifier(depth=18, planes=planes).eval()
    captured = _capture_branch_features(model)
    with torch.no_grad():
        logits = model(_images(batch=3))
    assert model.planes == tuple(p for p in PLANES if p in planes)
    assert set(captured) == set(planes)
    fused = fuse(captured)
    assert model.head.reduce.weight.shape == (fused.shape[1] // 2, fused.shape[1])  # halves the width
    head = model.head
    hidden = torch.clamp(fused @ head.reduce.weight.T + head.reduce.bias, min=0.0)
    expected = hidden @ head.out.weight.T + head.out.bias
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_dict_input_equals_stacked_input() -> None:
    model = build_triplane_classifier(depth=18).eval()
    x = _images(batch=2)
    as_dict = {plane: x[:, i] for i, plane in enumerate(PLANES)}
    with torch.no_grad():
        torch.testing.assert_close(model(as_dict), model(x), rtol=0, atol=0)


def test_fewer_plane_model_reads_full_and_own_stacks() -> None:
    model = build_triplane_classifier(depth=18, planes=("transverse", "coronal")).eval()
    x = _images(batch=2)
    with torch.no_grad():
        from_full = model(x)
        from_own = model(x[:, [0, 2]])
        from_dict = model({"coronal": x[:, 2], "transverse": x[:, 0]})
    torch.testing.assert_close(from_full, from_own, rtol=0, atol=0)
    torch.testing.assert_close(from_full, from_dict, rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad",
    [
        torch.randn(2, 4, 1, SIZE, SIZE),
        torch.randn(2, 3, 2, SIZE, SIZE),
        torch.randn(2, 3, SIZE, SIZE),
        {"transverse": torch.randn(2, 1, SIZE, SIZE), "sagittal": torch.randn(2, 1, SIZE, SIZE)},
        {p: torch.randn(2, SIZE, SIZE) for p in PLANES},
    ],
)
def test_invalid_inputs_raise(bad) -> None:
    model = build_triplane_classifier(depth=18)
    with pytest.raises(ValueError):
        model(bad)


# --- normalisation and differential privacy -------------------------------------------------------------


def test_no_batch_norm_and_opacus_validator_passes() -> None:
    model = build_triplane_classifier(depth=18)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert not [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3 * 20  # resnet18 branch: stem 1 + 8 blocks x 2 + 3 downsample norms
    assert all(m.num_groups == 32 and m.affine for m in norms)
    assert ModuleValidator.validate(model, strict=False) == []


def test_norm_groups_fall_back_to_a_divisor() -> None:
    model = build_triplane_classifier(depth=18, planes=("transverse",), norm_groups=24)
    groups = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {64: 16, 128: 16, 256: 16, 512: 16}


def test_samples_do_not_mix_in_a_batch() -> None:
    model = build_triplane_classifier(depth=18).train()  # train mode: norms must still be per-sample
    x = _images(batch=3)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_opacus_per_sample_gradients_equal_single_sample_gradients() -> None:
    model = build_triplane_classifier(depth=18)
    grad_model = GradSampleModule(model, loss_reduction="sum")
    x, target = _images(batch=3), torch.tensor([0, 1, 1])
    F.cross_entropy(grad_model(x), target, reduction="sum").backward()
    checked = {
        "branches.transverse.conv1.weight": model.branches["transverse"].conv1.weight,
        "branches.coronal.layer3.0.bn2.weight": model.branches["coronal"].layer3[0].bn2.weight,
        "branches.sagittal.layer4.0.downsample.0.weight": model.branches["sagittal"]
        .layer4[0]
        .downsample[0]
        .weight,
        "head.reduce.weight": model.head.reduce.weight,
    }
    per_sample = {name: p.grad_sample.clone() for name, p in checked.items()}
    assert all(p.grad_sample is not None for p in model.parameters())
    for p in model.parameters():
        torch.testing.assert_close(p.grad_sample.sum(dim=0), p.grad, rtol=1e-4, atol=1e-5)
    grad_model.zero_grad(set_to_none=True)
    grad_model.disable_hooks()
    F.cross_entropy(model(x[1:2]), target[1:2], reduction="sum").backward()
    for name, p in checked.items():
        assert per_sample[name].shape == (3, *p.shape)
        torch.testing.assert_close(per_sample[name][1], p.grad, rtol=1e-4, atol=1e-6)


def test_lora_target_regex_hits_only_branch_convolutions() -> None:
    model = build_triplane_classifier(depth=18)
    regex = AdapterConfig().cls_lora_targets
    hits = {name for name, _ in model.named_modules() if re.fullmatch(regex, name)}
    convs = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert hits <= convs
    assert {name for name in convs if ".downsample." not in name} <= hits
    assert "branches.transverse.layer1.0.conv2" in hits and "branches.coronal.conv1" in hits


# --- lesion probability ---------------------------------------------------------------------------------


def test_frame_probabilities_to_lesion_is_the_mean() -> None:
    probs = torch.tensor([[0.2, 0.4, 0.9], [1.0, 0.0, 0.5]])
    torch.testing.assert_close(frame_probabilities_to_lesion(probs), torch.tensor([0.5, 0.5]))
    assert frame_probabilities_to_lesion(torch.tensor([0.6, 0.8])).item() == pytest.approx(0.7)
    assert frame_probabilities_to_lesion(torch.tensor([0.6, 0.8])).shape == ()


@pytest.mark.parametrize(
    "bad", [torch.empty(0), torch.tensor(0.5), torch.tensor([0.5, 1.2]), torch.tensor([0.1, torch.nan])]
)
def test_frame_probabilities_to_lesion_rejects_invalid(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        frame_probabilities_to_lesion(bad)


def test_malignant_probabilities_use_class_one() -> None:
    logits = torch.tensor([[0.0, 0.0], [0.0, 2.0], [3.0, -1.0]])
    expected = torch.softmax(logits, dim=1)[:, 1]
    torch.testing.assert_close(malignant_probabilities(logits), expected)
    with pytest.raises(ValueError):
        malignant_probabilities(torch.zeros(3, 3))


# --- torchvision weights ---------------------------------------------------------------------------------


_TORCHVISION_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


def _torchvision_resnet_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of torchvision's ``resnet{depth}().state_dict()``, in its order."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def batch_norm(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bottleneck = depth == 50
    expansion = 4 if bottleneck else 1
    batch_norm("bn1", 64)
    in_channels = 64
    for stage, (width, blocks) in enumerate(
        zip((64, 128, 256, 512), _TORCHVISION_BLOCKS[depth], strict=True), start=1
    ):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            if bottleneck:
                convs = [(width, in_channels, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            else:
                convs = [(width, in_channels, 3, 3), (width, width, 3, 3)]
            for index, shape in enumerate(convs, start=1):
                shapes[f"{prefix}.conv{index}.weight"] = shape
                batch_norm(f"{prefix}.bn{index}", shape[0])
            if block == 0 and (stage > 1 or bottleneck):
                shapes[f"{prefix}.downsample.0.weight"] = (width * expansion, in_channels, 1, 1)
                batch_norm(f"{prefix}.downsample.1", width * expansion)
            in_channels = width * expansion
    shapes["fc.weight"] = (1000, 512 * expansion)
    shapes["fc.bias"] = (1000,)
    return shapes


def _constant_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Key i filled with the value i, as expanded views (one stored float each: files stay tiny)."""
    return {key: torch.tensor(float(i)).expand(shape) for i, (key, shape) in enumerate(shapes.items())}


def _random_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        key: torch.tensor(7)
        if key.endswith("num_batches_tracked")
        else torch.randn(shape, generator=generator)
        for key, shape in shapes.items()
    }


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_load_torchvision_resnet18_weights(tmp_path: Path, wrapper: str | None) -> None:
    state = _random_state(_torchvision_resnet_shapes(18))
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 90}, path)
    model = build_triplane_classifier(depth=18)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}

    load_backbone_weights(model, path)

    rgb_stem = state["conv1.weight"]
    for branch in model.branches.values():
        torch.testing.assert_close(branch.conv1.weight, rgb_stem.sum(dim=1, keepdim=True), rtol=0, atol=0)
        assert torch.equal(branch.layer2[0].downsample[0].weight, state["layer2.0.downsample.0.weight"])
        assert torch.equal(branch.layer2[0].downsample[1].bias, state["layer2.0.downsample.1.bias"])
        assert torch.equal(branch.layer3[1].bn2.weight, state["layer3.1.bn2.weight"])
        assert torch.equal(branch.bn1.bias, state["bn1.bias"])
        assert torch.equal(branch.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, head_before[key]), key
    # A grey image through the summed stem equals the RGB stem on the image copied to three channels.
    grey = torch.randn(1, 1, SIZE, SIZE)
    branch = model.branches["sagittal"]
    torch.testing.assert_close(
        branch.conv1(grey),
        F.conv2d(grey.repeat(1, 3, 1, 1), rgb_stem, stride=2, padding=3),
        rtol=1e-4,
        atol=1e-4,
    )


def test_load_rejects_shape_mismatch_and_missing_keys(tmp_path: Path) -> None:
    state = _random_state(_torchvision_resnet_shapes(18))
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    del state["layer4.1.bn2.bias"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        load_backbone_weights(build_triplane_classifier(depth=18, planes=("coronal",)), path)
    message = str(error.value)
    assert str(path) in message
    assert "layer4.1.bn2.bias" in message
    assert "layer1.0.conv1.weight: expected (64, 64, 3, 3), found (64, 64, 1, 1)" in message


def test_load_torchvision_resnet50_weights(tmp_path: Path) -> None:
    shapes = _torchvision_resnet_shapes(50)
    state = _constant_state(shapes)
    path = tmp_path / "resnet50_imagenet.pth"
    torch.save(state, path)
    model = build_triplane_classifier(depth=50, planes=("transverse",))

    load_backbone_weights(model, path)

    branch = model.branches["transverse"]
    index = {key: float(i) for i, key in enumerate(shapes)}
    assert torch.all(branch.conv1.weight == 3 * index["conv1.weight"])
    assert torch.all(branch.layer1[0].downsample[0].weight == index["layer1.0.downsample.0.weight"])
    assert torch.all(branch.layer3[5].bn3.bias == index["layer3.5.bn3.bias"])
    assert torch.all(branch.layer4[2].conv3.weight == index["layer4.2.conv3.weight"])


def test_load_rejects_a_file_of_another_depth(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(_constant_state(_torchvision_resnet_shapes(50)), path)
    with pytest.raises(ValueError, match=r"resnet18 branches \(it looks like a resnet50\).*unexpected"):
        load_backbone_weights(build_triplane_classifier(depth=18, planes=("coronal",)), path)


def test_load_rejects_missing_file_and_non_state_dict(tmp_path: Path) -> None:
    model = build_triplane_classifier(depth=18, planes=("coronal",))
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_backbone_weights(model, tmp_path / "absent.pth")
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="no state dict"):
        load_backbone_weights(model, path)
