"""When the warm-up hands over to the ZO phase: a fixed round, or "once updates have
stabilized" (the paper), read here as a plateau of the warm-up's validation accuracy.

The rule sees only the evaluations written to ``metrics.jsonl``, so a resumed run asks it
the same question about the same rows and pivots at the same round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PlateauRule:
    """Pivot after ``patience`` evaluations in a row without a gain of ``min_delta`` over the
    best validation accuracy so far, never before ``min_rounds`` and never after
    ``max_rounds`` warm-up rounds."""

    min_rounds: int
    max_rounds: int
    patience: int
    min_delta: float

    def pivot(self, evaluations: Sequence[tuple[int, float]], done: int) -> int | None:
        """The pivot (the number of warm-up rounds to keep) once ``done`` rounds are
        trained and ``evaluations`` holds their ``(round, validation accuracy)`` pairs in
        order; None while the warm-up should go on."""
        best, stale = -math.inf, 0
        for round_index, accuracy in evaluations:
            if accuracy > best + self.min_delta:
                best, stale = accuracy, 0
            else:
                stale += 1
            rounds = round_index + 1
            if rounds >= self.min_rounds and stale >= self.patience:
                return rounds
        return self.max_rounds if done >= self.max_rounds else None


def validation_curve(rows: Sequence[dict]) -> list[tuple[int, float]]:
    """The warm-up's evaluated rounds and their validation accuracy, from metrics rows."""
    return [(r["round"], r["val_acc"]) for r in rows
            if r.get("phase") == "warmup" and r.get("val_acc") is not None]
