"""The journal: an append-only, crash-safe record of every commit. It is the run's truth.

Exported weights + the journal's commits, replayed in order, give the model of any
round. Format (``docs/protocol.md``, "Journal")::

    b"ZOWJOURNAL3\\n"
    then records: uint32 LE length | uint32 LE CRC-32 of the payload | payload (UTF-8 JSON)

The first record is the header (``{"type": "header", ...}``); commit records hold a
``CommitMessage``'s wire fields plus ``"type": "commit"`` and, when the round had results,
``"scale"``: its median ``|g|``, from which later rounds' clipping bounds follow
(``robust.py``), so a resumed run clips as the uninterrupted one did. A record counts once
``append`` returns: it is written, flushed and fsync'ed. A crash mid-write leaves a torn
last record, which reading detects (short frame or bad CRC at the end of the file) and
drops; damage anywhere else is an error, because silently skipping a commit would change
every later bit.

The magic names the format of the commit records, and with it how they are applied:
format 3 holds wire version 3's commits (float32 coefficients, summed per element in
float64 and rounded once: ``SUM64``); format 2 (``ZOWJOURNAL2``) wire version 2's compact
commits and format 1 (``ZOWJOURNAL1``) wire version 1's ``pairs`` lists, both applied pair
by pair in float32 (``PAIRWISE``), as the build that wrote them applied them. All three
are read and replay to the bits their runs had; a journal is appended to in its own format
and rule (``Journal.apply``), so a resumed old run goes on as it ran.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .directions import PAIRWISE, SUM64
from .errors import JournalError, ProtocolError
from .messages import CommitMessage

MAGIC = b"ZOWJOURNAL3\n"  # the format written
MAGICS = {b"ZOWJOURNAL1\n": 1, b"ZOWJOURNAL2\n": 2, MAGIC: 3}  # read (all of one length)
FORMAT = MAGICS[MAGIC]
APPLY_BY_FORMAT = {1: PAIRWISE, 2: PAIRWISE, 3: SUM64}  # how each format's commits apply
_FRAME = struct.Struct("<II")
MAX_RECORD_BYTES = 64 << 20


@dataclass
class JournalContents:
    header: dict
    records: list[dict] = field(default_factory=list)
    torn_bytes: int = 0  # bytes of a torn last record that reading dropped
    valid_bytes: int = 0  # where the last good record ends
    format: int = FORMAT  # its commit records' wire version (1, 2 or 3)

    @property
    def commits(self) -> list[CommitMessage]:
        out = []
        for record in self.records:
            if record.get("type") == "commit":
                body = {k: v for k, v in record.items() if k not in ("type", "scale")}
                try:
                    out.append(CommitMessage.from_wire(body, self.format))
                except ProtocolError as exc:
                    raise JournalError(f"journal commit record is invalid: {exc}") from exc
        return out

    @property
    def scales(self) -> dict[int, float]:
        """Round -> the median |g| journaled with its commit (rounds that had one)."""
        out = {}
        for record in self.records:
            scale = record.get("scale") if record.get("type") == "commit" else None
            if scale is not None:
                if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
                    raise JournalError(f"journal commit record has an invalid scale {scale!r}")
                out[record["round"]] = float(scale)
        return out


def read_journal(path: Path) -> JournalContents:
    data = Path(path).read_bytes()
    version = MAGICS.get(data[:len(MAGIC)])
    if version is None:
        raise JournalError(f"{path} is not a zowarmup journal of format "
                           f"{' or '.join(str(f) for f in MAGICS.values())} (bad magic)")
    pos, payloads, torn = len(MAGIC), [], 0
    while pos < len(data):
        if pos + _FRAME.size > len(data):
            torn = len(data) - pos
            break
        length, crc = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        if length > MAX_RECORD_BYTES:
            raise JournalError(f"{path}: record at byte {pos} claims {length} bytes")
        if end > len(data):
            torn = len(data) - pos
            break
        payload = data[pos + _FRAME.size:end]
        if zlib.crc32(payload) != crc:
            if end == len(data):
                torn = len(data) - pos
                break
            raise JournalError(f"{path}: record at byte {pos} fails its checksum and is not the "
                               "last one; the journal is damaged")
        payloads.append(payload)
        pos = end
    records = [_parse(p, path) for p in payloads]
    if not records or records[0].get("type") != "header":
        raise JournalError(f"{path} has no header record")
    base = records[0].get("base_version")
    if isinstance(base, bool) or not isinstance(base, int) or base < 0:
        raise JournalError(f"{path}: header needs an integer base_version >= 0")
    return JournalContents(records[0], records[1:], torn, len(data) - torn, version)


def _parse(payload: bytes, path: Path) -> dict:
    try:
        record = json.loads(payload)
    except ValueError as exc:
        raise JournalError(f"{path}: a record with a good checksum is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise JournalError(f"{path}: a record is not a JSON object")
    return record


class Journal:
    """Appends records durably; opening an existing journal drops a torn tail first."""

    def __init__(self, path: Path, contents: JournalContents) -> None:
        self.path = Path(path)
        self.header = contents.header
        self.commits = contents.commits
        self.scales = contents.scales
        self.records = [r for r in contents.records if r.get("type") != "commit"]
        self.format = contents.format
        # unbuffered: a failed write leaves nothing behind in a buffer to go out later
        self._file = open(self.path, "r+b", buffering=0)  # noqa: SIM115 - held for appends
        self._file.truncate(contents.valid_bytes)
        self._file.seek(contents.valid_bytes)
        self.dropped_bytes = contents.torn_bytes

    @classmethod
    def create(cls, path: Path, header: dict) -> Journal:
        path = Path(path)
        if not isinstance(header.get("base_version"), int):
            raise JournalError("a journal header needs base_version: the state version that "
                               "its first commit applies to")
        if path.exists():
            raise JournalError(f"{path} already exists; open it to continue the run")
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + _frame({"type": "header", **header}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> Journal:
        return cls(path, read_journal(path))

    @property
    def apply(self) -> str:
        """How this journal's commits are applied, those still to come included."""
        return APPLY_BY_FORMAT[self.format]

    @property
    def version(self) -> int:
        """State version after the last commit (the base version with none)."""
        return self.commits[-1].commit.round + 1 if self.commits else self.header["base_version"]

    def append_commit(self, message: CommitMessage, scale: float | None = None) -> None:
        if message.commit.round != self.version:
            raise JournalError(f"commit for round {message.commit.round} cannot follow version "
                               f"{self.version}")
        if message.commit.apply != self.apply:
            raise JournalError(f"a {message.commit.apply} commit cannot join a journal of "
                               f"format {self.format}, whose commits are {self.apply}")
        extra = {} if scale is None else {"scale": scale}
        self.append({"type": "commit", **message.to_wire(self.format), **extra})
        self.commits.append(message)
        if scale is not None:
            self.scales[message.commit.round] = scale

    def append(self, record: dict) -> None:
        """Write one record durably, or raise ``JournalError`` with the file as it was.

        A failed write (a full disk, an I/O error) may have put part of the record on
        disk; it is cut off again, so the next append does not land behind a torn
        record, which reading would take for damage.
        """
        start = self._file.tell()
        try:
            data = memoryview(_frame(record))
            while data:
                data = data[self._file.write(data):]
            os.fsync(self._file.fileno())
        except OSError as exc:
            self._truncate(start)
            raise JournalError(f"cannot write to the journal {self.path}: {exc.strerror or exc}"
                               "; nothing was recorded (free space, then resume)") from exc
        if record.get("type") != "commit":
            self.records.append(record)

    def _truncate(self, size: int) -> None:
        try:
            self._file.seek(size)
            self._file.truncate(size)
        except OSError:  # the file is as torn as the failed write left it: reading drops it
            pass

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _frame(record: dict) -> bytes:
    payload = json.dumps(record, allow_nan=False, separators=(",", ":")).encode()
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
