"""Where a parameter's elements lie in the buffer ONNX Runtime reads.

Directions, commits and fingerprints are defined over each parameter in row-major order
(the *canonical* order). On x86, ONNX Runtime runs convolutions fastest in a blocked layout
(NCHWc): it reorders a constant weight ``[O, I, H, W]`` into
``[O/B, I/B, H, W, Bi, Bo]`` (``OIHWBiBo``), or ``[O/B, I, H, W, Bo]`` (``OIHWBo``, for
convolutions with few input channels), padding ``O`` and ``I`` up to multiples of ``B``
with zeros. The agent keeps such a weight only in the blocked layout and maps each
canonical chunk of a direction into it; a :class:`Layout` is that map.

A canonical *row* is one block of ``B`` output channels. Rows stay rows in both layouts,
so a chunk of whole rows maps to one contiguous span of the stored buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protocols.directions import CHUNK

_ALIGN = 256  # direction chunks start on multiples of one Philox block of signs
_BLOCKS = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Layout:
    """One parameter's storage: row-major as is (``block == 1``, possibly followed by zero
    padding, as a convolution's bias padded to whole blocks), or NCHWc-blocked."""

    shape: tuple[int, ...]         # canonical
    stored_shape: tuple[int, ...]  # what the graph input declares
    block: int = 1
    block_inputs: bool = True      # OIHWBiBo; False: OIHWBo
    transposed: bool = False       # a matrix stored as its transpose (MatMul folded a Transpose)

    @property
    def identity(self) -> bool:
        return self.block == 1 and not self.transposed

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_size(self) -> int:
        return math.prod(self.stored_shape)

    # --- blocked geometry --------------------------------------------------------------

    @property
    def _out(self) -> int:  # output channels, padded
        return -(-self.shape[0] // self.block) * self.block

    @property
    def _in(self) -> int:   # input channels, padded when blocked
        i = self.shape[1]
        return -(-i // self.block) * self.block if self.block_inputs else i

    @property
    def _row(self) -> int:  # canonical elements per row of B output channels
        return self.block * math.prod(self.shape[1:])

    @property
    def _stored_row(self) -> int:
        return self.block * self._in * math.prod(self.shape[2:])

    def _split(self, rows: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The padded rows' split shape and the transpose that makes it the stored order."""
        b, hw = self.block, self.shape[2:]
        if self.block_inputs:
            return (rows, b, self._in // b, b, *hw), (0, 2, 4, 5, 3, 1)
        return (rows, b, self._in, *hw), (0, 2, 3, 4, 1)

    # --- chunks ------------------------------------------------------------------------

    @property
    def chunk(self) -> int:
        """Canonical elements per chunk: a multiple of 256 and, when blocked, of whole rows."""
        if self.identity:
            return CHUNK
        if self.transposed:  # a column of the stored matrix is a canonical row: one chunk
            return -(-self.size // _ALIGN) * _ALIGN
        unit = math.lcm(self._row, _ALIGN)
        return unit * max(1, CHUNK // unit)

    def span(self, start: int, count: int) -> tuple[int, int]:
        """The stored span that canonical elements ``[start, start + count)`` lie in."""
        if self.identity:
            return start, start + count
        if self.transposed:
            return 0, self.stored_size
        first, last = start // self._row, -(-(start + count) // self._row)
        return first * self._stored_row, last * self._stored_row

    def to_stored(self, values: np.ndarray, pad: float = 0) -> np.ndarray:
        """Canonical ``values`` (whole rows from a row boundary) in stored order, padded."""
        if self.identity:
            return values
        if self.transposed:
            return np.ascontiguousarray(values.reshape(self.shape).T).reshape(-1)
        rows = -(-values.size // self._row)
        channels = values.size // math.prod(self.shape[1:])
        padded = np.full((rows * self.block, self._in, *self.shape[2:]), pad, values.dtype)
        padded[:channels, :self.shape[1]] = values.reshape(channels, *self.shape[1:])
        split, order = self._split(rows)
        return np.ascontiguousarray(padded.reshape(split).transpose(order)).reshape(-1)

    def to_canonical(self, stored: np.ndarray, count: int) -> np.ndarray:
        """The inverse of :meth:`to_stored`: the ``count`` canonical values of stored rows."""
        if self.identity:
            return stored
        if self.transposed:
            return np.ascontiguousarray(stored.reshape(self.shape[::-1]).T).reshape(-1)
        split, order = self._split(stored.size // self._stored_row)
        inverse = np.argsort(order)
        padded = stored.reshape([split[i] for i in order]).transpose(inverse)
        padded = padded.reshape(-1, self._in, *self.shape[2:])
        channels = count // math.prod(self.shape[1:])
        return np.ascontiguousarray(padded[:channels, :self.shape[1]]).reshape(-1)

    # --- discovery ---------------------------------------------------------------------

    @classmethod
    def find(cls, shape: tuple[int, ...], stored_shape: tuple[int, ...],
             where: np.ndarray) -> Layout | None:
        """The layout in which stored position ``k`` holds canonical element ``where[k]``
        (-1: padding), or None when it is none this module knows."""
        n = math.prod(shape)
        if where.size >= n and np.array_equal(where[:n], np.arange(n)) and (where[n:] == -1).all():
            return cls(tuple(shape), tuple(stored_shape))
        if len(shape) == 2 and where.size == n:
            layout = cls(tuple(shape), tuple(stored_shape), transposed=True)
            if np.array_equal(layout.to_stored(np.arange(n, dtype=np.int64)), where):
                return layout
        if len(shape) != 4:
            return None
        for block in _BLOCKS:
            for block_inputs in (True, False):
                layout = cls(tuple(shape), tuple(stored_shape), block, block_inputs)
                if layout._out * layout._in * math.prod(shape[2:]) != where.size:
                    continue
                predicted = layout.to_stored(np.arange(n, dtype=np.int64), pad=-1)
                if np.array_equal(predicted, where):
                    return layout
        return None

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "stored_shape": list(self.stored_shape),
                "block": self.block, "block_inputs": self.block_inputs,
                "transposed": self.transposed}
