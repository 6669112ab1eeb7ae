"""The native forward strategy on arm64: the layouts ONNX Runtime picks there, and the bits.

Part of scripts/arm64-check. ONNX Runtime compiles its own graph for the CPU it runs on:
on x86 it reorders convolution weights into blocked layouts (NCHWc), on ARM it keeps
others, and the agent holds the weights in whichever layout that is. For each model this
exports it on x86 (the zoo, seed 0), then on every side holds it with the native strategy,
runs a ZO round that must restore the exact bits, applies three commits, and compares the
fingerprint with plain numpy applying the same commits to the row-major weights:

    python scripts/arm64_native.py --work ROOT/tmp/native --arm64-path /tmp/native \\
        --arm64-launcher "scripts/arm64-check --in-root" --models cnn,vit

`python arm64_native.py engine MODEL_DIR` is the per-side part (no torch needed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMITS = [(r, ((1000 + r, 0.01), (2000 + r, -0.02))) for r in range(3)]
SAMPLES = 4


def engine_side(model_dir: Path) -> dict:
    """This machine's native engine: its layouts, a round's exactness, the fingerprint."""
    from collections import Counter

    import numpy as np

    from edge_agent.engine import ZoEngine
    from edge_agent.shard import Shard
    from protocols.manifest import load_manifest
    from protocols.messages import CommitMessage
    from protocols.zo import Commit
    manifest = load_manifest(model_dir)
    rng = np.random.default_rng(0)
    shard = Shard(rng.standard_normal((SAMPLES, *manifest.input_shape), dtype=np.float32),
                  rng.integers(0, manifest.num_classes, SAMPLES))
    engine = ZoEngine(model_dir, shard, micro_batch=SAMPLES, threads=2, manifest=manifest,
                      strategy="native")
    layouts = Counter("row-major" if lay.identity else
                      f"blocked {lay.block}" if lay.block > 1 else "transposed"
                      for lay in engine.native.layouts)
    before = engine.fingerprint()
    engine.round([11, 12], eps=1e-3)
    restored = engine.fingerprint() == before
    fp = engine.apply([CommitMessage(Commit(r, pairs), "") for r, pairs in COMMITS])
    return {"layouts": dict(layouts), "round_restores_bits": restored, "fingerprint": fp}


def reference(model_dir: Path) -> str:
    """Plain numpy on the row-major weights: the bits every holder must have."""
    from protocols.directions import DirectionSpec
    from protocols.manifest import load_manifest, read_weights
    from protocols.zo import Commit, apply_commit, fingerprint
    weights = read_weights(model_dir, load_manifest(model_dir))[1]
    for r, pairs in COMMITS:
        apply_commit(weights, Commit(r, pairs), DirectionSpec())
    return fingerprint(weights)


def export(work: Path, name: str) -> Path:
    import torch

    from export import export_model
    from orchestrator.train.zoo import build_model
    out = work / name
    if not (out / "manifest.json").exists():
        torch.manual_seed(0)
        export_model(build_model(name, 10, 3, 32), out, (3, 32, 32), 10, model_name=name)
    return out


def check(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    args.work.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, args.work / "arm64_native.py")
    inside = Path(args.arm64_path)
    failed = 0
    for name in args.models.split(","):
        model_dir = export(args.work, name)
        want = reference(model_dir)
        x86 = engine_side(model_dir)
        cmd = [*shlex.split(args.arm64_launcher), "python", str(inside / "arm64_native.py"),
               "engine", str(inside / name)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(f"{name}: the arm64 side failed:\n{done.stderr[-3000:]}", flush=True)
            failed += 1
            continue
        arm = json.loads(done.stdout.strip().splitlines()[-1])
        same = all(side["fingerprint"] == want and side["round_restores_bits"]
                   for side in (x86, arm))
        failed += not same
        print(f"{name}: {'equal' if same else 'DIFFERENT'}\n"
              f"  numpy reference      {want}\n"
              f"  x86 native   {x86['fingerprint']}  layouts {x86['layouts']}\n"
              f"  arm64 native {arm['fingerprint']}  layouts {arm['layouts']}", flush=True)
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "engine":
        print(json.dumps(engine_side(Path(sys.argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--arm64-path", required=True)
    parser.add_argument("--arm64-launcher", required=True)
    parser.add_argument("--models", default="cnn,vit")
    return check(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
