"""Lift a third-party ONNX classifier into the exported form (``zowarmup export hook``).

The source is any graph with one float input and a logits-like output: ``[B, C]``,
``[B, C, 1, 1]``, or the probabilities of a final Softmax (``head.py``). Its weights may
be float initializers, Constant nodes, or initializers also listed as inputs (IR < 4);
opsets below 14 are upgraded. Lifting makes the chosen weights graph inputs (in the
order the graph first reads them), writes their values to ``weights.bin``, appends the
loss head (input ``y``, outputs ``loss`` and ``correct``) and frees the batch size,
rewriting what a fixed-batch export pinned (``batch.py``). The weights are the float
tensors of 2+ elements except tensors that only look like weights: BatchNorm running
statistics and Resize/Upsample scales. Scalars stay constants too: perturbing an epsilon
or an exponent breaks a model. All weights train by default; a regex picks some instead.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, version_converter

from protocols.manifest import Manifest, Rewrite

from .batch import free_batch
from .check import FLOAT_TYPES, check_io, check_no_baked_weights, float_constants, tensor_size
from .directory import make_manifest, opset_of, write_model_dir
from .errors import ExportError
from .head import Head, build_head, is_logits_shape
from .names import INPUT, LABEL, OUTPUTS, RESERVED, onnx_names
from .shapes import infer, value_dims
from .surgery import (
    append_loss_head,
    batch_shape,
    constants_to_initializers,
    consumers,
    first_uses,
    float32_array,
    fresh_namer,
    prune,
    rename_values,
    tensor_value,
    value_names,
)
from .verify import OnnxReference, onnx_reference, ort_session, quiet_run

MIN_OPSET = 13  # ReduceSum with axes as an input; SoftmaxCrossEntropyLoss
INFERENCE_OPSET = 14  # Reshape's shape inference follows computed targets
LOGITS_FROM_TEXT = {
    "squeezed": "the logits output [batch, classes, 1, 1], flattened",
    "softmax-input": "the logits fed to the model's final Softmax/LogSoftmax",
    "log-probabilities": "the log of the model's output probabilities",
}
NOT_WEIGHTS = frozenset({("BatchNormalization", 3), ("BatchNormalization", 4),
                         ("Resize", 1), ("Resize", 2), ("Upsample", 1)})


@dataclass(frozen=True)
class Source:
    """A third-party classifier, reduced to what its logits depend on, batch freed."""

    model: onnx.ModelProto  # upgraded, weights as initializers, batch rewritten, pruned
    original: onnx.ModelProto  # as the user gave it: what --verify runs as the reference
    input_name: str
    head: Head
    input_shape: tuple[int, ...]
    num_classes: int
    fixed_batch: int | None  # the batch size the source's input declares, if a number
    rewrites: tuple[Rewrite, ...] = ()

    @property
    def logits_name(self) -> str:
        return self.head.value


@dataclass(frozen=True)
class Lifted:
    manifest: Manifest
    source: Source
    source_names: tuple[str, ...]  # the trainable initializers' names in the source

    def changes(self) -> list[str]:
        """What lifting changed in the model beyond the weights: printed by the command."""
        head = self.source.head.logits_from
        lines = [f"  loss on: {LOGITS_FROM_TEXT[head]}"] if head else []
        if self.source.rewrites:
            lines.append(f"  rewritten to free the batch size (the source declares "
                         f"{self.source.fixed_batch}):")
            lines += [f"    {r.describe()}" for r in self.source.rewrites]
        return lines

    def reference(self) -> OnnxReference:
        """The source model as given, run with replaced weights: what --verify compares.

        It runs at the source's own batch size, and asks --verify to check the lifted
        graph against itself sample by sample at other sizes.
        """
        return onnx_reference(self.source.original, self.source_names, self.source.input_name,
                              self.source.head.reference_value, log=self.source.head.reference_log)


def load_source(source: str | Path | onnx.ModelProto, output: str | None = None,
                input_shape: Sequence[int] | None = None) -> Source:
    """Load, check, bring to opset 14+, find input and logits, free the batch size."""
    original = _read(source)
    model = _upgraded(original)
    with contextlib.suppress(Exception):  # declared shapes help find the logits
        model = onnx.shape_inference.infer_shapes(model)
    constants_to_initializers(model.graph)
    data = _data_input(model)
    chosen = _logits_output(model, output)
    shape = _sample_shape(data, input_shape)
    dims = data.type.tensor_type.shape.dim
    fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    fresh = fresh_namer(value_names(model.graph) | RESERVED)
    head = build_head(model.graph, chosen.name, infer(model), fresh,
                      value_names(original.graph))
    _only_output(model, head.value)
    rewrites = free_batch(model, data.name, fixed, head.value, fresh)
    prune(model.graph, [head.value])
    return Source(model, original, data.name, head, shape,
                  _num_classes(model, data.name, head.value, shape), fixed, rewrites)


def _upgraded(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset 14 or newer where the converter can, 13 at least.

    The loss head needs 13; freeing the batch needs 14, where Reshape's shape inference
    follows a target computed from ``Shape(x)``: at 13 it loses the batch there, and
    every fixed size downstream stays hidden.
    """
    opset = opset_of(model)
    if opset >= INFERENCE_OPSET:
        return copy.deepcopy(model)
    try:
        return version_converter.convert_version(model, INFERENCE_OPSET)
    except Exception as exc:
        if opset >= MIN_OPSET:
            return copy.deepcopy(model)  # inference will see less; the smoke run checks
        raise ExportError(f"the model uses opset {opset} and converting it to "
                          f"{INFERENCE_OPSET} failed ({str(exc)[:300]}); re-export it with "
                          f"opset >= {MIN_OPSET}") from None


