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
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from shared.adapters import AdapterMismatchError
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


def adapter_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Adapter tensors -> ``ArrayRecord`` with one flat float32 array per model prefix (see module docstring)."""
    packed = {}
    for prefix, names in _groups(list(tensors)).items():
        flat = [tensors[n].detach().to("cpu", torch.float32).reshape(-1) for n in names]
        packed[prefix] = Array(torch.cat(flat).numpy())
    return ArrayRecord(packed)


def record_to_adapter(record: ArrayRecord, layout: Layout) -> dict[str, torch.Tensor]:
    """``ArrayRecord`` of :func:`adapter_to_record` -> adapter tensors (float32) of ``layout``.

    Raises :class:`~shared.adapters.AdapterMismatchError` when the record's arrays do not fit the layout (other
    models, other sizes: the sender built its adapter from another base or other adapter settings)."""
    groups = _groups(list(layout))
    expected = {prefix: (sum(math.prod(layout[n]) for n in names),) for prefix, names in groups.items()}
    found = {key: tuple(record[key].shape) for key in record.keys()}
    problems = describe_mismatch(expected, found)
    if problems:
        raise AdapterMismatchError(
            "received adapter does not fit this model's adapter layout (packed sizes per model): "
            + "; ".join(problems)
        )
    out: dict[str, torch.Tensor] = {}
    for prefix, names in groups.items():
        flat = torch.from_numpy(np.ascontiguousarray(record[prefix].numpy(), dtype=np.float32))
        sizes = [math.prod(layout[n]) for n in names]
        for name, chunk in zip(names, torch.split(flat, sizes), strict=True):
            out[name] = chunk.reshape(layout[name]).clone()
    return out
