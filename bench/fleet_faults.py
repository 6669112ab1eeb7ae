"""Faults: a fleet of real agents loses devices and its broker, and keeps its pace.

    python bench/fleet_faults.py --agents 20 --fraction 0.3 --broker-restart --restart-after 5

A real Mosquitto on loopback, ``--agents`` real ``zowarmup-agent`` processes (started as
``zowarmup run`` starts its local agents, each with a digits shard), and the product's own
round loop over its MQTT fleet with a journal. The fault schedule, drawn from ``--seed``:

- at a random ZO round, with its starts sent, ``--fraction`` of the agents are SIGKILLed
  (no result, no goodbye; the broker publishes their last wills);
- with ``--broker-restart``, at another random round after it, with that round's starts
  sent, the broker is SIGKILLed and started again on its port after ``--broker-down-s``,
  without its retained messages;
- with ``--restart-after K``, the killed agents are started again K rounds after the kill
  (from their state directories, as a device that reboots).

Prints one JSON line: the rounds completed; the median round wall time before the kill
and after it (the rounds that closed at a fault excluded: they are given on their own),
the worst round after the kill; results lost (a round an agent computed and sent a result
for, as its log says, that no commit holds); agents re-admitted (left out of a round as
offline, chosen again later), the killed ones among them; and processes left behind (every
agent process and broker this bench started, checked by PID after the run).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.mqtt import MqttTransport  # noqa: E402
from edge_agent.shard import save_shard  # noqa: E402
from protocols.coordinator import RoundPolicy  # noqa: E402
from protocols.journal import Journal  # noqa: E402

RUN = "faults"


class Broker:
    """Mosquitto on one loopback port, killable and restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join([
            f"listener {self.port} 127.0.0.1", "allow_anonymous true", "set_tcp_nodelay true",
            "persistence false", f"log_dest file {workdir / 'mosquitto.log'}",
            "log_type error", "log_type warning", "user root" if _root() else "", ""]))
        self.pids: list[int] = []
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pids.append(self.proc.pid)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


def _root() -> bool:
    import os
    return os.geteuid() == 0