def _only_output(model: onnx.ModelProto, value: str) -> None:
    """Make ``value`` the graph's one output and drop what it does not need."""
    del model.graph.output[:]
    model.graph.output.append(tensor_value(value, TensorProto.FLOAT, None))
    prune(model.graph, [value])


def _read(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        model = copy.deepcopy(source)
    else:
        try:
            model = onnx.load(str(source))
        except Exception as exc:  # missing file, not protobuf, missing external data
            raise ExportError(f"cannot read {source} as an ONNX model: {str(exc)[:300]}",
                              "bad_file") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ExportError(f"the model is not valid ONNX: {str(exc)[:500]}", "bad_file") from None
    return model


def _data_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {i.name for i in model.graph.initializer}
    data = [i for i in model.graph.input if i.name not in inits]
    if len(data) != 1:
        raise ExportError(f"the model needs exactly one data input, it has {len(data)} "
                          f"({', '.join(i.name for i in data)}); only single-input classifiers "
                          "can be lifted")
    elem = data[0].type.tensor_type.elem_type
    if elem != TensorProto.FLOAT:
        raise ExportError(f"input {data[0].name!r} is {TensorProto.DataType.Name(elem)}; the "
                          "exported form takes float32 images: convert the model to float32")
    return data[0]


def _is_logits(value: onnx.ValueInfoProto) -> bool:
    return (value.type.tensor_type.elem_type == TensorProto.FLOAT
            and is_logits_shape(value_dims(value)))


def _logits_output(model: onnx.ModelProto, output: str | None) -> onnx.ValueInfoProto:
    outputs = {o.name: o for o in model.graph.output}
    listing = ", ".join(f"{n} {_describe(o)}" for n, o in outputs.items())
    if output is not None:
        if output not in outputs:
            raise ExportError(f"--output {output!r} is not an output of the model; its outputs "
                              f"are: {listing}")
        value = outputs[output]
        if not (_is_logits(value) or value.type.tensor_type.elem_type == TensorProto.FLOAT
                and not value_dims(value)):
            raise ExportError(f"output {output!r} is {_describe(value)}, not float32 logits "
                              "[batch, classes] (or [batch, classes, 1, 1])")
        return value
    candidates = [o for o in outputs.values() if _is_logits(o)]
    if len(candidates) != 1:
        what = "no output looks like" if not candidates else "several outputs look like"
        raise ExportError(f"{what} float32 logits [batch, classes] (or [batch, classes, 1, 1], "
                          f"or their softmax); name the logits with --output NAME (outputs: "
                          f"{listing})", "no_logits")
    return candidates[0]


def _describe(value: onnx.ValueInfoProto) -> str:
    tt = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tt.shape.dim]
    return f"{TensorProto.DataType.Name(tt.elem_type)}{dims}"


