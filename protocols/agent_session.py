"""The agent's side of the conversation, as a state machine without I/O.

``receive`` takes what arrived and returns what to do: ``Send`` messages for the
transport, and work for the engine (``LoadModel``, ``Compute``, ``Apply``). The engine
reports back with ``model_loaded``, ``computed`` and ``applied``. The session tracks
which state version the weights hold, so a missed commit or a disconnect becomes a
``SyncRequest`` and a diverged fingerprint becomes a snapshot download, never a wrong
update.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import topics
from .codec import decode, encode
from .errors import ProtocolError
from .messages import (
    Capabilities,
    CommitMessage,
    Error,
    Hello,
    ModelAnnounce,
    Result,
    RoundStart,
    Status,
    SyncReply,
    SyncRequest,
)
from .topics import Send


@dataclass(frozen=True)
class LoadModel:
    """Fetch and verify the announced model files, load its weights (state ``announce.version``)."""

    announce: ModelAnnounce


@dataclass(frozen=True)
class Compute:
    """Run round ``start.round`` for ``seeds`` on the current weights, then call ``computed``."""

    start: RoundStart
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Apply:
    """Apply these commits in order, then call ``applied`` with the new fingerprint."""

    commits: tuple[CommitMessage, ...]


@dataclass(frozen=True)
class Refused:
    """The orchestrator refused something we sent; log it."""

    error: Error


Event = Send | LoadModel | Compute | Apply | Refused


class AgentSession:
    def __init__(self, run_id: str, agent_id: str, capabilities: Capabilities) -> None:
        self.run_id = run_id
        self.agent_id = agent_id
        self.capabilities = capabilities
        self.announce: ModelAnnounce | None = None
        self.model_sha256 = ""
        self.version = -1
        self.fingerprint = ""
        self.refused = 0  # inbound messages dropped as malformed
        self._pending: RoundStart | None = None  # a round to join once caught up
        self._busy = False  # the engine is loading, computing or applying
        self._latest = -1  # the newest commit round heard of
        self._report = False  # say hello once a catch-up is applied

    def subscriptions(self) -> list[str]:
        """The broadcasts, and the inbox: round starts, sync replies and refusals."""
        run = self.run_id
        return [topics.model(run), topics.commit(run), topics.agent(run, self.agent_id, "inbox")]

    def last_will(self) -> Send:
        return self._send("status", Status(self.agent_id, "offline"), retain=True)

    def connected(self) -> list[Send]:
        """After every (re)connect: say we are here and what we hold."""
        return [self._send("status", Status(self.agent_id, "online"), retain=True),
                self._send("hello", Hello(self.agent_id, self.capabilities, self.model_sha256,
                                          self.version, self.fingerprint))]

    def receive(self, topic: str, payload: bytes) -> list[Event]:
        try:
            message = decode(payload)
        except ProtocolError:
            self.refused += 1
            return []
        if isinstance(message, ModelAnnounce) and topic == topics.model(self.run_id):
            return self._on_model(message)
        if isinstance(message, CommitMessage) and topic == topics.commit(self.run_id):
            return self._on_commits((message,))
        inbox = topics.agent(self.run_id, self.agent_id, "inbox")
        if isinstance(message, RoundStart) and topic == inbox and message.agent_id == self.agent_id:
            return self._on_round(message)
        if isinstance(message, SyncReply) and topic == inbox and message.agent_id == self.agent_id:
            if message.snapshot and self.announce is not None:
                return self._load(self.announce)
            self._report = bool(message.commits)
            return self._on_commits(message.commits)
        if isinstance(message, Error) and topic == inbox:
            return [Refused(message)]
        self.refused += 1
        return []

    # --- inbound -------------------------------------------------------------------------

    def _on_model(self, announce: ModelAnnounce) -> list[Event]:
        self.announce = announce
        if announce.model_sha256 != self.model_sha256 or self.version < 0:
            return self._load(announce)
        return self._sync() if announce.version > self.version else []

    def _on_round(self, start: RoundStart) -> list[Event]:
        if self._busy or self.version < 0:
            self._pending = start
            return []
        if start.round > self.version:
            self._pending = start
            return self._sync()
        if start.round < self.version:
            return []
        if start.fingerprint != self.fingerprint and self.announce is not None:
            return self._load(self.announce)  # same version, other bits: we diverged
        self._busy = True
        return [Compute(start, start.seeds)]

    def _on_commits(self, commits: tuple[CommitMessage, ...]) -> list[Event]:
        if commits:
            self._latest = max(self._latest, commits[-1].commit.round)
        if self._busy or self.version < 0:
            return []  # once the engine is free, _resume asks for what is still missing
        todo = tuple(c for c in commits if c.commit.round >= self.version)
        if not todo:
            return []
        if todo[0].commit.round > self.version:
            return self._sync()
        self._busy = True
        return [Apply(todo)]

    # --- what the engine reports ---------------------------------------------------------

    def model_loaded(self, model_sha256: str, version: int, fingerprint: str) -> list[Event]:
        self._busy = False
        if self.announce is not None and self.announce.fingerprint != fingerprint:
            return [Refused(Error("fingerprint_mismatch", "loaded weights do not match the "
                                  "announced fingerprint; the model stays unloaded"))]
        self.model_sha256, self.version, self.fingerprint = model_sha256, version, fingerprint
        return self.connected()[1:] + self._resume()

    def computed(self, start: RoundStart, scalars: tuple[float, ...], samples: int,
                 loss: float, compute_s: float, queries: int = 0) -> list[Event]:
        self._busy = False
        result = Result(self.agent_id, start.round, tuple(float(s) for s in scalars),
                        samples, self.fingerprint, float(loss), float(compute_s), int(queries))
        return [self._send("result", result)] + self._resume()

    def skipped(self) -> list[Event]:
        """The engine produced no usable result (a non-finite loss): send nothing, go on.

        The round closes at its deadline without us; a non-finite scalar is never sent,
        since the orchestrator would refuse it anyway.
        """
        self._busy = False
        return self._resume()

    def applied(self, commits: tuple[CommitMessage, ...], fingerprint: str) -> list[Event]:
        """The engine applied ``commits``; a fingerprint that differs means we diverged."""
        self._busy = False
        last = commits[-1]
        if fingerprint != last.fingerprint:
            self.version = -1 if self.announce is None else self.version
            return self._load(self.announce) if self.announce is not None else []
        self.version, self.fingerprint = last.commit.round + 1, fingerprint
        report, self._report = self._report, False
        return (self.connected()[1:] if report else []) + self._resume()

    # --- helpers -------------------------------------------------------------------------

    def _resume(self) -> list[Event]:
        pending, self._pending = self._pending, None
        if pending is not None and pending.round >= self.version:
            return self._on_round(pending)
        return self._sync() if self._latest >= self.version >= 0 else []

    def _load(self, announce: ModelAnnounce) -> list[Event]:
        self._busy = True
        return [LoadModel(announce)]

    def _sync(self) -> list[Event]:
        return [self._send("sync", SyncRequest(self.agent_id, self.version, self.fingerprint))]

    def _send(self, kind: str, message, retain: bool = False) -> Send:
        return Send(topics.agent(self.run_id, self.agent_id, kind), encode(message), retain)
