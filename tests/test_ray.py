"""`zowarmup experiment GRID --ray`: a grid's runs as tasks on a local Ray instance.

The grid has two runs, one per ZO engine (the agent's in worker processes, and torch).
Each must end on the bits of the same run under the local ``--jobs`` path, and the Ray
instance the command started must be gone when it returns: every process that ever ran
under the command (Ray's own, its workers, the runs' worker processes) is watched by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the orchestrator needs its extra")
pytest.importorskip("ray", reason="--ray needs the ray extra (scripts/install dev installs it)")

ROOT = Path(__file__).resolve().parents[1]

BASE = """
[run]
name = "ray-grid"
[data]
clients = 3
alpha = 1.0
split = "34/66"
[model]
width = 4
[warmup]
rounds = 1
local_epochs = 1
[zo]
rounds = 2
directions = 2
[eval]
every = 2
"""

GRID = """
[experiment]
name = "ray-grid"
base = "base.toml"
seeds = [0]
out = "{out}"

[methods]
"onnxruntime" = {{ "zo.engine" = "onnxruntime" }}
"torch" = {{ "zo.engine" = "torch" }}
"""


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process now."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(entry)] = (int(fields[1]), fields[19])  # ppid, starttime
    return found


def _alive(pid: int, started: str) -> bool:
    """Still running (not a zombie) and not a later process that reused the PID."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == started and fields[0] != "Z"


class Descendants(threading.Thread):
    """Every process that descends from ``root`` while it runs, sampled every 0.1 s."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.seen, self.done = root, {}, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            table = _processes()
            for pid, (_, started) in table.items():
                chain, parent = set(), pid
                while parent in table and parent not in chain and parent != self.root:
                    chain.add(parent)
                    parent = table[parent][0]
                if parent == self.root and pid != self.root:
                    self.seen[pid] = started
            time.sleep(0.1)


def test_a_grid_on_a_local_ray_ends_on_the_bits_of_the_jobs_path(tmp_path):
    from orchestrator.experiment import load_grid, run_grid
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "jobs.toml").write_text(GRID.format(out=tmp_path / "jobs"))
    (tmp_path / "ray.toml").write_text(GRID.format(out=tmp_path / "ray"))
    run_grid(load_grid(tmp_path / "jobs.toml"), jobs=2)

    command = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "experiment", str(tmp_path / "ray.toml"),
         "--ray", "--jobs", "2"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                  "RAY_DISABLE_USAGE_STATS": "1"})
    watch = Descendants(command.pid)
    watch.start()
    try:
        output, _ = command.communicate(timeout=240)
    finally:
        watch.done.set()
        watch.join()
        if command.poll() is None:
            command.kill()
    assert command.returncode == 0, output[-4000:]
    assert "Ray: 2 CPU(s)" in output and "| - |" in output  # --jobs 2: a 2-CPU local Ray

    for method in ("onnxruntime", "torch"):
        ray_run = json.loads((tmp_path / "ray" / method / "seed-0" / "summary.json").read_text())
        local = json.loads((tmp_path / "jobs" / method / "seed-0" / "summary.json").read_text())
        assert ray_run["final_sha256"] == local["final_sha256"], method
        assert ray_run["zo_rounds"] == 2

    assert len(watch.seen) >= 3  # Ray's own processes and its workers were seen running
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in watch.seen.items()):
        time.sleep(0.2)
    left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p, s in watch.seen.items()
            if _alive(p, s)}
    assert not left, f"processes left behind after --ray: {left}"
