"""The one configuration schema of fedabus.

Over 500 lines on purpose: every section, key, default and check lives here and nowhere else (one place per
concept); splitting it by section would scatter the cross-section checks.

The same keys are used everywhere: the Flower run config (``[tool.flwr.app.config]`` in pyproject.toml, where
nested tables become dotted keys such as ``model.sam-preset``), experiment TOML files in ``configs/``, site TOML
files in ``sites/`` and the command line. Keys use dashes in files (``lora-rank``) and map to dataclass fields
with underscores (``lora_rank``).

Each section is a frozen dataclass; :func:`load_sections` turns a flat or nested mapping into them, coercing
types and rejecting unknown keys with a message that names the key and the allowed ones.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from shared.metric_names import AUC, DICE, DICE_AUTO, GT_PLANES, TEST, TRAIN, VAL, dice_click_name

__all__ = [
    "ADAPTER_METHODS",
    "AUTO_SEG_MODELS",
    "SEG_MODELS",
    "SLICE_SEG_MODELS",
    "AdapterConfig",
    "CLS_BACKBONES",
    "CLS_FUSIONS",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "FedabusConfig",
    "SiteConfig",
    "flatten",
    "FLOWER_KEYS",
    "load_config",
    "parse_assignments",
    "load_run_config",
    "load_site_config",
    "section_from_mapping",
    "to_flat_dict",
    "TrainConfig",
    "PRECISIONS",
    "check_precision",
    "FederationConfig",
    "LORA_AGGREGATION_MODES",
    "COMPRESSIONS",
    "SECURE_AGGREGATION_STRATEGIES",
    "check_secure_aggregation",
    "PrivacyConfig",
    "SEG_TARGETS",
]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and says what is allowed."""


#: ``model.cls-backbone`` values: ``resnet`` (depth ``model.cls-depth``), ``resnet101``, ``resnext50``
#: (ResNeXt-50 32x4d), ``densenet161``, ``vgg19`` (with GroupNorm) — :mod:`shared.models.triplane`.
CLS_BACKBONES: tuple[str, ...] = ("resnet", "resnet101", "resnext50", "densenet161", "vgg19")
#: ``model.cls-fusion`` values: ``ts+c`` (seed 003), ``late-mean``, ``concat`` — :mod:`shared.models.triplane`.
CLS_FUSIONS: tuple[str, ...] = ("ts+c", "late-mean", "concat")
#: ``model.seg-model`` values: ``sam-med3d`` (click-prompted, LoRA on the frozen base) or a fully automatic
#: network trained whole — ``segresnet`` (MONAI SegResNet, 3D), ``dynunet2d`` (seed 001's deep-supervised 2D
#: UNet, MONAI DynUNet) or ``u2net-lite`` (seed 004's U2NET-Lite, 2D) — :mod:`shared.models.auto_seg`.
SEG_MODELS: tuple[str, ...] = ("sam-med3d", "segresnet", "dynunet2d", "u2net-lite")
#: The fully automatic ones among :data:`SEG_MODELS`.
AUTO_SEG_MODELS: tuple[str, ...] = ("segresnet", "dynunet2d", "u2net-lite")
#: The 2D ones among :data:`AUTO_SEG_MODELS`: trained on sweep slices, evaluated slice by slice stacked to 3D.
SLICE_SEG_MODELS: tuple[str, ...] = ("dynunet2d", "u2net-lite")


