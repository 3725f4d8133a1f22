"""Build SAM-Med3D from the official constructor arguments and load checkpoints strictly.

``build_sam_med3d(config)`` takes the keys of the ``config`` dict of ../shared/reference/sam_med3d_fixture_small.pt
(the official constructor arguments). Presets: ``vit_b_ori`` (the official full-size model behind
``sam_med3d_turbo.pth``) and ``small`` (same architecture, sized for CPU tests and demos: 64³ crops, patch 8,
the same 8³ token grid).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from shared.tensor_files import describe_mismatch

from .common import activation_from_name
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .sam3d import Sam3D

__all__ = [
    "PRESETS",
    "CheckpointError",
    "build_sam_med3d",
    "load_state_dict_strict",
    "read_checkpoint",
    "resolve_config",
]

_VIT_B_ORI: dict[str, Any] = {
    "img_size": 128,
    "patch_size": 16,
    "in_chans": 1,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "norm_layer": "LayerNorm",
    "norm_eps": 1e-6,
    "act_layer": "GELU",
    "use_abs_pos": True,
    "use_rel_pos": True,
    "rel_pos_zero_init": True,
    "window_size": 14,
    "global_attn_indexes": [2, 5, 8, 11],
    "out_chans": 384,
    "prompt_embed_dim": 384,
    "image_embedding_size": [8, 8, 8],
    "input_image_size": [128, 128, 128],
    "mask_in_chans": 16,
    "prompt_mask_activation": "GELU",
    "pe_num_pos_feats": 128,
    "pe_scale": 1.0,
    "num_point_embeddings": 2,
    "transformer_dim": 384,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
    "mask_decoder_upscaling_activation": "GELU",
    "decoder_transformer_activation": "ReLU",
    "decoder_transformer_depth": 2,
    "decoder_transformer_mlp_dim": 2048,
    "decoder_transformer_num_heads": 8,
    "decoder_attention_downsample_rate": 2,
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
}

_SMALL = {
    **_VIT_B_ORI,
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 4,
    "global_attn_indexes": [1, 3],
    "out_chans": 48,
    "prompt_embed_dim": 48,
    "input_image_size": [64, 64, 64],
    "pe_num_pos_feats": 16,
    "transformer_dim": 48,
    "iou_head_hidden_dim": 32,
    "decoder_transformer_mlp_dim": 256,
}

#: Named configurations. ``vit_b_ori`` is the official model; ``small`` is for CPU tests and demos.
PRESETS: dict[str, dict[str, Any]] = {"vit_b_ori": _VIT_B_ORI, "small": _SMALL}

#: Keys of the fixture's config that describe provenance, not architecture.
_INFORMATIONAL = {"seed", "init", "builder", "perturb_std_zero_init", "perturb_std_layernorm", "token_grid"}


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names the file and the first offending keys."""


