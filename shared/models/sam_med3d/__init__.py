"""SAM-Med3D (uni-medical/SAM-Med3D ``vit_b_ori``) re-implemented with the official names and numerics.

Split like ``segment_anything/modeling``: image encoder, prompt encoder, mask decoder, two-way transformer,
and the ``Sam3D`` wrapper; :func:`build_sam_med3d` is the builder.
"""

from .build import (
    PRESETS,
    CheckpointError,
    build_sam_med3d,
    load_state_dict_strict,
    read_checkpoint,
    resolve_config,
)
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .sam3d import Sam3D

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ImageEncoderViT3D",
    "MaskDecoder3D",
    "PromptEncoder3D",
    "Sam3D",
    "build_sam_med3d",
    "load_state_dict_strict",
    "read_checkpoint",
    "resolve_config",
]
