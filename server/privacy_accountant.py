"""The client-level DP accountant: one sampled Gaussian mechanism per released round, composed with Opacus' RDP
analysis, journalled so that a restarted server resumes the exact ledger (see :mod:`server.privacy` for what is
protected and how the sampling rate is chosen)."""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from shared.config import ConfigError
from shared.privacy.opacus_loader import load_opacus

__all__ = ["RDP_ORDERS", "ClientPrivacyAccountant"]

#: RDP orders: Opacus' defaults extended upwards (few rounds with large noise multipliers need large orders).
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(12, 64)]
    + [64.0, 96.0, 128.0, 256.0, 512.0]
)


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
        """Write the ledger to ``path`` (atomically) at every release, before the noisy adapter goes out.

        The checkpoint is written only at the end of a round, after the new adapter was sent for evaluation; a
        server that dies in between would otherwise resume without that release and spend it again unaccounted.
        An existing journal with more releases than the accountant holds (a previous, crashed run in the same
        work folder) is taken over: its releases happened. Delete the file deliberately to start from zero."""
        self.journal = Path(path)
        if self.journal.is_file():
            try:
                saved = json.loads(self.journal.read_text(encoding="utf-8"))
                entries = [(float(z), float(q)) for z, q in saved["releases"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{self.journal}: unreadable client-level DP journal ({exc}); not overwritten"
                ) from None
            if len(entries) > len(self._ledger):
                self.restore(entries)
        self._write_journal()

    def _write_journal(self) -> None:
        if self.journal is None:
            return
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text(json.dumps({"delta": self.delta, "releases": self.ledger()}) + "\n", encoding="utf-8")
        tmp.replace(self.journal)

    @property
    def releases(self) -> int:
        """Number of noisy aggregates released so far."""
        return len(self._ledger)

    def compose(self, noise_multiplier: float, sample_rate: float) -> None:
        """Record one release with noise multiplier ``σ`` (noise std / sensitivity) at sampling rate ``q``."""
        if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
            raise ValueError(f"noise multiplier {noise_multiplier!r} must be finite and >= 0")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sampling rate {sample_rate!r} must lie in (0, 1]")
        self._ledger.append((float(noise_multiplier), float(sample_rate)))
        self._write_journal()

    def epsilon(self, *, amplification: bool = True) -> float:
        """ε at :attr:`delta` after all releases (0 before the first; inf if one had no noise).

        ``amplification=False`` takes every sampling rate as 1: the bound that holds however sites were sampled.
        """
        if not self._ledger:
            return 0.0
        if any(z == 0 for z, _ in self._ledger):
            return math.inf
        load_opacus()
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        steps = Counter((z, q if amplification else 1.0) for z, q in self._ledger)
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
        holds more releases wins (they happened after the checkpoint was written)."""
        entries = [tuple(float(v) for v in entry) for entry in ledger]
        journal, self.journal = self.journal, None  # do not rewrite the journal entry by entry
        try:
            self._ledger = []
            for z, q in entries:
                self.compose(z, q)
        finally:
            self.journal = journal
        if journal is not None and journal.is_file():
            saved = json.loads(journal.read_text(encoding="utf-8"))["releases"]
            if len(saved) > len(self._ledger):
                self._ledger = [(float(z), float(q)) for z, q in saved]
        self._write_journal()
