"""Tri-plane benign/malignant lesion classifier (seed 003) and its ablations.

One 2D backbone branch per ABUS plane (transverse, sagittal, coronal) turns a lesion-region image (B, 1, H, W)
into a pooled feature vector (B, F). Backbones (``backbone``; seed 003 compares VGG-19, DenseNet-161, ResNet-101
and ResNet-50, which wins; ResNeXt-50 is an extra arm):

=============== ============================================== ======
``backbone``    layout (torchvision's, names and shapes)       F
=============== ============================================== ======
``resnet``      ResNet-18/34/50 (``depth``; the default)       512/512/2048
``resnet101``   ResNet-101                                     2048
``resnext50``   ResNeXt-50 32x4d (``resnext50_32x4d``)         2048
``densenet161`` DenseNet-161                                   2208
``vgg19``       VGG-19 with normalisation (``vgg19_bn``)       512
=============== ============================================== ======

Every branch has a one-channel stem and no classifier (VGG-19 and DenseNet-161 end in a global average pool
instead), and every BatchNorm is replaced by a GroupNorm (:func:`_replace_batch_norms`, ``norm_groups``):
nothing in the model mixes samples, as DP-SGD (Opacus) requires. The seed's VGG-19 has no normalisation; here it
has GroupNorm after each convolution (the ``vgg19_bn`` layout), which trains from scratch and loads
``vgg19_bn`` ImageNet weights.

The fusion head (``fusion``) turns the per-plane features into logits (B, 2) (class 0 benign, 1 malignant):

- ``ts+c`` (default, seed 003): ``fused = concat(f_transverse + f_sagittal, f_coronal)`` (B, 2F), then
  ``hidden = ReLU(reduce(fused))`` (B, F) ("FC layer halving the dimension") and ``logits = out(dropout(hidden))``.
  Fewer planes: transverse + sagittal are added (``W = F``, the seed's "feature fusion 1"); any other pair is
  concatenated in canonical plane order (``W = 2F``); one plane is used as it is (``W = F``).
- ``concat``: all planes' features concatenated in canonical order (``W = P F``), the same head.
- ``late-mean``: one head per plane (each ``F -> F/2 -> 2``), logits averaged over the planes.

Every fusion works with every non-empty subset of the planes (with one plane all three are one head on that
plane). The head always halves its input width ``W`` (``reduce``: W -> W/2). The seed does not name the
non-linearity between the two fully connected layers; a ReLU is used because two stacked linear layers without
one collapse into a single linear map. Dropout defaults to 0 (seed: none).

DP-SGD readiness: MONAI 1.6.1 ``ResNet`` ignores ``norm`` after the stem (upstream bug), so the ResNet-family
branches are built with BatchNorm and then every BatchNorm is replaced by GroupNorm. MONAI's blocks also add the
residual and apply ReLU in place on norm outputs, which Opacus' per-sample gradient hooks forbid when the norms
are trainable; the blocks therefore have an out-of-place ``forward`` (same submodules and names) and every ReLU
is made non-in-place.

Module names (what adapter regexes see), e.g. for ResNet-18:
``branches.transverse.conv1``, ``branches.transverse.layer1.0.conv2``,
``branches.transverse.layer2.0.downsample.0`` (1x1 projection conv), ``...downsample.1`` (its GroupNorm),
``head.reduce``, ``head.out`` (``late-mean``: ``head.per_plane.transverse.reduce``, ...). DenseNet-161:
``branches.coronal.features.conv0``, ``...features.denseblock1.denselayer1.conv2``, ``...transition1.conv``.
VGG-19: ``branches.sagittal.features.conv1`` .. ``conv16`` with ``norm1`` .. ``norm16`` (torchvision's
``features.0``, ``features.1``, ...; :attr:`_Vgg19.torchvision_renames`). Every convolution's name ends in
``conv`` + digits, so the default ``adapter.cls-lora-targets`` adapts every backbone's convolutions (PEFT adapts
ResNeXt-50's grouped ones only at a rank divisible by 32; docs/training.md gives a regex without them).
:func:`load_backbone_weights` loads torchvision ImageNet weights of the matching architecture.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from shared.config import CLS_BACKBONES, CLS_FUSIONS

__all__ = [
    "BACKBONES",
    "BENIGN_INDEX",
    "FUSIONS",
    "MALIGNANT_INDEX",
    "PLANES",
    "SUPPORTED_DEPTHS",
    "TriPlaneClassifier",
    "TriPlaneHead",
    "build_fusion_head",
    "build_triplane_classifier",
    "frame_probabilities_to_lesion",
    "load_backbone_weights",
    "malignant_probabilities",
    "resolve_backbone",
]

#: Canonical plane order; a stacked input ``(B, 3, 1, S, S)`` holds the planes in this order.
PLANES: tuple[str, ...] = ("transverse", "sagittal", "coronal")
#: Logit/probability index of each class.
BENIGN_INDEX = 0
MALIGNANT_INDEX = 1
NUM_CLASSES = 2
#: Backbone names (``model.cls-backbone``); ``resnet`` takes its depth from ``depth`` (``model.cls-depth``).
BACKBONES: tuple[str, ...] = CLS_BACKBONES
#: Plane fusions (``model.cls-fusion``), see the module docstring.
FUSIONS: tuple[str, ...] = CLS_FUSIONS

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
    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r} is not supported: choose one of {BACKBONES}")
    if backbone != "resnet":
        return backbone
    if depth not in SUPPORTED_DEPTHS:
        raise ValueError(f"depth={depth!r} is not supported: choose one of {SUPPORTED_DEPTHS}")
    return f"resnet{depth}"


def _resnet(name: str) -> ResNet:
    """A ResNet-family branch in torchvision's layout (7x7 stride-2 stem, max-pool, bias-free projection
    shortcuts, no fc): (B, 1, H, W) -> (B, 512 * block expansion)."""
    block, layers = _RESNETS[name]
    return ResNet(
        block=block,
        layers=list(layers),
        block_inplanes=list(_STAGE_WIDTHS),
        spatial_dims=2,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )


class _PooledFeatures(nn.Module):
    """Base of the branches without a MONAI counterpart: ``features`` (a conv stack), then ReLU (DenseNet:
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


class _Vgg19(_PooledFeatures):
    """VGG-19 features in the ``vgg19_bn`` layout (3x3 conv with bias, norm, ReLU; five 2x2 max-pools), the
    layers named ``conv{k}``/``norm{k}``/``relu{k}``/``pool{j}`` so the default LoRA regex finds the convolutions.
    (B, 1, H, W) -> (B, 512); needs H, W >= 32."""

    _WIDTHS = (
        (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M") + (512,) * 4 + ("M",)
    )

    def __init__(self) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        #: torchvision module name -> this branch's (``features.0`` -> ``features.conv1``, ...)
        self.torchvision_renames: dict[str, str] = {}
        channels, conv, pool = 1, 0, 0
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


class _DenseLayer(nn.Module):
    """torchvision's dense layer (norm, ReLU, 1x1 conv to 4 g, norm, ReLU, 3x3 conv to g), returning its input
    with the g new channels appended: (B, C, H, W) -> (B, C + g, H, W)."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(channels, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return torch.cat([x, new], dim=1)


class _DenseNet161(_PooledFeatures):
    """DenseNet-161 features in torchvision's layout (stem of 96, growth 48, blocks 6/12/36/24, transitions
    halving channels and size, final ``norm5``): (B, 1, H, W) -> (B, 2208); needs H, W >= 32."""

    def __init__(self, growth: int = 48, blocks: tuple[int, ...] = (6, 12, 36, 24), stem: int = 96) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(1, stem, 7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(stem),
            relu0=nn.ReLU(),
            pool0=nn.MaxPool2d(3, stride=2, padding=1),
        )
        channels = stem
        for i, count in enumerate(blocks, start=1):
            block = nn.Sequential(
                OrderedDict(
                    (f"denselayer{j + 1}", _DenseLayer(channels + j * growth, growth)) for j in range(count)
                )
            )
            layers[f"denseblock{i}"] = block
            channels += count * growth
            if i < len(blocks):
                layers[f"transition{i}"] = nn.Sequential(
                    OrderedDict(
                        norm=nn.BatchNorm2d(channels),
                        relu=nn.ReLU(),
                        conv=nn.Conv2d(channels, channels // 2, 1, bias=False),
                        pool=nn.AvgPool2d(2, stride=2),
                    )
                )
                channels //= 2
        layers["norm5"] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(layers)
        self._init_weights()


#: concrete backbone -> (branch factory, pooled feature width F)
_BRANCHES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    **{name: (partial(_resnet, name), 512 * block.expansion) for name, (block, _) in _RESNETS.items()},
    "densenet161": (_DenseNet161, 2208),
    "vgg19": (_Vgg19, 512),
}


def _group_count(channels: int, requested: int) -> int:
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
            norm = nn.GroupNorm(_group_count(channels, norm_groups), channels, eps=child.eps, affine=True)
            setattr(module, name, norm)
        else:
            _replace_batch_norms(child, norm_groups)


def _build_branch(architecture: str, norm_groups: int) -> nn.Module:
    """One 2D feature extractor of a concrete architecture (:func:`resolve_backbone`), DP-ready (GroupNorm,
    no in-place ReLU): input (B, 1, H, W) -> features (B, F)."""
    branch = _BRANCHES[architecture][0]()
    _replace_batch_norms(branch, norm_groups)
    for module in branch.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # in-place ReLU on a hooked norm output breaks Opacus (see _BasicBlock)
    return branch


def _fused_width(planes: tuple[str, ...], feature_dim: int, fusion: str) -> int:
    """Width W of the fused feature vector of the early fusions (see the module docstring)."""
    if fusion == "concat":
        return len(planes) * feature_dim
    if len(planes) == 1 or planes == ("transverse", "sagittal"):
        return feature_dim
    return 2 * feature_dim


def _check_planes(planes: Sequence[str]) -> tuple[str, ...]:
    """Validate ``planes`` and return them in canonical order."""
    unknown = [p for p in planes if p not in PLANES]
    if unknown or not planes or len(set(planes)) != len(planes):
        raise ValueError(
            f"planes={tuple(planes)!r} is invalid: give one to three distinct planes out of {PLANES}"
        )
    return tuple(p for p in PLANES if p in planes)


class _LogitHead(nn.Module):
    """``reduce`` (W -> W/2), ReLU, dropout, ``out`` (W/2 -> 2): features (B, W) -> logits (B, 2)."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.reduce = nn.Linear(width, width // 2)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width // 2, NUM_CLASSES)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, W) -> logits (B, 2)."""
        return self.out(self.dropout(self.act(self.reduce(fused))))


class TriPlaneHead(_LogitHead):
    """Early-fusion head (``ts+c`` of seed 003, or ``concat``): plane fusion, then one :class:`_LogitHead`."""

    def __init__(
        self, *, planes: tuple[str, ...], feature_dim: int, dropout: float = 0.0, fusion: str = "ts+c"
    ) -> None:
        """
        Args:
            planes: planes in canonical order (1 to 3 of :data:`PLANES`).
            feature_dim: width F of each branch's pooled features.
            dropout: dropout probability after the ReLU (0 disables it).
            fusion: ``ts+c`` or ``concat``.
        """
        super().__init__(_fused_width(planes, feature_dim, fusion), dropout)
        self.planes = planes
        self.fusion = fusion

    def fuse(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Fuse per-plane features, each (B, F), into (B, W) as described in the module docstring."""
        if len(self.planes) == 1:
            return features[self.planes[0]]
        if self.fusion == "ts+c" and "transverse" in self.planes and "sagittal" in self.planes:
            summed = features["transverse"] + features["sagittal"]
            if "coronal" not in self.planes:
                return summed
            return torch.cat([summed, features["coronal"]], dim=1)
        return torch.cat([features[p] for p in self.planes], dim=1)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-plane features {plane: (B, F)} -> logits (B, 2)."""
        return super().forward(self.fuse(features))


class _LateMeanHead(nn.Module):
    """Late fusion: one :class:`_LogitHead` per plane (``per_plane``, F -> F/2 -> 2), logits averaged."""

    def __init__(self, *, planes: tuple[str, ...], feature_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.planes = planes
        self.per_plane = nn.ModuleDict({p: _LogitHead(feature_dim, dropout) for p in planes})

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-plane features {plane: (B, F)} -> mean of the per-plane logits (B, 2)."""
        return torch.stack([self.per_plane[p](features[p]) for p in self.planes]).mean(dim=0)


def build_fusion_head(
    fusion: str, *, planes: tuple[str, ...], feature_dim: int, dropout: float = 0.0
) -> nn.Module:
    """The head of ``fusion`` (:data:`FUSIONS`) for ``planes`` (canonical order): {plane: (B, F)} -> (B, 2)."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion={fusion!r} is not supported: choose one of {FUSIONS}")
    if fusion == "late-mean":
        return _LateMeanHead(planes=planes, feature_dim=feature_dim, dropout=dropout)
    return TriPlaneHead(planes=planes, feature_dim=feature_dim, dropout=dropout, fusion=fusion)


class TriPlaneClassifier(nn.Module):
    """Tri-plane lesion classifier: one backbone branch per plane and a fusion head.

    Attributes:
        branches: ``nn.ModuleDict`` {plane: branch without classifier}, (B, 1, H, W) -> (B, F).
        head: {plane: (B, F)} -> logits (B, 2) (:class:`TriPlaneHead`, or a late-mean head).
        planes: the planes used, in canonical order.
        backbone: the concrete branch architecture (``resnet50``, ``densenet161``, ...; :func:`resolve_backbone`).
        depth: the ``depth`` argument (meaningful for ``backbone="resnet"`` only).
        fusion: the plane fusion (:data:`FUSIONS`).
        feature_dim: F, the pooled feature width of one branch.
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        planes: Sequence[str] = PLANES,
        norm_groups: int = 32,
        dropout: float = 0.0,
        backbone: str = "resnet",
        fusion: str = "ts+c",
    ) -> None:
        """
        Args:
            depth: ResNet depth of each branch for ``backbone="resnet"``: 18, 34 or 50 (seed 003: 50).
            planes: which planes to use (any non-empty subset of :data:`PLANES`, any order).
            norm_groups: GroupNorm groups replacing BatchNorm (a smaller divisor where it does not divide).
            dropout: dropout probability in the head.
            backbone: one of :data:`BACKBONES`.
            fusion: one of :data:`FUSIONS`.
        """
        super().__init__()
        architecture = resolve_backbone(backbone, depth)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion={fusion!r} is not supported: choose one of {FUSIONS}")
        if norm_groups < 1:
            raise ValueError(f"norm_groups={norm_groups!r} must be a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.planes = _check_planes(planes)
        self.backbone = architecture
        self.depth = depth
        self.fusion = fusion
        self.feature_dim = _BRANCHES[architecture][1]
        self.branches = nn.ModuleDict({p: _build_branch(architecture, norm_groups) for p in self.planes})
        self.head = build_fusion_head(
            fusion, planes=self.planes, feature_dim=self.feature_dim, dropout=dropout
        )

    def _split_planes(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn the forward input into {plane: (B, 1, H, W)} for the planes this model uses."""
        if isinstance(x, Mapping):
            missing = [p for p in self.planes if p not in x]
            if missing:
                raise ValueError(f"input dict lacks plane(s) {missing}; it has {sorted(x)}")
            images = {p: x[p] for p in self.planes}
        else:
            if x.ndim != 5 or x.shape[1] not in (len(PLANES), len(self.planes)) or x.shape[2] != 1:
                raise ValueError(
                    f"input of shape {tuple(x.shape)} is invalid: expected (B, 3, 1, H, W) in plane order "
                    f"{PLANES} or (B, {len(self.planes)}, 1, H, W) in order {self.planes}"
                )
            order = PLANES if x.shape[1] == len(PLANES) else self.planes
            images = {p: x[:, order.index(p)] for p in self.planes}
        for plane, image in images.items():
            if image.ndim != 4 or image.shape[1] != 1:
                raise ValueError(f"plane {plane!r} has shape {tuple(image.shape)}; expected (B, 1, H, W)")
        return images

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Classify lesion frame-triplets.

        Args:
            x: (B, 3, 1, H, W) with the planes in order transverse, sagittal, coronal (for fewer-plane models
                also (B, P, 1, H, W) holding only the model's P planes in canonical order), or a dict
                {plane: (B, 1, H, W)}; the planes may differ in H, W. Extra planes are ignored.

        Returns:
            Logits (B, 2); index 1 is malignant.
        """
        images = self._split_planes(x)
        features = {plane: self.branches[plane](image) for plane, image in images.items()}
        return self.head(features)


def build_triplane_classifier(
    *,
    depth: int = 50,
    planes: Sequence[str] = PLANES,
    norm_groups: int = 32,
    dropout: float = 0.0,
    backbone: str = "resnet",
    fusion: str = "ts+c",
) -> TriPlaneClassifier:
    """Build a randomly initialised :class:`TriPlaneClassifier` (see its constructor for the arguments)."""
    return TriPlaneClassifier(
        depth=depth, planes=planes, norm_groups=norm_groups, dropout=dropout, backbone=backbone, fusion=fusion
    )


def malignant_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax malignant probability per row: logits (N, 2) -> probabilities (N,) in [0, 1]."""
    if logits.ndim != 2 or logits.shape[1] != NUM_CLASSES:
        raise ValueError(f"logits of shape {tuple(logits.shape)} are invalid: expected (N, {NUM_CLASSES})")
    return torch.softmax(logits, dim=1)[:, MALIGNANT_INDEX]


def frame_probabilities_to_lesion(probs: torch.Tensor) -> torch.Tensor:
    """Lesion malignancy probability as in seed 003: the mean of the per-frame malignant probabilities.

    At test time each lesion gives F frame-triplets (transverse_i, sagittal_i, coronal_i); the model yields
    one malignant probability per triplet (:func:`malignant_probabilities`). A lesion is malignant when the
    result exceeds 0.5.

    Args:
        probs: per-frame malignant probabilities in [0, 1], shape (F,) for one lesion or (L, F) for L lesions
            with F frames each (any leading shape works: the mean runs over the last axis).

    Returns:
        Lesion probabilities: a 0-d tensor for (F,) input, else shape (L,) (the input's leading shape).
    """
    if probs.ndim == 0 or probs.shape[-1] == 0:
        raise ValueError(f"probs of shape {tuple(probs.shape)} hold no frames: expected (..., F) with F >= 1")
    if not torch.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError("probs must be finite probabilities in [0, 1] (got logits or NaN?)")
    return probs.mean(dim=-1)


# --- torchvision ImageNet weights -> branches ------------------------------------------------------------

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
#: torchvision classifier modules, not part of a branch
_TORCHVISION_HEADS = ("fc.", "classifier.")
_MAX_LISTED = 5


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
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


def _guess_architecture(state: Mapping[str, torch.Tensor]) -> str:
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


def _map_torchvision_state(
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


def load_backbone_weights(model: TriPlaneClassifier, path: str | Path) -> None:
    """Load torchvision-format ImageNet weights of the model's backbone into every branch (in place).

    The file holds the state dict of the torchvision model of :attr:`TriPlaneClassifier.backbone`
    (``resnet18/34/50/101``, ``resnext50_32x4d``, ``densenet161`` or ``vgg19_bn``), plain or under a
    ``state_dict`` or ``model`` key (a ``module.`` prefix is stripped); ``.safetensors`` files are read with
    safetensors. Mapping: names are torchvision's (VGG-19: renamed, :attr:`_Vgg19.torchvision_renames`); the
    RGB stem kernel is summed over its input channels to one channel (a grey image then gives the activations
    the network gave for the same image copied to R, G and B); BatchNorm ``weight``/``bias`` become the
    GroupNorm affine parameters, while the running statistics are dropped (GroupNorm normalises with
    per-sample statistics, so the pretrained features are a starting point, not reproduced exactly);
    ``fc.*``/``classifier.*`` are ignored. The head is not touched.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no state dict, or it does not fit the branches (another architecture,
            missing or unexpected keys, shape mismatches); the message names the file, the architecture it
            looks like and the first offending keys.
    """
    path = Path(path)
    state = _read_state_dict(path)
    branch = next(iter(model.branches.values()))
    renames = getattr(branch, "torchvision_renames", {})
    mapped, missing, unexpected, mismatched = _map_torchvision_state(state, branch.state_dict(), renames)
    problems = [
        f"{label} ({len(items)}): {items[:_MAX_LISTED]}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    ]
    if problems:
        raise ValueError(
            f"backbone weights file {path} does not fit the {model.backbone} branches "
            f"({_guess_architecture(state)}): " + "; ".join(problems)
        )
    for branch in model.branches.values():
        branch.load_state_dict(mapped, strict=True)
