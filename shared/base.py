"""The frozen base: SAM-Med3D and the tri-plane classifier that every site holds identically.

A base is stored as ``NAME.safetensors`` (the full state dicts of both models, keys prefixed ``seg.`` and
``cls.``; memory-mapped on load, so opening it is cheap in every fresh ClientApp process) plus ``NAME.json``
(how to rebuild the architectures and the fingerprint of each model's weights). Fingerprints are what sites and
server compare before any adapter is exchanged.

Real sites make their base once from the official ``sam_med3d_turbo.pth`` (and optionally ImageNet ResNet
weights) with :func:`base_from_checkpoints` (``fedabus make-base``); CPU demos and tests use a small base
trained by ``fedabus pretrain``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shared import __version__
from shared.adapters import LoraSpec, attach_lora, attach_spec, fingerprint_state_dict
from shared.models.auto_seg import AutoSegSpec
from shared.models.sam_med3d import (
    CheckpointError,
    Sam3D,
    build_sam_med3d,
    load_state_dict_strict,
    read_checkpoint,
)
from shared.models.triplane import (
    PLANES,
    TriPlaneClassifier,
    build_triplane_classifier,
    load_backbone_weights,
)
from shared.tensor_files import atomic_write, pair_paths

if TYPE_CHECKING:
    pass

__all__ = [
    "BASE_FORMAT",
    "BaseModels",
    "base_from_checkpoints",
    "base_stamp",
    "build_random_base",
    "check_filled",
    "load_base",
    "read_base_manifest",
    "save_base",
    "working_copy",
    "wrap_for_training",
]

BASE_FORMAT = "fedabus-base"


@dataclass
class BaseModels:
    """The two base models, their architecture descriptions and weight fingerprints (``seg`` / ``cls``)."""

    sam: Sam3D
    cls: TriPlaneClassifier
    sam_config: dict[str, Any]
    cls_config: dict[str, Any]
    fingerprints: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    #: Parameters a :func:`working_copy` left uninitialised (``empty=True``), with their version counters then:
    #: the caller must overwrite each (:func:`check_filled`).
    unfilled: dict[str, tuple[nn.Parameter, int]] = field(default_factory=dict, repr=False)

    def refresh_fingerprints(self) -> dict[str, str]:
        self.fingerprints = {
            "seg": fingerprint_state_dict(self.sam.state_dict()),
            "cls": fingerprint_state_dict(self.cls.state_dict()),
        }
        return self.fingerprints

    @property
    def fingerprint(self) -> str:
        """One string for both models (what the federation handshake compares)."""
        return f"seg={self.fingerprints['seg']};cls={self.fingerprints['cls']}"


def _build_cls(cls_config: dict[str, Any]) -> TriPlaneClassifier:
    """The classifier a ``cls_config`` describes: ``depth``, ``planes``, ``norm_groups`` and, since the ablations,
    ``backbone`` and ``fusion`` (a manifest without them is of a ResNet base with the ``ts+c`` fusion)."""
    return build_triplane_classifier(
        depth=int(cls_config["depth"]),
        planes=tuple(cls_config["planes"]),
        norm_groups=int(cls_config["norm_groups"]),
        backbone=str(cls_config.get("backbone", "resnet")),
        fusion=str(cls_config.get("fusion", "ts+c")),
    )


def build_random_base(
    sam_config: str | dict[str, Any] = "small",
    *,
    cls_depth: int = 18,
    cls_planes: Sequence[str] = PLANES,
    cls_norm_groups: int = 32,
    cls_arch: str = "resnet",
    cls_fusion: str = "ts+c",
    seed: int = 0,
    attention_impl: str = "fast",
) -> BaseModels:
    """Randomly initialised base (seeded): the starting point of ``fedabus pretrain`` and of tests.

    The classifier: ``cls_arch`` is its backbone (``model.cls-backbone``, depth ``cls_depth`` for ``resnet``),
    ``cls_planes`` its planes (any non-empty subset, ``train.cls-planes``), ``cls_fusion`` its plane fusion
    (``model.cls-fusion``); all are recorded in the base's ``cls_config`` and so in its manifest.
    """
    torch.manual_seed(seed)
    sam = build_sam_med3d(sam_config, attention_impl=attention_impl)
    cls_config = {
        "backbone": cls_arch,
        "depth": cls_depth,
        "planes": [p for p in PLANES if p in cls_planes],
        "norm_groups": cls_norm_groups,
        "fusion": cls_fusion,
    }
    base = BaseModels(sam, _build_cls(cls_config), dict(sam.sam_config), cls_config)
    base.refresh_fingerprints()
    return base


def save_base(base: BaseModels, path: str | Path, *, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``NAME.safetensors`` + ``NAME.json`` atomically; returns the tensor file's path."""
    from safetensors.torch import save_file

    tensor_path, manifest_path = pair_paths(path)
    fingerprints = base.refresh_fingerprints()
    tensors = {f"seg.{k}": v.detach().cpu().contiguous() for k, v in base.sam.state_dict().items()}
    tensors |= {f"cls.{k}": v.detach().cpu().contiguous() for k, v in base.cls.state_dict().items()}
    atomic_write(tensor_path, lambda p: save_file(tensors, str(p), metadata={"format": BASE_FORMAT}))
    manifest = {
        "format": BASE_FORMAT,
        "fedabus_version": __version__,
        "sam_config": base.sam_config,
        "cls_config": base.cls_config,
        "fingerprints": fingerprints,
        "provenance": {**base.provenance, **(provenance or {})},
    }
    atomic_write(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=1) + "\n"))
    return tensor_path


