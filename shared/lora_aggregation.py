"""LoRA-aware aggregation of adapters (``federation.lora-aggregation = product``), on name -> tensor dicts.

A LoRA module adds ``ΔW = s · B A`` to its frozen weight, with ``A`` of shape ``(r, in, *kernel)``, ``B`` of shape
``(out, r, 1, ...)`` and PEFT's scaling ``s = alpha / r``. Averaging ``A`` and ``B`` separately (``naive``) does not
average the ``ΔW``: ``mean(B) · mean(A) ≠ mean(B A)``. :func:`product_aggregate` averages the products exactly,

    ΔW = Σᵢ wᵢ · sᵢ · Bᵢ Aᵢ        (wᵢ = nᵢ / Σ n, the sites' training cases, as FedAvg),

and re-factorises ``ΔW / s`` to the global rank ``r`` with a truncated SVD ``U S Vᵀ``, split evenly between the
factors: ``B = U_r · sqrt(S_r)``, ``A = sqrt(S_r) · V_rᵀ`` (so ``s · B A`` is the best rank-``r`` approximation of
``ΔW`` in Frobenius and spectral norm, Eckart–Young). What the truncation drops is reported as the discarded energy
``Σ discarded σ² / Σ σ²`` over all LoRA modules. Every other adapter tensor is the weighted mean.

The SVD never forms ``ΔW``: it is ``B_cat · A_cat`` with inner size ``R = Σ rᵢ``; with QR factors of both the
singular values come from an ``R × R`` core (a dense SVD only when ``r > R`` or ``R`` exceeds a side of ``ΔW``). Components with zero singular value
(``ΔW`` of rank below ``r``) get ``B`` = 0 and an ``A`` row along a singular vector at PEFT's initial row norm,
so they are not dead for the next round's training (``B`` = ``A`` = 0 would have zero gradient forever).

Heterogeneous ranks (a site's own ``adapter.lora-rank``, product mode only): a site of rank ``rᵢ`` keeps the run's
``adapter.lora-alpha``, so its scaling is PEFT's ``sᵢ = alpha / rᵢ`` (:func:`scaling_at_rank`); its ``Bᵢ Aᵢ`` simply
has another inner size, and the sum above is exact whatever the ranks. The global adapter stays at the global rank;
a site of another rank receives it and projects it to its own (:func:`project`: the optimal rank-``rᵢ``
approximation of the global ΔW, Eckart–Young, exact when ``rᵢ`` ≥ the global rank); the server computes the same
projection as the reference its norm bound measures that site's update against.

Plain torch (float64 internally, float32 out); no Flower. :class:`server.strategies.ProductLoraMixin`, the
server's admission and the site (``client/task.py``) call it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "LoraAggregate",
    "delta_weight",
    "layout_rank",
    "lora_modules",
    "product_aggregate",
    "project",
    "rank_layout",
    "refactorise",
    "scaling_at_rank",
    "weighted_mean",
]

_A, _B = ".lora_A.", ".lora_B."
#: Row norm of a PEFT-initialised A (uniform in ±1/sqrt(fan_in)): sqrt(1/3). Given to zero-σ components.
_INIT_ROW_NORM = 1.0 / math.sqrt(3.0)
#: A singular value at most this fraction of the largest counts as zero.
_ZERO_SIGMA = 1e-10


@dataclass
class LoraAggregate:
    """The aggregated adapter and what the rank truncation dropped."""

    tensors: dict[str, torch.Tensor]
    #: Σ discarded σ² / Σ σ² over all LoRA modules (0 when nothing was dropped or every ΔW is 0).
    discarded_energy: float
    #: Σ σ² dropped and kept+dropped, summed over modules (the parts of the ratio).
    discarded: float = 0.0
    total: float = 0.0


def lora_modules(names: Sequence[str] | Mapping[str, object]) -> dict[str, tuple[str, str]]:
    """LoRA module -> (name of its A, name of its B), e.g. ``seg.image_encoder.blocks.0.attn.qkv``.

    Raises ValueError naming a LoRA matrix whose partner is missing."""
    names = set(names)
    modules = {}
    for name in sorted(names):
        if _A in name:
            module, rest = name.split(_A, 1)
            partner = f"{module}{_B}{rest}"
            if partner not in names:
                raise ValueError(f"LoRA matrix {name} has no partner {partner} in the adapter")
            modules[module] = (name, partner)
        elif _B in name and name.replace(_B, _A, 1) not in names:
            raise ValueError(f"LoRA matrix {name} has no partner {name.replace(_B, _A, 1)} in the adapter")
    return modules


def _matrices(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A as ``(r, in·kernel)``, B as ``(out, r)``) in float64; conv LoRA's B is a 1×…×1 kernel."""
    if b.shape[2:].numel() != 1 or b.shape[1] != a.shape[0]:
        raise ValueError(f"LoRA shapes A {tuple(a.shape)} and B {tuple(b.shape)} do not form a product B·A")
    return a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], b.shape[1]).double()


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``ΔW = scaling · B A`` as an ``(out, in·kernel)`` float64 matrix."""
    a2, b2 = _matrices(a, b)
    return scaling * (b2 @ a2)


def _normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if not math.isfinite(total) or total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"aggregation weights must be >= 0 with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def weighted_mean(
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Σ wᵢ tᵢ / Σ w per name (all names of the first update unless ``names``), float32."""
    w = _normalised(weights)
    keys = list(names) if names is not None else list(updates[0])
    return {
        name: sum(wi * u[name].double() for wi, u in zip(w, updates, strict=True)).float() for name in keys
    }


