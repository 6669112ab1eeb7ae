"""What ONNX shape inference says about a graph, in a form the hook can reason with.

The hook proves things about the batch dimension from shapes: a graph input declared
``[batch, 3, 32, 32]`` makes inference carry the symbol ``batch`` into every value
whose leading dimension is the batch, and a value where a fixed number took its place
shows where a graph pins its batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from .check import FLOAT_TYPES, subgraphs, tensor_size
from .surgery import producers

Dim = int | str | None  # a size, a symbol, or unknown
SMALL_WEIGHT = 64  # float initializers up to this size go to inference with their values
INTEGER_TYPES = frozenset({TensorProto.INT64, TensorProto.INT32, TensorProto.INT16,
                           TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL})


@dataclass(frozen=True)
class Shapes:
    """Each value's dimensions (None where even the rank is unknown) and element type."""

    dims: dict[str, tuple[Dim, ...] | None]
    types: dict[str, int]

    def of(self, name: str) -> tuple[Dim, ...] | None:
        return self.dims.get(name)

    def is_data(self, name: str) -> bool:
        """A value that is not integer-typed: not a shape or an index computation."""
        return self.types.get(name, TensorProto.UNDEFINED) not in INTEGER_TYPES


def value_dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    tt = value.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in tt.shape.dim)


def infer(model: onnx.ModelProto) -> Shapes:
    """Shapes of every value, symbols carried through shape arithmetic (data propagation).

    Where inference fails outright, the shapes the model declares are all there is.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(_weights_as_types(model), strict_mode=False,
                                                     data_prop=True)
    except Exception:  # inference failing outright proves nothing: keep what is declared
        inferred = model
    g = inferred.graph
    dims: dict[str, tuple[Dim, ...] | None] = {}
    types: dict[str, int] = {}
    for v in (*g.input, *g.value_info, *g.output):
        dims[v.name] = value_dims(v)
        types[v.name] = v.type.tensor_type.elem_type
    for init in g.initializer:
        dims[init.name] = tuple(int(d) for d in init.dims)
        types[init.name] = init.data_type
    return Shapes(dims, types)


def _weights_as_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large float initializers declared as typed inputs instead.

    Inference reads their shapes, never their values, and it serializes the model each
    time: a ResNet-18's 44 MB of weights would cost more than the inference itself.
    """
    g = model.graph
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.graph.name = g.name
    light.graph.node.extend(g.node)
    for field in ("input", "output", "value_info"):
        getattr(light.graph, field).extend(getattr(g, field))
    declared = {i.name for i in g.input}
    for init in g.initializer:
        if init.data_type not in FLOAT_TYPES or tensor_size(init) <= SMALL_WEIGHT:
            light.graph.initializer.append(init)
        elif init.name not in declared:
            light.graph.input.append(onnx.helper.make_tensor_value_info(
                init.name, init.data_type, list(init.dims)))
    return light


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Integer constants of the main graph by name: initializers and Constant nodes."""
    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer
           if i.data_type in INTEGER_TYPES}
    for node in graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1:
            continue
        attr = node.attribute[0]
        if attr.name == "value" and attr.t.data_type in INTEGER_TYPES:
            out[node.output[0]] = numpy_helper.to_array(attr.t)
        elif attr.name == "value_ints":
            out[node.output[0]] = np.array(list(attr.ints), np.int64)
        elif attr.name == "value_int":
            out[node.output[0]] = np.array(attr.i, np.int64)
    return out


def fold(graph: onnx.GraphProto, name: str, constants: dict[str, np.ndarray],
         limit: int = 64) -> np.ndarray | None:
    """The value of ``name`` when only constants feed it (a shape an exporter computed).

    The legacy torch exporter leaves ``Where(Equal(shape, -1), ones, shape)`` chains for
    ``expand(1, -1, -1)``; evaluated once here, they are constants like any other.
    None when a graph input feeds it, or the chain is longer than ``limit`` nodes.
    """
    made_by = producers(graph)
    inits = {i.name: i for i in graph.initializer}
    needed, todo, seen = [], [name], set()
    while todo:
        value = todo.pop()
        if value in seen or value in inits or value in constants:
            continue
        seen.add(value)
        node = made_by.get(value)
        if node is None or len(needed) >= limit:
            return None  # a graph input (or too far to be a shape computation)
        needed.append(node)
        todo += [i for i in node.input if i]
    order = [node for node in graph.node if any(node is n for n in needed)]
    used = {i for node in order for i in node.input}
    model = onnx.helper.make_model(onnx.helper.make_graph(
        order, "fold", [], [onnx.helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None)],
        [inits[n] for n in used if n in inits]
        + [numpy_helper.from_array(constants[n], n) for n in used if n in constants]))
    try:
        value = ReferenceEvaluator(model).run(None, {})[0]
    except Exception:  # an op the reference cannot run: not a constant to us
        return None
    return np.asarray(value) if np.asarray(value).dtype.kind in "iu" else None


def clear_shapes(model: onnx.ModelProto, keep: set[str]) -> None:
    """Forget inferred and declared shapes (but the names in ``keep``): they may be stale."""
    for g in subgraphs(model.graph):
        del g.value_info[:]
    for out in model.graph.output:
        if out.name not in keep:
            out.type.tensor_type.ClearField("shape")


def show(dims: tuple[Dim, ...] | None) -> str:
    return "[?]" if dims is None else "[" + ", ".join("?" if d is None else str(d)
                                                     for d in dims) + "]"
