"""Stopping a run on Ctrl-C or SIGTERM, never in the middle of a journal record.

``zowarmup run``, ``serve`` and ``resume`` call :func:`stop_on_signals`: SIGTERM (what
``kill``, systemd and container runtimes send) then does what Ctrl-C does. :class:`Stopped`
is raised in the main thread and unwinds the run through its cleanups: the round in
progress is abandoned (its results are not journaled; a resume plays it again), the local
agents and the embedded broker are stopped, the journal is closed. A signal that arrives
inside :func:`shielded` (the write and fsync of a journal record) is held until the block
ends, so a stop never leaves a torn record behind.

A leaf: it imports nothing of the project, so the round loop may use it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_held: list[int] = []  # a signal that came while shielded
_depth = 0


class Stopped(KeyboardInterrupt):
    """The run was asked to stop by a signal (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> Callable[[], None]:
    """Raise :class:`Stopped` on SIGTERM, and on SIGINT unless it is ignored (a run
    started from a script's background job inherits SIGINT ignored, and keeps ignoring it).
    Returns what puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def _on_signal(signum: int, frame: object) -> None:
    if _depth:
        _held.append(signum)
        return
    raise Stopped(signum)


@contextmanager
def shielded() -> Iterator[None]:
    """A block no stop signal interrupts: one that arrives meanwhile stops the run right
    after it."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if not _depth and _held:
        signum = _held[0]
        _held.clear()
        raise Stopped(signum)
