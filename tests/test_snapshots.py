"""Snapshots in the run directory: a resume replays at most ``snapshot_every`` rounds.

The run is a chain of real commits applied to a real model directory (manifest, weights);
resuming loads the orchestrator's state again and counts the pairs it applied on the way.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from orchestrator.rounds.model import ModelState
from orchestrator.rounds.snapshots import Snapshots
from protocols.directions import DirectionSpec
from protocols.errors import JournalError
from protocols.manifest import MANIFEST, Manifest, Parameter
from protocols.messages import CommitMessage
from protocols.zo import Commit, derive_seed

ROUNDS, EVERY, PAIRS = 23, 5, 6  # pairs per round


def model_dir(path):
    """A model directory with a real manifest and weights (the graph is never run)."""
    path.mkdir()
    shapes = [(16, 8), (8,), (300,)]
    weights = np.random.default_rng(0).standard_normal(sum(np.prod(s) for s in shapes))
    data = weights.astype("<f4").tobytes()
    (path / "weights.bin").write_bytes(data)
    (path / "model.onnx").write_bytes(b"never run")
    files = {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)}
             for n, d in (("weights.bin", data), ("model.onnx", b"never run"))}
    params, offset = [], 0
    for i, shape in enumerate(shapes):
        params.append(Parameter(f"p{i}", shape, offset))
        offset += int(np.prod(shape))
    manifest = Manifest("toy", "model.onnx", "weights.bin", tuple(params), "x", (4,), "y", 2,
                        files=files)
    (path / MANIFEST).write_text(manifest.to_json())
    return path


@pytest.fixture
def run(tmp_path):
    """A live run of ROUNDS commits, snapshotted every EVERY versions as the loop does."""
    model = model_dir(tmp_path / "model")
    snapshots = Snapshots(tmp_path / "snapshots", EVERY)
    live = ModelState.load(model, DirectionSpec())
    history = []
    for r in range(ROUNDS):
        commit = Commit(r, tuple((derive_seed(3, r, j, 0), (-1) ** j * 1e-3 / (j + 1))
                                 for j in range(PAIRS)))
        live.apply(commit)
        history.append(CommitMessage(commit, live.fingerprint()))
        if snapshots.due(r + 1):
            snapshots.write(r + 1, live.flat, live.fingerprint())
    return model, snapshots, live, history


def test_resume_replays_only_the_rounds_after_the_newest_snapshot(run):
    model, snapshots, live, history = run
    assert snapshots.versions() == [20, 15]  # the newest two are kept
    assert not list(snapshots.directory.glob("*.tmp"))
    resumed = ModelState.load(model, DirectionSpec(), history, snapshots=snapshots)
    assert resumed.base_version == 20
    assert resumed.pairs_applied == (ROUNDS - 20) * PAIRS <= EVERY * PAIRS
    assert resumed.flat.tobytes() == live.flat.tobytes()
    full = ModelState.load(model, DirectionSpec(), history)  # no snapshots: the whole journal
    assert full.pairs_applied == ROUNDS * PAIRS and full.flat.tobytes() == live.flat.tobytes()


def test_a_damaged_snapshot_is_passed_over_for_an_older_one(run):
    model, snapshots, live, history = run
    path = snapshots.path(20)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the weights: the checksum fails
    path.write_bytes(bytes(data))
    resumed = ModelState.load(model, DirectionSpec(), history, snapshots=snapshots)
    assert resumed.base_version == 15 and resumed.pairs_applied == (ROUNDS - 15) * PAIRS
    assert resumed.flat.tobytes() == live.flat.tobytes()
    path.write_bytes(bytes(data[:100]))  # cut short
    assert ModelState.load(model, DirectionSpec(), history,
                           snapshots=snapshots).base_version == 15


def test_a_snapshot_the_journal_does_not_vouch_for_is_never_loaded(run):
    model, snapshots, live, history = run
    short = history[:18]  # the journal lost its last rounds: the snapshot of 20 is ahead
    resumed = ModelState.load(model, DirectionSpec(), short, snapshots=snapshots)
    assert resumed.base_version == 15 and resumed.fingerprint() == short[-1].fingerprint
    other = list(history)  # another run's journal: fingerprints differ from the snapshots'
    other[14] = CommitMessage(other[14].commit, "0" * 32)
    other[19] = CommitMessage(other[19].commit, "0" * 32)
    with pytest.raises(JournalError):  # replays from the exported weights, then disowns it
        ModelState.load(model, DirectionSpec(), other[:20], snapshots=snapshots)


def test_snapshot_settings_are_checked():
    with pytest.raises(ValueError):
        Snapshots("x", 0)
