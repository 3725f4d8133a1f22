"""The one mapping between Flower's round numbers and the federation's.

Flower's ``Strategy.start`` numbers the rounds of one server process 1, 2, ... (0 is the evaluation before
the first round). A resumed federation continues its own numbering after the rounds its checkpoint holds, so
the process's Flower round ``r`` is federation round ``done_before + r``. Every message to a site, every log
line, checkpoint, summary and MLflow step uses the federation's number; only Flower's loop uses its own.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RoundNumbering"]


@dataclass(frozen=True)
class RoundNumbering:
    """``done_before``: rounds the federation completed before this server process started (0: fresh run)."""

    done_before: int = 0

    def __post_init__(self) -> None:
        if self.done_before < 0:
            raise ValueError(f"done_before must be >= 0 (rounds already done), got {self.done_before}")

    @property
    def resumed(self) -> bool:
        """Whether this process continues a federation that already completed rounds."""
        return self.done_before > 0

    def federation(self, flower_round: int) -> int:
        """The federation's number of Flower's round ``flower_round`` of this process."""
        return self.done_before + flower_round

    def remaining(self, num_rounds: int) -> int:
        """Rounds this process still has to run for a federation of ``num_rounds`` rounds (never negative)."""
        return max(0, num_rounds - self.done_before)
