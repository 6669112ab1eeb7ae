"""The journal: durable appends, torn tails dropped, damage refused, replay gives the bits."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest

from protocols.compact import SeedSlots
from protocols.directions import PAIRWISE, SUM64, DirectionSpec
from protocols.errors import JournalError
from protocols.journal import MAGIC, Journal, read_journal
from protocols.messages import CommitMessage
from protocols.zo import Commit, apply_commit, derive_seed, fingerprint, replay
from tests.toy import initial_weights

HEADER = {"run_id": "r", "base_version": 0, "spec": DirectionSpec().to_dict()}


def _chain(n: int, rule: str = SUM64) -> tuple[list[CommitMessage], str]:
    w = initial_weights()
    out = []
    for r in range(n):
        c = Commit(r, tuple((derive_seed(1, r, k, 0), 0.01 * (k + 1)) for k in range(3)), rule)
        apply_commit(w, c, DirectionSpec())
        out.append(CommitMessage(c, fingerprint(w)))
    return out, fingerprint(w)


def test_journal_replays_to_the_live_bits(tmp_path):
    chain, final = _chain(5)
    with Journal.create(tmp_path / "j", HEADER) as j:
        for m in chain:
            j.append_commit(m)
    contents = read_journal(tmp_path / "j")
    assert contents.header["run_id"] == "r" and contents.torn_bytes == 0
    assert contents.commits == chain
    w = initial_weights()
    replay(w, [m.commit for m in contents.commits], DirectionSpec())
    assert fingerprint(w) == final


def test_every_torn_tail_is_dropped_and_appends_continue(tmp_path):
    chain, _ = _chain(3)
    path = tmp_path / "j"
    with Journal.create(path, HEADER) as j:
        for m in chain[:2]:
            j.append_commit(m)
    good = path.read_bytes()
    with Journal.open(path) as j:
        j.append_commit(chain[2])
    full = path.read_bytes()
    for cut in range(len(good) + 1, len(full)):
        path.write_bytes(full[:cut])
        contents = read_journal(path)
        assert contents.commits == chain[:2] and contents.torn_bytes == cut - len(good)
    path.write_bytes(full[:len(good) + 20])
    with Journal.open(path) as j:
        assert j.dropped_bytes == 20 and j.version == 2
        j.append_commit(chain[2])
    assert path.read_bytes() == full


def test_a_zeroed_last_record_counts_as_torn(tmp_path):
    chain, _ = _chain(2)
    path = tmp_path / "j"
    with Journal.create(path, HEADER) as j:
        for m in chain:
            j.append_commit(m)
    data = bytearray(path.read_bytes())
    data[-10:] = bytes(10)
    path.write_bytes(bytes(data))
    assert read_journal(path).commits == chain[:1]


def test_damage_before_the_end_is_an_error(tmp_path):
    chain, _ = _chain(3)
    path = tmp_path / "j"
    with Journal.create(path, HEADER) as j:
        for m in chain:
            j.append_commit(m)
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + 12] ^= 0xFF  # inside the header record
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="damaged"):
        read_journal(path)


def test_out_of_order_commits_and_bad_files_are_refused(tmp_path):
    chain, _ = _chain(3)
    with Journal.create(tmp_path / "j", HEADER) as j:
        j.append_commit(chain[0])
        with pytest.raises(JournalError):
            j.append_commit(chain[2])
        with pytest.raises(JournalError):
            j.append_commit(chain[0])
        assert j.version == 1
    with pytest.raises(JournalError):
        Journal.create(tmp_path / "j", HEADER)
    (tmp_path / "other").write_bytes(b"not a journal")
    with pytest.raises(JournalError, match="magic"):
        read_journal(tmp_path / "other")
    with pytest.raises(JournalError, match="base_version"):
        Journal.create(tmp_path / "k", {"run_id": "r"})


def _write_old(path, chain: list[CommitMessage], version: int = 1) -> None:
    """A journal as older builds wrote it: format 1 (commits as JSON pairs) or 2 (compact,
    float64 coefficients), both applied pair by pair. Written here by hand, not by the
    module under test."""
    def fields(m: CommitMessage) -> dict:
        if version == 1:
            return {"round": m.commit.round, "pairs": [[s, c] for s, c in m.commit.pairs]}
        return {"round": m.commit.round, "pairs": len(m.commit.pairs),
                "coefficients": base64.b64encode(struct.pack(
                    f"<{len(m.commit.pairs)}d", *(c for _, c in m.commit.pairs))).decode(),
                "seeds": base64.b64encode(struct.pack(
                    f"<{len(m.commit.pairs)}Q", *(s for s, _ in m.commit.pairs))).decode()}
    records = [{"type": "header", **HEADER}] + [
        {"type": "commit", **fields(m), "fingerprint": m.fingerprint,
         "scale": 0.5 + m.commit.round} for m in chain]
    payloads = [json.dumps(r, separators=(",", ":")).encode() for r in records]
    path.write_bytes(b"ZOWJOURNAL%d\n" % version + b"".join(
        struct.pack("<II", len(p), zlib.crc32(p)) + p for p in payloads))


@pytest.mark.parametrize("version, marker", [(1, b'"pairs":[['), (2, b'"coefficients"')])
def test_an_old_journal_replays_pair_by_pair_and_grows_in_its_own_format(tmp_path, version,
                                                                          marker):
    chain, final = _chain(4, PAIRWISE)
    path = tmp_path / "old"
    _write_old(path, chain[:3], version)
    contents = read_journal(path)
    assert contents.format == version and contents.commits == chain[:3]
    assert all(m.commit.apply == PAIRWISE for m in contents.commits)
    assert contents.scales == {0: 0.5, 1: 1.5, 2: 2.5}
    with Journal.open(path) as j:  # a run of an old build, resumed by this one
        assert j.apply == PAIRWISE
        with pytest.raises(JournalError, match="sum64"):  # one rule per journal
            j.append_commit(_chain(4)[0][3])
        j.append_commit(chain[3])
    data = path.read_bytes()
    assert data.startswith(b"ZOWJOURNAL%d\n" % version) and data.count(marker) == 4
    assert b'"apply"' not in data
    w = initial_weights()
    replay(w, [m.commit for m in read_journal(path).commits], DirectionSpec())
    assert fingerprint(w) == final
    summed, _ = _chain(4)
    assert final != summed[-1].fingerprint  # the rules differ: the rule is the journal's


def test_a_new_journal_holds_compact_summed_commits(tmp_path):
    chain, _ = _chain(2)
    derived = chain[1].commit  # seeds derive_seed(1, 1, k, 0): slots 0, 1, 2 with one each
    compact = CommitMessage(derived, chain[1].fingerprint, SeedSlots(1, 1, (0, 1, 2)))
    with Journal.create(tmp_path / "j", HEADER) as j:
        assert j.apply == SUM64
        j.append_commit(chain[0])  # a message without slots: its seeds go as bytes
        j.append_commit(compact)
    data = (tmp_path / "j").read_bytes()
    assert data.startswith(MAGIC) and MAGIC == b"ZOWJOURNAL3\n" and b'"pairs":[' not in data
    contents = read_journal(tmp_path / "j")
    assert contents.format == 3 and contents.commits == [chain[0], compact]
    assert contents.commits[1].slots == compact.slots
    assert all(m.commit.apply == SUM64 for m in contents.commits)
