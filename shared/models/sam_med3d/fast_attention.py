"""Exact fast path for SAM-Med3D's padded-window attention (issue 7).

The official windowed block zero-pads the token grid (after ``norm1``) at the end of each axis to a multiple of
the window size ``ws`` and attends over every token of each ws³ window, padded ones included, then crops. For
the full-size model that is one 14³ = 2,744-token window around 8³ = 512 real tokens. This module computes the
same function for the real tokens only:

* A padded token is the zero vector, so its q, k, v are the constants ``(q0, k0, v0) = qkv(0)`` (qkv bias,
  and LoRA on ``qkv`` too: ``qkv`` is called as a module on a zero token).
* The official relative-position bias (the quirk in ../shared/DESIGN.md) for a real query (a, b, c) and a key
  (kd, kh, kw) is ``T1[kw] + G2[kd, kw] + G3[kh, kw]`` with ``T1[kw] = Q[a,b,c]·Rd[a, kw]``,
  ``G2[kd, kw] = Q[a,b,kd]·Rh[b, kw]`` and ``G3[kh, kw] = Q[a,b,kh]·Rw[kh, kw]``, where ``R*`` are the
  ``get_rel_pos(ws, ws, table)`` matrices and Q at a padded position is q0.
* Every padded key has logit ``s·q·k0 + T1[kw] + G2[kd, kw] + G3[kh, kw]`` and value v0. For fixed kw this
  separates in kd and kh, so the log of the total attention mass on the padded keys (without the common
  ``s·q·k0``), ``logS``, is an exact log-sum-exp over O(ws²) terms. With (rd, rh, rw) the real extent of the
  window, the padded set is split disjointly into {kd ≥ rd} ∪ {kd < rd, kh ≥ rh} ∪ {kd < rd, kh < rh, kw ≥ rw}
  (never "all keys minus real keys", which cancels catastrophically); empty parts are skipped.
* Each real query therefore attends over its real keys plus ONE virtual key with value v0 and logit
  ``s·q·k0 + logS``: :func:`torch.nn.functional.scaled_dot_product_attention` with one extra key/value row and a
  float additive mask (the rel-pos bias on real keys, ``logS`` on the virtual key).

The mask (bias and ``logS``) is computed in float32 (float64 for float64 inputs) even under bf16/fp16 autocast:
in bf16, ``logS`` ≈ 7.7 would be rounded by up to 0.016, i.e. 1.6–3% error on a key that can carry most of
the attention weight. On CPU, SDPA takes reduced-precision q, k, v with a float32 mask; on other devices q, k, v
are promoted to the mask's dtype, because their fused kernels require the bias dtype to match the query's.

Several windows per axis are handled: only the last window of an axis can be partial, so there are at most
2³ = 8 window-shape classes, and all windows of one class are batched. A window without padding is ordinary
attention with the official bias. ``window_size >= grid`` gives one padded window per axis.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import get_rel_pos

__all__ = ["MASK_ALIGNMENT", "fused_kernel_layout", "padded_window_attention"]

#: One run of equal windows along an axis: (first token index, number of windows, real extent in tokens).
_Segment = tuple[int, int, int]


def padded_window_attention(attn: nn.Module, x: torch.Tensor, window_size: int) -> torch.Tensor:
    """The official padded windowed attention (pad → partition → ``attn`` → unpartition → crop), exactly.

    Args:
        attn: the block's :class:`~shared.models.sam_med3d.image_encoder.Attention` (its ``qkv`` may be PEFT-wrapped;
            it is only called as a module).
        x: normed tokens (B, D, H, W, C) in token units (after ``norm1``, before padding).
        window_size: window edge ws ≥ 1 in tokens; the grid is zero-padded at the end of each axis to a
            multiple of ws.

    Returns:
        attention + ``proj`` output for the real tokens, (B, D, H, W, C), equal to the reference within
        floating-point noise.
    """
    if x.dim() != 5:
        raise ValueError(f"padded_window_attention: x must be (B, D, H, W, C), got shape {tuple(x.shape)}")
    if window_size < 1:
        raise ValueError(f"padded_window_attention: window_size must be >= 1, got {window_size}")
    qkv, qkv0 = _project_with_zero_token(attn, x)
    segments = [_axis_segments(size, window_size) for size in x.shape[1:4]]
    rows = []
    for seg_d in segments[0]:
        cols = []
        for seg_h in segments[1]:
            parts = [
                _segment_attention(attn, qkv, qkv0, (seg_d, seg_h, seg_w), window_size)
                for seg_w in segments[2]
            ]
            cols.append(torch.cat(parts, dim=3))
        rows.append(torch.cat(cols, dim=2))
    return attn.proj(torch.cat(rows, dim=1))


def _project_with_zero_token(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``qkv`` of the real tokens (B, D, H, W, 3C) and of one zero token per sample (B, 3C), in one module call.

    One call with batch B (rather than a separate batch-1 call) keeps per-sample hooks such as Opacus' valid.
    """
    B, D, H, W, C = x.shape
    tokens = torch.cat([x.reshape(B, D * H * W, C), x.new_zeros(B, 1, C)], dim=1)
    qkv = attn.qkv(tokens)
    return qkv[:, :-1].reshape(B, D, H, W, -1), qkv[:, -1]


