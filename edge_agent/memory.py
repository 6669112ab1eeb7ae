"""Measuring and bounding the agent's memory: the figures a 512 MB board lives by.

Linux reports a process's resident set (VmRSS) and its peak (VmHWM) in
``/proc/self/status``, and lets a process reset the peak to the current value by writing
``5`` to ``/proc/self/clear_refs``. With that, the agent measures what one forward pass
really costs on this device, with this model and this runtime, instead of guessing from
layer shapes, and picks the largest micro-batch a budget allows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from protocols.errors import ZoError

# Headroom over measured forwards: with no arena, glibc's heap fragments differently from
# pass to pass; peaks of identical passes varied by up to a third (small CNN, batch 96).
# A fixed mmap threshold makes them exact but costs ~50% speed in page faults.
MARGIN = 1.25
MAX_MICRO_BATCH = 256  # beyond this, bigger batches buy no speed on CPU


class MemoryBudgetError(ZoError):
    """A memory budget this model cannot run in."""


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (a container's or systemd unit's
    cpuset), not the whole machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss where /proc is missing)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def rss_mb() -> float:
    current = _status_mb("VmRSS")
    return peak_rss_mb() if current is None else current


def reset_peak() -> bool:
    """Start a new peak measurement from the current RSS; False where Linux cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, for one)
        return None


def trim() -> None:
    """Give freed heap back to the OS (glibc), so a freed session does not stay resident
    and the next one stack on top of it."""
    release = _malloc_trim()
    if release is not None:
        release(0)


def measure_peak(action: Callable[[], object]) -> float:
    """Peak RSS (MB) while ``action`` runs, from a fresh baseline."""
    trim()
    reset_peak()
    action()
    return peak_rss_mb()


@dataclass(frozen=True)
class MemoryModel:
    """Peak memory of a round as ``fixed_mb + per_sample_mb * micro_batch``, measured."""

    fixed_mb: float
    per_sample_mb: float

    @classmethod
    def through(cls, first: tuple[int, float], second: tuple[int, float]) -> MemoryModel:
        """The line through two (micro-batch, peak MB) measurements."""
        (a, peak_a), (b, peak_b) = first, second
        per_sample = max(0.0, (peak_b - peak_a) / (b - a)) if b != a else 0.0
        return cls(peak_a - a * per_sample, per_sample)

    def peak(self, micro_batch: int) -> float:
        return (self.fixed_mb + self.per_sample_mb * micro_batch) * MARGIN

    def largest_batch(self, budget_mb: float, limit: int) -> int:
        """The largest micro-batch (up to ``limit``) whose peak fits; 0 if none does."""
        room = budget_mb / MARGIN - self.fixed_mb
        if room < self.per_sample_mb:
            return 0
        if self.per_sample_mb <= 0:
            return limit
        return max(0, min(limit, int(room / self.per_sample_mb)))


def fit(budget_mb: float, model: MemoryModel, limit: int, what: str) -> int:
    """The micro-batch for a budget, or a refusal that says what would fit."""
    batch = model.largest_batch(budget_mb, min(limit, MAX_MICRO_BATCH))
    if batch < 1:
        floor = model.peak(1)
        raise MemoryBudgetError(
            f"a memory budget of {budget_mb:.0f} MB is too small for {what}: the weights and "
            f"runtime need about {model.fixed_mb:.0f} MB and each sample of a micro-batch "
            f"{model.per_sample_mb:.2f} MB more, so the least that works is about "
            f"{floor:.0f} MB (micro-batch 1). Raise --memory-budget, or use a smaller model.")
    return batch
