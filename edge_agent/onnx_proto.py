"""Just enough of the ONNX file format to read a graph's initializers and lift some to inputs.

The agent must not depend on the ``onnx`` package (it is an orchestrator extra), yet it
needs to edit one graph: the one ONNX Runtime optimised for this CPU (``native.py``). An
ONNX file is a protobuf ``ModelProto``; the few fields used here are:

    ModelProto.graph = 7                       GraphProto
    GraphProto.initializer = 5 (repeated)      TensorProto
    GraphProto.input = 11 (repeated)           ValueInfoProto
    TensorProto.dims = 1, data_type = 2, float_data = 4, name = 8, raw_data = 9,
                external_data = 13 (key = 1, value = 2), data_location = 14
    ValueInfoProto.name = 1, type = 2 -> TypeProto.tensor_type = 1
                -> elem_type = 1, shape = 2 -> dim = 1 -> dim_value = 1

Every other field is copied through byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from protocols.errors import ZoError

FLOAT = 1  # TensorProto.DataType.FLOAT


class OnnxFileError(ZoError):
    """An ONNX file this reader cannot parse."""


@dataclass
class Initializer:
    name: str
    dims: tuple[int, ...]
    data_type: int
    raw: tuple[int, int] | None = None  # (start, end) of raw_data or packed float_data
    external: dict[str, str] = field(default_factory=dict)  # location, offset, length


def _varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(data):
            raise OnnxFileError("truncated varint")
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i
        if shift > 63:
            raise OnnxFileError("varint longer than 64 bits")


def _fields(data: bytes, start: int = 0, end: int | None = None
            ) -> Iterator[tuple[int, int, int, object]]:
    """(field number, start of the field's bytes, end, value) for each field in a message.

    The value is an int for varints, a (start, end) span for length-delimited fields, and
    None for fixed-width ones.
    """
    i, end = start, len(data) if end is None else end
    while i < end:
        first = i
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        value: object = None
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _varint(data, i)
            value = (i, i + length)
            i += length
        else:
            raise OnnxFileError(f"unsupported protobuf wire type {wire}")
        if i > end:
            raise OnnxFileError("field runs past the end of its message")
        yield number, first, i, value


def _text(data: bytes, span: tuple[int, int]) -> str:
    return bytes(data[span[0]:span[1]]).decode("utf-8")


def _graph_span(data: bytes) -> tuple[int, int]:
    for number, _, _, value in _fields(data):
        if number == 7:
            return value  # type: ignore[return-value]
    raise OnnxFileError("the file holds no graph")


def _tensor(data: bytes, span: tuple[int, int]) -> Initializer:
    tensor = Initializer("", (), 0)
    dims: list[int] = []
    for number, _, _, value in _fields(data, *span):
        if number == 1:
            if isinstance(value, int):
                dims.append(value)
            else:  # packed
                i, end = value  # type: ignore[misc]
                while i < end:
                    d, i = _varint(data, i)
                    dims.append(d)
        elif number == 2:
            tensor.data_type = int(value)  # type: ignore[arg-type]
        elif number == 8:
            tensor.name = _text(data, value)  # type: ignore[arg-type]
        elif number == 9 or (number == 4 and isinstance(value, tuple)):
            tensor.raw = value  # type: ignore[assignment]
        elif number == 13:
            entry = {n: _text(data, v) for n, _, _, v in _fields(data, *value)}  # type: ignore[misc]
            tensor.external[entry.get(1, "")] = entry.get(2, "")
    tensor.dims = tuple(dims)
    return tensor


def initializers(data: bytes) -> list[Initializer]:
    """The graph's initializers, with where each one's data lies."""
    return [_tensor(data, value) for number, _, _, value in _fields(data, *_graph_span(data))
            if number == 5]  # type: ignore[arg-type]


# --- writing -----------------------------------------------------------------------------

def _put_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _put_varint(number << 3 | 2) + _put_varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _put_varint(number << 3) + _put_varint(value)


def tensor_input(name: str, dims: tuple[int, ...], elem_type: int = FLOAT) -> bytes:
    """A ValueInfoProto for a graph input of fixed shape."""
    shape = b"".join(_bytes_field(1, _int_field(1, d)) for d in dims)
    tensor_type = _int_field(1, elem_type) + _bytes_field(2, shape)
    return _bytes_field(1, name.encode()) + _bytes_field(2, _bytes_field(1, tensor_type))


def lift(data: bytes, to_inputs: dict[str, tuple[int, ...]], inline: dict[str, bytes]) -> bytes:
    """The model with the named initializers turned into graph inputs of the given shapes,
    and the ``inline`` ones' external data embedded as raw data."""
    graph = bytearray()
    g_start, g_end = _graph_span(data)
    for number, first, last, value in _fields(data, g_start, g_end):
        if number == 5:
            tensor = _tensor(data, value)  # type: ignore[arg-type]
            if tensor.name in to_inputs:
                continue
            if tensor.name in inline:
                kept = b"".join(bytes(data[f:e]) for n, f, e, _ in _fields(data, *value)  # type: ignore[misc]
                                if n not in (9, 13, 14))
                graph += _bytes_field(5, kept + _bytes_field(9, inline[tensor.name]))
                continue
        graph += data[first:last]
    for name, dims in to_inputs.items():
        graph += _bytes_field(11, tensor_input(name, dims))
    model = bytearray()
    for number, first, last, _ in _fields(data):
        model += _bytes_field(7, bytes(graph)) if number == 7 else data[first:last]
    return bytes(model)
