"""One agent ZO round against plain inference, a torch ZO client and a first-order client.

    python bench/agent_round.py [--threads 2] [--samples 1000] [--strategy auto]

ResNet-18 (GroupNorm, 10 classes, 32x32 inputs), a 1,000-sample shard in 64-sample
micro-batches, s = 1. Each memory figure comes from its own fresh process, so no figure
carries another's peak:

* ``zo_peak_rss_mb``: a whole agent round (``ZoEngine``: load, verify, plan, perturb,
  2 passes over the shard, restore), the process's peak from start to end;
* ``ort_forward_rss_mb``: plain inference: the exported model loaded the ordinary way
  (weights as initializers, default session options) and one 64-sample forward;
* ``fo_peak_rss_mb``: the torch client a device would otherwise run: forward, backward and
  SGD step on 64-sample batches, the peak once it runs (over its first three steps: the
  second step sits ~100 MB above the first, where the heap settles);
  ``fo_first_step_rss_mb`` is the peak after the first step alone. A torch process's peak
  varies by ~10% from run to run, so both are medians over three processes;
* ``forward_opt_s``: one forward pass over the shard in the same micro-batches with the
  fastest session these weights allow (constants, every graph optimisation, arena on),
  after a warm-up pass: the floor a round is held to is ``2 * s * forward_opt_s``;
* ``torch_peak_rss_mb`` and ``torch_round_s``: the same ZO round by the torch client a
  user would otherwise write, MeZO's and FedKSeed's way: torch on the device's CPU, the
  weights held once and perturbed in place (restored by subtraction), the shard in memory,
  64-sample batches (``TorchEngine(exact=False)``, ``orchestrator/rounds/torch_engine.py``:
  torch, numpy and the zoo model, no ONNX Runtime in the process). Its peak from start to
  end, and the round's time, beside the agent's.

The shard's inputs are seeded Gaussian noise: neither time nor memory depends on pixel
values. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MICRO_BATCH = 64


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("needs Linux /proc")


def prepare(work: Path, samples: int) -> tuple[Path, Path]:
    import numpy as np
    import torch

    from edge_agent.shard import save_shard
    from export import export_model
    from orchestrator.train.zoo import build_model
    model_dir, shard = work / "model", work / "shard.npz"
    if not (model_dir / "manifest.json").exists():
        torch.manual_seed(0)
        export_model(build_model("resnet18-gn", 10, 3, 32), model_dir, (3, 32, 32), 10,
                     model_name="resnet18-gn")
    rng = np.random.default_rng(0)
    save_shard(shard, rng.standard_normal((samples, 3, 32, 32), dtype=np.float32),
               rng.integers(0, 10, samples))
    return model_dir, shard


def child_zo(model_dir: Path, shard_path: Path, threads: int, strategy: str) -> dict:
    from edge_agent.engine import ZoEngine
    from edge_agent.shard import load_shard
    from protocols.manifest import load_manifest
    manifest = load_manifest(model_dir)
    engine = ZoEngine(model_dir, load_shard(shard_path, manifest), micro_batch=MICRO_BATCH,
                      threads=threads, manifest=manifest, strategy=strategy)
    out = engine.round([12345], eps=1e-3)
    return {"zo_peak_rss_mb": peak_mb(), "zo_round_s": out.seconds,
            "strategy": engine.strategy, "undo_elements": out.undo_elements}


def _plain_session(model_dir: Path, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_dir / "model.const.onnx"), options,
                                providers=["CPUExecutionProvider"])


def child_ort(model_dir: Path, shard_path: Path, threads: int) -> dict:
    import numpy as np
    with np.load(shard_path) as data:
        x, y = data["x"][:MICRO_BATCH], data["y"][:MICRO_BATCH]
    _plain_session(model_dir, threads).run(None, {"x": x, "y": y})
    return {"ort_forward_rss_mb": peak_mb()}


def child_forward(model_dir: Path, shard_path: Path, threads: int) -> dict:
    import numpy as np
    with np.load(shard_path) as data:
        x, y = data["x"], data["y"]
    session = _plain_session(model_dir, threads)

    def one_pass() -> float:
        started = time.perf_counter()
        for i in range(0, len(y), MICRO_BATCH):
            session.run(None, {"x": x[i:i + MICRO_BATCH], "y": y[i:i + MICRO_BATCH]})
        return time.perf_counter() - started
    one_pass()
    return {"forward_opt_s": min(one_pass() for _ in range(2))}


def child_torch(model_dir: Path, shard_path: Path, threads: int) -> dict:
    import numpy as np
    import torch

    from orchestrator.rounds.torch_engine import Job, TorchEngine
    from orchestrator.train.zoo import build_model
    from protocols.directions import DirectionSpec
    from protocols.manifest import load_manifest, read_weights
    torch.set_num_threads(threads)
    manifest = load_manifest(model_dir)
    model = build_model("resnet18-gn", 10, 3, 32)  # as a user's client loads its checkpoint
    with torch.no_grad():
        for param, w in zip(model.parameters(), read_weights(model_dir, manifest)[1]):
            param.copy_(torch.from_numpy(w))
    engine = TorchEngine(model, DirectionSpec(), "cpu", micro_batch=MICRO_BATCH,
                         batch=MICRO_BATCH, exact=False)
    with np.load(shard_path) as data:
        engine.set_data(data["x"], data["y"])
    out = engine.rounds([Job(0, len(engine.y), (12345,))], eps=1e-3)[0]
    return {"torch_peak_rss_mb": peak_mb(), "torch_round_s": out.seconds}


FO_STEPS = 3
FO_RUNS = 3


def child_fo(threads: int) -> dict:
    import torch

    from orchestrator.train.zoo import build_model
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("resnet18-gn", 10, 3, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    peaks = []
    for _ in range(FO_STEPS):  # as the warm-up clients' local SGD does
        x, y = torch.randn(MICRO_BATCH, 3, 32, 32), torch.randint(0, 10, (MICRO_BATCH,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        peaks.append(peak_mb())
    return {"fo_peak_rss_mb": peaks[-1], "fo_first_step_rss_mb": peaks[0]}


def run_child(kind: str, args: argparse.Namespace, model_dir: Path, shard: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--threads", str(args.threads),
           "--strategy", args.strategy, "--model-dir", str(model_dir), "--shard", str(shard)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                                                                   "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise SystemExit(f"{kind} measurement failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--strategy", default="auto",
                        choices=["auto", "native", "inputs", "constants"])
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the exported model here between runs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = {"zo": lambda: child_zo(args.model_dir, args.shard, args.threads, args.strategy),
                  "ort": lambda: child_ort(args.model_dir, args.shard, args.threads),
                  "forward": lambda: child_forward(args.model_dir, args.shard, args.threads),
                  "fo": lambda: child_fo(args.threads),
                  "torch": lambda: child_torch(args.model_dir, args.shard, args.threads),
                  }[args.child]()
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir, shard = prepare(work, args.samples)
        figures: dict = {}
        for kind in ("forward", "zo", "ort", "torch"):
            figures.update(run_child(kind, args, model_dir, shard))
        fo = [run_child("fo", args, model_dir, shard) for _ in range(FO_RUNS)]
        for key in fo[0]:
            figures[key] = statistics.median(run[key] for run in fo)
        figures["fo_runs"] = [round(run["fo_peak_rss_mb"], 1) for run in fo]
    s = 1
    report = {
        "model": "resnet18-gn", "samples": args.samples, "micro_batch": MICRO_BATCH, "s": s,
        "threads": args.threads, "strategy": figures["strategy"],
        "zo_peak_rss_mb": round(figures["zo_peak_rss_mb"], 1),
        "ort_forward_rss_mb": round(figures["ort_forward_rss_mb"], 1),
        "fo_peak_rss_mb": round(figures["fo_peak_rss_mb"], 1),
        "fo_first_step_rss_mb": round(figures["fo_first_step_rss_mb"], 1),
        "fo_runs": figures["fo_runs"],
        "zo_round_s": round(figures["zo_round_s"], 3),
        "forward_opt_s": round(figures["forward_opt_s"], 3),
    }
    report["fo_over_zo"] = round(report["fo_peak_rss_mb"] / report["zo_peak_rss_mb"], 2)
    report["zo_over_ort_forward"] = round(report["zo_peak_rss_mb"]
                                          / report["ort_forward_rss_mb"], 2)
    report["round_over_floor"] = round(report["zo_round_s"] / (2 * s * report["forward_opt_s"]),
                                       3)
    report["torch_peak_rss_mb"] = round(figures["torch_peak_rss_mb"], 1)
    report["torch_round_s"] = round(figures["torch_round_s"], 3)
    report["torch_over_zo_rss"] = round(report["torch_peak_rss_mb"] / report["zo_peak_rss_mb"], 2)
    report["torch_over_zo_time"] = round(report["torch_round_s"] / report["zo_round_s"], 2)
    report["targets_met"] = (report["fo_over_zo"] >= 4 and report["zo_over_ort_forward"] <= 1.5
                             and report["round_over_floor"] <= 1.15)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