def _axis_segments(size: int, window_size: int) -> list[_Segment]:
    """Full windows first, then the partial last window (if any), along one axis of ``size`` tokens."""
    full, rest = divmod(size, window_size)
    segments = [(0, full, window_size)] if full else []
    if rest:
        segments.append((full * window_size, 1, rest))
    return segments


def _segment_attention(
    attn: nn.Module,
    qkv: torch.Tensor,
    qkv0: torch.Tensor,
    segments: tuple[_Segment, _Segment, _Segment],
    window_size: int,
) -> torch.Tensor:
    """Attention output (before ``proj``) of one window-shape class: (B, nd·ed, nh·eh, nw·ew, C)."""
    B = qkv.shape[0]
    (d0, nd, ed), (h0, nh, eh), (w0, nw, ew) = segments
    region = qkv[:, d0 : d0 + nd * ed, h0 : h0 + nh * eh, w0 : w0 + nw * ew]
    windows = region.reshape(B, nd, ed, nh, eh, nw, ew, -1).permute(0, 1, 3, 5, 2, 4, 6, 7)
    windows = windows.reshape(B * nd * nh * nw, ed, eh, ew, -1)
    out = _window_class_attention(attn, windows, qkv0.repeat_interleave(nd * nh * nw, dim=0), window_size)
    out = out.reshape(B, nd, nh, nw, ed, eh, ew, -1).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return out.reshape(B, nd * ed, nh * eh, nw * ew, -1)


