"""The round loop, written once: choose -> start -> collect -> close -> apply -> journal ->
broadcast -> evaluate.

Every round-based phase runs here: ZOWarmUp's ZO rounds, the hi+lo ablation and black-box
prompt tuning, over any :class:`Fleet`. The ``Coordinator`` (``protocols/coordinator.py``)
decides everything about a round without I/O; a fleet only carries its messages to the
agents and brings their answers back; this loop owns the order of the steps, and with it
the contract that a commit is journaled (fsync) before any agent sees it. As in Flower's
``Server.fit_round`` over ``ClientProxy``, fleets are interchangeable: the MQTT fleet
(``rounds/mqtt.py``: real agents behind a broker) and the worker fleet
(``rounds/workers.py``: the agent's own engine in worker processes) end on the same bits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from protocols.coordinator import Coordinator, RoundPolicy
from protocols.journal import Journal
from protocols.messages import CommitMessage, Result
from protocols.topics import Send
from protocols.zo import Commit

from ..run.state import Diverged
from ..run.stopping import shielded
from .model import Delta, ModelState
from .snapshots import Snapshots

log = logging.getLogger("zowarmup.rounds")

Choose = Callable[[Sequence[str], int], list[str]]  # (who may take part, version) -> who does
Keep = Callable[[int, Delta], None]  # makes a round's delta durable before its commit


class Fleet(Protocol):
    """Where a round's messages go and its results come from."""

    result_bytes: int  # bytes of results received so far: the ZO uplink proper

    def participants(self, version: int, choose: Choose) -> list[str]:
        """This round's participants: ``choose`` over the agents that can take part now."""

    def start(self, starts: Sequence[Send]) -> None:
        """Deliver the round's starts, one per participant, in participant order."""

    def collect(self, coordinator: Coordinator) -> list[str]:
        """Feed what agents send to ``coordinator`` until it is ready to close the round.

        Returns the participants known to have dropped out because their loss diverged
        (an agent then sends nothing; only an in-process fleet can tell).
        """

    def commit(self, broadcast: Send, message: CommitMessage, delta: Delta | None) -> None:
        """Deliver a journaled commit, and the update beside it if any, to every agent."""


def start_coordinator(state: ModelState, run_id: str, run_seed: int, policy: RoundPolicy,
                      history: Sequence[CommitMessage], journal: Journal | None = None,
                      keep_commits: int = 200) -> Coordinator:
    """The coordinator of a run at the state ``history`` left it in. Commits are applied by
    the journal's rule: a journal of an older format goes on as its run began."""
    if journal is not None and journal.apply != policy.apply:
        policy = replace(policy, apply=journal.apply)
    return Coordinator(run_id, run_seed, state.spec, len(history), state.fingerprint(), policy,
                       history=history[-keep_commits:], keep_commits=keep_commits,
                       scales=journal.scales if journal is not None else None)


