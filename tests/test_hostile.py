"""Hostile and broken input to the coordinator, and robust aggregation.

Every hostile message must be refused with a reason, counted, and change nothing; a
round that saw any amount of it must commit the bits of a round that saw none. One agent
sending scaled-up scalars every round must not stop the run from converging.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import math
import struct
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import topics
from protocols.codec import decode, encode
from protocols.coordinator import Coordinator, RoundPolicy
from protocols.journal import Journal
from protocols.messages import Capabilities, Hello, Result
from protocols.robust import Robustness, scalar_bound, trimmed_keep
from protocols.topics import Send
from protocols.zo import ClientResult, aggregate, fingerprint, weigh
from tests.test_rounds import RUN, Fleet, total_loss

HONEST_SHA = "ab" * 32  # what Fleet announces


def state(c: Coordinator) -> tuple:
    """Everything a message could change in the coordinator, its refusal counters aside
    (`refused`, each agent's own `refused`, and `late` for stale results)."""
    agents = {a: dataclasses.replace(r, refused=None) for a, r in copy.deepcopy(c.agents).items()}
    return (c.version, c.fingerprint, c.phase, agents, c.round_results(),
            c.history, tuple(c._scales), c.clipped, c.trimmed)


def open_fleet() -> Fleet:
    """Three agents, one round done; round 1 open for a0 and a1, a1 has answered."""
    fleet = Fleet(3)
    fleet.round()
    fleet.disconnect("a0")
    fleet.open(["a0", "a1"])
    fleet.pump()
    return fleet


def result_body(fleet: Fleet, agent: str = "a0", **change) -> dict:
    start = fleet.coord.current_round
    seeds = start.assignments.get(agent, (7,))
    body = json.loads(encode(Result(agent, start.round, (0.5,) * len(seeds), 10,
                                    start.fingerprint)))
    body.update(change)
    return body


def raw(body: dict) -> bytes:
    return json.dumps(body).encode()  # json.dumps writes NaN and Infinity: must be refused


wrong_types = st.one_of(st.none(), st.booleans(), st.text(max_size=5),
                        st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                             st.integers(),
                                                                             max_size=2))


