"""The fleet half of scripts/arm64-check: an x86 orchestrator run joined by an arm64 agent.

Starts a loopback Mosquitto and `zowarmup serve` (digits, the zoo's small CNN, two
clients), then one x86 agent and one arm64 agent (a command prefix runs it in the
emulated root). After every ZO round it prints the orchestrator's fingerprint (from its
journal) and each agent's (from its log, written after it applied the commit), and exits
with status 1 on any difference, on a round an agent never applied, or on a failed run.

    python scripts/arm64_fleet.py --work ROOT/tmp/zowarmup-check --arm64-path /tmp/... \\
        --arm64-launcher "scripts/arm64-check --in-root" --rounds 3
"""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protocols.errors import JournalError  # noqa: E402
from protocols.journal import read_journal  # noqa: E402
from tests.brokers import MosquittoBroker  # noqa: E402

RUN = "arm64-check"
APPLIED = re.compile(r"applied commit\(s\) ([\d, ]+), fingerprint ([0-9a-f]{16,})")
CONFIG = """\
[run]
name = "{run}"
out = "{out}"
seed = 0
method = "zowarmup"

[data]
dataset = "digits"
clients = 2
alpha = 0.5
split = "50/50"

[model]
name = "cnn"
width = 8

[warmup]
rounds = 2
strategy = "fedavg"
client_lr = 0.1
local_epochs = 1
batch_size = 32

[zo]
rounds = {rounds}
directions = 2
eps = 1e-3
lr = 1e-2
micro_batch = 64
deadline_s = 900

[eval]
every = {rounds}

[fleet]
join_timeout_s = 900
"""


def main() -> int:
    args = _arguments()
    # Stopped from outside: stop the broker, the orchestrator and the agents too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    config = work / "check.toml"
    config.write_text(CONFIG.format(run=RUN, out=run_dir, rounds=args.rounds))
    with MosquittoBroker(work / "mosquitto") as broker:
        print(f"broker: Mosquitto on {broker.url}", flush=True)
        serve = _spawn([sys.executable, "-m", "orchestrator.cli", "serve", str(config),
                        "--broker", broker.url], work / "orchestrator.log")
        agents: dict[str, subprocess.Popen] = {}
        try:
            shards = _wait_for_shards(run_dir, serve, args.timeout)
            agents["x86-agent"] = _spawn(_agent_cmd([sys.executable, "-m", "edge_agent.cli"],
                                                    broker.url, "x86-agent", shards[0],
                                                    work / "state-x86"),
                                         work / "x86-agent.log")
            inside = Path(args.arm64_path)
            agents["arm64-agent"] = _spawn(_agent_cmd(
                [*shlex.split(args.arm64_launcher), "zowarmup-agent"], broker.url,
                "arm64-agent", inside / shards[1].relative_to(work), inside / "state-arm64",
                args.arm64_strategy), work / "arm64-agent.log")
            return _watch(run_dir, work, serve, agents, args.rounds, args.timeout)
        finally:
            _stop([serve, *agents.values()])


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True,
                        help="Working directory, inside the arm64 root.")
    parser.add_argument("--arm64-path", required=True,
                        help="The working directory as the arm64 root sees it.")
    parser.add_argument("--arm64-launcher", required=True,
                        help="Command prefix that runs a command in the arm64 root.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arm64-strategy", default="native",
                        help="The arm64 agent's forward strategy (native: ONNX Runtime's "
                        "graph compiled for the ARM core, which must hold the same bits).")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="Seconds the whole check may take.")
    return parser.parse_args()


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=ROOT)


def _agent_cmd(prefix: list[str], url: str, agent_id: str, shard: Path, state: Path,
               strategy: str = "auto") -> list[str]:
    return [*prefix, "run", "--broker", url, "--data", str(shard), "--id", agent_id,
            "--run", RUN, "--state-dir", str(state), "--threads", "1", "--strategy", strategy]


