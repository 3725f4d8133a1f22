"""Mixed precision: the ``train.precision`` key as one object that training, evaluation and inference share.

* ``fp32``: no autocast and no gradient scaling; exactly the float32 behaviour (the default).
* ``bf16``: :func:`torch.autocast` to bfloat16 on the model's device type (CUDA or CPU). bfloat16 has float32's
  exponent range, so no gradient scaling is needed.
* ``fp16``: autocast to float16 with a :class:`torch.amp.GradScaler` (float16 gradients underflow without it);
  CUDA only (:func:`shared.config.check_precision` refuses it on CPU).

What stays float32 under autocast: the parameters and optimiser state (autocast casts per op, weights are never
stored in low precision), the losses and metrics (callers cast logits with ``.float()`` first), and the fast
attention's bias and log-mass (:mod:`shared.models.sam_med3d.fast_attention`). Backward runs outside the
autocast region, as torch recommends. Sample-level DP accepts only ``fp32`` (see :func:`check_precision`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from shared.config import check_precision

__all__ = ["FP32", "Precision"]

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """``train.precision`` on one device.

    Args:
        name: ``fp32``, ``bf16`` or ``fp16`` (ConfigError otherwise, and for ``fp16`` off CUDA).
        device_type: ``cuda``, ``cpu``, ... (:attr:`torch.device.type` of the model).
    """

    name: str = "fp32"
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        check_precision(self.name, device=self.device_type)

    @classmethod
    def on(cls, name: str, device: torch.device | str) -> Precision:
        """The precision ``name`` for a model on ``device``."""
        return cls(name, torch.device(device).type)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (bfloat16 or float16), None for ``fp32``."""
        return _DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The forward-pass context: :func:`torch.autocast` to :attr:`dtype`, a no-op for ``fp32``."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh gradient scaler for ``fp16`` (one per training call), None otherwise."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


#: Plain float32 (no autocast), on any device.
FP32 = Precision()
