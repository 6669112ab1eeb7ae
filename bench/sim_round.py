"""One simulated ZO round of N clients: the agent's engine in worker processes against the
torch engine, side by side in one run.

    python bench/sim_round.py [--clients 50] [--samples 1000] [--device auto]

The paper's CIFAR-10 round: ResNet-18 with GroupNorm (10 classes, 32x32 inputs), every
client with ``--samples`` samples, s = 4 directions, one local step. Both engines run the
product's own round (``RoundLoop.run_round``: coordinator, results, commit applied to the
state and to every holder) from the same exported model and shards:

* ``onnxruntime``: ``WorkerFleet``, the agent's ``ZoEngine`` in one worker process per core,
  one ONNX Runtime thread each, as ``zowarmup run --simulate`` runs it;
* ``torch``: ``TorchFleet`` on ``--device`` (CUDA when torch sees a GPU, else CPU).

Each fleet runs a first round untimed (a warm-up: sessions, kernels, allocations), then the
timed one. Prints one JSON line: seconds per round and client-forwards per second (a
client-forward is one pass over one client's shard; a round has 2 s N of them) for each
engine, and their ratio; with the warm-up's cost measured on the same device (one SGD step
of 64 samples), the projected hours of the paper's whole run (200 warm-up rounds of 15
clients x 3 epochs x 16 steps, then 300 ZO rounds of 50 clients, the round scaled linearly
from N clients to 50; evaluation left out, a few minutes) for each engine.

The shards' inputs are seeded Gaussian noise: neither time depends on pixel values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

S = 4  # directions per client and round
PAPER = {"clients": 50, "warmup_rounds": 200, "warmup_steps": 15 * 3 * 16, "zo_rounds": 300}


def prepare(work: Path, clients: int, samples: int) -> tuple[Path, dict[str, Path]]:
    import numpy as np
    import torch

    from edge_agent.shard import save_shard
    from export import export_model
    from orchestrator.train.zoo import build_model
    model_dir = work / "model"
    if not (model_dir / "manifest.json").exists():
        torch.manual_seed(0)
        export_model(build_model("resnet18-gn", 10, 3, 32), model_dir, (3, 32, 32), 10,
                     model_name="resnet18-gn")
    rng = np.random.default_rng(0)
    shards = {}
    for i in range(clients):
        shards[f"client-{i:03d}"] = path = work / f"client-{i:03d}.npz"
        if not path.exists():
            save_shard(path, rng.standard_normal((samples, 3, 32, 32), dtype=np.float32),
                       rng.integers(0, 10, samples))
    return model_dir, shards


def one_round(engine: str, model_dir: Path, shards: dict[str, Path], device) -> float:
    """The seconds of one timed round (after an untimed one) of ``engine``'s fleet."""
    from orchestrator.config import Config, ZoSection
    from orchestrator.rounds.loop import RoundLoop, start_coordinator
    from orchestrator.rounds.model import ModelState
    from orchestrator.rounds.torch_fleet import TorchFleet
    from orchestrator.rounds.workers import WorkerFleet
    from orchestrator.run.state import direction_spec, round_policy
    config = dataclasses.replace(Config(), zo=ZoSection(directions=S, deadline_s=86400.0))
    state = ModelState.load(model_dir, direction_spec(config))
    coordinator = start_coordinator(state, "bench", 0, round_policy(config), [])
    fleet = (TorchFleet(state, coordinator, shards, device) if engine == "torch"
             else WorkerFleet(state, coordinator, shards))
    try:
        loop = RoundLoop(state, coordinator, fleet)
        loop.run_round(sorted(shards))
        started = time.perf_counter()
        loop.run_round(sorted(shards))
        return time.perf_counter() - started
    finally:
        fleet.close()


def warmup_step(device) -> float:
    """One SGD step of ResNet-18 on 64 samples on ``device`` (the fastest of three)."""
    import torch
    import torch.nn.functional as F

    from orchestrator.train.zoo import build_model
    model = build_model("resnet18-gn", 10, 3, 32).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    times = []
    for _ in range(4):
        started = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the exported model and shards here between runs")
    args = parser.parse_args()
    from edge_agent.memory import usable_cores
    from orchestrator.train.fedavg import resolve_device
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir, shards = prepare(work, args.clients, args.samples)
        seconds = {e: one_round(e, model_dir, shards, device) for e in ("onnxruntime", "torch")}
    step = warmup_step(device)
    forwards = 2 * S * args.clients
    report = {"model": "resnet18-gn", "clients": args.clients, "samples": args.samples, "s": S,
              "device": str(device), "cores": usable_cores(),
              "gpu": _gpu_name(device), "warmup_step_s": round(step, 4)}
    for engine, secs in seconds.items():
        zo_h = PAPER["zo_rounds"] * secs * PAPER["clients"] / args.clients / 3600
        warm_h = PAPER["warmup_rounds"] * PAPER["warmup_steps"] * step / 3600
        report[engine] = {"round_s": round(secs, 3),
                          "client_forwards_per_s": round(forwards / secs, 3),
                          "paper_run_projected_h": round(zo_h + warm_h, 2),
                          "paper_zo_projected_h": round(zo_h, 2)}
    report["torch_speedup"] = round(seconds["onnxruntime"] / seconds["torch"], 3)
    report["paper_warmup_projected_h"] = round(
        PAPER["warmup_rounds"] * PAPER["warmup_steps"] * step / 3600, 2)
    print(json.dumps(report))


def _gpu_name(device) -> str | None:
    import torch
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


if __name__ == "__main__":
    main()
