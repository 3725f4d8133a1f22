"""What travels between the server and the sites, and how it is encoded in Flower records.

This is the only module of ``shared`` that imports Flower. A message carries the adapter (both models, keys
``seg.``/``cls.``, float32) as one ``ArrayRecord`` under :data:`ARRAYS`, scalar metrics as a ``MetricRecord``
under :data:`METRICS`, and the round configuration as a ``ConfigRecord`` under :data:`CONFIG`.

Packing: Flower 1.41 transfers every array of a record as its own request, and an adapter has hundreds of
small tensors (≈ 20 s per round over TLS for 266 arrays). The adapter therefore travels as one flat float32
array per model (``seg``, ``cls``): the tensors of that model in sorted name order, each flattened. Both ends
know the names and shapes (the *layout*) from the shared base and adapter settings, so none of it is sent;
:func:`record_to_adapter` refuses a record that does not fit the receiver's layout. Element-wise strategies
(FedAvg, FedAdam, median, trimmed mean) and norm-based ones (Krum, DP clipping) give the same result on the
packed arrays as on the separate tensors.

What travels depends on ``federation.lora-aggregation`` (:func:`travelling_layout`, the one place that says so):
every adapter tensor under ``naive`` and ``product``; under ``ffa`` everything but the LoRA ``A`` matrices, which
every site and the server derive from the same seed (:func:`shared.adapters.ffa_lora_a`) and never change.
Both ends must use the same mode; a record packed under another mode has other sizes and is refused, naming
the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from shared.adapters import AdapterMismatchError, is_lora_a
from shared.config import LORA_AGGREGATION_MODES
from shared.metric_names import NUM_EXAMPLES
from shared.tensor_files import describe_mismatch

__all__ = [
    "ARRAYS",
    "BASE_FINGERPRINT",
    "CONFIG",
    "DECLINED",
    "FEDABUS_VERSION",
    "METRICS",
    "NUM_EXAMPLES",
    "SERVER_ROUND",
    "SITE",
    "SITE_ID",
    "SPLIT",
    "adapter_to_record",
    "layout_of",
    "num_cases_key",
    "record_to_adapter",
    "travelling_layout",
]

# Records of a message.
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
#: ConfigRecord in replies naming the site (:data:`SITE_ID`) and, when it sent no update, why (:data:`DECLINED`).
SITE = "site"

# Keys of the ``config`` record the server sends.
#: The fingerprint of the base model the federation trains on (``seg=sha256:...;cls=sha256:...``); a site
#: whose base differs declines. Also in the handshake reply: the site's own base.
BASE_FINGERPRINT = "base-fingerprint"
#: The federation round (Flower's strategies set it in every train and evaluate config).
SERVER_ROUND = "server-round"
#: The split an evaluate message asks for: ``val`` each evaluation round, ``test`` in the final test.
SPLIT = "split"

# Keys of the ``site`` record in replies.
SITE_ID = "site-id"
DECLINED = "declined"
#: Handshake reply: the fedabus version the site runs.
FEDABUS_VERSION = "fedabus-version"

# Keys of the ``metrics`` record: NUM_EXAMPLES (Flower's FedAvg weighs by it; the number of training cases)
# is a metric name too, defined with the others in shared.metric_names, which training code imports without
# Flower; the other metric keys are built there as well.


def num_cases_key(split: str) -> str:
    """Handshake reply metric: the number of cases of the site's ``split``, ``num-{split}-cases``."""
    return f"num-{split}-cases"


#: name -> shape of every adapter tensor.
Layout = Mapping[str, tuple[int, ...]]


def layout_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The layout (name -> shape) of adapter tensors."""
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def _groups(names: list[str]) -> dict[str, list[str]]:
    """Sorted names grouped by model prefix (the text before the first dot: ``seg``, ``cls``)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        groups.setdefault(name.split(".", 1)[0], []).append(name)
    return groups


def travelling_layout(layout: Layout, mode: str = "naive") -> dict[str, tuple[int, ...]]:
    """The part of ``layout`` that travels under ``federation.lora-aggregation = mode``: all of it, except under
    ``ffa`` the LoRA ``A`` matrices (frozen at their shared initialisation everywhere, so never sent)."""
    if mode not in LORA_AGGREGATION_MODES:
        raise ValueError(
            f"federation.lora-aggregation = {mode!r}; allowed: {', '.join(LORA_AGGREGATION_MODES)}"
        )
    return {name: tuple(shape) for name, shape in layout.items() if not (mode == "ffa" and is_lora_a(name))}


def _packed_sizes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Model prefix -> (number of float32 elements,) of its packed array."""
    return {
        prefix: (sum(math.prod(layout[n]) for n in names),) for prefix, names in _groups(list(layout)).items()
    }


def adapter_to_record(tensors: Mapping[str, torch.Tensor], *, mode: str = "naive") -> ArrayRecord:
    """Adapter tensors -> ``ArrayRecord`` with one flat float32 array per model prefix (see module docstring);
    only the tensors that travel under ``mode`` (:func:`travelling_layout`) are packed."""
    sending = travelling_layout(layout_of(tensors), mode)
    packed = {}
    for prefix, names in _groups(list(sending)).items():
        flat = [tensors[n].detach().to("cpu", torch.float32).reshape(-1) for n in names]
        packed[prefix] = Array(torch.cat(flat).numpy())
    return ArrayRecord(packed)


def record_to_adapter(record: ArrayRecord, layout: Layout, *, mode: str = "naive") -> dict[str, torch.Tensor]:
    """``ArrayRecord`` of :func:`adapter_to_record` -> the adapter tensors (float32) that travel under ``mode``.

    ``layout`` is the receiver's whole adapter layout; the result holds its :func:`travelling_layout` (under
    ``ffa`` no LoRA ``A``: the receiver holds those itself). Raises
    :class:`~shared.adapters.AdapterMismatchError` when the record's arrays do not fit (other models, other
    sizes: the sender built its adapter from another base, other adapter settings or another
    ``federation.lora-aggregation``)."""
    wanted = travelling_layout(layout, mode)
    groups = _groups(list(wanted))
    found = {key: tuple(record[key].shape) for key in record.keys()}
    problems = describe_mismatch(_packed_sizes(wanted), found)
    if problems:
        raise AdapterMismatchError(
            f"received adapter does not fit this model's adapter layout under federation.lora-aggregation = "
            f"{mode!r} (packed sizes per model): " + "; ".join(problems) + _mode_hint(layout, mode, found)
        )
    out: dict[str, torch.Tensor] = {}
    for prefix, names in groups.items():
        flat = torch.from_numpy(np.ascontiguousarray(record[prefix].numpy(), dtype=np.float32))
        sizes = [math.prod(wanted[n]) for n in names]
        for name, chunk in zip(names, torch.split(flat, sizes), strict=True):
            out[name] = chunk.reshape(wanted[name]).clone()
    return out


def _mode_hint(layout: Layout, mode: str, found: Mapping[str, tuple[int, ...]]) -> str:
    """``; it fits federation.lora-aggregation = '...'`` when the record was packed under another mode."""
    fits = [
        other
        for other in LORA_AGGREGATION_MODES
        if other != mode and _packed_sizes(travelling_layout(layout, other)) == dict(found)
    ]
    if not fits:
        return ""
    return (
        f"; the record fits federation.lora-aggregation = {' or '.join(map(repr, fits))}: the server and every "
        "site must run with the same federation.lora-aggregation"
    )
