"""Load: many simulated agents against one Mosquitto on loopback, driven by the real round loop.

    python bench/fleet_load.py --agents 1000 --rounds 20

The orchestrator side is the product's own round loop over its MQTT fleet (coordinator,
journal with fsync, commit broadcast) over ``MqttTransport``. The agents are real paho MQTT clients,
``--agents`` of them spread over ``--procs`` processes, each process driving its clients
from one selector loop (no thread per client). A simulated agent says hello, and for each
round start on its inbox it answers after a random synthetic compute time (up to
``--compute-ms``) with one scalar per seed. Every client receives every commit, as a
device does; each process decodes a commit once for all its clients (they receive the
same bytes) and checks that it holds a pair for every result of the round.

Prints one JSON line: ``agents``, ``rounds_completed``, ``p50_round_overhead_ms`` and
``p99_round_overhead_ms`` (a round's wall time, from publishing its seeds to the commit
being journaled and published, minus the slowest agent's synthetic compute time),
``results_lost`` (results the agents sent that no commit holds), the peak resident
memory of the orchestrator process and of the broker, the bytes one agent receives per
round, and where the CPU went: milliseconds of CPU per round in the orchestrator, the
broker and the simulated agents, beside the machine's load average, since on a machine
that runs all three the round is as long as their CPU takes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import json
import multiprocessing as mp
import os
import random
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protocols.codec import decode, encode  # noqa: E402
from protocols.messages import Result, RoundStart  # noqa: E402

RUN = "load"


# --- the broker ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    user = os.environ.get("USER") or "root"
    conf.write_text("\n".join([
        f"listener {port} 127.0.0.1", "allow_anonymous true", "set_tcp_nodelay true",
        "persistence false", "max_connections -1", "max_queued_messages 10000",
        f"log_dest file {workdir / 'mosquitto.log'}", "log_type error", "log_type warning",
        f"user {user}", ""]))
    proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=_raise_fd_limit)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"mosquitto did not start: {proc.stderr.read().decode()[-500:]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- a synthetic model for the round loop --------------------------------------------------


def synthetic_model(directory: Path, parameters: int = 1000) -> None:
    """A model directory whose manifest and weights are real; the graph is never run."""
    from protocols.manifest import MANIFEST, Manifest, Parameter
    directory.mkdir(parents=True)
    weights = np.random.default_rng(0).standard_normal(parameters).astype("<f4").tobytes()
    graph = b"synthetic graph: the simulated agents never run it"
    (directory / "weights.bin").write_bytes(weights)
    (directory / "model.onnx").write_bytes(graph)
    files = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
             for name, data in (("weights.bin", weights), ("model.onnx", graph))}
    manifest = Manifest("synthetic", "model.onnx", "weights.bin",
                        (Parameter("w", (parameters,), 0),), "x", (4,), "y", 2, files=files)
    (directory / MANIFEST).write_text(manifest.to_json())


# --- simulated agents ----------------------------------------------------------------------


class Agents:
    """One process's share of the fleet: paho clients on one selector loop.

    A client's writes go out when paho asks for them (its register-write callback), so the
    loop never scans every client for pending writes.
    """

    def __init__(self, port: int, ids: list[str], model_sha: str, fp: str,
                 compute_ms: float, seed: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from protocols import topics
        self.commit_topic = topics.commit(RUN)
        self.result_topic = {a: topics.agent(RUN, a, "result") for a in ids}
        self.rng = random.Random(seed)
        self.compute_ms, self.model_sha, self.fp = compute_ms, model_sha, fp
        self.due: list[tuple[float, int, str, bytes]] = []  # (time, tiebreak, agent, payload)
        self.commits: dict[int, int] = {}  # round -> pairs of its commit
        self._seen: set[int] = set()  # hashes of the commits decoded: once per process
        self.writers: set = set()  # clients with bytes to send
        self.sent = self.connected = 0
        self.sel = selectors.DefaultSelector()
        self.clients = {}
        for agent in ids:
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{RUN}-{agent}")
            c.user_data_set(agent)
            c.on_socket_open = lambda cl, ud, sock: sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.on_socket_register_write = lambda cl, ud, sock: self.writers.add(cl)
            c.on_socket_unregister_write = lambda cl, ud, sock: self.writers.discard(cl)
            c.on_connect = self._on_connect
            c.on_message = self._on_message
            c.connect("127.0.0.1", port, keepalive=120)
            self.sel.register(c.socket(), selectors.EVENT_READ, c)
            self.clients[agent] = c

    def _on_connect(self, client, agent, flags, reason, props) -> None:
        from protocols import topics
        from protocols.codec import encode
        from protocols.messages import Capabilities, Hello
        client.subscribe([(self.commit_topic, 1), (topics.agent(RUN, agent, "inbox"), 1)])
        hello = Hello(agent, Capabilities(512, 1, 100), self.model_sha, 0, self.fp)
        client.publish(topics.agent(RUN, agent, "hello"), encode(hello), qos=1)
        self.connected += 1

    def _on_commit(self, payload: bytes) -> None:
        """Decode a commit once per process (a device would then apply it)."""
        if hash(payload) not in self._seen:
            self._seen.add(hash(payload))
            commit = decode(payload).commit
            self.commits[commit.round] = len(commit.pairs)

    def _on_message(self, client, agent, msg) -> None:
        if msg.topic == self.commit_topic:
            self._on_commit(msg.payload)
            return
        start = decode(msg.payload)  # the inbox: this agent's own round start
        if not isinstance(start, RoundStart) or start.agent_id != agent:
            return
        delay = self.rng.uniform(0, self.compute_ms) / 1e3
        result = Result(agent, start.round, tuple(self.rng.gauss(0, 1) for _ in start.seeds),
                        100, start.fingerprint, 1.0, delay)
        heapq.heappush(self.due, (time.monotonic() + delay, len(self.due), agent, encode(result)))

    def loop(self, conn) -> dict:
        misc = time.monotonic()
        while not conn.poll():
            for c in list(self.writers):
                c.loop_write()
            wait = 0.01 if not self.due else max(0.0, min(0.01, self.due[0][0] -
                                                          time.monotonic()))
            for key, _ in self.sel.select(wait):
                key.data.loop_read()
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                _, _, agent, payload = heapq.heappop(self.due)
                self.clients[agent].publish(self.result_topic[agent], payload, qos=1)
                self.sent += 1
            if now - misc > 1.0:
                misc = now
                for c in self.clients.values():
                    c.loop_misc()
        for c in self.clients.values():
            c.disconnect()
            c.loop_write()
        return {"sent": self.sent, "connected": self.connected, "commits": self.commits}


def agent_worker(conn, port: int, ids: list[str], model_sha: str, fp: str, compute_ms: float,
                 seed: int) -> None:
    _raise_fd_limit()
    agents = Agents(port, ids, model_sha, fp, compute_ms, seed)
    conn.send("ready")
    conn.send(agents.loop(conn))


# --- the orchestrator ----------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict:
    from edge_agent.mqtt import MqttTransport
    from orchestrator.rounds.mqtt import mqtt_rounds
    from protocols.coordinator import RoundPolicy
    from protocols.journal import Journal
    _raise_fd_limit()
    broker, port = start_mosquitto(work)
    model = work / "model"
    synthetic_model(model)
    transport = MqttTransport(f"mqtt://127.0.0.1:{port}", client_id=f"{RUN}-orchestrator",
                              max_inbound_bytes=8 << 20)
    transport.connect(10)
    journal = Journal.create(work / "journal", {"run_id": RUN, "base_version": 0})
    loop, fleet = mqtt_rounds(transport, model, RUN, 1, RoundPolicy(deadline_s=args.deadline_s),
                              journal=journal)
    fleet.publish_model()
    ids = [f"sim-{i:05d}" for i in range(args.agents)]
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for p in range(args.procs):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=agent_worker, args=(child, port, ids[p::args.procs],
                                                      loop.state.model_sha256,
                                                      loop.coordinator.fingerprint,
                                                      args.compute_ms, p), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        return _rounds(args, loop, fleet, ids, pipes, {"orchestrator": [os.getpid()],
                                                  "broker": [broker.pid],
                                                  "agents": [p.pid for p in procs]})
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for proc in procs:
            proc.join(10)
        transport.close()
        journal.close()
        broker.terminate()
        broker.wait(10)


def _rounds(args, loop, fleet, ids, pipes, pids: dict[str, list[int]]) -> dict:
    for pipe in pipes:
        pipe.recv()  # every client of that process has connected
    joined = fleet.wait_for_agents(len(ids), timeout=120)
    c = loop.coordinator
    overheads, accepted, pairs = [], 0, {}
    cpu = {part: sum(map(cpu_seconds, ps)) for part, ps in pids.items()}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        loop.open_round(joined)
        loop.collect()
        results = c.round_results()
        slowest = max((r.compute_s for r in results.values()), default=0.0)
        commit = loop.finish_round()
        pairs[commit.round] = len(commit.pairs)
        overheads.append((time.perf_counter() - t0 - slowest) * 1e3)
        accepted += len(results)
    cpu = {part: round((sum(map(cpu_seconds, ps)) - cpu[part]) * 1e3 / max(1, args.rounds))
           for part, ps in pids.items()}
    fleet.pump(0.5)  # late answers, if any, are counted as refused, not lost silently
    broker_rss = peak_rss_mb(pids["broker"][0])
    for pipe in pipes:
        pipe.send("stop")
    reports = [pipe.recv() for pipe in pipes]
    return {
        "agents": len(ids), "joined": len(joined), "rounds_completed": c.version,
        "p50_round_overhead_ms": round(float(np.percentile(overheads, 50)), 1),
        "p99_round_overhead_ms": round(float(np.percentile(overheads, 99)), 1),
        "results_lost": sum(r["sent"] for r in reports) - accepted,
        "results_accepted": accepted, "refused": dict(c.refused),
        "orchestrator_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                          / 1024, 1),
        "broker_peak_rss_mb": round(broker_rss, 1),
        "commits_read_by_every_process": all(r["commits"] == pairs for r in reports),
        "downlink_bytes_per_agent_round": loop.downlink_bytes // max(1, c.version),
        "cpu_ms_per_round": cpu, "load_average_1min": round(load, 2),
        "procs": args.procs, "compute_ms": args.compute_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--procs", type=int, default=4, help="agent processes")
    parser.add_argument("--compute-ms", type=float, default=50.0,
                        help="each answer waits a random 0..this many ms")
    parser.add_argument("--deadline-s", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-load-") as work:
        print(json.dumps(run(args, Path(work))), flush=True)


if __name__ == "__main__":
    main()
