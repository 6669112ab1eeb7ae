"""The agent's weights: held once, in the layout the forward pass reads, moved in place.

A perturbation, its undo and a local step are ``w <- fl32(w + fl32(alpha * z(seed)))``
element by element; a commit is ``w <- fl32(fl64(w) - T)`` with ``T`` its whole update
summed in float64 (``protocols/directions.py``: ``CommitPlan``), one pass over the weights
per chunk. Directions and updates are generated in canonical (row-major) chunks and each
chunk is mapped into the stored layout (:mod:`edge_agent.layout`); the arithmetic per
element is the same, so the bits are the same as on any holder of canonical weights.

Float32 addition is not exactly reversible (``(w + d) - d`` can differ from ``w`` in the
last bit), yet the agent must end every round on the orchestrator's exact bits. So
:meth:`Weights.perturb` keeps an *undo log*: the original value of each element whose round
trip would not restore it, a few percent of the elements at most instead of a second copy
of the model; :meth:`Weights.restore` subtracts the same direction and patches those.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from protocols.directions import (
    PAIRWISE,
    CommitPlan,
    DirectionSpec,
    scaled_chunks,
    subtract_rounded,
)
from protocols.manifest import Manifest
from protocols.zo import Commit, fingerprint_chunks

from .layout import Layout


class Undo:
    """What restoring a perturbation needs: which elements lost bits, and their old values.

    A bit per element of the weight buffer marks them, and their values follow in buffer
    order: 4 bytes per logged element and an eighth of a byte per weight (ResNet-18 at
    eps = 1e-3 on fresh weights: 1.1 M elements, 6 MB). Both arrays are reserved for the
    worst case and only the pages written become resident; one block each, rather than
    an array per chunk among the chunks' temporaries, keeps the heap from fragmenting.
    """

    def __init__(self, elements: int) -> None:
        self.marks = np.zeros(-(-elements // 8), dtype=np.uint8)
        self.values = np.empty(elements, dtype=np.float32)
        self.size = 0

    def add(self, offset: int, lost: np.ndarray, values: np.ndarray) -> None:
        """Log ``values`` at buffer positions ``offset + lost`` (ascending, past all before)."""
        where = offset + lost
        np.bitwise_or.at(self.marks, where >> 3, (1 << (where & 7)).astype(np.uint8))
        self.values[self.size:self.size + lost.size] = values
        self.size += lost.size

    def apply(self, buffer: np.ndarray, block: int = 1 << 13) -> None:
        """Put the logged values back, a block of marks at a time (no whole-buffer index)."""
        done = 0
        for start in range(0, self.marks.size, block):
            marks = self.marks[start:start + block]
            if not marks.any():
                continue
            where = np.flatnonzero(np.unpackbits(marks, bitorder="little")) + start * 8
            buffer[where] = self.values[done:done + where.size]
            done += where.size


_ALIGN_FLOATS = 16  # 64-byte alignment: vector loads of blocked kernels never straddle


class Weights:
    """All trainable tensors in one aligned buffer, each in its :class:`Layout`."""

    def __init__(self, manifest: Manifest, layouts: Sequence[Layout] | None = None) -> None:
        self.manifest = manifest
        self.layouts = list(layouts or [Layout(p.shape, p.shape) for p in manifest.parameters])
        starts, end = [], 0
        for layout in self.layouts:
            starts.append(end)
            end += -(-layout.stored_size // _ALIGN_FLOATS) * _ALIGN_FLOATS
        raw = np.zeros(end + _ALIGN_FLOATS, dtype=np.float32)
        skip = (-raw.ctypes.data % 64) // 4
        self.buffer = raw[skip:skip + end]
        self.starts = starts
        self.tensors = [self.buffer[s:s + lay.stored_size].reshape(lay.stored_shape)
                        for s, lay in zip(starts, self.layouts)]

    @classmethod
    def load(cls, path: Path, manifest: Manifest, layouts: Sequence[Layout] | None = None
             ) -> Weights:
        """Read a weights file (``weights.bin`` or a snapshot: canonical float32, in order)."""
        weights = cls(manifest, layouts)
        weights.read(path)
        return weights

    def read(self, path: Path) -> None:
        """Replace every weight with the canonical values of a weights file, in place."""
        size = Path(path).stat().st_size
        if size != 4 * self.manifest.num_parameters:
            raise ValueError(f"{path} holds {size // 4} values, the model has "
                             f"{self.manifest.num_parameters}")
        with open(path, "rb") as f:
            for index, layout in enumerate(self.layouts):
                for start in range(0, layout.size, layout.chunk):
                    count = min(layout.chunk, layout.size - start)
                    self._put(index, start, np.fromfile(f, dtype="<f4", count=count))

    def assign(self, tensors: Sequence[np.ndarray]) -> None:
        """Set every weight from canonical arrays (one per parameter), in place."""
        for index, (layout, values) in enumerate(zip(self.layouts, tensors, strict=True)):
            flat = np.asarray(values, dtype=np.float32).reshape(-1)
            if flat.size != layout.size:
                raise ValueError(f"tensor {index} has {flat.size} values, not {layout.size}")
            for start in range(0, layout.size, layout.chunk):
                self._put(index, start, flat[start:start + layout.chunk])

    def add(self, tensors: Sequence[np.ndarray]) -> None:
        """``w <- fl32(w + d)`` with canonical ``d`` per parameter: an update that is not a
        direction (first-order deltas in the simulated hi+lo ablation)."""
        for index, (layout, values) in enumerate(zip(self.layouts, tensors, strict=True)):
            flat = np.asarray(values, dtype=np.float32).reshape(-1)
            target = self.tensors[index].reshape(-1)
            for start in range(0, layout.size, layout.chunk):
                chunk = flat[start:start + layout.chunk]
                lo, hi = layout.span(start, chunk.size)
                target[lo:hi] += layout.to_stored(chunk)

    def _put(self, index: int, start: int, values: np.ndarray) -> None:
        lo, hi = self.layouts[index].span(start, values.size)
        self.tensors[index].reshape(-1)[lo:hi] = self.layouts[index].to_stored(
            values.astype(np.float32, copy=False))

    @property
    def num_parameters(self) -> int:
        return self.manifest.num_parameters

    def canonical(self, index: int) -> Iterator[np.ndarray]:
        """Tensor ``index``'s values in row-major order, a chunk at a time."""
        layout, flat = self.layouts[index], self.tensors[index].reshape(-1)
        if layout.identity:
            yield flat[:layout.size]
            return
        for start in range(0, layout.size, layout.chunk):
            count = min(layout.chunk, layout.size - start)
            lo, hi = layout.span(start, count)
            yield layout.to_canonical(flat[lo:hi], count)

    def fingerprint(self) -> str:
        return fingerprint_chunks([(lay.shape, self.canonical(i))
                                   for i, lay in enumerate(self.layouts)])

    def to_canonical(self) -> list[np.ndarray]:
        """A canonical copy of every tensor (for tests and snapshots, not the hot path)."""
        return [np.concatenate(list(self.canonical(i))).reshape(lay.shape)
                for i, lay in enumerate(self.layouts)]

    # --- moving the weights: the one loop ----------------------------------------------

    def _chunks(self, seed: int, alpha: float, spec: DirectionSpec
                ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """(tensor, stored offset, stored part, fl32(alpha * z) in stored order) per chunk."""
        for index, layout in enumerate(self.layouts):
            flat = self.tensors[index].reshape(-1)
            for start, delta in scaled_chunks(layout.size, alpha, spec, seed, index,
                                              layout.chunk):
                lo, hi = layout.span(start, delta.size)
                yield index, lo, flat[lo:hi], layout.to_stored(delta)

    def apply(self, commit: Commit, spec: DirectionSpec) -> None:
        """A commit, in place: its update summed in float64 chunk by chunk and subtracted
        with one rounding (``SUM64``), or pair by pair for an old journal's (``PAIRWISE``)."""
        if commit.apply == PAIRWISE:
            for seed, coefficient in commit.pairs:
                self.axpy(seed, -coefficient, spec)
            return
        plan = CommitPlan(spec, commit.pairs)
        for index, layout in enumerate(self.layouts):
            flat = self.tensors[index].reshape(-1)
            for start, total in plan.totals(layout.size, index, layout.chunk):
                lo, hi = layout.span(start, total.size)
                subtract_rounded(flat[lo:hi], layout.to_stored(total))

    def axpy(self, seed: int, alpha: float, spec: DirectionSpec) -> None:
        """``w <- w + alpha z(seed)`` in place (a local step, or an old journal's pair)."""
        for _, _, part, delta in self._chunks(seed, alpha, spec):
            part += delta

    def perturb(self, seed: int, alpha: float, spec: DirectionSpec) -> Undo:
        """``w <- w + alpha z(seed)`` in place, remembering what the way back would lose."""
        undo = Undo(self.buffer.size)
        for index, lo, part, delta in self._chunks(seed, alpha, spec):
            before = part.copy()
            part += delta
            lost = np.flatnonzero((part - delta).view(np.uint32) != before.view(np.uint32))
            if lost.size:
                undo.add(self.starts[index] + lo, lost, before[lost])
        return undo

    def restore(self, seed: int, alpha: float, spec: DirectionSpec, undo: Undo) -> None:
        """Exactly undo ``perturb(seed, alpha)``."""
        self.axpy(seed, -alpha, spec)
        undo.apply(self.buffer)
