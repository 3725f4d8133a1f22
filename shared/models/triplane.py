"""Tri-plane benign/malignant lesion classifier (seed 003).

One 2D ResNet branch per ABUS plane (transverse, sagittal, coronal) turns a lesion-region image into a pooled
feature vector of width ``F`` (512 for ResNet-18/34, 2048 for ResNet-50). The fusion head follows seed 003:

    fused  = concat(f_transverse + f_sagittal, f_coronal)      (B, 2F)
    hidden = ReLU(reduce(fused))                               (B, F)    "FC layer halving the dimension"
    logits = out(dropout(hidden))                              (B, 2)    class 0 benign, class 1 malignant

The seed does not name the non-linearity between the two fully connected layers; a ReLU is used because two
stacked linear layers without one collapse into a single linear map. Dropout defaults to 0 (seed: none).

Fewer planes (seed 003 compares one, two and three planes) fuse as follows, and the head always halves the
fused width ``W`` (``reduce``: W -> W/2):

- transverse + sagittal: added (``W = F``), the seed's "feature fusion 1";
- any other pair (one plane with the coronal one): concatenated in canonical plane order (``W = 2F``);
- one plane: that plane's features (``W = F``).

DP-SGD readiness: MONAI 1.6.1 ``ResNet`` ignores ``norm`` after the stem (upstream bug), so every branch is
built with BatchNorm and then every BatchNorm is replaced by GroupNorm: nothing in the model mixes samples.
MONAI's blocks also add the residual and apply ReLU in place on norm outputs, which Opacus' per-sample
gradient hooks forbid when the norms are trainable; the branches therefore use MONAI's block classes with an
out-of-place ``forward`` (same submodules and names) and non-in-place ReLUs.

Module names (what adapter regexes see), e.g. for ResNet-18:
``branches.transverse.conv1``, ``branches.transverse.layer1.0.conv2``,
``branches.transverse.layer2.0.downsample.0`` (1x1 projection conv), ``...downsample.1`` (its GroupNorm),
``head.reduce``, ``head.out``. The branch layout equals torchvision's ResNet (stride-2 7x7 stem, max-pool,
projection shortcuts without bias), so torchvision ImageNet weights map name by name
(:func:`load_backbone_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

__all__ = [
    "BENIGN_INDEX",
    "MALIGNANT_INDEX",
    "PLANES",
    "SUPPORTED_DEPTHS",
    "TriPlaneClassifier",
    "TriPlaneHead",
    "build_triplane_classifier",
    "frame_probabilities_to_lesion",
    "load_backbone_weights",
    "malignant_probabilities",
]

#: Canonical plane order; a stacked input ``(B, 3, 1, S, S)`` holds the planes in this order.
PLANES: tuple[str, ...] = ("transverse", "sagittal", "coronal")
#: Logit/probability index of each class.
BENIGN_INDEX = 0
MALIGNANT_INDEX = 1
NUM_CLASSES = 2

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


#: depth -> (block class, blocks per stage, pooled feature width F)
_DEPTHS: dict[int, tuple[type[ResNetBlock], tuple[int, int, int, int], int]] = {
    18: (_BasicBlock, (2, 2, 2, 2), 512),
    34: (_BasicBlock, (3, 4, 6, 3), 512),
    50: (_Bottleneck, (3, 4, 6, 3), 2048),
}
#: ResNet depths a branch can have.
SUPPORTED_DEPTHS: tuple[int, ...] = tuple(_DEPTHS)


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


def _build_branch(depth: int, norm_groups: int) -> ResNet:
    """One 2D ResNet feature extractor with torchvision's layout: input (B, 1, H, W) -> features (B, F)."""
    block, layers, _ = _DEPTHS[depth]
    branch = ResNet(
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
    _replace_batch_norms(branch, norm_groups)
    for module in branch.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # in-place ReLU on a hooked norm output breaks Opacus (see _BasicBlock)
    return branch


def _fused_width(planes: tuple[str, ...], feature_dim: int) -> int:
    """Width W of the fused feature vector for ``planes`` (see the module docstring)."""
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


class TriPlaneHead(nn.Module):
    """Fusion head of seed 003: plane fusion, ``reduce`` (W -> W/2), ReLU, dropout, ``out`` (W/2 -> 2)."""

    def __init__(self, *, planes: tuple[str, ...], feature_dim: int, dropout: float = 0.0) -> None:
        """
        Args:
            planes: planes in canonical order (1 to 3 of :data:`PLANES`).
            feature_dim: width F of each branch's pooled features.
            dropout: dropout probability after the ReLU (0 disables it).
        """
        super().__init__()
        self.planes = planes
        width = _fused_width(planes, feature_dim)
        self.reduce = nn.Linear(width, width // 2)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width // 2, NUM_CLASSES)

    def fuse(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Fuse per-plane features, each (B, F), into (B, W) as described in the module docstring."""
        if len(self.planes) == 1:
            return features[self.planes[0]]
        if "transverse" in self.planes and "sagittal" in self.planes:
            summed = features["transverse"] + features["sagittal"]
            if "coronal" not in self.planes:
                return summed
            return torch.cat([summed, features["coronal"]], dim=1)
        return torch.cat([features[p] for p in self.planes], dim=1)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-plane features {plane: (B, F)} -> logits (B, 2)."""
        hidden = self.act(self.reduce(self.fuse(features)))
        return self.out(self.dropout(hidden))


class TriPlaneClassifier(nn.Module):
    """Tri-plane lesion classifier: one ResNet branch per plane and the seed-003 fusion head.

    Attributes:
        branches: ``nn.ModuleDict`` {plane: MONAI ResNet without fc}, (B, 1, H, W) -> (B, F).
        head: :class:`TriPlaneHead`, {plane: (B, F)} -> logits (B, 2).
        planes: the planes used, in canonical order.
        depth: ResNet depth of every branch.
        feature_dim: F, the pooled feature width of one branch.
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        planes: Sequence[str] = PLANES,
        norm_groups: int = 32,
        dropout: float = 0.0,
    ) -> None:
        """
        Args:
            depth: ResNet depth of each branch: 18, 34 or 50 (seed 003: 50).
            planes: which planes to use (any non-empty subset of :data:`PLANES`, any order).
            norm_groups: GroupNorm groups replacing BatchNorm (a smaller divisor where it does not divide).
            dropout: dropout probability in the head.
        """
        super().__init__()
        if depth not in SUPPORTED_DEPTHS:
            raise ValueError(f"depth={depth!r} is not supported: choose one of {SUPPORTED_DEPTHS}")
        if norm_groups < 1:
            raise ValueError(f"norm_groups={norm_groups!r} must be a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.planes = _check_planes(planes)
        self.depth = depth
        self.feature_dim = _DEPTHS[depth][2]
        self.branches = nn.ModuleDict({p: _build_branch(depth, norm_groups) for p in self.planes})
        self.head = TriPlaneHead(planes=self.planes, feature_dim=self.feature_dim, dropout=dropout)

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
) -> TriPlaneClassifier:
    """Build a randomly initialised :class:`TriPlaneClassifier` (see its constructor for the arguments)."""
    return TriPlaneClassifier(depth=depth, planes=planes, norm_groups=norm_groups, dropout=dropout)


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


def _guess_depth(state: Mapping[str, torch.Tensor]) -> str:
    """Describe which torchvision ResNet the keys of ``state`` look like (for error messages)."""
    counts = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    for depth, (block, layers, _) in _DEPTHS.items():
        if layers == counts and (block is _Bottleneck) == bottleneck:
            return f"it looks like a ResNet-{depth}"
    return f"blocks per stage {counts}, {'bottleneck' if bottleneck else 'basic'} blocks"


def _map_torchvision_state(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
    """Map a torchvision ResNet state dict onto a branch's parameter names.

    Returns the mapped dict and the missing keys, unexpected keys and shape mismatches (as text).
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.rsplit(".", 1)[-1] in _BN_STATS:
            continue
        if key == "conv1.weight" and value.ndim == 4 and value.shape[1] == 3:
            value = value.sum(dim=1, keepdim=True)
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
    """Load torchvision-format ImageNet ResNet weights into every branch of ``model`` (in place).

    The file holds a torchvision ``resnet18/34/50`` state dict (``conv1.weight`` (64, 3, 7, 7), ``bn1.*``,
    ``layerS.B.convN.weight``, ``layerS.B.downsample.{0,1}.*``, ``fc.*``), plain or under a ``state_dict`` or
    ``model`` key (a ``module.`` prefix is stripped); ``.safetensors`` files are read with safetensors.
    Mapping: names are identical (the branches use torchvision's layout); the RGB stem kernel is summed over
    its input channels to one channel (a grey image then gives the activations the network gave for the same
    image copied to R, G and B); BatchNorm ``weight``/``bias`` become the GroupNorm affine parameters, while
    the running statistics are dropped (GroupNorm normalises with per-sample statistics, so the pretrained
    features are a starting point, not reproduced exactly); ``fc.*`` is ignored. The head is not touched.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no state dict, or it does not fit the branches (wrong depth, missing or
            unexpected keys, shape mismatches); the message names the file and the first offending keys.
    """
    path = Path(path)
    state = _read_state_dict(path)
    expected = next(iter(model.branches.values())).state_dict()
    mapped, missing, unexpected, mismatched = _map_torchvision_state(state, expected)
    problems = [
        f"{label} ({len(items)}): {items[:_MAX_LISTED]}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    ]
    if problems:
        raise ValueError(
            f"backbone weights file {path} does not fit the ResNet-{model.depth} branches "
            f"({_guess_depth(state)}): " + "; ".join(problems)
        )
    for branch in model.branches.values():
        branch.load_state_dict(mapped, strict=True)
