"""ε of DP-SGD histories with Opacus' own accountants, and the noise multiplier for a target ε.

A history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, the format of Opacus'
``IAccountant.history``: ``steps`` steps of the Poisson-subsampled Gaussian mechanism with that noise multiplier
σ (noise std = σ × max-grad-norm) and sample rate q. Composition does not depend on order, so entries with the
same (σ, q) are merged (their steps summed, first-appearance order) before the accountant sees them; Opacus'
accountants merge consecutive equal steps the same way, so a ledger that records a round's accountant history
gives exactly the ε of an accountant that ran all those steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

from shared.privacy.opacus_loader import load_opacus
from shared.privacy.validation import ACCOUNTANTS, PrivacyConfigError

__all__ = ["HistoryEntry", "epsilon_of", "merge_history", "noise_multiplier_for"]

#: ``(noise_multiplier, sample_rate, steps)``, as in Opacus' accountant history.
HistoryEntry = tuple[float, float, int]


def merge_history(history: Iterable[HistoryEntry]) -> list[HistoryEntry]:
    """Entries with equal (σ, q) merged (steps summed) in first-appearance order; entries of 0 steps dropped."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, rate, count in history:
        if count > 0:
            key = (float(sigma), float(rate))
            steps[key] = steps.get(key, 0) + int(count)
    return [(sigma, rate, count) for (sigma, rate), count in steps.items()]


def _accountant(name: str):  # -> opacus.accountants.IAccountant
    if name not in ACCOUNTANTS:
        raise PrivacyConfigError(
            f"privacy.accountant = {name!r} is unknown; choose one of {', '.join(ACCOUNTANTS)}"
        )
    load_opacus()
    from opacus.accountants import create_accountant  # imported here: importing Opacus takes over a second

    return create_accountant(mechanism=name)


def epsilon_of(history: Iterable[HistoryEntry], delta: float, accountant: str) -> float:
    """ε(δ) of the composed ``history`` with Opacus' ``accountant`` (``rdp`` or ``prv``); 0 for no steps.

    ``prv`` returns Opacus' upper bound (``eps_error`` 0.01), ``rdp`` the best bound over Opacus' default orders.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"δ = {delta!r} must lie in (0, 1)")
    merged = merge_history(history)
    if not merged:
        return 0.0
    counter = _accountant(accountant)
    counter.history = merged
    return float(counter.get_epsilon(delta=delta))


def noise_multiplier_for(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier σ with which ``steps`` DP-SGD steps at ``sample_rate`` spend at most
    ``target_epsilon`` at ``delta`` (Opacus' ``get_noise_multiplier``: binary search, tolerance 0.01 below the
    target). Raises PrivacyConfigError naming ``privacy.target-epsilon`` when no σ up to Opacus' limit reaches it.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyConfigError(f"privacy.target-epsilon = {target_epsilon!r} must be finite and > 0 here")
    if steps < 1:
        raise ValueError(f"a noise multiplier needs at least one planned step, got {steps}")
    _accountant(accountant)  # refuse unknown names before Opacus does
    load_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            # the binary search probes extreme σ, where the best RDP order sits at the edge of Opacus' range
            warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
    except ValueError as exc:
        raise PrivacyConfigError(
            f"privacy.target-epsilon = {target_epsilon} cannot be reached at δ = {delta:.3g} with {steps} steps "
            f"at sample rate {sample_rate:.3g} ({exc}); raise it, or train fewer rounds/epochs"
        ) from None
