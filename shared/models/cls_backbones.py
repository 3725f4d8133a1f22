"""The 2D feature extractors of the tri-plane classifier (:mod:`shared.models.triplane`): one per plane.

Each branch maps a lesion-region image (B, 1, H, W) to a pooled feature vector (B, F), with torchvision's
shapes and names (or a rename table), so torchvision ImageNet weights load (:func:`map_torchvision_state`):
ResNet-18/34/50/101 and ResNeXt-50 32x4d on MONAI's ``ResNet``, DenseNet-161 on MONAI's ``DenseNet`` (its dense
layers nest their modules one level deeper: renamed), VGG-19 (``vgg19_bn``) written here (MONAI has no VGG). Every BatchNorm becomes a GroupNorm and every ReLU is out of place
(:func:`build_branch`), so the branches are ready for DP-SGD (Opacus); the module docstring of
:mod:`shared.models.triplane` says why.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
from monai.networks.nets import DenseNet, ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from shared.config import CLS_BACKBONES

__all__ = [
    "SUPPORTED_DEPTHS",
    "branch_width",
    "build_branch",
    "group_count",
    "guess_architecture",
    "map_torchvision_state",
    "read_state_dict",
    "resolve_backbone",
]

_STAGE_WIDTHS = [64, 128, 256, 512]


class _BasicBlock(ResNetBlock):
    """MONAI's basic block, computed without in-place operations.

    MONAI adds the residual in place (``out += residual``) onto a norm layer's output; Opacus' per-sample
    gradient hooks forbid in-place changes of a hooked module's output, so this forward adds out of place.
    Same submodules and names as :class:`ResNetBlock`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + residual)


class _Bottleneck(ResNetBottleneck):
    """MONAI's bottleneck block, computed without in-place operations (see :class:`_BasicBlock`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, 4 * planes, H / stride, W / stride)."""
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + residual)


class _ResNeXtBottleneck(_Bottleneck):
    """The bottleneck of torchvision's ``resnext50_32x4d`` (2D only): inner width ``2 * planes`` and a 3x3
    convolution in 32 groups (32 x 4d at ``planes`` 64); same names as :class:`_Bottleneck`."""

    def __init__(self, in_planes: int, planes: int, spatial_dims: int = 2, stride: int = 1, **kwargs) -> None:
        super().__init__(in_planes, planes, spatial_dims, stride, **kwargs)
        width = 2 * planes
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=32, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)


#: ResNet-family layouts: name -> (block class, blocks per stage).
_RESNETS: dict[str, tuple[type[ResNetBlock], tuple[int, int, int, int]]] = {
    "resnet18": (_BasicBlock, (2, 2, 2, 2)),
    "resnet34": (_BasicBlock, (3, 4, 6, 3)),
    "resnet50": (_Bottleneck, (3, 4, 6, 3)),
    "resnet101": (_Bottleneck, (3, 4, 23, 3)),
    "resnext50": (_ResNeXtBottleneck, (3, 4, 6, 3)),
}
#: ResNet depths of the ``resnet`` backbone (``model.cls-depth``).
SUPPORTED_DEPTHS: tuple[int, ...] = (18, 34, 50)


def resolve_backbone(backbone: str, depth: int) -> str:
    """The concrete architecture of ``backbone``: ``resnet`` becomes ``resnet{depth}``, the others are
    themselves (``resnet101``, ``resnext50``, ``densenet161``, ``vgg19``); ``depth`` matters for ``resnet`` only.

    Raises:
        ValueError: unknown backbone, or a ``resnet`` depth outside :data:`SUPPORTED_DEPTHS`.
    """
    if backbone not in CLS_BACKBONES:
        raise ValueError(f"backbone={backbone!r} is not supported: choose one of {CLS_BACKBONES}")
    if backbone != "resnet":
        return backbone
    if depth not in SUPPORTED_DEPTHS:
        raise ValueError(f"depth={depth!r} is not supported: choose one of {SUPPORTED_DEPTHS}")
    return f"resnet{depth}"


def _resnet(name: str, in_channels: int = 1) -> ResNet:
    """A ResNet-family branch in torchvision's layout (7x7 stride-2 stem, max-pool, bias-free projection
    shortcuts, no fc): (B, in_channels, H, W) -> (B, 512 * block expansion)."""
    block, layers = _RESNETS[name]
    return ResNet(
        block=block,
        layers=list(layers),
        block_inplanes=list(_STAGE_WIDTHS),
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )


class _PooledFeatures(nn.Module):
    """Base of the branches whose MONAI counterpart (if any) is not a pooled feature extractor: ``features`` (a
    conv stack), then ReLU (DenseNet:
    its final norm is not activated yet; VGG: a no-op after its last ReLU) and a global average pool:
    (B, 1, H, W) -> (B, C). Convolutions start from Kaiming-normal weights (fan out), as torchvision's do."""

    features: nn.Sequential

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, C)."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.features(x)), 1), 1)


