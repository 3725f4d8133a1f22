"""The per-site privacy ledger (shared/privacy/ledger.py) and ε accounting (shared/privacy/accounting.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from shared.privacy.accounting import epsilon_of, merge_history, noise_multiplier_for
from shared.privacy.ledger import (
    LEDGER_FILE,
    LedgerError,
    PrivacyBudgetExceeded,
    PrivacyLedger,
)
from shared.privacy.validation import PrivacyConfigError

REPO = Path(__file__).resolve().parents[3]
DELTA = 1e-3


def stepped(accountant, sigma: float, rate: float, steps: int) -> float:
    """ε of an Opacus accountant that saw ``steps`` optimiser steps one by one (as the training hook does)."""
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return accountant.get_epsilon(delta=DELTA)


def record_rounds(
    ledger: PrivacyLedger, model: str, rounds: int, steps: int, accountant: str = "rdp"
) -> None:
    for r in range(1, rounds + 1):
        ledger.record(
            model, noise_multiplier=1.1, sample_rate=0.2, steps=steps, accountant=accountant, round=r, run="a"
        )


@pytest.mark.parametrize(("name", "accountant"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_grows_with_steps_and_equals_opacus(tmp_path, name, accountant) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    assert ledger.epsilon("seg", DELTA, accountant=name) == 0.0
    epsilons = []
    for rounds in (1, 2, 3):
        ledger = PrivacyLedger.open(tmp_path / str(rounds))
        record_rounds(ledger, "seg", rounds, steps=5, accountant=name)
        ledger.save()
        epsilons.append(PrivacyLedger.open(tmp_path / str(rounds)).epsilon("seg", DELTA))
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    assert epsilons[2] == pytest.approx(stepped(accountant(), 1.1, 0.2, 15), rel=1e-12)
    assert ledger.epsilon("cls", DELTA) == 0.0  # models are accounted separately


def test_history_merges_equal_mechanisms_and_keeps_others() -> None:
    history = [(1.0, 0.1, 3), (2.0, 0.1, 1), (1.0, 0.1, 4), (1.0, 0.2, 0)]
    assert merge_history(history) == [(1.0, 0.1, 7), (2.0, 0.1, 1)]
    expected = RDPAccountant()
    expected.history = [(1.0, 0.1, 7), (2.0, 0.1, 1)]
    assert epsilon_of(history, DELTA, "rdp") == expected.get_epsilon(delta=DELTA)
    with pytest.raises(PrivacyConfigError, match="privacy.accountant"):
        epsilon_of(history, DELTA, "gdp-ish")


def test_noise_multiplier_meets_the_target() -> None:
    sigma = noise_multiplier_for(
        target_epsilon=4.0, delta=DELTA, sample_rate=0.25, steps=40, accountant="rdp"
    )
    assert 3.98 <= epsilon_of([(sigma, 0.25, 40)], DELTA, "rdp") <= 4.0
    with pytest.raises(PrivacyConfigError, match="target-epsilon"):
        noise_multiplier_for(target_epsilon=1e-6, delta=DELTA, sample_rate=0.9, steps=10**6, accountant="rdp")


def test_would_exceed_and_record_only_in_memory_until_saved(tmp_path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    one_round = epsilon_of([(1.1, 0.2, 5)], DELTA, "rdp")
    over, after = ledger.would_exceed(
        "cls", noise_multiplier=1.1, sample_rate=0.2, steps=5, delta=DELTA, budget=one_round
    )
    assert not over and after == one_round
    record_rounds(ledger, "cls", 1, steps=5)
    over, after = ledger.would_exceed(
        "cls", noise_multiplier=1.1, sample_rate=0.2, steps=5, delta=DELTA, budget=one_round
    )
    assert over and after > one_round
    assert not (tmp_path / LEDGER_FILE).exists()
    ledger.save()
    assert PrivacyLedger.open(tmp_path).steps("cls") == 5


def test_ledger_survives_a_process_restart(tmp_path) -> None:
    write = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(REPO)!r})
        from shared.privacy.ledger import PrivacyLedger
        ledger = PrivacyLedger.open({str(tmp_path)!r})
        ledger.record("seg", noise_multiplier=1.1, sample_rate=0.2, steps=7, accountant="rdp", round=1, run="r")
        ledger.save()
        """
    )
    read = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(REPO)!r})
        from shared.privacy.ledger import PrivacyLedger
        ledger = PrivacyLedger.open({str(tmp_path)!r})
        print(repr(ledger.epsilon("seg", {DELTA!r})), ledger.entries("seg")[0].round)
        """
    )
    subprocess.run([sys.executable, "-c", write], check=True, timeout=60)
    out = subprocess.run(
        [sys.executable, "-c", read],
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    epsilon, round_ = out.stdout.split()
    assert float(epsilon) == stepped(RDPAccountant(), 1.1, 0.2, 7) and round_ == "1"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        (json.dumps({"format": "something-else", "models": {}}), "not a fedabus privacy ledger"),
        (json.dumps([1, 2]), "not a fedabus privacy ledger"),
        (
            json.dumps({"format": "fedabus-privacy-ledger", "format_version": 99, "models": {}}),
            "format_version",
        ),
        (
            json.dumps(
                {"format": "fedabus-privacy-ledger", "format_version": 1, "models": {"seg": [{"x": 1}]}}
            ),
            r"models.seg\[0\]",
        ),
        (
            json.dumps(
                {
                    "format": "fedabus-privacy-ledger",
                    "format_version": 1,
                    "models": {
                        "seg": [
                            {"noise_multiplier": 1.0, "sample_rate": 2.0, "steps": 3, "accountant": "rdp"}
                        ]
                    },
                }
            ),
            "sample_rate",
        ),
    ],
)
def test_corrupt_or_foreign_file_is_refused_and_never_overwritten(tmp_path, content, message) -> None:
    path = tmp_path / LEDGER_FILE
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LedgerError, match=message) as caught:
        PrivacyLedger.open(tmp_path)
    assert str(path) in str(caught.value)
    assert path.read_text(encoding="utf-8") == content


def test_a_file_corrupted_after_opening_is_not_overwritten(tmp_path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    record_rounds(ledger, "seg", 1, steps=3)
    ledger.save()
    (tmp_path / LEDGER_FILE).write_text("garbage", encoding="utf-8")
    record_rounds(ledger, "seg", 1, steps=3)
    with pytest.raises(LedgerError, match="not valid JSON"):
        ledger.save()
    assert (tmp_path / LEDGER_FILE).read_text(encoding="utf-8") == "garbage"


def test_removed_entries_or_a_deleted_file_are_refused(tmp_path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    record_rounds(ledger, "seg", 2, steps=3)
    ledger.save()
    document = json.loads((tmp_path / LEDGER_FILE).read_text(encoding="utf-8"))
    document["models"]["seg"].pop()
    (tmp_path / LEDGER_FILE).write_text(json.dumps(document), encoding="utf-8")
    record_rounds(ledger, "seg", 1, steps=3)
    with pytest.raises(LedgerError, match="removed or changed"):
        ledger.save()
    (tmp_path / LEDGER_FILE).unlink()
    with pytest.raises(LedgerError, match="deleted"):
        ledger.save()
    assert not (tmp_path / LEDGER_FILE).exists()


def test_two_writers_keep_both_entries(tmp_path) -> None:
    first, second = PrivacyLedger.open(tmp_path), PrivacyLedger.open(tmp_path)
    record_rounds(first, "seg", 1, steps=2)
    record_rounds(second, "seg", 1, steps=5)
    first.save()
    second.save()
    assert PrivacyLedger.open(tmp_path).steps("seg") == 7


def test_save_rechecks_the_budget_and_writes_nothing_when_exceeded(tmp_path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    record_rounds(ledger, "seg", 1, steps=5)
    budget = ledger.epsilon("seg", DELTA)
    ledger.save(budget=budget, delta=DELTA)  # exactly at the budget is allowed
    other = PrivacyLedger.open(tmp_path)
    record_rounds(other, "seg", 1, steps=1)
    with pytest.raises(PrivacyBudgetExceeded, match="above the budget"):
        other.save(budget=budget, delta=DELTA)
    assert PrivacyLedger.open(tmp_path).steps("seg") == 5


def test_bad_records_and_folders_are_refused(tmp_path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    with pytest.raises(ValueError, match="unknown model"):
        ledger.record("both", noise_multiplier=1.0, sample_rate=0.1, steps=1, accountant="rdp")
    with pytest.raises(ValueError, match="steps"):
        ledger.record("seg", noise_multiplier=1.0, sample_rate=0.1, steps=0, accountant="rdp")
    with pytest.raises(ValueError, match="accountant"):
        ledger.record("seg", noise_multiplier=1.0, sample_rate=0.1, steps=1, accountant="moments")
    a_file = tmp_path / "state"
    a_file.write_text("", encoding="utf-8")
    with pytest.raises(LedgerError, match="is a file"):
        PrivacyLedger.open(a_file)
