"""Seeded perturbation directions: the one piece every implementation must agree on bit for bit.

The orchestrator never sends a direction, only its seed; every agent regenerates it.
So the generator is a written spec (``docs/protocol.md``, "Directions") with pinned
vectors (``vectors.json``), not "whatever numpy does today":

* Bit stream: Philox4x64-10 with key ``(seed, tensor_index)`` as two uint64 words.
  Block ``j`` of a tensor's stream is ``Philox(counter=(j + 1, 0, 0, 0), key)``; its four
  output words come in order. This is what ``numpy.random.Philox(...).random_raw``
  produces, and raw bit streams (unlike generator methods) are stable across numpy
  versions. Each tensor gets its own key, so directions of different tensors are
  independent, and any chunk can be generated without the ones before it.
* Rademacher: parameter ``p`` of the tensor takes bit ``p % 64`` (least significant
  first) of word ``p // 64``; bit 1 gives ``+scale``, bit 0 gives ``-scale``.
* Gaussian: parameters ``2k`` and ``2k+1`` take words ``2k`` and ``2k+1`` (block ``j``
  feeds parameters ``4j .. 4j+3``) through Box–Muller, computed with the float64 basic
  operations only (``_ln``, ``_sincos_turn``), so that no platform's libm changes a bit.
* Perturbing: ``w <- fl32(w + fl32(fl32(alpha) * z))`` element by element, where ``z`` is
  the float32 direction value. Perturbations and their undo use it, and so did commits
  before the summed rule (``PAIRWISE``: journals of formats 1 and 2 replay with it).
* Committing (``SUM64``): every element's ``sum_j fl32(c_j) * z_j`` is accumulated in
  float64 (each term an exact product of two float32 values, so a fused multiply-add
  changes nothing), in groups of ``GROUP`` pairs in the commit's order, and subtracted from
  the weight with one rounding: ``w <- fl32(fl64(w) - T)``. See :class:`CommitPlan`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ProtocolError

RADEMACHER = "rademacher"
GAUSSIAN = "gaussian"
CATEGORICAL = "categorical"  # discrete prompts: policy-gradient draws (protocols/prompts.py)
DISTRIBUTIONS = (RADEMACHER, GAUSSIAN, CATEGORICAL)

SUM64 = "sum64"  # a commit's update summed in float64 per element, rounded once (wire 3)
PAIRWISE = "pairwise"  # pair by pair in float32 (journals of formats 1 and 2)
APPLY_RULES = (SUM64, PAIRWISE)
GROUP = 8  # pairs summed per group: a Rademacher group's signs form one byte per element

# Parameters generated per step. A multiple of 256 (one Philox block of Rademacher signs),
# small enough to stay in cache, big enough that numpy's per-call overhead vanishes.
CHUNK = 1 << 16
_BLOCK_PARAMS = 256


@dataclass(frozen=True)
class DirectionSpec:
    """Which distribution directions are drawn from, and its scale (the paper's A.2 ablation)."""

    distribution: str = RADEMACHER
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ProtocolError(
                f"unknown direction distribution {self.distribution!r}; "
                f"use one of {', '.join(DISTRIBUTIONS)}",
                "bad_spec",
            )
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)
                and 0 < self.scale <= 1e3):
            raise ProtocolError(f"direction scale must be finite and in (0, 1000], "
                                f"got {self.scale!r}", "bad_spec")

    def to_dict(self) -> dict:
        return {"distribution": self.distribution, "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, data: dict) -> DirectionSpec:
        return cls(str(data.get("distribution", RADEMACHER)), float(data.get("scale", 1.0)))


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise ProtocolError(f"seed must be an integer in [0, 2**64), got {seed!r}", "bad_seed")
    return int(seed)


def raw_words(seed: int, tensor_index: int, first_block: int, n_words: int) -> np.ndarray:
    """``n_words`` uint64 words of the stream for ``(seed, tensor_index)`` from a block on."""
    return _stream(seed, tensor_index, first_block).random_raw(n_words)


def _stream(seed: int, tensor_index: int, first_block: int) -> np.random.Philox:
    """The tensor's bit stream positioned at ``first_block``; draws continue block by block."""
    key = np.array([check_seed(seed), tensor_index], dtype=np.uint64)
    counter = np.array([first_block, 0, 0, 0], dtype=np.uint64)
    return np.random.Philox(key=key, counter=counter)


_ZEROS4 = np.zeros(4, dtype=np.uint64)  # read, never written: the state setter copies it


def _restart(generator: np.random.Philox, seed: int, tensor_index: int) -> np.random.Philox:
    """``generator`` as ``_stream(seed, tensor_index, 0)`` makes it, without building one
    (``seed`` already checked: the setter takes the key's words as they are)."""
    generator.state = {"bit_generator": "Philox",
                       "state": {"counter": _ZEROS4, "key": [seed, tensor_index]},
                       "buffer": _ZEROS4, "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
    return generator


# Generators no plan is using. Building one costs ~25 us (numpy seeds it through a
# SeedSequence), re-keying one ~1.5 us: a 1,000-pair commit would otherwise spend 25 ms
# building the generators it re-keys anyway. A plan takes its own while it draws; at most
# _MAX_IDLE_STREAMS (~1.4 KB each) wait for the next.
_IDLE_STREAMS: list[np.random.Philox] = []
_MAX_IDLE_STREAMS = 4096


def _take_streams(count: int) -> list[np.random.Philox]:
    taken = []
    while len(taken) < count:
        try:
            taken.append(_IDLE_STREAMS.pop())  # atomic: threads never share one
        except IndexError:
            taken.append(np.random.Philox(0))
    return taken


def direction(spec: DirectionSpec, seed: int, tensor_index: int, start: int, count: int
              ) -> np.ndarray:
    """The float32 direction values ``z[start:start+count]`` of one tensor (start % 256 == 0)."""
    if start % _BLOCK_PARAMS:
        raise ValueError(f"chunks start on multiples of {_BLOCK_PARAMS}, got {start}")
    _no_categorical(spec)
    if spec.distribution == RADEMACHER:
        return _signs(seed, tensor_index, start, count) * np.float32(spec.scale)
    return _gaussian(seed, tensor_index, start, count, spec.scale)


def axpy_direction(flat: np.ndarray, alpha: float, spec: DirectionSpec, seed: int,
                   tensor_index: int, chunk: int = CHUNK) -> None:
    """In place: ``flat <- fl32(flat + fl32(alpha * z))`` for one tensor, chunk by chunk."""
    for start, delta in scaled_chunks(flat.size, alpha, spec, seed, tensor_index, chunk):
        flat[start:start + delta.size] += delta


def scaled_chunks(size: int, alpha: float, spec: DirectionSpec, seed: int, tensor_index: int,
                  chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, fl32(alpha * z[start:start+chunk]))`` over a tensor of ``size`` elements.

    One bit stream per tensor is drawn in order, so no chunk re-keys the generator. The
    arrays are temporaries of one chunk: callers add them, or use them to undo exactly.
    """
    if chunk % _BLOCK_PARAMS:
        raise ValueError(f"chunk must be a multiple of {_BLOCK_PARAMS}, got {chunk}")
    _no_categorical(spec)
    a = np.float32(alpha)
    stream = _stream(seed, tensor_index, 0)
    # fl32(a * (+-scale)) == +-fl32(a * scale): one table of the two signed values serves all.
    table = _sign_table(a * np.float32(spec.scale))
    for start in range(0, size, chunk):
        n = min(chunk, size - start)
        if spec.distribution == RADEMACHER:
            signs = _bytes(stream.random_raw(-(-n // 64)))
            yield start, table.take(signs, axis=0).reshape(-1)[:n]
        else:
            yield start, a * _box_muller(stream.random_raw(n + (n & 1)), spec.scale)[:n]


def _no_categorical(spec: DirectionSpec) -> None:
    """Categorical draws depend on the state, not on the seed alone: no fixed direction."""
    if spec.distribution == CATEGORICAL:
        raise ProtocolError("categorical (discrete prompt) steps have no fixed direction; "
                            "apply them with protocols.prompts.apply_policy_commit", "bad_spec")


def axpy(weights: Sequence[np.ndarray], alpha: float, spec: DirectionSpec, seed: int) -> None:
    """In place over all tensors: ``w <- w + alpha * z(seed)``; tensor ``i`` uses key (seed, i)."""
    for index, tensor in enumerate(weights):
        axpy_direction(flat_view(tensor), alpha, spec, seed, index)


def flat_view(tensor: np.ndarray) -> np.ndarray:
    """A writable 1-D float32 view of a tensor, refusing anything that would need a copy."""
    if tensor.dtype != np.float32 or not tensor.flags.c_contiguous or not tensor.flags.writeable:
        raise ValueError("weights must be writable, C-contiguous float32 arrays")
    return tensor.reshape(-1)


# --- a commit's update, summed in float64 (the SUM64 rule) ---------------------------------


class CommitPlan:
    """One commit's per-element update ``T = sum_j fl32(c_j) z_j``, chunk by chunk.

    The spec (``docs/protocol.md``, "Applying a commit"): term ``j`` of element ``p`` is
    ``t_j = fl32(c_j) * z_j[p]``, exact in float64 (two float32 factors). The pairs are
    taken in groups of ``GROUP`` in the commit's order; a group's sum is
    ``G = t_0 + t_1 + ...`` and the total ``T = G_0 + G_1 + ...``, both left to right in
    float64 from their first term. The weight becomes ``fl32(fl64(w) - T)``: one rounding
    of the round's whole step, so a step far below half an ulp of ``w`` still moves it.

    Rademacher terms are ``+d_j`` or ``-d_j`` (``d_j = fl32(c_j) * fl32(scale)``), so a
    group of 8 has 256 possible sums, computed once per commit; per element, the group's
    8 sign bits (one byte, bit ``k`` for its pair ``k``) pick one. Work per element is a
    table look-up per 8 pairs plus the bits' generation, and the weights are read and
    written once per chunk, not once per pair.
    """

    def __init__(self, spec: DirectionSpec, pairs: Sequence[tuple[int, float]]) -> None:
        _no_categorical(spec)
        self.spec = spec
        self.seeds = [check_seed(s) for s, _ in pairs]
        self.steps = np.array([c for _, c in pairs], dtype=np.float32).astype(np.float64)
        if spec.distribution == RADEMACHER:
            d = self.steps * float(np.float32(spec.scale))  # exact: two float32 factors
            self.tables = _group_tables(d)

    def totals(self, size: int, tensor_index: int, chunk: int = CHUNK
               ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, T[start:start+n])`` in float64 over one tensor of ``size`` elements;
        nothing for a commit without pairs. Every pair's stream is drawn once, in order."""
        if chunk % _BLOCK_PARAMS:
            raise ValueError(f"chunk must be a multiple of {_BLOCK_PARAMS}, got {chunk}")
        if not self.seeds:
            return
        # one generator per pair, re-keyed per tensor, and idle again once this one is drawn
        streams = _take_streams(len(self.seeds))
        try:
            for stream, seed in zip(streams, self.seeds):
                _restart(stream, seed, tensor_index)
            for start in range(0, size, chunk):
                n = min(chunk, size - start)
                if self.spec.distribution == RADEMACHER:
                    yield start, self._rademacher(streams, n)
                else:
                    yield start, self._gaussian(streams, n)
        finally:
            _IDLE_STREAMS.extend(streams[:max(0, _MAX_IDLE_STREAMS - len(_IDLE_STREAMS))])

    def _rademacher(self, streams: list[np.random.Philox], n: int) -> np.ndarray:
        words = -(-n // 64)
        rows = np.zeros((GROUP, words), dtype="<u8")
        total = None
        for g, table in enumerate(self.tables):
            group = streams[g * GROUP:(g + 1) * GROUP]
            for k, stream in enumerate(group):
                rows[k] = stream.random_raw(words)
            rows[len(group):] = 0
            signs = _transpose_bytes(rows)[:n].astype(np.intp)
            sums = table.take(signs)
            total = sums if total is None else np.add(total, sums, out=total)
        return total

    def _gaussian(self, streams: list[np.random.Philox], n: int) -> np.ndarray:
        total = None
        for g in range(0, len(streams), GROUP):
            group = None
            for stream, step in zip(streams[g:g + GROUP], self.steps[g:g + GROUP]):
                z = _box_muller(stream.random_raw(n + (n & 1)), self.spec.scale)[:n]
                term = z.astype(np.float64) * step
                group = term if group is None else np.add(group, term, out=group)
            total = group if total is None else np.add(total, group, out=total)
        return total


def subtract_rounded(part: np.ndarray, total: np.ndarray) -> None:
    """In place: ``part <- fl32(fl64(part) - total)``, the one rounding of a commit."""
    part[...] = (part.astype(np.float64) - total).astype(np.float32)


def apply_summed(weights: Sequence[np.ndarray], spec: DirectionSpec,
                 pairs: Sequence[tuple[int, float]]) -> None:
    """In place over canonical tensors: ``w <- fl32(fl64(w) - sum_j fl32(c_j) z_j)``."""
    plan = CommitPlan(spec, pairs)
    for index, tensor in enumerate(weights):
        flat = flat_view(tensor)
        for start, total in plan.totals(flat.size, index):
            subtract_rounded(flat[start:start + total.size], total)


_GROUP_BITS = ((np.arange(256)[:, None] >> np.arange(GROUP)) & 1) == 1  # [entry, pair]
_TABLES_AT_ONCE = 1024  # groups whose sums are made together (~2 MB of sums)


def _group_tables(d: np.ndarray) -> list[np.ndarray]:
    """:func:`_group_sums` of every group of ``d`` in turn, the full groups together.

    Entry ``b``'s sum over the first ``k + 1`` pairs depends only on the low ``k + 1`` bits
    of ``b``, so the table is built by doubling: the sums over pairs ``0..k-1`` (indexed by
    the low bits), then each plus ``-d_k`` (bit ``k`` clear) and each plus ``+d_k`` (set).
    Every entry is then the same left-to-right sum of the same terms, so the same bits."""
    full = d.size // GROUP * GROUP
    tables: list[np.ndarray] = []
    for lo in range(0, full, _TABLES_AT_ONCE * GROUP):
        groups = d[lo:min(full, lo + _TABLES_AT_ONCE * GROUP)].reshape(-1, GROUP)
        total = np.stack([-groups[:, 0], groups[:, 0]], axis=1)  # [group, low bits]
        for k in range(1, GROUP):
            total = np.concatenate([total + (-groups[:, k:k + 1]), total + groups[:, k:k + 1]],
                                   axis=1)
        tables.extend(total)
    if full < d.size:
        tables.append(_group_sums(d[full:]))
    return tables


def _group_sums(d: np.ndarray) -> np.ndarray:
    """The 256 sums of a group: entry ``b`` is ``(+-d_0) + (+-d_1) + ...`` left to right,
    ``+d_k`` where bit ``k`` of ``b`` is 1. Bits past the group's pairs are always 0."""
    bits = _GROUP_BITS[:, :d.size]
    total = np.where(bits[:, 0], d[0], -d[0])
    for k in range(1, d.size):
        total = total + np.where(bits[:, k], d[k], -d[k])
    return total


_MASKS = [(np.uint64(7), np.uint64(0x00AA00AA00AA00AA)),
          (np.uint64(14), np.uint64(0x0000CCCC0000CCCC)),
          (np.uint64(28), np.uint64(0x00000000F0F0F0F0))]


def _transpose_bytes(rows: np.ndarray) -> np.ndarray:
    """Per element, one byte of ``GROUP`` sign bits: bit ``k`` from row ``k``.

    ``rows[k]`` holds pair ``k``'s words (element ``p``: bit ``p % 64`` of word ``p // 64``).
    Interleaving the rows' bytes puts, for 8 consecutive elements, the 8 pairs' bytes in
    one 64-bit word: an 8x8 bit matrix whose transpose (three swap steps) holds the
    elements' bytes.
    """
    x = np.ascontiguousarray(rows.view(np.uint8).T).view("<u8").reshape(-1)
    for shift, mask in _MASKS:
        t = np.bitwise_and(np.bitwise_xor(x, x >> shift), mask)
        x ^= t
        x ^= t << shift
    return x.view(np.uint8)


# --- Rademacher ---------------------------------------------------------------------------

_BIT = np.arange(8, dtype=np.uint8)
_BYTE_BITS = ((np.arange(256, dtype=np.uint8)[:, None] >> _BIT) & 1).astype(bool)


def _bytes(words: np.ndarray) -> np.ndarray:
    return words.astype("<u8", copy=False).view(np.uint8)


def _signs(seed: int, tensor_index: int, start: int, count: int) -> np.ndarray:
    words = raw_words(seed, tensor_index, start // _BLOCK_PARAMS, -(-count // 64))
    bits = np.unpackbits(_bytes(words), bitorder="little")
    return (bits[:count].astype(np.float32) * np.float32(2)) - np.float32(1)


def _sign_table(value: np.float32) -> np.ndarray:
    """Row ``b``: the 8 values for sign byte ``b``, ``+value`` for a 1 bit and ``-value`` for 0."""
    return np.where(_BYTE_BITS, value, -value).astype(np.float32)


# --- Gaussian, from basic float64 operations only ---------------------------------------------

_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476
_TWO_PI = 6.283185307179586
_HALF_PI = 1.5707963267948966


def _gaussian(seed: int, tensor_index: int, start: int, count: int, scale: float) -> np.ndarray:
    words = raw_words(seed, tensor_index, start // 4, count + (count & 1))  # 4 values a block
    return _box_muller(words, scale)[:count]


def _box_muller(words: np.ndarray, scale: float) -> np.ndarray:
    """Two float32 normals per pair of words (an even count of words)."""
    top = (words >> np.uint64(11)).astype(np.float64)  # 53 random bits, exact in float64
    u1 = (top[0::2] + 1.0) * 2.0**-53  # (0, 1]: log is finite
    u2 = top[1::2] * 2.0**-53  # [0, 1): a fraction of a full turn
    radius = np.sqrt(-2.0 * _ln(u1))
    cos, sin = _sincos_turn(u2)
    out = np.empty(u1.size * 2, dtype=np.float64)
    out[0::2] = radius * cos
    out[1::2] = radius * sin
    return (out * float(scale)).astype(np.float32)


def _ln(x: np.ndarray) -> np.ndarray:
    """Natural log for x in (0, 1] with +, -, *, / and exact frexp: the same bits everywhere."""
    mant, expo = np.frexp(x)  # x = mant * 2**expo, mant in [0.5, 1)
    low = mant < _SQRT_HALF
    mant = np.where(low, mant * 2.0, mant)
    expo = np.where(low, expo - 1, expo).astype(np.float64)
    s = (mant - 1.0) / (mant + 1.0)  # |s| <= 0.1716; ln(mant) = 2 atanh(s)
    s2 = s * s
    acc = np.full_like(s, 1.0 / 21.0)
    for k in range(19, 0, -2):
        acc = acc * s2 + 1.0 / k
    return expo * _LN2 + 2.0 * s * acc


def _sincos_turn(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of 2*pi*t for t in [0, 1), reduced by exact quarter turns, Taylor inside."""
    quarter = np.floor(t * 4.0)
    x = (t * 4.0 - quarter) * _HALF_PI  # [0, pi/2)
    x2 = x * x
    sin = np.full_like(x, 1.0 / math.factorial(21))
    cos = np.full_like(x, 1.0 / math.factorial(20))
    for k in range(19, 0, -2):
        sin = sin * x2 * -1.0 + 1.0 / math.factorial(k)
        cos = cos * x2 * -1.0 + 1.0 / math.factorial(k - 1)
    sin = sin * x
    q = quarter.astype(np.int64)
    cos_t = np.choose(q, [cos, -sin, -cos, sin])
    sin_t = np.choose(q, [sin, cos, -sin, -cos])
    return cos_t, sin_t


# --- A reference for the spec, in plain integers ------------------------------------------

_M0, _M1 = 0xD2E7470EE14C6C93, 0xCA5A826395121157
_W0, _W1 = 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B
_MASK = (1 << 64) - 1


def reference_block(seed: int, tensor_index: int, block: int) -> list[int]:
    """Philox4x64-10 written out from its definition; selftest checks numpy against it."""
    c = [block + 1, 0, 0, 0]
    k = [check_seed(seed), tensor_index]
    for _ in range(10):
        p0, p1 = _M0 * c[0], _M1 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & _MASK, (p0 >> 64) ^ c[3] ^ k[1], p0 & _MASK]
        k = [(k[0] + _W0) & _MASK, (k[1] + _W1) & _MASK]
    return c
