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

Every refused message is counted by its reason in ``refused`` (and in the sending agent's
record) and changes nothing.

Liveness is state, not a timeout. An agent is *offline* once its status says so (its clean
goodbye, or the last will the broker publishes for a connection that died: at once for a
killed process, within 1.5 keep-alive intervals for a silent one), once the orchestrator's
own connection was lost (until its retained status or a hello says it is back), or after
``max_missed_rounds`` rounds in a row it was chosen for and did not answer (until it says
hello again). It is *catching up* while it is online but not known to hold the current
state (or the one just before it: that one gets the last commit first). Only the rest,
*online*, are drawn (``draw``), and a round closes as soon as every participant that has
not answered is offline (``ready``), so a dead device costs one round's deadline at most,
and only once.
Closing a round clips every scalar to a bound derived from the run's own scales, and
may trim the extremes (``protocols/robust.py``); ``clipped`` and ``trimmed`` count them.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from . import topics
from .codec import decode, encode, encode_each
from .compact import MAX_POOL, SeedSlots
from .directions import APPLY_RULES, SUM64, DirectionSpec
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
from .zo import ClientResult, Commit, pool_pairs, slot_seeds, weigh

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
    pool: int = 0  # directions a round draws from (slot t evaluates slot t mod pool); 0: each
    apply: str = SUM64  # how commits are applied: the journal's rule (PAIRWISE: old formats)
    max_missed_rounds: int = 2  # rounds in a row without a result before an agent is offline

    def __post_init__(self) -> None:
        for name in ("eps", "lr", "deadline_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ProtocolError(f"round policy: {name} must be a positive number", "bad_policy")
        if not 0 < self.quorum <= 1:
            raise ProtocolError("round policy: quorum must be in (0, 1]", "bad_policy")
        if self.directions < 1 or self.local_steps < 1:
            raise ProtocolError("round policy: directions and local_steps must be >= 1",
                                "bad_policy")
        if self.max_missed_rounds < 1:
            raise ProtocolError("round policy: max_missed_rounds must be >= 1", "bad_policy")
        if self.pool and not self.directions * self.local_steps <= self.pool <= MAX_POOL:
            raise ProtocolError(f"round policy: a direction pool holds each client's "
                                f"{self.directions * self.local_steps} seeds and at most "
                                f"{MAX_POOL}, not {self.pool}", "bad_policy")
        if self.apply not in APPLY_RULES:
            raise ProtocolError(f"round policy: unknown application {self.apply!r}",
                                "bad_policy")

    @property
    def step_lr(self) -> float:
        """The learning rate of a client's steps, and so of the commit: with several local
        steps, the local one, so that the commit moves every holder along the (sample-
        weighted average of the) trajectories the clients took; with one step, ``lr``."""
        return (self.local_lr or self.lr) if self.local_steps > 1 else self.lr


@dataclass
class AgentRecord:
    capabilities: Capabilities
    version: int = -1  # the state it last reported (hello or result)
    fingerprint: str = ""
    online: bool = True  # connected, as far as its status and hellos say
    last_seen: float = 0.0
    results: int = 0  # rounds answered
    synced: bool = False  # its last report was the current state or the one before it
    missed: int = 0  # rounds in a row it was chosen for and did not answer
    missed_total: int = 0
    offline_reason: str = ""  # why it went offline, while it is
    refused: Counter[str] = field(default_factory=Counter)  # its messages refused, by reason


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
    pool: int = 0

    def start_for(self, agent_id: str) -> RoundStart:
        """The round start sent to ``agent_id`` (a participant)."""
        return RoundStart(self.round, self.fingerprint, self.eps, agent_id,
                          self.assignments[agent_id], self.deadline_s, self.local_steps,
                          self.local_lr, self.pool)


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
        # Catch-up: an agent more than ``replay_limit`` commits behind loads the snapshot
        # of ``snapshot_version`` (the transport publishes it) rather than replaying them.
        self.replay_limit: int | None = None
        self.snapshot_version = -1
        self._base = (version, fingerprint)  # the state this coordinator started from
        self.skipped: dict[str, str] = {}  # left out of the latest draw, and why
        self._gone: set[str] = set()  # participants of the open round known offline
        self._gone_round = -1  # the round ``_gone`` is about

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
        Participant ``i`` gets ``P`` seeds: seed ``j`` is the one of slot ``t = i * P + j``,
        ``derive_seed(run_seed, version, t div P, t mod P)``, so they follow from the run seed
        alone. With a direction pool of ``N``, slot ``t`` takes the seed of slot ``t mod N``:
        the round has at most ``N`` directions, each evaluated by about ``K P / N`` clients."""
        if self.phase != "idle":
            raise RuntimeError(f"cannot open a round while {self.phase}")
        if not participants or len(set(participants)) != len(participants):
            raise ValueError("participants must be distinct and at least one")
        per_agent, pool = self.policy.directions * self.policy.local_steps, self.policy.pool
        seeds = slot_seeds(self.run_seed, self.version, per_agent, pool, len(participants))
        assignments = {agent: seeds[i * per_agent:(i + 1) * per_agent]
                       for i, agent in enumerate(participants)}
        plan = RoundPlan(self.version, self.fingerprint, self.policy.eps, tuple(participants),
                         assignments, self.policy.deadline_s, self.policy.local_steps,
                         self.policy.step_lr, pool)
        self._round = _OpenRound(plan, per_agent, now + self.policy.deadline_s)
        payloads = encode_each(plan.start_for(participants[0]), ("agent_id", "seeds"),
                               ((agent, list(assignments[agent])) for agent in participants))
        return [Send(topics.agent(self.run_id, agent, "inbox"), payload, qos=0)
                for agent, payload in zip(participants, payloads)]

    def ready(self, now: float) -> bool:
        """True once the quorum has answered or the deadline has passed."""
        r = self._round
        if r is None:
            return False
        need = math.ceil(self.policy.quorum * len(r.plan.participants))
        return len(r.results) >= need or now >= r.deadline or self._all_outstanding_gone()

    def close_round(self) -> Commit:
        """Aggregate what arrived, in participant order (arrival order must not change bits)."""
        r = self._round
        if r is None:
            raise RuntimeError("no round is open")
        plan = r.plan
        self._attend(plan.participants, r.results)
        answered = [(a, r.results[a]) for a in plan.participants if a in r.results]
        scalars = [g for _, x in answered for g in x.scalars]
        scale = round_scale(scalars)
        bound = scalar_bound(self.policy.robust, self._scales, scale)
        keep = trimmed_keep(scalars, self.policy.robust.trim)
        per_slot = weigh([ClientResult(plan.assignments[a], x.scalars, x.samples,
                                       plan.local_steps) for a, x in answered],
                         self.policy.step_lr, bound, keep)
        kept = range(len(scalars)) if keep is None else sorted(keep)
        slots = [i * r.per_client + j for i, x in enumerate(plan.participants)
                 if x in r.results for j in range(r.per_client)]
        pairs, pooled = pool_pairs(per_slot, [slots[k] for k in kept], plan.pool)
        commit = Commit(plan.round, tuple(pairs), self.policy.apply)
        self._slots = SeedSlots(self.run_seed, r.per_client, tuple(pooled), plan.pool)
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
        where = None
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
            if where is not None and where.agent_id in self.agents:
                self.agents[where.agent_id].refused[exc.code] += 1
            return []

    def _refuse(self, agent_id: str, code: str, detail: str, round_id: int = -1) -> list[Send]:
        self.refused[code] += 1
        if agent_id in self.agents:
            self.agents[agent_id].refused[code] += 1
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
        record.online, record.last_seen, record.missed, record.offline_reason = True, now, 0, ""
        record.synced = hello.version >= self.version - 1 and self._on_history(record)
        self._gone.discard(hello.agent_id)
        if hello.version < 0:
            return []
        return self._sync_reply(hello.agent_id, hello.version, hello.fingerprint)

    def _on_status(self, status: Status, now: float) -> list[Send]:
        record = self.agents.get(status.agent_id)
        if record is None:
            return []
        if status.state == "online":
            record.online, record.offline_reason, record.last_seen = True, "", now
            self._gone.discard(status.agent_id)
            return self._start_again(status.agent_id)
        self._went_offline(status.agent_id, "its status or last will said offline")
        return []

    def _start_again(self, agent_id: str) -> list[Send]:
        """An agent (re)connected while the open round waits for its result. An agent says
        online once per connection, and this coordinator reads every retained status again
        after its own reconnect (``connection_lost``): either way, the round's start or the
        agent's result may have been lost with a connection, so the start goes out again.
        The agent computes it once it holds the round's state; a second result for the round
        is refused as a duplicate, and costs nothing else."""
        r = self._round
        if r is None or agent_id not in r.plan.assignments or agent_id in r.results:
            return []
        return [Send(topics.agent(self.run_id, agent_id, "inbox"),
                     encode(r.plan.start_for(agent_id)), qos=0)]

    def _on_sync(self, request: SyncRequest, now: float) -> list[Send]:
        if request.agent_id not in self.agents:
            return self._refuse(request.agent_id, "unknown_agent",
                                "sync from an agent that never said hello")
        self.agents[request.agent_id].last_seen = now
        return self._sync_reply(request.agent_id, request.version, request.fingerprint)

    def _sync_reply(self, agent_id: str, version: int, fingerprint: str) -> list[Send]:
        """Commits from ``version`` on; a snapshot when they are gone, when the agent
        diverged, or when it is further behind than ``replay_limit`` and a newer snapshot
        is out (so that catching up costs at most that many commits)."""
        if version == self.version and fingerprint == self.fingerprint:
            return []
        kept = {m.commit.round: m for m in self._history}
        expected = (self.fingerprint if version == self.version
                    else kept[version - 1].fingerprint if version - 1 in kept else None)
        missing = range(version, self.version)
        far = (self.replay_limit is not None and len(missing) > self.replay_limit
               and self.snapshot_version > version)
        if (version < 0 or version > self.version or expected not in (None, fingerprint)
                or any(r not in kept for r in missing) or far):
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
        if len(result.scalars) != len(r.plan.assignments[agent]):
            return self._refuse(agent, "bad_scalars", f"{len(result.scalars)} scalars for the "
                                f"{len(r.plan.assignments[agent])} seeds assigned",
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
        record.synced = True
        return []

    # --- liveness -----------------------------------------------------------------------

    def state_of(self, agent_id: str) -> tuple[str, str]:
        """``("online" | "catching up" | "offline", why)`` for one agent, as known now."""
        record = self.agents.get(agent_id)
        if record is None:
            return "offline", "never said hello"
        if not record.online:
            return "offline", record.offline_reason or "its status said offline"
        if record.missed >= self.policy.max_missed_rounds:
            return "offline", (f"missed {record.missed} rounds in a row; chosen again once "
                               "it says hello")
        if not record.synced:
            held = "no model yet" if record.version < 0 else f"at version {record.version}"
            return "catching up", f"{held}, the run is at {self.version}"
        return "online", ""

    def behind(self, agent_id: str) -> int | None:
        """Commits since the state an agent last reported: 0 while it is online and synced
        (connected, every commit reaches it), None while it holds no model."""
        record = self.agents.get(agent_id)
        if record is None or record.version < 0:
            return None
        return 0 if record.synced and record.online else max(0, self.version - record.version)

    def eligible(self, pool: Iterable[str] | None = None) -> tuple[list[str], dict[str, str]]:
        """The agents of ``pool`` (default: every agent that said hello, sorted) that can
        take part in a round now, in pool order, and why each other one cannot."""
        ready: list[str] = []
        skipped: dict[str, str] = {}
        for agent in sorted(self.agents) if pool is None else pool:
            state, why = self.state_of(agent)
            if state == "online":
                ready.append(agent)
            else:
                skipped[agent] = f"{state}: {why}"
        return ready, skipped

    def draw(self, choose: Callable[[Sequence[str], int], list[str]],
             pool: Iterable[str] | None = None) -> list[str]:
        """The next round's participants: ``choose(eligible agents, version)``, a seeded
        draw, so it follows from the run seed, the round and who is live. Who was left out
        and why stays in ``skipped`` for the round's record."""
        ready, self.skipped = self.eligible(pool)
        return choose(ready, self.version) if ready else []

    def connection_lost(self) -> None:
        """The orchestrator's connection to the broker was lost: what the broker told about
        who left meanwhile is lost with it. Everyone is offline until its retained status
        (subscribe again to read it) or a hello says otherwise."""
        for agent, record in self.agents.items():
            if record.online:
                self._went_offline(agent, "the orchestrator's broker connection was lost; not "
                                   "back since")

    def _went_offline(self, agent_id: str, reason: str) -> None:
        record = self.agents[agent_id]
        record.online, record.offline_reason = False, reason
        r = self._round
        if r is not None and agent_id in r.plan.assignments:
            self._all_outstanding_gone()  # makes sure _gone is about this round
            self._gone.add(agent_id)

    def _all_outstanding_gone(self) -> bool:
        """Every participant that has not answered is known offline: waiting is for
        nobody. Kept as a set per round, so checking costs nothing per message."""
        r = self._round
        if r is None:
            return False
        if self._gone_round != r.plan.round:
            self._gone_round = r.plan.round
            self._gone = {a for a in r.plan.participants if self.state_of(a)[0] == "offline"}
        outstanding = len(r.plan.participants) - len(r.results)
        if outstanding <= 0 or len(self._gone) < outstanding:  # the usual answer, in O(1)
            return False
        return sum(agent not in r.results for agent in self._gone) >= outstanding

    def _attend(self, participants: Sequence[str], results: Mapping[str, Result]) -> None:
        """Count each participant's answer or miss: misses in a row make an agent offline."""
        for agent in participants:
            record = self.agents.get(agent)
            if record is None:
                continue
            if agent in results:
                record.missed = 0
            else:
                record.missed, record.missed_total = record.missed + 1, record.missed_total + 1

    def fingerprint_at(self, version: int) -> str | None:
        """The weights' fingerprint at ``version``, where this coordinator knows it."""
        if version == self.version:
            return self.fingerprint
        if version == self._base[0]:
            return self._base[1]
        for message in reversed(self._history):
            if message.commit.round + 1 == version:
                return message.fingerprint
        return None

    def _on_history(self, record: AgentRecord) -> bool:
        return record.version >= 0 and self.fingerprint_at(record.version) == record.fingerprint
