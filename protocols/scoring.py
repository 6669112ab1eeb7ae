"""The black-box scoring API: what a device sends a frozen model's owner, and what comes back.

A black box answers one question: for these inputs and labels, what are the mean
cross-entropy and the number of correct predictions? Its weights never leave the owner.
This module is the wire format and its checks, without I/O, so the agent's client
(``edge_agent/blackbox.py``) and the owner's endpoint (``zowarmup serve-model``) share one
definition:

* ``POST /v1/score`` with ``Authorization: Bearer KEY`` and ``X-Zowarmup-Device: ID``;
  the body is JSON ``{"inputs": ARRAY, "labels": ARRAY}`` where an ARRAY is
  ``{"dtype", "shape", "data"}`` with ``data`` the base64 of the little-endian bytes.
* The answer is JSON ``{"loss", "correct", "count", "queries", "budget_left"}``
  (``budget_left`` is -1 without a budget); a refusal is an HTTP error status with
  ``{"error": CODE, "detail": TEXT}``.
* ``GET /v1/info`` answers the :class:`BlackBoxSpec`: what inputs the model takes.

The spec is also the ``blackbox.json`` file of a black-box directory, next to the frozen
graph (inputs ``x`` and ``y``, outputs ``loss`` and ``correct``, every weight a constant).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from . import validate as v
from .errors import ProtocolError

SPEC_FILE = "blackbox.json"
FORMAT = "zowarmup-blackbox"
FORMAT_VERSION = 1
DEVICE_HEADER = "X-Zowarmup-Device"
DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
MAX_BATCH = 4096


@dataclass(frozen=True)
class BlackBoxSpec:
    """What a black box takes: inputs of ``input_dtype`` shaped ``(batch, *input_shape)``.

    ``input_range`` bounds integer inputs (token ids: ``[0, vocabulary)``); ``[]`` for floats.
    """

    name: str
    input_dtype: str
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...] = ()
    input_range: tuple[int, ...] = ()
    graph: str = "model.onnx"
    files: dict = field(default_factory=dict)  # name -> {"sha256", "bytes"}

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                           **asdict(self)}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, raw: bytes | str) -> BlackBoxSpec:
        data = v.json_object(raw, "black-box spec", 1 << 20)
        w = "black-box spec"
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise ProtocolError(f"{w}: not a {FORMAT} v{FORMAT_VERSION} file", "bad_format")
        dtype = v.text(data, "input_dtype", w, 16)
        if dtype not in DTYPES:
            raise ProtocolError(f"{w}: input_dtype {dtype!r} is not one of {sorted(DTYPES)}",
                                "bad_dtype")
        shape = tuple(_dim(d, w) for d in v.sequence(data, "input_shape", w, 8))
        bounds = tuple(int(b) for b in v.sequence(data, "input_range", w, 2))
        if bounds and (len(bounds) != 2 or bounds[0] >= bounds[1]):
            raise ProtocolError(f"{w}: input_range must be [low, high) or []", "bad_range")
        return cls(v.text(data, "name", w, 128), dtype, shape,
                   v.integer(data, "num_classes", w, 2, 1_000_000),
                   tuple(str(c) for c in v.sequence(data, "class_names", w, 1_000_000)),
                   bounds, v.text(data, "graph", w, 128), v.mapping(data, "files", w))


def _dim(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
        raise ProtocolError(f"{where}: input_shape holds positive integers", "bad_shape")
    return value


# --- arrays on the wire ------------------------------------------------------------------


def array_to_wire(array: np.ndarray, dtype: str) -> dict:
    data = np.ascontiguousarray(array, dtype=DTYPES[dtype])
    return {"dtype": dtype, "shape": list(data.shape),
            "data": base64.b64encode(data.tobytes()).decode("ascii")}


def array_from_wire(d: object, where: str, dtype: str, max_elements: int) -> np.ndarray:
    """An array of exactly ``dtype``, its shape and byte count checked before decoding."""
    if not isinstance(d, dict):
        raise ProtocolError(f"{where} must be an object with dtype, shape and data", "bad_type")
    v.no_extra(d, {"dtype", "shape", "data"}, where)
    got = v.text(d, "dtype", where, 16)
    if got != dtype:
        raise ProtocolError(f"{where}: dtype {got!r}, the model takes {dtype!r}", "bad_dtype")
    shape = tuple(_dim(x, where) for x in v.sequence(d, "shape", where, 8))
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count > max_elements:
        raise ProtocolError(f"{where}: {count} elements, at most {max_elements}", "too_big")
    text = v.text(d, "data", where, 4 * (count * DTYPES[dtype].itemsize + 2) // 3 + 4)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{where}: data is not base64", "bad_data") from None
    if len(raw) != count * DTYPES[dtype].itemsize:
        raise ProtocolError(f"{where}: {len(raw)} bytes of data for shape {list(shape)}",
                            "bad_data")
    return np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape)


# --- requests and replies -------------------------------------------------------------------


def encode_request(inputs: np.ndarray, labels: np.ndarray, spec: BlackBoxSpec) -> bytes:
    return json.dumps({"inputs": array_to_wire(inputs, spec.input_dtype),
                       "labels": array_to_wire(labels, "int64")}).encode()


def decode_request(body: bytes, spec: BlackBoxSpec, max_batch: int = MAX_BATCH
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The inputs and labels of a score request, every field checked against the spec."""
    data = v.json_object(body, "score request", len(body))
    v.no_extra(data, {"inputs", "labels"}, "score request")
    sample = int(np.prod(spec.input_shape, dtype=np.int64))
    x = array_from_wire(data.get("inputs"), "inputs", spec.input_dtype, max_batch * sample)
    y = array_from_wire(data.get("labels"), "labels", "int64", max_batch)
    if x.ndim != len(spec.input_shape) + 1 or x.shape[1:] != spec.input_shape:
        raise ProtocolError(f"inputs: shape {list(x.shape)}, the model takes [batch, "
                            f"{', '.join(map(str, spec.input_shape))}]", "bad_shape")
    if y.shape != (x.shape[0],):
        raise ProtocolError(f"labels: shape {list(y.shape)}, expected [{x.shape[0]}]: one "
                            "label per input", "bad_shape")
    if y.min() < 0 or y.max() >= spec.num_classes:
        raise ProtocolError(f"labels span [{y.min()}, {y.max()}], the model has "
                            f"{spec.num_classes} classes", "bad_label")
    _check_values(x, spec)
    return x, y