def resolve_config(config: str | Mapping[str, Any]) -> dict[str, Any]:
    """A full constructor config from a preset name or a dict (missing keys taken from ``vit_b_ori``)."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown SAM-Med3D preset {config!r}; expected one of {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[config])
    unknown = set(config) - set(_VIT_B_ORI) - _INFORMATIONAL
    if unknown:
        raise ValueError(f"unknown SAM-Med3D config keys: {sorted(unknown)}")
    return {**copy.deepcopy(_VIT_B_ORI), **{k: v for k, v in config.items() if k not in _INFORMATIONAL}}


def _check_config(cfg: Mapping[str, Any]) -> None:
    grid = cfg["img_size"] // cfg["patch_size"]
    if tuple(cfg["image_embedding_size"]) != (grid, grid, grid):
        raise ValueError(
            f"image_embedding_size {cfg['image_embedding_size']} must equal img_size/patch_size = {grid} per axis"
        )
    if tuple(cfg["input_image_size"]) != (cfg["img_size"],) * 3:
        raise ValueError(f"input_image_size {cfg['input_image_size']} must equal img_size {cfg['img_size']}")
    if cfg["out_chans"] != cfg["prompt_embed_dim"] or cfg["transformer_dim"] != cfg["prompt_embed_dim"]:
        raise ValueError("out_chans, prompt_embed_dim and transformer_dim must be equal")
    if cfg["norm_layer"] != "LayerNorm":
        raise ValueError(f"norm_layer {cfg['norm_layer']!r} is not supported (only LayerNorm)")
    if cfg["embed_dim"] % cfg["num_heads"]:
        raise ValueError(f"num_heads {cfg['num_heads']} must divide embed_dim {cfg['embed_dim']}")


def build_sam_med3d(config: str | Mapping[str, Any] = "vit_b_ori", *, attention_impl: str = "fast") -> Sam3D:
    """Build SAM-Med3D with random (official default) initialisation.

    Args:
        config: a preset name or a dict of official constructor arguments (the fixture's ``config`` keys).
        attention_impl: ``reference`` or ``fast`` for the windowed encoder blocks (same parameters).
    """
    cfg = resolve_config(config)
    _check_config(cfg)
    image_encoder = ImageEncoderViT3D(
        img_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        in_chans=cfg["in_chans"],
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        out_chans=cfg["out_chans"],
        qkv_bias=cfg["qkv_bias"],
        norm_eps=cfg["norm_eps"],
        act_layer=activation_from_name(cfg["act_layer"]),
        use_abs_pos=cfg["use_abs_pos"],
        use_rel_pos=cfg["use_rel_pos"],
        window_size=cfg["window_size"],
        global_attn_indexes=tuple(cfg["global_attn_indexes"]),
        attention_impl=attention_impl,
    )
    prompt_encoder = PromptEncoder3D(
        embed_dim=cfg["prompt_embed_dim"],
        image_embedding_size=tuple(cfg["image_embedding_size"]),
        input_image_size=tuple(cfg["input_image_size"]),
        mask_in_chans=cfg["mask_in_chans"],
        activation=activation_from_name(cfg["prompt_mask_activation"]),
        num_pos_feats=cfg["pe_num_pos_feats"],
        pe_scale=cfg["pe_scale"],
        num_point_embeddings=cfg["num_point_embeddings"],
    )
    mask_decoder = MaskDecoder3D(
        transformer_dim=cfg["transformer_dim"],
        num_multimask_outputs=cfg["num_multimask_outputs"],
        activation=activation_from_name(cfg["mask_decoder_upscaling_activation"]),
        iou_head_depth=cfg["iou_head_depth"],
        iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        transformer_depth=cfg["decoder_transformer_depth"],
        transformer_mlp_dim=cfg["decoder_transformer_mlp_dim"],
        transformer_num_heads=cfg["decoder_transformer_num_heads"],
        transformer_activation=activation_from_name(cfg["decoder_transformer_activation"]),
        attention_downsample_rate=cfg["decoder_attention_downsample_rate"],
    )
    model = Sam3D(
        image_encoder, prompt_encoder, mask_decoder, tuple(cfg["pixel_mean"]), tuple(cfg["pixel_std"])
    )
    model.sam_config = cfg  # kept for manifests and rebuilding
    return model


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, an official ``.pth`` (``model_state_dict`` inside) or a plain one.

    ``.pth`` files are opened with ``weights_only=True``. Some official checkpoints also pickle training
    objects; those need ``trust_pickle=True`` (runs pickle code: only for files from a source you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except Exception as exc:
        hint = (
            "" if trust_pickle else " If you trust this file, retry with trust_pickle (--trust-checkpoint)."
        )
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc}).{hint}"
        ) from None
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: does not hold a state dict of tensors (nor one under 'model_state_dict')"
        )
    return dict(obj)


def load_state_dict_strict(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "state dict",
    max_names: int = 5,
    assign: bool = False,
) -> None:
    """Load ``state_dict`` into ``model`` requiring identical names and shapes.

    ``assign``: take the given tensors as the model's (``nn.Module.load_state_dict(assign=True)``; no copy, for
    a model built on the ``meta`` device); a tensor of another dtype than the model's is converted first.
    Raises CheckpointError naming ``source`` and the first missing, unexpected and mis-shaped entries.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = describe_mismatch(
        expected, {k: tuple(v.shape) for k, v in state_dict.items()}, max_names=max_names
    )
    if problems:
        raise CheckpointError(f"{source} does not fit this SAM-Med3D configuration: " + "; ".join(problems))
    if assign:
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        state_dict = {k: v if v.dtype == dtypes[k] else v.to(dtypes[k]) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)
