"""What each zoo model's ZO round needs on a board: peak memory and round time, per model.

    python bench/zoo_memory.py                      # on this machine
    python bench/zoo_memory.py --work ROOT/tmp/zoo --inside /tmp/zoo \\
        --launcher "scripts/arm64-check --in-root"  # in the emulated arm64 root

Exports every zoo model for CIFAR-sized inputs (3x32x32, 10 classes; seed 0) once into
--work, writes a shard of seeded Gaussian noise (memory and time do not depend on pixel
values), then runs `zowarmup-agent bench` for each model in a fresh process, so that each
peak (``peak_rss_mb``: the process's whole peak over one round, Python and ONNX Runtime
included) is that model's alone. With --daemon it measures the agent as a board runs it
instead: a real `zowarmup-agent run` against a loopback Mosquitto, which downloads the
model over MQTT, loads it and takes part in two rounds; ``daemon_peak_rss_mb`` is that
process's peak (VmHWM), download and all. With --launcher, the agent runs through that
command prefix (an emulated root sees --work as --inside). Prints one JSON line per model
and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("cnn", "resnet18-gn", "resnet18-bn", "vit")


def prepare(work: Path, models: list[str], samples: int) -> None:
    import numpy as np
    import torch

    from edge_agent.shard import save_shard
    from export import export_model
    from orchestrator.train.zoo import build_model
    for name in models:
        if not (work / name / "manifest.json").exists():
            torch.manual_seed(0)
            export_model(build_model(name, 10, 3, 32), work / name, (3, 32, 32), 10,
                         model_name=name)
    if (work / "shard.npz").exists():  # another measurement may be reading it now
        with np.load(work / "shard.npz") as old:
            if len(old["y"]) == samples:
                return
    rng = np.random.default_rng(0)
    save_shard(work / "shard.npz", rng.standard_normal((samples, 3, 32, 32), dtype=np.float32),
               rng.integers(0, 10, samples))


def bench(agent: list[str], model_dir: str, shard: str, args: argparse.Namespace) -> dict:
    cmd = [*agent, "bench", "--model", model_dir, "--data", shard,
           "--micro-batch", str(args.micro_batch), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def daemon(agent: list[str], model_dir: Path, shard: str, args: argparse.Namespace,
           work: Path) -> dict:
    """A real agent process joins a run of two rounds; its peak memory, read from /proc."""
    import os
    import signal

    from edge_agent.mqtt import MqttTransport
    from orchestrator.rounds.mqtt import mqtt_rounds
    from protocols.coordinator import RoundPolicy
    from tests.brokers import MosquittoBroker
    name = model_dir.name
    with MosquittoBroker(work / f"mosquitto-{name}") as broker:
        transport = MqttTransport(broker.url, client_id="bench-orchestrator")
        transport.connect(10)
        loop, fleet = mqtt_rounds(transport, model_dir, f"bench-{name}", 7,
                                  RoundPolicy(eps=1e-3, lr=1e-3, directions=1, deadline_s=3600))
        fleet.publish_model()
        cmd = [*agent, "run", "--broker", broker.url, "--data", shard, "--id", "board",
               "--run", f"bench-{name}", "--state-dir", f"{shard}.state-{name}",
               "--micro-batch", str(args.micro_batch), "--threads", str(args.threads)]
        with open(work / f"daemon-{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            if fleet.wait_for_agents(1, timeout=3600) != ["board"]:
                raise SystemExit(f"the agent did not join; see {work}/daemon-{name}.log")
            started = time.monotonic()
            for _ in range(2):
                loop.run_round(["board"])
            with open(f"/proc/{proc.pid}/status") as f:
                peak = next(int(line.split()[1]) / 1024 for line in f
                            if line.startswith("VmHWM:"))
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(60)
            transport.close()
    return {"model": name, "daemon_peak_rss_mb": round(peak, 1),
            "two_rounds_s": round(time.monotonic() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--inside", default=None, help="--work as the launcher sees it")
    parser.add_argument("--launcher", default=None, help="command prefix, e.g. an emulator")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--daemon", action="store_true",
                        help="measure a real `zowarmup-agent run` (download and two rounds)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="zoo-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    prepare(work, models, args.samples)
    inside = Path(args.inside) if args.inside else work
    agent = [*shlex.split(args.launcher), "zowarmup-agent"] if args.launcher else \
        [sys.executable, "-m", "edge_agent.cli"]
    if args.daemon:
        for name in models:
            print(json.dumps(daemon(agent, work / name, str(inside / "shard.npz"), args, work)),
                  flush=True)
        return
    rows = []
    for name in models:
        row = bench(agent, str(inside / name), str(inside / "shard.npz"), args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| model | parameters | strategy | peak RSS | round (s) | platform |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} | {r['strategy']} | "
              f"{r['peak_rss_mb']:.0f} MB | {r['round_s']:.1f} | {r['platform']} |")


if __name__ == "__main__":
    main()
