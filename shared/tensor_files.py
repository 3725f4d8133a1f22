"""File conventions shared by adapters and bases: a ``NAME.safetensors`` + ``NAME.json`` pair written
atomically (:func:`shared.atomic.atomic_write`, re-exported here for :mod:`shared.base`), and one wording for
"these tensors do not fit" errors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from shared.atomic import atomic_write

__all__ = ["atomic_write", "describe_mismatch", "pair_paths"]


def pair_paths(path: str | Path) -> tuple[Path, Path]:
    """``X``, ``X.safetensors`` or ``X.json`` -> (``X.safetensors``, ``X.json``)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def describe_mismatch(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], *, max_names: int = 5
) -> list[str]:
    """The first missing, unexpected and mis-shaped names (expected order), one phrase per kind; empty if equal."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: expected {tuple(expected[k])}, found {tuple(found[k])}"
        for k in expected
        if k in found and tuple(expected[k]) != tuple(found[k])
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" (+{len(items) - max_names} more)" if len(items) > max_names else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:max_names])}{more}")
    return problems
