"""A process started by the orchestrator ends when the orchestrator's process does.

Local agents and the simulated fleet's workers are the orchestrator's children. When it
stops cleanly it stops them; when it is killed (SIGKILL, out of memory, a crash), nothing
of it runs to do so, and they would live on, reparented to init. So the child watches its
parent: on Linux the kernel sends it SIGTERM the moment the parent dies
(``prctl(PR_SET_PDEATHSIG)``), and on every system a thread also checks once a second that
its parent is still the one that started it (the kernel's signal is tied to the parent
*thread* that forked the child; the check covers the rest).

An agent a device runs under systemd must not die with whatever started it, so the watch
is opt-in: the orchestrator sets ``ZOWARMUP_PARENT_PID`` to its own process id for the
agents it starts (``orchestrator/fleet/agents.py``). SIGTERM is what the agent already
stops on: it says goodbye (status offline) and closes its connection.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)
PARENT_ENV = "ZOWARMUP_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent: int | None = None, signum: int = signal.SIGTERM,
                     interval: float = 1.0) -> bool:
    """Have ``signum`` sent to this process when ``parent`` (default: the process named by
    ``ZOWARMUP_PARENT_PID``; unset: no watch) is no longer its parent. True if watching."""
    if parent is None:
        value = os.environ.get(PARENT_ENV, "").strip()
        if not value:
            return False
        try:
            parent = int(value)
        except ValueError:
            log.warning("%s=%r is not a process id; not watching the parent", PARENT_ENV, value)
            return False
    _parent_death_signal(signum)
    if os.getppid() != parent:  # it died before the kernel was asked to tell us
        os.kill(os.getpid(), signum)
        return True
    threading.Thread(target=_watch, args=(parent, signum, interval), name="parent-watch",
                     daemon=True).start()
    return True


def _watch(parent: int, signum: int, interval: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    log.warning("the process that started this one (%d) is gone; stopping", parent)
    os.kill(os.getpid(), signum)


def _parent_death_signal(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as exc:  # no libc to ask: the thread alone watches
        log.debug("no prctl here (%s)", exc)
