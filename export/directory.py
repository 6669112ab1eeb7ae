"""Writing an exported model directory: graph, weights, then the manifest that seals them.

The manifest is written last and atomically, so a directory whose export was
interrupted has no manifest and ``load_manifest`` refuses it, instead of an agent
loading a graph that does not match its weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from protocols.manifest import (
    MANIFEST,
    Manifest,
    Parameter,
    Rewrite,
    file_sha256,
    write_weights,
)

from .errors import ExportError
from .names import INPUT, LABEL, OUTPUTS

GRAPH_FILE = "model.onnx"
CONST_GRAPH_FILE = "model.const.onnx"
WEIGHTS_FILE = "weights.bin"


def parameter_table(names: Sequence[str], tensors: Sequence[np.ndarray]) -> tuple[Parameter, ...]:
    """Manifest entries for tensors packed in order into weights.bin."""
    params, offset = [], 0
    for name, tensor in zip(names, tensors, strict=True):
        params.append(Parameter(name, tuple(int(d) for d in tensor.shape), offset))
        offset += int(tensor.size)
    return tuple(params)


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the graph was written for."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("the ONNX model imports no default-domain opset")


def check_metadata(num_classes: int, class_names: Sequence[str], normalization: dict | None,
                   input_shape: Sequence[int]) -> dict:
    """Refuse class names or normalization that do not fit the model; return the dict form.

    Normalization has one value, or one per channel (channels first or last).
    """
    if class_names and len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names given for {num_classes} classes; "
                          "give one name per class or none")
    norm = dict(normalization or {})
    if norm:
        if set(norm) != {"mean", "std"}:
            raise ExportError("normalization must have exactly the keys 'mean' and 'std'")
        for key in ("mean", "std"):
            values = [float(v) for v in norm[key]]
            if len(values) not in (1, input_shape[0], input_shape[-1]):
                raise ExportError(f"normalization {key} needs 1 value or one per channel of "
                                  f"input {list(input_shape)}, got {len(values)}")
            norm[key] = values
        if any(s <= 0 for s in norm["std"]):
            raise ExportError("normalization std values must be positive")
    return norm


def make_manifest(graph: onnx.ModelProto, names: Sequence[str], tensors: Sequence[np.ndarray],
                  *, model_name: str, input_shape: Sequence[int], num_classes: int,
                  batchnorm: str = "none", frozen_parameters: int = 0,
                  normalization: dict | None = None, class_names: Sequence[str] = (),
                  rewrites: Sequence[Rewrite] = (), logits_from: str = "") -> Manifest:
    """The manifest of a model about to be written (its ``files`` are filled on writing)."""
    norm = check_metadata(num_classes, class_names, normalization, tuple(input_shape))
    return Manifest(
        model=model_name, graph=GRAPH_FILE, weights=WEIGHTS_FILE,
        parameters=parameter_table(names, tensors), input_name=INPUT,
        input_shape=tuple(int(d) for d in input_shape), label_name=LABEL,
        num_classes=int(num_classes), outputs=OUTPUTS, normalization=norm,
        class_names=tuple(str(c) for c in class_names), opset=opset_of(graph),
        batchnorm=batchnorm, frozen_parameters=int(frozen_parameters),
        rewrites=tuple(rewrites), logits_from=logits_from)


def write_model_dir(out_dir: str | Path, graph: onnx.ModelProto, tensors: Sequence[np.ndarray],
                    manifest: Manifest) -> Manifest:
    """Write the graph, ``weights.bin`` and, last, ``manifest.json`` with the files' hashes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a stale manifest must not seal new files
    _atomic_write(out / manifest.graph, graph.SerializeToString())
    manifest = replace(manifest, graph_const=CONST_GRAPH_FILE)
    _atomic_write(out / CONST_GRAPH_FILE, constant_weights_graph(graph, manifest)
                  .SerializeToString())
    tmp = out / f".{manifest.weights}.tmp"
    write_weights(tmp, list(tensors))
    os.replace(tmp, out / manifest.weights)
    files = {name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size}
             for name in (manifest.graph, manifest.graph_const, manifest.weights)}
    manifest = replace(manifest, files=files)
    Manifest.from_json(manifest.to_json())  # what we write must read back
    _atomic_write(out / MANIFEST, manifest.to_json().encode())
    return manifest


def constant_weights_graph(graph: onnx.ModelProto, manifest: Manifest) -> onnx.ModelProto:
    """The graph with each trainable input turned into an external-data initializer.

    The data points into weights.bin (offset and length of the parameter), so the file
    works on its own; an agent instead hands ONNX Runtime its in-memory, perturbed
    weights with ``add_external_initializers`` and gets constant-weight optimisations
    (~1.5x faster forwards) at the cost of building a session per perturbation.
    """
    const = onnx.ModelProto()
    const.CopyFrom(graph)
    params = {p.name: p for p in manifest.parameters}
    kept = [i for i in const.graph.input if i.name not in params]
    del const.graph.input[:]
    const.graph.input.extend(kept)
    for p in manifest.parameters:
        tensor = onnx.TensorProto(name=p.name, data_type=onnx.TensorProto.FLOAT, dims=p.shape,
                                  data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", manifest.weights), ("offset", str(4 * p.offset)),
                           ("length", str(4 * p.size))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        const.graph.initializer.append(tensor)
    return const


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