@dataclass(frozen=True)
class ModelConfig:
    """Which base models to build and where their frozen weights come from.

    ``sam-preset`` and the ``cls-*`` keys only matter when a base is BUILT (``fedabus pretrain`` and the cached
    demo base that ``train-local``, ``predict`` and ``demo`` make when no base is given). A saved base carries its
    architecture in its manifest (``NAME.json``), and :func:`shared.base.load_base` builds exactly that, whatever
    these keys say; ``fedabus make-base`` takes its own ``--sam-preset``/``--cls-depth``/``--cls-arch``/
    ``--cls-fusion``/``--cls-planes`` options.
    """

    #: SAM-Med3D size preset: ``vit_b_ori`` (the official turbo model) or ``small`` (CPU tests and demos).
    sam_preset: str = "small"
    #: Image-encoder attention implementation: ``fast`` (exact, skips padded tokens) or ``reference``.
    attention_impl: str = "fast"
    #: Path of the frozen base checkpoint (SAM-Med3D + classifier); empty means "use the cached demo base".
    base_path: str = ""
    #: ResNet depth of each tri-plane branch (18, 34 or 50; the seed uses 50, the CPU demo base 18).
    cls_depth: int = 50
    #: Number of groups of the GroupNorm that replaces BatchNorm in the classifier backbones.
    cls_norm_groups: int = 32
    #: Classifier branch architecture (seed 003's backbone ablation): ``resnet`` (depth ``cls-depth``),
    #: ``resnet101``, ``resnext50``, ``densenet161`` or ``vgg19`` (all with GroupNorm).
    cls_backbone: str = "resnet"
    #: How the classifier fuses its planes: ``ts+c`` (seed 003: transverse + sagittal added, then concatenated
    #: with coronal), ``concat`` (all planes' features concatenated, one head) or ``late-mean`` (one head per
    #: plane, logits averaged). Every fusion works with every ``train.cls-planes`` subset.
    cls_fusion: str = "ts+c"
    #: Device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "auto"
    #: The segmenter that trains, travels and is evaluated: ``sam-med3d`` (the base's SAM-Med3D with the
    #: ``[adapter]`` settings, click-prompted) or a fully automatic network, no click, trained whole from a
    #: ``train.seed`` initialisation, its metrics ``*_auto`` (docs/studies.md): ``segresnet`` (MONAI SegResNet on
    #: 3D crops), ``dynunet2d`` (seed 001's deep-supervised 2D UNet) or ``u2net-lite`` (seed 004), both trained
    #: on sweep slices (``data.slice-*``) and evaluated slice by slice stacked back to 3D. The adapter manifest
    #: records it, and a receiver built for another refuses the adapter.
    seg_model: str = "sam-med3d"
    #: Automatic segmenters: channels of the first level, 0 for the model's own default. SegResNet: doubled at
    #: each level below (MONAI's 8); dynunet2d: doubled per level up to 16× (nnU-Net's 32); u2net-lite: the inner
    #: channels of every RSU stage, outer 4× (seed 004's U2NETP: 16).
    auto_init_filters: int = 0
    #: SegResNet only: residual blocks per encoder level, comma-separated (MONAI's default ``1,2,2,4``: 4
    #: levels, so ``data.patch-size`` must be divisible by 2³).
    auto_blocks_down: str = "1,2,2,4"
    #: dynunet2d only: resolution levels (at least 3; each below the first halves the frame, so
    #: ``data.slice-size`` must be divisible by 2^(levels - 1)); deep-supervision heads: levels - 2.
    dynunet_levels: int = 5

    def __post_init__(self) -> None:
        if self.seg_model not in SEG_MODELS:
            raise ConfigError(f"model.seg-model = {self.seg_model!r}; allowed: {', '.join(SEG_MODELS)}")
        blocks = [p.strip() for p in self.auto_blocks_down.split(",") if p.strip()]
        if not blocks or not all(b.isdigit() and int(b) >= 1 for b in blocks):
            raise ConfigError(
                f"model.auto-blocks-down = {self.auto_blocks_down!r}; give comma-separated block counts >= 1, "
                "e.g. '1,2,2,4'"
            )
        if self.auto_init_filters < 0:
            raise ConfigError(
                f"model.auto-init-filters = {self.auto_init_filters!r}; give a positive integer (0: the model's "
                "own default)"
            )
        if self.dynunet_levels < 3:
            raise ConfigError(
                f"model.dynunet-levels = {self.dynunet_levels!r}; give at least 3 (one deep-supervision head "
                "needs two levels below the top)"
            )
        if self.cls_backbone not in CLS_BACKBONES:
            raise ConfigError(
                f"model.cls-backbone = {self.cls_backbone!r}; allowed: {', '.join(CLS_BACKBONES)}"
            )
        if self.cls_fusion not in CLS_FUSIONS:
            raise ConfigError(f"model.cls-fusion = {self.cls_fusion!r}; allowed: {', '.join(CLS_FUSIONS)}")
        if self.cls_norm_groups < 1:
            raise ConfigError(f"model.cls-norm-groups = {self.cls_norm_groups!r}; give a positive integer")


@dataclass(frozen=True)
class AdapterConfig:
    """What is trainable and therefore travels: the PEFT adapter and the fully trained submodules.

    ``method`` and the ``lora-*`` settings apply to both models (docs/training.md, "PEFT methods"); ``targets``
    chooses the adapted linears of the SAM-Med3D image encoder, ``cls-lora-targets`` the classifier's modules.
    """

    #: PEFT method: ``lora`` (default), ``dora`` (LoRA with a trained magnitude per output), ``loha`` (low-rank
    #: Hadamard product) or ``lokr`` (low-rank Kronecker product). Only ``lora`` works with
    #: ``federation.lora-aggregation`` ``ffa``/``product`` and with ``privacy.sample-dp``.
    method: str = "lora"
    #: Rank r, alpha (scaling alpha / r) and dropout of the adapter (dropout: ``lora`` and ``dora`` only).
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_dropout: float = 0.0
    #: Comma-separated SAM-Med3D image-encoder linears adapted in every block: ``qkv`` (attention input
    #: projection), ``proj`` (attention output projection), ``mlp`` (both MLP linears).
    targets: str = "qkv"
    #: Comma-separated SAM-Med3D submodules trained fully (travel in the adapter).
    seg_trainable: str = "prompt_encoder,mask_decoder"
    #: Regex over classifier module names that receive the adapter (default: every backbone convolution).
    cls_lora_targets: str = r"branches\.\w+\..*(conv\d*|downsample\.0)"
    #: Comma-separated classifier submodules trained fully.
    cls_trainable: str = "head"

    def __post_init__(self) -> None:
        if self.method not in ADAPTER_METHODS:
            raise ConfigError(f"adapter.method = {self.method!r}; allowed: {', '.join(ADAPTER_METHODS)}")
        names = self.target_names()
        unknown = [n for n in names if n not in SEG_TARGETS]
        if unknown or not names:
            raise ConfigError(
                f"adapter.targets = {self.targets!r}; give a comma-separated subset of {', '.join(SEG_TARGETS)}"
            )
        if self.method in ("loha", "lokr") and self.lora_dropout != 0.0:
            raise ConfigError(
                f"adapter.lora-dropout = {self.lora_dropout!r}: adapter.method = {self.method!r} has no input "
                "dropout; set it to 0 (dropout works with lora and dora)"
            )

    def target_names(self) -> tuple[str, ...]:
        """``targets`` as names in :data:`SEG_TARGETS` order, each once (the order written does not matter)."""
        given = {n.strip() for n in self.targets.split(",") if n.strip()}
        return tuple(n for n in SEG_TARGETS if n in given) + tuple(sorted(given - set(SEG_TARGETS)))


#: Values of ``adapter.method`` (the PEFT 0.21 tuners fedabus wraps, shared/adapters.py).
ADAPTER_METHODS: tuple[str, ...] = ("lora", "dora", "loha", "lokr")

