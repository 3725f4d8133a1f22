"""A process-wide, size-bounded memory of preprocessed cases (``data.case-cache-mb``).

Every epoch of both models, and every evaluation, reads each case's NIfTI files and runs
:func:`~shared.data.transforms.preprocess_case` again (resampling to the target spacing, intensity
normalisation): in one demo round a training case is loaded six times (three epochs of each model), and the
validation and test cases again at every evaluation. With ``data.case-cache-mb`` above 0 the first load of a case
is kept in memory and later loads get a copy of it, for the life of the process: across epochs and models within
one message and, in simulation (Ray actors live for the whole run), across rounds and evaluations.

The loaded arrays are the same values either way (the cache stores what :class:`~shared.data.loaders.LoadCased`
returned and hands out copies, so no later transform can change what the next reader gets); only random draws
(crops, augmentation) come after it and stay fresh. A case is recognised by its image and mask paths with their
size and modification time, the whole :class:`~shared.config.DataConfig` apart from this setting, and the site's
reading overrides; a file that changes is read again. Least recently used cases are dropped beyond the limit, and a
case larger than the whole limit is never kept (full-size ABUS volumes at a site: the default 0 keeps nothing).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import DataConfig, SiteConfig
from shared.data.layouts import CaseRecord

__all__ = ["CaseCache", "PROCESS_CACHE", "case_key"]

MIB = 2**20


def _stamp(path: Path | None) -> tuple[str, int, int] | None:
    """(path, size in bytes, modification time in ns) of ``path``; None for no file."""
    if path is None:
        return None
    stat = Path(path).stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def case_key(case: CaseRecord, config: DataConfig, site_config: SiteConfig | None) -> Hashable:
    """What a loaded case depends on: its files (path, size, mtime), the data config (minus
    ``case_cache_mb``) and the site's reading overrides."""
    return (
        _stamp(case.image),
        _stamp(case.mask),
        case.case_id,
        case.label,
        case.birads,
        replace(config, case_cache_mb=0),
        repr(site_config),
    )


def _nbytes(item: Mapping[str, Any]) -> int:
    return sum(value.nbytes for value in item.values() if isinstance(value, np.ndarray))


def _copy(item: Mapping[str, Any]) -> dict[str, Any]:
    """A copy whose arrays are the caller's own (the other values are immutable: numbers, strings, frozen
    dataclasses, tuples)."""
    return {key: value.copy() if isinstance(value, np.ndarray) else value for key, value in item.items()}


class CaseCache:
    """Least-recently-used loaded cases, at most ``max_bytes`` of arrays in all (thread-safe)."""

    def __init__(self) -> None:
        self._items: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes of arrays held now."""
        return sum(self._sizes.values())

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._sizes.clear()
            self.hits = self.misses = 0

    def load(self, key: Hashable, loader: Callable[[], dict[str, Any]], *, max_bytes: int) -> dict[str, Any]:
        """The item for ``key``: a copy of the kept one, else ``loader()`` (kept when ``max_bytes`` > 0 and it
        fits, evicting the least recently used items beyond ``max_bytes``)."""
        if max_bytes <= 0:
            return loader()
        with self._lock:
            kept = self._items.get(key)
            if kept is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return _copy(kept)
            self.misses += 1
        item = loader()
        size = _nbytes(item)
        if size > max_bytes:
            return item
        with self._lock:
            self._items[key] = _copy(item)
            self._sizes[key] = size
            self._items.move_to_end(key)
            while sum(self._sizes.values()) > max_bytes:
                oldest, _ = self._items.popitem(last=False)
                del self._sizes[oldest]
        return item


#: The cache of this process (a Ray actor keeps it across a simulation's rounds).
PROCESS_CACHE = CaseCache()
