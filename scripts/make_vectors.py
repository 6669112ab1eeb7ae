"""Write protocols/vectors.json: the pinned test vectors of the direction and commit spec.

Run once when the spec is defined; never to make a failing selftest pass. The Philox
words come from the plain-integer reference, not from numpy, so the file pins the spec.
"""

from __future__ import annotations

import json
from pathlib import Path

from protocols.directions import DirectionSpec, direction, reference_block
from protocols.selftest import _digest, _float_hex, vector_weights
from protocols.zo import Commit, apply_commit, derive_seed, fingerprint


def main() -> None:
    philox = [{"seed": s, "tensor_index": t, "block": b,
               "words": [f"{w:016x}" for w in reference_block(s, t, b)]}
              for s, t, b in [(0, 0, 0), (1, 0, 0), (42, 3, 0), (42, 3, 1), (2**64 - 1, 7, 1000),
                              (123456789, 2**20, 5)]]
    directions = []
    for dist, scale in [("rademacher", 1.0), ("rademacher", 0.5), ("gaussian", 1.0)]:
        for seed, tensor, start in [(1, 0, 0), (1, 1, 0), (987654321, 4, 256), (5, 0, 65536)]:
            z = direction(DirectionSpec(dist, scale), seed, tensor, start, 1000)
            directions.append({"distribution": dist, "scale": scale, "seed": seed,
                               "tensor_index": tensor, "start": start, "count": 1000,
                               "head": _float_hex(z[:16]), "sha256": _digest(z)})
    shapes = [[3, 5], [7], [300], [2, 2, 70000]]
    apply = []
    for dist, scale in [("rademacher", 1.0), ("gaussian", 1.0), ("rademacher", 0.25)]:
        spec = DirectionSpec(dist, scale)
        commits = [Commit(r, tuple((derive_seed(9, r, c, 0), (-1) ** c * 1e-3 / (r + 1 + c))
                                   for c in range(3))) for r in range(3)]
        weights = vector_weights(shapes)
        before = fingerprint(weights)
        after = []
        for commit in commits:
            apply_commit(weights, commit, spec)
            after.append(fingerprint(weights))
        apply.append({"distribution": dist, "scale": scale, "shapes": shapes,
                      "commits": [{"round": c.round,
                                   "pairs": [[f"{s:016x}", x] for s, x in c.pairs]}
                                  for c in commits],
                      "fingerprint_before": before, "fingerprints_after": after})
    seeds = [{"run_seed": a, "round": r, "client": c, "direction": d,
              "seed": f"{derive_seed(a, r, c, d):016x}"}
             for a, r, c, d in [(0, 0, 0, 0), (1, 0, 0, 0), (7, 299, 49, 3)]]
    out = Path(__file__).resolve().parents[1] / "protocols" / "vectors.json"
    out.write_text(json.dumps({"spec_version": 1, "philox": philox, "directions": directions,
                               "apply": apply, "derive_seed": seeds}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