#: Names of ``adapter.targets`` -> the modules of each SAM-Med3D image-encoder block they adapt (a regex over
#: the name after ``image_encoder.blocks.<i>.``).
SEG_TARGETS: dict[str, str] = {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "mlp": r"mlp\.lin[12]"}


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing shared by training, evaluation and inference."""

    #: Target voxel spacing (mm) in array order (z, y, x); 0 keeps the file's spacing on that axis.
    spacing_z: float = 0.0
    spacing_y: float = 0.0
    spacing_x: float = 0.0
    #: Intensity normalisation: ``zscore_nonzero`` (official SAM-Med3D), ``zscore`` or ``minmax``.
    normalisation: str = "zscore_nonzero"
    #: Side of the cubic crop fed to SAM-Med3D (voxels); must equal the model's ``img_size``.
    patch_size: int = 64
    #: Evaluation blocks with fewer lesion voxels than this are dropped (seed 000 uses 2000 at 128³).
    block_min_lesion_voxels: int = 50
    #: Frames per plane and their side (pixels) for the tri-plane classifier.
    planes_frames: int = 3
    planes_size: int = 64
    #: Training crops: the crop centre moves from the lesion centre by a seeded uniform integer in
    #: [-crop-jitter-voxels, +crop-jitter-voxels] per axis (0: no jitter); must stay below patch-size / 2.
    crop_jitter_voxels: int = 8
    #: Tri-plane regions: margin added on each side of the lesion bounding box, as a fraction of the box
    #: extent on that axis, and at least ``planes-margin-mm`` (mm).
    planes_margin: float = 0.15
    planes_margin_mm: float = 1.0
    #: Classifier training only: the box the planes are cut around moves and resizes at random by up to this
    #: fraction of the lesion's extent per axis (0-1; 0: the true box), as the box of a segmenter's mask misses
    #: the true one at inference (shared/data/planes.py ``jitter_box``; docs/training.md).
    planes_box_jitter: float = 0.0
    #: 2D segmenters (``model.seg-model = dynunet2d | u2net-lite``): side (pixels) of the square frame a sweep
    #: slice is resized (longer side) and padded to, in training and evaluation (shared/data/slices2d.py).
    slice_size: int = 128
    #: 2D segmenters: lesion-free training slices per lesion slice of a case, drawn at random (seeded) from the
    #: case's lesion-free slices (0: lesion slices only).
    slice_negative_fraction: float = 0.25
    #: Fraction of each label's training cases carved out as the validation split when a site has no ``val``
    #: cases (deterministic, seeded by ``train.seed``; 0: no validation, the last round/epoch is kept).
    val_fraction: float = 0.2
    #: Training augmentation of both models (shared/data/augment.py; never for validation, test or inference).
    #: Off: the training items are exactly those without augmentation.
    augment: bool = True
    #: Probability (0-1) of each of rotation, zoom, speckle, blur, gamma and intensity per training item.
    augment_prob: float = 0.2
    #: Probability (0-1) of a flip along the sweep (z) axis, and separately along the lateral (x) axis.
    augment_flip_prob: float = 0.5
    #: Largest rotation angle (degrees, 0-45) about each axis.
    augment_rotate_deg: float = 10.0
    #: Isotropic zoom factor drawn in [1 - augment-zoom, 1 + augment-zoom] (0 to below 1).
    augment_zoom: float = 0.1
    #: Speckle-like multiplicative noise: standard deviation of n in signal × (1 + n) (>= 0).
    augment_speckle_std: float = 0.1
    #: Largest Gaussian blur σ (voxels, >= 0); σ is drawn in [augment-blur-sigma / 4, augment-blur-sigma].
    augment_blur_sigma: float = 1.0
    #: Gamma drawn in [1 / (1 + augment-gamma), 1 + augment-gamma] (>= 0).
    augment_gamma: float = 0.3
    #: Contrast × (1 + u) and brightness + u (standard deviations of the normalised image), u in ±augment-intensity.
    augment_intensity: float = 0.1
    #: Preprocessed cases kept in memory per process (MiB; 0: none): later epochs, models and evaluations of the
    #: same process get a copy instead of reading and resampling again (shared/data/case_cache.py). The values
    #: are the same either way; a case larger than this is never kept.
    case_cache_mb: int = 0

    def __post_init__(self) -> None:
        if self.case_cache_mb < 0:
            raise ConfigError(f"data.case-cache-mb = {self.case_cache_mb!r} must be >= 0 (0 keeps no case)")
        limits = {
            "planes_box_jitter": (0.0, 1.0),
            "augment_prob": (0.0, 1.0),
            "augment_flip_prob": (0.0, 1.0),
            "augment_rotate_deg": (0.0, 45.0),
            "augment_zoom": (0.0, 0.99),
            "augment_speckle_std": (0.0, math.inf),
            "augment_blur_sigma": (0.0, math.inf),
            "augment_gamma": (0.0, math.inf),
            "augment_intensity": (0.0, math.inf),
        }
        if self.slice_size < 8:
            raise ConfigError(f"data.slice-size = {self.slice_size!r} must be at least 8 pixels")
        if not (math.isfinite(self.slice_negative_fraction) and self.slice_negative_fraction >= 0):
            raise ConfigError(
                f"data.slice-negative-fraction = {self.slice_negative_fraction!r} must be a finite number >= 0"
            )
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(
                    f"data.{name.replace('_', '-')} = {value!r} must lie in [{low:g}, {high:g}]"
                )


@dataclass(frozen=True)
class TrainConfig:
    """Local training of both models (one site, one round or one ``train-local`` run)."""

    #: Segmentation: epochs over the site's training cases, AdamW learning rate (seed 000: 2e-4).
    seg_epochs: int = 2
    seg_lr: float = 2e-4
    seg_weight_decay: float = 0.0
    #: Comma-separated epochs at which the learning rate is multiplied by ``seg_lr_decay`` (seed: "120,180").
    seg_lr_milestones: str = ""
    seg_lr_decay: float = 0.1
    seg_batch_size: int = 2
    seg_grad_accumulation: int = 1
    #: Click iterations per training sample (1 = first click only; seed evaluates with up to 11 clicks).
    seg_click_iterations: int = 3
    #: Cap on corrective clicks added per iteration (one per 2D slice of the error region otherwise).
    seg_clicks_per_step: int = 4
    #: Total clicks per case in evaluation (seed 000: 11).
    eval_clicks: int = 5
    #: Classifier: epochs, optimiser (``sgd`` with momentum as seed 003, or ``adamw``), learning rate.
    cls_epochs: int = 3
    cls_optimizer: str = "sgd"
    cls_lr: float = 1e-3
    cls_momentum: float = 0.9
    cls_batch_size: int = 8
    #: Planes used by the classifier: comma-separated subset of ``transverse,sagittal,coronal``.
    cls_planes: str = "transverse,sagittal,coronal"
    #: Decision threshold on the lesion malignancy probability.
    cls_threshold: float = 0.5
    #: Boxes the classifier's training planes are cut around: ``ground-truth`` (the true lesion's) or
    #: ``predicted`` (each round, the box of the segmenter's own mask of the case after the evaluation's clicks,
    #: the true box where it finds nothing), so that the deployed click -> mask -> malignancy path is the one
    #: trained. ``data.planes-box-jitter`` adds random misses on top of either.
    cls_boxes: str = "ground-truth"
    #: Model selection: the validation metric (higher is better) that picks the round (federation) or the
    #: training chunk (local training): ``dice_1click``, ``dice`` (last click), ``dice_auto``, ``auc`` or
    #: ``auc_gt_planes``. With an automatic segmenter (``model.seg-model = segresnet``) a click metric selects
    #: by ``dice_auto`` instead (the config maps it); ``dice_auto`` needs one. The test split never takes part.
    select_metric: str = dice_click_name(1)
    #: FedProx proximal coefficient (0 disables); the federation sets it per round.
    proximal_mu: float = 0.0
    #: Mixed precision of training, evaluation and inference of both models (shared/precision.py,
    #: docs/performance.md "GPU path"): ``fp32`` (no autocast), ``bf16`` (autocast to bfloat16 on CUDA or CPU) or
    #: ``fp16`` (autocast to float16 with gradient scaling; CUDA only). Losses and metrics stay float32. Only
    #: ``fp32`` under sample-level DP.
    precision: str = "fp32"
    seed: int = 0
    #: Show progress bars (interactive command-line use). Always off inside the Flower apps
    #: (:func:`load_run_config`): many processes share one log there.
    progress: bool = True

    def __post_init__(self) -> None:
        if self.cls_boxes not in ("ground-truth", "predicted"):
            raise ConfigError(f"train.cls-boxes = {self.cls_boxes!r}; allowed: ground-truth, predicted")
        if self.select_metric not in SELECT_METRICS:
            raise ConfigError(
                f"train.select-metric = {self.select_metric!r}; allowed: {', '.join(SELECT_METRICS)}"
            )
        check_precision(self.precision)


#: Validation metrics that may select a model (all higher-is-better; see ``train.select-metric``).
SELECT_METRICS: tuple[str, ...] = (dice_click_name(1), DICE, DICE_AUTO, AUC, AUC + GT_PLANES)

#: Values of ``train.precision``.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


def check_precision(precision: str, *, device: str = "auto", sample_dp: bool = False) -> None:
    """Raise ConfigError when ``train.precision`` cannot run: an unknown value, ``fp16`` on a CPU ``device``
    (fp16 autocast and gradient scaling are for CUDA; CPU autocast is for bfloat16), or anything but ``fp32`` under sample-level
    DP (Opacus would clip bf16/fp16 per-sample gradients by norms computed in that precision, so a clipped
    gradient could exceed ``privacy.max-grad-norm`` and the noise would no longer bound the sensitivity)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision = {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.split(":")[0] not in ("auto", "cuda"):
        raise ConfigError(
            f"train.precision = 'fp16' needs a CUDA device (the model runs on {device!r}): use 'bf16' (CPU "
            "autocast) or 'fp32'"
        )
    if precision != "fp32" and sample_dp:
        raise ConfigError(
            f"train.precision = {precision!r} with privacy.sample-dp = true: DP-SGD must clip per-sample "
            "gradients computed in float32; set train.precision = 'fp32'"
        )


@dataclass(frozen=True)
class FederationConfig:
    """The coordinator's settings of a federated run (the ServerApp reads them; sites ignore them)."""

    #: Aggregation: fedavg (weighted by training cases), fedprox, fedadam, fedmedian, fedtrimmedavg, krum, multikrum.
    strategy: str = "fedavg"
    #: Sites needed to run a round (see ``sample-timeout``).
    min_sites: int = 2
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    #: Seconds to wait for site replies in one round; also how long a round may wait for sites that are
    #: online but still answering the handshake ("slow to connect") when they are needed for ``min-sites``.
    round_timeout: float = 1800.0
    #: Seconds a round waits for ``min-sites`` admitted sites; past it the run stops with a message when
    #: even the sites still connecting could not make up ``min-sites`` (the others are gone or refused).
    sample_timeout: float = 300.0
    #: Evaluate the global adapter at every site every N rounds (and always before the first round).
    eval_interval: int = 1
    #: FedAdam server learning rate, FedTrimmedAvg trimming fraction, Krum's assumed malicious sites.
    server_lr: float = 0.1
    trim_beta: float = 0.2
    num_malicious: int = 0
    #: Update admission (server/admission.py): refuse an update whose L2 distance to the global adapter exceeds
    #: this bound (0 = off), or this ratio times the round's median update norm (0 = off).
    max_update_norm: float = 0.0
    max_update_norm_ratio: float = 10.0
    #: Simulation only: a folder with one sub-folder per site; simulated node ``partition-id`` takes the
    #: partition-id-th site in name order. Deployed sites pass ``data-path`` in their node config instead.
    sites_dir: str = ""
    #: Server work folder (checkpoints, summaries and, by default, the MLflow store); empty = ~/.fedabus/<run-name>.
    work_dir: str = ""
    run_name: str = "federation"
    #: Continue from the latest checkpoint in the work folder when one exists.
    resume: bool = True
    checkpoint_keep: int = 2
    #: MLflow tracking URI; empty = the MLFLOW_TRACKING_URI variable, else sqlite in the work folder.
    tracking_uri: str = ""
    experiment: str = "fedabus"
    #: After the last round, every site evaluates the chosen (best-by-validation), the last and the starting
    #: adapter once on its test split (``fedabus study`` turns it off and tests the chosen adapter itself).
    final_test: bool = True
    #: How LoRA adapters are aggregated (docs/training.md, "LoRA aggregation"): ``naive`` (A and B averaged
    #: separately), ``ffa`` (A frozen at a shared init and never sent, only B and the fully trained parts travel;
    #: sites read this key too) or ``product`` (ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ re-factorised to the global rank by SVD;
    #: fedavg and fedprox without client-level DP only).
    lora_aggregation: str = "naive"
    #: How the adapter travels in train messages, both directions (:mod:`shared.protocol`, "Compression";
    #: docs/performance.md, "Payload"): ``none`` (float32, exact), ``fp16`` (cast to float16, half the bytes) or
    #: ``int8`` (per-tensor symmetric int8 with a float32 scale per tensor, a quarter of the bytes; max abs error
    #: scale / 2 per tensor). Under ``fp16``/``int8`` a site sends the difference from the adapter it received and
    #: carries its quantisation residual into the next round (error feedback). Sites read this key too; a record of
    #: another encoding is refused. Client-side clipping (``privacy.client-dp = client-*``) needs ``none``.
    compression: str = "none"
    #: Secure aggregation (docs/privacy.md, "Secure aggregation"): the server learns only the weighted sum of the
    #: sites' adapter updates, never a single one (pairwise masks agreed by key exchange, dropout recovery by
    #: Shamir shares; :mod:`shared.secagg`). FedAvg, FedProx and FedAdam only, ``lora-aggregation`` naive or
    #: ffa, ``compression = none``, no client-level DP; sites read this key too.
    secure_aggregation: bool = False
    #: Sites' own LoRA ranks, given by the coordinator: ``"site_a=2,site_b=8"`` (site names as in reports; a site
    #: not named trains at ``adapter.lora-rank``). The same setting as a site's ``lora-rank`` (node config or site
    #: TOML), so one site may get it in several places only with the same value. Needs ``lora-aggregation =
    #: product`` and ``compression = none`` (docs/training.md, "Heterogeneous ranks"); sites read this key. The
    #: way to give a study arm mixed ranks: ``--set federated@mixed:federation.site-lora-ranks=site_a=2,site_b=8``.
    site_lora_ranks: str = ""

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("lora-aggregation", self.lora_aggregation, LORA_AGGREGATION_MODES),
            ("compression", self.compression, COMPRESSIONS),
        ):
            if value not in allowed:
                raise ConfigError(f"federation.{key} = {value!r}; allowed: " + ", ".join(allowed))
        if self.site_ranks() and (self.lora_aggregation != "product" or self.compression != "none"):
            raise ConfigError(
                f"federation.site-lora-ranks = {self.site_lora_ranks!r} needs federation.lora-aggregation = "
                f"'product' and federation.compression = 'none' (the only way ranks can differ between sites); "
                f"this run: {self.lora_aggregation!r}, {self.compression!r}"
            )

    def site_ranks(self) -> dict[str, int]:
        """``site-lora-ranks`` as {site name: rank >= 1}; raises :class:`ConfigError` naming the key and the
        entry that is not ``NAME=RANK`` with a whole rank >= 1, or a site named twice."""
        ranks: dict[str, int] = {}
        for entry in filter(None, (e.strip() for e in self.site_lora_ranks.split(","))):
            name, _, rank = (part.strip() for part in entry.partition("="))
            if not name or not rank.isdigit() or int(rank) < 1 or name in ranks:
                raise ConfigError(
                    f"federation.site-lora-ranks = {self.site_lora_ranks!r}: entry {entry!r} must be NAME=RANK "
                    "with a whole rank >= 1, each site once (e.g. 'site_a=2,site_b=8')"
                )
            ranks[name] = int(rank)
        return ranks


