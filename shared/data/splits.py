"""Case splits made by fedabus itself: a validation split carved from ``train``, and K-fold test folds.

Both are stratified by label and deterministic: cases are ordered by id, shuffled with
``numpy.random.default_rng(seed)`` per label, and dealt out in that order. The same cases and seed give the same
split in every process (a ClientApp runs in a fresh process per message), so a site trains and validates on
the same cases all run long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from shared.data.layouts import CaseRecord

__all__ = ["carve_validation", "kfold_assignment", "with_fold"]


def _by_label(cases: Sequence[CaseRecord], seed: int) -> list[list[CaseRecord]]:
    """The cases grouped by label (None last), each group shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    groups = []
    for label in sorted({c.label for c in cases}, key=lambda v: (v is None, v)):
        group = sorted((c for c in cases if c.label == label), key=lambda c: c.case_id)
        groups.append([group[i] for i in rng.permutation(len(group))])
    return groups


def _val_count(n: int, fraction: float) -> int:
    if fraction <= 0:
        return 0
    return min(max(round(fraction * n), 1 if n >= 3 else 0), max(n - 2, 0))


def carve_validation(
    train: Sequence[CaseRecord], fraction: float, seed: int
) -> tuple[tuple[CaseRecord, ...], tuple[CaseRecord, ...]]:
    """``(train, val)``: about ``fraction`` of each label's training cases become validation cases.

    Each label gives ``round(fraction * n)`` cases, at least one when it has 3 or more and never its last
    two (both splits keep every label a site has). Returns no validation case when ``fraction`` is 0 or the
    site is too small to spare any. The carved cases' ``split`` becomes ``val``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction {fraction} must lie in [0, 1)")
    kept, carved = [], []
    for group in _by_label(train, seed):
        n = _val_count(len(group), fraction)
        carved += [replace(c, split="val") for c in group[:n]]
        kept += group[n:]
    order = {c.case_id: i for i, c in enumerate(train)}
    return (
        tuple(sorted(kept, key=lambda c: order[c.case_id])),
        tuple(sorted(carved, key=lambda c: order[c.case_id])),
    )


def kfold_assignment(cases: Sequence[CaseRecord], folds: int, seed: int) -> dict[str, int]:
    """``{case_id: fold}`` with folds ``0 .. folds-1`` of (nearly) equal size and label mix: each label's
    shuffled cases are dealt round-robin, continuing where the previous label stopped."""
    if folds < 2:
        raise ValueError(f"K-fold cross-validation needs at least 2 folds, got {folds}")
    if len(cases) < folds:
        raise ValueError(f"{len(cases)} case(s) cannot fill {folds} folds")
    assignment, position = {}, 0
    for group in _by_label(cases, seed):
        for case in group:
            assignment[case.case_id] = position % folds
            position += 1
    return assignment


def with_fold(
    cases: Sequence[CaseRecord], assignment: dict[str, int], fold: int, val_fraction: float, seed: int
) -> tuple[tuple[CaseRecord, ...], tuple[CaseRecord, ...], tuple[CaseRecord, ...]]:
    """``(train, val, test)`` of fold ``fold``: its cases are the test split; validation is carved from the
    rest with :func:`carve_validation` (the site's own val/test labels are ignored in cross-validation)."""
    test = tuple(replace(c, split="test") for c in cases if assignment[c.case_id] == fold)
    rest = [replace(c, split="train") for c in cases if assignment[c.case_id] != fold]
    train, val = carve_validation(rest, val_fraction, seed + fold)
    return train, val, test
