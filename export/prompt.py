"""Exports for black-box prompt tuning: the prompt a device trains, the frozen model it queries.

* :func:`export_prompt_generator`: a torch prompt generator -> a model directory whose graph
  maps ``x`` to ``prompted`` (what the black box is asked about), with the generator's
  trainable weights as inputs. The partial-training selection is the export's own
  (``trainable`` regex, ``select_parameters``): the rest of the generator (BlackVIP's frozen
  encoder) is baked into the graph, and ``weights.bin`` holds only what trains.
* :func:`export_discrete_prompt`: a model directory for a discrete prompt: the ``(tokens,
  candidates)`` logits as its weights, and a small graph that writes the drawn candidate
  tokens after the first token of each input (``x`` token ids, ``choice`` indices).
* :func:`export_blackbox`: a frozen classifier -> a black-box directory: a graph from
  ``x``, ``y`` to ``loss`` and ``correct`` with every weight a constant, and its spec
  (``blackbox.json``). Only the model's owner holds this directory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.func import functional_call

from protocols.manifest import MANIFEST, Manifest, file_sha256, write_weights
from protocols.scoring import SPEC_FILE, BlackBoxSpec

from .directory import GRAPH_FILE, WEIGHTS_FILE, make_manifest
from .errors import ExportError
from .names import BATCH, INPUT, LABEL, OUTPUTS
from .torch_export import (
    EXPORT_BATCH,
    OPSET,
    rename_batch_dim,
    run_exporter,
    select_parameters,
    trainable_tensors,
)

PROMPTED = "prompted"
CHOICE = "choice"


class _Generator(nn.Module):
    """``(x, params) -> prompted``: the generator with its trainable tensors as one list."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        return functional_call(self.model, dict(zip(self.names, params)), (x,))


def export_prompt_generator(generator: nn.Module, out_dir: str | Path,
                            input_shape: Sequence[int], num_classes: int, trainable: str,
                            model_name: str = "prompt-generator",
                            normalization: dict | None = None) -> Manifest:
    """Write the generator's directory; ``trainable`` picks its trained part (a regex)."""
    generator = generator.cpu().float().eval()
    selection = select_parameters(generator, trainable)
    params = dict(generator.named_parameters())
    args = (torch.randn(EXPORT_BATCH, *input_shape),
            [params[n].detach().clone() for n in selection.torch_names])
    batch = torch.export.Dim(BATCH)
    graph = run_exporter(_Generator(generator, selection.torch_names), args, dict(
        dynamo=True, external_data=False, opset_version=OPSET,
        dynamic_shapes=({0: batch}, [None] * len(args[1])),
        input_names=[INPUT, *selection.onnx_names], output_names=[PROMPTED]))
    rename_batch_dim(graph, graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param)
    tensors = trainable_tensors(generator, selection)
    manifest = make_manifest(graph, selection.onnx_names, tensors, model_name=model_name,
                             input_shape=input_shape, num_classes=num_classes,
                             frozen_parameters=selection.frozen_elements,
                             normalization=normalization)
    return write_prompt_dir(out_dir, graph, tensors, manifest)


