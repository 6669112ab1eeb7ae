"""What applying a round's commit costs every holder, and how much of a small step survives.

Prints one JSON line. The model is ResNet-18's parameters as float32 tensors (11.2 M), each
client evaluates ``s = 4`` directions, and rounds have K participants:

* ``apply_s``: seconds to apply one round's commit to all of ResNet-18, for distinct seeds
  (``K s`` directions) and pools of 64 and 256 (``min(pool, K s)`` directions), by the
  summed rule (``sum64``: one pass over the weights per chunk) and pair by pair
  (``pairwise``, the rule before it). A commit's cost depends only on its number of
  directions; counts past ``--measure-up-to`` are the fitted line ``a + b n`` through
  measured ones (``extrapolated_above``), since 40,000 directions take minutes.
* ``one_direction_s``: one direction applied pair by pair (what every pair used to cost).
* ``step_error``: the relative error ``|applied - exact| / |exact|`` of a round's step on
  weights at 1.0 (ResNet-18's normalisation gains: the worst case, where an ulp is
  largest), against the float64 sum, at per-pair coefficients 1e-6, 1e-7 and 3e-8 (random
  signs), for each K and seed scheme, by either rule. With a pool, a direction's
  coefficient is the sum of the coefficients of the pairs that share it.
* ``checks``: the targets of the commit rule (pool 256 at K = 10,000 within 1.2 x 256
  single directions, and 10 x below pair-by-pair distinct seeds at K = 1,000; the summed
  step's error at most 2 % at c = 1e-7 for K >= 200).

    python bench/commit_apply.py [--repeat 3] [--measure-up-to 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.perturbation import resnet18_shapes  # noqa: E402
from protocols.directions import PAIRWISE, SUM64, DirectionSpec, direction  # noqa: E402
from protocols.zo import Commit, apply_commit, derive_seed  # noqa: E402

S = 4
CLIENTS = (10, 100, 1000, 10_000)
POOLS = {"distinct": 0, "pool_64": 64, "pool_256": 256}
COEFFICIENTS = (1e-6, 1e-7, 3e-8)


def directions(k: int, pool: int) -> int:
    return min(pool, k * S) if pool else k * S


def timed(repeat: int, weights: list[np.ndarray], commit: Commit) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        apply_commit(weights, commit, DirectionSpec())
        best = min(best, time.perf_counter() - start)
    return best


def commit_of(n: int, rule: str, c: float = 1e-7, round_id: int = 0) -> Commit:
    return Commit(round_id, tuple((derive_seed(1, round_id, j, 0), c) for j in range(n)), rule)


def apply_times(args: argparse.Namespace) -> tuple[dict, float, float]:
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in resnet18_shapes()]
    counts = {directions(k, p) for k in CLIENTS for p in POOLS.values()}
    measured = sorted({1, 8, args.measure_up_to} | {n for n in counts if n <= args.measure_up_to})
    summed = {n: timed(args.repeat, weights, commit_of(n, SUM64)) for n in measured}
    slope, intercept = np.polyfit(measured, [summed[n] for n in measured], 1)
    one = timed(args.repeat, weights, commit_of(1, PAIRWISE))
    per_pair = timed(args.repeat, weights, commit_of(8, PAIRWISE)) / 8
    out = {}
    for k in CLIENTS:
        for name, pool in POOLS.items():
            n = directions(k, pool)
            out[f"K{k}_{name}"] = {
                "directions": n,
                "sum64": round(summed.get(n, intercept + slope * n), 4),
                "pairwise": round(per_pair * n, 4)}
    return out, one, summed[1]


def step_errors(gains: int) -> dict:
    """Relative error of one round's step on ``gains`` weights at 1.0, by rule."""
    spec, rng = DirectionSpec(), np.random.default_rng(1)
    out = {}
    for k in CLIENTS:
        for name, pool in POOLS.items():
            n = directions(k, pool)
            for c in COEFFICIENTS:
                signs = rng.choice([-1.0, 1.0], k * S)
                folded = np.zeros(n)
                np.add.at(folded, np.arange(k * S) % n, c * signs)  # a pool sums its slots'
                pairs = [(derive_seed(2, 0, j, 0), float(x)) for j, x in enumerate(folded)]
                exact = np.zeros(gains)
                for seed, x in pairs:
                    exact -= x * direction(spec, seed, 0, 0, gains).astype(np.float64)
                errors = {}
                for rule in (PAIRWISE, SUM64):
                    w = [np.ones(gains, np.float32)]
                    apply_commit(w, Commit(0, tuple(pairs), rule), spec)
                    step = w[0].astype(np.float64) - 1.0
                    errors[rule] = round(float(np.linalg.norm(step - exact)
                                               / np.linalg.norm(exact)), 4)
                out[f"K{k}_{name}_c{c:g}"] = errors
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--measure-up-to", type=int, default=256,
                        help="directions measured; longer commits follow the fitted line")
    parser.add_argument("--gains", type=int, default=4800,
                        help="weights at 1.0 in the error measurement (ResNet-18 has 4,800 "
                             "normalisation gains)")
    args = parser.parse_args()
    times, one, one_summed = apply_times(args)
    errors = step_errors(args.gains)
    pool256 = times["K10000_pool_256"]["sum64"]
    print(json.dumps({
        "params": int(sum(np.prod(s) for s in resnet18_shapes())), "s": S,
        "apply_s": times, "one_direction_s": {"pairwise": round(one, 4),
                                              "sum64": round(one_summed, 4)},
        "extrapolated_above": args.measure_up_to, "step_error": errors,
        "checks": {
            "pool256_K10000_within_1.2x_256_directions": pool256 <= 1.2 * 256 * one,
            "pool256_K10000_10x_below_pairwise_distinct_K1000":
                10 * pool256 <= times["K1000_distinct"]["pairwise"],
            "sum64_error_at_most_2pct_at_1e-7_for_K_ge_200": all(
                e[SUM64] <= 0.02 for key, e in errors.items()
                if key.endswith("_c1e-07") and int(key[1:key.index("_")]) >= 200)},
        "numpy": np.__version__, "machine": platform.machine()}))


if __name__ == "__main__":
    main()