def _svd_of_product(b_cat: torch.Tensor, a_cat: torch.Tensor, rank: int):
    """(U, S, V) of ``b_cat @ a_cat`` with at least ``rank`` singular triplets: (out, k), (k,), (in, k), k ≥ rank.

    Never forms more than the product's own rank of directions densely: via QR when the inner size R is at most
    ``min(out, in)`` (an SVD of the R×R core), else a thin SVD of the (then small) product. Triplets beyond the
    product's rank (``rank`` above R, as when a site of a higher rank receives the global adapter) get σ = 0, a
    zero U column and a V column completing V orthonormally (:func:`_complete_columns`; zero once V spans every
    input direction), so :func:`refactorise` gives them a trainable A row. A full SVD with the complete in × in V
    instead took minutes per round on a classifier convolution (in = 512·3·3)."""
    inner = b_cat.shape[1]
    if inner <= min(b_cat.shape[0], a_cat.shape[1]):
        q_b, r_b = torch.linalg.qr(b_cat)  # (out, R), (R, R)
        q_a, r_a = torch.linalg.qr(a_cat.mT)  # (in, R), (R, R)
        u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.mT)
        u, v = q_b @ u_c, q_a @ vh_c.mT
    else:
        u, s, vh = torch.linalg.svd(b_cat @ a_cat, full_matrices=False)
        v = vh.mT
    pad = rank - s.shape[0]
    if pad > 0:
        s = torch.cat([s, s.new_zeros(pad)])
        u = torch.cat([u, u.new_zeros(u.shape[0], pad)], dim=1)
        v = _complete_columns(v, rank)
    return u, s, v


def _complete_columns(v: torch.Tensor, count: int) -> torch.Tensor:
    """``v`` (n, k) with orthonormal columns, followed by orthonormal columns orthogonal to them up to ``count``
    columns in all (at most n; zero columns beyond: more rank than input features, such components stay zero).
    Deterministic: a QR of ``v`` beside the first coordinate axes."""
    n, k = v.shape
    extra = min(count, n) - k
    if extra > 0:
        q, _ = torch.linalg.qr(
            torch.cat([v, torch.eye(n, min(count, n), dtype=v.dtype, device=v.device)], dim=1)
        )
        v = torch.cat([v, q[:, k : k + extra]], dim=1)
    if v.shape[1] < count:
        v = torch.cat([v, v.new_zeros(n, count - v.shape[1])], dim=1)
    return v