def _check_values(x: np.ndarray, spec: BlackBoxSpec) -> None:
    if spec.input_dtype == "float32":
        if not np.isfinite(x).all():
            raise ProtocolError("inputs hold NaN or infinite values", "non_finite")
        if np.abs(x).max() > 1e6:
            raise ProtocolError("inputs hold values beyond 1e6 in size", "out_of_range")
    elif spec.input_range and (x.min() < spec.input_range[0] or x.max() >= spec.input_range[1]):
        raise ProtocolError(f"inputs span [{x.min()}, {x.max()}], the model takes "
                            f"[{spec.input_range[0]}, {spec.input_range[1]})", "out_of_range")


@dataclass(frozen=True)
class ScoreReply:
    loss: float
    correct: int
    count: int
    queries: int  # this device's queries so far, this one included
    budget_left: int = -1  # -1: no budget

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ScoreReply:
        data = v.json_object(raw, "score reply", 1 << 16)
        w = "score reply"
        v.no_extra(data, {"loss", "correct", "count", "queries", "budget_left"}, w)
        count = v.integer(data, "count", w, 1, 1 << 40)
        return cls(v.number(data, "loss", w, 0.0, 1e30), v.integer(data, "correct", w, 0, count),
                   count, v.integer(data, "queries", w, 0, 1 << 62),
                   v.integer(data, "budget_left", w, -1, 1 << 62))


def error_body(code: str, detail: str) -> bytes:
    return json.dumps({"error": code, "detail": detail}).encode()


def decode_error(raw: bytes) -> tuple[str, str]:
    """The refusal's code and text, or a generic pair when the body is not ours."""
    try:
        data = v.json_object(raw, "error", 1 << 16)
        return str(data.get("error", "refused"))[:64], str(data.get("detail", ""))[:2048]
    except ProtocolError:
        return "refused", raw[:200].decode("utf-8", "replace")
