"""Discrete prompts as seeded policy-gradient steps: the commit machinery, unchanged.

A discrete prompt is ``n`` tokens, each drawn from a categorical distribution over ``K``
candidate tokens; the state is the ``(n, K)`` float32 logits ``a`` (the one tensor of the
model's weights). BDPL trains it with a variance-reduced policy gradient: draw ``I``
prompts, score each through the black box, and step along

    g = 1/(I-1) * sum_j (L_j - mean L) * grad_a log p(prompt_j)

Each draw comes from a seed, exactly as a ZO direction does, and ``grad_a log p(prompt_j)``
is ``onehot(prompt_j) - softmax(a)``: a function of the seed and of the state every holder
shares. So a device sends one scalar per draw (its advantage, ``(L_j - mean L) I/(I-1)``),
the coordinator aggregates them into ``(seed, coefficient)`` pairs as for SPSA, and every
holder applies the commit by regenerating the draws. FedAvg of the clients' updated
distributions is what the commit computes; the uplink stays a few scalars.

Determinism is the spec's business, as for directions: probabilities come from an ``exp``
written with float64 basic operations and ``ldexp``, sums and CDFs are sequential
(``cumsum``), and draw ``j`` of a prompt takes word ``j`` of the Philox stream of key
``(seed, 0)`` as a 53-bit uniform.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .directions import raw_words
from .errors import ProtocolError

_LN2_HI, _LN2_LO = 0.693145751953125, 1.4286068203094173e-06
_INV_LN2 = 1.4426950408889634


def exp_nonpositive(x: np.ndarray) -> np.ndarray:
    """``exp(x)`` for float64 ``x <= 0``, from +, -, *, floor and exact ``ldexp`` only."""
    x = np.maximum(np.asarray(x, dtype=np.float64), -700.0)
    k = np.floor(x * _INV_LN2 + 0.5)
    r = (x - k * _LN2_HI) - k * _LN2_LO  # |r| <= ~0.347
    acc = np.full_like(r, 1.0 / 6227020800.0)  # 1/13!
    for n in range(12, 0, -1):
        acc = acc * r / n + 1.0
    return np.ldexp(acc, k.astype(np.int64))


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(n, K)`` logits in float64, the same bits on every platform."""
    a = np.asarray(logits, dtype=np.float64)
    e = exp_nonpositive(a - a.max(axis=1, keepdims=True))
    return e / np.cumsum(e, axis=1)[:, -1:]


def sample(seed: int, probs: np.ndarray) -> np.ndarray:
    """The prompt of ``seed``: one candidate index per row of ``probs``."""
    n = probs.shape[0]
    u = (raw_words(seed, 0, 0, n) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    cdf = np.cumsum(probs, axis=1)
    picks = [int(np.searchsorted(cdf[i], u[i] * cdf[i, -1], side="right")) for i in range(n)]
    return np.minimum(np.array(picks, dtype=np.int64), probs.shape[1] - 1)


def best(logits: np.ndarray) -> np.ndarray:
    """The most likely prompt: the argmax of each row (the tuned prompt that is deployed)."""
    return np.argmax(np.asarray(logits), axis=1).astype(np.int64)


def advantages(losses: Sequence[float]) -> tuple[float, ...]:
    """``(L_j - mean L) * I / (I - 1)`` per draw: with the aggregate's ``1/I``, BDPL's
    ``1/(I-1)`` baseline-corrected estimate. Needs two draws or more."""
    if len(losses) < 2:
        raise ProtocolError("a policy-gradient step needs at least 2 draws", "bad_policy")
    values = np.asarray(losses, dtype=np.float64)
    mean = np.cumsum(values)[-1] / values.size
    scale = values.size / (values.size - 1)
    return tuple(float((value - mean) * scale) for value in values)


class Pairs(Protocol):
    """A commit as this module reads it: its (seed, coefficient) pairs, in order."""

    pairs: Sequence[tuple[int, float]]


def apply_policy_commit(weights: Sequence[np.ndarray], commit: Pairs) -> None:
    """In place: ``a <- fl32(a - sum_j c_j (onehot(prompt_j) - softmax(a)))``, every draw
    regenerated from its seed on the state before the commit, summed in pair order."""
    if len(weights) != 1 or weights[0].ndim != 2:
        raise ProtocolError("a discrete prompt's state is one (tokens, candidates) tensor",
                            "bad_layout")
    logits = weights[0]
    probs = probabilities(logits)
    step = np.zeros(logits.shape, dtype=np.float64)
    rows = np.arange(logits.shape[0])
    for seed, coefficient in commit.pairs:
        step -= coefficient * probs
        step[rows, sample(seed, probs)] += coefficient
    logits[...] = (logits.astype(np.float64) - step).astype(np.float32)
