"""The SAM-Med3D model: image encoder + prompt encoder + mask decoder (official ``Sam3D`` names)."""

from __future__ import annotations

import torch
from torch import nn

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D

__all__ = ["Sam3D"]


class Sam3D(nn.Module):
    """Holds the three parts under the official attribute names, so the official state dict loads strictly.

    ``pixel_mean`` / ``pixel_std`` are kept as non-persistent buffers like the original (unused: fedabus
    normalises intensities in its data pipeline).
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self._pixel_stats = (tuple(pixel_mean), tuple(pixel_std))
        self.reset_non_persistent_buffers()

    def reset_non_persistent_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the buffers that the state dict does not hold (``pixel_mean``, ``pixel_std``), on
        ``device`` (default: the current default device). A model built on the ``meta`` device and given its
        weights with ``load_state_dict(assign=True)`` calls this with its real device."""
        mean, std = self._pixel_stats
        self.register_buffer("pixel_mean", torch.tensor(mean, device=device).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, device=device).view(-1, 1, 1), persistent=False)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        mask_logits: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt round on precomputed embeddings.

        Args:
            image_embeddings: (B, C, G, G, G) from ``image_encoder``.
            points: coords (B, N, 3) voxel indices in (D, H, W) order of the crop, labels (B, N) in {0, 1}.
            mask_logits: previous low-resolution logits (B, 1, 4G, 4G, 4G) or None.

        Returns:
            low-resolution mask logits (B, 1, 4G, 4G, 4G) and IoU predictions (B, 1).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=None, masks=mask_logits)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
