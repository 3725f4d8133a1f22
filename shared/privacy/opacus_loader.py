"""Importing Opacus without its side effect on logging.

``opacus.utils.module_utils`` calls ``logging.basicConfig`` when Opacus is imported, which gives the root logger
a handler: every Flower log line then appears twice (Flower's own handler, then the root's). Every fedabus
module imports Opacus lazily, after :func:`load_opacus`, which imports it once and removes the handler it added.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["load_opacus"]


def load_opacus() -> None:
    """Import Opacus (once per process) and undo the root-logger handler its import adds."""
    if "opacus" in sys.modules:
        return
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus  # noqa: F401

    for handler in root.handlers:
        if handler not in before:
            root.removeHandler(handler)