#: Values of ``federation.lora-aggregation``.
LORA_AGGREGATION_MODES: tuple[str, ...] = ("naive", "ffa", "product")
#: Values of ``federation.compression``.
COMPRESSIONS: tuple[str, ...] = ("none", "fp16", "int8")
#: Strategies whose aggregate needs only the weighted sum of the updates (``federation.secure-aggregation``).
SECURE_AGGREGATION_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam")


def check_secure_aggregation(federation: FederationConfig, privacy: PrivacyConfig) -> None:
    """Refuse ``federation.secure-aggregation = true`` with a setting that needs one site's update on the server
    (:class:`ConfigError` naming both keys and why)."""
    if not federation.secure_aggregation:
        return
    strategy = federation.strategy.lower()
    refusals = {
        "federation.strategy": (
            strategy not in SECURE_AGGREGATION_STRATEGIES,
            f"{strategy!r} selects or ranks single updates (median, trimming, Krum distances), which the masks "
            f"hide; use one of {', '.join(SECURE_AGGREGATION_STRATEGIES)}",
        ),
        "federation.lora-aggregation": (
            federation.lora_aggregation == "product",
            "'product' re-factorises the sites' single B·A products, not their sum; use 'naive' or 'ffa'",
        ),
        "federation.compression": (
            federation.compression != "none",
            f"{federation.compression!r} quantises each update with its own scale, which cannot be summed "
            "masked; the fixed-point ring encoding replaces it: use 'none'",
        ),
        "privacy.client-dp": (
            privacy.client_dp.strip().lower() != "off",
            f"{privacy.client_dp!r} clips or checks single updates on the server, which the masks hide; "
            "use 'off' (sample-level DP at the sites works with secure aggregation)",
        ),
    }
    for key, (refused, why) in refusals.items():
        if refused:
            raise ConfigError(f"federation.secure-aggregation = true cannot be combined with {key}: {why}")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy, off by default (see docs/privacy.md).

    Sample-level DP (``sample-dp``): DP-SGD with Opacus around each site's local training of both models; the
    privacy unit is one patient's case. Client-level DP (``client-dp``): clipping and Gaussian noise on whole
    adapter updates with Flower's DP wrappers; the privacy unit is one site.
    """

    #: DP-SGD (Opacus, Poisson sampling) for the local training of both models.
    sample_dp: bool = False
    #: Target ε per model over the whole run at one site (``num-server-rounds`` rounds of local epochs); the
    #: noise multiplier is derived from it. 0: use ``noise-multiplier`` as given.
    target_epsilon: float = 0.0
    #: Gaussian noise multiplier of DP-SGD when ``target-epsilon`` is 0.
    noise_multiplier: float = 1.0
    #: δ of sample-level DP; 0 picks 1 / (10 n) for a site with n training cases (below 1/n, as it must be).
    delta: float = 0.0
    #: Per-sample gradient L2 clipping norm.
    max_grad_norm: float = 1.0
    #: Expected Poisson batch of the segmenter under sample-level DP, in cases (sample rate min(1, this / n));
    #: trained in physical batches of ``train.seg-batch-size`` and one noisy step per Poisson batch. Larger
    #: batches divide the noise among more cases (docs/privacy.md, "Choosing settings"). 0: ``train.seg-batch-size``.
    seg_batch_size: int = 0
    #: Comma-separated fully trained SAM-Med3D submodules (of ``adapter.seg-trainable``) that still train under
    #: sample-level DP; the others keep the global value and travel unchanged, so fewer dimensions share the
    #: noise. Empty: only the LoRA matrices train under DP.
    seg_trainable: str = "prompt_encoder,mask_decoder"
    #: Privacy accountant of DP-SGD: ``rdp`` or ``prv``.
    accountant: str = "rdp"
    #: ε budget per model at a site across rounds (and runs sharing its ledger); a site whose next round would
    #: exceed it does not train. 0: the budget is ``target-epsilon`` (no budget stop when both are 0). A site
    #: may set a stricter one with ``epsilon-budget`` in its node config.
    epsilon_budget: float = 0.0
    #: Client-level DP on adapter updates: ``off``, ``server-fixed``, ``client-fixed``, ``server-adaptive`` or
    #: ``client-adaptive`` (where the update is clipped, and with a fixed or adaptive clipping norm).
    client_dp: str = "off"
    #: Gaussian noise multiplier of client-level DP (noise std = multiplier × clip norm / sampled sites).
    client_noise_multiplier: float = 1.0
    #: L2 clipping norm of a site's update (the initial norm with adaptive clipping).
    client_clip_norm: float = 1.0
    #: δ of client-level DP (choose below 1 / number of sites).
    client_delta: float = 1e-5
    #: Client-level ε budget of the federation across rounds (and resumes, through the server's journal): a round
    #: whose release would take ε above it is not started and the run ends there (docs/privacy.md). 0: no budget.
    client_epsilon_budget: float = 0.0

    def __post_init__(self) -> None:
        budget = self.client_epsilon_budget
        if not (math.isfinite(budget) and budget >= 0):
            raise ConfigError(
                f"privacy.client-epsilon-budget = {budget!r} must be a finite number >= 0 (0: no budget)"
            )


@dataclass(frozen=True)
class FedabusConfig:
    """All sections together (what a run or a command receives)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        check_precision(self.train.precision, device=self.model.device, sample_dp=self.privacy.sample_dp)
        self._check_segmenter()
        grouped = "branches.transverse.layer1.0.conv2"  # a ResNeXt-50 grouped 3x3 convolution (32 groups)
        if (
            self.model.cls_backbone == "resnext50"
            and self.adapter.lora_rank % 32
            and re.fullmatch(self.adapter.cls_lora_targets, grouped)
        ):
            raise ConfigError(
                f"model.cls-backbone = 'resnext50' with adapter.lora-rank = {self.adapter.lora_rank}: PEFT adapts "
                "ResNeXt-50's grouped convolutions (32 groups) only at a rank divisible by 32, and "
                "adapter.cls-lora-targets selects them; leave them out (docs/training.md, 'Classifier ablations') "
                "or use a rank of 32"
            )
        check_secure_aggregation(self.federation, self.privacy)
        method = self.adapter.method
        if method != "lora" and self.federation.lora_aggregation != "naive":
            raise ConfigError(
                f"federation.lora-aggregation = {self.federation.lora_aggregation!r} works with adapter.method = "
                f"'lora' only (it acts on LoRA's A and B matrices), not {method!r}; use 'naive' with {method!r}"
            )
        if method != "lora" and self.privacy.sample_dp:
            raise ConfigError(
                f"privacy.sample-dp = true works with adapter.method = 'lora' only: Opacus computes no correct "
                f"per-sample gradients for PEFT's {method!r} layers; use 'lora', or client-level DP "
                "(privacy.client-dp), which works with every method"
            )

    @property
    def automatic_seg(self) -> bool:
        """Whether the segmenter is fully automatic (``model.seg-model`` in :data:`AUTO_SEG_MODELS`)."""
        return self.model.seg_model in AUTO_SEG_MODELS

    def _check_segmenter(self) -> None:
        """The cross-section rules of ``model.seg-model``; maps a click selection metric to ``dice_auto``."""
        select = self.train.select_metric
        if not self.automatic_seg:
            if select == DICE_AUTO:
                raise ConfigError(
                    "train.select-metric = 'dice_auto' needs an automatic segmenter (model.seg-model = "
                    f"{', '.join(AUTO_SEG_MODELS)}); model.seg-model is 'sam-med3d': use dice_1click or dice"
                )
            return
        model = self.model
        if model.seg_model == "segresnet":
            levels, size, key = (
                len([p for p in model.auto_blocks_down.split(",") if p.strip()]),
                "patch",
                "crop",
            )
            how = f"model.auto-blocks-down = {model.auto_blocks_down!r}"
        elif model.seg_model == "dynunet2d":
            levels, size, key = model.dynunet_levels, "slice", "frame"
            how = f"model.dynunet-levels = {levels}"
        else:  # u2net-lite takes any frame size
            levels = 1
        factor = 2 ** (levels - 1)
        if levels > 1 and getattr(self.data, f"{size}_size") % factor:
            raise ConfigError(
                f"data.{size}-size = {getattr(self.data, f'{size}_size')} must be divisible by {factor} for "
                f"model.seg-model = {model.seg_model!r} with {how} ({levels} levels, each halving the {key})"
            )
        if self.privacy.sample_dp:
            raise ConfigError(
                f"privacy.sample-dp = true is not supported with model.seg-model = {self.model.seg_model!r} yet "
                "(DP-SGD is wired for SAM-Med3D's adapter); use client-level DP (privacy.client-dp) or sam-med3d"
            )
        if select in (dice_click_name(1), DICE):  # no click: the automatic model's Dice selects instead
            object.__setattr__(self, "train", dataclasses.replace(self.train, select_metric=DICE_AUTO))


