"""Import MONAI in the ClientApp process without the integrations a site never uses.

Flower starts a fresh process for every message of a deployed site (``isolation=subprocess``), and each one
imports the handler module :mod:`client.app`. Any ``import monai.x`` runs MONAI's package ``__init__``, which
imports every subpackage (``load_submodules``). Three of them pull in large libraries only for features fedabus
does not use at a site:

* ``monai.handlers.mlflow_handler`` (Ignite's MLflow handler) imports ``mlflow`` and with it pandas, pyarrow,
  FastAPI and OpenTelemetry. The site never talks to MLflow; the server tracks the run.
* ``monai.utils.jupyter_utils`` and ``monai.visualize`` import ``matplotlib.pyplot``.
* ``monai.networks.nets.transchex`` imports transformers' BERT (and through it ``torch.distributed.tensor``).

MONAI asks for each of these with its ``optional_import``, which catches a failed import and hands out a stand-in
that raises only when the feature is used. :func:`import_monai` imports MONAI once with these three libraries
made unimportable for the duration of that import, so MONAI takes its "not installed" path for them. Nothing else
changes: the block is lifted before anything else is imported, so later imports (PEFT imports transformers when a
train or evaluate message builds the models; fedabus' Grad-CAM figures import matplotlib) load the real libraries.
A library that is already imported is used as it is. Only MONAI's transchex network, MLflow handler and plotting
helpers are left unusable in this process; fedabus uses none of them. Measured effect: docs/performance.md,
"Site setup per message".

:mod:`client.app` imports this module before any other fedabus module, and importing it runs
:func:`import_monai`. If a MONAI release imports one of these without ``optional_import``, ``import monai`` fails here with the name
of the library, and ``tests/client/test_monai_import.py`` fails with it: drop that name from
:data:`KEPT_OUT`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["KEPT_OUT", "import_monai", "kept_out"]

#: Top-level packages MONAI's own import may not load in the ClientApp process.
KEPT_OUT = ("mlflow", "matplotlib", "transformers")


class _KeepOut(importlib.abc.MetaPathFinder):
    """Refuses ``names`` (and their submodules) as if they were not installed."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(name for name in names if name not in sys.modules)  # imported ones stay usable

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(
                f"{fullname} is kept out of MONAI's import in the ClientApp (client/monai_import.py)",
                name=fullname,
            )
        return None


@contextmanager
def kept_out(names: Sequence[str]) -> Iterator[None]:
    """While inside, importing any of ``names`` that is not imported yet raises ModuleNotFoundError."""
    finder = _KeepOut(names)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def import_monai() -> None:
    """Import MONAI without :data:`KEPT_OUT` (module docstring); nothing when MONAI is already imported."""
    if "monai" in sys.modules:
        return
    with kept_out(KEPT_OUT):
        importlib.import_module("monai")


import_monai()
