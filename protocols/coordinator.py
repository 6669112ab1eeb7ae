"""The orchestrator's side of the ZO rounds, as a state machine without I/O.

Feed it what arrives (``receive``) and the time; it answers with ``Send`` objects for
the transport to publish. It holds no weights: the driver applies each commit to its
own copy, journals it, and reports the new fingerprint (``committed``). The same
object therefore runs over MQTT, over the in-memory bus, and in unit tests.

A round::

    idle --open_round--> open --(quorum or deadline: ready)--> close_round --> closing
    closing --committed(commit, fingerprint)--> idle, version + 1

Messages stay small at fleet scale: ``open_round`` sends each participant its own
``RoundStart`` on its inbox, and the commit names its seeds by slot (participant index,
direction) instead of listing them, since they follow from the run seed (``compact.py``).

Every refused message is counted by its reason in ``refused`` and changes nothing.
Closing a round clips every scalar to a bound derived from the run's own scales, and
may trim the extremes (``protocols/robust.py``); ``clipped`` and ``trimmed`` count them.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from . import topics
from .codec import decode, encode
from .compact import SeedSlots
from .directions import DirectionSpec
from .errors import ProtocolError
from .messages import (
    MAX_COMMITS_PER_SYNC,
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
from .robust import MAX_SCALAR, Robustness, round_scale, scalar_bound, trimmed_keep
from .topics import Send
from .zo import ClientResult, Commit, aggregate, derive_seed

_KIND = {"hello": Hello, "result": Result, "sync": SyncRequest, "status": Status}


@dataclass(frozen=True)
class RoundPolicy:
    """How rounds are run: the ZO hyperparameters and when a round may close."""

    eps: float = 1e-3
    lr: float = 1e-3
    directions: int = 1  # s: directions per client and local step
    local_steps: int = 1
    local_lr: float = 0.0  # learning rate of local steps (FedKSeed style); 0 = lr
    quorum: float = 1.0  # fraction of the round's participants whose results close it early
    deadline_s: float = 60.0
    robust: Robustness = field(default_factory=Robustness)

    def __post_init__(self) -> None:
        for name in ("eps", "lr", "deadline_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ProtocolError(f"round policy: {name} must be a positive number", "bad_policy")
        if not 0 < self.quorum <= 1:
            raise ProtocolError("round policy: quorum must be in (0, 1]", "bad_policy")
        if self.directions < 1 or self.local_steps < 1:
            raise ProtocolError("round policy: directions and local_steps must be >= 1",
                                "bad_policy")


@dataclass
class AgentRecord:
    capabilities: Capabilities
    version: int = -1
    fingerprint: str = ""
    online: bool = True
    last_seen: float = 0.0
    results: int = 0


@dataclass(frozen=True)
class RoundPlan:
    """An open round as the coordinator sees it: what each participant was asked."""

    round: int
    fingerprint: str
    eps: float
    participants: tuple[str, ...]
    assignments: dict[str, tuple[int, ...]]  # participant -> its seeds
    deadline_s: float
    local_steps: int
    local_lr: float

    def start_for(self, agent_id: str) -> RoundStart:
        """The round start sent to ``agent_id`` (a participant)."""
        return RoundStart(self.round, self.fingerprint, self.eps, agent_id,
                          self.assignments[agent_id], self.deadline_s, self.local_steps,
                          self.local_lr)


@dataclass
class _OpenRound:
    plan: RoundPlan
    per_client: int  # seeds per participant, which fixes the commit's slots
    deadline: float
    results: dict[str, Result] = field(default_factory=dict)


class Coordinator:
    def __init__(self, run_id: str, run_seed: int, spec: DirectionSpec, version: int,
                 fingerprint: str, policy: RoundPolicy, history: Iterable[CommitMessage] = (),
                 keep_commits: int = 200, scales: Mapping[int, float] | None = None) -> None:
        self.run_id = run_id
        self.run_seed = run_seed
        self.spec = spec
        self.version = version
        self.fingerprint = fingerprint
        self.policy = policy
        self.agents: dict[str, AgentRecord] = {}
        self.refused: Counter[str] = Counter()
        self.refusals: deque[str] = deque(maxlen=100)  # the latest reasons, for logs
        self.late = 0
        self.clipped = 0  # scalars clipped to the bound, over the run so far
        self.trimmed = 0  # scalars left out by the trimmed mean
        # Each earlier round's median |g|, from the journal on resume: the clipping bound's
        # reference must be the same whether or not the run stopped in between.
        window = policy.robust.clip_window
        self._scales: deque[float] = deque(
            (scales[r] for r in range(max(0, version - window), version)
             if scales and r in scales), maxlen=window)
        self.closing_scale: float | None = None  # the closing round's, for the journal
        self.model_sha256 = ""  # the announced model; "" until announce() (then unchecked)
        self._history: deque[CommitMessage] = deque(history, maxlen=min(keep_commits,
                                                                        MAX_COMMITS_PER_SYNC))
        self._round: _OpenRound | None = None
        self._closing: Commit | None = None
        self._slots: SeedSlots | None = None  # where the closing commit's seeds come from
        self._message: CommitMessage | None = None  # the closing commit's, once made

    # --- what the driver subscribes to and announces -----------------------------------

    def subscriptions(self) -> list[str]:
        return topics.agent_filters(self.run_id)

    def announce(self, announce: ModelAnnounce) -> Send:
        self.model_sha256 = announce.model_sha256
        return Send(topics.model(self.run_id), encode(announce), retain=True)

    @property
    def phase(self) -> str:
        return "open" if self._round else "closing" if self._closing else "idle"

    # --- rounds -------------------------------------------------------------------------

    def open_round(self, participants: Sequence[str], now: float) -> list[Send]:
        """Start round ``version`` for these agents: one ``RoundStart`` per participant, in
        participant order, each on the participant's inbox (at QoS 0: see ``Send``).
        Participant ``i`` gets the seeds ``derive_seed(run_seed, version, i, j)``, so they
        follow from the run seed alone."""
        if self.phase != "idle":
            raise RuntimeError(f"cannot open a round while {self.phase}")
        if not participants or len(set(participants)) != len(participants):
            raise ValueError("participants must be distinct and at least one")
        per_agent = self.policy.directions * self.policy.local_steps
        assignments = {agent: tuple(derive_seed(self.run_seed, self.version, i, j)
                                    for j in range(per_agent))
                       for i, agent in enumerate(participants)}
        plan = RoundPlan(self.version, self.fingerprint, self.policy.eps, tuple(participants),
                         assignments, self.policy.deadline_s, self.policy.local_steps,
                         self.policy.local_lr or self.policy.lr)
        self._round = _OpenRound(plan, per_agent, now + self.policy.deadline_s)
        return [Send(topics.agent(self.run_id, agent, "inbox"), encode(plan.start_for(agent)),
                     qos=0) for agent in participants]

    def ready(self, now: float) -> bool:
        """True once the quorum has answered or the deadline has passed."""
        r = self._round
        if r is None:
            return False
        need = math.ceil(self.policy.quorum * len(r.plan.participants))
        return len(r.results) >= need or now >= r.deadline

    def close_round(self) -> Commit:
        """Aggregate what arrived, in participant order (arrival order must not change bits)."""
        r = self._round
        if r is None:
            raise RuntimeError("no round is open")
        plan = r.plan
        answered = [(i, r.results[a]) for i, a in enumerate(plan.participants) if a in r.results]
        scalars = [g for _, x in answered for g in x.scalars]
        scale = round_scale(scalars)
        bound = scalar_bound(self.policy.robust, self._scales, scale)
        keep = trimmed_keep(scalars, self.policy.robust.trim)
        commit = aggregate(plan.round, [
            ClientResult(x.seeds, x.scalars, x.samples, plan.local_steps) for _, x in answered
        ], self.policy.lr, bound, keep)
        kept = range(len(scalars)) if keep is None else sorted(keep)
        slots = [i * r.per_client + j for i, x in answered for j in range(len(x.seeds))]
        self._slots = SeedSlots(self.run_seed, r.per_client, tuple(slots[k] for k in kept))
        self.clipped += sum(abs(scalars[i]) > bound for i in kept)
        self.trimmed += len(scalars) - len(kept)
        self._round, self._closing, self.closing_scale = None, commit, scale
        self._message = None
        return commit

    def commit_message(self, commit: Commit, fingerprint: str) -> CommitMessage:
        """The message that journals and broadcasts the closing commit: its seeds by slot.

        A commit whose seeds do not follow from its slots (two slots whose derived seeds
        collide, about 2**-64 per pair) travels with its seeds listed instead.
        """
        if commit != self._closing:
            raise RuntimeError("commit_message() must get the commit that close_round() "
                               "returned")
        if self._message is None or self._message.fingerprint != fingerprint:
            try:
                self._message = CommitMessage(commit, fingerprint, self._slots)
            except ProtocolError:
                self._message = CommitMessage(commit, fingerprint)
        return self._message

    def committed(self, commit: Commit, fingerprint: str) -> Send:
        """The commit is durable and applied (weights now hash to ``fingerprint``): broadcast."""
        if commit != self._closing:
            raise RuntimeError("committed() must get the commit that close_round() returned")
        message = self.commit_message(commit, fingerprint)
        self._history.append(message)
        if self.closing_scale is not None:
            self._scales.append(self.closing_scale)
        self._closing, self._message = None, None
        self.version, self.fingerprint = commit.round + 1, fingerprint
        return Send(topics.commit(self.run_id), encode(message), retain=True)

    @property
    def history(self) -> tuple[CommitMessage, ...]:
        """The commits kept for catching agents up, oldest first."""
        return tuple(self._history)

    @property
    def current_round(self) -> RoundPlan | None:
        return self._round.plan if self._round else None

    def round_results(self) -> dict[str, Result]:
        return dict(self._round.results) if self._round else {}

    # --- what agents send -------------------------------------------------------------

    def receive(self, topic: str, payload: bytes, now: float) -> list[Send]:
        """Handle one inbound message; never raises for bad input, counts it instead."""
        try:
            where = topics.parse_agent_topic(self.run_id, topic)
            message = decode(payload)
            if not isinstance(message, _KIND[where.kind]):
                raise ProtocolError(f"a {message.type} message on a {where.kind} topic",
                                    "bad_topic")
            if message.agent_id != where.agent_id:
                raise ProtocolError(f"agent {where.agent_id!r} sent a message signed "
                                    f"{message.agent_id!r}", "spoofed_id")
            return getattr(self, f"_on_{where.kind}")(message, now)
        except ProtocolError as exc:
            self.refused[exc.code] += 1
            self.refusals.append(f"{topic}: {exc}")
            return []

    def _refuse(self, agent_id: str, code: str, detail: str, round_id: int = -1) -> list[Send]:
        self.refused[code] += 1
        self.refusals.append(f"{agent_id}: {detail}")
        error = Error(code, detail, round_id)
        return [Send(topics.agent(self.run_id, agent_id, "inbox"), encode(error))]

    def _on_hello(self, hello: Hello, now: float) -> list[Send]:
        if hello.version >= 0 and self.model_sha256 and hello.model_sha256 != self.model_sha256:
            return self._refuse(hello.agent_id, "wrong_model", f"{hello.agent_id} holds model "
                                f"{hello.model_sha256[:16]}, this run's is "
                                f"{self.model_sha256[:16]}; load the announced model")
        record = self.agents.setdefault(hello.agent_id, AgentRecord(hello.capabilities))
        record.capabilities, record.version, record.fingerprint = (hello.capabilities,
                                                                   hello.version, hello.fingerprint)
        record.online, record.last_seen = True, now
        if hello.version < 0:
            return []
        return self._sync_reply(hello.agent_id, hello.version, hello.fingerprint)

    def _on_status(self, status: Status, now: float) -> list[Send]:
        record = self.agents.get(status.agent_id)
        if record is not None:
            record.online, record.last_seen = status.state == "online", now
        return []

    def _on_sync(self, request: SyncRequest, now: float) -> list[Send]:
        if request.agent_id not in self.agents:
            return self._refuse(request.agent_id, "unknown_agent",
                                "sync from an agent that never said hello")
        self.agents[request.agent_id].last_seen = now
        return self._sync_reply(request.agent_id, request.version, request.fingerprint)

    def _sync_reply(self, agent_id: str, version: int, fingerprint: str) -> list[Send]:
        """Commits from ``version`` on; a snapshot when they are gone or the agent diverged."""
        if version == self.version and fingerprint == self.fingerprint:
            return []
        kept = {m.commit.round: m for m in self._history}
        expected = (self.fingerprint if version == self.version
                    else kept[version - 1].fingerprint if version - 1 in kept else None)
        missing = range(version, self.version)
        if (version < 0 or version > self.version or expected not in (None, fingerprint)
                or any(r not in kept for r in missing)):
            reply = SyncReply(agent_id, (), snapshot=True)
        else:
            reply = SyncReply(agent_id, tuple(kept[r] for r in missing))
        return [Send(topics.agent(self.run_id, agent_id, "inbox"), encode(reply))]

    def _on_result(self, result: Result, now: float) -> list[Send]:
        agent = result.agent_id
        if agent not in self.agents:
            return self._refuse(agent, "unknown_agent", "result from an agent that never said "
                                "hello", result.round)
        r = self._round
        if r is None or result.round != r.plan.round:
            current = r.plan.round if r else self.version
            if result.round < current or (r is None and result.round == current):
                self.late += 1
                return self._refuse(agent, "stale_round", f"result for round {result.round} "
                                    "came after it closed", result.round)
            return self._refuse(agent, "future_round", f"result for round {result.round}, "
                                f"which has not started (current {current})", result.round)
        if agent not in r.plan.assignments:
            return self._refuse(agent, "not_assigned", f"{agent} is not in round "
                                f"{result.round}", result.round)
        if agent in r.results:
            return self._refuse(agent, "duplicate", f"second result from {agent} for round "
                                f"{result.round}", result.round)
        if result.seeds != r.plan.assignments[agent]:
            return self._refuse(agent, "bad_seed", "result seeds differ from the assigned ones",
                                result.round)
        if any(abs(g) > MAX_SCALAR for g in result.scalars):
            return self._refuse(agent, "absurd_scalar", f"{agent} sent a scalar beyond "
                                f"{MAX_SCALAR:g} in absolute value", result.round)
        if result.fingerprint != r.plan.fingerprint:
            return self._refuse(agent, "fingerprint_mismatch", f"{agent} computed on weights "
                                f"{result.fingerprint}, the round is on {r.plan.fingerprint}",
                                result.round)
        r.results[agent] = result
        record = self.agents[agent]
        record.results, record.last_seen = record.results + 1, now
        record.version, record.fingerprint = result.round, result.fingerprint
        return []