def read_base_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest (``NAME.json``) of a saved base: its architecture (``sam_config``, ``cls_config``), the
    fingerprints of its weights and its provenance. The architecture of a saved base is this, not the config's
    ``model.sam-preset``/``model.cls-depth`` (those only build new bases)."""
    tensor_path, manifest_path = pair_paths(path)
    if not manifest_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(
            f"{tensor_path}: base not found (needs {tensor_path.name} and {manifest_path.name}); "
            "create one with `fedabus pretrain` (demo) or `fedabus make-base` (real checkpoints)"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != BASE_FORMAT:
        raise CheckpointError(f"{manifest_path}: not a fedabus base manifest")
    return manifest


def load_base(
    path: str | Path,
    *,
    attention_impl: str = "fast",
    verify: bool = True,
    fingerprints: dict[str, str] | None = None,
) -> BaseModels:
    """Open a saved base (memory-mapped) and check its weights against the fingerprints in its manifest.

    The architectures are rebuilt from the manifest (:func:`read_base_manifest`), never from the config.
    ``fingerprints``: the weights' fingerprints as hashed earlier from these very files (a caller that checked
    :func:`base_stamp`); they are not hashed again, only compared with the manifest's.
    """
    from safetensors.torch import load_file

    tensor_path, manifest_path = pair_paths(path)
    manifest = read_base_manifest(path)
    tensors = load_file(str(tensor_path))
    # Built without initialising anything (``meta``): the memory-mapped weights become the parameters and
    # buffers as they are; what the state dict does not hold is rebuilt below.
    with torch.device("meta"):
        sam = build_sam_med3d(manifest["sam_config"], attention_impl=attention_impl)
        cls = _build_cls(manifest["cls_config"])
    for prefix, model in (("seg", sam), ("cls", cls)):
        part = {k[len(prefix) + 1 :]: _aligned(v) for k, v in tensors.items() if k.startswith(prefix + ".")}
        load_state_dict_strict(model, part, source=f"{tensor_path} [{prefix}]", assign=True)
    sam.reset_non_persistent_buffers(device="cpu")
    for prefix, model in (("seg", sam), ("cls", cls)):
        left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"{tensor_path} [{prefix}]: no values for {left[:5]} (not in the state dict)")
    base = BaseModels(
        sam, cls, manifest["sam_config"], manifest["cls_config"], provenance=manifest["provenance"]
    )
    if fingerprints is None:
        base.refresh_fingerprints()
    else:
        base.fingerprints = dict(fingerprints)
    if verify and base.fingerprints != manifest["fingerprints"]:
        raise CheckpointError(f"{tensor_path}: weights do not match the fingerprints in {manifest_path.name}")
    return base


#: Bytes that torch aligns its own CPU allocations to; some CPU kernels round differently on other addresses.
_ALIGNMENT = 64


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when its data lies where torch's allocator would put it, else a copy that does: a
    tensor in the memory map sits wherever the file packed it, and computing with it there could differ in the
    last bit from computing with the same values loaded the old way."""
    return tensor if tensor.data_ptr() % _ALIGNMENT == 0 else tensor.clone()


def base_stamp(path: str | Path) -> dict[str, Any]:
    """What identifies the files of a saved base without reading them: the resolved tensor path and, for both
    files, ``[size, mtime_ns, ctime_ns, inode]``. Replacing a file (new inode), writing it (mtime, ctime) or
    copying another over it (ctime, which user tools cannot set back) changes the stamp."""
    tensor_path, manifest_path = pair_paths(path)
    stamp: dict[str, Any] = {"path": str(tensor_path.resolve())}
    for kind, file in (("safetensors", tensor_path), ("json", manifest_path)):
        try:
            st = os.stat(file)
        except FileNotFoundError:
            read_base_manifest(path)  # raises, naming the missing file and how to make a base
            raise
        stamp[kind] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return stamp


