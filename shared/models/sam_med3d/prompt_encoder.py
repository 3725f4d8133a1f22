"""SAM-Med3D prompt encoder (official ``PromptEncoder3D``): clicks and a low-resolution mask prompt.

Point coordinates are voxel indices (i0, i1, i2) along the (D, H, W) axes of the (B, 1, D, H, W) image crop.
The dense positional grid of :meth:`PromptEncoder3D.get_dense_pe` swaps axes 0 and 1 relative to that order —
the official, trained convention, reproduced as is (see ../shared/reference/FIXTURES.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm3d

__all__ = ["PositionEmbeddingRandom3D", "PromptEncoder3D"]


class PositionEmbeddingRandom3D(nn.Module):
    """Random-Fourier positional encoding; the Gaussian matrix (3, F) is a saved buffer from the checkpoint."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (..., 3) normalised to [0, 1] -> (..., 3F) as [sin, cos, sin] (the official layout)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Dense encoding (3F, X, Y, Z) of a grid; cell [a0, a1, a2] encodes ((a1+.5)/X, (a0+.5)/Y, (a2+.5)/Z)."""
        x, y, z = size
        grid = torch.ones(
            (x, y, z), device=self.positional_encoding_gaussian_matrix.device, dtype=torch.float32
        )
        y_embed = (grid.cumsum(dim=0) - 0.5) / y
        x_embed = (grid.cumsum(dim=1) - 0.5) / x
        z_embed = (grid.cumsum(dim=2) - 0.5) / z
        pe = self._pe_encoding(torch.stack([x_embed, y_embed, z_embed], dim=-1))
        return pe.permute(3, 0, 1, 2)

    def forward_with_coords(
        self, coords_input: torch.Tensor, image_size: tuple[int, int, int]
    ) -> torch.Tensor:
        """Encode points (B, N, 3) given in voxels of an image of ``image_size`` -> (B, N, 3F)."""
        scale = torch.tensor(image_size, dtype=coords_input.dtype, device=coords_input.device)
        return self._pe_encoding((coords_input / scale).to(torch.float))


class PromptEncoder3D(nn.Module):
    """Encodes clicks into sparse tokens (B, N+1, C) and a mask prompt into a dense map (B, C, G, G, G)."""

    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: tuple[int, int, int],
        input_image_size: tuple[int, int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
        num_pos_feats: int | None = None,
        pe_scale: float | None = None,
        num_point_embeddings: int = 2,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom3D(num_pos_feats or embed_dim // 3, pe_scale)
        self.num_point_embeddings = num_point_embeddings
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * s for s in self.image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            activation(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            activation(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the embedding grid, (1, C, G, G, G)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """points (B, N, 3) voxel indices, labels (B, N) with 1 positive, 0 negative, −1 padding."""
        points = points + 0.5  # voxel centre
        if pad:
            points = torch.cat([points, points.new_zeros((points.shape[0], 1, 3))], dim=1)
            labels = torch.cat([labels, -labels.new_ones((labels.shape[0], 1))], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        embedding = torch.where(labels == -1, torch.zeros_like(embedding), embedding)
        embedding = embedding + (labels == -1) * self.not_a_point_embed.weight
        for value, point_embedding in enumerate(self.point_embeddings):
            embedding = embedding + (labels == value) * point_embedding.weight
        return embedding

    def _get_batch_size(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse (B, N+1, C) (one padding point appended when ``boxes`` is None) and dense (B, C, G, G, G).

        ``masks`` is the previous low-resolution mask logits (B, 1, 4G, 4G, 4G) or None.
        """
        if boxes is not None:
            raise ValueError("SAM-Med3D has no box embeddings (2 point embeddings only); pass boxes=None")
        bs = self._get_batch_size(points, boxes, masks)
        weight = self.not_a_point_embed.weight
        sparse = torch.empty((bs, 0, self.embed_dim), device=weight.device, dtype=weight.dtype)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=True)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(
                bs, -1, *self.image_embedding_size
            )
        return sparse, dense
