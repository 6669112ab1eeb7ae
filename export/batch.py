"""Freeing the batch size of a graph exported at a fixed one.

``torch.onnx.export(model, torch.randn(1, 3, 32, 32), path)`` without dynamic axes, and
many model-zoo classifiers, declare their input ``[1, 3, 224, 224]`` and bake that 1
into constants: a Reshape to ``[1, 64]`` before the classifier, an Expand of a class
token to ``[1, 1, 192]``. Such a graph fails at any other batch size. Here the input's
batch becomes the symbol ``batch``, ONNX shape inference carries it through the graph,
and the constants that pin it are rewritten, but only where the batch is proven:

* a Reshape whose target starts with the declared batch and whose input starts with
  the batch: the target's first entry becomes 0 (copy the input's batch). Reshape is
  row-major, so when input and output both start with the batch, each output row is
  exactly one sample's elements: the rewrite changes nothing at the declared size;
* an Expand whose input starts with the batch and whose shape starts with the declared
  batch (above 1): that entry becomes 1, and broadcasting keeps the batch;
* an Expand, Tile or ConstantOfShape that creates a leading dimension of the declared
  batch from a tensor without one (a class token, a zero state), where the result meets
  a batch-led value or becomes the logits: the entry becomes the batch at run time
  (``Shape(x)[0:1]``);
* a Resize whose ``sizes`` start with the declared batch and whose input starts with the
  batch: likewise;
* at a declared batch of 1, a ``[1, ...]`` input that a Concat (off axis 0) joins to
  batch-led ones, as a class token is once an exporter drops its no-op ``expand``:
  expanded to the batch at run time.

Rewriting repeats until nothing more is found, since a rewrite upstream lets inference
see the batch further down. If the logits still do not start with the batch, the first
node that takes the batch in and gives a fixed size in its place is named in the refusal.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from protocols.manifest import BATCH_ENTRY, Rewrite

from .errors import ExportError
from .names import BATCH
from .shapes import Dim, Shapes, clear_shapes, constant_values, fold, infer, show

Handler = Callable[["_Pass", onnx.NodeProto], Rewrite | None]


def make_batch_symbolic(model: onnx.ModelProto, input_name: str) -> None:
    """The input's first dimension becomes ``batch``; shapes inferred at the old size go."""
    clear_shapes(model, keep=set())
    data = next(i for i in model.graph.input if i.name == input_name)
    dims = data.type.tensor_type.shape.dim
    if dims:
        dims[0].Clear()
        dims[0].dim_param = BATCH


def free_batch(model: onnx.ModelProto, input_name: str, declared: int | None,
               head: str, fresh: Callable[[str], str]) -> tuple[Rewrite, ...]:
    """Make the batch symbolic and rewrite what pins it; refuse what cannot be proven.

    ``head`` is the value the loss reads; ``declared`` the batch size the source's input
    declares (None when it is already dynamic: then nothing is rewritten, only checked).
    """
    make_batch_symbolic(model, input_name)
    edits = _Edits(model, input_name, fresh)
    rewrites: list[Rewrite] = []
    for _ in range(len(model.graph.node) + 1):
        shapes = infer(model)
        found = _Pass(model.graph, shapes, declared, head, edits).run() if declared else []
        edits.flush()
        if not found:
            break
        rewrites += found
    check_batch_reaches(model.graph, shapes, head, declared)
    return tuple(rewrites)


def check_batch_reaches(graph: onnx.GraphProto, shapes: Shapes, head: str,
                        declared: int | None) -> None:
    """Refuse, naming the node, a graph whose batch provably stops before the logits.

    Where inference cannot tell (an unknown op, a size it cannot compute), nothing is
    refused here; the lifted graph is then run at two batch sizes.
    """
    dims = shapes.of(head)
    if dims and dims[0] == BATCH:
        return
    used = {i for node in graph.node for i in node.input} | {head}
    for node in graph.node:
        lost = _fixed_where_batch_was(node, shapes, used)
        if lost is None:
            continue
        taken, given = lost
        source = f"the source declares batch size {declared}; " if declared else ""
        raise ExportError(
            f"node {_node_name(node)!r} ({node.op_type}) takes the batch in {taken!r} "
            f"{show(shapes.of(taken))} and gives {given!r} {show(shapes.of(given))}: a fixed "
            f"size where the batch was, which cannot be proven to be the batch ({source}the "
            "hook rewrites only Reshape targets, Expand/Tile/ConstantOfShape shapes and "
            "Resize sizes whose first entry is the declared batch, and a [1, ...] input that "
            "a Concat joins to the batch). Re-export the model with a dynamic batch axis",
            "fixed_batch")