def _sample_shape(data: onnx.ValueInfoProto, given: Sequence[int] | None) -> tuple[int, ...]:
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in data.type.tensor_type.shape.dim][1:]
    if given is not None:
        given = tuple(int(d) for d in given)
        fits = len(given) == len(dims) and all(d in (None, g) for d, g in zip(dims, given))
        if dims and not fits:
            raise ExportError(f"--input-shape {list(given)} does not fit input {data.name!r} "
                              f"{_describe(data)} (give the shape without the batch)")
        return given
    if not dims or any(d is None or d <= 0 for d in dims):
        raise ExportError(f"input {data.name!r} is {_describe(data)}: its sample shape is not "
                          "fixed; pass --input-shape, e.g. 3,32,32")
    return tuple(dims)


def _num_classes(model: onnx.ModelProto, input_name: str, logits: str,
                 shape: tuple[int, ...]) -> int:
    """The logits' second dimension: inferred, or seen by running the graph once."""
    dims = infer(model).of(logits)
    if dims is not None and len(dims) == 2 and isinstance(dims[1], int) and dims[1] > 0:
        classes = dims[1]
    else:
        x = np.zeros((1, *shape), np.float32)
        try:
            out = ort_session(model.SerializeToString()).run([logits], {input_name: x})[0]
        except Exception as exc:
            raise ExportError(f"the model does not run on one sample of shape {list(shape)} "
                              f"({str(exc)[:300]})", "fixed_batch") from None
        classes = out.shape[1] if out.ndim == 2 else 0
    if classes < 2:
        raise ExportError(f"output {logits!r} has {classes} classes; logits need >= 2")
    return int(classes)


def trainable_initializers(model: onnx.ModelProto, trainable: str) -> tuple[list[str], int]:
    """Initializer names to lift, in first-use order, and the elements left frozen.

    ``trainable`` ("all" or a regex searched in the names) picks among the weights: float
    tensors of 2+ elements that are not BatchNorm statistics or resize scales. Frozen
    elements are the weights it leaves out.
    """
    inits = {i.name: i for i in model.graph.initializer}
    slots = consumers(model.graph)
    ordered = [n for n in first_uses(model.graph) if n in inits]
    floats = [n for n in ordered if inits[n].data_type in FLOAT_TYPES]
    default = [n for n in floats if tensor_size(inits[n]) >= 2
               and not any(s in NOT_WEIGHTS for s in slots.get(n, []))]
    if not default:
        raise ExportError("the model has no float initializers to train: its weights may "
                          "already be graph inputs, or be stored quantized; export it with "
                          "its weights as float32 initializers", "no_weights")
    chosen = default if trainable == "all" else _matching(default, trainable)
    _check_float32(chosen, inits)
    frozen = sum(tensor_size(inits[n]) for n in default if n not in set(chosen))
    return chosen, frozen


def _matching(names: list[str], trainable: str) -> list[str]:
    try:
        pattern = re.compile(trainable)
    except re.error as exc:
        raise ExportError(f"--trainable {trainable!r} is not a valid regex: {exc}") from None
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise ExportError(f"--trainable {trainable!r} matches no weight initializer; names "
                          f"look like {', '.join(names[:6])}, ...")
    return chosen


def _check_float32(names: list[str], inits: dict[str, TensorProto]) -> None:
    bad = [f"{n} ({TensorProto.DataType.Name(inits[n].data_type).lower()})" for n in names
           if inits[n].data_type != TensorProto.FLOAT]
    if bad:
        raise ExportError(f"trainable initializers must be float32, these are not: "
                          f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; convert the "
                          "model to float32, or leave them out with --trainable REGEX",
                          "bad_dtype")


