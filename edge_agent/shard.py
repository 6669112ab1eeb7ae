"""A device's local data: a ``.npz`` file with ``x`` and ``y``, checked against the model.

Format: ``x`` float32 of shape ``(N, *input_shape)`` already normalised as the manifest
says; ``y`` integer labels of shape ``(N,)`` in ``[0, num_classes)``; optional ``meta``,
a JSON string (client id, source data set, partition seed...). ``zowarmup partition``
writes such files; any tool that writes numpy can.

When ``x`` is stored uncompressed (``np.savez``, as ``save_shard`` writes it), the agent
maps it from the file instead of reading it, and hands each micro-batch's pages back after
use: a shard costs the agent a micro-batch of memory, not its size, so a board can hold
more data than RAM. A compressed ``x`` (``np.savez_compressed``) is read into memory.
"""

from __future__ import annotations

import json
import mmap
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocols.errors import ProtocolError
from protocols.manifest import Manifest
from protocols.validate import json_object

_CHECK_ROWS = 1024  # samples checked at a time, so a mapped shard is never all resident
MAX_META_BYTES = 1 << 20


@dataclass(frozen=True)
class Shard:
    x: np.ndarray
    y: np.ndarray
    meta: dict = field(default_factory=dict)
    mapping: mmap.mmap | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self), size):
            yield self.x[start:start + size], self.y[start:start + size]
            self.release(start, start + size)

    def release(self, start: int, stop: int) -> None:
        """Give back the pages of samples ``[start, stop)`` of a mapped ``x`` (no-op else)."""
        if self.mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        row = self.x.strides[0]
        base = self.x.ctypes.data - _address(self.mapping)
        lo = (base + start * row) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(len(self.mapping), base + min(stop, len(self)) * row)
        if hi > lo:
            self.mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _address(mapping: mmap.mmap) -> int:
    return np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data


def _map_x(path: Path) -> tuple[np.ndarray, mmap.mmap] | None:
    """``x`` of an ``.npz`` as an array over the file, when it is stored uncompressed."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo("x.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
            start = info.header_offset + 30 + int(name_len) + int(extra_len)
            f.seek(start)
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                return None
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
            if fortran or dtype != np.dtype("<f4") or offset - start > info.file_size:
                return None
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    x = np.frombuffer(mapping, dtype=np.float32, count=int(np.prod(shape)),
                      offset=offset).reshape(shape)
    return x, mapping


def load_shard(path: Path, manifest: Manifest) -> Shard:
    """Read and check a shard; every refusal says what is wrong and what the model expects."""
    path = Path(path)
    mapped = None
    try:
        mapped = _map_x(path)
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if not (k == "x" and mapped)}
        if mapped:
            arrays["x"] = mapped[0]
    except FileNotFoundError:
        raise ProtocolError(f"shard {path} does not exist", "missing_file") from None
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ProtocolError(f"shard {path} is not a readable .npz file: {exc}",
                            "bad_shard") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise ProtocolError(f"shard {path} has no {key!r} array (it has "
                                f"{sorted(arrays) or 'none'})", "bad_shard")
    meta = read_meta(arrays.get("meta"), f"shard {path}")
    return check_shard(Shard(arrays["x"], arrays["y"], meta, mapped[1] if mapped else None),
                       manifest, str(path))


def check_shard(shard: Shard, manifest: Manifest, where: str = "shard") -> Shard:
    x, y = shard.x, shard.y
    want = tuple(manifest.input_shape)
    if x.dtype != np.float32:
        raise ProtocolError(f"{where}: x is {x.dtype}, the model takes float32", "bad_shard")
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
        raise ProtocolError(f"{where}: x has shape {x.shape}, the model takes (N, "
                            f"{', '.join(map(str, want))})", "bad_shard")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ProtocolError(f"{where}: y has shape {y.shape}, expected ({x.shape[0]},): one label "
                            "per sample", "bad_shard")
    if not np.issubdtype(y.dtype, np.integer):
        raise ProtocolError(f"{where}: y is {y.dtype}, labels must be integers", "bad_shard")
    if len(y) == 0:
        raise ProtocolError(f"{where}: the shard holds no samples", "bad_shard")
    if y.min() < 0 or y.max() >= manifest.num_classes:
        raise ProtocolError(f"{where}: labels span [{y.min()}, {y.max()}], the model has "
                            f"{manifest.num_classes} classes", "bad_shard")
    for start in range(0, len(y), _CHECK_ROWS):
        if not np.isfinite(x[start:start + _CHECK_ROWS]).all():
            raise ProtocolError(f"{where}: x holds NaN or infinite values", "bad_shard")
        shard.release(start, start + _CHECK_ROWS)
    return Shard(np.ascontiguousarray(x), y.astype(np.int64), shard.meta, shard.mapping)


def read_meta(raw: np.ndarray | None, where: str) -> dict:
    """An .npz file's optional ``meta`` array: a JSON object written as one string."""
    if raw is None:
        return {}
    try:
        return json_object(str(raw), f"{where}: 'meta'", MAX_META_BYTES)
    except ProtocolError as exc:
        raise ProtocolError(str(exc), "bad_shard") from None


def save_shard(path: Path, x: np.ndarray, y: np.ndarray, meta: dict | None = None) -> None:
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64), meta=json.dumps(meta or {}))
