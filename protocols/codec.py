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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .errors import ProtocolError
from .messages import MESSAGE_TYPES, Message
from .validate import json_object

try:  # the orchestrator's extra: parses a result in a tenth of the time (decode_fast)
    import orjson
except ImportError:  # a device: the standard library alone
    orjson = None

WIRE_VERSION = 3
MAX_MESSAGE_BYTES = 8 << 20  # ~1.5 M pairs; a 1,000-agent round's commit is ~5.5 KB
# Agents send small things, and a round start holds one agent's seeds: a large one is
# refused before it is parsed.
MAX_BYTES_BY_TYPE = {"hello": 16 << 10, "result": 64 << 10, "sync": 4 << 10,
                     "status": 1 << 10, "error": 8 << 10, "round": 64 << 10}


# What ``json.dumps(body, allow_nan=False, separators=(",", ":"))`` makes, without a new
# encoder per message (it holds no state between calls).
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def encode(message: Message) -> bytes:
    body = {"v": WIRE_VERSION, "type": message.type, **message.to_wire()}
    return _ENCODER.encode(body).encode()


def encode_each(template: Message, varying: Sequence[str],
                values: Iterable[Sequence[Any]]) -> Iterator[bytes]:
    """``encode(m)`` for each message ``m`` that is ``template`` but for the fields named in
    ``varying``, given as their wire values (one sequence per message, in ``varying``'s
    order): the same bytes, with the fields that do not vary encoded once, not per message.
    A round's starts differ only in their addressee and seeds."""
    body = {"v": WIRE_VERSION, "type": template.type, **template.to_wire()}
    if not set(varying) <= body.keys():
        raise ValueError(f"{template.type} has no field(s) {set(varying) - body.keys()}")
    texts, order, text = [], [], "{"
    for i, (key, value) in enumerate(body.items()):  # as the encoder writes an object
        text += ("," if i else "") + _ENCODER.encode(key) + ":"
        if key in varying:
            texts.append(text)
            order.append(varying.index(key))
            text = ""
        else:
            text += _ENCODER.encode(value)
    texts.append(text + "}")
    pieces = [""] * (2 * len(order) + 1)
    pieces[::2] = texts
    for vals in values:
        for slot, index in enumerate(order):
            pieces[2 * slot + 1] = _json(vals[index])
        yield "".join(pieces).encode()


def _json(value: Any) -> str:
    """``_ENCODER.encode(value)``; a list of plain ints (seeds) without building an encoder."""
    if type(value) is list and all(type(x) is int for x in value):
        return "[" + ",".join(map(str, value)) + "]"
    return _ENCODER.encode(value)


def decode(payload: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError("payload must be bytes", "bad_type")
    data = _flat_object(payload, max_bytes) or json_object(payload, "message", max_bytes)
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


_SCALARS = (int, float, bool, type(None))
# orjson reads an integer past 64 bits as a float, where the strict reader keeps an int
# (and refuses it as out of range, not as a float): such numbers go to the strict reader.
_BIG = 2.0**63


def _flat_object(payload: bytes | bytearray | memoryview, max_bytes: int) -> dict | None:
    """The payload's object, parsed by orjson, when the strict reader could not read it
    otherwise; None to leave it to the strict reader (``validate.json_object``).

    orjson keeps the last of repeated keys where the strict reader refuses them, so this
    path takes only what cannot hide a repeat: a flat object (values are strings, numbers
    below 2**63 in magnitude, or lists of them: a result, a status, a sync request) with no
    backslash anywhere.
    Its quotes are then exactly two per key and per string value, so a repeated key shows
    as quotes the parsed object does not account for. Anything else, a parse error
    included, goes to the strict reader, whose verdict and refusal code then stand.
    Results are most of what the orchestrator receives.
    """
    if orjson is None or len(payload) > max_bytes:
        return None
    raw = bytes(payload)
    if b"\\" in raw:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict:
        return None
    strings = 0
    for value in data.values():
        kind = type(value)
        if kind is str:
            strings += 1
        elif kind is float:
            if not -_BIG < value < _BIG:
                return None
        elif kind is list:
            if not all(type(x) is int or (type(x) is float and -_BIG < x < _BIG)
                       for x in value):
                return None
        elif kind not in _SCALARS:
            return None
    return data if raw.count(b'"') == 2 * (len(data) + strings) else None