def lift_graph(source: Source, chosen: list[str]) -> tuple[onnx.ModelProto, list[str],
                                                            list[np.ndarray]]:
    """The lifted graph, the parameters' ONNX names and their values, in order."""
    model = copy.deepcopy(source.model)
    g = model.graph
    taken = value_names(g)
    new_names = onnx_names(chosen, taken - set(chosen))
    fresh = fresh_namer(taken | RESERVED | set(new_names))
    mapping = {n: fresh(f"orig_{n}") for n in taken & RESERVED if n != source.input_name}
    mapping[source.input_name] = INPUT
    mapping.update(zip(chosen, new_names))
    inits = {i.name: i for i in g.initializer}
    tensors = [float32_array(inits[n]) for n in chosen]
    rename_values(g, mapping)
    frozen = [i for i in g.initializer if i.name not in set(new_names)]
    del g.initializer[:]
    g.initializer.extend(frozen)
    del g.input[:], g.value_info[:]
    g.input.extend([tensor_value(INPUT, TensorProto.FLOAT, batch_shape(source.input_shape)),
                    tensor_value(LABEL, TensorProto.INT64, batch_shape(()))])
    g.input.extend(tensor_value(n, TensorProto.FLOAT, list(t.shape))
                   for n, t in zip(new_names, tensors))
    append_loss_head(g, mapping.get(source.logits_name, source.logits_name), LABEL, fresh,
                     OUTPUTS)
    model.ir_version = max(model.ir_version, 7)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ExportError(f"the lifted graph is not valid ONNX: {str(exc)[:500]}") from None
    return model, new_names, tensors


def smoke_run(model: onnx.ModelProto, manifest: Manifest, tensors: list[np.ndarray],
              fixed_batch: int | None) -> None:
    """Run the lifted graph at two batch sizes: a graph that fixes its batch fails here."""
    session = ort_session(model.SerializeToString())
    rng = np.random.default_rng(0)
    hint = (f"the source declares batch size {fixed_batch}; " if fixed_batch else "") + (
        "if its graph fixes the batch size in a way the hook cannot rewrite, re-export it "
        "with a dynamic batch axis")
    for batch in (1, 3):
        feed = {INPUT: rng.standard_normal((batch, *manifest.input_shape)).astype(np.float32),
                LABEL: rng.integers(0, manifest.num_classes, batch).astype(np.int64)}
        feed.update({p.name: t for p, t in zip(manifest.parameters, tensors)})
        try:
            loss, correct = session.run(list(OUTPUTS), feed, quiet_run())
        except Exception as exc:
            raise ExportError(f"the lifted graph fails at batch size {batch} ({str(exc)[:300]}); "
                              f"{hint}", "fixed_batch") from None
        if np.shape(loss) != () or not 0 <= int(correct) <= batch:
            raise ExportError(f"the lifted graph gives loss of shape {np.shape(loss)} and "
                              f"correct={correct} at batch {batch}: is --output the logits?")


def lift_onnx(source: str | Path | onnx.ModelProto, out_dir: str | Path, *,
              trainable: str = "all", output: str | None = None,
              input_shape: Sequence[int] | None = None, model_name: str | None = None,
              class_names: Sequence[str] = (), normalization: dict | None = None) -> Lifted:
    """Lift an ONNX classifier into ``out_dir``; the result can build the --verify reference."""
    src = load_source(source, output, input_shape)
    chosen, frozen = trainable_initializers(src.model, trainable)
    graph, names, tensors = lift_graph(src, chosen)
    if model_name is None:
        model_name = Path(source).stem if isinstance(source, (str, Path)) else "onnx-model"
    manifest = make_manifest(
        graph, names, tensors, model_name=model_name, input_shape=src.input_shape,
        num_classes=src.num_classes, frozen_parameters=frozen,
        batchnorm="eval" if any(n.op_type == "BatchNormalization" for n in graph.graph.node)
        else "none", normalization=normalization, class_names=class_names,
        rewrites=src.rewrites, logits_from=src.head.logits_from)
    check_io(graph, manifest)
    budget = sum(tensor_size(t) for _, t in float_constants(src.model.graph)) - sum(
        t.size for t in tensors)
    check_no_baked_weights(graph, manifest, tensors, budget)
    smoke_run(graph, manifest, tensors, src.fixed_batch)
    return Lifted(write_model_dir(out_dir, graph, tensors, manifest), src, tuple(chosen))