def make_fleet(work: Path, agents: int) -> tuple[Path, dict[str, Path]]:
    """A small CNN for the digits, exported, and one shard of the digits per agent."""
    import torch
    from sklearn.datasets import load_digits

    from export import export_model
    from orchestrator.train.zoo import build_model
    torch.manual_seed(1)
    export_model(build_model("cnn", 10, in_channels=1, image_size=8, width=8), work / "model",
                 (1, 8, 8), 10, model_name="cnn")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    size = len(y) // agents
    shards = {}
    for i in range(agents):
        path = work / f"shard{i:03d}.npz"
        save_shard(path, x[i * size:(i + 1) * size], y[i * size:(i + 1) * size], {"client": i})
        shards[f"client-{i:03d}"] = path
    return work / "model", shards


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run(args: argparse.Namespace, work: Path) -> dict:
    from orchestrator.fleet.agents import LocalAgents
    from orchestrator.rounds.loop import Schedule, run_rounds
    from orchestrator.rounds.mqtt import mqtt_rounds
    rng = random.Random(args.seed)
    model_dir, shards = make_fleet(work, args.agents)
    kill_at = rng.randint(3, max(3, args.rounds // 3))
    killed = sorted(rng.sample(sorted(shards), round(args.fraction * args.agents)))
    broker_at = rng.randint(kill_at + 2, max(kill_at + 2, args.rounds - 8)) \
        if args.broker_restart else None
    restart_at = kill_at + args.restart_after if args.restart_after else None
    broker = Broker(work)
    broker.start()
    transport = MqttTransport(broker.url, client_id=f"zowarmup-{RUN}-orchestrator")
    transport.connect(10)
    journal = Journal.create(work / "journal", {"run_id": RUN, "base_version": 0})
    policy = RoundPolicy(eps=1e-2, lr=0.05, directions=args.directions,
                         deadline_s=args.deadline_s)
    loop, fleet = mqtt_rounds(transport, model_dir, RUN, args.seed, policy, journal=journal,
                              pool=sorted(shards), join_timeout_s=180)
    fleet.publish_model()
    agents = LocalAgents(broker.url, RUN, shards, work / "agents", model_dir)
    pids: set[int] = set()
    walls: dict[int, float] = {}
    rows: dict[int, tuple[list[str], dict, set[str]]] = {}

    def play(participants: list[str]):
        version = loop.coordinator.version
        if version == restart_at:
            for agent in killed:
                agents.start_one(agent)
                pids.add(agents.procs[agent].pid)
        started = time.monotonic()
        loop.open_round(participants)
        if version == kill_at:
            for agent in killed:
                agents.procs[agent].kill()
        if version == broker_at:
            broker.kill()
            time.sleep(args.broker_down_s)
            broker.start()
        commit = loop.finish_round(None, None, loop.collect())
        walls[version] = time.monotonic() - started
        return commit

    def record(report) -> None:
        rows[report.version] = (report.participants, report.skipped, set(report.results))

    agents.start()
    pids.update(p.pid for p in agents.procs.values())
    try:
        run_rounds(loop, Schedule(args.rounds, args.seed), lambda: {}, record, play)
    finally:
        agents.stop()
        transport.close()
        journal.close()
        broker.stop()
    time.sleep(1.0)
    left = [pid for pid in sorted(pids) + broker.pids if alive(pid)]
    sent = {(a, int(r)) for a in shards  # a round computed twice (its start sent again
            for r in re.findall(r"round (\d+): done in",  # after a reconnect) counts once
                                (work / "agents" / a / "agent.log").read_text(errors="replace"))}
    committed = {(a, v) for v, (_, _, answered) in rows.items() for a in answered}
    faults = {kill_at} | ({broker_at} if broker_at is not None else set())
    before = [walls[v] for v in range(1, kill_at)]  # round 0 waits for the fleet to join
    after = [w for v, w in walls.items() if v > kill_at and v not in faults]
    offline_once = {a for _, skipped, _ in rows.values() for a in skipped}
    readmitted = {a for a in offline_once
                  if any(a in rows[v][0] and any(a in rows[u][1] for u in rows if u < v)
                         for v in rows)}
    return {
        "agents": args.agents, "fraction_killed": args.fraction, "killed": len(killed),
        "kill_round": kill_at, "broker_restart_round": broker_at, "restart_round": restart_at,
        "deadline_s": args.deadline_s, "rounds_completed": len(rows),
        "median_round_s_before_kill": round(statistics.median(before), 3),
        "median_round_s_after_kill": round(statistics.median(after), 3),
        "worst_round_s_after_kill": round(max(after), 3),
        "kill_round_s": round(walls[kill_at], 3),
        "broker_restart_round_s": round(walls[broker_at], 3) if broker_at is not None else None,
        "results_sent": len(sent), "results_in_commits": len(committed),
        "results_lost": len(sent - committed),
        "agents_readmitted": len(readmitted),
        "killed_readmitted": len(readmitted & set(killed)),
        "processes_started": len(pids) + len(broker.pids),
        "processes_left_behind": len(left),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.3, help="share of agents killed")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--directions", type=int, default=4)
    parser.add_argument("--deadline-s", type=float, default=30.0)
    parser.add_argument("--broker-restart", action="store_true",
                        help="also SIGKILL and restart the broker at a later round")
    parser.add_argument("--broker-down-s", type=float, default=1.0)
    parser.add_argument("--restart-after", type=int, default=0, metavar="K",
                        help="start the killed agents again K rounds after the kill (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-faults-") as work:
        print(json.dumps(run(args, Path(work))), flush=True)


if __name__ == "__main__":
    main()
