"""The per-site privacy ledger: every DP-SGD step a site has spent, per model, persisted across restarts.

One JSON file, ``privacy_ledger.json``, in a folder the caller gives (the site's state folder)::

    {"format": "fedabus-privacy-ledger", "format_version": 1,
     "models": {"seg": [ENTRY, ...], "cls": [ENTRY, ...]}}

    ENTRY = {"noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 8, "accountant": "rdp",
             "round": 3, "run": "federation", "recorded_at": "2025-01-01T12:00:00+00:00"}

An entry is one round's accountant history of one model (Opacus' ``(noise_multiplier, sample_rate, steps)``)
with where it came from. The cumulative ε of a model is that of all its entries composed
(:func:`shared.privacy.accounting.epsilon_of`), recomputed exactly with the Opacus accountant named in the
entries, at any δ.

Safety rules (losing or resetting a ledger would reset a site's spent budget):

* A file that is not valid JSON, not a fedabus ledger, from a newer format, or holds an invalid entry raises
  :class:`LedgerError` naming the file, on open and on save; it is never overwritten.
* :meth:`PrivacyLedger.save` writes atomically (temporary file, fsync, rename, fsync of the folder), under an
  exclusive lock (``fcntl``, POSIX), appending this object's new entries to what is on disk *now*: two processes
  recording at once both keep their entries. A file that lost entries (or vanished) since it was opened is
  refused rather than rewritten from memory.
* With ``budget`` given, save re-checks the budget under the lock, so two rounds started concurrently at one
  site cannot both spend the last of it (:class:`PrivacyBudgetExceeded`, nothing written).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.atomic import write_text_atomic
from shared.privacy.accounting import HistoryEntry, epsilon_of, merge_history
from shared.privacy.validation import ACCOUNTANTS

__all__ = [
    "BUDGET_TOLERANCE",
    "LEDGER_FILE",
    "LEDGER_FORMAT",
    "MODELS",
    "LedgerEntry",
    "LedgerError",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "exceeds_budget",
]

LEDGER_FILE = "privacy_ledger.json"
LEDGER_FORMAT = "fedabus-privacy-ledger"
FORMAT_VERSION = 1
#: Models a ledger tracks: SAM-Med3D adapter and tri-plane classifier.
MODELS: tuple[str, ...] = ("seg", "cls")
#: Relative slack when comparing ε with a budget: the same history composed in another grouping can differ in
#: the last bits, and a run planned to end exactly at its target ε must not be stopped by rounding.
BUDGET_TOLERANCE = 1e-9
_ADVICE = (
    "the ledger records this site's spent privacy budget and fedabus never overwrites it: restore it from a "
    "backup, or move it away deliberately to reset the site's budget"
)


class LedgerError(ValueError):
    """A ledger file is unreadable, foreign, corrupt or changed behind our back; the message names the file."""


class PrivacyBudgetExceeded(RuntimeError):
    """Training (or recording) would take a model's cumulative ε above the site's budget."""


def exceeds_budget(epsilon: float, budget: float) -> bool:
    """True when ``epsilon`` is above ``budget`` (``inf`` = no budget), beyond :data:`BUDGET_TOLERANCE`."""
    return epsilon > budget * (1.0 + BUDGET_TOLERANCE)


@dataclass(frozen=True)
class LedgerEntry:
    """``steps`` DP-SGD steps of one model at noise multiplier σ and Poisson sample rate q, from ``round`` of
    ``run``; ``accountant`` is the Opacus accountant the site used (``rdp`` or ``prv``)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    round: int = 0
    run: str = ""
    recorded_at: str = ""

    def __post_init__(self) -> None:
        problem = _entry_problem(self)
        if problem:
            raise ValueError(f"ledger entry {asdict(self)}: {problem}")

    def as_history(self) -> HistoryEntry:
        """The entry as Opacus' ``(noise_multiplier, sample_rate, steps)``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _entry_problem(entry: LedgerEntry) -> str:
    if not (_is_number(entry.noise_multiplier) and entry.noise_multiplier > 0):
        return f"noise_multiplier {entry.noise_multiplier!r} must be a finite number > 0"
    if not (_is_number(entry.sample_rate) and 0 < entry.sample_rate <= 1):
        return f"sample_rate {entry.sample_rate!r} must be a number in (0, 1]"
    if not (_is_int(entry.steps) and entry.steps >= 1):
        return f"steps {entry.steps!r} must be an integer >= 1"
    if entry.accountant not in ACCOUNTANTS:
        return f"accountant {entry.accountant!r} must be one of {', '.join(ACCOUNTANTS)}"
    if not (_is_int(entry.round) and entry.round >= 0):
        return f"round {entry.round!r} must be an integer >= 0"
    if not (isinstance(entry.run, str) and isinstance(entry.recorded_at, str)):
        return "run and recorded_at must be strings"
    return ""


_ENTRY_KEYS = frozenset(f.name for f in fields(LedgerEntry))
_Entries = dict[str, tuple[LedgerEntry, ...]]


def _empty() -> _Entries:
    return {model: () for model in MODELS}


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; a privacy ledger tracks {', '.join(MODELS)}")


# ------------------------------------------------------------------------------------------------ file I/O
def _parse_entries(path: Path, model: str, raw: Any) -> tuple[LedgerEntry, ...]:
    if not isinstance(raw, list):
        raise LedgerError(f"{path}: models.{model} must be a list of entries; {_ADVICE}")
    entries = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not set(item) <= _ENTRY_KEYS:
            raise LedgerError(f"{path}: models.{model}[{index}] is not a ledger entry ({item!r}); {_ADVICE}")
        try:
            entries.append(LedgerEntry(**item))
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"{path}: models.{model}[{index}] is invalid: {exc}; {_ADVICE}") from None
    return tuple(entries)


def _parse(path: Path, text: str) -> _Entries:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LedgerError(f"{path}: not valid JSON ({exc}); {_ADVICE}") from None
    if not isinstance(document, dict) or document.get("format") != LEDGER_FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise LedgerError(f"{path}: not a fedabus privacy ledger (format {found!r}); {_ADVICE}")
    version = document.get("format_version")
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise LedgerError(
            f"{path}: ledger format_version {version!r} is not one this fedabus reads (<= {FORMAT_VERSION}); "
            f"{_ADVICE}"
        )
    models = document.get("models")
    if not isinstance(models, dict) or not set(models) <= set(MODELS):
        found = sorted(models) if isinstance(models, dict) else type(models).__name__
        raise LedgerError(
            f"{path}: 'models' must map {', '.join(MODELS)} to entries, found {found}; {_ADVICE}"
        )
    return {model: _parse_entries(path, model, models.get(model, [])) for model in MODELS}


def _read(path: Path) -> _Entries:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{path}: cannot read the privacy ledger ({exc}); {_ADVICE}") from None
    return _parse(path, text)


def _write(path: Path, entries: _Entries) -> None:
    """Write durably and atomically: readers see the old file or the new one, and a crash loses neither."""
    document = {
        "format": LEDGER_FORMAT,
        "format_version": FORMAT_VERSION,
        "models": {model: [asdict(e) for e in entries[model]] for model in MODELS},
    }
    write_text_atomic(path, json.dumps(document, indent=1) + "\n", fsync=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``.<name>.lock`` beside ``path`` for the block (blocks until free)."""
    import fcntl  # POSIX only; sites run Linux

    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ the ledger
