"""Wire codec: every message round-trips; malformed input raises ProtocolError, nothing else."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import topics
from protocols.codec import MAX_MESSAGE_BYTES, decode, encode, encode_each
from protocols.compact import SeedSlots, from_runs, to_runs
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
from protocols.zo import Commit, derive_seed

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
seeds = st.integers(0, 2**64 - 1)
floats = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
fp = st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
sha = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
caps = st.builds(Capabilities, st.integers(0, 1 << 20), st.integers(1, 64),
                 st.integers(0, 10**6), st.text(max_size=20), st.text(max_size=10))
# every float64 a coefficient may be: subnormals, -0.0 and the extremes included (a
# commit holds, and sends, their float32 rounding: all that applying one uses)
coefficients = st.floats(-1e29, 1e29, allow_nan=False, allow_infinity=False)
commit = st.builds(Commit, st.integers(0, 10**6),
                   st.lists(st.tuples(seeds, coefficients), max_size=5).map(tuple))


@st.composite
def derived_commits(draw) -> CommitMessage:
    """A commit whose seeds follow from the run seed, as the coordinator makes them."""
    round_id, per = draw(st.integers(0, 2**40)), draw(st.integers(1, 4))
    pool = draw(st.sampled_from([0, per, 16, 64]))
    slots = SeedSlots(draw(seeds), per, tuple(sorted(draw(st.sets(
        st.integers(0, (pool or 40 * per) - 1), max_size=12)))), pool)
    values = draw(st.lists(coefficients, min_size=len(slots.slots), max_size=len(slots.slots)))
    return CommitMessage(Commit(round_id, tuple(zip(slots.seeds(round_id), values))), draw(fp),
                         slots)


commit_msg = st.builds(CommitMessage, commit, fp) | derived_commits()


@st.composite
def results(draw):
    n = draw(st.integers(1, 5))
    return Result(draw(ids), draw(st.integers(0, 10**6)),
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
    st.builds(RoundStart, st.integers(0, 10**6), fp, st.floats(1e-6, 1), ids,
              st.lists(seeds, min_size=1, max_size=3, unique=True).map(tuple),
              st.floats(0.1, 100), st.just(1), st.floats(0, 1), st.sampled_from([0, 3, 1024])),
    results(), commit_msg,
    st.builds(SyncRequest, ids, st.integers(0, 1000), fp), sync_replies(),
    st.builds(Status, ids, st.sampled_from(["online", "offline"])),
    st.builds(Error, st.text(max_size=20), st.text(max_size=100), st.integers(-1, 100)),
)


@given(messages)
@settings(max_examples=300, deadline=None)
def test_every_message_round_trips_exactly(message):
    assert decode(encode(message)) == message


round_starts = st.builds(
    RoundStart, st.integers(0, 10**6), fp, st.floats(1e-6, 1), ids,
    st.lists(seeds, min_size=1, max_size=3, unique=True).map(tuple), st.floats(0.1, 100),
    st.just(1), st.floats(0, 1), st.sampled_from([0, 3, 1024]))


@given(round_starts, st.lists(st.tuples(st.text(max_size=12), st.lists(seeds, max_size=4)),
                              max_size=5))
@settings(max_examples=100, deadline=None)
def test_starts_encoded_from_a_template_are_the_bytes_encode_gives(template, others):
    """A round's starts are encoded once for the fields they share (``encode_each``):
    each must be byte for byte what encoding its own message gives (ids with any
    characters, seeds of any count, included)."""
    got = list(encode_each(template, ("agent_id", "seeds"),
                           [(a, list(s)) for a, s in others]))
    want = [encode(replace(template, agent_id=a, seeds=tuple(s))) for a, s in others]
    assert got == want
    assert list(encode_each(template, ("seeds", "agent_id"),
                            [(list(s), a) for a, s in others])) == want
    with pytest.raises(ValueError, match="no field"):
        list(encode_each(template, ("agent", "seeds"), [("a", [1])]))


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
    body = json.loads(encode(Result("a1", 3, (0.5, -0.5), 10, "0" * 32)))
    body.update(change)
    return json.dumps(body).encode()


@pytest.mark.parametrize("payload, code", [
    (b"", "bad_json"),
    (b"[1, 2]", "bad_json"),
    (b'{"v": 1, "type": "result"}', "bad_version"),  # the wire before compact commits
    (b'{"v": 2, "type": "result"}', "bad_version"),  # the wire before summed commits
    (b'{"v": 4, "type": "result"}', "bad_version"),
    (b'{"v": 3, "type": "teleport"}', "bad_type"),
    (_result_body(scalars=[float("nan"), 0.5]), "non_finite"),
    (_result_body(scalars=[1e400, 0.5]), "non_finite"),
    (_result_body(scalars=[1e31, 0.5]), "out_of_range"),
    (_result_body(scalars=[]), "bad_scalars"),
    (_result_body(scalars=0.5), "bad_type"),
    (_result_body(seeds=[1, 2]), "unknown_field"),  # the coordinator knows them
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


def _bits(values, width: str = "f") -> bytes:
    return struct.pack(f"<{len(values)}{width}", *values)


def test_coefficients_cross_the_wire_as_the_float32_that_is_applied():
    values = (0.1, 1 / 3, 1e-45, -1.1754943508222875e-38, -1e29, -0.0, 5e-324)
    msg = CommitMessage(Commit(0, tuple((i, v) for i, v in enumerate(values))), "0" * 32)
    rounded = _bits(values)  # struct rounds float64 to float32 as numpy does: to nearest
    assert _bits([c for _, c in msg.commit.pairs]) == rounded
    assert _bits([c for _, c in decode(encode(msg)).commit.pairs]) == rounded
    with pytest.raises(ProtocolError) as info:  # past float32's range: no rounding holds it
        Commit(0, ((1, 1e39),))
    assert info.value.code == "out_of_range"


def test_a_version_2_commit_of_a_journal_keeps_its_float64_bits_and_pairwise_rule():
    values = (0.1, 1 / 3, 5e-324, -0.0)
    commit = Commit(4, tuple((i, v) for i, v in enumerate(values)), "pairwise")
    body = CommitMessage(commit, "0" * 32).to_wire(version=2)
    assert "apply" not in body
    got = CommitMessage.from_wire(body, version=2).commit
    assert got.apply == "pairwise" and _bits([c for _, c in got.pairs], "d") == _bits(values, "d")
    with pytest.raises(ProtocolError):  # a summed commit has no version 2 form
        CommitMessage(Commit(4, ((1, 0.5),)), "0" * 32).to_wire(version=2)


# --- the compact commit (protocols/compact.py) -------------------------------------------


@given(commit_msg)
@settings(max_examples=300, deadline=None)
def test_a_compact_commit_keeps_every_bit_of_every_pair(message):
    body = json.loads(encode(message))
    assert ("derive" in body) == (message.slots is not None)  # derived seeds are not sent
    got = decode(encode(message))
    assert got == message
    assert [s for s, _ in got.commit.pairs] == [s for s, _ in message.commit.pairs]
    assert _bits([c for _, c in got.commit.pairs]) == _bits([c for _, c in message.commit.pairs])


@given(st.sets(st.integers(0, 300), max_size=40))
def test_slot_runs_are_maximal_and_give_the_slots_back(chosen):
    slots = sorted(chosen)
    runs = to_runs(slots)
    assert from_runs(runs, len(slots), 301, "t") == tuple(slots)
    assert all(b[0] > a[0] + a[1] for a, b in zip(runs, runs[1:]))  # a gap between runs


def test_a_full_round_commit_is_one_run_and_under_six_bytes_a_pair():
    per, clients = 2, 1000
    slots = SeedSlots(2**64 - 1, per, tuple(range(per * clients)))
    pairs = tuple(zip(slots.seeds(7), (i * 1e-7 for i in range(per * clients))))
    payload = encode(CommitMessage(Commit(7, pairs), "0" * 32, slots))
    assert json.loads(payload)["derive"]["slots"] == [[0, per * clients]]
    assert len(payload) < 6 * per * clients
    explicit = encode(CommitMessage(Commit(7, pairs), "0" * 32))  # seeds sent as bytes
    assert len(payload) < len(explicit) < 17 * per * clients


def test_a_pooled_commit_names_pool_slots_whose_seeds_are_the_rounds_own():
    slots = SeedSlots(9, 2, (0, 1, 5), pool=6)
    assert slots.seeds(3) == tuple(derive_seed(9, 3, t // 2, t % 2) for t in (0, 1, 5))
    message = CommitMessage(Commit(3, tuple(zip(slots.seeds(3), (1.0, 2.0, 3.0)))), "0" * 32,
                            slots)
    body = json.loads(encode(message))
    assert body["derive"]["pool"] == 6 and body["apply"] == "sum64"
    assert decode(encode(message)) == message
    body["derive"]["slots"] = [[0, 2], [6, 1]]  # past the pool
    with pytest.raises(ProtocolError) as info:
        decode(json.dumps(body).encode())
    assert info.value.code == "bad_slots"


def test_a_commit_whose_seeds_do_not_follow_its_slots_cannot_be_made():
    slots = SeedSlots(5, 1, (0, 3))
    seeds = slots.seeds(2)
    with pytest.raises(ProtocolError) as info:
        CommitMessage(Commit(2, ((seeds[0], 1.0), (seeds[1] ^ 1, 1.0))), "0" * 32, slots)
    assert info.value.code == "bad_seed"
    with pytest.raises(ProtocolError):
        CommitMessage(Commit(3, tuple(zip(seeds, (1.0, 1.0)))), "0" * 32, slots)  # other round


def _b64_floats(*values: float) -> str:
    return base64.b64encode(_bits(values)).decode()


def _noncanonical(text: str) -> str:
    """The same bytes with nonzero padding bits, or padding where no byte is missing:
    lenient decoders accept either, we do not."""
    if not text.endswith("="):
        return text[:-1] + "="
    i = len(text.rstrip("=")) - 1
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return text[:i] + alphabet[alphabet.index(text[i]) | 1] + text[i + 1:]


def _hostile_commit(kind: str, body: dict, data) -> tuple[dict, set[str]]:
    """``body`` (a compact commit's wire fields) changed in one hostile way, with the codes
    that may refuse it."""
    n, derived = body["pairs"], "derive" in body
    if kind == "count":
        body["pairs"] = n + data.draw(st.sampled_from([-1, 1, 3, 1000]))
        return body, {"bad_count", "out_of_range", "bad_slots"}
    if kind == "truncated":
        body["coefficients"] = body["coefficients"][:-4]
        return body, {"bad_count"}
    if kind == "bad_char":
        text = body["coefficients"]
        i = data.draw(st.integers(0, len(text) - 1))
        body["coefficients"] = text[:i] + data.draw(st.sampled_from("*-_ \n.")) + text[i + 1:]
        return body, {"bad_base64"}
    if kind == "noncanonical":
        body["coefficients"] = _noncanonical(body["coefficients"])
        return body, {"bad_base64", "bad_count"}
    if kind == "value":
        bad = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e31, -1e38]))
        values = list(struct.unpack(f"<{n}f", base64.b64decode(body["coefficients"])))
        values[data.draw(st.integers(0, n - 1))] = bad
        body["coefficients"] = _b64_floats(*values)
        return body, {"non_finite", "out_of_range"}
    if kind == "apply":
        change = data.draw(st.sampled_from(["fast", None, "drop"]))
        if change == "drop":
            body.pop("apply")
        else:
            body["apply"] = change
        return body, {"bad_apply", "bad_type", "missing_field"}
    if kind == "both_or_neither":
        if derived:
            body["seeds"] = base64.b64encode(bytes(8 * n)).decode()
        else:
            body.pop("seeds")
        return body, {"missing_field"}
    if not derived:  # the remaining kinds need slots: a wrong type for the seeds instead
        body["seeds"] = data.draw(st.sampled_from([[1, 2], 7, None, {"a": 1}]))
        return body, {"bad_type"}
    derive = body["derive"]
    runs = derive["slots"]
    if kind == "run_seed":
        derive["run_seed"] = data.draw(st.sampled_from([-1, 2**64, True, 1.5, "1"]))
        return body, {"out_of_range", "bad_type"}
    if kind == "per_client":
        derive["per_client"] = data.draw(st.sampled_from([0, 1025, -3, None]))
        return body, {"out_of_range", "bad_type"}
    if kind == "pool":
        derive["pool"] = data.draw(st.sampled_from([-1, 2**21, True, None, "8"]))
        return body, {"out_of_range", "bad_type"}
    first, count = runs[0]
    derive["slots"] = data.draw(st.sampled_from([
        [[first, count], [first, 1]] + runs[1:],  # overlapping, not ascending
        [[first, 0]] + runs,  # an empty run
        [[first, count - 1], [first + count - 1, 1]] + runs[1:] if count > 1
        else [[first, 1], [first, 1]],  # not maximal, or repeated
        [[first, count, 0]] + runs[1:],  # not a pair
        [[True, count]] + runs[1:],  # not an integer
        [[(derive["pool"] or 100_000 * derive["per_client"]) - count + 1, count]]
        + runs[1:],  # past the round (or the pool)
        runs[1:] + [[first, count]] if len(runs) > 1 else [[-1, count]],  # out of order
        {"first": first}, runs + [[10**9, 1]]]))
    return body, {"bad_slots", "bad_count"}


@given(commit_msg.filter(lambda m: m.commit.pairs), st.data())
@settings(max_examples=400, deadline=None)
def test_hostile_compact_commits_are_refused_with_their_reason(message, data):
    kind = data.draw(st.sampled_from(["count", "truncated", "bad_char", "noncanonical", "value",
                                      "apply", "both_or_neither", "run_seed", "per_client",
                                      "pool", "slots"]))
    body, codes = _hostile_commit(kind, json.loads(encode(message)), data)
    with pytest.raises(ProtocolError) as info:
        decode(json.dumps(body).encode())
    assert info.value.code in codes, (kind, info.value)
    assert str(info.value)


def test_version_1_and_2_commits_are_refused_on_the_wire():
    old = {"v": 1, "type": "commit", "round": 0, "pairs": [[1, 0.5]], "fingerprint": "0" * 32}
    v2 = {"v": 2, **CommitMessage(Commit(0, ((1, 0.5),), "pairwise"), "0" * 32).to_wire(2),
          "type": "commit"}
    for message in (old, v2):
        with pytest.raises(ProtocolError, match="update the older side") as info:
            decode(json.dumps(message).encode())
        assert info.value.code == "bad_version"


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


def _both_ways(payload: bytes) -> tuple:
    """What decoding gives with orjson's fast path for flat objects, and without it."""
    import protocols.codec as codec

    def run():
        try:
            return decode(payload)
        except ProtocolError as exc:
            return exc.code
    fast = run()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(codec, "orjson", None)
        return fast, run()


@given(messages, st.data())
@settings(max_examples=200, deadline=None)
def test_the_fast_reader_decides_as_the_strict_one(message, data):
    pytest.importorskip("orjson")
    body = json.loads(encode(message))
    key = data.draw(st.sampled_from(sorted(body)))
    body[key] = data.draw(json_values)
    for payload in (encode(message), json.dumps(body).encode()):
        fast, strict = _both_ways(payload)
        assert fast == strict


@pytest.mark.parametrize("payload", [
    b'{"v":3,"type":"status","agent_id":"a","agent_id":"b","state":"online"}',
    b'{"v":3,"type":"status","agent_id":"a","\\u0061gent_id":"b","state":"online"}',
    b'{"v":3,"type":"status","agent_id":"a","state":"online","state":"offline"}',
    b'{"v":3,"type":"status","agent_id":"a","state":"online","v":3}',
])
def test_a_repeated_key_is_refused_whichever_reader_reads_it(payload):
    assert _both_ways(payload) == ("bad_json", "bad_json")
