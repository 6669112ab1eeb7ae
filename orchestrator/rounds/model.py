"""The orchestrator's copy of the model: the exported files and the weights every holder shares.

The exported weights plus the journal's commits are the state (DESIGN: "the journal is the
truth"), so the state is built by replaying them, and checked against the fingerprint the
journal recorded after the last one: a run never resumes on weights the journal disowns.
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

Delta = list[np.ndarray]  # an update beside a round's commit (the hi+lo ablation's)


@dataclass(eq=False)
class ModelState:
    model_dir: Path
    manifest: Manifest
    manifest_text: str
    flat: np.ndarray  # every weight, one float32 buffer
    weights: list[np.ndarray]  # views into ``flat``, one per tensor, in manifest order
    spec: DirectionSpec

    @classmethod
    def load(cls, model_dir: Path, spec: DirectionSpec, history: Sequence[CommitMessage] = (),
             deltas: Mapping[int, Delta] | None = None) -> ModelState:
        """The exported weights with the journaled commits (and their deltas) applied."""
        model_dir = Path(model_dir)
        manifest = load_manifest(model_dir)
        flat, weights = read_weights(model_dir, manifest)
        state = cls(model_dir, manifest, (model_dir / MANIFEST).read_text(), flat, weights, spec)
        for expected, message in enumerate(history):
            if message.commit.round != expected:  # a gap would silently give other weights
                raise JournalError(f"the journal's commit {expected} is for round "
                                   f"{message.commit.round}: round {expected} is missing")
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

    def apply(self, commit: Commit, delta: Delta | None = None) -> None:
        apply_commit(self.weights, commit, self.spec)
        for w, d in zip(self.weights, delta or ()):
            w += d

    def fingerprint(self) -> str:
        return fingerprint(self.weights)
