"""A device's local data: a ``.npz`` file with ``x`` and ``y``, checked against the model.

Format: ``x`` float32 of shape ``(N, *input_shape)`` already normalised as the manifest
says; ``y`` integer labels of shape ``(N,)`` in ``[0, num_classes)``; optional ``meta``,
a JSON string (client id, source data set, partition seed...). ``zowarmup partition``
writes such files; any tool that writes numpy can.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocols.errors import ProtocolError
from protocols.manifest import Manifest


@dataclass(frozen=True)
class Shard:
    x: np.ndarray
    y: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batches(self, size: int):
        for start in range(0, len(self), size):
            yield self.x[start:start + size], self.y[start:start + size]


def load_shard(path: Path, manifest: Manifest) -> Shard:
    """Read and check a shard; every refusal says what is wrong and what the model expects."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise ProtocolError(f"shard {path} does not exist", "missing_file") from None
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ProtocolError(f"shard {path} is not a readable .npz file: {exc}",
                            "bad_shard") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise ProtocolError(f"shard {path} has no {key!r} array (it has "
                                f"{sorted(arrays) or 'none'})", "bad_shard")
    return check_shard(Shard(arrays["x"], arrays["y"], _meta(arrays.get("meta"), path)),
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
    if not np.isfinite(x).all():
        raise ProtocolError(f"{where}: x holds NaN or infinite values", "bad_shard")
    return Shard(np.ascontiguousarray(x), y.astype(np.int64), shard.meta)


def _meta(raw: np.ndarray | None, path: Path) -> dict:
    if raw is None:
        return {}
    try:
        meta = json.loads(str(raw))
    except ValueError:
        raise ProtocolError(f"shard {path}: 'meta' must be a JSON string", "bad_shard") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"shard {path}: 'meta' must be a JSON object", "bad_shard")
    return meta


def save_shard(path: Path, x: np.ndarray, y: np.ndarray, meta: dict | None = None) -> None:
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64), meta=json.dumps(meta or {}))
