"""Validation carved from train and K-fold test folds: deterministic, stratified, disjoint."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from shared.data.layouts import CaseRecord
from shared.data.splits import carve_validation, kfold_assignment, with_fold


def cases(benign: int, malignant: int) -> list[CaseRecord]:
    labels = [0] * benign + [1] * malignant
    return [
        CaseRecord(f"c{i:02d}", Path(f"c{i}.nii.gz"), Path(f"m{i}.nii.gz"), y, "train")
        for i, y in enumerate(labels)
    ]


def test_validation_is_carved_per_label_deterministically():
    train, val = carve_validation(cases(10, 5), 0.2, seed=3)
    assert Counter(c.label for c in val) == {0: 2, 1: 1}
    assert all(c.split == "val" for c in val) and len(train) + len(val) == 15
    assert {c.case_id for c in train}.isdisjoint(c.case_id for c in val)
    again = carve_validation(list(reversed(cases(10, 5))), 0.2, seed=3)[
        1
    ]  # order of the input does not matter
    assert [c.case_id for c in sorted(again, key=lambda c: c.case_id)] == sorted(c.case_id for c in val)
    other = carve_validation(cases(10, 5), 0.2, seed=4)[1]
    assert {c.case_id for c in other} != {c.case_id for c in val}


def test_small_labels_keep_two_training_cases_and_zero_carves_nothing():
    train, val = carve_validation(cases(2, 3), 0.5, seed=0)
    assert Counter(c.label for c in val) == {1: 1}  # 2 benign: none spared; 3 malignant: one
    assert carve_validation(cases(10, 5), 0.0, seed=0)[1] == ()
    with pytest.raises(ValueError, match="validation fraction"):
        carve_validation(cases(10, 5), 1.0, seed=0)


def test_kfold_folds_are_disjoint_balanced_and_cover_every_case():
    all_cases = cases(12, 8)
    assignment = kfold_assignment(all_cases, 5, seed=1)
    assert set(assignment) == {c.case_id for c in all_cases} and set(assignment.values()) == set(range(5))
    sizes = Counter(assignment.values())
    assert max(sizes.values()) - min(sizes.values()) <= 1
    for fold in range(5):
        train, val, test = with_fold(all_cases, assignment, fold, 0.2, seed=1)
        ids = [c.case_id for c in (*train, *val, *test)]
        assert len(ids) == len(set(ids)) == len(all_cases)
        assert {c.case_id for c in test} == {cid for cid, f in assignment.items() if f == fold}
        assert {c.label for c in test} == {0, 1}  # each fold keeps both classes
    with pytest.raises(ValueError, match="at least 2 folds"):
        kfold_assignment(all_cases, 1, seed=0)