T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        typ = args[0]
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot read {value!r} as {typ.__name__}") from None
    return value


def section_from_mapping(cls: type[T], values: Mapping[str, Any], *, where: str = "config") -> T:
    """Build the dataclass ``cls`` from ``values`` (keys with dashes or underscores).

    Raises ConfigError naming the unknown key and listing the allowed ones, or the value that does not parse.
    """
    types_ = _field_types(cls)
    kwargs = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in types_:
            allowed = ", ".join(sorted(k.replace("_", "-") for k in types_))
            raise ConfigError(f"{where}: unknown key {raw_key!r}; allowed keys: {allowed}")
        kwargs[key] = _coerce(value, types_[key], f"{where}.{raw_key}")
    return cls(**kwargs)


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested tables into dotted keys, as Flower does for the run config."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def load_config(
    values: Mapping[str, Any] | None = None, *, path: str | Path | None = None, ignore: tuple[str, ...] = ()
) -> FedabusConfig:
    """Build a :class:`FedabusConfig` from a TOML file and/or a (flat dotted or nested) mapping.

    ``values`` override the file. Top-level keys listed in ``ignore`` (e.g. Flower's own ``num-server-rounds``)
    are skipped; any other key outside a known section is an error.
    """
    flat: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            flat.update(flatten(tomllib.loads(path.read_text(encoding="utf-8"))))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if values:
        flat.update(flatten(values))
    per_section: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in flat.items():
        section, _, rest = key.partition(".")
        if key in ignore or section in ignore:
            continue
        if not rest or section not in per_section:
            raise ConfigError(
                f"{where}: unknown key {key!r}; keys start with one of: {', '.join(sorted(per_section))}"
            )
        per_section[section][rest] = value
    built = {
        name: section_from_mapping(_SECTIONS[name], vals, where=f"{where} [{name}]")
        for name, vals in per_section.items()
    }
    return FedabusConfig(**built)