def _fixed_where_batch_was(node: onnx.NodeProto, shapes: Shapes,
                           used: set[str]) -> tuple[str, str] | None:
    """(input, output) when the node reads the batch and gives data led by a number.

    Only outputs the logits need count: a node's unused extra outputs (statistics of a
    normalization, say) have no batch by nature.
    """
    taken = next((i for i in node.input if i and BATCH in (shapes.of(i) or ())), None)
    if taken is None:
        return None
    for out in node.output:
        dims = shapes.of(out)
        if (out in used and shapes.is_data(out) and dims and BATCH not in dims
                and isinstance(dims[0], int)):
            return taken, out
    return None


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _led_by_batch(dims: tuple[Dim, ...] | None) -> bool:
    return bool(dims) and dims[0] == BATCH


class _Edits:
    """New constants and the run-time batch nodes, added to the graph between passes."""

    def __init__(self, model: onnx.ModelProto, input_name: str,
                 fresh: Callable[[str], str]) -> None:
        self.graph, self.input_name, self.fresh = model.graph, input_name, fresh
        self.batch: str | None = None  # Shape(x)[0:1], once made
        self.prefix: list[onnx.NodeProto] = []
        self.before: dict[str, list[onnx.NodeProto]] = {}  # by the output of the node after

    def constant(self, values: np.ndarray) -> str:
        """A new int64 initializer (the old one may be shared with other nodes)."""
        name = self.fresh("shape")
        self.graph.initializer.append(numpy_helper.from_array(values.astype(np.int64), name))
        return name

    def batch_then(self, rest: np.ndarray) -> str:
        """A value ``[batch, *rest]``: the batch size read from the input at run time."""
        if self.batch is None:
            shape, self.batch = self.fresh("input_shape"), self.fresh("batch_size")
            self.prefix += [
                helper.make_node("Shape", [self.input_name], [shape], name=self.fresh("shape")),
                helper.make_node("Slice", [shape, self.constant(np.array([0])),
                                           self.constant(np.array([1]))], [self.batch],
                                 name=self.fresh("batch")),
            ]
        out = self.fresh("batch_shape")
        self.prefix.append(helper.make_node("Concat", [self.batch, self.constant(rest)], [out],
                                            axis=0, name=self.fresh("batch_concat")))
        return out

    def insert_before(self, node: onnx.NodeProto, new: onnx.NodeProto) -> None:
        self.before.setdefault(node.output[0], []).append(new)

    def flush(self) -> None:
        """Add the new nodes: the run-time batch first (it reads only the input and
        constants), the others just before the node that reads them."""
        if self.prefix or self.before:
            nodes = [*self.prefix]
            for node in self.graph.node:
                nodes += [*self.before.get(node.output[0], []), node]
            del self.graph.node[:]
            self.graph.node.extend(nodes)
            self.prefix, self.before = [], {}


class _Pass:
    """One walk over the graph with one round of inferred shapes."""

    def __init__(self, graph: onnx.GraphProto, shapes: Shapes, declared: int, head: str,
                 edits: _Edits) -> None:
        self.graph, self.shapes, self.declared, self.head = graph, shapes, declared, head
        self.edits = edits
        self.constants = constant_values(graph)
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.users.setdefault(name, []).append(node)

    def run(self) -> list[Rewrite]:
        """Rewrites of this pass; a Concat's inputs only when nothing else is left, since
        an input's shape is stale here once the node that made it was rewritten."""
        found = self._each({"Reshape": _reshape, "Expand": _expand, "Tile": _tile,
                            "ConstantOfShape": _constant_of_shape, "Resize": _resize})
        return found or self._each({"Concat": _concat})

    def _each(self, handlers: dict[str, Handler]) -> list[Rewrite]:
        found = []
        for node in list(self.graph.node):
            handler = handlers.get(node.op_type)
            rewrite = handler(self, node) if handler else None
            if rewrite is not None:
                found.append(rewrite)
        return found

    def pinned(self, node: onnx.NodeProto, slot: int) -> np.ndarray | None:
        """The node's constant shape input whose first entry is the declared batch."""
        name = node.input[slot] if len(node.input) > slot else ""
        if name and name not in self.constants:
            folded = fold(self.graph, name, self.constants)
            if folded is not None:
                self.constants[name] = folded
        values = self.constants.get(name)
        if values is None or values.ndim != 1 or not len(values) or values[0] != self.declared:
            return None
        return values.astype(np.int64)

    def meets_batch(self, value: str) -> bool:
        """Does ``value`` (led by the declared batch) flow into the logits or meet the batch?

        Followed through nodes that keep its leading size; it meets the batch at a node
        that also takes a batch-led value, where the two leading sizes must agree.
        """
        todo, seen = [value], set()
        while todo:
            name = todo.pop()
            if name == self.head:
                return True
            seen.add(name)
            for node in self.users.get(name, []):
                if any(i != name and _led_by_batch(self.shapes.of(i)) for i in node.input if i):
                    return True
                todo += [o for o in node.output if o and o not in seen
                         and (self.shapes.of(o) or (None,))[0] == self.declared]
        return False

    def record(self, node: onnx.NodeProto, old: np.ndarray, new: list) -> Rewrite:
        return Rewrite(_node_name(node), node.op_type, tuple(int(v) for v in old),
                       tuple(v if v == BATCH_ENTRY else int(v) for v in new))

    def at_run_time(self, node: onnx.NodeProto, slot: int, old: np.ndarray) -> Rewrite:
        node.input[slot] = self.edits.batch_then(old[1:])
        return self.record(node, old, [BATCH_ENTRY, *old[1:]])

    def replace(self, node: onnx.NodeProto, slot: int, old: np.ndarray,
                first: int) -> Rewrite:
        new = old.copy()
        new[0] = first
        node.input[slot] = self.edits.constant(new)
        return self.record(node, old, list(new))


