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
instead), and every BatchNorm is replaced by a GroupNorm (:mod:`shared.models.cls_backbones`, ``norm_groups``):
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
``branches.coronal.features.conv0``, ``...features.denseblock1.denselayer1.layers.conv2`` (MONAI's DenseNet),
``...transition1.conv``.
VGG-19: ``branches.sagittal.features.conv1`` .. ``conv16`` with ``norm1`` .. ``norm16`` (torchvision's
``features.0``, ``features.1``, ...; :attr:`shared.models.cls_backbones.Vgg19.torchvision_renames`). Every convolution's name ends in
``conv`` + digits, so the default ``adapter.cls-lora-targets`` adapts every backbone's convolutions (PEFT adapts
ResNeXt-50's grouped ones only at a rank divisible by 32; docs/training.md gives a regex without them).
:func:`load_backbone_weights` loads torchvision ImageNet weights of the matching architecture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from shared.config import CLS_BACKBONES, CLS_FUSIONS
from shared.models.cls_backbones import (
    SUPPORTED_DEPTHS,
    branch_width,
    build_branch,
    guess_architecture,
    map_torchvision_state,
    read_state_dict,
    resolve_backbone,
)

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
        self.feature_dim = branch_width(architecture)
        self.branches = nn.ModuleDict({p: build_branch(architecture, norm_groups) for p in self.planes})
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


#: offending keys listed per kind in a weights error
_MAX_LISTED = 5


def load_backbone_weights(model: TriPlaneClassifier, path: str | Path) -> None:
    """Load torchvision-format ImageNet weights of the model's backbone into every branch (in place).

    The file holds the state dict of the torchvision model of :attr:`TriPlaneClassifier.backbone`
    (``resnet18/34/50/101``, ``resnext50_32x4d``, ``densenet161`` or ``vgg19_bn``), plain or under a
    ``state_dict`` or ``model`` key (a ``module.`` prefix is stripped); ``.safetensors`` files are read with
    safetensors. Mapping: names are torchvision's (VGG-19 and DenseNet-161: renamed, their ``torchvision_renames``); the
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
    state = read_state_dict(path)
    branch = next(iter(model.branches.values()))
    renames = getattr(branch, "torchvision_renames", {})
    mapped, missing, unexpected, mismatched = map_torchvision_state(state, branch.state_dict(), renames)
    problems = [
        f"{label} ({len(items)}): {items[:_MAX_LISTED]}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    ]
    if problems:
        raise ValueError(
            f"backbone weights file {path} does not fit the {model.backbone} branches "
            f"({guess_architecture(state)}): " + "; ".join(problems)
        )
    for branch in model.branches.values():
        branch.load_state_dict(mapped, strict=True)
