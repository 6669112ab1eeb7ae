"""Local agents: real ``zowarmup-agent run`` processes, one per client shard.

``zowarmup run`` starts them so the main job runs end to end on one machine over real
MQTT, with exactly the code a Raspberry Pi runs. Each agent logs to its own file and keeps
its model in its own state directory under the run directory.

They never outlive the orchestrator: they stay in its process group and session (Ctrl-C in
the terminal, or a signal to the group, reaches them too), :meth:`LocalAgents.stop` ends
them on every way out of a run, and each watches its parent (``edge_agent/lifeline.py``),
so a killed orchestrator takes them with it.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.lifeline import PARENT_ENV
from edge_agent.native import NativeUnsupported, compile_native
from protocols.manifest import load_manifest

log = logging.getLogger("zowarmup.fleet")


@dataclass
class LocalAgents:
    broker_url: str
    run_id: str
    shards: dict[str, Path]  # agent id -> shard
    root: Path  # agents/<id>/ holds state and log
    model_dir: Path  # the model the agents will fetch: it decides their forward strategy
    threads: int = 1
    micro_batch: int = 64
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # e.g. ZOWARMUP_PASSWORD, kept off argv
    # agent id -> (flags, environment) of its own broker identity, when each has one
    identity: Callable[[str], tuple[list[str], dict[str, str]]] | None = None
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
               "--micro-batch", str(self.micro_batch), "--strategy",
               strategy_for(self.model_dir, shard_samples(shard)),
               *self.extra_args]
        own_args, own_env = self.identity(agent_id) if self.identity else ([], {})
        cmd += own_args
        env = {**os.environ, **self.env, **own_env, PARENT_ENV: str(os.getpid()),
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


def strategy_for(model_dir: Path, samples: int) -> str:
    """The forward strategy of local and simulated agents: one rule, so that a simulated
    run computes the bits of the run over MQTT.

    ``native`` wherever this model compiles for this CPU (constant-weight speed and no
    per-pass cost, at any shard size). Otherwise a fixed rule by shard size rather than
    ``auto``'s timing, which may pick differently from run to run, and the two strategies
    give losses that differ in the last bits: constants pay a session build per pass,
    worth it from a few hundred samples on.
    """
    if native_supported(Path(model_dir)):
        return "native"
    return "constants" if samples >= 512 else "inputs"


@functools.cache
def native_supported(model_dir: Path) -> bool:
    manifest = load_manifest(model_dir)
    with tempfile.TemporaryDirectory() as work:
        try:
            compile_native(model_dir, manifest, Path(work))
        except NativeUnsupported as exc:
            log.info("agents run %s without the native graph: %s", manifest.model, exc)
            return False
    return True


def shard_samples(shard: Path) -> int:
    with np.load(shard, allow_pickle=False) as data:
        return int(data["y"].shape[0])


def _package_root(existing: str | None) -> str:
    root = str(Path(__file__).resolve().parents[2])
    return root if not existing else f"{root}{os.pathsep}{existing}"