class PrivacyLedger:
    """A site's privacy ledger (module docstring). Open with :meth:`open`; new entries are kept in memory by
    :meth:`record` (and already count in :meth:`epsilon`) until :meth:`save` writes them."""

    def __init__(self, path: Path, saved: _Entries, *, on_disk: bool) -> None:
        self._path = path
        self._saved = saved
        self._on_disk = on_disk
        self._pending: dict[str, list[LedgerEntry]] = {model: [] for model in MODELS}

    @classmethod
    def open(cls, folder: str | Path) -> PrivacyLedger:
        """The ledger in ``folder`` (``folder/privacy_ledger.json``), empty when the file does not exist yet
        (it is created by the first :meth:`save`). Raises :class:`LedgerError` for an unusable file or folder."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise LedgerError(f"{folder}: the privacy ledger folder is a file, not a folder")
        path = folder / LEDGER_FILE
        if path.exists() and not path.is_file():
            raise LedgerError(f"{path}: not a file; {_ADVICE}")
        on_disk = path.is_file()
        return cls(path, _read(path) if on_disk else _empty(), on_disk=on_disk)

    @property
    def path(self) -> Path:
        """The ledger file (it may not exist before the first save)."""
        return self._path

    def entries(self, model: str) -> tuple[LedgerEntry, ...]:
        """Saved entries of ``model`` followed by the ones recorded since (not yet saved)."""
        _check_model(model)
        return self._saved[model] + tuple(self._pending[model])

    def history(self, model: str) -> list[HistoryEntry]:
        """The composed accountant history of ``model``: its entries merged by (σ, q) (see accounting)."""
        return merge_history(entry.as_history() for entry in self.entries(model))

    def steps(self, model: str) -> int:
        """DP-SGD steps spent on ``model`` so far."""
        return sum(entry.steps for entry in self.entries(model))

    def accountant(self, model: str, default: str = "rdp") -> str:
        """The accountant of ``model``'s latest entry (``default`` when it has none)."""
        entries = self.entries(model)
        return entries[-1].accountant if entries else default

    def epsilon(self, model: str, delta: float, *, accountant: str | None = None) -> float:
        """Cumulative ε(δ) of ``model``: all its entries composed with ``accountant`` (default: the accountant
        of its latest entry; every entry is the same subsampled Gaussian mechanism, so any accountant gives a
        valid bound). 0 when nothing was spent."""
        return epsilon_of(self.history(model), delta, accountant or self.accountant(model))

    def epsilon_after(
        self,
        model: str,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: str | None = None,
    ) -> float:
        """ε(δ) of ``model`` if ``steps`` more steps at (σ, q) were spent (nothing is recorded)."""
        name = accountant or self.accountant(model)
        extra = [(noise_multiplier, sample_rate, steps)]
        return epsilon_of([*self.history(model), *extra], delta, name)

    def would_exceed(self, model: str, *, budget: float, **spend: Any) -> tuple[bool, float]:
        """(whether ε after those steps would be above ``budget`` (``inf``: never), that ε); ``spend``: the
        keyword arguments of :meth:`epsilon_after` (``noise_multiplier``, ``sample_rate``, ``steps``, ``delta``,
        ``accountant``)."""
        after = self.epsilon_after(model, **spend)
        return exceeds_budget(after, budget), after

    def record(
        self,
        model: str,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: str,
        round: int = 0,  # noqa: A002 - the federated round, as the ledger's JSON names it
        run: str = "",
    ) -> None:
        """Add an entry for ``model`` (in memory; :meth:`save` writes it). Raises ValueError for invalid values."""
        _check_model(model)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        entry = LedgerEntry(float(noise_multiplier), float(sample_rate), steps, accountant, round, run, stamp)
        self._pending[model].append(entry)

    def save(self, *, budget: float | None = None, delta: float | None = None) -> None:
        """Append the recorded entries to the file (module docstring: lock, atomic write, refusals).

        With ``budget`` (and ``delta``), raise :class:`PrivacyBudgetExceeded` and write nothing when a model
        with new entries would end above the budget once combined with what is on disk now.
        """
        if not any(self._pending.values()):
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(self._path):
            merged = self._merged_with_disk()
            if budget is not None:
                self._check_budget(merged, budget, delta)
            _write(self._path, merged)
        self._saved, self._on_disk = merged, True
        self._pending = {model: [] for model in MODELS}

    def _merged_with_disk(self) -> _Entries:
        if self._path.is_file():
            on_disk = _read(self._path)
        elif self._on_disk:
            raise LedgerError(f"{self._path}: the ledger was deleted since it was opened; {_ADVICE}")
        else:
            on_disk = _empty()
        for model in MODELS:
            known = self._saved[model]
            if on_disk[model][: len(known)] != known:
                raise LedgerError(
                    f"{self._path}: entries of {model!r} were removed or changed since the ledger was opened; "
                    f"{_ADVICE}"
                )
        return {model: on_disk[model] + tuple(self._pending[model]) for model in MODELS}

    def _check_budget(
        self, merged: Mapping[str, tuple[LedgerEntry, ...]], budget: float, delta: float | None
    ) -> None:
        if delta is None:
            raise ValueError("save(budget=...) needs the δ the budget is measured at")
        for model in MODELS:
            if not self._pending[model]:
                continue
            history = [entry.as_history() for entry in merged[model]]
            epsilon = epsilon_of(history, delta, merged[model][-1].accountant)
            if exceeds_budget(epsilon, budget):
                raise PrivacyBudgetExceeded(
                    f"{self._path}: recording this round would take {model} to ε = {epsilon:.4g} (δ = {delta:.3g}), "
                    f"above the budget {budget:.4g}; nothing was recorded and the update must not leave the site"
                )
