"""The model compiled for this CPU: ONNX Runtime's own optimised graph, weights as inputs.

ONNX Runtime runs a graph ~1.5x faster when the weights are constants, because it then
reorders convolution weights into the CPU's blocked layout (NCHWc) and fuses around them.
Building a session over the current weights for every pass buys that speed but holds a
second, reordered copy of the weights. This module gets the speed with no copy:

1. It lets ONNX Runtime optimise the constant-weights graph once, with every weight
   element replaced by a float32 that encodes its own index (bits ``2**23`` as float +
   global index), and saves the optimised graph.
2. It reads the optimised graph's initializers back: each one that decodes to indices of
   one parameter is that parameter, moved; the indices say exactly where each element
   went, and :class:`~edge_agent.layout.Layout` must recognise the move (as is, or
   NCHWc-blocked) or the model is not compiled.
3. It writes the optimised graph with those initializers lifted to graph inputs.

The agent then holds each weight once, in the stored layout, binds the buffers as inputs,
and perturbs them in place: the forward runs ONNX Runtime's constant-weight kernels on
memory the agent owns. Nothing here trusts the reorder to be a permutation: an element
that does not decode, or a layout not recognised, refuses the compile, and the engine
falls back to the other strategies.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from protocols.errors import ZoError
from protocols.manifest import Manifest

from . import onnx_proto
from .layout import Layout

_BASE = 0x4B000000  # float32 bits of 2**23: from here on, consecutive bit patterns are
_MAX_ELEMENTS = 1 << 28  # distinct, finite, normal floats up to ~3.6e16
_OPTIMIZED = "optimized.onnx"
_OPTIMIZED_DATA = "optimized.bin"
NATIVE_GRAPH = "model.native.onnx"


class NativeUnsupported(ZoError):
    """ONNX Runtime moved a weight in a way the agent cannot follow; use another strategy."""


@dataclass(frozen=True)
class NativeGraph:
    path: Path
    inputs: tuple[tuple[str, ...], ...]  # per parameter, the graph inputs that read it
    layouts: tuple[Layout, ...]


def compile_native(model_dir: Path, manifest: Manifest, work_dir: Path) -> NativeGraph:
    """Optimise the model for this CPU and lift its weights to inputs (see the module doc)."""
    if not manifest.graph_const:
        raise NativeUnsupported("the model was exported without a constant-weights graph")
    if manifest.num_parameters >= _MAX_ELEMENTS:
        raise NativeUnsupported(f"more than {_MAX_ELEMENTS} weights")
    work_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(model_dir) / manifest.graph_const, work_dir / manifest.graph_const)
    _write_encoded(work_dir / manifest.weights, manifest.num_parameters)
    _optimize(work_dir / manifest.graph_const, work_dir)
    for name in (manifest.graph_const, manifest.weights):
        (work_dir / name).unlink()
    data = (work_dir / _OPTIMIZED).read_bytes()
    found, inline = _decode(data, work_dir, manifest)
    native = work_dir / NATIVE_GRAPH
    lifted = {name: dims for derived in found for name, dims, _ in derived}
    native.write_bytes(onnx_proto.lift(data, lifted, inline))
    for name in (_OPTIMIZED, _OPTIMIZED_DATA):
        (work_dir / name).unlink(missing_ok=True)
    return NativeGraph(native, tuple(tuple(d[0] for d in derived) for derived in found),
                       tuple(derived[0][2] for derived in found))


def _write_encoded(path: Path, total: int, chunk: int = 1 << 20) -> None:
    with open(path, "wb") as f:
        for start in range(0, total, chunk):
            stop = min(total, start + chunk)
            f.write((np.arange(start, stop, dtype=np.uint32) + np.uint32(_BASE)).astype("<u4")
                    .tobytes())


def _optimize(graph: Path, work_dir: Path) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.optimized_model_filepath = str(work_dir / _OPTIMIZED)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     _OPTIMIZED_DATA)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.add_session_config_entry("session.disable_prepacking", "1")
    ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def _tensor_data(data: bytes, tensor: onnx_proto.Initializer, work_dir: Path) -> np.ndarray:
    count = math.prod(tensor.dims)
    if tensor.raw is not None:
        return np.frombuffer(data, dtype="<u4", count=count, offset=tensor.raw[0])
    where = work_dir / Path(tensor.external.get("location", "")).name
    return np.fromfile(where, dtype="<u4", count=count,
                       offset=int(tensor.external.get("offset", "0")))


def _decode(data: bytes, work_dir: Path, manifest: Manifest
            ) -> tuple[list[list[tuple[str, tuple[int, ...], Layout]]], dict[str, bytes]]:
    """Per parameter, ``[(graph name, stored dims, layout), ...]``; and the external data of
    the initializers that stay constants, to embed."""
    offsets = np.array([p.offset for p in manifest.parameters] + [manifest.num_parameters])
    found: list[list[tuple[str, tuple[int, ...], Layout]]] = [[] for _ in manifest.parameters]
    inline: dict[str, bytes] = {}
    for tensor in onnx_proto.initializers(data):
        if tensor.raw is None and not tensor.external:
            continue  # integer constants held in typed fields: never a weight
        raw = _tensor_data(data, tensor, work_dir)
        index = _param_of(raw, offsets) if tensor.data_type == onnx_proto.FLOAT else None
        if index is None:
            if tensor.external:
                inline[tensor.name] = raw.tobytes()
            continue
        p = manifest.parameters[index]
        where = raw.astype(np.int64) - (_BASE + p.offset)
        where[raw == 0] = -1
        layout = Layout.find(p.shape, tensor.dims, where)
        if layout is None:
            raise NativeUnsupported(f"ONNX Runtime stores {p.name} as {tensor.name} "
                                    f"{list(tensor.dims)} in an order the agent does not know")
        found[index].append((tensor.name, tensor.dims, layout))
    for p, derived in zip(manifest.parameters, found):
        if not derived:
            raise NativeUnsupported(f"{p.name} does not appear in the optimised graph "
                                    "(folded into other constants)")
        if len({d[2] for d in derived}) > 1:
            raise NativeUnsupported(f"{p.name} is stored in two layouts")
    return found, inline


def _param_of(raw: np.ndarray, offsets: Sequence[int]) -> int | None:
    """The parameter whose encoded elements ``raw`` holds, or None for a true constant.

    Zeros are padding; any other value must decode to an element of one parameter.
    """
    bits = raw.astype(np.int64) - _BASE
    values = bits[raw != 0]
    if values.size == 0 or values.min() < 0 or values.max() >= offsets[-1]:
        if values.size and ((values >= 0) & (values < offsets[-1])).any():
            raise NativeUnsupported("an optimised constant mixes weights with other values")
        return None
    index = int(np.searchsorted(offsets, values.min(), side="right")) - 1
    if values.max() >= offsets[index + 1]:
        raise NativeUnsupported("an optimised constant mixes elements of two weights")
    return index
