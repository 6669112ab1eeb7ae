"""The MQTT fleet: real ``zowarmup-agent`` processes behind a broker.

The model goes out once, as retained chunks the agents fetch (and again as a snapshot every
``snapshot_every`` commits, for agents too far behind to replay); each round's starts go to
the participants' inboxes; everything the agents send is pumped from the broker into the
coordinator, whose answers (sync replies, refusals) go straight back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edge_agent.mqtt import MqttTransport, Tls
from protocols import topics
from protocols.coordinator import Coordinator, RoundPolicy
from protocols.directions import DirectionSpec
from protocols.journal import Journal
from protocols.messages import CommitMessage, ModelAnnounce
from protocols.topics import Send

from ..run.state import RunError
from .loop import Choose, RoundLoop, start_coordinator
from .model import Delta, ModelState

log = logging.getLogger("zowarmup.rounds")
CHUNK_BYTES = 256 * 1024


def connect(url: str, client_id: str, username: str | None = None,
            password: str | None = None, tls: tuple[str, ...] | None = None,
            timeout: float = 30) -> MqttTransport:
    """The orchestrator's connection to the broker (``tls``: CA file, then cert and key)."""
    transport = MqttTransport(url, client_id=client_id, username=username, password=password,
                              tls=Tls(*tls) if tls else None)
    transport.connect(timeout)
    return transport


