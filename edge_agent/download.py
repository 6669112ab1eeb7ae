"""Fetching a model over MQTT: retained chunks of each file, checked against their hashes.

The orchestrator publishes each file of the model directory (and weight snapshots) as
retained chunks on ``zowarmup/<run>/model/<file>/<index>``. A late joiner subscribes and
gets them all from the broker, with no orchestrator round trip. Nothing is used until
every byte is there and the file's SHA-256 (or, for a snapshot, the weights'
fingerprint) matches.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from protocols import topics
from protocols.errors import ProtocolError
from protocols.manifest import MANIFEST, Manifest, file_sha256
from protocols.messages import ModelAnnounce


@dataclass
class FileDownload:
    name: str
    size: int
    chunk_bytes: int
    sha256: str = ""  # "" for snapshots, which are checked by fingerprint after loading
    chunks: dict[int, bytes] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return max(1, -(-self.size // self.chunk_bytes))

    @property
    def complete(self) -> bool:
        return len(self.chunks) == self.count

    def add(self, index: int, payload: bytes) -> None:
        if not 0 <= index < self.count:
            raise ProtocolError(f"{self.name}: chunk {index} of {self.count}", "bad_chunk")
        expected = min(self.chunk_bytes, self.size - index * self.chunk_bytes)
        if len(payload) != expected:
            raise ProtocolError(f"{self.name}: chunk {index} has {len(payload)} bytes, expected "
                                f"{expected}", "bad_chunk")
        self.chunks[index] = bytes(payload)

    def write(self, directory: Path) -> None:
        data = b"".join(self.chunks[i] for i in range(self.count))[:self.size]
        if self.sha256 and hashlib.sha256(data).hexdigest() != self.sha256:
            raise ProtocolError(f"{self.name}: downloaded bytes do not match the manifest's "
                                "SHA-256", "bad_file")
        tmp = directory / f".{self.name}.part"
        tmp.write_bytes(data)
        os.replace(tmp, directory / self.name)


class ModelDownload:
    """The files one announcement needs that are not already on disk."""

    def __init__(self, run_id: str, announce: ModelAnnounce, manifest: Manifest,
                 directory: Path) -> None:
        self.run_id = run_id
        self.announce = announce
        self.manifest = manifest
        self.directory = directory
        self.files: dict[str, FileDownload] = {}
        for name, info in manifest.files.items():
            if not _has(directory / name, info["bytes"], info["sha256"]):
                self.files[name] = FileDownload(name, info["bytes"], announce.chunk_bytes,
                                                info["sha256"])
        if announce.snapshot:
            self.files[announce.snapshot] = FileDownload(
                announce.snapshot, 4 * manifest.num_parameters, announce.chunk_bytes)

    def filters(self) -> list[str]:
        return [f"{topics.model(self.run_id)}/{name}/+" for name in self.files]

    def offer(self, topic: str, payload: bytes) -> bool:
        """Take a chunk if it is one of ours; True when the topic belonged to this download."""
        prefix = topics.model(self.run_id) + "/"
        if not topic.startswith(prefix):
            return False
        name, _, index = topic[len(prefix):].partition("/")
        if name not in self.files or not index.isdigit():
            return False
        self.files[name].add(int(index), payload)
        return True

    @property
    def complete(self) -> bool:
        return all(f.complete for f in self.files.values())

    def finish(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for download in self.files.values():
            download.write(self.directory)
        (self.directory / MANIFEST).write_text(self.announce.manifest)


def _has(path: Path, size: int, sha256: str) -> bool:
    return path.is_file() and path.stat().st_size == size and file_sha256(path) == sha256


def parse_announced_manifest(announce: ModelAnnounce) -> Manifest:
    if hashlib.sha256(announce.manifest.encode()).hexdigest() != announce.model_sha256:
        raise ProtocolError("announced manifest does not match its model_sha256", "bad_manifest")
    return Manifest.from_json(announce.manifest)
