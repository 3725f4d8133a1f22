"""SAM-Med3D 3D ViT image encoder (official ``ImageEncoderViT3D``), parameter names as in the checkpoint.

Tokens are kept channels-last: (B, D', H', W', C) with D' = D / patch_size. Two official quirks are reproduced
on purpose because the released weights were trained with them (see ../shared/DESIGN.md):

* windowed blocks zero-pad the token grid *after* ``norm1`` up to a multiple of the window size and attend over
  every padded token without a mask;
* the decomposed relative-position bias broadcasts its three terms onto other key axes than the textbook form
  (:func:`add_decomposed_rel_pos`).

``attention_impl`` selects how windowed blocks compute this: ``reference`` runs the padded computation
literally; ``fast`` computes exactly the same function without materialising padded tokens
(:mod:`.fast_attention`), and off CPU runs global blocks through the same SDPA path as one unpadded window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm3d, MLPBlock, get_rel_pos

__all__ = [
    "ATTENTION_IMPLS",
    "Attention",
    "Block3D",
    "ImageEncoderViT3D",
    "PatchEmbed3D",
    "add_decomposed_rel_pos",
    "get_rel_pos",
    "window_partition3d",
    "window_unpartition3d",
]

ATTENTION_IMPLS = ("reference", "fast")


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patch embedding: (B, C_in, D, H, W) -> (B, D/p, H/p, W/p, embed_dim)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


def add_decomposed_rel_pos(
    attn: torch.Tensor,
    q: torch.Tensor,
    rel_pos_d: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int, int],
    k_size: tuple[int, int, int],
) -> torch.Tensor:
    """Add the official SAM-Med3D relative-position bias to attention logits.

    Args:
        attn: logits (B·heads, Nq, Nk) with Nq = prod(q_size), Nk = prod(k_size).
        q: unscaled queries (B·heads, Nq, head_dim).

    With Q the query grid, (a, b, c) a query position and (kd, kh, kw) a key position, the bias added is
    ``Q[a,b,c]·Rd[a−kw] + Q[a,b,kd]·Rh[b−kw] + Q[a,b,kh]·Rw[kh−kw]`` — the official broadcasting, not the
    textbook form. It only type-checks for cubic grids, like the original.
    """
    q_d, q_h, q_w = q_size
    k_d, k_h, k_w = k_size
    Rd = get_rel_pos(q_d, k_d, rel_pos_d)
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)
    B, _, dim = q.shape
    r_q = q.reshape(B, q_d, q_h, q_w, dim)
    rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, Rd)
    rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, Rh)
    rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, Rw)
    attn = (
        attn.view(B, q_d, q_h, q_w, k_d, k_h, k_w)
        + rel_d[:, :, :, :, None, None]
        + rel_h[:, :, :, None, :, None]
        + rel_w[:, :, :, None, None, :]
    )
    return attn.view(B, q_d * q_h * q_w, k_d * k_h * k_w)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, D, H, W, C) token grid with the official relative-position bias."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos is True")
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, D, H, W, _ = x.shape
        n = D * H * W
        qkv = self.qkv(x).reshape(B, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, n, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(
                attn, q, self.rel_pos_d, self.rel_pos_h, self.rel_pos_w, (D, H, W), (D, H, W)
            )
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(B, self.num_heads, D, H, W, -1).permute(0, 2, 3, 4, 1, 5).reshape(B, D, H, W, -1)
        return self.proj(x)


def window_partition3d(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad (B, D, H, W, C) at the end of each axis to multiples of ``window_size`` and cut windows.

    Returns windows (B·nW, ws, ws, ws, C) and the padded extent (Dp, Hp, Wp).
    """
    B, D, H, W, C = x.shape
    pad_d = (window_size - D % window_size) % window_size
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_d or pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h, 0, pad_d))
    Dp, Hp, Wp = D + pad_d, H + pad_h, W + pad_w
    ws = window_size
    x = x.view(B, Dp // ws, ws, Hp // ws, ws, Wp // ws, ws, C)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).contiguous().view(-1, ws, ws, ws, C)
    return windows, (Dp, Hp, Wp)


def window_unpartition3d(
    windows: torch.Tensor, window_size: int, padded: tuple[int, int, int], size: tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition3d`: windows (B·nW, ws, ws, ws, C) -> (B, D, H, W, C), padding cropped."""
    Dp, Hp, Wp = padded
    D, H, W = size
    ws = window_size
    B = windows.shape[0] // ((Dp // ws) * (Hp // ws) * (Wp // ws))
    x = windows.view(B, Dp // ws, Hp // ws, Wp // ws, ws, ws, ws, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).contiguous().view(B, Dp, Hp, Wp, -1)
    return x[:, :D, :H, :W, :].contiguous()


class Block3D(nn.Module):
    """Transformer block: (B, D, H, W, C) -> same shape. ``window_size`` 0 means global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: tuple[int, int, int] | None = None,
        attention_impl: str = "fast",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        attn_size = input_size if window_size == 0 else (window_size, window_size, window_size)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, input_size=attn_size
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size
        self.attention_impl = attention_impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        x = self._windowed_attention(x) if self.window_size > 0 else self._global_attention(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))

    def _global_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``fast`` off CPU (:func:`.fast_attention.fused_kernel_layout`): a global block over a cubic grid is one
        window of the whole grid without padding, so it runs through the same SDPA path (fused kernels, no
        explicit softmax); otherwise :class:`Attention`."""
        from .fast_attention import fused_kernel_layout, padded_window_attention

        D, H, W = x.shape[1:4]
        if self.attention_impl == "fast" and D == H == W and fused_kernel_layout(x.device):
            return padded_window_attention(self.attn, x, D)
        return self.attn(x)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention_impl == "fast":
            from .fast_attention import padded_window_attention

            return padded_window_attention(self.attn, x, self.window_size)
        size = (x.shape[1], x.shape[2], x.shape[3])
        windows, padded = window_partition3d(x, self.window_size)
        return window_unpartition3d(self.attn(windows), self.window_size, padded, size)


class ImageEncoderViT3D(nn.Module):
    """SAM-Med3D image encoder: image (B, in_chans, S, S, S) -> embedding (B, out_chans, S/p, S/p, S/p)."""

    def __init__(
        self,
        *,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        attention_impl: str = "fast",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        grid = img_size // patch_size
        self.img_size = img_size
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_eps=norm_eps,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid, grid),
                attention_impl=attention_impl,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )
        self.set_attention_impl(attention_impl)

    def set_attention_impl(self, impl: str) -> None:
        """Switch every block between ``reference`` and ``fast`` (same parameters, same outputs): windowed blocks,
        and off CPU global blocks over a cubic grid (:meth:`Block3D._global_attention`)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {impl!r}; expected one of {ATTENTION_IMPLS}")
        for block in self.blocks:
            block.attention_impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
