"""Wire codec: every message round-trips; malformed input raises ProtocolError, nothing else."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import topics
from protocols.codec import MAX_MESSAGE_BYTES, decode, encode
from protocols.directions import DirectionSpec
from protocols.errors import ProtocolError
from protocols.messages import (
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
from protocols.zo import Commit

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
seeds = st.integers(0, 2**64 - 1)
floats = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
fp = st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
sha = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
caps = st.builds(Capabilities, st.integers(0, 1 << 20), st.integers(1, 64),
                 st.integers(0, 10**6), st.text(max_size=20), st.text(max_size=10))
commit = st.builds(Commit, st.integers(0, 10**6),
                   st.lists(st.tuples(seeds, floats), max_size=5).map(tuple))
commit_msg = st.builds(CommitMessage, commit, fp)


@st.composite
def results(draw):
    n = draw(st.integers(1, 5))
    s = draw(st.lists(seeds, min_size=n, max_size=n, unique=True))
    return Result(draw(ids), draw(st.integers(0, 10**6)), tuple(s),
                  tuple(draw(st.lists(floats, min_size=n, max_size=n))),
                  draw(st.integers(1, 10**6)), draw(fp), draw(floats), draw(st.floats(0, 1e4)))


@st.composite
def sync_replies(draw):
    first = draw(st.integers(0, 1000))
    n = draw(st.integers(0, 4))
    msgs = tuple(CommitMessage(Commit(first + i, ((i, 0.5),)), draw(fp)) for i in range(n))
    return SyncReply(draw(ids), msgs, draw(st.booleans()))


messages = st.one_of(
    st.builds(Hello, ids, caps, st.just(""), st.just(-1), st.just("")),
    st.builds(Hello, ids, caps, sha, st.integers(0, 10**6), fp),
    st.builds(ModelAnnounce, sha, st.text(max_size=50), st.integers(0, 1000), fp,
              st.builds(DirectionSpec, st.sampled_from(["rademacher", "gaussian"]),
                        st.floats(0.01, 10)), st.integers(1024, 1 << 20)),
    st.builds(RoundStart, st.integers(0, 10**6), fp, st.floats(1e-6, 1),
              st.dictionaries(ids, st.lists(seeds, min_size=1, max_size=3, unique=True)
                              .map(tuple), max_size=4),
              st.floats(0.1, 100), st.just(1), st.floats(0, 1)),
    results(), commit_msg,
    st.builds(SyncRequest, ids, st.integers(0, 1000), fp), sync_replies(),
    st.builds(Status, ids, st.sampled_from(["online", "offline"])),
    st.builds(Error, st.text(max_size=20), st.text(max_size=100), st.integers(-1, 100)),
)


@given(messages)
@settings(max_examples=300, deadline=None)
def test_every_message_round_trips_exactly(message):
    assert decode(encode(message)) == message


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_raise_only_protocol_errors(payload):
    with contextlib.suppress(ProtocolError):
        decode(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@given(messages, st.data())
@settings(max_examples=300, deadline=None)
def test_a_mutated_field_is_refused_or_decodes_to_a_valid_message(message, data):
    body = json.loads(encode(message))
    key = data.draw(st.sampled_from(sorted(body)))
    body[key] = data.draw(json_values)
    raw = json.dumps(body).encode()  # may hold NaN/Infinity, which must be refused
    try:
        decoded = decode(raw)
    except ProtocolError as exc:
        assert str(exc)
        return
    assert decode(encode(decoded)) == decoded


def _result_body(**change):
    body = json.loads(encode(Result("a1", 3, (1, 2), (0.5, -0.5), 10, "0" * 32)))
    body.update(change)
    return json.dumps(body).encode()


@pytest.mark.parametrize("payload, code", [
    (b"", "bad_json"),
    (b"[1, 2]", "bad_json"),
    (b'{"v": 2, "type": "result"}', "bad_version"),
    (b'{"v": 1, "type": "teleport"}', "bad_type"),
    (_result_body(scalars=[float("nan"), 0.5]), "non_finite"),
    (_result_body(scalars=[1e400, 0.5]), "non_finite"),
    (_result_body(scalars=[1e31, 0.5]), "out_of_range"),
    (_result_body(scalars=[0.5]), "bad_scalars"),
    (_result_body(seeds=[1, 1]), "bad_seed"),
    (_result_body(seeds=[-1, 2]), "bad_seed"),
    (_result_body(round=-4), "out_of_range"),
    (_result_body(round="3"), "bad_type"),
    (_result_body(samples=True), "bad_type"),
    (_result_body(agent_id="../etc"), "bad_id"),
    (_result_body(fingerprint="XYZ"), "bad_hash"),
    (_result_body(extra=1), "unknown_field"),
    (b'{"v":1,"type":"status","agent_id":"a","agent_id":"b","state":"online"}', "bad_json"),
    (b"[" * 100_000, "bad_json"),
    (b"\xff\xfe", "bad_json"),
])
def test_malformed_messages_name_what_is_wrong(payload, code):
    with pytest.raises(ProtocolError) as info:
        decode(payload)
    assert info.value.code == code


def test_size_limits_apply_before_parsing():
    with pytest.raises(ProtocolError) as info:
        decode(b" " * (MAX_MESSAGE_BYTES + 1))
    assert info.value.code == "too_big"
    big = _result_body(fingerprint="0" * 32, loss=0.0, compute_s=0.0)
    padded = big[:-1] + b"," + b'"pad":"' + b"x" * (70 << 10) + b'"}'
    with pytest.raises(ProtocolError, match="limit") as info:
        decode(padded)
    assert info.value.code == "too_big"


def test_coefficients_cross_the_wire_bit_exact():
    values = (0.1, 1 / 3, 5e-324, -2.2250738585072014e-308, 1.7976931348623157e308 / 1e290)
    msg = CommitMessage(Commit(0, tuple((i, v) for i, v in enumerate(values))), "0" * 32)
    assert [c for _, c in decode(encode(msg)).commit.pairs] == list(values)


def test_topic_layout_and_agent_topic_parsing():
    assert topics.agent("r1", "pi-7", "result") == "zowarmup/r1/agent/pi-7/result"
    parsed = topics.parse_agent_topic("r1", "zowarmup/r1/agent/pi-7/result")
    assert (parsed.agent_id, parsed.kind) == ("pi-7", "result")
    for bad in ("zowarmup/r2/agent/pi-7/result", "zowarmup/r1/agent/pi-7/inbox",
                "zowarmup/r1/agent/a/b/result", "zowarmup/r1/round"):
        with pytest.raises(ProtocolError):
            topics.parse_agent_topic("r1", bad)
    with pytest.raises(ProtocolError):
        topics.agent("r1", "+", "hello")


@pytest.mark.parametrize("flt, topic, want", [
    ("a/+/c", "a/b/c", True), ("a/#", "a", True), ("a/#", "a/b/c", True), ("#", "$SYS/x", False),
    ("a/+", "a/b/c", False), ("+/+", "a/b", True), ("a/b", "a/b", True), ("a/b", "a/c", False),
])
def test_topic_filter_matching(flt, topic, want):
    assert topics.matches(flt, topic) is want
