"""The ZO round loop over a real transport: publish the model, run rounds, journal, commit.

This is the orchestrator's side of step 2 with the MQTT plumbing: the ``Coordinator``
state machine decides, this loop moves bytes and time. Each round::

    open_round -> each participant's seeds to its inbox -> pump results until quorum or
    deadline -> close_round -> apply to our weights -> journal (fsync) -> broadcast the commit
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from edge_agent.mqtt import MqttTransport
from protocols import topics
from protocols.coordinator import Coordinator, RoundPolicy
from protocols.directions import DirectionSpec
from protocols.errors import JournalError
from protocols.journal import Journal
from protocols.manifest import MANIFEST, load_manifest, read_weights
from protocols.messages import CommitMessage, ModelAnnounce
from protocols.topics import Send
from protocols.zo import Commit, apply_commit, fingerprint, replay

log = logging.getLogger("zowarmup.rounds")
CHUNK_BYTES = 256 * 1024


class RoundServer:
    def __init__(self, transport: MqttTransport, model_dir: Path, run_id: str, run_seed: int,
                 policy: RoundPolicy, spec: DirectionSpec | None = None,
                 journal: Journal | None = None, keep_commits: int = 200,
                 snapshot_every: int | None = None,
                 history: Sequence[CommitMessage] = ()) -> None:
        self.transport = transport
        self.model_dir = Path(model_dir)
        self.manifest = load_manifest(self.model_dir)
        self.manifest_text = (self.model_dir / MANIFEST).read_text()
        self.model_sha256 = hashlib.sha256(self.manifest_text.encode()).hexdigest()
        self.flat, self.weights = read_weights(self.model_dir, self.manifest)
        self.spec = spec or DirectionSpec()
        self.journal = journal
        # Resuming: the exported weights plus the journal's commits are the state.
        replay(self.weights, [m.commit for m in history], self.spec)
        fp = fingerprint(self.weights)
        if history and history[-1].fingerprint != fp:
            raise JournalError(f"replaying {len(history)} journaled commits gives fingerprint "
                               f"{fp}, the journal says {history[-1].fingerprint}")
        self.coordinator = Coordinator(run_id, run_seed, self.spec, len(history), fp, policy,
                                       history=history[-keep_commits:],
                                       keep_commits=keep_commits,
                                       scales=journal.scales if journal is not None else None)
        self.downlink_bytes = 0  # what one participant receives: its round starts and commits
        self._previous = history[-2].fingerprint if len(history) > 1 else ""
        # A snapshot at least every keep/2 rounds: an agent too far behind for the kept
        # commits loads the latest snapshot and replays at most keep/2 commits from there.
        self.snapshot_every = snapshot_every or max(1, keep_commits // 2)
        self.chunk_bytes = CHUNK_BYTES
        self._snapshot: tuple[str, int] | None = None  # (file name, chunks) now retained
        for topic_filter in self.coordinator.subscriptions():
            transport.subscribe(topic_filter)
        self.uplink_bytes = 0  # everything agents sent
        self._connects = transport.connects  # to notice a reconnect (the broker came back)
        self.result_bytes = 0  # their round results: the ZO uplink proper

    @property
    def run_id(self) -> str:
        return self.coordinator.run_id

    def publish_model(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        """Every file as retained chunks, then the announcement that points at them."""
        self.chunk_bytes = chunk_bytes
        for name in self.manifest.files:
            self._publish_file(name, (self.model_dir / name).read_bytes())
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
        chunks = self._publish_file(name, self.flat.astype("<f4", copy=False).tobytes())
        self._announce(name)
        if self._snapshot is not None and self._snapshot[0] != name:
            for index in range(self._snapshot[1]):
                self.transport.publish(topics.model_chunk(self.run_id, self._snapshot[0], index),
                                       b"", retain=True)
        self._snapshot = (name, chunks)
        log.info("snapshot at version %d published (%s)", c.version, name)

    def _publish_file(self, name: str, data: bytes) -> int:
        starts = range(0, max(len(data), 1), self.chunk_bytes)
        for index, start in enumerate(starts):
            self.transport.publish(topics.model_chunk(self.run_id, name, index),
                                   data[start:start + self.chunk_bytes], retain=True)
        return len(starts)

    def _announce(self, snapshot: str) -> None:
        c = self.coordinator
        announce = ModelAnnounce(self.model_sha256, self.manifest_text, c.version,
                                 c.fingerprint, self.spec, self.chunk_bytes, snapshot)
        self._send([c.announce(announce)], wait=True)

    def pump(self, seconds: float, until=None) -> None:
        """Handle what agents send for a while (answers go out at once), or until
        ``until()`` holds."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and not (until and until()):
            if self.transport.connects != self._connects and self.transport.connected:
                self._reconnected()
            message = self.transport.get(timeout=min(left, 0.05))
            if message is not None:
                self.uplink_bytes += len(message.payload)
                if message.topic.endswith("/result"):
                    self.result_bytes += len(message.payload)
                self._send(self.coordinator.receive(message.topic, message.payload, time.time()))

    def _reconnected(self) -> None:
        """The connection came back, perhaps to a broker that restarted without its
        retained messages: publish the model (or the latest snapshot) again, so agents that
        join from now on can still load it. Agents that were there resync by hello."""
        self._connects = self.transport.connects
        if self._connects > 1:
            log.warning("reconnected to the broker; publishing the model again")
            self._snapshot = None  # a restarted broker holds no snapshot to clear
            self.publish_model(self.chunk_bytes)

    def ready_agents(self) -> list[str]:
        """Online agents holding the current state, or the state just before the last commit.

        An agent reports its state with each result and in hellos, not after applying a
        commit; one that answered round r is still at r when round r+1 may open. It gets
        the commit first (the broker keeps order), so it will compute on the current state.
        """
        c = self.coordinator
        current, previous = (c.version, c.fingerprint), (c.version - 1, self._previous)
        return sorted(a for a, r in c.agents.items()
                      if r.online and (r.version, r.fingerprint) in (current, previous))

    def online_agents(self) -> list[str]:
        return sorted(a for a, r in self.coordinator.agents.items() if r.online)

    def wait_for_agents(self, count: int, timeout: float) -> list[str]:
        end = time.monotonic() + timeout
        while len(self.ready_agents()) < count and time.monotonic() < end:
            self.pump(0.1)
        return self.ready_agents()

    def run_round(self, participants: Sequence[str]) -> Commit:
        self.open_round(participants)
        self.wait_ready()
        return self.finish_round()

    def open_round(self, participants: Sequence[str]) -> None:
        starts = self.coordinator.open_round(participants, time.time())
        self.downlink_bytes += sum(len(s.payload) for s in starts) // len(starts)
        self._send(starts)

    def wait_ready(self) -> None:
        """Pump results until the quorum answered or the deadline passed."""
        c = self.coordinator
        while not c.ready(time.time()):
            self.pump(0.05, until=lambda: c.ready(time.time()))

    def finish_round(self) -> Commit:
        """Aggregate, apply to our weights, journal durably, then broadcast the commit."""
        c = self.coordinator
        commit = c.close_round()
        self._previous = c.fingerprint
        apply_commit(self.weights, commit, self.spec)
        fp = fingerprint(self.weights)
        if self.journal is not None:
            self.journal.append_commit(c.commit_message(commit, fp), c.closing_scale)
        broadcast = c.committed(commit, fp)
        self.downlink_bytes += len(broadcast.payload)
        self._send([broadcast])
        log.info("round %d committed: %d pair(s), fingerprint %s", commit.round,
                 len(commit.pairs), fp[:12])
        if c.version % self.snapshot_every == 0:
            self.publish_snapshot()
        return commit

    def _send(self, sends: list[Send], wait: bool = False) -> None:
        for send in sends:
            self.transport.publish(send.topic, send.payload, qos=send.qos, retain=send.retain,
                                   wait=wait and send.qos > 0)
