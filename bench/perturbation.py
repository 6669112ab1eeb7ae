"""Cost of one seeded direction applied in place, against a plain axpy over the same memory.

Prints one JSON line. The tensors have the shapes of ResNet-18's (11.2 M parameters), so
chunking sees real tensor sizes. ``ns_per_param_generate_apply``: regenerate z from the
seed and do ``w += c * z`` in place (what a perturbation costs, and each pair of a commit
applied pair by pair; ``bench/commit_apply.py`` measures the summed rule);
``ns_per_param_axpy``: ``w += c * z`` with z precomputed (the floor any update pays).

    python bench/perturbation.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from protocols.directions import DirectionSpec, axpy


def resnet18_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            c_in = cin if block == 0 else cout
            shapes += [(cout, c_in, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and (stride != 1 or c_in != cout):
                shapes += [(cout, c_in, 1, 1), (cout,), (cout,)]
        cin = cout
    return shapes + [(num_classes, 512), (num_classes,)]


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in resnet18_shapes()]
    zs = [np.where(rng.random(w.shape) < 0.5, -1, 1).astype(np.float32) for w in weights]
    params = sum(w.size for w in weights)
    c = np.float32(1e-3)

    def plain_axpy() -> None:
        for w, z in zip(weights, zs):
            w += c * z

    seeds = iter(range(1, 10**6))
    rademacher = best_of(args.repeat, lambda: axpy(weights, 1e-3, DirectionSpec(), next(seeds)))
    gaussian = best_of(2, lambda: axpy(weights, 1e-3, DirectionSpec("gaussian"), next(seeds)))
    floor = best_of(args.repeat, plain_axpy)
    print(json.dumps({
        "params": params,
        "ns_per_param_generate_apply": round(rademacher / params * 1e9, 3),
        "ns_per_param_axpy": round(floor / params * 1e9, 3),
        "ratio": round(rademacher / floor, 2),
        "ns_per_param_generate_apply_gaussian": round(gaussian / params * 1e9, 3),
        "numpy": np.__version__,
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
