"""``fedabus pretrain``: a small base for CPU demos, trained fully on a synthetic "public" source set.

The classifier's backbones are pretrained but its fusion head is re-initialised (``cls_fresh_head``), like a
real base made from ImageNet backbones: the benign/malignant decision is learnt by the sites.

No pretrained weights can be downloaded on the machines fedabus is developed on, so demos and tests need a
base that already knows roughly what a lesion is — as the real SAM-Med3D checkpoint does. This trains the
``small`` SAM-Med3D preset and the classifier backbones with ALL parameters trainable on a synthetic public set
(its own seed, disjoint from any demo consortium), then saves the base with its fingerprints. Sites then only
fine-tune adapters on top, exactly as with the real checkpoint.

The result is cached: a base whose manifest records the same recipe is reused instead of retrained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from shared.base import build_random_base, load_base, save_base
from shared.config import ConfigError, FedabusConfig
from shared.data.loaders import cls_loader, seg_train_loader, site_cases
from shared.data.synth import generate_consortium
from shared.device import resolve_device
from shared.models.triplane import PLANES
from shared.training.cls import train_classifier
from shared.training.cls_planes import parse_cls_planes
from shared.training.seg import train_segmentation

__all__ = ["PretrainRecipe", "default_base_path", "ensure_base", "pretrain_base"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that determines the pretrained base; its hash names the cache entry."""

    sam_preset: str = "small"
    cls_depth: int = 18
    public_cases: int = 32
    public_seed: int = 9_999
    seg_epochs: int = 12
    seg_lr: float = 2e-3
    cls_epochs: int = 10
    cls_lr: float = 1e-2
    #: Re-initialise the classifier's fusion head after pretraining, so the base carries pretrained backbones
    #: but no benign/malignant decision — as a real base does (ImageNet backbones, fresh head); sites learn it.
    cls_fresh_head: bool = True
    seed: int = 0
    #: The classifier's backbone (``model.cls-backbone``), plane fusion (``model.cls-fusion``), planes
    #: (``train.cls-planes``, canonical order) and GroupNorm groups (``model.cls-norm-groups``).
    cls_arch: str = "resnet"
    cls_fusion: str = "ts+c"
    cls_planes: tuple[str, ...] = PLANES
    cls_norm_groups: int = 32

    @classmethod
    def from_config(cls, config: FedabusConfig) -> PretrainRecipe:
        """The default recipe for the architecture that ``config`` describes (``model.*``, ``train.cls-planes``)."""
        return cls(
            sam_preset=config.model.sam_preset,
            cls_depth=config.model.cls_depth,
            cls_arch=config.model.cls_backbone,
            cls_fusion=config.model.cls_fusion,
            cls_planes=parse_cls_planes(config.train.cls_planes),
            cls_norm_groups=config.model.cls_norm_groups,
        )

    def key(self) -> str:
        """Hash of the recipe. The fields added with the classifier ablations count only where they differ from
        their defaults, so the recipes from before them keep their cached bases."""
        values = asdict(self)
        for name in _ABLATION_FIELDS:
            if values[name] == getattr(PretrainRecipe, name):
                del values[name]
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


_ABLATION_FIELDS = ("cls_arch", "cls_fusion", "cls_planes", "cls_norm_groups")


def default_base_path(recipe: PretrainRecipe, cache_dir: str | Path | None = None) -> Path:
    """Where the cached base of ``recipe`` lives (``~/.cache/fedabus`` unless ``cache_dir``)."""
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "fedabus"
    return root / f"base-{recipe.sam_preset}-{recipe.key()}.safetensors"


#: Torch intra-op threads while pretraining on a CPU. The demo base's ops are small: on the 2-core development VM
#: with the other core busy (the demo's budget, docs/performance.md) one thread trained an epoch of the small
#: SAM-Med3D 2.1x faster than torch's default two; on the idle VM it was 1.3x slower. One fixed count also keeps
#: the float reduction order, hence the pretrained base, the same on every machine.
PRETRAIN_CPU_THREADS = 1


