"""Check this machine against the pinned vectors: the same bits as every other machine?

``zowarmup-agent selftest`` runs this on a new device before it joins a fleet. Each
check compares with ``vectors.json``, which was made once and is never regenerated in
place: a difference means this platform (numpy build, CPU) would drift from the fleet.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import numpy as np

from .directions import PAIRWISE, DirectionSpec, direction, raw_words, reference_block
from .zo import Commit, apply_commit, derive_seed, fingerprint, replay, slot_seeds


def load_vectors() -> dict:
    return json.loads(resources.files("protocols").joinpath("vectors.json").read_text())


def vector_weights(shapes: list[list[int]]) -> list[np.ndarray]:
    """Deterministic starting weights for the apply vectors: exact multiples of 1/16."""
    return [((np.arange(int(np.prod(s)), dtype=np.int64) % 17 - 8) / 16).astype(np.float32)
            .reshape(s) for s in shapes]


def _float_hex(values: np.ndarray) -> list[str]:
    return [f"{int(b):08x}" for b in np.asarray(values, dtype="<f4").view("<u4")]


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<f4").tobytes()).hexdigest()


def run_selftest(vectors: dict | None = None) -> list[str]:
    """Every difference from the pinned vectors, as a readable line; empty means all agree."""
    vectors = vectors or load_vectors()
    problems: list[str] = []
    for case in vectors["philox"]:
        want = [int(w, 16) for w in case["words"]]
        got = [int(w) for w in raw_words(case["seed"], case["tensor_index"], case["block"], 4)]
        ref = reference_block(case["seed"], case["tensor_index"], case["block"])
        if got != want:
            problems.append(f"philox stream {case}: numpy gives {[hex(g) for g in got]}")
        if ref != want:
            problems.append(f"philox reference {case}: gives {[hex(r) for r in ref]}")
    for case in vectors["directions"]:
        spec = DirectionSpec(case["distribution"], case["scale"])
        z = direction(spec, case["seed"], case["tensor_index"], case["start"], case["count"])
        head = _float_hex(z[:len(case["head"])])
        if head != case["head"] or _digest(z) != case["sha256"]:
            problems.append(f"{case['distribution']} direction (seed {case['seed']}, tensor "
                            f"{case['tensor_index']}, start {case['start']}): first values "
                            f"{head[:4]}..., want {case['head'][:4]}...")
    for case in vectors["apply"]:
        problems += _check_apply(case)
    for case in vectors.get("slot_seeds", []):
        got = slot_seeds(case["run_seed"], case["round"], case["per_client"], case["pool"],
                         case["clients"])
        if [f"{s:016x}" for s in got] != case["seeds"]:
            problems.append(f"slot_seeds with pool {case['pool']} gives other seeds")
    for case in vectors["derive_seed"]:
        got = derive_seed(case["run_seed"], case["round"], case["client"], case["direction"])
        if got != int(case["seed"], 16):
            args = tuple(case[k] for k in ("run_seed", "round", "client", "direction"))
            problems.append(f"derive_seed{args} gives {got:016x}, want {case['seed']}")
    return problems


def _check_apply(case: dict) -> list[str]:
    """A chain of commits by the case's rule (``pairwise``: the cases of spec version 1)."""
    spec = DirectionSpec(case["distribution"], case["scale"])
    rule = case.get("apply", PAIRWISE)
    commits = [Commit(c["round"], tuple((int(s, 16), x) for s, x in c["pairs"]), rule)
               for c in case["commits"]]
    weights = vector_weights(case["shapes"])
    problems = []
    if fingerprint(weights) != case["fingerprint_before"]:
        problems.append(f"fingerprint of the starting weights differs ({spec.distribution})")
    for commit, want in zip(commits, case["fingerprints_after"]):
        apply_commit(weights, commit, spec)
        if fingerprint(weights) != want:
            problems.append(f"{spec.distribution} ({rule}): weights after commit "
                            f"{commit.round} have "
                            f"fingerprint {fingerprint(weights)}, want {want}")
            break
    replayed = vector_weights(case["shapes"])
    replay(replayed, commits, spec)
    if any(not np.array_equal(a.view(np.uint32), b.view(np.uint32))
           for a, b in zip(weights, replayed)):
        problems.append(f"{spec.distribution}: replaying the commits differs from applying them "
                        "one by one")
    return problems
