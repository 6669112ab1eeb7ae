"""What a fleet that computes its clients in this machine's processes tells the coordinator.

Worker processes (``workers.py``) and the torch engine (``torch_fleet.py``) have no broker
and no agent processes to say hello or to fall silent: these are their clients' hellos, and
the one way an in-process round can fail that a real fleet would show as a timeout.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from protocols import topics
from protocols.codec import encode
from protocols.coordinator import Coordinator
from protocols.messages import Capabilities, Hello


def greet(coordinator: Coordinator, clients: Sequence[str], model_sha256: str) -> None:
    """Every client says hello on the coordinator's current state, as a fresh agent does."""
    for agent in clients:
        hello = Hello(agent, Capabilities(0, 1, 0), model_sha256, coordinator.version,
                      coordinator.fingerprint)
        coordinator.receive(topics.agent(coordinator.run_id, agent, "hello"), encode(hello),
                            time.time())


def require_answers(coordinator: Coordinator, diverged: Sequence[str]) -> None:
    """A round in which no result was taken and no client diverged can only mean every
    result was refused: a fault of the simulation, said at once rather than at a deadline."""
    if not coordinator.round_results() and not diverged:
        why = coordinator.refusals[-1] if coordinator.refusals else "none arrived"
        raise RuntimeError(f"simulated round {coordinator.version}: every result was "
                           f"refused ({why})")