def pretrain_base(
    out_path: str | Path, recipe: PretrainRecipe, config: FedabusConfig, *, device: str = "auto"
) -> Path:
    """Train the base fully on a synthetic public set and save it to ``out_path`` (+ manifest); on a CPU with
    :data:`PRETRAIN_CPU_THREADS` torch threads (the caller's count is restored afterwards)."""
    dev = resolve_device(device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(PRETRAIN_CPU_THREADS)
    try:
        return _pretrain(out_path, recipe, config, dev)
    finally:
        torch.set_num_threads(threads)


def _pretrain(out_path: str | Path, recipe: PretrainRecipe, config: FedabusConfig, dev: torch.device) -> Path:
    started = time.monotonic()
    base = build_random_base(
        recipe.sam_preset,
        cls_depth=recipe.cls_depth,
        cls_planes=recipe.cls_planes,
        cls_norm_groups=recipe.cls_norm_groups,
        cls_arch=recipe.cls_arch,
        cls_fusion=recipe.cls_fusion,
        seed=recipe.seed,
    )
    with tempfile.TemporaryDirectory(prefix="fedabus-public-") as tmp:
        site_dir = generate_consortium(
            tmp, sites=1, cases=recipe.public_cases, seed=recipe.public_seed, workers=None
        )[0]
        config_path = Path(tmp) / f"{site_dir.name}.toml"
        from shared.config import load_site_config

        site_config = load_site_config(config_path) if config_path.is_file() else None
        cases = site_cases(site_dir, site_config)  # every split: the public set is all training data
        train = replace(
            config.train,
            seg_epochs=recipe.seg_epochs,
            seg_lr=recipe.seg_lr,
            cls_epochs=recipe.cls_epochs,
            cls_lr=recipe.cls_lr,
            seed=recipe.seed,
            proximal_mu=0.0,
        )
        print(
            f"pretrain: {len(cases)} synthetic public cases; training SAM-Med3D ({recipe.sam_preset}) fully"
        )
        sam = base.sam.to(dev).requires_grad_(True)
        # No augmentation: the cache key is the recipe, so the same recipe must keep giving the same base.
        data = replace(config.data, augment=False)
        loader = seg_train_loader(
            cases, data, batch_size=train.seg_batch_size, site_config=site_config, seed=recipe.seed
        )
        seg = train_segmentation(sam, loader, config=train, device=dev)
        print(f"pretrain: classifier ({base.cls.backbone} branches, {recipe.cls_fusion} fusion) fully")
        cls = base.cls.to(dev).requires_grad_(True)
        loader = cls_loader(cases, data, batch_size=train.cls_batch_size, site_config=site_config, seed=0)
        cls_result = train_classifier(cls, loader, config=train, device=dev)
    if recipe.cls_fresh_head:
        torch.manual_seed(recipe.seed)
        for module in cls.head.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    base.sam, base.cls = sam.cpu().eval(), cls.cpu().eval()
    provenance = {
        "pretrained_on": f"synthetic public set ({recipe.public_cases} cases, seed {recipe.public_seed})",
        "recipe": asdict(recipe),
        "seg_final_loss": seg["epoch_loss"][-1] if seg["epoch_loss"] else None,
        "cls_final_loss": cls_result["loss"],
        "seconds": round(time.monotonic() - started, 1),
    }
    path = save_base(base, out_path, provenance=provenance)
    print(f"pretrain: saved {path} in {provenance['seconds']} s (fingerprint {base.fingerprint[:30]}...)")
    return path


def ensure_base(
    config: FedabusConfig, *, recipe: PretrainRecipe | None = None, cache_dir: str | Path | None = None
) -> Path:
    """The base to use: ``model.base-path`` when set, else the cached pretrained demo base (made if missing).

    The demo base exists for the ``small`` preset only: with another ``model.sam-preset`` (e.g. the full models
    of ``configs/full-models.toml``) and no base path this raises ConfigError instead of pretraining a full
    SAM-Med3D from random weights on synthetic data; real sites use the base of ``fedabus make-base``.
    """
    if config.model.base_path:
        return Path(config.model.base_path)
    if recipe is None and config.model.sam_preset != "small":
        raise ConfigError(
            f"no base given and model.sam-preset is {config.model.sam_preset!r}: the cached demo base is only "
            "made for the 'small' preset. Give the base made by `fedabus make-base` (--base BASE or "
            "model.base-path)"
        )
    recipe = recipe or PretrainRecipe.from_config(config)
    path = default_base_path(recipe, cache_dir)
    if path.is_file():
        try:
            load_base(path, attention_impl=config.model.attention_impl)
            return path
        except Exception as exc:  # a corrupt cache entry is rebuilt, never used
            logger.warning("cached base %s is unusable (%s); rebuilding", path, exc)
    torch.manual_seed(recipe.seed)
    return pretrain_base(path, recipe, config, device=config.model.device)
