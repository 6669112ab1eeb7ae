"""The zeroth-order step in three parts, as MeZO writes it: estimate, aggregate, update.

* ``projected_gradient`` turns two losses into the SPSA scalar ``g = (L+ - L-) / 2eps``.
* ``aggregate`` turns the scalars of a round into a ``Commit``: ``(seed, coefficient)``
  pairs whose coefficients are weighted by each client's sample count.
* ``apply_commit`` updates weights in place, ``w <- w - c * z(seed)`` pair by pair,
  regenerating every ``z`` from its seed; ``replay`` is the same function in a loop, so
  replaying a journal and following the rounds live give the same bits by construction.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .directions import DirectionSpec, axpy, check_seed
from .errors import ProtocolError
from .prompts import apply_policy_commit


def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    """SPSA's estimate of the directional derivative along z (the paper's equation 2)."""
    return (float(loss_plus) - float(loss_minus)) / (2.0 * float(eps))


@dataclass(frozen=True)
class Commit:
    """One round's update: every agent applies exactly these pairs, in this order."""

    round: int
    pairs: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        if self.round < 0:
            raise ProtocolError(f"commit round must be >= 0, got {self.round}", "bad_round")
        for seed, coefficient in self.pairs:
            check_seed(seed)
            if not math.isfinite(coefficient):
                raise ProtocolError(f"commit coefficient {coefficient!r} is not finite",
                                    "non_finite")


@dataclass(frozen=True)
class ClientResult:
    """What one client contributed to a round: a scalar per seed and its sample count."""

    seeds: tuple[int, ...]
    scalars: tuple[float, ...]
    samples: int
    steps: int = 1  # local steps the scalars span (FedKSeed style); s = len(scalars) / steps


def aggregate(round_id: int, results: Iterable[ClientResult], lr: float,
              bound: float = math.inf, keep: set[int] | None = None) -> Commit:
    """FedAvg of SPSA steps: ``c = lr * (n_i / sum n) * g_ij / s`` for each direction.

    The ``s`` directions of one step are averaged (MeZO's n), and clients are weighted by
    their share of the round's samples, as FedAvg weights models. With several local
    steps, each step's directions add up, so the commit moves every agent to the
    sample-weighted average of the clients' local trajectories. Pairs follow the order of
    ``results``: the caller fixes it, since float addition order decides the bits.

    Robust aggregation (``protocols/robust.py``): every ``g`` is clipped to
    ``[-bound, bound]``; with ``keep`` (indices into the round's scalars in this order),
    only those pairs are committed, their weights scaled up to the full total so that a
    trimmed mean moves as far as a plain one.
    """
    results = [r for r in results if r.samples > 0 and r.scalars]
    total = sum(r.samples for r in results)
    weighted = []
    for result in results:
        share = lr * (result.samples / total) / (len(result.scalars) // result.steps)
        weighted.extend((seed, share, g) for seed, g in zip(result.seeds, result.scalars))
    if keep is not None:
        full = sum(w for _, w, _ in weighted)
        kept = [x for i, x in enumerate(weighted) if i in keep]
        up = full / sum(w for _, w, _ in kept) if kept else 0.0
        weighted = [(seed, w * up, g) for seed, w, g in kept]
    return Commit(round_id, tuple((seed, w * min(max(g, -bound), bound))
                                  for seed, w, g in weighted))


def apply_commit(weights: Sequence[np.ndarray], commit: Commit, spec: DirectionSpec) -> None:
    """In place: ``w <- w - c * z(seed)`` for each pair, in the commit's order.

    Discrete prompts (``categorical``) regenerate each pair's policy-gradient draw instead.
    """
    if spec.distribution == "categorical":
        apply_policy_commit(weights, commit)
        return
    for seed, coefficient in commit.pairs:
        axpy(weights, -coefficient, spec, seed)


def replay(weights: Sequence[np.ndarray], commits: Iterable[Commit], spec: DirectionSpec,
           after_round: int = -1) -> int:
    """Apply, in order, the commits of rounds after ``after_round``; returns the last round.

    Rounds must follow each other without a gap: a missing commit would silently give
    different weights, so it is an error instead.
    """
    last = after_round
    for commit in commits:
        if commit.round <= after_round:
            continue
        if commit.round != last + 1:
            raise ProtocolError(f"commit for round {commit.round} follows round {last}: "
                                f"round {last + 1} is missing", "gap")
        apply_commit(weights, commit, spec)
        last = commit.round
    return last


def fingerprint(weights: Sequence[np.ndarray]) -> str:
    """A stable, cheap hash of the weights' exact bits (BLAKE2b-128, hex).

    It covers each tensor's shape and little-endian float32 bytes in order, so two sides
    agree on it exactly when they hold the same bits in the same layout.
    """
    return fingerprint_chunks([(t.shape, [t]) for t in weights])


def fingerprint_chunks(tensors: Sequence[tuple[tuple[int, ...], Iterable[np.ndarray]]]) -> str:
    """:func:`fingerprint` of tensors given as (shape, their row-major values in pieces):
    for a holder that keeps weights in another layout and converts a piece at a time."""
    h = hashlib.blake2b(digest_size=16, person=b"zowarmup-w1")
    h.update(struct.pack("<Q", len(tensors)))
    for shape, pieces in tensors:
        h.update(struct.pack("<Q", len(shape)))
        h.update(struct.pack(f"<{len(shape)}Q", *shape))
        for piece in pieces:
            h.update(np.ascontiguousarray(piece, dtype="<f4").data)
    return h.hexdigest()


def weights_sha256(weights: Sequence[np.ndarray]) -> str:
    """SHA-256 of the concatenated little-endian float32 bytes: the figure reports print."""
    h = hashlib.sha256()
    for tensor in weights:
        h.update(np.ascontiguousarray(tensor, dtype="<f4").data)
    return h.hexdigest()


def derive_seed(run_seed: int, round_id: int, client: int, direction: int) -> int:
    """The seed of one direction, reproducible from the run seed alone (resume needs it)."""
    data = struct.pack("<QQQQ", check_seed(run_seed), round_id, client, direction)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"zowarmup-s1").digest(),
                          "little")

