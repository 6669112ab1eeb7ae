"""Small edits on ONNX graphs, done with the plain protobuf and ``onnx.helper`` API.

The hook needs only a handful: rename values everywhere, turn weight-holding Constant
nodes into initializers, drop what an output does not depend on, mark the batch
dimension dynamic, and append the loss head every exported graph ends with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from .check import FLOAT_TYPES, subgraphs, tensor_size
from .names import BATCH


def node_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """A node's inputs, then every name its subgraphs read (outer-scope values included)."""
    yield from (i for i in node.input if i)
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in subgraphs(g):
                for inner in sub.node:
                    yield from (i for i in inner.input if i)


def value_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name used anywhere in the graph and its subgraphs."""
    names: set[str] = set()
    for g in subgraphs(graph):
        names.update(v.name for v in (*g.input, *g.output, *g.value_info, *g.initializer))
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


def rename_values(graph: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    """Rename values wherever they appear (names are unique across nested graphs)."""
    if not mapping:
        return
    for g in subgraphs(graph):
        for v in (*g.input, *g.output, *g.value_info, *g.initializer):
            v.name = mapping.get(v.name, v.name)
        for node in g.node:
            for field in (node.input, node.output):
                for i, name in enumerate(field):
                    field[i] = mapping.get(name, name)


def constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Move float Constant nodes of 2+ elements (weights, for some exporters) to initializers.

    Returns how many moved, so the hook treats weights the same however they were stored.
    """
    kept, moved = [], 0
    for node in graph.node:
        attr = node.attribute[0] if len(node.attribute) == 1 else None
        if (node.op_type == "Constant" and attr is not None and attr.name == "value"
                and attr.t.data_type in FLOAT_TYPES and tensor_size(attr.t) >= 2):
            tensor = TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            moved += 1
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return moved


def prune(graph: onnx.GraphProto, outputs: list[str]) -> None:
    """Keep only the nodes and initializers that ``outputs`` depend on (graph is topological)."""
    needed = set(outputs)
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def first_uses(graph: onnx.GraphProto) -> list[str]:
    """Names in the order nodes first read them: the deterministic order of the weights."""
    seen: dict[str, None] = {}
    for node in graph.node:
        for name in node_inputs(node):
            seen.setdefault(name, None)
    return list(seen)


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """For each value of the main graph made by a node: that node."""
    return {o: node for node in graph.node for o in node.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[str, int]]]:
    """For each value: the (op_type, input slot) pairs that read it."""
    out: dict[str, list[tuple[str, int]]] = {}
    for g in subgraphs(graph):
        for node in g.node:
            for slot, name in enumerate(node.input):
                out.setdefault(name, []).append((node.op_type, slot))
    return out


def tensor_value(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def append_loss_head(graph: onnx.GraphProto, logits: str, label: str,
                     fresh: Callable[[str], str], outputs: tuple[str, str]) -> None:
    """Add ``loss`` (mean cross-entropy) and ``correct`` (argmax == label count) outputs."""
    loss, correct = outputs
    pred, hit, hits = fresh("pred"), fresh("hit"), fresh("hits")
    graph.node.extend([
        helper.make_node("SoftmaxCrossEntropyLoss", [logits, label], [loss],
                         reduction="mean", name=fresh("loss_node")),
        helper.make_node("ArgMax", [logits], [pred], axis=1, keepdims=0, name=fresh("argmax")),
        helper.make_node("Equal", [pred, label], [hit], name=fresh("equal")),
        helper.make_node("Cast", [hit], [hits], to=TensorProto.INT64, name=fresh("cast")),
        helper.make_node("ReduceSum", [hits], [correct], keepdims=0, name=fresh("count")),
    ])
    del graph.output[:]
    graph.output.extend([tensor_value(loss, TensorProto.FLOAT, []),
                         tensor_value(correct, TensorProto.INT64, [])])


def batch_shape(sample_shape: tuple[int, ...]) -> list:
    return [BATCH, *sample_shape]


def fresh_namer(taken: set[str], prefix: str = "zowarmup_") -> Callable[[str], str]:
    """A function giving new value names that clash with nothing in ``taken``."""

    def fresh(stem: str) -> str:
        name, n = f"{prefix}{stem}", 2
        while name in taken:
            name, n = f"{prefix}{stem}_{n}", n + 1
        taken.add(name)
        return name

    return fresh


def float32_array(tensor: TensorProto) -> np.ndarray:
    return np.ascontiguousarray(onnx.numpy_helper.to_array(tensor), dtype=np.float32)
