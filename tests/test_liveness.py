"""Liveness is coordinator state: who is offline, who is drawn, when a round stops waiting.

The in-memory fleet of ``test_rounds.py``; a last will is the status message the broker
publishes for a connection that died, fed to the coordinator as the broker would.
"""

from __future__ import annotations

from protocols import topics
from protocols.codec import encode
from protocols.coordinator import RoundPolicy
from protocols.messages import Status
from tests.test_rounds import RUN, Fleet


def everyone(pool, version):
    return list(pool)


def last_will(fleet: Fleet, agent_id: str) -> None:
    """The agent's process dies: its connection closes and the broker sends its will."""
    fleet.disconnect(agent_id)
    fleet.coord.receive(topics.agent(RUN, agent_id, "status"),
                        encode(Status(agent_id, "offline")), fleet.now)


def test_an_agent_gone_is_not_drawn_and_a_round_stops_waiting_for_it_at_once():
    fleet = Fleet(4)
    c = fleet.coord
    fleet.round()
    fleet.open(c.draw(everyone))
    last_will(fleet, "a3")  # killed mid-round, before it answered
    fleet.pump()
    assert sorted(c.round_results()) == ["a0", "a1", "a2"]
    assert c.ready(fleet.now)  # long before the deadline: nobody left to wait for
    fleet.now += 1.0
    commit = c.close_round()
    assert len(commit.pairs) == 3
    assert c.agents["a3"].missed == 1 and c.agents["a0"].missed == 0
    assert c.draw(everyone) == ["a0", "a1", "a2"]
    assert list(c.skipped) == ["a3"] and c.skipped["a3"].startswith("offline")
    assert c.state_of("a3")[0] == "offline"


def test_an_agent_back_is_drawn_again_once_it_holds_the_current_state():
    fleet = Fleet(3)
    c = fleet.coord
    fleet.round()
    last_will(fleet, "a2")
    for _ in range(3):
        fleet.round(c.draw(everyone))
    assert list(c.skipped) == ["a2"] and c.behind("a2") == c.version  # it said version 0
    fleet.connect("a2")  # hello at version 1: commits 1..3 come back, then hello at 4
    assert c.state_of("a2") == ("online", "") and c.behind("a2") == 0
    assert c.draw(everyone) == ["a0", "a1", "a2"] and c.skipped == {}
    fleet.round(c.draw(everyone))
    assert c.agents["a2"].results == 2  # it answered the round it was drawn for
    assert fleet.agents["a2"].session.fingerprint == c.fingerprint


def test_an_agent_silent_for_max_missed_rounds_is_offline_until_it_says_hello():
    """A silent death (power lost, no will yet): it is drawn while the coordinator does not
    know, misses max_missed_rounds rounds (each closes at its deadline), then is left out."""
    fleet = Fleet(3, RoundPolicy(eps=1e-3, lr=0.05, max_missed_rounds=2))
    c = fleet.coord
    fleet.round()
    fleet.disconnect("a1")  # no status reaches the coordinator
    for missed in (1, 2):
        assert "a1" in c.draw(everyone)
        fleet.round(c.draw(everyone))
        assert c.agents["a1"].missed == missed
    assert c.draw(everyone) == ["a0", "a2"]
    assert "missed 2 rounds in a row" in c.skipped["a1"]
    assert c.agents["a1"].missed_total == 2 and c.agents["a1"].online
    fleet.connect("a1")
    assert c.draw(everyone) == ["a0", "a1", "a2"]


def test_a_lost_broker_connection_makes_everyone_offline_until_their_status_says_otherwise():
    fleet = Fleet(3)
    c = fleet.coord
    fleet.round()
    c.connection_lost()
    assert c.draw(everyone) == [] and len(c.skipped) == 3
    for agent_id in ("a0", "a2"):  # their retained statuses, read again after resubscribing
        c.receive(topics.agent(RUN, agent_id, "status"), encode(Status(agent_id, "online")),
                  fleet.now)
    assert c.draw(everyone) == ["a0", "a2"]


def test_the_draw_follows_the_seed_the_round_and_the_live_set_and_records_who_was_left_out():
    fleet = Fleet(4)
    c = fleet.coord
    fleet.round()

    def two(pool, version):
        import numpy as np
        rng = np.random.default_rng([5, version, 0x5A0])
        return sorted(rng.choice(list(pool), size=min(2, len(pool)), replace=False).tolist())

    last_will(fleet, "a1")
    first = c.draw(two, ["a0", "a1", "a2", "a3", "a9"])
    assert first == c.draw(two, ["a0", "a1", "a2", "a3", "a9"]) and "a1" not in first
    assert set(c.skipped) == {"a1", "a9"} and "never said hello" in c.skipped["a9"]


def test_refusals_are_counted_per_agent_by_reason():
    fleet = Fleet(2)
    c = fleet.coord
    fleet.round()
    c.receive(topics.agent(RUN, "a0", "result"), b"{not json", fleet.now)
    assert sum(c.agents["a0"].refused.values()) == 1 and not c.agents["a1"].refused


def test_an_agent_back_while_a_round_waits_for_it_gets_its_start_again():
    """Its connection dropped with the round's start (or its result) in flight: when it
    says online again, the start is sent again, and the round closes with its result."""
    fleet = Fleet(3)
    c = fleet.coord
    fleet.round()
    fleet.disconnect("a2")
    fleet.open(c.draw(everyone))  # a2's start is lost: it is not connected
    fleet.pump()
    assert sorted(c.round_results()) == ["a0", "a1"] and not c.ready(fleet.now)
    fleet.connect("a2")  # status online, then hello: the start comes again
    assert sorted(c.round_results()) == ["a0", "a1", "a2"] and c.ready(fleet.now)
