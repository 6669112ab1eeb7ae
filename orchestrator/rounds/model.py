"""The orchestrator's copy of the model: the exported files and the weights every holder shares.

The exported weights plus the journal's commits are the state (DESIGN: "the journal is the
truth"), so the state is built by replaying them, from the newest snapshot the journal
vouches for (``snapshots.py``) when there is one, and checked against the fingerprint the
journal recorded after the last one: a run never resumes on weights the journal disowns.
``apply`` is the one way a commit reaches these weights, live or replayed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols.directions import DirectionSpec
from protocols.errors import JournalError
from protocols.manifest import MANIFEST, Manifest, load_manifest, read_weights
from protocols.messages import CommitMessage
from protocols.zo import Commit, apply_commit, fingerprint

from .snapshots import Snapshots

Delta = list[np.ndarray]  # an update beside a round's commit (the hi+lo ablation's)


@dataclass(eq=False)
class ModelState:
    model_dir: Path
    manifest: Manifest
    manifest_text: str
    flat: np.ndarray  # every weight, one float32 buffer
    weights: list[np.ndarray]  # views into ``flat``, one per tensor, in manifest order
    spec: DirectionSpec
    pairs_applied: int = 0  # (seed, coefficient) pairs applied since loading, replay included
    base_version: int = 0  # the version loaded before any commit: 0, or a snapshot's

    @classmethod
    def load(cls, model_dir: Path, spec: DirectionSpec, history: Sequence[CommitMessage] = (),
             deltas: Mapping[int, Delta] | None = None,
             snapshots: Snapshots | None = None) -> ModelState:
        """The exported weights with the journaled commits (and their deltas) applied:
        from the newest snapshot that matches the journal, if any, replaying only the
        commits after it."""
        model_dir = Path(model_dir)
        manifest = load_manifest(model_dir)
        flat, weights = read_weights(model_dir, manifest)
        state = cls(model_dir, manifest, (model_dir / MANIFEST).read_text(), flat, weights, spec)
        for expected, message in enumerate(history):
            if message.commit.round != expected:  # a gap would silently give other weights
                raise JournalError(f"the journal's commit {expected} is for round "
                                   f"{message.commit.round}: round {expected} is missing")
        state.base_version = state._from_snapshot(snapshots, history)
        for message in history[state.base_version:]:
            state.apply(message.commit, (deltas or {}).get(message.commit.round))
        if history and history[-1].fingerprint != state.fingerprint():
            raise JournalError(f"replaying {len(history)} journaled commits gives fingerprint "
                               f"{state.fingerprint()}, the journal says "
                               f"{history[-1].fingerprint}")
        return state

    @property
    def model_sha256(self) -> str:
        """What agents check the announced model against: the manifest's SHA-256."""
        return hashlib.sha256(self.manifest_text.encode()).hexdigest()

    def _from_snapshot(self, snapshots: Snapshots | None,
                       history: Sequence[CommitMessage]) -> int:
        """Load the newest snapshot the journal vouches for; its version (0: none)."""
        for version in snapshots.versions() if snapshots is not None else ():
            if not 0 < version <= len(history):
                continue
            values = snapshots.read(version, history[version - 1].fingerprint, self.flat.size)
            if values is None:
                continue
            exported = self.flat.copy()
            self.flat[:] = values
            if self.fingerprint() == history[version - 1].fingerprint:
                return version
            self.flat[:] = exported  # (not the state it claims: passed over)
        return 0

    def apply(self, commit: Commit, delta: Delta | None = None) -> None:
        """A round's commit (and the update beside it, if any), in place: the one way."""
        apply_commit(self.weights, commit, self.spec)
        self.pairs_applied += len(commit.pairs)
        for w, d in zip(self.weights, delta or ()):
            w += d

    def fingerprint(self) -> str:
        return fingerprint(self.weights)