def _wait_for_shards(run_dir: Path, serve: subprocess.Popen, timeout: float) -> list[Path]:
    """The two clients' shards, once the warm-up has written them."""
    shards = [run_dir / "shards" / f"client-{i:03d}.npz" for i in range(2)]
    end = time.monotonic() + timeout
    while not all(s.exists() for s in shards) or not (run_dir / "model").exists():
        if serve.poll() is not None:
            raise SystemExit(f"zowarmup serve exited ({serve.returncode}) before the ZO "
                             f"phase; see {run_dir.parent / 'orchestrator.log'}")
        if time.monotonic() > end:
            raise SystemExit("the warm-up did not finish in time")
        time.sleep(1)
    print("orchestrator: warm-up done, model exported; starting the x86 and arm64 agents",
          flush=True)
    return shards


def _journal_fingerprints(run_dir: Path) -> dict[int, str]:
    try:
        return {m.commit.round: m.fingerprint for m in read_journal(run_dir / "journal").commits}
    except (FileNotFoundError, JournalError):  # not there yet, or a record half written
        return {}


def _agent_fingerprints(log: Path) -> dict[int, str]:
    """Round -> the fingerprint the agent logged after applying it (a catch-up applies
    several commits at once: only the last of them has a fingerprint of its own)."""
    found: dict[int, str] = {}
    text = log.read_text(errors="replace") if log.exists() else ""
    for rounds, fp in APPLIED.findall(text):
        found[int(rounds.split(",")[-1])] = fp
    return found


def _model_ready(log: Path) -> str | None:
    text = log.read_text(errors="replace") if log.exists() else ""
    found = re.search(r"model ready: (.*)", text)
    return found[1] if found else None


def _watch(run_dir: Path, work: Path, serve: subprocess.Popen,
           agents: dict[str, subprocess.Popen], rounds: int, timeout: float) -> int:
    """Print each round once the orchestrator and both agents have it; any difference
    or missing round fails."""
    end = time.monotonic() + timeout
    printed: set[int] = set()
    announced: set[str] = set()
    differences = 0
    while len(printed) < rounds and time.monotonic() < end:
        ours = _journal_fingerprints(run_dir)
        theirs = {a: _agent_fingerprints(work / f"{a}.log") for a in agents}
        for agent in agents:
            if agent not in announced and (line := _model_ready(work / f"{agent}.log")):
                announced.add(agent)
                print(f"{agent}: {line}", flush=True)
        for r in sorted(ours):
            if r in printed or not all(r in t for t in theirs.values()):
                continue
            printed.add(r)
            same = all(t[r] == ours[r] for t in theirs.values())
            differences += not same
            print(f"round {r}: {'equal' if same else 'DIFFERENT'}\n"
                  f"  orchestrator (x86)  {ours[r]}", flush=True)
            for agent, fingerprints in theirs.items():
                print(f"  {agent:<19} {fingerprints[r]}", flush=True)
        dead = {a: p.returncode for a, p in agents.items() if p.poll() is not None}
        if dead:
            print(f"agent(s) exited early: {dead}; see {work}/*-agent.log", flush=True)
            return 1
        if serve.poll() not in (None, 0):
            print(f"zowarmup serve failed ({serve.returncode}); see {work}/orchestrator.log")
            return 1
        time.sleep(1)
    if len(printed) < rounds:
        print(f"only {len(printed)} of {rounds} rounds reached every side in time", flush=True)
        return 1
    if serve.wait(timeout=max(1.0, end - time.monotonic())) != 0:
        print(f"zowarmup serve failed ({serve.returncode}); see {work}/orchestrator.log")
        return 1
    if differences:
        print(f"{differences} of {rounds} rounds differ between x86 and arm64", flush=True)
        return 1
    print(f"{rounds} ZO rounds: fingerprints equal on x86 and arm64 after every round",
          flush=True)
    return 0


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
