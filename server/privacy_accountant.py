"""The client-level DP accountant: one sampled Gaussian mechanism per released round, composed with Opacus' RDP
analysis, journalled so that a restarted server resumes the exact ledger (see :mod:`server.privacy` for what is
protected and how the sampling rate is chosen).

The journal (``client_privacy_journal.json`` in the server's work folder) is rewritten atomically and fsynced
(:mod:`shared.atomic`) at every release, before the noisy adapter goes out::

    {"format": "fedabus-client-privacy-journal", "format_version": 1, "delta": 1e-05,
     "releases": [[SIGMA, Q], ...]}

Like the sites' sample-level ledger (:mod:`shared.privacy.ledger`) it is never overwritten when unreadable, and a
resume whose checkpoint holds releases refuses to go on without it (:class:`ClientPrivacyJournalError`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from shared.atomic import write_text_atomic
from shared.config import ConfigError
from shared.privacy.opacus_loader import load_opacus

__all__ = [
    "JOURNAL_FORMAT",
    "RDP_ORDERS",
    "ClientPrivacyAccountant",
    "ClientPrivacyJournalError",
    "read_journal",
]

#: RDP orders: Opacus' defaults extended upwards (few rounds with large noise multipliers need large orders).
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(12, 64)]
    + [64.0, 96.0, 128.0, 256.0, 512.0]
)
JOURNAL_FORMAT = "fedabus-client-privacy-journal"
_JOURNAL_VERSION = 1
_ADVICE = (
    "it records the client-level ε this federation has spent and fedabus never overwrites or rebuilds it: restore "
    "it from a backup, or move the work folder's journal away deliberately to restart the budget from zero"
)


class ClientPrivacyJournalError(ValueError):
    """The client-level DP journal is unreadable, foreign, or missing where releases were made; names the file."""


def _validated(noise_multiplier: float, sample_rate: float) -> tuple[float, float]:
    """``(σ, q)`` as floats; ValueError unless σ is finite and >= 0 and q lies in (0, 1]."""
    z, q = float(noise_multiplier), float(sample_rate)
    if not math.isfinite(z) or z < 0:
        raise ValueError(f"noise multiplier {noise_multiplier!r} must be finite and >= 0")
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate {sample_rate!r} must lie in (0, 1]")
    return z, q


def read_journal(path: Path) -> list[tuple[float, float]]:
    """The releases ``[(σ, q), ...]`` of the journal at ``path``; :class:`ClientPrivacyJournalError` naming the
    file when it is not valid JSON, another format or a newer version, or holds an invalid release."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("format", JOURNAL_FORMAT) != JOURNAL_FORMAT:
            raise ValueError(f"format {saved.get('format')!r}, expected {JOURNAL_FORMAT!r}")
        if saved.get("format_version", _JOURNAL_VERSION) > _JOURNAL_VERSION:
            raise ValueError(f"format_version {saved['format_version']!r} is newer than this fedabus reads")
        return [_validated(z, q) for z, q in saved["releases"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ClientPrivacyJournalError(
            f"{path}: unreadable client-level DP journal ({exc}); not overwritten: {_ADVICE}"
        ) from None


class ClientPrivacyAccountant:
    """Client-level (ε, δ) of the released global adapters: one sampled Gaussian mechanism per release (RDP).

    The ledger holds ``(noise multiplier, sampling rate)`` per release; ε is recomputed from it (Opacus'
    RDP analysis and its RDP -> (ε, δ) conversion, Balle et al. 2020) over :data:`RDP_ORDERS`.
    """

    def __init__(self, delta: float, orders: Sequence[float] = RDP_ORDERS) -> None:
        if not math.isfinite(delta) or not 0 < delta < 1:
            raise ConfigError(f"privacy.client-delta = {delta!r} must lie strictly between 0 and 1")
        self.delta = float(delta)
        self.orders = [float(a) for a in orders]
        self._ledger: list[tuple[float, float]] = []
        #: File that receives the ledger at every release (see :meth:`keep_journal`); None: memory only.
        self.journal: Path | None = None

    def keep_journal(self, path: Path) -> None:
        """Write the ledger to ``path`` (atomically, fsynced) at every release, before the noisy adapter goes out.

        The checkpoint is written only at the end of a round, after the new adapter was sent for evaluation; a
        server that dies in between would otherwise resume without that release and spend it again unaccounted.
        An existing journal with more releases than the accountant holds (a previous, crashed run in the same
        work folder) is taken over: its releases happened. Delete the file deliberately to start from zero.
        A missing journal is not created until the first release, so :meth:`restore` can tell it is missing."""
        self.journal = Path(path)
        if self.journal.is_file():
            entries = read_journal(self.journal)
            if len(entries) > len(self._ledger):
                self._ledger = entries
            self._write_journal()

    def _write_journal(self) -> None:
        if self.journal is None:
            return
        content = {
            "format": JOURNAL_FORMAT,
            "format_version": _JOURNAL_VERSION,
            "delta": self.delta,
            "releases": self.ledger(),
        }
        write_text_atomic(self.journal, json.dumps(content) + "\n", fsync=True)

    @property
    def releases(self) -> int:
        """Number of noisy aggregates released so far."""
        return len(self._ledger)

    def compose(self, noise_multiplier: float, sample_rate: float) -> None:
        """Record one release with noise multiplier ``σ`` (noise std / sensitivity) at sampling rate ``q``."""
        self._ledger.append(_validated(noise_multiplier, sample_rate))
        self._write_journal()

    def epsilon_after(self, noise_multiplier: float, sample_rate: float) -> float:
        """ε at :attr:`delta` if one more release ``(σ, q)`` were composed (nothing is recorded): the check a
        budget stop makes before a round runs."""
        return self._epsilon_of(
            [*self._ledger, _validated(noise_multiplier, sample_rate)], amplification=True
        )

    def epsilon(self, *, amplification: bool = True) -> float:
        """ε at :attr:`delta` after all releases (0 before the first; inf if one had no noise).

        ``amplification=False`` takes every sampling rate as 1: the bound that holds however sites were sampled.
        """
        return self._epsilon_of(self._ledger, amplification=amplification)

    def _epsilon_of(self, releases: Sequence[tuple[float, float]], *, amplification: bool) -> float:
        if not releases:
            return 0.0
        if any(z == 0 for z, _ in releases):
            return math.inf
        load_opacus()
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        steps = Counter((z, q if amplification else 1.0) for z, q in releases)
        rdp = sum(
            np.asarray(compute_rdp(q=q, noise_multiplier=z, steps=n, orders=self.orders))
            for (z, q), n in steps.items()
        )
        with (
            warnings.catch_warnings()
        ):  # "optimal order is the largest alpha": the bound is valid, just loose
            warnings.simplefilter("ignore")
            epsilon, _ = get_privacy_spent(orders=self.orders, rdp=rdp, delta=self.delta)
        return float(epsilon)

    def spent(self) -> tuple[float, float]:
        """``(ε, δ)`` at the rounds' sampling rates."""
        return self.epsilon(), self.delta

    def ledger(self) -> list[list[float]]:
        """JSON form of the releases, ``[[σ, q], ...]`` (checkpointed with the strategy state)."""
        return [[z, q] for z, q in self._ledger]

    def restore(self, ledger: Iterable[Sequence[float]]) -> None:
        """Replace the releases by a saved :meth:`ledger` (resume after a restart); a journal that already
        holds more releases wins (they happened after the checkpoint was written).

        Raises :class:`ClientPrivacyJournalError` when this accountant keeps a journal, the file is missing and
        ``ledger`` holds releases: a release after the checkpoint cannot be ruled out, so fedabus does not go on.
        The checkpoint's releases are then written beside it as ``<journal>.from-checkpoint`` for the operator
        to review and, if no noisy adapter went out after that checkpoint, rename to the journal."""
        entries = [_validated(z, q) for z, q in ledger]
        journal = self.journal
        if journal is not None and entries and not journal.is_file():
            draft = journal.with_name(journal.name + ".from-checkpoint")
            memory_only = ClientPrivacyAccountant(self.delta, self.orders)
            memory_only._ledger, memory_only.journal = entries, draft
            memory_only._write_journal()
            raise ClientPrivacyJournalError(
                f"{journal}: missing, but the checkpoint holds {len(entries)} client-level DP release(s); a "
                "release made after that checkpoint would be lost, so the run does not resume. Restore the "
                f"journal from a backup; or, if you are sure no round released an adapter after the checkpoint, "
                f"rename {draft.name} (the checkpoint's releases, written just now) to {journal.name}"
            )
        saved = read_journal(journal) if journal is not None and journal.is_file() else []
        self._ledger = saved if len(saved) > len(entries) else entries
        self._write_journal()
