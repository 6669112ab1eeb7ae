"""Messages to bytes and back: versioned JSON, strict on the way in.

Wire form: one UTF-8 JSON object ``{"v": 2, "type": "<type>", ...fields}``. JSON keeps
the wire readable with ``mosquitto_sub`` and writable from any language; floats are
written with Python's shortest round-trip repr, and a commit's coefficients as float64
bytes in base64 (``compact.py``), so every bit crosses the wire. Decoding refuses, with
a ``ProtocolError``: payloads over the size limit, bad UTF-8 or JSON, NaN/Infinity,
duplicate keys, deep nesting, an unknown version or type, and any field that the
message's own ``from_wire`` rejects.

Version 3 sums each commit in float64 and rounds once (its coefficients are float32, and
it says how it is applied), draws a round's directions from a pool, and leaves out of a
result the seeds the coordinator assigned. Version 2 (each round start to its participant
alone, compact commits applied pair by pair) and version 1 (one round start listing every
participant, commits as JSON pairs) are refused on the wire, and read only from journals
(``journal.py``).
"""

from __future__ import annotations

import json

from .errors import ProtocolError
from .messages import MESSAGE_TYPES, Message
from .validate import json_object

WIRE_VERSION = 3
MAX_MESSAGE_BYTES = 8 << 20  # ~1.5 M pairs; a 1,000-agent round's commit is ~5.5 KB
# Agents send small things, and a round start holds one agent's seeds: a large one is
# refused before it is parsed.
MAX_BYTES_BY_TYPE = {"hello": 16 << 10, "result": 64 << 10, "sync": 4 << 10,
                     "status": 1 << 10, "error": 8 << 10, "round": 64 << 10}


def encode(message: Message) -> bytes:
    body = {"v": WIRE_VERSION, "type": message.type, **message.to_wire()}
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


def decode(payload: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError("payload must be bytes", "bad_type")
    data = json_object(payload, "message", max_bytes)
    version = data.pop("v", None)
    if version != WIRE_VERSION:
        raise ProtocolError(f"wire version {version!r} is not supported (this build speaks "
                            f"{WIRE_VERSION}); update the older side", "bad_version")
    kind = data.pop("type", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}", "bad_type")
    limit = MAX_BYTES_BY_TYPE.get(kind)
    if limit is not None and len(payload) > limit:
        raise ProtocolError(f"{kind} message of {len(payload)} bytes is over its {limit}-byte "
                            "limit", "too_big")
    return cls.from_wire(data)
