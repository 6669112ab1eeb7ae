"""A fleet that loses devices keeps its pace: real Mosquitto, real `zowarmup-agent` processes.

Ten agents run the rounds of the one round loop (``run_rounds`` over ``MqttFleet``). At ZO
round KILL_AT, with the round's starts sent, three of them are SIGKILLed: no result, no
goodbye (the broker publishes their last wills). What must hold after:

- the killed round closes (at once: every participant it still waits for is known
  offline; at its deadline at the latest), and every later round stays within 2x the
  median round time before the kill: no round waits for a dead agent;
- the killed agents are left out of every later draw, and the round's ``skipped`` says
  why, until they come back: restarted at round RESTART_AT, each is chosen again within 3
  rounds of holding the current state, and its result is computed on the coordinator's
  exact bits. The rounds while they start (process, model, replay of the missed commits:
  CPU taken from the others on a small test machine) are not timed; once all are back and
  have answered, every round is again within 2x the median before the kill.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from edge_agent.mqtt import MqttTransport
from protocols.coordinator import RoundPolicy
from tests.test_agent_e2e import digits_fleet

torch = pytest.importorskip("torch", reason="exporting the test model needs the orchestrator extra")
pytestmark = pytest.mark.broker

AGENTS, KILLED = 10, ("pi1", "pi4", "pi7")  # 30 %
KILL_AT, RESTART_AT, MOST_ROUNDS = 4, 10, 40
DEADLINE_S = 20.0


@pytest.fixture(scope="module")
def model_and_shards(tmp_path_factory):
    model_dir, shards = digits_fleet(tmp_path_factory.mktemp("faults"), AGENTS, 150)
    return model_dir, {f"pi{i}": shard for i, shard in enumerate(shards)}


class AllBack(Exception):
    """Every killed agent answered again, and the fleet ran a few rounds at full strength."""


def _logs(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-2000:] for p in root.glob("*/agent.log"))


def test_a_fleet_that_loses_30_percent_of_its_agents_keeps_its_pace(mosquitto, model_and_shards,
                                                                     tmp_path):
    from orchestrator.fleet.agents import LocalAgents
    from orchestrator.rounds.loop import Schedule, run_rounds
    from orchestrator.rounds.mqtt import mqtt_rounds
    model_dir, shards = model_and_shards
    transport = MqttTransport(mosquitto.url, client_id="orchestrator")
    transport.connect(10)
    # 16 directions: each round is mostly the agents' compute, as on real devices
    loop, fleet = mqtt_rounds(transport, model_dir, "faults", 11,
                              RoundPolicy(eps=1e-2, lr=0.05, directions=16,
                                          deadline_s=DEADLINE_S),
                              pool=list(shards), join_timeout_s=90)
    fleet.publish_model(chunk_bytes=4096)
    agents = LocalAgents(mosquitto.url, "faults", shards, tmp_path / "agents", model_dir)
    c = loop.coordinator
    walls: dict[int, float] = {}
    rows: dict[int, tuple[list[str], dict, dict]] = {}
    on_bits: dict[int, str] = {}  # the coordinator's fingerprint each round computed on
    ready_at: dict[str, int] = {}  # the round before which a restarted agent was ready

    def play(participants: list[str]):
        version = c.version
        on_bits[version] = c.fingerprint
        for agent in KILLED:
            if version > RESTART_AT and agent not in ready_at and c.state_of(agent)[0] == \
                    "online":
                ready_at[agent] = version
        started = time.monotonic()
        loop.open_round(participants)
        if version == KILL_AT:  # mid-round: the starts are out, no result back yet
            for agent in KILLED:
                agents.procs[agent].kill()
        if version == RESTART_AT:
            for agent in KILLED:
                agents.start_one(agent)
        commit = loop.finish_round(None, None, loop.collect())
        walls[version] = time.monotonic() - started
        return commit

    back: dict[str, int] = {}  # the first round each killed agent answered again

    def record(report) -> None:
        rows[report.version] = (report.participants, report.skipped, report.results)
        for agent in set(KILLED) & set(report.results) - set(back):
            if report.version > RESTART_AT:
                back[agent] = report.version
        if len(back) == len(KILLED) and report.version >= max(back.values()) + 3:
            raise AllBack

    agents.start()
    try:
        with pytest.raises(AllBack):
            run_rounds(loop, Schedule(MOST_ROUNDS, 11), lambda: {}, record, play)
        assert agents.dead() == {}, _logs(tmp_path)  # the restarted ones run on too
    finally:
        agents.stop()
        transport.close()
    before = statistics.median(walls[v] for v in range(1, KILL_AT))  # round 0 waits to join
    # the killed round stops waiting once the wills are in, long before its deadline
    assert walls[KILL_AT] < DEADLINE_S / 2, walls
    without = {v: walls[v] for v in range(KILL_AT + 1, RESTART_AT)}
    assert max(without.values()) <= 2 * before, (before, without)
    restored = {v: w for v, w in walls.items() if v > max(back.values())}
    assert max(restored.values()) <= 2 * before, (before, restored)
    for version in range(KILL_AT + 1, RESTART_AT + 1):
        participants, skipped, _ = rows[version]
        assert not set(participants) & set(KILLED)
        assert set(skipped) == set(KILLED) and all(why.startswith("offline")
                                                   for why in skipped.values())
    for agent in KILLED:  # back: chosen within 3 rounds of holding the current state
        assert agent in ready_at, (ready_at, _logs(tmp_path))
        chosen = [v for v in sorted(rows) if v >= ready_at[agent] and agent in rows[v][0]]
        assert chosen and chosen[0] - ready_at[agent] < 3, (agent, ready_at, chosen)
        result = rows[chosen[0]][2][agent]  # accepted: computed on the coordinator's bits
        assert result.fingerprint == on_bits[chosen[0]]
    assert not {k for k in c.refused if k != "stale_round"}, c.refusals
