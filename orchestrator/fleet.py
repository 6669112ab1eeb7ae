"""Local agents: real ``zowarmup-agent run`` processes, one per client shard.

``zowarmup run`` starts them so the main job runs end to end on one machine over real
MQTT, with exactly the code a Raspberry Pi runs. Each agent logs to its own file and keeps
its model in its own state directory under the run directory.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("zowarmup.fleet")


@dataclass
class LocalFleet:
    broker_url: str
    run_id: str
    shards: dict[str, Path]  # agent id -> shard
    root: Path  # agents/<id>/ holds state and log
    threads: int = 1
    micro_batch: int = 64
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # e.g. ZOWARMUP_PASSWORD, kept off argv
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self) -> None:
        for agent_id in self.shards:
            self.start_one(agent_id)
        log.info("started %d local agent(s) against %s", len(self.shards), self.broker_url)

    def start_one(self, agent_id: str) -> None:
        home = self.root / agent_id
        home.mkdir(parents=True, exist_ok=True)
        shard = self.shards[agent_id]
        cmd = [sys.executable, "-m", "edge_agent.cli", "run", "--broker", self.broker_url,
               "--data", str(shard), "--id", agent_id, "--run", self.run_id,
               "--state-dir", str(home / "state"), "--threads", str(self.threads),
               "--micro-batch", str(self.micro_batch), "--strategy", strategy_for(shard),
               *self.extra_args]
        env = {**os.environ, **self.env,
               "PYTHONPATH": _package_root(os.environ.get("PYTHONPATH"))}
        with open(home / "agent.log", "ab") as out:
            self.procs[agent_id] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, env=env)

    def dead(self) -> dict[str, int]:
        """Agents that exited, with their exit codes."""
        return {a: p.returncode for a, p in self.procs.items() if p.poll() is not None}

    def stop(self, timeout: float = 10.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for agent_id, p in self.procs.items():
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("agent %s did not stop in %.0f s; killing it", agent_id, timeout)
                p.kill()
                p.wait()


def strategy_for(shard: Path) -> str:
    """A fixed forward strategy per shard, so that a rerun computes the same bits.

    ``auto`` times both strategies and may pick differently from run to run; the two give
    losses that differ in the last bits. Constants pay a session build per pass, worth it
    from a few hundred samples on.
    """
    import numpy as np
    with np.load(shard, allow_pickle=False) as data:
        return strategy_for_samples(int(data["y"].shape[0]))


def strategy_for_samples(samples: int) -> str:
    return "constants" if samples >= 512 else "inputs"


def _package_root(existing: str | None) -> str:
    root = str(Path(__file__).resolve().parents[1])
    return root if not existing else f"{root}{os.pathsep}{existing}"