#: Run-config keys that are Flower's own, not fedabus sections.
FLOWER_KEYS: tuple[str, ...] = ("num-server-rounds",)


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` options of the command line as a flat mapping (values parsed as TOML scalars, else
    kept as strings); raises SystemExit naming an option that is not ``KEY=VALUE``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.seg-lr=1e-3")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def load_run_config(run_config: Mapping[str, Any]) -> FedabusConfig:
    """The config of a ServerApp or ClientApp process, from Flower's run config (``context.run_config``).

    Flower's own keys (:data:`FLOWER_KEYS`) are skipped, and ``train.progress`` is turned off whatever the run
    config says: every round starts fresh app processes whose output ends up in one log (the SuperNode's, the
    simulation's or ``flwr run --stream``), where progress bars are only noise.
    """
    config = load_config(dict(run_config), ignore=FLOWER_KEYS)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, progress=False))


def to_flat_dict(config: Any) -> dict[str, Any]:
    """Flat dotted, dash-separated view of a config (for logging as MLflow params or run config)."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        key = f.name.replace("_", "-")
        if dataclasses.is_dataclass(value):
            out.update({f"{key}.{k}": v for k, v in to_flat_dict(value).items()})
        else:
            out[key] = value
    return out


_SECTIONS = {f.name: typing.get_type_hints(FedabusConfig)[f.name] for f in fields(FedabusConfig)}


# ---------------------------------------------------------------- site configuration (sites/<name>.toml)

#: Split names a site may use, after normalisation.
SPLITS: tuple[str, ...] = (TRAIN, VAL, TEST)


@dataclass(frozen=True)
class SiteConfig:
    """How to read one site's data folder (``sites/<name>.toml``, table ``[site]``; see sites/README.md).

    Overrides replace what the file headers say, for every image and mask of the site, when a volume is
    read.
    """

    #: Site name shown in reports; empty means the name of the site folder.
    name: str = ""
    #: Voxel spacing override (mm) in array order (z, y, x) = SimpleITK axes (2, 1, 0); 0 keeps the header.
    spacing_z: float = 0.0
    spacing_y: float = 0.0
    spacing_x: float = 0.0
    #: Direction override: empty keeps the header; a 3-letter DICOM (LPS-based) code such as ``LPS`` or
    #: ``RAS`` (the anatomical direction each of the axes x, y, z points to, as SimpleITK's DICOMOrient uses
    #: it), or 9 numbers (row-major 3×3 direction matrix, SimpleITK ``GetDirection`` order) separated by
    #: commas or spaces.
    orientation: str = ""
    #: Split for every case (``train``, ``val`` or ``test``); empty takes it from the CSV's ``split`` column
    #: or, in the TDSC layout, from the folder name (Train/Validation/Test).
    split: str = ""
    #: CSV with columns ``case_id, split`` overriding the split of the cases it lists (wins over ``split``).
    #: Relative paths are resolved against the TOML file's folder (the site folder if not from a file).
    split_file: str = ""
    #: This site's own LoRA rank (the same setting as the node config's ``lora-rank``; give it in one place):
    #: 0 trains at the run's ``adapter.lora-rank``; another rank needs ``federation.lora-aggregation = product``
    #: (docs/training.md, "Heterogeneous ranks"). In simulation the site TOML is the only way to give one.
    lora_rank: int = 0

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"site config: lora-rank = {self.lora_rank!r} must be >= 0 (0: the run's rank)")
        for axis in ("z", "y", "x"):
            value = getattr(self, f"spacing_{axis}")
            if not value >= 0.0 or value == float("inf"):
                raise ConfigError(f"site config: spacing-{axis} = {value!r} must be finite and >= 0 (mm)")
        if self.split and self.split.strip().lower() not in SPLITS:
            raise ConfigError(f"site config: split = {self.split!r}; allowed: {', '.join(SPLITS)} or empty")
        self.direction_override()  # raises ConfigError when orientation does not parse

    def spacing_override_xyz(self) -> tuple[float, float, float]:
        """Spacing override (mm) in SimpleITK (x, y, z) order; 0 on an axis keeps the header value."""
        return (self.spacing_x, self.spacing_y, self.spacing_z)

    def direction_override(self) -> tuple[float, ...] | None:
        """Direction override as 9 floats (row-major, SimpleITK order), or None to keep the header."""
        text = self.orientation.strip()
        if not text:
            return None
        if text.isalpha():
            return _direction_from_code(text.upper())
        parts = text.replace(",", " ").replace("[", " ").replace("]", " ").split()
        try:
            numbers = tuple(float(p) for p in parts)
        except ValueError:
            numbers = ()
        if len(numbers) != 9:
            raise ConfigError(
                f"site config: orientation = {self.orientation!r}; give a 3-letter code such as 'LPS' or 9 "
                "numbers (row-major direction matrix)"
            )
        return numbers


def _direction_from_code(code: str) -> tuple[float, ...]:
    pairs = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}
    axes = [{"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}.get(c) for c in code]
    if len(code) != 3 or None in axes or len(set(axes)) != 3:
        raise ConfigError(
            f"site config: orientation = {code!r} is not a 3-letter code using one of each pair "
            f"{', '.join(f'{a}/{b}' for a, b in pairs.items() if a < b)} (e.g. 'LPS', 'RAS')"
        )
    # DICOM/LPS convention (as SimpleITK's DICOMOrientImageFilter): letter i is where image axis i points.
    matrix = [[0.0] * 3 for _ in range(3)]
    for column, letter in enumerate(code):
        row = axes[column]
        matrix[row][column] = 1.0 if letter in "LPS" else -1.0
    return tuple(v for row in matrix for v in row)


def load_site_config(path: str | Path) -> SiteConfig:
    """Read a site TOML file: keys of its ``[site]`` table (or top-level keys when there is no such table).

    A relative ``split-file`` is resolved against the TOML file's folder. Raises ConfigError naming the file
    and the key when the file is missing, not TOML, or holds an unknown or invalid key.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: site config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read site config: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    table = document.get("site", document)
    if not isinstance(table, Mapping):
        raise ConfigError(f"{path}: 'site' must be a table ([site]), got {type(table).__name__}")
    values = {k: (", ".join(str(x) for x in v) if isinstance(v, list) else v) for k, v in table.items()}
    split_file = str(values.get("split-file", values.get("split_file", ""))).strip()
    if split_file and not Path(split_file).is_absolute():
        values.pop("split_file", None)
        values["split-file"] = str((path.parent / split_file).resolve())
    try:
        return section_from_mapping(SiteConfig, values, where=f"{path} [site]")
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