class Vgg19(_PooledFeatures):
    """VGG-19 features in the ``vgg19_bn`` layout (3x3 conv with bias, norm, ReLU; five 2x2 max-pools), the
    layers named ``conv{k}``/``norm{k}``/``relu{k}``/``pool{j}`` so the default LoRA regex finds the convolutions.
    (B, 1, H, W) -> (B, 512); needs H, W >= 32."""

    _WIDTHS = (
        (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M") + (512,) * 4 + ("M",)
    )

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        #: torchvision module name -> this branch's (``features.0`` -> ``features.conv1``, ...)
        self.torchvision_renames: dict[str, str] = {}
        channels, conv, pool = in_channels, 0, 0
        for width in self._WIDTHS:
            index = len(layers)
            if width == "M":
                pool += 1
                layers[f"pool{pool}"] = nn.MaxPool2d(2, 2)
                continue
            conv += 1
            layers[f"conv{conv}"] = nn.Conv2d(channels, int(width), 3, padding=1)
            layers[f"norm{conv}"] = nn.BatchNorm2d(int(width))
            layers[f"relu{conv}"] = nn.ReLU()
            self.torchvision_renames[f"features.{index}"] = f"features.conv{conv}"
            self.torchvision_renames[f"features.{index + 1}"] = f"features.norm{conv}"
            channels = int(width)
        self.features = nn.Sequential(layers)
        self._init_weights()


class DenseNet161(_PooledFeatures):
    """DenseNet-161 features: MONAI's 2D :class:`~monai.networks.nets.DenseNet` at torchvision's DenseNet-161 sizes
    (stem of 96, growth 48, blocks 6/12/36/24, transitions halving channels and size, final ``norm5``) without its
    classifier: (B, 1, H, W) -> (B, 2208); needs H, W >= 32. MONAI nests each dense layer's modules in ``layers``
    (``features.denseblock1.denselayer1.layers.conv2``); :attr:`torchvision_renames` maps torchvision's names
    (``...denselayer1.conv2``) onto them."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        net = DenseNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=1,
            init_features=96,
            growth_rate=48,
            block_config=(6, 12, 36, 24),
            act=("relu", {"inplace": False}),
        )
        self.features = net.features
        #: torchvision module name -> this branch's (``...denselayer1.norm1`` -> ``...denselayer1.layers.norm1``)
        self.torchvision_renames: dict[str, str] = {
            name.replace(".layers.", "."): name for name, _ in self.named_modules() if ".layers." in name
        }
        self._init_weights()


#: concrete backbone -> (branch factory taking the input channels, pooled feature width F)
_BRANCHES: dict[str, tuple[Callable[[int], nn.Module], int]] = {
    **{name: (partial(_resnet, name), 512 * block.expansion) for name, (block, _) in _RESNETS.items()},
    "densenet161": (DenseNet161, 2208),
    "vgg19": (Vgg19, 512),
}


def group_count(channels: int, requested: int) -> int:
    """Number of GroupNorm groups for ``channels``: ``requested`` if it divides them, else its largest
    divisor of ``channels`` that is smaller (at least 1)."""
    for groups in range(min(requested, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def _replace_batch_norms(module: nn.Module, norm_groups: int) -> None:
    """Replace, in place and recursively, every BatchNorm layer of ``module`` by an affine GroupNorm with
    the same channel count and eps (weight 1, bias 0)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            channels = child.num_features
            norm = nn.GroupNorm(group_count(channels, norm_groups), channels, eps=child.eps, affine=True)
            setattr(module, name, norm)
        else:
            _replace_batch_norms(child, norm_groups)


def branch_width(architecture: str) -> int:
    """Pooled feature width F of a concrete architecture (:func:`resolve_backbone`)."""
    return _BRANCHES[architecture][1]


def build_branch(architecture: str, norm_groups: int, *, in_channels: int = 1) -> nn.Module:
    """One 2D feature extractor of a concrete architecture (:func:`resolve_backbone`), DP-ready (GroupNorm,
    no in-place ReLU): input (B, in_channels, H, W) -> features (B, F)."""
    if in_channels < 1:
        raise ValueError(f"in_channels = {in_channels} must be at least 1")
    branch = _BRANCHES[architecture][0](in_channels)
    _replace_batch_norms(branch, norm_groups)
    for module in branch.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # in-place ReLU on a hooked norm output breaks Opacus (see _BasicBlock)
    return branch


# --- torchvision ImageNet weights -> a branch's names --------------------------------------------------------

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
#: torchvision classifier modules, not part of a branch
_TORCHVISION_HEADS = ("fc.", "classifier.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict (.safetensors or torch; plain or under ``state_dict``/``model``) from ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: object = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"backbone weights file {path} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def guess_architecture(state: Mapping[str, torch.Tensor]) -> str:
    """Describe which torchvision backbone the keys of ``state`` look like (for error messages)."""
    if any(k.startswith("features.denseblock") for k in state):
        return "it looks like a DenseNet"
    if "features.0.weight" in state:
        return "it looks like a VGG"
    counts = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    conv2 = state.get("layer1.0.conv2.weight")
    grouped = conv2 is not None and conv2.ndim == 4 and conv2.shape[1] != conv2.shape[0]
    bottleneck = "layer1.0.conv3.weight" in state
    for name, (block, layers) in _RESNETS.items():
        kind = (block is _ResNeXtBottleneck, issubclass(block, _Bottleneck))
        if layers == counts and kind == (grouped and bottleneck, bottleneck):
            return f"it looks like a {name}"
    return f"blocks per stage {counts}, {'bottleneck' if bottleneck else 'basic'} blocks"


def map_torchvision_state(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], renames: Mapping[str, str]
) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
    """Map a torchvision state dict onto a branch's parameter names (module ``renames``: torchvision -> branch).

    Returns the mapped dict and the missing keys, unexpected keys and shape mismatches (as text).
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_TORCHVISION_HEADS) or key.rsplit(".", 1)[-1] in _BN_STATS:
            continue
        module, _, leaf = key.rpartition(".")
        key = f"{renames.get(module, module)}.{leaf}"
        if key in expected and value.ndim == 4 and value.shape[1] == 3 and expected[key].shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)  # the RGB stem -> one grey channel
        mapped[key] = value
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(mapped[k].shape)}"
        for k in expected
        if k in mapped and mapped[k].shape != expected[k].shape
    ]
    return mapped, missing, unexpected, mismatched
