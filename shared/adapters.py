"""The one adapter format of fedabus: the only model state that ever leaves a site.

Just over 500 lines on purpose: the adapter format is one concept (the engineering rule "one adapter format"),
and every way a model becomes an adapter and back is defined here.

An adapter is a flat dict of float32 tensors whose names carry the model as a prefix — ``seg.`` for SAM-Med3D,
``cls.`` for the tri-plane classifier — followed by the parameter name in the un-wrapped base model, e.g.
``seg.image_encoder.blocks.0.attn.qkv.lora_A.weight`` or ``seg.mask_decoder.iou_token.weight``. It holds the PEFT
adapter's tensors (``adapter.method``: LoRA's ``lora_A``/``lora_B``, DoRA's also ``lora_magnitude_vector``, LoHa's
``hada_*``, LoKr's ``lokr_*``) and the parameters of the fully trained submodules, nothing else.

With an automatic ``model.seg-model`` (``segresnet``, ``dynunet2d``, ``u2net-lite``) the ``seg.`` part is
instead every parameter of the fully automatic segmenter (``seg.net.…``, :mod:`shared.models.auto_seg`), and
the manifest records its :class:`AutoSegSpec` (``method = "full"``) where a PEFT config would be: same format,
same checks.

On disk an adapter is ``NAME.safetensors`` plus ``NAME.json``, a manifest with the tensor names, shapes and
dtypes, the PEFT config of each model (:meth:`LoraSpec.describe`), the fingerprints of the frozen base weights it
was trained on, the fedabus version and the sha256 of the tensor file. Applying an adapter to a base with another
fingerprint, to a model wrapped with another PEFT config, or with other names or shapes, raises
:class:`AdapterMismatchError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shared import __version__
from shared.atomic import atomic_write
from shared.config import ADAPTER_METHODS, SEG_TARGETS, AdapterConfig, FedabusConfig
from shared.models.auto_seg import AutoSegSpec, build_auto_segmenter, parse_blocks
from shared.tensor_files import describe_mismatch, pair_paths

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = [
    "ADAPTER_FORMAT",
    "Adapter",
    "AdapterError",
    "AdapterMismatchError",
    "LoraSpec",
    "METHOD_OPTIONS",
    "adapter_parameters",
    "apply_adapter",
    "attach_lora",
    "attach_spec",
    "model_specs",
    "check_names_and_shapes",
    "extract_adapter",
    "ffa_lora_a",
    "fingerprint_state_dict",
    "is_lora_a",
    "load_adapter",
    "lora_specs_from_config",
    "recorded_configs",
    "seg_targets",
    "save_adapter",
    "set_ffa_lora_a",
    "spec_from_manifest",
]

ADAPTER_FORMAT = "fedabus-adapter"
FORMAT_VERSION = 1
_PEFT_PREFIX = "base_model.model."
_ADAPTER_NAME = "default"


class AdapterError(ValueError):
    """An adapter file is unreadable, corrupt or inconsistent with its manifest."""


class AdapterMismatchError(AdapterError):
    """An adapter does not fit the model it is applied to (base fingerprint, PEFT config, names or shapes)."""


#: The PEFT options each ``adapter.method`` passes besides rank, alpha, dropout and targets. Fixed here (not
#: PEFT's defaults, which may change between versions) and recorded in every manifest.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "lora": {"use_dora": False},
    "dora": {"use_dora": True},
    "loha": {"use_effective_conv2d": False, "rank_dropout": 0.0, "module_dropout": 0.0},
    "lokr": {
        "use_effective_conv2d": False,
        "decompose_both": False,
        "decompose_factor": -1,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
    },
}


@dataclass(frozen=True)
class LoraSpec:
    """How one model is adapted: a PEFT adapter of kind ``method`` (``lora``, ``dora``, ``loha`` or ``lokr``) on
    the modules matching ``targets`` (a regex over full module names, matched in full), plus the submodules in
    ``trainable`` trained entirely."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    targets: str = r"image_encoder\.blocks\.\d+\.attn\.qkv"
    trainable: tuple[str, ...] = ("prompt_encoder", "mask_decoder")
    method: str = "lora"

    def __post_init__(self) -> None:
        if self.method not in ADAPTER_METHODS:
            raise ValueError(f"adapter method {self.method!r}; allowed: {', '.join(ADAPTER_METHODS)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.dropout and self.method not in ("lora", "dora"):
            raise ValueError(f"dropout is for lora and dora only; {self.method!r} needs dropout 0")
        re.compile(self.targets)

    @property
    def scaling(self) -> float:
        """PEFT's scaling ``alpha / rank`` (every method): LoRA computes ``W x + scaling · B A x``."""
        return self.alpha / self.rank

    def describe(self) -> dict[str, Any]:
        """The PEFT config as the manifest records it (JSON types): the fields and the method's options."""
        return {
            **asdict(self),
            "trainable": list(self.trainable),
            "options": dict(METHOD_OPTIONS[self.method]),
        }

    def peft_config(self) -> Any:
        """The PEFT config object (``LoraConfig``, ``LoHaConfig`` or ``LoKrConfig``) that applies this spec."""
        # imported here: PEFT imports transformers (seconds)
        from peft import LoHaConfig, LoKrConfig, LoraConfig

        options = METHOD_OPTIONS[self.method]
        if self.method in ("lora", "dora"):
            return LoraConfig(
                r=self.rank,
                lora_alpha=self.alpha,
                lora_dropout=self.dropout,
                target_modules=self.targets,
                bias="none",
                **options,
            )
        config = LoHaConfig if self.method == "loha" else LoKrConfig
        return config(r=self.rank, alpha=self.alpha, target_modules=self.targets, **options)


def recorded_configs(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Model prefix -> the PEFT config an adapter manifest records (:meth:`LoraSpec.describe`); a manifest written
    before ``adapter.method`` existed records ``lora`` settings without method and options, read as LoRA's."""
    entries = manifest.get("peft", manifest.get("lora")) or {}
    legacy = {"method": "lora", "options": dict(METHOD_OPTIONS["lora"])}
    return {prefix: {**legacy, **entry} for prefix, entry in entries.items() if entry is not None}


def spec_from_manifest(entry: Mapping[str, Any]) -> LoraSpec | AutoSegSpec:
    """The :class:`LoraSpec` of one entry of :func:`recorded_configs` (its ``options`` follow from the method;
    :func:`apply_adapter` refuses the adapter if the recorded ones differ), or the :class:`AutoSegSpec` of an
    automatic segmenter's entry (``method = "full"``)."""
    if entry.get("method") == "full":
        default = AutoSegSpec()
        return AutoSegSpec(
            kind=str(entry["segmenter"]),
            init_filters=int(entry["init_filters"]),
            blocks_down=tuple(int(b) for b in entry.get("blocks_down", default.blocks_down)),
            levels=int(entry.get("levels", default.levels)),
            trainable=tuple(entry.get("trainable", ("net",))),
        )
    fields = {k: v for k, v in entry.items() if k != "options"}
    return LoraSpec(**{**fields, "trainable": tuple(fields.get("trainable", ()))})


def lora_specs_from_config(config: AdapterConfig) -> dict[str, LoraSpec]:
    """The ``seg`` and ``cls`` specs described by the ``[adapter]`` config section: the server and every site
    build their adapters from these (same run config, same structure)."""

    def names(csv: str) -> tuple[str, ...]:
        return tuple(n.strip() for n in csv.split(",") if n.strip())

    common = {
        "rank": config.lora_rank,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "method": config.method,
    }
    return {
        "seg": LoraSpec(**common, targets=seg_targets(config), trainable=names(config.seg_trainable)),
        "cls": LoraSpec(**common, targets=config.cls_lora_targets, trainable=names(config.cls_trainable)),
    }


def model_specs(config: FedabusConfig, *, lora_rank: int | None = None) -> dict[str, LoraSpec | AutoSegSpec]:
    """The ``seg`` and ``cls`` specs of a whole config: :func:`lora_specs_from_config` of ``[adapter]`` (at
    ``lora_rank`` when given: a site's own rank), with ``seg`` the :class:`AutoSegSpec` of ``model.seg-model``
    when that is an automatic segmenter. Server, sites, ``train-local`` and the study build from this."""
    adapter = config.adapter if lora_rank is None else replace(config.adapter, lora_rank=lora_rank)
    specs: dict[str, LoraSpec | AutoSegSpec] = dict(lora_specs_from_config(adapter))
    if config.automatic_seg:
        model = config.model
        specs["seg"] = AutoSegSpec(
            kind=model.seg_model,
            init_filters=model.auto_init_filters,
            blocks_down=parse_blocks(model.auto_blocks_down),
            levels=model.dynunet_levels,
        )
    return specs


def attach_spec(model: nn.Module, spec: LoraSpec | AutoSegSpec) -> nn.Module:
    """The trainable model of ``spec``: ``model`` wrapped by :func:`attach_lora` for a :class:`LoraSpec`, or a new
    automatic segmenter (:func:`~shared.models.auto_seg.build_auto_segmenter`, drawn from torch's generator,
    ``model`` unused) for an :class:`AutoSegSpec`."""
    if isinstance(spec, AutoSegSpec):
        return build_auto_segmenter(spec)
    return attach_lora(model, spec)


def seg_targets(config: AdapterConfig) -> str:
    """The regex of the SAM-Med3D modules ``adapter.targets`` names (``qkv`` alone gives the regex used before
    ``adapter.targets`` existed, so LoRA manifests from then still match)."""
    parts = [SEG_TARGETS[name] for name in config.target_names()]
    tail = parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"
    return r"image_encoder\.blocks\.\d+\." + tail


def attach_lora(model: nn.Module, spec: LoraSpec) -> PeftModel:
    """Wrap a base model (weights already loaded) with the PEFT adapter of ``spec.method``; only adapter
    parameters (and the ``trainable`` submodules) require grad.

    Raises ValueError when the target regex matches no module or a trainable submodule does not exist.
    """
    matched = [name for name, _ in model.named_modules() if name and re.fullmatch(spec.targets, name)]
    if not matched:
        raise ValueError(f"LoRA target regex {spec.targets!r} matches no module of {type(model).__name__}")
    for name in spec.trainable:
        model.get_submodule(name)  # raises AttributeError naming the missing module
    from peft import get_peft_model

    peft_model = get_peft_model(model, spec.peft_config())
    base = peft_model.get_base_model()
    for name in spec.trainable:
        base.get_submodule(name).requires_grad_(True)
    peft_model.fedabus_lora_spec = spec
    return peft_model


def _canonical_name(peft_name: str) -> str:
    """PEFT parameter name -> name in the un-wrapped model (``...qkv.lora_A.default.weight`` ->
    ``...qkv.lora_A.weight``; LoHa/LoKr keep their tensors in parameter dicts: ``...qkv.hada_w1_a.default`` ->
    ``...qkv.hada_w1_a``)."""
    name = peft_name.removeprefix(_PEFT_PREFIX).removesuffix(f".{_ADAPTER_NAME}")
    return name.replace(f".{_ADAPTER_NAME}.", ".")


def adapter_parameters(peft_model: PeftModel) -> dict[str, nn.Parameter]:
    """The trainable parameters of a wrapped model under their canonical adapter names (without prefix)."""
    return {
        _canonical_name(name): param for name, param in peft_model.named_parameters() if param.requires_grad
    }


def is_lora_a(name: str) -> bool:
    """Whether an adapter tensor is a LoRA ``A`` matrix (``...lora_A.weight``)."""
    return ".lora_A." in name


def ffa_lora_a(name: str, shape: tuple[int, ...], *, seed: int, base_fingerprint: str) -> torch.Tensor:
    """The frozen LoRA ``A`` of ``federation.lora-aggregation = ffa`` for adapter tensor ``name`` (full name, with
    model prefix): a pure function of the name, the shape, ``train.seed`` and the model's base fingerprint, so the
    server and every site hold the same ``A`` without sending it.

    Drawn like PEFT's own initialisation (Kaiming-uniform with ``a = sqrt(5)``: uniform in ±1/sqrt(fan_in), fan_in
    the product of ``shape[1:]``) from a CPU generator seeded with sha256 of the four inputs; float32, CPU.
    """
    key = f"{base_fingerprint}|{seed}|{name}|{tuple(shape)}".encode()
    generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    bound = 1.0 / max(1, math.prod(shape[1:])) ** 0.5
    return (torch.rand(tuple(shape), generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def set_ffa_lora_a(
    models: Mapping[str, PeftModel], *, seed: int, base_fingerprints: Mapping[str, str], freeze: bool
) -> None:
    """Set every LoRA ``A`` of wrapped models to :func:`ffa_lora_a`; with ``freeze`` it no longer trains
    (``requires_grad`` False), so :func:`extract_adapter` and :func:`apply_adapter` leave it out."""
    for prefix, model in models.items():
        for peft_name, param in model.named_parameters():
            name = f"{prefix}.{_canonical_name(peft_name)}"
            if not is_lora_a(name):
                continue
            value = ffa_lora_a(
                name, tuple(param.shape), seed=seed, base_fingerprint=base_fingerprints[prefix]
            )
            with torch.no_grad():
                param.copy_(value.to(param.device, param.dtype))
            if freeze:
                param.requires_grad_(False)


@dataclass
class Adapter:
    """A flat adapter: ``tensors`` (name -> float32 CPU tensor) and its ``manifest`` (JSON-serialisable)."""

    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def describe(self) -> list[dict[str, Any]]:
        """Names, shapes and dtypes in sorted name order (what the manifest lists)."""
        return [
            {
                "name": k,
                "shape": list(self.tensors[k].shape),
                "dtype": str(self.tensors[k].dtype).split(".")[-1],
            }
            for k in sorted(self.tensors)
        ]


def extract_adapter(
    models: Mapping[str, PeftModel],
    *,
    base_fingerprints: Mapping[str, str],
    metadata: Mapping[str, Any] | None = None,
) -> Adapter:
    """Collect the adapter of wrapped models (``{"seg": ..., "cls": ...}``) as one flat float32 dict."""
    tensors: dict[str, torch.Tensor] = {}
    peft: dict[str, Any] = {}
    for prefix, peft_model in models.items():
        for name, param in adapter_parameters(peft_model).items():
            tensors[f"{prefix}.{name}"] = param.detach().to("cpu", torch.float32).clone()
        spec = getattr(peft_model, "fedabus_lora_spec", None)
        peft[prefix] = spec.describe() if spec is not None else None
    missing = set(models) - set(base_fingerprints)
    if missing:
        raise ValueError(f"no base fingerprint given for model(s) {sorted(missing)}")
    adapter = Adapter(tensors)
    adapter.manifest = {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "fedabus_version": __version__,
        "models": sorted(models),
        "base_fingerprint": {k: base_fingerprints[k] for k in sorted(models)},
        "peft": peft,
        "num_parameters": adapter.num_parameters,
        "tensors": adapter.describe(),
        "metadata": dict(metadata or {}),
    }
    return adapter


def apply_adapter(
    models: Mapping[str, PeftModel], adapter: Adapter, *, base_fingerprints: Mapping[str, str]
) -> None:
    """Copy an adapter's tensors into wrapped models, after checking base fingerprints, the PEFT config (when the
    manifest records one: saved adapters do, the packed adapters of a round carry only tensors, built by server and
    sites from one run config), names and shapes."""
    expected_fp = adapter.manifest.get("base_fingerprint", {})
    recorded = recorded_configs(adapter.manifest)
    for prefix, model in models.items():
        want, have = expected_fp.get(prefix), base_fingerprints.get(prefix)
        if want != have:
            raise AdapterMismatchError(
                f"adapter for '{prefix}' was trained on base {want}, but this base is {have}; "
                "every site must hold the same frozen base checkpoint"
            )
        spec = getattr(model, "fedabus_lora_spec", None)
        theirs, ours = (_segmenter(e) for e in (recorded.get(prefix, {}), spec.describe() if spec else {}))
        if prefix in recorded and spec is not None and theirs != ours:
            raise AdapterMismatchError(
                f"adapter for '{prefix}' is of the segmenter {theirs!r}, this model is {ours!r}: the server and "
                "every site must use the same model.seg-model"
            )
        if prefix in recorded and spec is not None and recorded[prefix] != spec.describe():
            raise AdapterMismatchError(
                f"adapter for '{prefix}' was made with PEFT config {_differences(recorded[prefix], spec.describe())}"
                "; the server and every site must use the same [adapter] settings"
            )
    targets = {
        f"{prefix}.{name}": param
        for prefix, model in models.items()
        for name, param in adapter_parameters(model).items()
    }
    check_names_and_shapes(adapter.tensors, {k: tuple(p.shape) for k, p in targets.items()}, what="adapter")
    with torch.no_grad():
        for name, param in targets.items():
            param.copy_(adapter.tensors[name].to(param.device, param.dtype))


def _segmenter(entry: Mapping[str, Any]) -> str:
    """The ``model.seg-model`` of a manifest entry: its ``segmenter`` (an automatic one), else ``sam-med3d``."""
    return str(entry.get("segmenter", "sam-med3d"))


def _differences(adapter: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    """``method='dora', rank=8, but this model's is method='lora', rank=4``: the keys on which they differ."""
    keys = [k for k in sorted(adapter.keys() | model.keys()) if adapter.get(k) != model.get(k)]
    ours = ", ".join(f"{k}={adapter.get(k)!r}" for k in keys)
    theirs = ", ".join(f"{k}={model.get(k)!r}" for k in keys)
    return f"{ours}, but this model's is {theirs}"


def check_names_and_shapes(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    max_names: int = 5,
) -> None:
    """Raise AdapterMismatchError listing the first missing, unexpected and mis-shaped names."""
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = describe_mismatch(
        dict(sorted(expected.items())), dict(sorted(found.items())), max_names=max_names
    )
    if problems:
        raise AdapterMismatchError(f"{what} does not fit the model: " + "; ".join(problems))


def fingerprint_state_dict(
    state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> str:
    """``sha256:<hex>`` over names, dtypes, shapes and bytes of the tensors, in sorted name order.

    Contiguous CPU tensors are hashed in place (no second copy of the model is held); other tensors are made
    contiguous on the CPU one at a time.
    """
    items = sorted(
        state_dict.items() if isinstance(state_dict, Mapping) else state_dict, key=lambda kv: kv[0]
    )
    digest = hashlib.sha256()
    for name, tensor in items:
        t = tensor.detach()
        digest.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        if t.device.type != "cpu" or not t.is_contiguous():
            t = t.to("cpu").contiguous()
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return f"sha256:{digest.hexdigest()}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_adapter(adapter: Adapter, path: str | Path) -> tuple[Path, Path]:
    """Write ``NAME.safetensors`` and ``NAME.json`` atomically; returns both paths.

    The manifest records the sha256 of the tensor file, so a torn or edited pair is detected on load.
    """
    from safetensors.torch import save_file

    tensor_path, manifest_path = pair_paths(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.tensors.items()}
    atomic_write(tensor_path, lambda p: save_file(tensors, str(p), metadata={"format": ADAPTER_FORMAT}))
    manifest = {
        **adapter.manifest,
        "tensors": Adapter(tensors).describe(),
        "num_parameters": adapter.num_parameters,
        "sha256": _sha256_file(tensor_path),
        "tensor_file": tensor_path.name,
        "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=1) + "\n"))
    return tensor_path, manifest_path


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter pair; verifies format, checksum, and that tensors match the manifest exactly."""
    from safetensors.torch import load_file

    tensor_path, manifest_path = pair_paths(path)
    for p in (tensor_path, manifest_path):
        if not p.is_file():
            raise AdapterError(f"{p}: adapter file not found")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{manifest_path}: manifest is not valid JSON ({exc})") from None
    if manifest.get("format") != ADAPTER_FORMAT:
        raise AdapterError(
            f"{manifest_path}: not a fedabus adapter manifest (format={manifest.get('format')!r})"
        )
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(
            f"{manifest_path}: format version {manifest['format_version']} is newer than supported"
        )
    if manifest.get("sha256") != _sha256_file(tensor_path):
        raise AdapterError(f"{tensor_path}: checksum differs from {manifest_path.name}; the pair is corrupt")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise AdapterError(f"{tensor_path}: unreadable safetensors file ({exc})") from None
    adapter = Adapter(tensors, manifest)
    if adapter.describe() != manifest.get("tensors"):
        raise AdapterError(
            f"{tensor_path}: tensors differ from the names/shapes/dtypes listed in {manifest_path.name}"
        )
    return adapter
