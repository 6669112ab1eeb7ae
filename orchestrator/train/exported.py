"""The zoo model behind an exported directory, as torch: what the torch ZO engine runs.

An exported directory holds the trainable weights (``weights.bin``, manifest order, ONNX
names) and a graph in which everything else the model reads is a constant: BatchNorm's
running statistics as the warm-up's checkpoint had them at the pivot, and any frozen
parameter. The torch engine must compute what that graph computes, so the module is
rebuilt from the zoo, its parameters mapped from the manifest by the export's own naming
rule (``export/names.py``: a pure function of the ordered torch names), and every other
float tensor read back from the graph's constants, not from a checkpoint that might have
moved on. Anything that does not map exactly is refused: a lifted third-party model has no
torch model here, and a guess would train something else than the agents hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.names import onnx_names
from protocols.errors import ZoError
from protocols.manifest import Manifest, read_weights

from .zoo import MODELS, build_model

PREFIX = "model."  # the exporter's wrapper holds the zoo model as its attribute ``model``


class NotRunnable(ZoError):
    """An exported model the torch engine cannot run exactly, and what to do instead."""


def zoo_module(model_dir: Path, manifest: Manifest, width: int | None = None) -> nn.Module:
    """The zoo model ``model_dir`` was exported from, at its exported weights and constants,
    in eval mode; ``module.parameters()`` are in the manifest's order."""
    if manifest.model not in MODELS:
        raise NotRunnable(f"{model_dir}: model {manifest.model!r} is not in the model zoo "
                          f"({', '.join(MODELS)}), e.g. a lifted third-party ONNX model: the "
                          "torch engine needs the torch model; use zo.engine = "
                          "\"onnxruntime\"")
    if manifest.frozen_parameters:
        raise NotRunnable(f"{model_dir}: {manifest.frozen_parameters:,} parameters are frozen "
                          "into the graph (a partial-training export); the torch engine runs "
                          "whole-model exports only; use zo.engine = \"onnxruntime\"")
    channels, height, width_px = manifest.input_shape
    if height != width_px:
        raise NotRunnable(f"{model_dir}: the zoo takes square images, the manifest says "
                          f"{height}x{width_px}")
    module = build_model(manifest.model, manifest.num_classes, channels, height, width)
    _check_names(module, manifest, model_dir, width)
    _, tensors = read_weights(model_dir, manifest)
    with torch.no_grad():
        for param, tensor in zip(module.parameters(), tensors):
            param.copy_(torch.from_numpy(tensor))
        _load_constants(module, model_dir / manifest.graph)
    return module.eval()


def _check_names(module: nn.Module, manifest: Manifest, model_dir: Path,
                 width: int | None) -> None:
    named = list(module.named_parameters())
    ours = [(name, tuple(p.shape)) for name, (_, p) in
            zip(onnx_names([n for n, _ in named]), named)]
    theirs = [(p.name, tuple(p.shape)) for p in manifest.parameters]
    if ours == theirs:
        return
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                 min(len(ours), len(theirs)))
    got = theirs[first] if first < len(theirs) else "nothing"
    want = ours[first] if first < len(ours) else "nothing"
    raise NotRunnable(f"{model_dir}: the exported {manifest.model} does not match the zoo's "
                      f"(model.width = {width if width is not None else 'default'}): "
                      f"parameter {first} is {got} in the manifest, {want} in the zoo model "
                      f"({len(theirs)} against {len(ours)} tensors); set model.width as the "
                      "run that exported it did")


def _load_constants(module: nn.Module, graph_path: Path) -> None:
    """Every float buffer (BatchNorm's running statistics) from the graph's constants."""
    wanted = {name: buf for name, buf in module.named_buffers() if buf.is_floating_point()}
    if not wanted:
        return
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    found = {init.name[len(PREFIX):]: init for init in graph.initializer
             if init.name.startswith(PREFIX) and init.name[len(PREFIX):] in wanted}
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise NotRunnable(f"{graph_path}: the graph holds no constant for {missing[0]} (and "
                          f"{len(missing) - 1} more): not an export of this zoo model as "
                          "`zowarmup export` writes it; use zo.engine = \"onnxruntime\"")
    for name, buf in wanted.items():
        value = numpy_helper.to_array(found[name])
        if value.shape != tuple(buf.shape):
            raise NotRunnable(f"{graph_path}: constant {PREFIX}{name} has shape {value.shape}, "
                              f"the zoo model's is {tuple(buf.shape)}")
        buf.copy_(torch.tensor(np.asarray(value, dtype=np.float32)))
