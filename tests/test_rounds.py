"""Coordinator and agent state machines over the in-memory bus: one state everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

from protocols import topics
from protocols.bus import MemoryBus
from protocols.codec import decode, encode
from protocols.coordinator import Coordinator, RoundPolicy
from protocols.directions import DirectionSpec
from protocols.messages import Capabilities, Hello, ModelAnnounce, Result
from protocols.zo import apply_commit, fingerprint
from tests.toy import ToyAgent, initial_weights, loss, make_shard

RUN = "test-run"


class Fleet:
    def __init__(self, n: int, policy: RoundPolicy | None = None, keep_commits: int = 200,
                 spec: DirectionSpec | None = None) -> None:
        self.bus = MemoryBus()
        self.spec = spec or DirectionSpec()
        self.weights = initial_weights()
        self.coord = Coordinator(RUN, 5, self.spec, 0, fingerprint(self.weights),
                                 policy or RoundPolicy(eps=1e-3, lr=0.05),
                                 keep_commits=keep_commits)
        self.orch = self.bus.connect("orchestrator")
        for f in self.coord.subscriptions():
            self.orch.subscribe(f)
        self.announce(snapshot=False)
        self.now = 0.0
        self.agents = {f"a{i}": ToyAgent(RUN, f"a{i}", i, self.spec, initial_weights())
                       for i in range(n)}
        self.clients = {}
        for agent_id in self.agents:
            self.connect(agent_id)

    def announce(self, snapshot: bool) -> None:
        a = ModelAnnounce("ab" * 32, "{}", self.coord.version, self.coord.fingerprint, self.spec,
                          snapshot="snap.bin" if snapshot else "")
        self.orch.publish(*_pub(self.coord.announce(a)))

    def connect(self, agent_id: str) -> None:
        agent = self.agents[agent_id]
        client = self.bus.connect(agent_id)
        for f in agent.session.subscriptions():
            client.subscribe(f)
        self.clients[agent_id] = client
        for send in agent.handle(agent.session.connected()):
            client.publish(*_pub(send))
        self.pump()

    def disconnect(self, agent_id: str) -> None:
        self.clients.pop(agent_id).close()

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for agent_id, client in list(self.clients.items()):
                while (msg := client.get()) is not None:
                    moved = True
                    agent = self.agents[agent_id]
                    for send in agent.handle(agent.session.receive(*msg)):
                        client.publish(*_pub(send))
            while (msg := self.orch.get()) is not None:
                moved = True
                for send in self.coord.receive(msg[0], msg[1], self.now):
                    self.orch.publish(*_pub(send))

    def open(self, participants: list[str]) -> None:
        for send in self.coord.open_round(participants, self.now):
            self.orch.publish(*_pub(send))

    def round(self, participants: list[str] | None = None) -> None:
        participants = participants or sorted(self.clients)
        self.open(participants)
        self.pump()
        if not self.coord.ready(self.now):
            self.now += 1e6  # the deadline passes
        commit = self.coord.close_round()
        apply_commit(self.weights, commit, self.spec)
        self.orch.publish(*_pub(self.coord.committed(commit, fingerprint(self.weights))))
        self.pump()

    def fingerprints(self) -> dict[str, str]:
        return {a: t.session.fingerprint for a, t in self.agents.items()}


def _pub(send):
    return send.topic, send.payload, send.retain


def total_loss(weights) -> float:
    return sum(loss(weights, make_shard(i)) for i in range(4))


def test_agents_hold_the_orchestrators_bits_after_every_round_and_loss_falls():
    fleet = Fleet(4)
    start = total_loss(fleet.weights)
    for _ in range(30):
        fleet.round()
        want = fingerprint(fleet.weights)
        assert set(fleet.fingerprints().values()) == {want}
        assert {t.session.version for t in fleet.agents.values()} == {fleet.coord.version}
    assert total_loss(fleet.weights) < 0.7 * start
    assert not fleet.coord.refused


def test_commit_is_independent_of_arrival_order():
    commits = []
    for order in (["a0", "a1", "a2"], ["a2", "a0", "a1"]):
        fleet = Fleet(3)
        fleet.open(["a0", "a1", "a2"])
        for agent_id in order:  # deliver the round starts to agents one by one
            agent = fleet.agents[agent_id]
            for send in agent.handle(agent.session.receive(*fleet.clients[agent_id].get())):
                fleet.clients[agent_id].publish(*_pub(send))
            while (msg := fleet.orch.get()) is not None:
                fleet.coord.receive(msg[0], msg[1], 0.0)
        commits.append(fleet.coord.close_round())
    assert commits[0] == commits[1]


def test_quorum_closes_early_and_stragglers_are_counted_not_applied():
    fleet = Fleet(4, RoundPolicy(eps=1e-3, lr=0.05, quorum=0.5, deadline_s=30))
    fleet.disconnect("a3")
    fleet.disconnect("a2")
    fleet.open(["a0", "a1", "a2", "a3"])
    fleet.pump()
    assert fleet.coord.ready(0.0)  # 2 of 4 answered, quorum 0.5
    commit = fleet.coord.close_round()
    assert len(commit.pairs) == 2
    apply_commit(fleet.weights, commit, fleet.spec)
    fleet.orch.publish(*_pub(fleet.coord.committed(commit, fingerprint(fleet.weights))))
    fleet.connect("a2")  # comes back with a result computed for the closed round? it resyncs
    assert fleet.agents["a2"].session.fingerprint == fingerprint(fleet.weights)


def test_deadline_closes_a_round_without_quorum():
    fleet = Fleet(3, RoundPolicy(quorum=1.0, deadline_s=10))
    fleet.disconnect("a2")
    fleet.open(["a0", "a1", "a2"])
    fleet.pump()
    assert not fleet.coord.ready(5.0)
    assert fleet.coord.ready(10.0)


def test_disconnected_agent_catches_up_by_replaying_commits():
    fleet = Fleet(3)
    fleet.round()
    fleet.disconnect("a2")
    for _ in range(3):
        fleet.round(["a0", "a1"])
    assert fleet.agents["a2"].session.version == 1
    fleet.connect("a2")  # hello -> sync reply with the 3 missed commits
    assert fleet.agents["a2"].session.version == fleet.coord.version == 4
    assert fleet.agents["a2"].session.fingerprint == fingerprint(fleet.weights)
    fleet.round()
    assert set(fleet.fingerprints().values()) == {fingerprint(fleet.weights)}


def test_agent_too_far_behind_loads_a_snapshot():
    fleet = Fleet(3, keep_commits=2)
    fleet.disconnect("a2")
    for _ in range(4):
        fleet.round(["a0", "a1"])
    fleet.agents["a2"].base = [w.copy() for w in fleet.weights]  # what the snapshot holds
    fleet.announce(snapshot=True)
    fleet.connect("a2")
    session = fleet.agents["a2"].session
    assert (session.version, session.fingerprint) == (4, fingerprint(fleet.weights))


def test_agent_with_diverged_bits_reloads_instead_of_computing():
    fleet = Fleet(2)
    fleet.round()
    agent = fleet.agents["a1"]
    agent.weights[0].flat[0] += np.float32(1.0)
    agent.session.fingerprint = fingerprint(agent.weights)
    agent.base = [w.copy() for w in fleet.weights]
    fleet.announce(snapshot=True)
    fleet.pump()
    fleet.round()
    assert set(fleet.fingerprints().values()) == {fingerprint(fleet.weights)}


def _result(fleet: Fleet, agent: str, **change) -> bytes:
    start = fleet.coord.current_round
    fields = dict(agent_id=agent, round=start.round,
                  scalars=(0.5,) * len(start.assignments.get(agent, (1,))), samples=10,
                  fingerprint=start.fingerprint)
    fields.update(change)
    return encode(Result(**fields))


@pytest.mark.parametrize("case, code", [
    ("unknown", "unknown_agent"), ("spoofed", "spoofed_id"), ("stale", "stale_round"),
    ("future", "future_round"), ("scalars", "bad_scalars"),
    ("fingerprint", "fingerprint_mismatch"),
    ("nan", "non_finite"), ("huge", "out_of_range"), ("garbage", "bad_json"),
    ("wrong_topic", "bad_topic"), ("duplicate", "duplicate"), ("not_assigned", "not_assigned"),
])
def test_hostile_results_are_refused_counted_and_change_nothing(case, code):
    fleet = Fleet(3)
    fleet.round()
    fleet.disconnect("a0")
    fleet.open(["a0", "a1"])
    fleet.pump()  # a1 answers honestly; a2 is not in the round
    before = fleet.coord.round_results()
    topic = topics.agent(RUN, "a0", "result")
    payload = _result(fleet, "a0")
    if case == "unknown":
        topic, payload = topics.agent(RUN, "zz", "result"), _result(fleet, "zz")
    elif case == "spoofed":
        payload = _result(fleet, "a1")
    elif case == "stale":
        payload = _result(fleet, "a0", round=0)
    elif case == "future":
        payload = _result(fleet, "a0", round=7)
    elif case == "scalars":  # not one scalar per assigned seed
        payload = _result(fleet, "a0", scalars=(0.5, 0.5))
    elif case == "fingerprint":
        payload = _result(fleet, "a0", fingerprint="f" * 32)
    elif case == "nan":
        body = json.loads(_result(fleet, "a0"))
        payload = json.dumps(body).replace('"scalars": [0.5]', '"scalars": [NaN]').encode()
    elif case == "huge":
        body = json.loads(_result(fleet, "a0"))
        body["scalars"] = [1e31]
        payload = json.dumps(body).encode()
    elif case == "garbage":
        payload = b"\xff{not json"
    elif case == "wrong_topic":
        topic = topics.agent(RUN, "a0", "hello")
    elif case == "duplicate":
        topic, payload = topics.agent(RUN, "a1", "result"), _result(fleet, "a1")
    elif case == "not_assigned":
        topic, payload = topics.agent(RUN, "a2", "result"), _result(fleet, "a2")
    fleet.coord.receive(topic, payload, 0.0)
    assert fleet.coord.refused == {code: 1}
    assert fleet.coord.round_results() == before


def test_multi_step_rounds_keep_every_agent_in_sync():
    fleet = Fleet(3, RoundPolicy(eps=1e-3, lr=0.02, directions=2, local_steps=3))
    for _ in range(3):
        fleet.round()
        assert len(fleet.coord.history[-1].commit.pairs) == 3 * 6
        assert set(fleet.fingerprints().values()) == {fingerprint(fleet.weights)}


def test_gaussian_directions_run_the_same_protocol():
    fleet = Fleet(2, spec=DirectionSpec("gaussian", 0.5))
    for _ in range(3):
        fleet.round()
    assert set(fleet.fingerprints().values()) == {fingerprint(fleet.weights)}


def test_round_starts_reach_only_participants_and_the_commit_names_seeds_by_slot():
    fleet = Fleet(4, RoundPolicy(eps=1e-3, lr=0.05, directions=2))
    watcher = fleet.bus.connect("watcher")
    watcher.subscribe(f"zowarmup/{RUN}/#")
    fleet.disconnect("a1")  # a participant that never answers
    participants = ["a2", "a1", "a0"]
    sends = fleet.coord.open_round(participants, fleet.now)
    plan = fleet.coord.current_round
    assert [s.topic for s in sends] == [topics.agent(RUN, a, "inbox") for a in participants]
    for agent, send in zip(participants, sends):
        assert decode(send.payload) == plan.start_for(agent)
        assert decode(send.payload).seeds == plan.assignments[agent]
        assert len(send.payload) < 400
    for send in sends:
        fleet.orch.publish(*_pub(send))
    fleet.pump()
    fleet.now += 1e6  # a1 never answers: the deadline closes the round
    commit = fleet.coord.close_round()
    apply_commit(fleet.weights, commit, fleet.spec)
    fleet.orch.publish(*_pub(fleet.coord.committed(commit, fingerprint(fleet.weights))))
    fleet.pump()
    inboxes = {t for t, _ in watcher.inbox if t.endswith("/inbox")}
    assert inboxes == {topics.agent(RUN, a, "inbox") for a in participants}  # not a3's
    sent = decode(next(p for t, p in watcher.inbox if t == topics.commit(RUN)))
    assert sent.commit == commit
    assert sent.slots.slots == (0, 1, 4, 5)  # a2's two directions, then a0's: a1 is missing
    assert json.loads(encode(sent))["derive"]["slots"] == [[0, 2], [4, 2]]
    fleet.connect("a1")  # catches up from the kept commit
    assert set(fleet.fingerprints().values()) == {fingerprint(fleet.weights)}


def test_a_thousand_agent_round_sends_a_few_hundred_bytes_each_and_a_6_kb_commit():
    """The messages of the load target: 1,000 participants, one direction each."""
    n = 1000
    coord = Coordinator(RUN, 2**64 - 1, DirectionSpec(), 0, "0" * 32, RoundPolicy())
    ids = [f"sim-{i:05d}" for i in range(n)]
    for agent in ids:
        coord.receive(topics.agent(RUN, agent, "hello"),
                      encode(Hello(agent, Capabilities(1, 1, 10), "ab" * 32, 0, "0" * 32)), 0.0)
    starts = coord.open_round(ids, 0.0)
    assert max(len(s.payload) for s in starts) < 300
    for agent, send in zip(ids, starts):
        assert len(decode(send.payload).seeds) == 1
        result = Result(agent, 0, (0.25 - len(agent) * 1e-3,), 10, "0" * 32)
        assert len(encode(result)) < 200
        coord.receive(topics.agent(RUN, agent, "result"), encode(result), 1.0)
    assert len(coord.round_results()) == n and not coord.refused
    commit = coord.close_round()
    payload = coord.committed(commit, "1" * 32).payload
    assert len(payload) < 6 * n
    assert decode(payload).commit == commit


def test_a_pool_bounds_the_directions_and_every_holder_stays_on_the_same_bits():
    """8 agents x 2 directions over a pool of 4: each direction is evaluated by 4 agents,
    the commit holds 4 pairs whose coefficients sum theirs, and every agent applies it."""
    policy = RoundPolicy(eps=1e-3, lr=0.05, directions=2, pool=4)
    fleet = Fleet(8, policy)
    sends = fleet.coord.open_round(sorted(fleet.clients), fleet.now)
    assert {decode(s.payload).pool for s in sends} == {4}
    plan = fleet.coord.current_round
    assert len({seed for seeds in plan.assignments.values() for seed in seeds}) == 4
    for send in sends:
        fleet.orch.publish(*_pub(send))
    fleet.pump()
    results = fleet.coord.round_results()
    commit = fleet.coord.close_round()
    assert len(commit.pairs) == 4 and commit.apply == "sum64"
    total = sum(r.samples for r in results.values())
    for seed, c in commit.pairs:  # the seed of pool slot k, evaluated by slots t = k mod 4
        shares = [0.05 * results[a].samples / total * g / 2
                  for a in plan.participants for seed_j, g in zip(plan.assignments[a],
                                                                  results[a].scalars)
                  if seed_j == seed]
        assert len(shares) == 4 and c == float(np.float32(sum(shares)))
    apply_commit(fleet.weights, commit, fleet.spec)
    fleet.orch.publish(*_pub(fleet.coord.committed(commit, fingerprint(fleet.weights))))
    fleet.pump()
    assert set(fleet.fingerprints().values()) == {fingerprint(fleet.weights)}
    before = total_loss(fleet.weights)
    for _ in range(5):
        fleet.round()
    assert set(fleet.fingerprints().values()) == {fingerprint(fleet.weights)}
    assert total_loss(fleet.weights) < before
