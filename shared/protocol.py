"""What travels between the server and the sites, and how it is encoded in Flower records.

This is the only module of ``shared`` that imports Flower. A message carries the adapter (both models, keys
``seg.``/``cls.``, float32) as one ``ArrayRecord`` under :data:`ARRAYS`, scalar metrics as a ``MetricRecord``
under :data:`METRICS`, and the round configuration as a ``ConfigRecord`` under :data:`CONFIG`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

__all__ = ["ARRAYS", "CONFIG", "METRICS", "NUM_EXAMPLES", "SITE", "adapter_to_record", "record_to_adapter"]

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
#: ConfigRecord in replies naming the site (``site-id``) and, when it sent no update, why (``declined``).
SITE = "site"
#: The metric Flower's FedAvg weights by; fedabus sets it to the number of training cases.
NUM_EXAMPLES = "num-examples"


def adapter_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Flat adapter tensors -> ``ArrayRecord`` (float32, CPU, sorted names so every site sends the same order)."""
    state = {k: tensors[k].detach().to("cpu", torch.float32).contiguous() for k in sorted(tensors)}
    return ArrayRecord(torch_state_dict=state)


def record_to_adapter(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``ArrayRecord`` -> flat adapter tensors (float32)."""
    return {k: v.to(torch.float32) for k, v in record.to_torch_state_dict().items()}
