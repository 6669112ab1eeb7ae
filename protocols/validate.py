"""Strict field readers for data that came from outside (network, files, flags).

Each reader names the field that is wrong and why, so a refusal can be logged as is.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import ProtocolError


def json_object(raw: bytes | bytearray | memoryview | str, what: str, limit: int) -> dict:
    """A JSON object read from outside, strictly: at most ``limit`` bytes, UTF-8, no NaN or
    Infinity, no repeated key (which JSON parsers resolve differently), an object at the top.
    ``what`` names the source in every refusal."""
    if len(raw) > limit:
        raise ProtocolError(f"{what} of {len(raw)} bytes is over the {limit}-byte limit",
                            "too_big")
    try:
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
        data = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"{what} is not valid JSON: {str(exc)[:200]}", "bad_json") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} must be a JSON object", "bad_json")
    return data


def _no_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not allowed: numbers must be finite", "non_finite")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ProtocolError(f"a JSON object repeats a key ({len(pairs) - len(out)} time(s))",
                            "bad_json")
    return out


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]+$")


def _get(data: dict, key: str, where: str) -> Any:
    if key not in data:
        raise ProtocolError(f"{where}: missing field {key!r}", "missing_field")
    return data[key]


# Each reader first tries the common case (a value of exactly the right type, in range)
# and returns it as is; anything else takes the full checks, which decide and explain.
# Results arrive by the thousand a round, so this is most of the orchestrator's intake.


def integer(data: dict, key: str, where: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value = data.get(key)
    if type(value) is int and lo <= value <= hi:
        return value
    value = _get(data, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{where}: {key!r} must be an integer, got {type(value).__name__}",
                            "bad_type")
    if not lo <= value <= hi:
        raise ProtocolError(f"{where}: {key!r}={value} is outside [{lo}, {hi}]", "out_of_range")
    return value


def number(data: dict, key: str, where: str, lo: float = -1e30, hi: float = 1e30) -> float:
    value = data.get(key)
    if type(value) is float and lo <= value <= hi:  # NaN fails the comparison
        return value
    value = _get(data, key, where)
    return finite(value, f"{where}: {key!r}", lo, hi)


def finite(value: Any, what: str, lo: float = -1e30, hi: float = 1e30) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{what} must be a number, got {type(value).__name__}", "bad_type")
    value = float(value)
    if not math.isfinite(value):
        raise ProtocolError(f"{what} is not finite ({value})", "non_finite")
    if not lo <= value <= hi:
        raise ProtocolError(f"{what}={value:g} is outside [{lo:g}, {hi:g}]", "out_of_range")
    return value


def finites(values: list, what: str, lo: float = -1e30, hi: float = 1e30) -> tuple[float, ...]:
    """Every item of ``values`` as :func:`finite` reads one (a tuple of floats)."""
    # the common case in one pass; NaN compares false, so it takes the checks below
    if all(type(x) is float and lo <= x <= hi for x in values):
        return tuple(values)
    return tuple(finite(x, what, lo, hi) for x in values)


def text(data: dict, key: str, where: str, max_len: int = 256) -> str:
    value = data.get(key)
    if type(value) is str and len(value) <= max_len:
        return value
    value = _get(data, key, where)
    if not isinstance(value, str):
        raise ProtocolError(f"{where}: {key!r} must be a string, got {type(value).__name__}",
                            "bad_type")
    if len(value) > max_len:
        raise ProtocolError(f"{where}: {key!r} is longer than {max_len} characters", "too_long")
    return value


def identifier(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if type(value) is str and len(value) <= 64 and _ID.match(value):
        return value
    value = text(data, key, where, 64)
    if not _ID.match(value):
        raise ProtocolError(f"{where}: {key!r}={value!r} is not a valid id (letters, digits, "
                            "'_', '.', '-', at most 64, not starting with a symbol)", "bad_id")
    return value


def check_identifier(value: str, what: str) -> str:
    if type(value) is str and len(value) <= 64 and _ID.match(value):
        return value
    return identifier({"id": value}, "id", what)


def hexdigest(data: dict, key: str, where: str, length: int) -> str:
    value = data.get(key)
    if type(value) is str and len(value) == length and _HEX.match(value):
        return value
    value = text(data, key, where, length)
    if len(value) != length or not _HEX.match(value):
        raise ProtocolError(f"{where}: {key!r} must be {length} lowercase hex digits", "bad_hash")
    return value


def sequence(data: dict, key: str, where: str, max_len: int) -> list:
    value = data.get(key)
    if type(value) is list and len(value) <= max_len:
        return value
    value = _get(data, key, where)
    if not isinstance(value, list):
        raise ProtocolError(f"{where}: {key!r} must be a list, got {type(value).__name__}",
                            "bad_type")
    if len(value) > max_len:
        raise ProtocolError(f"{where}: {key!r} has {len(value)} items, at most {max_len}",
                            "too_long")
    return value


def mapping(data: dict, key: str, where: str) -> dict:
    value = _get(data, key, where)
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: {key!r} must be an object, got {type(value).__name__}",
                            "bad_type")
    return value


def no_extra(data: dict, allowed: set[str] | frozenset[str], where: str) -> None:
    if data.keys() <= allowed:
        return
    extra = set(data) - allowed
    if extra:
        raise ProtocolError(f"{where}: unknown field(s) {', '.join(sorted(extra))}",
                            "unknown_field")
