"""Weight snapshots in the run directory: a resume replays at most ``every`` rounds.

The journal is the truth: the exported weights plus its commits give the bits of any round.
A snapshot only shortens the way there. Every ``every`` versions the round loop writes the
weights, after the commit that made them is journaled, atomically (a temporary file,
fsync, rename, fsync of the directory), and keeps the newest ``keep``. Resuming
(``ModelState.load``) starts from the newest snapshot that holds, and replays only the
commits after it.

A snapshot holds only when its bytes match the SHA-256 in its header and its fingerprint is
the one the journal recorded for its version (which the loaded weights are checked against
again); any other is passed over for an older one, and with none the whole journal is
replayed. File::

    b"ZOWSNAP1\\n" | uint64 LE version | fingerprint (16 bytes) | SHA-256 of the weights
    (32 bytes) | the weights: float32 LE, every tensor in manifest order
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from pathlib import Path

import numpy as np

log = logging.getLogger("zowarmup.rounds")

MAGIC = b"ZOWSNAP1\n"
_HEAD = struct.Struct("<Q16s32s")
_NAME = re.compile(r"snapshot-(\d{8,})\.bin")


class Snapshots:
    """The snapshots of one run directory (``directory`` is made on the first write)."""

    def __init__(self, directory: Path, every: int, keep: int = 2) -> None:
        if every < 1 or keep < 1:
            raise ValueError("snapshots: every and keep must be >= 1")
        self.directory, self.every, self.keep = Path(directory), every, keep

    def path(self, version: int) -> Path:
        return self.directory / f"snapshot-{version:08d}.bin"

    def due(self, version: int) -> bool:
        return version > 0 and version % self.every == 0

    def write(self, version: int, flat: np.ndarray, fingerprint: str) -> Path:
        """The weights of state ``version`` (``flat``: every tensor, canonical), durably."""
        data = np.ascontiguousarray(flat, dtype="<f4").tobytes()
        head = _HEAD.pack(version, bytes.fromhex(fingerprint), hashlib.sha256(data).digest())
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(version)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + head)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in self.versions()[self.keep:]:
            self.path(old).unlink(missing_ok=True)
        return path

    def versions(self) -> list[int]:
        """The versions snapshotted here, newest first."""
        if not self.directory.is_dir():
            return []
        found = (_NAME.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def read(self, version: int, fingerprint: str, count: int) -> np.ndarray | None:
        """The ``count`` weights of the snapshot of ``version``, if it is whole and its
        fingerprint is ``fingerprint`` (the journal's); None, with the reason logged, if not."""
        path = self.path(version)
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("snapshot %s cannot be read (%s); passed over", path, exc)
            return None
        start = len(MAGIC) + _HEAD.size
        if len(data) != start + 4 * count or not data.startswith(MAGIC):
            log.warning("snapshot %s is not %d weights in the snapshot format; passed over",
                        path, count)
            return None
        stored, fp, digest = _HEAD.unpack_from(data, len(MAGIC))
        body = memoryview(data)[start:]
        if stored != version or fp.hex() != fingerprint:
            log.warning("snapshot %s is of another state than the journal's version %d; "
                        "passed over", path, version)
            return None
        if hashlib.sha256(body).digest() != digest:
            log.warning("snapshot %s fails its checksum; passed over", path)
            return None
        return np.frombuffer(body, dtype="<f4").astype(np.float32)