def export_discrete_prompt(out_dir: str | Path, candidates: np.ndarray, tokens: int,
                           text_length: int, num_classes: int,
                           model_name: str = "discrete-prompt") -> Manifest:
    """Write a discrete prompt's directory: uniform logits and the graph that inserts a
    draw after each input's first token."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.ndim != 1 or candidates.size < 2 or text_length < 2 or tokens < 1:
        raise ExportError("a discrete prompt needs 2+ candidates, 1+ tokens and inputs of "
                          "2+ tokens")
    graph = _insert_graph(candidates, tokens, text_length)
    logits = np.zeros((tokens, candidates.size), dtype=np.float32)
    manifest = make_manifest(graph, ["prompt_logits"], [logits], model_name=model_name,
                             input_shape=(text_length,), num_classes=num_classes)
    return write_prompt_dir(out_dir, graph, [logits], manifest)


def _insert_graph(candidates: np.ndarray, tokens: int, length: int) -> onnx.ModelProto:
    """``prompted = [x[:, :1], candidates[choice] for every row, x[:, 1:]]`` as int64 ids."""
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("Cast", [INPUT], ["ids"], to=i64),
        helper.make_node("Gather", ["candidates", CHOICE], ["picked"], axis=0),
        helper.make_node("Unsqueeze", ["picked", "zero"], ["row"]),
        helper.make_node("Shape", ["ids"], ["batch"], start=0, end=1),
        helper.make_node("Concat", ["batch", "width"], ["wide"], axis=0),
        helper.make_node("Expand", ["row", "wide"], ["prompt"]),
        helper.make_node("Slice", ["ids", "zero", "one", "one"], ["head"]),
        helper.make_node("Slice", ["ids", "one", "end", "one"], ["tail"]),
        helper.make_node("Concat", ["head", "prompt", "tail"], [PROMPTED], axis=1),
    ]
    consts = [numpy_helper.from_array(candidates, "candidates"),
              numpy_helper.from_array(np.array([0], np.int64), "zero"),
              numpy_helper.from_array(np.array([1], np.int64), "one"),
              numpy_helper.from_array(np.array([length], np.int64), "end"),
              numpy_helper.from_array(np.array([tokens], np.int64), "width")]
    graph = helper.make_graph(
        nodes, "discrete_prompt",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [BATCH, length]),
         helper.make_tensor_value_info(CHOICE, i64, [tokens])],
        [helper.make_tensor_value_info(PROMPTED, i64, [BATCH, length + tokens])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def write_prompt_dir(out_dir: str | Path, graph: onnx.ModelProto,
                     tensors: Sequence[np.ndarray], manifest: Manifest) -> Manifest:
    """Graph, ``weights.bin``, then the manifest that seals them (outputs: ``prompted``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    _atomic(out / GRAPH_FILE, graph.SerializeToString())
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    write_weights(tmp, [np.ascontiguousarray(t, np.float32) for t in tensors])
    os.replace(tmp, out / WEIGHTS_FILE)
    files = {name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size}
             for name in (GRAPH_FILE, WEIGHTS_FILE)}
    manifest = replace(manifest, outputs=(PROMPTED,), files=files, graph_const="")
    Manifest.from_json(manifest.to_json())
    _atomic(out / MANIFEST, manifest.to_json().encode())
    return manifest


class _FrozenLoss(nn.Module):
    """``(x, y) -> (mean cross-entropy, correct count)`` of a classifier, all constants."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).sum()


def export_blackbox(model: nn.Module, out_dir: str | Path, example: torch.Tensor,
                    num_classes: int, name: str, class_names: Sequence[str] = (),
                    input_range: Sequence[int] = ()) -> BlackBoxSpec:
    """Write a black-box directory: the frozen graph and ``blackbox.json``.

    ``example`` is one batch of inputs (its dtype and sample shape are the API's).
    """
    model = model.cpu().eval()
    batch = torch.export.Dim(BATCH)
    labels = torch.zeros(example.shape[0], dtype=torch.int64)
    graph = run_exporter(_FrozenLoss(model), (example, labels), dict(
        dynamo=True, external_data=False, opset_version=OPSET,
        dynamic_shapes=({0: batch}, {0: batch}), input_names=[INPUT, LABEL],
        output_names=list(OUTPUTS)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE).unlink(missing_ok=True)
    _atomic(out / GRAPH_FILE, graph.SerializeToString())
    dtype = {torch.float32: "float32", torch.int64: "int64"}.get(example.dtype)
    if dtype is None:
        raise ExportError(f"a black box takes float32 or int64 inputs, not {example.dtype}")
    spec = BlackBoxSpec(name, dtype, tuple(int(d) for d in example.shape[1:]), num_classes,
                        tuple(str(c) for c in class_names), tuple(int(b) for b in input_range),
                        GRAPH_FILE, {GRAPH_FILE: {"sha256": file_sha256(out / GRAPH_FILE),
                                                  "bytes": (out / GRAPH_FILE).stat().st_size}})
    _atomic(out / SPEC_FILE, spec.to_json().encode())
    return spec


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