class MqttFleet:
    """Agents over MQTT; who takes part is drawn from the agents the coordinator knows to be
    live and in sync (``Coordinator.draw``): a round never waits for one known offline.

    ``pool``: the agents this run started; ``None`` for remote devices (``zowarmup
    serve``), where every agent that says hello may take part. The first round waits up to
    ``join_timeout_s`` for the whole pool (or ``wanted`` remote agents) to be in sync; later
    rounds draw from whoever is ready then, and wait only when nobody is.
    """

    def __init__(self, transport: MqttTransport, state: ModelState, coordinator: Coordinator,
                 pool: Sequence[str] | None = None, wanted: int = 1,
                 join_timeout_s: float = 120.0, snapshot_every: int | None = None,
                 keep_commits: int = 200) -> None:
        self.transport, self.state, self.coordinator = transport, state, coordinator
        self.pool = list(pool) if pool is not None else None
        self.wanted, self.join_timeout_s = wanted, join_timeout_s
        self._joined = False  # the first round's wait is over
        self._left_out: set[str] = set()  # the agents last reported left out of a round
        # A snapshot at least every keep/2 rounds: an agent too far behind for the kept
        # commits loads the latest snapshot and replays at most keep/2 commits from there.
        self.snapshot_every = snapshot_every or max(1, keep_commits // 2)
        self.chunk_bytes = CHUNK_BYTES
        self.snapshot: tuple[str, int] | None = None  # (file name, chunks) now retained
        coordinator.replay_limit = self.snapshot_every  # further behind: the snapshot
        # QoS 0 from the broker to us: our session is clean, so QoS 1 would redeliver
        # nothing after a reconnect, and costs a PUBACK per result (agents still publish
        # at QoS 1, acknowledged by the broker).
        for topic_filter in coordinator.subscriptions():
            transport.subscribe(topic_filter, qos=0)
        self.uplink_bytes = 0  # everything agents sent
        self.result_bytes = 0  # their round results: the ZO uplink proper
        self._connects = transport.connects  # to notice a reconnect (the broker came back)

    @property
    def run_id(self) -> str:
        return self.coordinator.run_id

    # --- the model, published once --------------------------------------------------------

    def publish_model(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        """Every file as retained chunks, then the announcement that points at them."""
        self.chunk_bytes = chunk_bytes
        for name in self.state.manifest.files:
            self._publish_file(name, (self.state.model_dir / name).read_bytes())
        if self.coordinator.version == 0:
            self._announce("")
        else:  # weights.bin holds version 0: a resumed run announces its state as a snapshot
            self.publish_snapshot()

    def publish_snapshot(self) -> None:
        """The current weights as a retained file, announced as the model's new base.

        Agents that are new, or further behind than the kept commits reach, load it and
        replay from its version. The previous snapshot's retained chunks are then cleared,
        so the broker holds one snapshot, not one per interval.
        """
        c = self.coordinator
        name = f"snapshot-{c.version:08d}.bin"
        chunks = self._publish_file(name, self.state.flat.astype("<f4", copy=False).tobytes())
        self._announce(name)
        if self.snapshot is not None and self.snapshot[0] != name:
            for index in range(self.snapshot[1]):
                self.transport.publish(topics.model_chunk(self.run_id, self.snapshot[0], index),
                                       b"", retain=True)
        self.snapshot = (name, chunks)
        c.snapshot_version = c.version
        log.info("snapshot at version %d published (%s)", c.version, name)

    def _publish_file(self, name: str, data: bytes) -> int:
        starts = range(0, max(len(data), 1), self.chunk_bytes)
        for index, start in enumerate(starts):
            self.transport.publish(topics.model_chunk(self.run_id, name, index),
                                   data[start:start + self.chunk_bytes], retain=True)
        return len(starts)

    def _announce(self, snapshot: str) -> None:
        c = self.coordinator
        announce = ModelAnnounce(self.state.model_sha256, self.state.manifest_text, c.version,
                                 c.fingerprint, self.state.spec, self.chunk_bytes, snapshot)
        self._send([c.announce(announce)], wait=True)

    # --- what agents send -----------------------------------------------------------------

    def pump(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Handle what agents send for a while (answers go out at once), or until
        ``until()`` holds."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and not (until and until()):
            if self.transport.connects != self._connects and self.transport.connected:
                self._reconnected()
            message = self.transport.get(timeout=min(left, 0.05))
            while message is not None:  # then all that is already there, without waiting
                self.uplink_bytes += len(message.payload)
                if message.topic.endswith("/result"):
                    self.result_bytes += len(message.payload)
                self._send(self.coordinator.receive(message.topic, message.payload,
                                                    time.time()))
                if until and until():
                    return
                message = self.transport.get(timeout=0) if time.monotonic() < end else None

    def _reconnected(self) -> None:
        """The connection came back, perhaps to a broker that restarted without its
        retained messages: publish the model (or the latest snapshot) again, so agents that
        join from now on can still load it. Agents that were there resync by hello."""
        self._connects = self.transport.connects
        if self._connects > 1:
            log.warning("reconnected to the broker; publishing the model again")
            # Who left while we were away is not known: everyone is offline until its
            # retained status (sent again on a new SUBSCRIBE) or its hello says otherwise.
            self.coordinator.connection_lost()
            self.transport.subscribe(topics.agent_filter(self.run_id, "status"))
            self.snapshot = None  # a restarted broker holds no snapshot to clear
            self.publish_model(self.chunk_bytes)

    def ready_agents(self) -> list[str]:
        """Agents that can take part now: live and in sync (``Coordinator.state_of``)."""
        return self.coordinator.eligible(self.pool)[0]

    def online_agents(self) -> list[str]:
        return sorted(a for a, r in self.coordinator.agents.items() if r.online)

    def wait_for_agents(self, count: int, timeout: float) -> list[str]:
        end = time.monotonic() + timeout
        while len(self.ready_agents()) < count and time.monotonic() < end:
            self.pump(0.1)
        return self.ready_agents()

    # --- the fleet interface ----------------------------------------------------------------

    def participants(self, version: int, choose: Choose) -> list[str]:
        """Drawn from the agents ready now. Only the first round waits for the fleet to
        join; later ones wait only while no agent at all is ready (the broker restarting,
        say), up to ``join_timeout_s``."""
        c = self.coordinator
        self.pump(0.005)  # statuses and hellos that came in since the last round
        wanted = (len(self.pool) if self.pool is not None else self.wanted) \
            if not self._joined else 1
        self.wait_for_agents(wanted, self.join_timeout_s)
        self._joined = True
        chosen = c.draw(choose, self.pool)
        if not chosen:
            if self.pool is None:
                raise RunError(f"no agent joined run {self.run_id!r} within "
                               f"{self.join_timeout_s:.0f} s; start agents with "
                               f"`zowarmup-agent run --run {self.run_id} --broker URL "
                               "--data SHARD`")
            raise RunError(f"no agent was ready for round {version} within "
                           f"{self.join_timeout_s:.0f} s ({_first(c.skipped)}); see their logs "
                           "under agents/")
        if set(c.skipped) != self._left_out:  # said when it changes, not every round
            self._left_out = set(c.skipped)
            if c.skipped:
                log.warning("round %d: %d agent(s) left out: %s", version, len(c.skipped),
                            _first(c.skipped))
            else:
                log.info("round %d: every agent is back", version)
        return chosen

    def start(self, starts: Sequence[Send]) -> None:
        self._send(starts)

    def collect(self, coordinator: Coordinator) -> list[str]:
        while not coordinator.ready(time.time()):
            self.pump(0.05, until=lambda: coordinator.ready(time.time()))
        return []  # an agent whose loss diverged sends nothing: it looks like a late one

    def commit(self, broadcast: Send, message: CommitMessage, delta: Delta | None) -> None:
        if delta is not None:
            raise RunError("a round over MQTT carries commits only: a full weight update "
                           "would cost every agent the whole model")
        self._send([broadcast])
        if self.coordinator.version % self.snapshot_every == 0:
            self.publish_snapshot()

    def _send(self, sends: Sequence[Send], wait: bool = False) -> None:
        """Publish in order; runs of QoS 0 messages (a round's starts) go out in batches."""
        batch: list[tuple[str, bytes]] = []
        for send in sends:
            if send.qos == 0 and not send.retain:
                batch.append((send.topic, send.payload))
                continue
            if batch:
                self.transport.publish_many(batch)
                batch = []
            self.transport.publish(send.topic, send.payload, qos=send.qos, retain=send.retain,
                                   wait=wait and send.qos > 0)
        if batch:
            self.transport.publish_many(batch)


def _first(skipped: dict[str, str], count: int = 5) -> str:
    """A few of the agents left out and why, for a log line."""
    shown = [f"{agent} ({why})" for agent, why in list(skipped.items())[:count]]
    more = len(skipped) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def mqtt_rounds(transport: MqttTransport, model_dir: Path, run_id: str, run_seed: int,
                policy: RoundPolicy, spec: DirectionSpec | None = None,
                journal: Journal | None = None, history: Sequence[CommitMessage] = (),
                keep_commits: int = 200, **options) -> tuple[RoundLoop, MqttFleet]:
    """A round loop over MQTT for an exported model: its state from ``history``, the
    coordinator, the fleet (``options`` as :class:`MqttFleet` takes them), the model not
    yet published."""
    state = ModelState.load(model_dir, spec or DirectionSpec(), history)
    coordinator = start_coordinator(state, run_id, run_seed, policy, history, journal,
                                    keep_commits)
    fleet = MqttFleet(transport, state, coordinator, keep_commits=keep_commits, **options)
    return RoundLoop(state, coordinator, fleet, journal), fleet
