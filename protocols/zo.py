"""The zeroth-order step in three parts, as MeZO writes it: estimate, aggregate, update.

* ``projected_gradient`` turns two losses into the SPSA scalar ``g = (L+ - L-) / 2eps``.
* ``aggregate`` turns the scalars of a round into a ``Commit``: ``(seed, coefficient)``
  pairs whose coefficients are weighted by each client's sample count.
* ``apply_commit`` updates weights in place, ``w <- w - sum_j c_j z(seed_j)``, regenerating
  every ``z`` from its seed: summed in float64 and rounded once (``SUM64``), or pair by pair
  in float32 for commits of old journals (``PAIRWISE``); ``replay`` is the same function in
  a loop, so replaying a journal and following the rounds live give the same bits by
  construction.
* ``pool_pairs`` folds a round's pairs onto its direction pool: with ``zo.direction_pool =
  N``, slot ``t`` evaluates the direction of slot ``t mod N``, and each direction's
  coefficient is the sum of the coefficients of every slot that evaluated it.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .directions import (
    APPLY_RULES,
    PAIRWISE,
    SUM64,
    DirectionSpec,
    apply_summed,
    axpy,
    check_seed,
)
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
    apply: str = SUM64  # how the pairs are applied; PAIRWISE: commits of old journals

    def __post_init__(self) -> None:
        if self.round < 0:
            raise ProtocolError(f"commit round must be >= 0, got {self.round}", "bad_round")
        if self.apply not in APPLY_RULES:
            raise ProtocolError(f"unknown commit application {self.apply!r}", "bad_apply")
        for seed, coefficient in self.pairs:
            check_seed(seed)
            if not math.isfinite(coefficient):
                raise ProtocolError(f"commit coefficient {coefficient!r} is not finite",
                                    "non_finite")
        if self.apply == SUM64:  # only fl32(c) is ever applied: the commit holds just that
            with np.errstate(over="ignore"):
                rounded = np.array([c for _, c in self.pairs], dtype=np.float32)
            if not np.isfinite(rounded).all():
                raise ProtocolError("a commit coefficient is beyond float32's range",
                                    "out_of_range")
            object.__setattr__(self, "pairs", tuple(
                (seed, c) for (seed, _), c in zip(self.pairs, rounded.tolist())))


@dataclass(frozen=True)
class ClientResult:
    """What one client contributed to a round: a scalar per seed and its sample count."""

    seeds: tuple[int, ...]
    scalars: tuple[float, ...]
    samples: int
    steps: int = 1  # local steps the scalars span (FedKSeed style); s = len(scalars) / steps


def aggregate(round_id: int, results: Iterable[ClientResult], lr: float,
              bound: float = math.inf, keep: set[int] | None = None) -> Commit:
    """The commit of :func:`weigh`'s pairs (whose coefficients it rounds to float32)."""
    return Commit(round_id, tuple(weigh(results, lr, bound, keep)))


def weigh(results: Iterable[ClientResult], lr: float, bound: float = math.inf,
          keep: set[int] | None = None) -> list[tuple[int, float]]:
    """FedAvg of SPSA steps: ``c = lr * (n_i / sum n) * g_ij / s`` for each direction, in
    float64 (a pool folds them before the commit rounds them).

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
    return [(seed, w * min(max(g, -bound), bound)) for seed, w, g in weighted]


def pool_pairs(pairs: Sequence[tuple[int, float]], slots: Sequence[int], pool: int
               ) -> tuple[list[tuple[int, float]], list[int]]:
    """A round's pairs, one per slot, folded onto the pool: slot ``t`` evaluated the
    direction of slot ``t mod pool``, whose coefficient is the sum, in float64 and slot
    order from the first, of its slots' coefficients. Returns the pairs and their pool
    slots, ascending. With ``pool == 0`` (distinct seeds) nothing changes."""
    if not pool:
        return list(pairs), list(slots)
    folded: dict[int, tuple[int, float]] = {}
    for (seed, c), t in zip(pairs, slots):
        k = t % pool
        folded[k] = (seed, folded[k][1] + c) if k in folded else (seed, c)
    order = sorted(folded)
    return [folded[k] for k in order], order


def apply_commit(weights: Sequence[np.ndarray], commit: Commit, spec: DirectionSpec) -> None:
    """In place: ``w <- w - sum_j c_j z(seed_j)`` by the commit's rule (``SUM64``: summed
    per element in float64 and rounded once; ``PAIRWISE``: pair by pair in float32).

    Discrete prompts (``categorical``) regenerate each pair's policy-gradient draw instead.
    """
    if spec.distribution == "categorical":
        apply_policy_commit(weights, commit)
    elif commit.apply == PAIRWISE:
        for seed, coefficient in commit.pairs:
            axpy(weights, -coefficient, spec, seed)
    else:
        apply_summed(weights, spec, commit.pairs)


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


def slot_seeds(run_seed: int, round_id: int, per_client: int, pool: int, clients: int
               ) -> tuple[int, ...]:
    """The seeds of a round's slots ``0 .. clients * per_client - 1``, participant by
    participant: slot ``t`` is direction ``t mod P`` of participant ``t div P``, and with a
    pool, slot ``t`` takes the seed of slot ``t mod pool`` (only the pool's are derived)."""
    count = clients * per_client
    base = [derive_seed(run_seed, round_id, t // per_client, t % per_client)
            for t in range(min(count, pool) if pool else count)]
    return tuple(base[t % pool] for t in range(count)) if pool else tuple(base)


def derive_seed(run_seed: int, round_id: int, client: int, direction: int) -> int:
    """The seed of one direction, reproducible from the run seed alone (resume needs it)."""
    data = struct.pack("<QQQQ", check_seed(run_seed), round_id, client, direction)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"zowarmup-s1").digest(),
                          "little")

