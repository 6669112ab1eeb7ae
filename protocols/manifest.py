"""The model manifest: what a device needs to know about an exported model, and its checks.

An exported model directory holds ``manifest.json``, the ONNX graph and ``weights.bin``:
the trainable parameters as little-endian float32, concatenated in the manifest's
order. One flat file means an agent reads all weights into one buffer with no copy,
and the order is the tensor index that seeds each direction (``directions.py``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import validate as v
from .errors import ProtocolError

FORMAT = "zowarmup-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 4 << 20
_WHERE = "manifest"
BATCH_ENTRY = "batch"  # a rewritten shape entry that is the batch size at run time
# What the loss head of a lifted model reads: "" the source's logits as they are;
# "squeezed" logits [N, C, 1, 1] flattened to [N, C]; "softmax-input" the input of a final
# Softmax or LogSoftmax; "log-probabilities" the log of a final Softmax's probabilities.
LOGITS_FROM = ("", "squeezed", "softmax-input", "log-probabilities")


@dataclass(frozen=True)
class Parameter:
    """A trainable tensor: a graph input of the ONNX model, a slice of ``weights.bin``."""

    name: str
    shape: tuple[int, ...]
    offset: int  # in float32 elements from the start of weights.bin

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class Rewrite:
    """A node of a lifted graph changed so that the batch size is free at run time.

    ``old`` and ``new`` are the constant the node read (a Reshape target, an Expand shape,
    Tile repeats): integers, and ``"batch"`` where the new one takes the batch size from
    the input at run time. A user reads them to see what was changed in their model.
    """

    node: str
    op: str
    old: tuple[int | str, ...]
    new: tuple[int | str, ...]

    def describe(self) -> str:
        return f"{self.op} {self.node!r}: {list(self.old)} -> {list(self.new)}"


@dataclass(frozen=True)
class Manifest:
    model: str
    graph: str
    weights: str
    parameters: tuple[Parameter, ...]
    input_name: str
    input_shape: tuple[int, ...]  # without the batch dimension
    label_name: str
    num_classes: int
    outputs: tuple[str, str] = ("loss", "correct")
    input_dtype: str = "float32"
    label_dtype: str = "int64"
    normalization: dict = field(default_factory=dict)  # {"mean": [...], "std": [...]} or {}
    class_names: tuple[str, ...] = ()
    opset: int = 18
    batchnorm: str = "none"  # "none" | "eval" (running statistics baked in as constants)
    frozen_parameters: int = 0  # elements baked into the graph as constants
    files: dict = field(default_factory=dict)  # name -> {"sha256": hex, "bytes": int}
    # The same graph with the trainable parameters as initializers whose data is external
    # (weights.bin): an agent supplies the current weights with add_external_initializers
    # and ONNX Runtime optimises them as constants. "" when the export did not write one.
    graph_const: str = ""
    # Lifted models only (left out of the JSON when empty, so other manifests keep their
    # bytes and their identity): the nodes rewritten to free the batch size, and what the
    # loss head reads (LOGITS_FROM).
    rewrites: tuple[Rewrite, ...] = ()
    logits_from: str = ""

    @property
    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters)

    def to_json(self) -> str:
        data = asdict(self)
        for optional in ("rewrites", "logits_from"):
            if not data[optional]:
                del data[optional]
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, **data}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        return cls.from_dict(v.json_object(raw, "manifest", MAX_MANIFEST_BYTES))

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        if data.get("format") != FORMAT:
            raise ProtocolError(f"manifest: format must be {FORMAT!r}", "bad_format")
        if v.integer(data, "format_version", _WHERE, 1, 1000) != FORMAT_VERSION:
            raise ProtocolError(f"manifest: format_version {data['format_version']} is not "
                                f"supported (this build reads {FORMAT_VERSION}); update the "
                                "agent", "bad_version")
        params = tuple(_parameter(p, i) for i, p in enumerate(
            v.sequence(data, "parameters", _WHERE, 100_000)))
        expected = 0
        for p in params:
            if p.offset != expected:
                raise ProtocolError(f"manifest: parameter {p.name!r} starts at {p.offset}, "
                                    f"expected {expected} (weights.bin is packed in order)",
                                    "bad_layout")
            expected += p.size
        files = v.mapping(data, "files", _WHERE)
        for name, info in files.items():
            if not isinstance(info, dict):
                raise ProtocolError(f"manifest: files[{name!r}] must be an object", "bad_type")
            v.hexdigest(info, "sha256", f"manifest files[{name!r}]", 64)
            v.integer(info, "bytes", f"manifest files[{name!r}]")
        return cls(
            model=v.text(data, "model", _WHERE),
            graph=_file_name(v.text(data, "graph", _WHERE)),
            weights=_file_name(v.text(data, "weights", _WHERE)),
            parameters=params,
            input_name=v.text(data, "input_name", _WHERE, 128),
            input_shape=_shape(v.sequence(data, "input_shape", _WHERE, 8), "input_shape"),
            label_name=v.text(data, "label_name", _WHERE, 128),
            num_classes=v.integer(data, "num_classes", _WHERE, 2, 1_000_000),
            outputs=tuple(v.text({"o": o}, "o", "manifest outputs", 128)
                          for o in v.sequence(data, "outputs", _WHERE, 2)),
            input_dtype=v.text(data, "input_dtype", _WHERE, 16),
            label_dtype=v.text(data, "label_dtype", _WHERE, 16),
            normalization=v.mapping(data, "normalization", _WHERE),
            class_names=tuple(str(c) for c in v.sequence(data, "class_names", _WHERE, 1_000_000)),
            opset=v.integer(data, "opset", _WHERE, 7, 100),
            batchnorm=v.text(data, "batchnorm", _WHERE, 16),
            frozen_parameters=v.integer(data, "frozen_parameters", _WHERE),
            files=files,
            graph_const=_file_name(v.text(data, "graph_const", _WHERE))
            if data.get("graph_const") else "",
            rewrites=tuple(_rewrite(r, i) for i, r in enumerate(
                v.sequence(data, "rewrites", _WHERE, 10_000))) if "rewrites" in data else (),
            logits_from=_logits_from(data) if "logits_from" in data else "",
        )


def _parameter(data: object, index: int) -> Parameter:
    where = f"manifest parameters[{index}]"
    if not isinstance(data, dict):
        raise ProtocolError(f"{where} must be an object", "bad_type")
    return Parameter(v.text(data, "name", where, 512),
                     _shape(v.sequence(data, "shape", where, 8), f"{where}.shape"),
                     v.integer(data, "offset", where))


def _rewrite(data: object, index: int) -> Rewrite:
    where = f"manifest rewrites[{index}]"
    if not isinstance(data, dict):
        raise ProtocolError(f"{where} must be an object", "bad_type")
    v.no_extra(data, {"node", "op", "old", "new"}, where)
    return Rewrite(v.text(data, "node", where, 512), v.text(data, "op", where, 64),
                   _entries(v.sequence(data, "old", where, 64), f"{where}.old"),
                   _entries(v.sequence(data, "new", where, 64), f"{where}.new"))


def _entries(values: list, what: str) -> tuple[int | str, ...]:
    """Shape-like entries: integers from -1 (Reshape's "the rest") up, or "batch"."""
    for e in values:
        if e != BATCH_ENTRY and (isinstance(e, bool) or not isinstance(e, int)
                                 or not -1 <= e < 2**63):
            raise ProtocolError(f"manifest: {what} must hold integers >= -1 or "
                                f"{BATCH_ENTRY!r}, got {values}", "bad_shape")
    return tuple(values)


def _logits_from(data: dict) -> str:
    value = v.text(data, "logits_from", _WHERE, 32)
    if value not in LOGITS_FROM:
        raise ProtocolError(f"manifest: logits_from {value!r} is not one of "
                            f"{', '.join(map(repr, LOGITS_FROM))}", "bad_value")
    return value


def _shape(dims: list, what: str) -> tuple[int, ...]:
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 < d < 2**31:
            raise ProtocolError(f"manifest: {what} must hold positive integers, got {dims}",
                                "bad_shape")
    return tuple(dims)


def _file_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ProtocolError(f"manifest: file name {name!r} must be a plain name in the model "
                            "directory", "bad_path")
    return name


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(model_dir: Path, verify: bool = True) -> Manifest:
    """Read a model directory's manifest and, by default, check every file's size and hash."""
    path = Path(model_dir) / MANIFEST
    try:
        manifest = Manifest.from_json(path.read_bytes())
    except FileNotFoundError:
        raise ProtocolError(f"{path} does not exist: is {model_dir} an exported model "
                            "directory (zowarmup export)?", "missing_file") from None
    for needed in (manifest.graph, manifest.weights) + ((manifest.graph_const,)
                                                       if manifest.graph_const else ()):
        if needed not in manifest.files:
            raise ProtocolError(f"manifest lists no hash for {needed!r}", "bad_manifest")
    if verify:
        for name, info in manifest.files.items():
            file = Path(model_dir) / _file_name(name)
            if not file.is_file():
                raise ProtocolError(f"{file} is missing", "missing_file")
            if file.stat().st_size != info["bytes"]:
                raise ProtocolError(f"{file} has {file.stat().st_size} bytes, the manifest says "
                                    f"{info['bytes']}", "bad_file")
            if file_sha256(file) != info["sha256"]:
                raise ProtocolError(f"{file} does not match its SHA-256 in the manifest",
                                    "bad_file")
    if manifest.files[manifest.weights]["bytes"] != 4 * manifest.num_parameters:
        raise ProtocolError(f"{manifest.weights} must hold {manifest.num_parameters} float32 "
                            "values, as the parameters listed", "bad_layout")
    return manifest


def read_weights(model_dir: Path, manifest: Manifest) -> tuple[np.ndarray, list[np.ndarray]]:
    """All trainable weights in one flat float32 buffer, and a view per parameter."""
    flat = np.fromfile(Path(model_dir) / manifest.weights, dtype="<f4").astype(np.float32,
                                                                                copy=False)
    return flat, tensor_views(flat, manifest)


def tensor_views(flat: np.ndarray, manifest: Manifest) -> list[np.ndarray]:
    return [flat[p.offset:p.offset + p.size].reshape(p.shape) for p in manifest.parameters]


def write_weights(path: Path, tensors: list[np.ndarray]) -> None:
    with open(path, "wb") as f:
        for t in tensors:
            f.write(np.ascontiguousarray(t, dtype="<f4").tobytes())
