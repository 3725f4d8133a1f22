"""Error feedback for a compressed uplink: the quantisation residual a site carries from one round to the next.

Under ``federation.compression = fp16 | int8`` a site sends ``update − received + residual`` encoded, and keeps
what the encoding lost as the next residual (:func:`shared.protocol.update_to_record`). Each message runs in a
fresh ClientApp process, so the residual lives in the site's state folder, ``<state-dir>/`` :data:`RESIDUAL_FILE`
(safetensors, float32 tensors of the travelling adapter layout; metadata: run id and compression), written
atomically. A missing, unreadable or foreign file (another run, compression or layout) is logged and the site
starts from a zero residual: error feedback then restarts, nothing else is lost.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shared.atomic import atomic_write
from shared.protocol import Layout, layout_of

__all__ = ["RESIDUAL_FILE", "load_residual", "save_residual"]

logger = logging.getLogger(__name__)

RESIDUAL_FILE = "compression-residual.safetensors"


def _metadata(run: str, compression: str) -> dict[str, str]:
    return {"run": run, "compression": compression}


def load_residual(
    state_dir: Path, layout: Layout, *, run: str, compression: str
) -> dict[str, torch.Tensor] | None:
    """The residual this site kept from its last update of ``run`` under ``compression``, as tensors of ``layout``
    (name -> shape, float32); None (a zero residual) when there is none or it cannot be used (logged)."""
    path = Path(state_dir) / RESIDUAL_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as opened:
            metadata = opened.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # a truncated or corrupt file: any error of the reader
        logger.warning("%s: unreadable (%s); error feedback restarts from a zero residual", path, exc)
        return None
    if metadata != _metadata(run, compression):
        logger.info(
            "%s: kept for %s, not run %r with compression %r; error feedback starts from a zero residual",
            path,
            metadata,
            run,
            compression,
        )
        return None
    if layout_of(tensors) != dict(layout) or any(t.dtype != torch.float32 for t in tensors.values()):
        logger.warning("%s: does not fit this adapter's layout; error feedback restarts from zero", path)
        return None
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        logger.warning("%s: holds NaN or Inf; error feedback restarts from a zero residual", path)
        return None
    return tensors


def save_residual(state_dir: Path, residual: dict[str, torch.Tensor], *, run: str, compression: str) -> None:
    """Keep ``residual`` (float32 tensors) for the site's next update of ``run``, atomically."""
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in residual.items()}
    metadata = _metadata(run, compression)
    atomic_write(Path(state_dir) / RESIDUAL_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
