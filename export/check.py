"""Checks that an exported graph has the contract's form, with no trainable weight baked in.

A trainable weight left inside the graph as a constant would make every perturbation
of it a no-op on the device: ZO rounds would run, and that part of the model would
silently never train. So after every export the graph is checked three ways: its
inputs are exactly ``x, y, *parameters`` in manifest order with the right shapes; no
initializer bears a parameter's name; and its float constants neither exceed what the
frozen part of the model accounts for nor equal any trainable tensor's bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from protocols.manifest import Manifest

from .errors import ExportError

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE,
                         TensorProto.BFLOAT16})
# Decompositions add small constants of their own (GroupNorm's unit scales, eps values).
CONSTANT_SLACK = 4096


def subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes (If, Loop, Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from subgraphs(g)


def float_constants(graph: onnx.GraphProto) -> Iterator[tuple[str, TensorProto]]:
    """Every float tensor stored in the graph: initializers and Constant node values."""
    for g in subgraphs(graph):
        for init in g.initializer:
            if init.data_type in FLOAT_TYPES:
                yield init.name, init
        for node in g.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.t.data_type in FLOAT_TYPES:
                        yield node.output[0], attr.t


def tensor_size(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64))


def check_io(model: onnx.ModelProto, manifest: Manifest) -> None:
    """Inputs ``x, y, *parameters`` in manifest order with their shapes; outputs as named."""
    g = model.graph
    want = [manifest.input_name, manifest.label_name, *(p.name for p in manifest.parameters)]
    got = [i.name for i in g.input]
    if got != want:
        raise ExportError(f"graph inputs {_short(got)} are not x, y and the parameters in "
                          f"manifest order {_short(want)}")
    x, y, *params = g.input
    _check_value(x, TensorProto.FLOAT, (None, *manifest.input_shape))
    _check_value(y, TensorProto.INT64, (None,))
    for value, param in zip(params, manifest.parameters, strict=True):
        _check_value(value, TensorProto.FLOAT, param.shape)
    outputs = [(o.name, o.type.tensor_type.elem_type) for o in g.output]
    if outputs != [(manifest.outputs[0], TensorProto.FLOAT),
                   (manifest.outputs[1], TensorProto.INT64)]:
        raise ExportError(f"graph outputs {outputs} are not (loss: float, correct: int64)")


def _check_value(value: onnx.ValueInfoProto, dtype: int, shape: tuple) -> None:
    tt = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    if tt.elem_type != dtype or dims != tuple(shape):
        raise ExportError(f"graph input {value.name!r} is {TensorProto.DataType.Name(tt.elem_type)}"
                          f"{list(dims)}, expected {TensorProto.DataType.Name(dtype)}"
                          f"{list(shape)} (None = the dynamic batch)")


def check_no_baked_weights(model: onnx.ModelProto, manifest: Manifest,
                           tensors: Sequence[np.ndarray], constant_budget: int) -> int:
    """Refuse a graph holding a trainable weight as a constant; returns its float constants.

    ``constant_budget`` is how many float elements the frozen part of the model may
    legitimately hold (frozen parameters, normalization statistics).
    """
    trainable = {p.name for p in manifest.parameters}
    clash = sorted(trainable & {name for g in subgraphs(model.graph) for name in
                                (i.name for i in g.initializer)})
    if clash:
        raise ExportError(f"trainable parameters are also initializers: {_short(clash)}")
    constants = list(float_constants(model.graph))
    total = sum(tensor_size(t) for _, t in constants)
    if total > constant_budget + CONSTANT_SLACK:
        raise ExportError(f"the graph holds {total:,} float constant elements, but the frozen "
                          f"part of the model accounts for {constant_budget:,}: trainable "
                          "weights were probably baked in")
    prints = _fingerprints(manifest, tensors)
    for name, t in constants:
        owner = prints.get((tensor_size(t), _digest(numpy_helper.to_array(t))))
        if owner is not None:
            raise ExportError(f"graph constant {name!r} holds the values of trainable "
                              f"parameter {owner!r}: it would never be perturbed")
    return total


def _fingerprints(manifest: Manifest, tensors: Sequence[np.ndarray]) -> dict:
    """Digests of each informative trainable tensor (and its transpose, as Gemm folds it)."""
    out = {}
    for param, t in zip(manifest.parameters, tensors, strict=True):
        t = np.asarray(t, dtype=np.float32)
        if t.size < 2 or np.all(t == t.flat[0]):
            continue  # constant-valued tensors (fresh norm scales) are not evidence
        out[(t.size, _digest(t))] = param.name
        if t.ndim == 2:
            out[(t.size, _digest(t.T))] = param.name
    return out


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def _short(names: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}] ({len(names)})"