def _reshape(p: _Pass, node: onnx.NodeProto) -> Rewrite | None:
    """Target ``[B, ...]`` of a batch-led input: ``[0, ...]`` copies the batch."""
    target = p.pinned(node, 1)
    if target is None or not _led_by_batch(p.shapes.of(node.input[0])):
        return None
    allowzero = next((a for a in node.attribute if a.name == "allowzero"), None)
    if allowzero is not None and allowzero.i:
        if 0 in target[1:]:
            return None  # a literal zero-size dimension: 0 cannot mean "copy" here
        allowzero.i = 0  # the same meaning for a target without zeros, and 0 now copies
    return p.replace(node, 1, target, 0)


def _expand(p: _Pass, node: onnx.NodeProto) -> Rewrite | None:
    shape, dims = p.pinned(node, 1), p.shapes.of(node.input[0])
    if shape is None or dims is None or len(shape) < len(dims):
        return None
    lead = dims[0] if len(shape) == len(dims) else 1
    if lead == BATCH:  # broadcasting against 1 keeps the batch
        return p.replace(node, 1, shape, 1) if p.declared != 1 else None
    if lead == 1 and p.meets_batch(node.output[0]):
        return p.at_run_time(node, 1, shape)
    return None


def _tile(p: _Pass, node: onnx.NodeProto) -> Rewrite | None:
    repeats, dims = p.pinned(node, 1), p.shapes.of(node.input[0])
    if repeats is None or not dims or dims[0] != 1 or not p.meets_batch(node.output[0]):
        return None
    return p.at_run_time(node, 1, repeats)


def _constant_of_shape(p: _Pass, node: onnx.NodeProto) -> Rewrite | None:
    shape = p.pinned(node, 0)
    if shape is None or not p.meets_batch(node.output[0]):
        return None
    return p.at_run_time(node, 0, shape)


def _resize(p: _Pass, node: onnx.NodeProto) -> Rewrite | None:
    sizes = p.pinned(node, 3)
    if sizes is None or not _led_by_batch(p.shapes.of(node.input[0])):
        return None
    return p.at_run_time(node, 3, sizes)



def _concat(p: _Pass, node: onnx.NodeProto) -> Rewrite | None:
    """A ``[1, ...]`` input joined to batch-led ones on another axis: expanded to the batch.

    A Concat off axis 0 needs every input's first dimension equal, so at the declared
    batch of 1 a leading 1 beside the batch was the batch: a class token that the exporter
    folded into a constant, where ``expand`` was a no-op at batch 1.
    """
    dims = [p.shapes.of(i) for i in node.input]
    if p.declared != 1 or not any(_led_by_batch(d) for d in dims) or any(d is None for d in dims):
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    slot = next((k for k, d in enumerate(dims) if d and d[0] == 1), None)
    if slot is None or axis % len(dims[slot]) == 0:
        return None
    old = [d if isinstance(d, int) else -1 for d in dims[slot]]
    expanded = p.edits.fresh("expanded")
    p.edits.insert_before(node, helper.make_node(
        "Expand", [node.input[slot], p.edits.batch_then(np.ones(len(old) - 1, np.int64))],
        [expanded], name=p.edits.fresh("expand_to_batch")))
    node.input[slot] = expanded
    return p.record(node, np.array(old), [BATCH_ENTRY, *old[1:]])
