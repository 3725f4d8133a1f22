"""Seed 003's classifier ablations: backbones (``model.cls-backbone``) and plane fusions (``model.cls-fusion``).

Tiny inputs (32 px, one frame, 8 norm groups). The big backbones are built with one plane, once per test.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from shared.adapters import LoraSpec, adapter_parameters, attach_lora
from shared.config import AdapterConfig, ConfigError, load_config
from shared.models.triplane import (
    BACKBONES,
    FUSIONS,
    PLANES,
    TriPlaneClassifier,
    build_fusion_head,
    build_triplane_classifier,
    load_backbone_weights,
)

SIZE = 32
GROUPS = 8
SUBSETS = [("transverse",), ("sagittal",), ("coronal",), ("transverse", "sagittal"), PLANES]
#: The architectures besides today's resnet18/34/50, each with the parameter count of its torchvision model
#: (``sum(p.numel() for p in torchvision.models.NAME().parameters())``, 3-channel stem and 1000-class head).
TORCHVISION = {
    "resnet101": ("resnet101", 44_549_160),
    "resnext50": ("resnext50_32x4d", 25_028_904),
    "densenet161": ("densenet161", 28_681_000),
    "vgg19": ("vgg19_bn", 143_678_248),
}
#: ``adapter.cls-lora-targets`` for ResNeXt-50 (docs/training.md): every convolution but the grouped 3x3 ones.
RESNEXT_TARGETS = r"branches\.\w+\.(conv1|layer\d\.\d+\.conv[13]|layer\d\.0\.downsample\.0)"
#: Parameters of torchvision's classifier, which the branches drop: one linear F -> 1000, VGG's three
#: (25088 -> 4096 -> 4096 -> 1000; the branch pools globally instead).
VGG_CLASSIFIER = 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
#: A few keys and shapes of each torchvision state dict (from torchvision's model definitions).
TORCHVISION_KEYS = {
    "resnet101": {"layer3.22.conv3.weight": (1024, 256, 1, 1), "fc.weight": (1000, 2048)},
    "resnext50": {"layer1.0.conv2.weight": (128, 4, 3, 3), "layer4.2.conv3.weight": (2048, 1024, 1, 1)},
    "densenet161": {
        "features.denseblock4.denselayer24.conv2.weight": (48, 192, 3, 3),
        "features.transition3.conv.weight": (1056, 2112, 1, 1),
        "features.norm5.running_var": (2208,),
        "classifier.weight": (1000, 2208),
    },
    "vgg19": {
        "features.0.weight": (64, 3, 3, 3),
        "features.49.weight": (512, 512, 3, 3),
        "features.50.bias": (512,),
    },
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def plain_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN off: its set-up per convolution shape dominates tiny inputs through DenseNet-161's many shapes."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


def _images(batch: int = 2) -> torch.Tensor:
    """Random frame-triplets (B, 3, 1, SIZE, SIZE)."""
    return torch.randn(batch, len(PLANES), 1, SIZE, SIZE)


def _torchvision_state(model: TriPlaneClassifier, head: str) -> dict[str, torch.Tensor]:
    """What torchvision's state dict of the model's backbone holds, made from one branch: names renamed back,
    an RGB stem, BatchNorm running statistics and a 1000-class ``head``. Constant expanded tensors keep the
    file tiny; value i for key i."""
    branch = next(iter(model.branches.values()))
    back = {new: old for old, new in getattr(branch, "torchvision_renames", {}).items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in branch.named_modules():
        tv = back.get(name, name)
        for leaf, tensor in module.named_parameters(recurse=False):
            shape = tuple(tensor.shape)
            shapes[f"{tv}.{leaf}"] = (shape[0], 3, *shape[2:]) if len(shape) == 4 and shape[1] == 1 else shape
        if isinstance(module, nn.GroupNorm):
            shapes |= {
                f"{tv}.running_mean": (module.num_channels,),
                f"{tv}.running_var": (module.num_channels,),
            }
    shapes |= {f"{head}.weight": (1000, model.feature_dim), f"{head}.bias": (1000,)}
    return {key: torch.tensor(float(i)).expand(shape) for i, (key, shape) in enumerate(shapes.items())}


# --- default unchanged -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "digest"),
    [
        (18, "ec09a9ed4f4d62bb3070c658ad9ad0655852e1d7a49d49b5165b64b678530d32"),
        (50, "77a8b744a8028dc58f2089cd29908aa100aa32f41f52c3d3de421e3136ac619a"),
    ],
)
def test_default_config_keeps_the_parameter_names_and_shapes(depth: int, digest: str) -> None:
    """Digest of ``name shape`` lines of the state dict as built before the ablations existed."""
    with torch.device("meta"):
        model = build_triplane_classifier(depth=depth)
    text = "\n".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items())
    assert hashlib.sha256(text.encode()).hexdigest() == digest
    assert (model.backbone, model.fusion) == (f"resnet{depth}", "ts+c")


# --- fusions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("planes", SUBSETS, ids="+".join)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_works_with_every_plane_subset(fusion: str, planes: tuple[str, ...]) -> None:
    features = {p: torch.randn(3, 64) for p in planes}
    head = build_fusion_head(fusion, planes=planes, feature_dim=64).eval()
    assert head(features).shape == (3, 2)
    if fusion == "late-mean":
        assert list(head.per_plane) == list(planes)
    else:
        width = len(planes) * 64 if fusion == "concat" else _ts_c_width(planes)
        assert (head.reduce.in_features, head.reduce.out_features) == (width, width // 2)


def _ts_c_width(planes: tuple[str, ...]) -> int:
    return 64 if len(planes) == 1 or planes == ("transverse", "sagittal") else 128


def test_concat_and_late_mean_match_hand_computation() -> None:
    features = {p: torch.randn(2, 16) for p in PLANES}

    def mlp(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return (
            torch.clamp(x @ head.reduce.weight.T + head.reduce.bias, min=0) @ head.out.weight.T
            + head.out.bias
        )

    concat = build_fusion_head("concat", planes=PLANES, feature_dim=16).eval()
    expected = mlp(concat, torch.cat([features[p] for p in PLANES], dim=1))
    torch.testing.assert_close(concat(features), expected)
    late = build_fusion_head("late-mean", planes=PLANES, feature_dim=16).eval()
    expected = torch.stack([mlp(late.per_plane[p], features[p]) for p in PLANES]).mean(dim=0)
    torch.testing.assert_close(late(features), expected)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_resnet18_model_with_each_fusion(fusion: str) -> None:
    model = build_triplane_classifier(
        depth=18, planes=("sagittal", "coronal"), norm_groups=GROUPS, fusion=fusion
    )
    assert model(_images()).shape == (2, 2)
    assert model.fusion == fusion


# --- backbones -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", list(TORCHVISION))
def test_backbone_layout_has_torchvision_parameter_counts(backbone: str) -> None:
    name, count = TORCHVISION[backbone]
    with torch.device("meta"):
        model = build_triplane_classifier(backbone=backbone, planes=("coronal",))
    branch = model.branches["coronal"]
    stem = next(m for m in branch.modules() if isinstance(m, nn.Conv2d))
    rgb_extra = 2 * stem.weight[:, 0].numel()  # torchvision's stem reads 3 channels, the branch 1
    classifier = VGG_CLASSIFIER if backbone == "vgg19" else 1000 * model.feature_dim + 1000
    assert sum(p.numel() for p in branch.parameters()) + rgb_extra + classifier == count, name
    state = _torchvision_state(model, "classifier" if backbone in ("densenet161", "vgg19") else "fc")
    for key, shape in TORCHVISION_KEYS[backbone].items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("backbone", list(TORCHVISION))
@pytest.mark.usefixtures("plain_convolutions")
def test_backbone_forward_weights_and_lora_step(backbone: str, tmp_path: Path) -> None:
    """One model per backbone (one plane, 32 px): forward shape, feature width, torchvision weights loaded and a
    file of another architecture refused, LoRA on every convolution trained one step."""
    model = build_triplane_classifier(backbone=backbone, planes=("coronal",), norm_groups=GROUPS)
    branch = model.branches["coronal"]
    assert not [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not [m for m in model.modules() if isinstance(m, nn.ReLU) and m.inplace]
    ModuleValidator.validate(model, strict=True)  # Opacus accepts it (DP-SGD)
    x = _images(batch=1)
    with torch.no_grad():
        assert branch(x[:, 2]).shape == (1, model.feature_dim)

    head = "classifier" if backbone in ("densenet161", "vgg19") else "fc"
    path = tmp_path / f"{TORCHVISION[backbone][0]}.pth"
    initial = {k: v.clone() for k, v in branch.state_dict().items()}
    state = _torchvision_state(model, head)
    torch.save(state, path)
    load_backbone_weights(model, path)
    back = {new: old for old, new in getattr(branch, "torchvision_renames", {}).items()}
    for key, value in branch.state_dict().items():
        module, _, leaf = key.rpartition(".")
        source = state[f"{back.get(module, module)}.{leaf}"]
        expected = source.sum(dim=1, keepdim=True) if source.shape != value.shape else source  # RGB stem
        assert torch.equal(value, expected), key
    other = tmp_path / "other.pth"
    with torch.device("meta"):
        resnet18 = build_triplane_classifier(depth=18, planes=("coronal",))
    torch.save(_torchvision_state(resnet18, "fc"), other)
    with pytest.raises(
        ValueError, match=rf"other\.pth does not fit the {backbone} branches \(it looks like a resnet18\)"
    ):
        load_backbone_weights(model, other)

    branch.load_state_dict(initial)  # the constant weights would not train: back to the random ones

    regex = AdapterConfig().cls_lora_targets
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {n for n in convs if ".downsample." not in n} <= {
        n for n, _ in model.named_modules() if re.fullmatch(regex, n)
    }
    if backbone == "resnext50":  # PEFT adapts a grouped conv only when the rank is divisible by its groups
        with pytest.raises(ValueError, match="groups=32 and rank 4"), torch.device("meta"):
            fresh = build_triplane_classifier(backbone=backbone, planes=("coronal",))
            attach_lora(fresh, LoraSpec(targets=regex, trainable=("head",)))
        regex = RESNEXT_TARGETS
    peft = attach_lora(model, LoraSpec(targets=regex, trainable=("head",)))
    params = adapter_parameters(peft)
    lora_b = {n: p for n, p in params.items() if "lora_B" in n}
    assert lora_b and all(torch.all(p == 0) for p in lora_b.values())
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    nn.functional.cross_entropy(peft(x), torch.tensor([1])).backward()
    optimizer.step()
    assert any(torch.any(p != 0) for p in lora_b.values())


# --- refusals --------------------------------------------------------------------------------------------


def test_resnext_with_grouped_convolutions_at_a_rank_peft_cannot_adapt_is_refused_at_config_load() -> None:
    with pytest.raises(ConfigError, match="model.cls-backbone = 'resnext50' with adapter.lora-rank = 4"):
        load_config({"model.cls-backbone": "resnext50"})
    assert load_config({"model.cls-backbone": "resnext50", "adapter.lora-rank": 32}).adapter.lora_rank == 32
    fine = load_config({"model.cls-backbone": "resnext50", "adapter.cls-lora-targets": RESNEXT_TARGETS})
    assert fine.adapter.cls_lora_targets == RESNEXT_TARGETS


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "vgg16"}, "backbone='vgg16'"),
        ({"fusion": "sum"}, "fusion='sum'"),
        ({"backbone": "resnet", "depth": 101}, "depth=101"),
    ],
)
def test_model_refuses_unknown_backbone_fusion_and_depth(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_triplane_classifier(**kwargs)


@pytest.mark.parametrize(
    ("key", "value"),
    [("model.cls-backbone", "resnet152"), ("model.cls-fusion", "max"), ("model.cls-norm-groups", 0)],
)
def test_config_refuses_unknown_values(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config({key: value})


def test_config_accepts_every_backbone_and_fusion() -> None:
    for backbone in BACKBONES:
        for fusion in FUSIONS:
            targets = {"adapter.cls-lora-targets": RESNEXT_TARGETS} if backbone == "resnext50" else {}
            model = load_config({"model.cls-backbone": backbone, "model.cls-fusion": fusion, **targets}).model
            assert (model.cls_backbone, model.cls_fusion) == (backbone, fusion)


@pytest.mark.usefixtures("plain_convolutions")
def test_grad_cam_uses_the_features_of_a_vgg_branch() -> None:
    from shared.training.grad_cam import grad_cam

    model = build_triplane_classifier(backbone="vgg19", planes=("coronal",), norm_groups=GROUPS)
    heatmaps = grad_cam(model, torch.randn(3, 1, SIZE, SIZE))
    assert list(heatmaps) == ["coronal"] and heatmaps["coronal"].shape == (SIZE, SIZE)
    with pytest.raises(ValueError, match="not a vgg19 stage"):
        grad_cam(model, torch.randn(3, 1, SIZE, SIZE), stage="layer4")
