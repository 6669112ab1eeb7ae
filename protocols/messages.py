"""Every message of the conversation, as typed, validated objects.

A message is a frozen dataclass with ``to_wire() -> dict`` and ``from_wire(dict)``; the
codec (``codec.py``) turns it into bytes. ``from_wire`` checks every field (type, range,
finiteness, length) and raises ``ProtocolError`` naming the field, so nothing malformed
reaches a state machine. Versions: a model state of version ``k`` is the exported
weights plus the commits of rounds ``0 .. k-1``; round ``k`` is computed on version ``k``
and its commit makes version ``k + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from . import compact
from . import validate as v
from .compact import (
    MAX_POOL,
    MAX_SEEDS_PER_AGENT,
    SeedSlots,
    commit_from_wire,
    commit_to_wire,
    legacy_commit_from_wire,
    legacy_commit_to_wire,
)
from .directions import DirectionSpec
from .errors import ProtocolError
from .robust import MAX_SCALAR
from .zo import Commit

MAX_AGENTS_PER_ROUND = compact.MAX_AGENTS_PER_ROUND  # the orchestrator's config checks these
MAX_COMMITS_PER_SYNC = 1_000
_FP = 32  # hex digits of a weights fingerprint
_SHA = 64
_ROUND_MAX = 2**40


def _seeds(values: list, where: str) -> tuple[int, ...]:
    out = []
    for s in values:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**64:
            raise ProtocolError(f"{where}: seeds must be integers in [0, 2**64)", "bad_seed")
        out.append(s)
    if len(set(out)) != len(out):
        raise ProtocolError(f"{where}: seeds repeat", "bad_seed")
    return tuple(out)


@dataclass(frozen=True)
class Capabilities:
    """What an agent tells about itself, so the orchestrator can plan rounds around it."""

    memory_mb: int
    cores: int
    samples: int
    platform: str = ""
    version: str = ""

    def to_wire(self) -> dict:
        return {"memory_mb": self.memory_mb, "cores": self.cores, "samples": self.samples,
                "platform": self.platform, "version": self.version}

    @classmethod
    def from_wire(cls, d: dict) -> Capabilities:
        w = "hello.capabilities"
        v.no_extra(d, {"memory_mb", "cores", "samples", "platform", "version"}, w)
        return cls(v.integer(d, "memory_mb", w, 0, 1 << 30), v.integer(d, "cores", w, 1, 4096),
                   v.integer(d, "samples", w, 0, 1 << 40), v.text(d, "platform", w, 128),
                   v.text(d, "version", w, 64))


@dataclass(frozen=True)
class Hello:
    """Agent -> orchestrator on (re)connect: who it is, what it holds, what it can do."""

    type: ClassVar[str] = "hello"
    agent_id: str
    capabilities: Capabilities
    model_sha256: str = ""  # "" when the agent holds no model yet
    version: int = -1  # model state version held; -1 with no model
    fingerprint: str = ""

    def to_wire(self) -> dict:
        return {"agent_id": self.agent_id, "capabilities": self.capabilities.to_wire(),
                "model_sha256": self.model_sha256, "version": self.version,
                "fingerprint": self.fingerprint}

    @classmethod
    def from_wire(cls, d: dict) -> Hello:
        w = "hello"
        v.no_extra(d, {"agent_id", "capabilities", "model_sha256", "version", "fingerprint"}, w)
        has_model = v.integer(d, "version", w, -1, _ROUND_MAX) >= 0
        return cls(v.identifier(d, "agent_id", w),
                   Capabilities.from_wire(v.mapping(d, "capabilities", w)),
                   v.hexdigest(d, "model_sha256", w, _SHA) if has_model else "",
                   d["version"],
                   v.hexdigest(d, "fingerprint", w, _FP) if has_model else "")


@dataclass(frozen=True)
class ModelAnnounce:
    """Orchestrator -> all, retained: the model in use, the state it starts from, the ZO rules.

    Files travel separately in chunks (``topics.model_chunk``); each is checked against
    the manifest's SHA-256 before use.
    """

    type: ClassVar[str] = "model"
    model_sha256: str
    manifest: str  # the manifest.json text, verified against model_sha256
    version: int  # state version that weights.bin holds
    fingerprint: str  # fingerprint of that state
    spec: DirectionSpec = field(default_factory=DirectionSpec)
    chunk_bytes: int = 256 * 1024
    snapshot: str = ""  # "" = the exported weights.bin; else the snapshot file name

    def to_wire(self) -> dict:
        return {"model_sha256": self.model_sha256, "manifest": self.manifest,
                "version": self.version, "fingerprint": self.fingerprint,
                "spec": self.spec.to_dict(), "chunk_bytes": self.chunk_bytes,
                "snapshot": self.snapshot}

    @classmethod
    def from_wire(cls, d: dict) -> ModelAnnounce:
        w = "model"
        v.no_extra(d, {"model_sha256", "manifest", "version", "fingerprint", "spec",
                       "chunk_bytes", "snapshot"}, w)
        spec = v.mapping(d, "spec", w)
        v.no_extra(spec, {"distribution", "scale"}, "model.spec")
        return cls(v.hexdigest(d, "model_sha256", w, _SHA), v.text(d, "manifest", w, 4 << 20),
                   v.integer(d, "version", w, 0, _ROUND_MAX), v.hexdigest(d, "fingerprint", w, _FP),
                   DirectionSpec(v.text(spec, "distribution", "model.spec", 32),
                                 v.number(spec, "scale", "model.spec", 1e-12, 1e3)),
                   v.integer(d, "chunk_bytes", w, 1024, 16 << 20), v.text(d, "snapshot", w, 128))


@dataclass(frozen=True)
class RoundStart:
    """Orchestrator -> one participant, on its inbox: compute round ``round`` on state
    version ``round`` for these seeds.

    Each participant gets its own few hundred bytes; agents outside the round get nothing,
    so a round's start costs the broker O(participants), not O(participants x fleet).
    """

    type: ClassVar[str] = "round"
    round: int
    fingerprint: str  # of state version ``round``: an agent that differs must resync
    eps: float
    agent_id: str  # the addressee: an agent ignores a start meant for another
    seeds: tuple[int, ...]
    deadline_s: float = 60.0
    local_steps: int = 1  # >1: FedKSeed-style local steps, each on its own seeds
    local_lr: float = 0.0
    pool: int = 0  # the round's direction pool (its seeds are among the pool's); 0: distinct

    def to_wire(self) -> dict:
        return {"round": self.round, "fingerprint": self.fingerprint, "eps": self.eps,
                "agent_id": self.agent_id, "seeds": list(self.seeds),
                "deadline_s": self.deadline_s, "local_steps": self.local_steps,
                "local_lr": self.local_lr, "pool": self.pool}

    @classmethod
    def from_wire(cls, d: dict) -> RoundStart:
        w = "round"
        v.no_extra(d, {"round", "fingerprint", "eps", "agent_id", "seeds", "deadline_s",
                       "local_steps", "local_lr", "pool"}, w)
        seeds = _seeds(v.sequence(d, "seeds", w, MAX_SEEDS_PER_AGENT), w)
        steps = v.integer(d, "local_steps", w, 1, 10_000)
        if not seeds or len(seeds) % steps:
            raise ProtocolError(f"{w}: {len(seeds)} seeds do not split into {steps} local "
                                "steps", "bad_seed")
        return cls(v.integer(d, "round", w, 0, _ROUND_MAX), v.hexdigest(d, "fingerprint", w, _FP),
                   v.number(d, "eps", w, 1e-12, 1e3), v.identifier(d, "agent_id", w), seeds,
                   v.number(d, "deadline_s", w, 0.001, 7 * 86400.0), steps,
                   v.number(d, "local_lr", w, 0.0, 1e6), v.integer(d, "pool", w, 0, MAX_POOL))


MAX_LOSS = 1e30  # the bound every float on the wire has


def sendable(loss: float, scalars: tuple[float, ...] | list[float]) -> bool:
    """Whether an engine's round can go out as a Result. A non-finite value, a loss past
    the wire's bound or a scalar past the coordinator's (``robust.MAX_SCALAR``) means the
    model has diverged on this shard: the agent sends nothing (the round closes without
    it) instead of a message the orchestrator would refuse."""
    return (math.isfinite(loss) and abs(loss) <= MAX_LOSS
            and all(math.isfinite(g) and abs(g) <= MAX_SCALAR for g in scalars))


@dataclass(frozen=True)
class Result:
    """Agent -> orchestrator: one projected gradient per seed of its round start, in that
    order, on state ``fingerprint``. The seeds are not sent back: the coordinator assigned
    them, and it knows them."""

    type: ClassVar[str] = "result"
    agent_id: str
    round: int
    scalars: tuple[float, ...]
    samples: int
    fingerprint: str
    loss: float = 0.0  # mean of L+ and L- over all directions: the agent's training loss
    compute_s: float = 0.0
    queries: int = 0  # black-box API calls the round cost (prompt tuning); 0 for plain ZO

    def to_wire(self) -> dict:
        wire = {"agent_id": self.agent_id, "round": self.round, "scalars": list(self.scalars),
                "samples": self.samples, "fingerprint": self.fingerprint, "loss": self.loss,
                "compute_s": self.compute_s}
        return {**wire, "queries": self.queries} if self.queries else wire

    @classmethod
    def from_wire(cls, d: dict) -> Result:
        w = "result"
        v.no_extra(d, _RESULT_FIELDS, w)
        scalars = v.sequence(d, "scalars", w, MAX_SEEDS_PER_AGENT)
        if not scalars:
            raise ProtocolError(f"{w}: no scalars", "bad_scalars")
        return cls(v.identifier(d, "agent_id", w), v.integer(d, "round", w, 0, _ROUND_MAX),
                   v.finites(scalars, f"{w}: scalar"), v.integer(d, "samples", w, 1, 1 << 40),
                   v.hexdigest(d, "fingerprint", w, _FP),
                   v.number(d, "loss", w, -MAX_LOSS, MAX_LOSS),
                   v.number(d, "compute_s", w, 0.0, 1e9),
                   v.integer(d, "queries", w, 0, 1 << 40) if "queries" in d else 0)


_RESULT_FIELDS = frozenset({"agent_id", "round", "scalars", "samples", "fingerprint", "loss",
                            "compute_s", "queries"})


@dataclass(frozen=True)
class CommitMessage:
    """Orchestrator -> all, after the journal holds it: apply these pairs to version ``round``.

    With ``slots`` the seeds are not sent but derived from the run seed (``compact.py``);
    a message whose slots would derive other seeds than its pairs hold cannot be made.
    """

    type: ClassVar[str] = "commit"
    commit: Commit
    fingerprint: str  # of version round + 1, after applying
    slots: SeedSlots | None = None

    def __post_init__(self) -> None:
        if self.slots is not None and (self.slots.seeds(self.commit.round)
                                       != tuple(s for s, _ in self.commit.pairs)):
            raise ProtocolError(f"commit {self.commit.round}: its seeds do not follow from "
                                "its slots", "bad_seed")

    def to_wire(self, version: int = 3) -> dict:
        """Wire version 3's fields (version 2 or 1: a journal of that format's record)."""
        if version == 1:
            return {**legacy_commit_to_wire(self.commit), "fingerprint": self.fingerprint}
        return {**commit_to_wire(self.commit, self.slots, version),
                "fingerprint": self.fingerprint}

    @classmethod
    def from_wire(cls, d: dict, version: int = 3) -> CommitMessage:
        """A commit of wire version 3, or of an older one found in a journal: version 2
        (compact, float64) or 1 (``pairs`` as JSON pairs); both are applied pair by pair."""
        fp = v.hexdigest(d, "fingerprint", "commit", _FP)
        body = {k: x for k, x in d.items() if k != "fingerprint"}
        if version == 1:
            return cls(legacy_commit_from_wire(body, "commit"), fp)
        commit, slots = commit_from_wire(body, "commit", version)
        return cls(commit, fp, slots)


@dataclass(frozen=True)
class SyncRequest:
    """Agent -> orchestrator: "I hold version ``version``; send what I missed"."""

    type: ClassVar[str] = "sync"
    agent_id: str
    version: int
    fingerprint: str = ""

    def to_wire(self) -> dict:
        return {"agent_id": self.agent_id, "version": self.version,
                "fingerprint": self.fingerprint}

    @classmethod
    def from_wire(cls, d: dict) -> SyncRequest:
        w = "sync"
        v.no_extra(d, {"agent_id", "version", "fingerprint"}, w)
        version = v.integer(d, "version", w, -1, _ROUND_MAX)
        return cls(v.identifier(d, "agent_id", w), version,
                   v.hexdigest(d, "fingerprint", w, _FP) if version >= 0 else "")


@dataclass(frozen=True)
class SyncReply:
    """Orchestrator -> one agent: the commits it missed, or "fetch the snapshot" when too far."""

    type: ClassVar[str] = "sync_reply"
    agent_id: str
    commits: tuple[CommitMessage, ...] = ()
    snapshot: bool = False

    def to_wire(self) -> dict:
        return {"agent_id": self.agent_id, "commits": [c.to_wire() for c in self.commits],
                "snapshot": self.snapshot}

    @classmethod
    def from_wire(cls, d: dict) -> SyncReply:
        w = "sync_reply"
        v.no_extra(d, {"agent_id", "commits", "snapshot"}, w)
        commits = []
        for c in v.sequence(d, "commits", w, MAX_COMMITS_PER_SYNC):
            if not isinstance(c, dict):
                raise ProtocolError(f"{w}: commits hold objects", "bad_type")
            commits.append(CommitMessage.from_wire(c))
        rounds = [c.commit.round for c in commits]
        if rounds and rounds != list(range(rounds[0], rounds[0] + len(rounds))):
            raise ProtocolError(f"{w}: commits must be consecutive rounds, got {rounds}", "gap")
        if not isinstance(d.get("snapshot"), bool):
            raise ProtocolError(f"{w}: 'snapshot' must be true or false", "bad_type")
        return cls(v.identifier(d, "agent_id", w), tuple(commits), d["snapshot"])


@dataclass(frozen=True)
class Status:
    """Agent -> orchestrator (also its MQTT last will): online, offline or leaving."""

    type: ClassVar[str] = "status"
    agent_id: str
    state: str  # "online" | "offline"

    def to_wire(self) -> dict:
        return {"agent_id": self.agent_id, "state": self.state}

    @classmethod
    def from_wire(cls, d: dict) -> Status:
        w = "status"
        v.no_extra(d, {"agent_id", "state"}, w)
        state = v.text(d, "state", w, 16)
        if state not in ("online", "offline"):
            raise ProtocolError(f"{w}: state must be 'online' or 'offline'", "out_of_range")
        return cls(v.identifier(d, "agent_id", w), state)


@dataclass(frozen=True)
class Error:
    """Either way: a refusal, so the other side can log why its message did nothing."""

    type: ClassVar[str] = "error"
    code: str
    detail: str
    round: int = -1

    def to_wire(self) -> dict:
        return {"code": self.code, "detail": self.detail, "round": self.round}

    @classmethod
    def from_wire(cls, d: dict) -> Error:
        w = "error"
        v.no_extra(d, {"code", "detail", "round"}, w)
        return cls(v.text(d, "code", w, 64), v.text(d, "detail", w, 2048),
                   v.integer(d, "round", w, -1, _ROUND_MAX))


MESSAGE_TYPES: dict[str, type] = {m.type: m for m in (
    Hello, ModelAnnounce, RoundStart, Result, CommitMessage, SyncRequest, SyncReply, Status,
    Error)}
Message = (Hello | ModelAnnounce | RoundStart | Result | CommitMessage | SyncRequest | SyncReply
           | Status | Error)