def refactorise(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], *, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of ``Σ Bᵢ Aᵢ`` (matrices ``(out, rᵢ)``, ``(rᵢ, in)``, weights folded in) for
    a module of scaling ``scaling``: ``(B (out, rank), A (rank, in), discarded σ², total σ²)`` with
    ``scaling · B A`` the truncated SVD of ``Σ Bᵢ Aᵢ`` (split ``B = U√S``, ``A = √S Vᵀ``; see the module docstring)."""
    b_cat = torch.cat([b for b, _ in factors], dim=1) / scaling
    a_cat = torch.cat([a for _, a in factors], dim=0)
    u, s, v = _svd_of_product(b_cat, a_cat, rank)
    energy = s.square()
    total, discarded = float(energy.sum()), float(energy[rank:].sum())
    u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = s.sqrt()
    alive = s > _ZERO_SIGMA * float(s.max()) if float(s.max()) > 0 else torch.zeros_like(s, dtype=torch.bool)
    b = u * torch.where(alive, root, torch.zeros_like(root))
    a = (v * torch.where(alive, root, torch.full_like(root, _INIT_ROW_NORM))).mT
    return b, a, discarded, total


def product_aggregate(
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    layout: Mapping[str, tuple[int, ...]],
    scaling: Mapping[str, float],
    site_scaling: Sequence[Mapping[str, float]] | None = None,
) -> LoraAggregate:
    """Aggregate site adapters in ΔW space (module docstring) into the global ``layout``.

    ``weights``: the sites' training cases. ``scaling``: model prefix (``seg``/``cls``) -> global ``alpha / r``;
    ``site_scaling``: the same per site (default: the global one; sites of another rank have another scaling).
    The global rank of a module is the first dimension of its A in ``layout``. Non-LoRA tensors: weighted mean.
    """
    w = _normalised(weights)
    per_site = site_scaling if site_scaling is not None else [scaling] * len(updates)
    modules = lora_modules(layout)
    lora_names = {n for pair in modules.values() for n in pair}
    out = weighted_mean(updates, weights, [n for n in layout if n not in lora_names])
    discarded = total = 0.0
    for module, (a_name, b_name) in modules.items():
        prefix = module.split(".", 1)[0]
        factors = []
        for wi, update, site in zip(w, updates, per_site, strict=True):
            a2, b2 = _matrices(update[a_name], update[b_name])
            factors.append((wi * site[prefix] * b2, a2))
        a_shape, b_shape = tuple(layout[a_name]), tuple(layout[b_name])
        b, a, dropped, energy = refactorise(factors, rank=a_shape[0], scaling=scaling[prefix])
        out[a_name] = a.reshape(a_shape).float()
        out[b_name] = b.reshape(b_shape).float()
        discarded += dropped
        total += energy
    ratio = discarded / total if total > 0 else 0.0
    return LoraAggregate(out, ratio, discarded, total)


def layout_rank(layout: Mapping[str, Sequence[int]]) -> int:
    """The LoRA rank of an adapter layout (the first dimension of every A). Raises ValueError when it has no LoRA
    module or modules of different ranks."""
    ranks = {tuple(layout[a])[0] for a, _ in lora_modules(layout).values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter layout has LoRA ranks {sorted(ranks)}; exactly one expected")
    return ranks.pop()


def rank_layout(layout: Mapping[str, Sequence[int]], rank: int) -> dict[str, tuple[int, ...]]:
    """``layout`` at LoRA rank ``rank``: every A ``(r, in, ...)`` -> ``(rank, in, ...)``, every B ``(out, r, ...)``
    -> ``(out, rank, ...)``; every other tensor unchanged."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    out = {name: tuple(shape) for name, shape in layout.items()}
    for a_name, b_name in lora_modules(layout).values():
        a, b = out[a_name], out[b_name]
        out[a_name] = (rank, *a[1:])
        out[b_name] = (b[0], rank, *b[2:])
    return out


def scaling_at_rank(scaling: Mapping[str, float], rank: int, to_rank: int) -> dict[str, float]:
    """Model prefix -> LoRA scaling at ``to_rank`` given ``scaling`` at ``rank``: alpha is the run's
    (``adapter.lora-alpha``) at every rank, so ``alpha / to_rank = scaling · rank / to_rank`` (PEFT's rule)."""
    return {prefix: s * rank / to_rank for prefix, s in scaling.items()}


def project(
    tensors: Mapping[str, torch.Tensor],
    *,
    rank: int,
    scaling: Mapping[str, float],
    to_scaling: Mapping[str, float],
) -> dict[str, torch.Tensor]:
    """The adapter at LoRA rank ``rank``: each module's ``ΔW = s · B A`` (``scaling`` per model prefix) replaced by
    its optimal rank-``rank`` approximation, factorised for the scaling ``to_scaling`` (:func:`refactorise`; exact
    when ``rank`` ≥ the module's rank). Every other tensor is kept. Float32 out, in :func:`rank_layout`."""
    out = {name: tensor.float().clone() for name, tensor in tensors.items()}
    for module, (a_name, b_name) in lora_modules(tensors).items():
        prefix = module.split(".", 1)[0]
        a, b = tensors[a_name], tensors[b_name]
        a2, b2 = _matrices(a, b)
        new_b, new_a, _, _ = refactorise([(scaling[prefix] * b2, a2)], rank=rank, scaling=to_scaling[prefix])
        out[a_name] = new_a.reshape(rank, *a.shape[1:]).float()
        out[b_name] = new_b.reshape(b.shape[0], rank, *b.shape[2:]).float()
    return out
