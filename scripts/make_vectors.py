"""Write protocols/vectors.json: the pinned test vectors of the direction and commit spec.

Run once when the spec is defined; never to make a failing selftest pass. The Philox
words come from the plain-integer reference, not from numpy, so the file pins the spec.
Spec version 2 added the summed application (``sum64``) and direction pools; the cases of
version 1 (pair-by-pair application, which old journals replay with) are kept as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

from protocols.directions import PAIRWISE, SUM64, DirectionSpec, direction, reference_block
from protocols.selftest import _digest, _float_hex, vector_weights
from protocols.zo import Commit, apply_commit, derive_seed, fingerprint, slot_seeds


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
        pairwise = [Commit(r, tuple((derive_seed(9, r, c, 0), (-1) ** c * 1e-3 / (r + 1 + c))
                                    for c in range(3)), PAIRWISE) for r in range(3)]
        apply.append(apply_case(dist, scale, shapes, pairwise))
    for dist, scale in [("rademacher", 1.0), ("gaussian", 1.0), ("rademacher", 0.25)]:
        # 13 pairs: a full group of 8 and a short one; the last coefficient is far below half
        # an ulp of the weights, so only the summed rule keeps it
        summed = [Commit(r, tuple((derive_seed(9, r, c, 0), (-1) ** c * 1e-3 / (r + 1 + c))
                                  for c in range(12)) + ((derive_seed(9, r, 12, 0), 3e-9),),
                         SUM64) for r in range(3)]
        apply.append(apply_case(dist, scale, shapes, summed))
    pools = [{"run_seed": a, "round": r, "per_client": p, "pool": n, "clients": k,
              "seeds": [f"{x:016x}" for x in slot_seeds(a, r, p, n, k)]}
             for a, r, p, n, k in [(3, 0, 2, 0, 3), (3, 1, 2, 3, 4), (7, 5, 4, 16, 9)]]
    seeds = [{"run_seed": a, "round": r, "client": c, "direction": d,
              "seed": f"{derive_seed(a, r, c, d):016x}"}
             for a, r, c, d in [(0, 0, 0, 0), (1, 0, 0, 0), (7, 299, 49, 3)]]
    out = Path(__file__).resolve().parents[1] / "protocols" / "vectors.json"
    out.write_text(json.dumps({"spec_version": 2, "philox": philox, "directions": directions,
                               "apply": apply, "slot_seeds": pools, "derive_seed": seeds},
                              indent=1) + "\n")
    print(f"wrote {out}")


def apply_case(dist: str, scale: float, shapes: list[list[int]], commits: list[Commit]
               ) -> dict:
    """A chain of commits from the vector weights, with the fingerprint after each."""
    spec = DirectionSpec(dist, scale)
    weights = vector_weights(shapes)
    before = fingerprint(weights)
    after = []
    for commit in commits:
        apply_commit(weights, commit, spec)
        after.append(fingerprint(weights))
    case = {"distribution": dist, "scale": scale, "shapes": shapes,
            "commits": [{"round": c.round, "pairs": [[f"{s:016x}", x] for s, x in c.pairs]}
                        for c in commits],
            "fingerprint_before": before, "fingerprints_after": after}
    return case if commits[0].apply == PAIRWISE else {**case, "apply": commits[0].apply}


if __name__ == "__main__":
    main()
