"""What the loss head of a lifted classifier reads: logits, however the source ends.

The head is ``SoftmaxCrossEntropyLoss`` on ``[N, C]`` logits. Sources end otherwise:

* ``[N, C, 1, 1]`` from a 1x1-convolution head with no Flatten: flattened to ``[N, C]``
  (``squeezed``);
* a final Softmax or LogSoftmax over the classes: the head reads its input, the logits
  themselves (``softmax-input``). Cross-entropy of the softmax of ``z`` is cross-entropy
  on ``z``, so this is exact and avoids the log of a probability that underflowed;
* a Softmax whose input is not ``[N, C]`` logits (shape operations in between): the log
  of the probabilities, clamped at the smallest normal float32 so that a probability of
  0 gives a large loss, not an infinite one (``log-probabilities``). A LogSoftmax output
  is read as it is: log-probabilities are logits whose softmax is the probabilities.

Shape-only operations (Identity, Flatten, Reshape, Squeeze) between the Softmax and the
output are looked through. The manifest's ``logits_from`` says which case applied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .shapes import Dim, Shapes
from .surgery import producers

SHAPE_ONLY = frozenset({"Identity", "Flatten", "Reshape", "Squeeze"})
SOFTMAX = frozenset({"Softmax", "LogSoftmax"})
TINY = np.finfo(np.float32).tiny


@dataclass(frozen=True)
class Head:
    """The logits the loss reads, and how ``--verify``'s reference gets the same values."""

    value: str  # in the lifted graph: [N, C] logits
    logits_from: str  # the manifest's word for the case (protocols.manifest.LOGITS_FROM)
    reference_value: str  # in the source graph: what the reference reads (flattened to [N, C])
    reference_log: bool  # the reference takes the log of it (probabilities)


def is_logits_shape(dims: tuple[Dim, ...] | None) -> bool:
    """``[N, C]``, or ``[N, C, 1, ...]``: classes on axis 1 and nothing else per sample."""
    return dims is not None and len(dims) >= 2 and all(d == 1 for d in dims[2:])


def build_head(graph: onnx.GraphProto, output: str, shapes: Shapes,
               fresh: Callable[[str], str], source_values: set[str]) -> Head:
    """Find what the loss should read from ``output``, adding a Flatten or Log if needed.

    ``source_values`` are the value names of the source graph as the user gave it: the
    reference reads the Softmax's input there when it exists (an opset upgrade may have
    made a new one).
    """
    softmax = final_softmax(graph, output)
    if softmax is not None and _over_classes(softmax, shapes.of(softmax.input[0])):
        logits = softmax.input[0]
        seen = _as_in_source(graph, logits, shapes, source_values)
        return Head(_flat(graph, logits, shapes, fresh), "softmax-input", seen or output,
                    seen is None and softmax.op_type == "Softmax")
    if softmax is not None and softmax.op_type == "Softmax":
        clamped, log = fresh("clamped_probabilities"), fresh("log_probabilities")
        tiny = fresh("tiny")
        graph.initializer.append(numpy_helper.from_array(np.array(TINY, np.float32), tiny))
        graph.node.extend([
            helper.make_node("Max", [output, tiny], [clamped], name=fresh("clamp")),
            helper.make_node("Log", [clamped], [log], name=fresh("log")),
        ])
        return Head(_flat(graph, log, shapes, fresh, like=output), "log-probabilities",
                    output, True)
    if softmax is not None:  # LogSoftmax over something else: log-probabilities as they are
        return Head(_flat(graph, output, shapes, fresh), "log-probabilities", output, False)
    flat = _flat(graph, output, shapes, fresh)
    return Head(flat, "squeezed" if flat != output else "", output, False)


def final_softmax(graph: onnx.GraphProto, output: str) -> onnx.NodeProto | None:
    """The Softmax or LogSoftmax that makes ``output``, looking through shape-only nodes."""
    made_by = producers(graph)
    node = made_by.get(output)
    while node is not None and node.op_type in SHAPE_ONLY:
        node = made_by.get(node.input[0])
    return node if node is not None and node.op_type in SOFTMAX else None


def _as_in_source(graph: onnx.GraphProto, value: str, shapes: Shapes,
                  source_values: set[str]) -> str | None:
    """``value``, or the logits it reshapes, by a name the source graph has.

    An opset upgrade puts a Flatten of ``[N, C, 1, 1]`` before a Softmax; the reference
    then reads the unflattened logits, not the log of the probabilities.
    """
    made_by = producers(graph)
    while value not in source_values:
        node = made_by.get(value)
        if node is None or node.op_type not in SHAPE_ONLY or not is_logits_shape(
                shapes.of(node.input[0])):
            return None
        value = node.input[0]
    return value


def _over_classes(node: onnx.NodeProto, dims: tuple[Dim, ...] | None) -> bool:
    """Is the softmax taken over axis 1 of logits ``[N, C]`` or ``[N, C, 1, 1]``?

    The graph is opset 13 or newer here (the hook upgrades older ones), where the axis
    defaults to -1 and is the only axis normalized over.
    """
    if not is_logits_shape(dims):
        return False
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    return axis % len(dims) == 1


def _flat(graph: onnx.GraphProto, value: str, shapes: Shapes, fresh: Callable[[str], str],
          like: str | None = None) -> str:
    """``value`` as ``[N, C]``: a Flatten after it when its shape is ``[N, C, 1, ...]``."""
    dims = shapes.of(like or value)
    if dims is None or len(dims) <= 2:
        return value
    flat = fresh("flat_logits")
    graph.node.append(helper.make_node("Flatten", [value], [flat], axis=1,
                                       name=fresh("flatten_logits")))
    return flat
