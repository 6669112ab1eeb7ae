"""Robust aggregation: a bound on every scalar and an optional trimmed mean.

One broken or hostile agent can send a projected gradient a thousand times too large
every round; averaged in, it moves the model wherever that agent likes. Two defences,
both applied by the coordinator when it closes a round:

* **Clipping.** Each scalar is clipped to ``[-bound, bound]``. The bound is fixed
  (``clip_bound``) or, by default, ``clip_factor`` times the median, over the last
  ``clip_window`` rounds, of each round's median ``|g|``. A median of medians: an agent in
  a minority moves neither, so it cannot raise its own bound.
* **Trimmed mean** (``trim``, off by default): the ``trim`` fraction of the round's
  scalars with the lowest values and the same fraction with the highest are dropped, and
  the rest are averaged with the weights renormalised to the same total.

Determinism: a commit's bits must follow from journaled state, or a resumed run would
drift from one that never stopped. A round's median ``|g|`` (its *scale*) is therefore
written into the journal with its commit, and a resumed coordinator takes the window
from there. Everything here is plain float64 arithmetic and ``sorted`` in a fixed order.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ProtocolError

# No real loss difference over a real epsilon gives this; such a scalar is refused outright.
MAX_SCALAR = 1e12


@dataclass(frozen=True)
class Robustness:
    """How scalars are bounded and trimmed when a round closes."""

    clip_factor: float = 10.0  # bound = factor x running median |g|; 0 = no derived bound
    clip_bound: float = 0.0  # > 0: this fixed bound instead of the derived one
    clip_window: int = 20  # rounds whose scales make the running median
    trim: float = 0.0  # share of the round's scalars dropped at each end, in [0, 0.5)

    def __post_init__(self) -> None:
        for name in ("clip_factor", "clip_bound"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ProtocolError(f"round policy: {name} must be a number >= 0", "bad_policy")
        if not 0 <= self.trim < 0.5:
            raise ProtocolError("round policy: trim must be in [0, 0.5)", "bad_policy")
        if self.clip_window < 1:
            raise ProtocolError("round policy: clip_window must be >= 1", "bad_policy")


def round_scale(scalars: Sequence[float]) -> float | None:
    """The round's scale: the median of ``|g|`` over its accepted scalars (None if none)."""
    return statistics.median(abs(g) for g in scalars) if scalars else None


def scalar_bound(policy: Robustness, past: Sequence[float], current: float | None) -> float:
    """The clipping bound for a round whose own scale is ``current``, after ``past`` scales.

    The round's own scale counts too, so the first round has a bound; a reference of 0
    (every scalar zero so far) bounds nothing rather than zeroing every update.
    """
    if policy.clip_bound > 0:
        return policy.clip_bound
    if policy.clip_factor == 0 or current is None:
        return math.inf
    window = list(past)[-(policy.clip_window - 1):] if policy.clip_window > 1 else []
    reference = statistics.median([*window, current])
    return policy.clip_factor * reference if reference > 0 else math.inf


def trimmed_keep(scalars: Sequence[float], trim: float) -> set[int] | None:
    """Indices (into the round's scalars, in participant order) that survive trimming;
    None when nothing is trimmed. Ties are broken by position, so the choice is fixed."""
    cut = math.floor(trim * len(scalars))
    if cut == 0:
        return None
    order = sorted(range(len(scalars)), key=lambda i: (scalars[i], i))
    return set(order[cut:len(order) - cut])