def base_from_checkpoints(
    sam_checkpoint: str | Path,
    *,
    sam_config: str | dict[str, Any] = "vit_b_ori",
    cls_backbone: str | Path | None = None,
    cls_depth: int = 50,
    cls_norm_groups: int = 32,
    cls_arch: str = "resnet",
    cls_fusion: str = "ts+c",
    cls_planes: Sequence[str] = PLANES,
    seed: int = 0,
    trust_pickle: bool = False,
) -> BaseModels:
    """A base from the official SAM-Med3D checkpoint and optional torchvision-format backbone weights.

    ``cls_backbone`` is the weights FILE of the classifier's branches (torchvision format of the architecture
    ``cls_arch``/``cls_depth``, :func:`shared.models.triplane.load_backbone_weights`); the architecture, planes
    and fusion are those of :func:`build_random_base`. The classifier's fusion head starts from a seeded random
    initialisation; the coordinator makes the base once and distributes the pair of files, so every site holds
    the same weights (checked by fingerprint).
    """
    base = build_random_base(
        sam_config,
        cls_depth=cls_depth,
        cls_planes=cls_planes,
        cls_norm_groups=cls_norm_groups,
        cls_arch=cls_arch,
        cls_fusion=cls_fusion,
        seed=seed,
    )
    load_state_dict_strict(
        base.sam, read_checkpoint(sam_checkpoint, trust_pickle=trust_pickle), source=str(sam_checkpoint)
    )
    if cls_backbone is not None:
        load_backbone_weights(base.cls, cls_backbone)
    base.provenance = {
        "sam_checkpoint": Path(sam_checkpoint).name,
        "cls_backbone": Path(cls_backbone).name if cls_backbone else None,
    }
    base.refresh_fingerprints()
    return base


def wrap_for_training(base: BaseModels, specs: dict[str, LoraSpec | AutoSegSpec]) -> dict[str, nn.Module]:
    """Attach LoRA to both base models (in place): ``{"seg": PeftModel, "cls": PeftModel}``; with an
    :class:`AutoSegSpec` for ``seg`` (``model.seg-model = segresnet``, :func:`shared.adapters.model_specs`) the
    ``seg`` model is a fresh automatic segmenter instead, drawn from torch's generator (the base's SAM-Med3D
    stays untouched and unused)."""
    return {"seg": attach_spec(base.sam, specs["seg"]), "cls": attach_lora(base.cls, specs["cls"])}


def working_copy(
    base: BaseModels, specs: dict[str, LoraSpec | AutoSegSpec], *, empty: bool = False
) -> BaseModels:
    """A base to wrap and train without touching ``base``: new module objects whose frozen parameters share
    ``base``'s tensors (no copy of the weights), while the submodules that ``specs`` train fully (``trainable``)
    and all buffers are copies. ``base`` stays valid only as long as nothing writes to frozen parameters, which
    LoRA training never does (:func:`attach_lora` freezes them).

    ``empty``: the fully trained submodules' parameters are allocated, not copied (``torch.empty_like``), for a
    caller that overwrites them right away (a global adapter holds all of them); such a caller must then call
    :func:`check_filled`, which fails loudly on any parameter left as allocated."""
    memo: dict[int, Any] = {}
    unfilled: dict[str, tuple[nn.Parameter, int]] = {}
    for prefix, model in (("seg", base.sam), ("cls", base.cls)):
        trained = tuple(f"{name}." for name in specs[prefix].trainable)
        for name, param in model.named_parameters():
            if not name.startswith(trained):
                memo[id(param)] = nn.Parameter(param.detach(), requires_grad=param.requires_grad)
            elif empty:
                new = nn.Parameter(torch.empty_like(param.detach()), requires_grad=param.requires_grad)
                memo[id(param)] = new
                unfilled[f"{prefix}.{name}"] = (new, new._version)
    sam, cls = copy.deepcopy((base.sam, base.cls), memo)
    return BaseModels(
        sam,
        cls,
        copy.deepcopy(base.sam_config),
        copy.deepcopy(base.cls_config),
        dict(base.fingerprints),
        copy.deepcopy(base.provenance),
        unfilled,
    )


def check_filled(base: BaseModels) -> None:
    """Fail unless every parameter that ``working_copy(..., empty=True)`` left uninitialised was written since
    (in place, e.g. by :func:`shared.adapters.apply_adapter`): training from allocated memory would be silent
    garbage. Checks each parameter's version counter, which every in-place write advances."""
    left = sorted(name for name, (param, version) in base.unfilled.items() if param._version == version)
    if left:
        raise RuntimeError(
            f"{len(left)} parameter(s) of the working copy were never filled (first: {left[:5]}); "
            "the adapter applied must hold every fully trained parameter"
        )
    base.unfilled = {}