def _window_class_attention(
    attn: nn.Module, qkv: torch.Tensor, qkv0: torch.Tensor, window_size: int
) -> torch.Tensor:
    """Attention over windows of one real extent.

    Args:
        qkv: (N, rd, rh, rw, 3C) projections of the real tokens of N windows.
        qkv0: (N, 3C) projection of the zero token, per window.

    Returns:
        (N, rd, rh, rw, C) attention output (before ``proj``).
    """
    N, rd, rh, rw, _ = qkv.shape
    heads = attn.num_heads
    q, k, v = qkv.reshape(N, rd * rh * rw, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (N, h, n, hd)
    q0, k0, v0 = qkv0.reshape(N, 3, heads, -1).unbind(1)  # (N, h, hd)
    padded = (rd, rh, rw) != (window_size,) * 3
    mask = _attention_mask(attn, q, q0, (rd, rh, rw), window_size)
    if padded:
        k = torch.cat([k, k0[:, :, None]], dim=2)
        v = torch.cat([v, v0[:, :, None]], dim=2)
    out = _sdpa(q, k, v, mask, attn.scale)
    return out.transpose(1, 2).reshape(N, rd, rh, rw, -1)


def _attention_mask(
    attn: nn.Module, q: torch.Tensor, q0: torch.Tensor, real: tuple[int, int, int], window_size: int
) -> torch.Tensor | None:
    """Float additive mask (N, h, n, n [+1]): rel-pos bias on the n real keys, ``logS`` on the virtual key.

    Computed with autocast off in float32 (float64 for float64 inputs), rows aligned for CUDA's fused kernel
    (:func:`_aligned_mask`); None when there is nothing to add.
    """
    n = math.prod(real)
    padded_keys = window_size**3 - n
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        if not attn.use_rel_pos:
            if not padded_keys:
                return None
            bias = torch.zeros(n, n, dtype=dtype, device=q.device)
            return _aligned_mask(
                bias, torch.full((n, 1), math.log(padded_keys), dtype=dtype, device=q.device)
            )
        t1, g2, g3 = _rel_pos_terms(attn, q.to(dtype), q0.to(dtype), real, window_size)
        bias = _real_key_bias(t1, g2, g3, real)
        if not padded_keys:
            return _aligned_mask(bias)
        return _aligned_mask(bias, _padded_log_mass(t1, g2, g3, real, window_size))


#: Row stride (in elements) at which CUDA's memory-efficient SDPA kernel reads a float mask in place; torch copies
#: a mask with any other row stride into a padded one before every call (``preprocess_mask`` in ATen).
MASK_ALIGNMENT = 8


def fused_kernel_layout(device: torch.device) -> bool:
    """Whether to shape the attention for the fused SDPA kernels of ``device``: row-aligned masks here, and global
    blocks through this module (:meth:`~shared.models.sam_med3d.image_encoder.Block3D._global_attention`).

    Off CPU only. CPU training runs SDPA's math kernel whatever the layout, and there both measured slower in a
    training step (the aligned view's backward, the global block's rel-pos terms): the CPU path stays as it was.
    """
    return device.type != "cpu"


def _aligned_mask(*blocks: torch.Tensor) -> torch.Tensor:
    """The key-column blocks (..., n, k_i) side by side as one mask (..., n, Σk_i), exactly ``torch.cat``'s values.

    Where :func:`fused_kernel_layout` holds, its rows start at multiples of :data:`MASK_ALIGNMENT` elements: a view
    of a zero-padded buffer, built with the one concatenation the mask needs anyway.
    """
    width = sum(block.shape[-1] for block in blocks)
    pad = -width % MASK_ALIGNMENT if fused_kernel_layout(blocks[0].device) else 0
    if not pad:
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
    filler = blocks[0].new_zeros(*blocks[0].shape[:-1], pad)
    return torch.cat([*blocks, filler], dim=-1)[..., :width]


def _rel_pos_terms(
    attn: nn.Module, q: torch.Tensor, q0: torch.Tensor, real: tuple[int, int, int], window_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three quirk terms for every real query, over all ws keys per axis (padded ones included).

    Args:
        q: unscaled real queries (N, h, n, hd); q0: the zero token's query (N, h, hd).

    Returns:
        ``T1`` (N, h, rd, rh, rw, ws) over kw; ``G2`` (N, h, rd, rh, ws, ws) over (kd, kw); ``G3`` (N, h, rd, rh,
        ws, ws) over (kh, kw). ``G2`` and ``G3`` depend on the query only through (a, b).
    """
    rd, rh, rw = real
    ws = window_size
    N, heads, _, hd = q.shape
    dtype = q.dtype
    rel_d = get_rel_pos(ws, ws, attn.rel_pos_d).to(dtype)  # (ws, ws, hd): [query index, key index]
    rel_h = get_rel_pos(ws, ws, attn.rel_pos_h).to(dtype)
    rel_w = get_rel_pos(ws, ws, attn.rel_pos_w).to(dtype)
    grid = q.reshape(N, heads, rd, rh, rw, hd)
    # Q[a, b, j] for j over the whole window along w: real queries, then q0 at padded positions
    row = torch.cat([grid, q0[:, :, None, None, None].expand(N, heads, rd, rh, ws - rw, hd)], dim=4)
    t1 = torch.einsum("nhabcx,akx->nhabck", grid, rel_d[:rd])
    g2 = torch.einsum("nhabjx,bkx->nhabjk", row, rel_h[:rh])
    g3 = torch.einsum("nhabjx,jkx->nhabjk", row, rel_w)
    return t1, g2, g3


def _real_key_bias(
    t1: torch.Tensor, g2: torch.Tensor, g3: torch.Tensor, real: tuple[int, int, int]
) -> torch.Tensor:
    """Bias of real query (a, b, c) on real key (kd, kh, kw): ``T1[kw] + G2[kd, kw] + G3[kh, kw]``, (N, h, n, n)."""
    rd, rh, rw = real
    N, heads = t1.shape[:2]
    n = rd * rh * rw
    bias = (
        t1[..., None, None, :rw]  # (N, h, a, b, c, 1, 1, kw)
        + g2[:, :, :, :, None, :rd, None, :rw]  # (N, h, a, b, 1, kd, 1, kw)
        + g3[:, :, :, :, None, None, :rh, :rw]  # (N, h, a, b, 1, 1, kh, kw)
    )
    return bias.reshape(N, heads, n, n)


def _padded_log_mass(
    t1: torch.Tensor, g2: torch.Tensor, g3: torch.Tensor, real: tuple[int, int, int], window_size: int
) -> torch.Tensor:
    """``logS`` (N, h, n, 1): log-sum-exp of the bias over the padded keys of the window, per real query.

    The padded set is split disjointly: {kd ≥ rd} (all kh, kw), {kd < rd, kh ≥ rh} (all kw) and
    {kd < rd, kh < rh, kw ≥ rw}; for each part and kw, the kd and kh sums factorise.
    """
    rd, rh, rw = real
    lse = torch.logsumexp
    g2_real = lse(g2[..., :rd, :], dim=-2)  # (N, h, a, b, kw): log Σ_{kd<rd} exp G2
    per_kw: list[torch.Tensor] = []  # each (N, h, a, b, kw-range)
    t1_kw: list[torch.Tensor] = []  # the matching T1 (N, h, a, b, c, kw-range)
    if rd < window_size:
        per_kw.append(lse(g2[..., rd:, :], dim=-2) + lse(g3, dim=-2))
        t1_kw.append(t1)
    if rh < window_size:
        per_kw.append(g2_real + lse(g3[..., rh:, :], dim=-2))
        t1_kw.append(t1)
    if rw < window_size:
        per_kw.append((g2_real + lse(g3[..., :rh, :], dim=-2))[..., rw:])
        t1_kw.append(t1[..., rw:])
    terms = torch.cat(t1_kw, dim=-1) + torch.cat(per_kw, dim=-1)[:, :, :, :, None, :]
    N, heads = t1.shape[:2]
    return lse(terms, dim=-1).reshape(N, heads, rd * rh * rw, 1)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA (N, h, n, hd) with autocast off so the float32 mask is not cast down (see the module docstring)."""
    dtype = q.dtype
    if mask is not None and mask.dtype != dtype and q.device.type != "cpu":
        q, k, v = q.to(mask.dtype), k.to(mask.dtype), v.to(mask.dtype)
    with torch.autocast(q.device.type, enabled=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).to(dtype)
