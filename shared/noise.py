"""Third-party warnings a fedabus user cannot act on, hidden by where they come from (never our own).

Each entry names the warning's category and the module it is attributed to, so the same category raised by
fedabus code, or by another library, is still shown. In-process, :func:`hide_third_party_noise` installs the
filters; processes we start (Flower's SuperLink, ServerApp and Ray simulation) get them through
``PYTHONWARNINGS`` (:func:`pythonwarnings`).
"""

from __future__ import annotations

import re
import warnings

__all__ = ["THIRD_PARTY_NOISE", "hide_third_party_noise", "pythonwarnings"]

#: ``(message prefix, category, module)`` of each hidden warning.
THIRD_PARTY_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    # SQLAlchemy's SADeprecationWarning (a DeprecationWarning) about loader options MLflow's SQL store uses.
    ("", DeprecationWarning, "mlflow.store.tracking.sqlalchemy_store"),
    # Ray's "Tip: In future versions of Ray, Ray will no longer override accelerator visible devices ...".
    ("Tip", FutureWarning, "ray._private.worker"),
)


def hide_third_party_noise() -> None:
    """Install the filters in this process (idempotent: :mod:`warnings` drops duplicate filters)."""
    for prefix, category, module in THIRD_PARTY_NOISE:
        warnings.filterwarnings(
            "ignore", message=re.escape(prefix), category=category, module=re.escape(module) + r"\Z"
        )


def pythonwarnings(existing: str = "") -> str:
    """``PYTHONWARNINGS`` holding the filters, then ``existing`` (the user's own settings, which win where they
    overlap: of several matching ``-W`` options the last one acts)."""
    ours = [f"ignore:{prefix}:{category.__name__}:{module}" for prefix, category, module in THIRD_PARTY_NOISE]
    return ",".join([*ours, *filter(None, existing.split(","))])