@st.composite
def hostile(draw, fleet: Fleet) -> tuple[str, bytes, set[str]]:
    """(topic, payload, acceptable refusal codes) of one hostile or broken message."""
    a0, a1 = topics.agent(RUN, "a0", "result"), topics.agent(RUN, "a1", "result")
    kind = draw(st.sampled_from([
        "garbage", "wrong_type", "oversized", "non_finite", "absurd", "stale", "future",
        "duplicate", "unknown", "wrong_model", "fingerprint", "spoofed", "count", "seeds"]))
    if kind == "garbage":
        junk = draw(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
        return a0, junk, {"bad_json", "bad_version", "bad_type", "unknown_field",
                          "missing_field", "non_finite"}
    if kind == "wrong_type":
        field = draw(st.sampled_from(["round", "scalars", "samples", "fingerprint",
                                      "agent_id", "loss"]))
        value = draw(wrong_types.filter(
            lambda v: not isinstance(v, (int, float, list)) or isinstance(v, bool)
            or (isinstance(v, list) and field != "scalars")))
        return a0, raw(result_body(fleet, **{field: value})), {
            "bad_type", "bad_seed", "bad_scalars", "bad_hash", "bad_id", "out_of_range",
            "missing_field"}
    if kind == "oversized":
        body = result_body(fleet, loss=0.0)
        pad = draw(st.integers(64 << 10, 300 << 10))
        return a0, raw(body)[:-1] + b',"pad":"' + b"x" * pad + b'"}', {"too_big"}
    if kind == "non_finite":
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return a0, raw(result_body(fleet, scalars=[value])), {"non_finite"}
    if kind == "absurd":
        value = draw(st.floats(1.001e12, 1e30)) * draw(st.sampled_from([1, -1]))
        return a0, raw(result_body(fleet, scalars=[value])), {"absurd_scalar"}
    if kind in ("stale", "future"):
        current = fleet.coord.current_round.round
        r = draw(st.integers(0, current - 1) if kind == "stale"
                 else st.integers(current + 1, 2**40))
        return a0, raw(result_body(fleet, round=r)), {f"{kind}_round"}
    if kind == "duplicate":
        return a1, raw(result_body(fleet, "a1", scalars=[draw(st.floats(-5, 5))])), {
            "duplicate"}
    if kind == "unknown":
        agent = draw(st.sampled_from(["zz", "a9", "client-000"]))
        return (topics.agent(RUN, agent, "result"), raw(result_body(fleet, agent)),
                {"unknown_agent"})
    if kind == "wrong_model":
        sha = draw(st.text("0123456789abcdef", min_size=64, max_size=64)
                   .filter(lambda s: s != HONEST_SHA))
        hello = Hello("a2", Capabilities(1, 1, 10), sha, fleet.coord.version,
                      fleet.coord.fingerprint)
        return topics.agent(RUN, "a2", "hello"), encode(hello), {"wrong_model"}
    if kind == "fingerprint":
        fp = draw(st.text("0123456789abcdef", min_size=32, max_size=32)
                  .filter(lambda s: s != fleet.coord.fingerprint))
        return a0, raw(result_body(fleet, fingerprint=fp)), {"fingerprint_mismatch"}
    if kind == "spoofed":
        return a0, raw(result_body(fleet, "a1")), {"spoofed_id"}
    if kind == "count":  # not one scalar per assigned seed
        return a0, raw(result_body(fleet, scalars=[0.5] * draw(st.sampled_from([2, 3])))), {
            "bad_scalars"}
    # seeds sent back: the coordinator knows them, so the field is not the wire's
    return a0, raw(result_body(fleet, seeds=[draw(st.integers(0, 2**63))])), {
        "unknown_field"}


def answer_a0(fleet: Fleet) -> None:
    """The straggler a0 gets the round start late and answers honestly."""
    a0 = fleet.agents["a0"]
    start = encode(fleet.coord.current_round.start_for("a0"))
    for send in a0.handle(a0.session.receive(topics.agent(RUN, "a0", "inbox"), start)):
        fleet.coord.receive(send.topic, send.payload, 6.0)


def honest_commit():
    fleet = open_fleet()  # the round as it closes with no hostile input
    answer_a0(fleet)
    return fleet.coord.close_round()


HONEST_COMMIT = honest_commit()


@given(st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_messages_are_refused_counted_and_change_nothing(data):
    fleet = open_fleet()
    c = fleet.coord
    for _ in range(data.draw(st.integers(1, 8))):
        topic, payload, codes = data.draw(hostile(fleet))
        before, counts = state(c), Counter(c.refused)
        replies = c.receive(topic, payload, 5.0)
        assert state(c) == before
        new = Counter(c.refused) - counts
        assert sum(new.values()) == 1 and set(new) <= codes, (new, codes, c.refusals[-1])
        assert c.refusals[-1].split(": ", 1)[1]  # says what was wrong
        for reply in replies:  # a refusal to a known sender tells it why
            assert decode(reply.payload).code in codes
    answer_a0(fleet)  # the honest straggler still counts, and the bits are untouched
    assert len(c.round_results()) == 2
    assert c.close_round() == HONEST_COMMIT


@pytest.mark.parametrize("value, code", [
    (float("nan"), "non_finite"), (float("inf"), "non_finite"), (1e30, "absurd_scalar"),
    (-1e13, "absurd_scalar"), (1e31, "out_of_range")])
def test_each_bad_scalar_has_its_own_reason(value, code):
    fleet = open_fleet()
    before = state(fleet.coord)
    fleet.coord.receive(topics.agent(RUN, "a0", "result"),
                        raw(result_body(fleet, scalars=[value])), 1.0)
    assert dict(fleet.coord.refused) == {code: 1}
    assert state(fleet.coord) == before


def test_a_hello_with_another_model_is_refused_and_registers_nothing():
    fleet = Fleet(2)
    c = fleet.coord
    hello = Hello("newcomer", Capabilities(1, 1, 10), "cd" * 32, 0, c.fingerprint)
    replies = c.receive(topics.agent(RUN, "newcomer", "hello"), encode(hello), 1.0)
    assert "newcomer" not in c.agents and c.refused == {"wrong_model": 1}
    assert "load the announced model" in decode(replies[0].payload).detail


# --- robust aggregation ------------------------------------------------------------------


def scaled(fleet: Fleet, agent_id: str, factor: float) -> None:
    """Make one agent multiply every scalar it sends by ``factor``."""
    agent = fleet.agents[agent_id]
    honest_handle = agent.handle

    def handle(events):
        out = []
        for send in honest_handle(events):
            if send.topic.endswith("/result"):
                body = json.loads(send.payload)
                body["scalars"] = [g * factor for g in body["scalars"]]
                send = Send(send.topic, json.dumps(body).encode(), send.retain)
            out.append(send)
        return out
    agent.handle = handle


def policy(**robust) -> RoundPolicy:
    return RoundPolicy(eps=1e-3, lr=0.05, robust=Robustness(**robust))


@pytest.mark.parametrize("robust", [{}, {"trim": 0.25}, {"clip_bound": 20.0}],
                         ids=["clip-derived", "trimmed-mean", "clip-fixed"])
def test_one_agent_scaling_its_scalars_every_round_does_not_stop_convergence(robust):
    runs = {}
    for name, rules in (("defended", robust), ("undefended", {"clip_factor": 0.0})):
        fleet = Fleet(4, policy(**rules))
        scaled(fleet, "a3", 1000.0)
        start = total_loss(fleet.weights)
        for _ in range(30):
            fleet.round()
            assert len(set(fleet.fingerprints().values())) == 1  # still one state
        runs[name] = (start, total_loss(fleet.weights), fleet.coord)
    start, end, c = runs["defended"]
    assert end < 0.7 * start
    assert c.clipped + c.trimmed >= 30  # the scaled agent was caught every round
    assert not c.refused
    start, end, _ = runs["undefended"]
    assert not end < start  # the same attack, undefended, ruins the run


def test_honest_rounds_are_not_clipped_and_keep_their_bits():
    fleet, plain = Fleet(4), Fleet(4, policy(clip_factor=0.0))
    for _ in range(10):
        fleet.round()
        plain.round()
    assert fleet.coord.clipped == 0
    assert fingerprint(fleet.weights) == fingerprint(plain.weights)


def test_bounds_and_trimming_are_pure_functions_of_their_inputs():
    rules = Robustness(clip_factor=4.0, clip_window=3)
    assert scalar_bound(rules, [1.0, 100.0, 2.0, 3.0], 5.0) == 4.0 * 3.0  # window: 2, 3, 5
    assert scalar_bound(rules, [], None) == math.inf
    assert scalar_bound(rules, [0.0, 0.0], 0.0) == math.inf  # zeros bound nothing
    assert scalar_bound(Robustness(clip_bound=7.0), [1.0], 1.0) == 7.0
    assert trimmed_keep([3.0, -9.0, 1.0, 1.0, 8.0], 0.2) == {0, 2, 3}
    assert trimmed_keep([1.0, 2.0], 0.2) is None
    results = [ClientResult((1, 2), (0.5, -40.0), 30), ClientResult((3, 4), (1.5, 0.25), 10)]
    clipped = weigh(results, 0.1, bound=2.0)
    assert clipped[1] == (2, 0.1 * 0.75 / 2 * -2.0)
    trimmed = weigh(results, 0.1, keep={0, 3})
    full = sum(0.1 * w / 2 for w in (0.75, 0.75, 0.25, 0.25))
    kept = 0.1 * 0.75 / 2 + 0.1 * 0.25 / 2
    assert trimmed == [(1, 0.1 * 0.75 / 2 * (full / kept) * 0.5),
                       (4, 0.1 * 0.25 / 2 * (full / kept) * 0.25)]
    # the commit holds their float32 roundings (all that applying it uses)
    assert aggregate(0, results, 0.1, keep={0, 3}).pairs == tuple(
        (seed, float(np.float32(c))) for seed, c in trimmed)
    with pytest.raises(Exception, match="trim"):
        Robustness(trim=0.5)
    with pytest.raises(Exception, match="clip_factor"):
        Robustness(clip_factor=-1.0)


def test_a_resumed_coordinator_clips_with_the_journaled_scales(tmp_path):
    """Resume must clip as the uninterrupted run did: the scales come from the journal."""
    rules = dict(clip_factor=2.0, clip_window=5)
    straight = Fleet(4, policy(**rules))
    scaled(straight, "a3", 50.0)
    for _ in range(8):
        straight.round()
    want = [m.commit for m in straight.coord.history]

    got = {}
    for with_scales in (True, False):
        stopped = Fleet(4, policy(**rules))
        scaled(stopped, "a3", 50.0)
        path = tmp_path / f"journal-{with_scales}"
        journal = Journal.create(path, {"run_id": RUN, "base_version": 0})
        for _ in range(4):
            stopped.round()
            journal.append_commit(stopped.coord.history[-1], stopped.coord.closing_scale)
        journal.close()
        reopened = Journal.open(path)  # the orchestrator stops here and comes back
        assert sorted(reopened.scales) == [0, 1, 2, 3]
        old = stopped.coord
        stopped.coord = Coordinator(RUN, 5, old.spec, old.version, old.fingerprint, old.policy,
                                    history=reopened.commits,
                                    scales=reopened.scales if with_scales else None)
        stopped.announce(snapshot=False)
        for agent_id in sorted(stopped.agents):  # the agents say hello again
            stopped.disconnect(agent_id)
            stopped.connect(agent_id)
        for _ in range(4):
            stopped.round()
        got[with_scales] = [m.commit for m in stopped.coord.history]
        assert stopped.coord.clipped >= 4
    assert got[True] == want
    assert got[False] != want  # the scales matter: without them the bits differ


# --- what an agent refuses ---------------------------------------------------------------


def session_state(agent) -> tuple:
    s = agent.session
    return (s.version, s.fingerprint, s._pending, s._busy, s._latest,
            [w.tobytes() for w in agent.weights])


def hostile_to_agent(fleet: Fleet, start_a0: bytes, start_a1: bytes) -> list[tuple[str, bytes]]:
    """Messages that reach a0 and must do nothing: misaddressed, misplaced or malformed."""
    inbox, commit = topics.agent(RUN, "a0", "inbox"), topics.commit(RUN)
    body = json.loads(encode(fleet.coord.history[-1]))
    cases = [(inbox, start_a1), (topics.agent(RUN, "a1", "inbox"), start_a0), (commit, start_a0),
             (inbox, start_a0[:-1] + b',"pad":"' + b"x" * (64 << 10) + b'"}')]
    for change in ({"coefficients": body["coefficients"][:-4]}, {"pairs": body["pairs"] + 1},
                   {"coefficients": "*" + body["coefficients"][1:]},
                   {"seeds": "AAAAAAAAAAA="}, {"derive": {**body["derive"], "slots": [[0, 0]]}},
                   {"derive": {**body["derive"], "run_seed": 2**64}}, {"round": -1},
                   {"apply": "pairwise-fast"}, {"derive": {**body["derive"], "pool": -2}}):
        cases.append((commit, json.dumps({**body, **change}).encode()))
    nan = struct.pack("<f", math.nan) * body["pairs"]
    cases.append((commit, json.dumps({**body, "coefficients": base64.b64encode(nan).decode()})
                   .encode()))
    return cases


def test_an_agent_refuses_misaddressed_and_malformed_rounds_and_commits_and_changes_nothing():
    fleet = Fleet(2)
    fleet.round()
    a0 = fleet.agents["a0"]
    starts = fleet.coord.open_round(["a0", "a1"], 0.0)
    for topic, payload in hostile_to_agent(fleet, starts[0].payload, starts[1].payload):
        before, refused = session_state(a0), a0.session.refused
        assert a0.session.receive(topic, payload) == [], topic
        assert a0.session.refused == refused + 1, topic
        assert session_state(a0) == before
    sends = a0.handle(a0.session.receive(starts[0].topic, starts[0].payload))  # the real one
    assert [len(decode(s.payload).scalars) for s in sends] == [
        len(fleet.coord.current_round.assignments["a0"])]


def test_an_agent_sends_only_what_the_wire_would_accept():
    """A diverged model's loss can be finite yet past the wire's bound: the agent (and the
    simulation) must drop that round rather than send a result every receiver refuses."""
    from protocols.codec import decode, encode
    from protocols.errors import ProtocolError
    from protocols.messages import MAX_LOSS, Result, sendable
    assert sendable(2.3, [0.1, -4.0]) and sendable(MAX_LOSS, [1e11])
    for loss, scalars in ((float("nan"), [0.1]), (float("inf"), [0.1]), (1.09e31, [0.1]),
                          (-1.09e31, [0.1]), (2.3, [float("nan")]), (2.3, [float("-inf")]),
                          (2.3, [0.1, -2e12])):  # past what the coordinator takes
        assert not sendable(loss, scalars)
    wire = encode(Result("pi-1", 0, (0.5,), 10, "0" * 32, 1.09e31, 0.1))
    with pytest.raises(ProtocolError, match="loss"):
        decode(wire)
