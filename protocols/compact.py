"""The commit's compact wire form: what every agent receives every round, so its size is
the fleet's downlink.

A commit of K clients with P directions each holds K*P ``(seed, coefficient)`` pairs. As
JSON decimals that costs ~40 bytes a pair; here it costs ~11:

* **Coefficients** travel as little-endian IEEE-754 float32 bytes in base64 (4 bytes a
  pair, 5.3 as text): a commit applies ``fl32(c)`` of every coefficient and nothing more,
  so float32 is every bit there is. (Wire version 2, still read from journals, sent them
  as float64.)
* **Seeds that follow from the run seed are not sent.** Slot ``t`` of a round is
  direction ``t mod P`` of participant ``t div P``, and its seed is
  ``derive_seed(run_seed, round, t div P, t mod P)``. With a direction pool of ``N``, slot
  ``t`` evaluates the direction of slot ``t mod N``, so a commit's slots are below ``N``.
  A commit lists its slots as runs ``[first, count]``: a round where every participant
  answered is one run. Seeds that follow no rule (hand-made commits, old journals) travel
  as little-endian uint64 in base64.

Decoding is strict, because a commit changes every agent's weights: canonical base64
only (so a commit has exactly one encoding), lengths that match the stated count,
finite coefficients within bounds, runs ascending and disjoint, slots inside the round
(or the pool).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import validate as v
from .directions import APPLY_RULES, PAIRWISE
from .errors import ProtocolError
from .zo import Commit, derive_seed

MAX_SEEDS_PER_AGENT = 1024
MAX_AGENTS_PER_ROUND = 100_000
MAX_PAIRS = 2_000_000
MAX_COEFFICIENT = 1e30  # the bound every other float on the wire has
MAX_POOL = 1 << 20  # directions a round may draw from with a pool
_ROUND_MAX = 2**40
_U64 = 2**64 - 1


# --- little-endian arrays in base64 ------------------------------------------------------


def pack_floats(values: Iterable[float], dtype: str = "<f4") -> str:
    """Floats as base64 of their little-endian bytes (``<f4``: 4 bytes a value)."""
    return base64.b64encode(np.fromiter(values, dtype).tobytes()).decode("ascii")


def pack_seeds(seeds: Iterable[int]) -> str:
    """Seeds (uint64) as base64 of their little-endian bytes."""
    return base64.b64encode(np.fromiter(seeds, "<u8").tobytes()).decode("ascii")


def unpack_floats(text: object, count: int, where: str, dtype: str = "<f4"
                  ) -> tuple[float, ...]:
    """``count`` finite floats of ``dtype``, each within ``MAX_COEFFICIENT``, or a refusal."""
    values = np.frombuffer(_unbase64(text, count, where, np.dtype(dtype).itemsize), dtype)
    if not np.isfinite(values).all():
        raise ProtocolError(f"{where}: a value is not finite", "non_finite")
    if (np.abs(values) > MAX_COEFFICIENT).any():
        raise ProtocolError(f"{where}: a value is beyond {MAX_COEFFICIENT:g}", "out_of_range")
    return tuple(values.tolist())


def unpack_seeds(text: object, count: int, where: str) -> tuple[int, ...]:
    return tuple(np.frombuffer(_unbase64(text, count, where, 8), "<u8").tolist())


def _unbase64(text: object, count: int, where: str, width: int) -> bytes:
    """The bytes of ``count`` values of ``width`` bytes; the length is checked before
    anything is decoded, and only the one canonical encoding of those bytes is accepted."""
    if not isinstance(text, str):
        raise ProtocolError(f"{where} must be a base64 string, got {type(text).__name__}",
                            "bad_type")
    if len(text) != 4 * -(-width * count // 3):
        raise ProtocolError(f"{where}: {len(text)} characters do not hold {count} "
                            f"{width}-byte values", "bad_count")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{where} is not valid base64", "bad_base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise ProtocolError(f"{where} is not canonical base64", "bad_base64")
    if len(raw) != width * count:  # padding where no byte is missing
        raise ProtocolError(f"{where}: {len(raw)} bytes do not hold {count} {width}-byte "
                            "values", "bad_count")
    return raw


# --- slots as runs -------------------------------------------------------------------------


def to_runs(slots: Sequence[int]) -> list[list[int]]:
    """Ascending slots as maximal runs ``[first, count]`` of consecutive slots."""
    runs: list[list[int]] = []
    for t in slots:
        if runs and runs[-1][0] + runs[-1][1] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return runs


def from_runs(runs: object, count: int, limit: int, where: str) -> tuple[int, ...]:
    """The slots of maximal, ascending runs that hold ``count`` slots below ``limit``."""
    if not isinstance(runs, list) or len(runs) > count:
        raise ProtocolError(f"{where} must be a list of at most {count} runs", "bad_slots")
    slots: list[int] = []
    end = -1  # one past the previous run; the next run must leave a gap after it
    for run in runs:
        if (not isinstance(run, list) or len(run) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) for x in run)):
            raise ProtocolError(f"{where}: each run is [first, count]", "bad_slots")
        first, n = run
        if first <= end or n < 1 or first + n > limit or len(slots) + n > count:
            raise ProtocolError(f"{where}: run {run} is out of order, empty, overlapping, "
                                f"beyond the round's {limit} slots or beyond {count} pairs",
                                "bad_slots")
        slots.extend(range(first, first + n))
        end = first + n
    if len(slots) != count:
        raise ProtocolError(f"{where}: runs hold {len(slots)} slots for {count} pairs",
                            "bad_count")
    return tuple(slots)


@dataclass(frozen=True)
class SeedSlots:
    """Where a commit's seeds come from, so that they need not travel: pair ``k``'s seed
    is direction ``slots[k] mod per_client`` of participant ``slots[k] div per_client``."""

    run_seed: int
    per_client: int  # seeds per participant: directions x local steps
    slots: tuple[int, ...]
    pool: int = 0  # the round's direction pool (slots below it); 0: distinct seeds
    # round -> the derived seeds: decoding derives them, and the message made from them
    # checks them again; a round's 1,000 BLAKE2b calls are then made once, not twice
    _derived: dict[int, tuple[int, ...]] = field(default_factory=dict, compare=False,
                                                 repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.run_seed <= _U64:
            raise ProtocolError("seed slots: run_seed must be in [0, 2**64)", "bad_seed")
        if not 1 <= self.per_client <= MAX_SEEDS_PER_AGENT:
            raise ProtocolError(f"seed slots: per_client must be in [1, {MAX_SEEDS_PER_AGENT}]",
                                "out_of_range")
        if not 0 <= self.pool <= MAX_POOL:
            raise ProtocolError(f"seed slots: pool must be in [0, {MAX_POOL}]", "out_of_range")
        limit = self.limit
        if any(not 0 <= t < limit for t in self.slots) or any(
                a >= b for a, b in zip(self.slots, self.slots[1:])):
            raise ProtocolError("seed slots must ascend strictly inside the round", "bad_slots")

    @property
    def limit(self) -> int:
        """One past the highest slot a commit may name."""
        return self.pool or MAX_AGENTS_PER_ROUND * self.per_client

    def seeds(self, round_id: int) -> tuple[int, ...]:
        if round_id not in self._derived:
            p = self.per_client
            self._derived[round_id] = tuple(derive_seed(self.run_seed, round_id, t // p, t % p)
                                            for t in self.slots)
        return self._derived[round_id]


# --- the commit's fields ---------------------------------------------------------------


def commit_to_wire(commit: Commit, slots: SeedSlots | None, version: int = 3) -> dict:
    """The commit's wire fields: seeds by slot when ``slots`` is given, else as bytes.

    Version 3 (the wire's): float32 coefficients, the application rule, the pool in
    ``derive``. Version 2 (journals of format 2, appended to in their own form): float64
    coefficients, pair-by-pair application implied.
    """
    if (commit.apply == PAIRWISE) != (version == 2):
        raise ProtocolError(f"a {commit.apply} commit has no wire version {version} form",
                            "bad_apply")
    dtype = "<f4" if version >= 3 else "<f8"
    body = {"round": commit.round, "pairs": len(commit.pairs),
            "coefficients": pack_floats((c for _, c in commit.pairs), dtype)}
    if version >= 3:
        body["apply"] = commit.apply
    if slots is None:
        return {**body, "seeds": pack_seeds(s for s, _ in commit.pairs)}
    derive = {"run_seed": slots.run_seed, "per_client": slots.per_client,
              "slots": to_runs(slots.slots)}
    if version >= 3:
        derive["pool"] = slots.pool  # (version 2: a pool's slots name the same seeds)
    return {**body, "derive": derive}


def commit_from_wire(d: dict, where: str, version: int = 3) -> tuple[Commit, SeedSlots | None]:
    """A commit of wire version 3, or 2 (from a journal: applied pair by pair)."""
    fields = {"round", "pairs", "coefficients", "seeds", "derive"}
    v.no_extra(d, fields | {"apply"} if version >= 3 else fields, where)
    round_id = v.integer(d, "round", where, 0, _ROUND_MAX)
    count = v.integer(d, "pairs", where, 0, MAX_PAIRS)
    if ("seeds" in d) == ("derive" in d):
        raise ProtocolError(f"{where} needs exactly one of 'seeds' and 'derive'",
                            "missing_field")
    rule = v.text(d, "apply", where, 16) if version >= 3 else PAIRWISE
    if rule not in APPLY_RULES:
        raise ProtocolError(f"{where}: unknown application {rule!r}; this build applies "
                            f"{' or '.join(APPLY_RULES)}", "bad_apply")
    coefficients = unpack_floats(v.text(d, "coefficients", where, 1 << 30), count,
                                 f"{where}.coefficients", "<f4" if version >= 3 else "<f8")
    slots = None
    if "seeds" in d:
        seeds = unpack_seeds(d["seeds"], count, f"{where}.seeds")
    else:
        derive, w = v.mapping(d, "derive", where), f"{where}.derive"
        keys = {"run_seed", "per_client", "slots"}
        v.no_extra(derive, keys | {"pool"} if version >= 3 else keys, w)
        per = v.integer(derive, "per_client", w, 1, MAX_SEEDS_PER_AGENT)
        pool = v.integer(derive, "pool", w, 0, MAX_POOL) if version >= 3 else 0
        slots = SeedSlots(v.integer(derive, "run_seed", w, 0, _U64), per,
                          from_runs(derive.get("slots"), count,
                                    pool or MAX_AGENTS_PER_ROUND * per, f"{w}.slots"), pool)
        seeds = slots.seeds(round_id)
    return Commit(round_id, tuple(zip(seeds, coefficients)), rule), slots


# --- the form of wire version 1, still found in journals -----------------------------------


def legacy_commit_to_wire(commit: Commit) -> dict:
    """Version 1: ``pairs`` as ``[[seed, coefficient], ...]`` in JSON numbers."""
    if commit.apply != PAIRWISE:
        raise ProtocolError(f"a {commit.apply} commit has no wire version 1 form", "bad_apply")
    return {"round": commit.round, "pairs": [[s, c] for s, c in commit.pairs]}


def legacy_commit_from_wire(d: dict, where: str) -> Commit:
    v.no_extra(d, {"round", "pairs"}, where)
    pairs = []
    for pair in v.sequence(d, "pairs", where, MAX_PAIRS):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ProtocolError(f"{where}: each pair is [seed, coefficient]", "bad_type")
        seed = pair[0]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _U64:
            raise ProtocolError(f"{where}: seeds must be integers in [0, 2**64)", "bad_seed")
        pairs.append((seed, v.finite(pair[1], f"{where}: coefficient")))
    return Commit(v.integer(d, "round", where, 0, _ROUND_MAX), tuple(pairs), PAIRWISE)