class RoundLoop:
    """One round at a time over a fleet; :func:`run_rounds` repeats it for a phase."""

    def __init__(self, state: ModelState, coordinator: Coordinator, fleet: Fleet,
                 journal: Journal | None = None, snapshots: Snapshots | None = None) -> None:
        self.state, self.coordinator, self.fleet, self.journal = (state, coordinator, fleet,
                                                                  journal)
        self.snapshots = snapshots  # written after the journal, every ``snapshots.every``
        self.downlink_bytes = 0  # what one participant received: its round starts and commits
        self.last_results: dict[str, Result] = {}  # what the last round's clients reported

    @property
    def weights(self) -> list[np.ndarray]:
        return self.state.weights

    def run_round(self, participants: Sequence[str], delta: Delta | None = None,
                  keep: Keep | None = None) -> Commit:
        """One whole round; ``delta`` (an update applied after the commit) is handed to
        ``keep`` before the commit is journaled, and delivered with it."""
        self.open_round(participants)
        diverged = self.collect()
        return self.finish_round(delta, keep, diverged)

    def open_round(self, participants: Sequence[str]) -> None:
        starts = self.coordinator.open_round(participants, time.time())
        self.downlink_bytes += sum(len(s.payload) for s in starts) // len(starts)
        self.fleet.start(starts)

    def collect(self) -> list[str]:
        """Results until the quorum answered or the deadline passed."""
        return self.fleet.collect(self.coordinator)

    def finish_round(self, delta: Delta | None = None, keep: Keep | None = None,
                     diverged: Sequence[str] = ()) -> Commit:
        """Aggregate, apply to our weights, journal durably, then broadcast the commit."""
        c = self.coordinator
        self.last_results = c.round_results()
        if not self.last_results and diverged:
            raise Diverged(f"round {c.version} diverged: no client's loss is usable "
                           "(non-finite or past the wire's bounds); rerun with a lower "
                           "learning rate (zo.lr)")
        commit = c.close_round()
        self.state.apply(commit, delta)
        if delta is not None and keep is not None:
            keep(commit.round, delta)
        fp = self.state.fingerprint()
        message = c.commit_message(commit, fp)
        if self.journal is not None:
            with shielded():  # a stop signal now waits for the whole record
                self.journal.append_commit(message, c.closing_scale)
            if self.snapshots is not None and self.snapshots.due(commit.round + 1):
                self.snapshots.write(commit.round + 1, self.state.flat, fp)
        broadcast = c.committed(commit, fp)
        self.downlink_bytes += len(broadcast.payload)
        self.fleet.commit(broadcast, message, delta)
        log.info("round %d committed: %d pair(s), fingerprint %s", commit.round,
                 len(commit.pairs), fp[:12])
        return commit


@dataclass(frozen=True)
class Schedule:
    """Which rounds a phase runs, who takes part in each, and when the model is evaluated."""

    rounds: int  # the phase's rounds: versions 0 .. rounds - 1
    run_seed: int
    clients_per_round: int | None = None  # None: everyone the fleet offers
    eval_every: int = 1

    def choose(self, pool: Sequence[str], version: int) -> list[str]:
        """A seeded sample of ``pool``, the same on every rerun."""
        k = self.clients_per_round
        if not k or k >= len(pool):
            return list(pool)
        rng = np.random.default_rng([self.run_seed, version, 0x5A0])
        return sorted(rng.choice(list(pool), size=k, replace=False).tolist())

    def evaluates(self, version: int) -> bool:
        return (version + 1) % self.eval_every == 0 or version + 1 == self.rounds


@dataclass(frozen=True)
class RoundReport:
    """What one round did, for its metrics row."""

    version: int
    participants: list[str]
    commit: Commit
    results: dict[str, Result]
    uplink_bytes: int  # every result's bytes
    downlink_bytes: int  # what one participant received
    scores: dict  # {"test_acc": .., "test_loss": .., ...}: None where not evaluated
    skipped: dict[str, str] = field(default_factory=dict)  # left out of the draw, and why


Play = Callable[[list[str]], Commit]  # one round for these participants (default: run_round)
NOT_EVALUATED = {"test_acc": None, "test_loss": None}


def run_rounds(loop: RoundLoop, schedule: Schedule, evaluate: Callable[[], dict],
               record: Callable[[RoundReport], None], play: Play | None = None) -> None:
    """Every round of a phase from the loop's version on, each recorded once it is durable."""
    for version in range(loop.coordinator.version, schedule.rounds):
        participants = loop.fleet.participants(version, schedule.choose)
        up, down = loop.fleet.result_bytes, loop.downlink_bytes
        commit = (play or loop.run_round)(participants)
        scores = evaluate() if schedule.evaluates(version) else dict(NOT_EVALUATED)
        record(RoundReport(version, participants, commit, loop.last_results,
                           loop.fleet.result_bytes - up, loop.downlink_bytes - down, scores,
                           dict(loop.coordinator.skipped)))
