"""One process per run directory: a second run or resume is refused with the holder named,
a crashed holder leaves no stale lock, and grids sharing a run directory wait for each
other's run of a shared cell instead of running it twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.run.state import OWNER, Busy, RunDir, held
from tests.runs import alive

HOLD = """
import sys, time
from pathlib import Path
from orchestrator.run.state import held
with held(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    summary = sys.argv[3] if len(sys.argv) > 3 else ""
    if summary:
        Path(summary).write_text('{"final_acc": 0.5, "wall_s": 0.0}')
"""


def _holder(lock: Path, seconds: float, summary: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, "-c", HOLD, str(lock), str(seconds)]
    proc = subprocess.Popen(args + ([str(summary)] if summary else []),
                            stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_process_is_refused_with_the_holder_and_a_killed_holder_frees_it(tmp_path):
    proc = _holder(tmp_path / OWNER, 60)
    try:
        with (pytest.raises(Busy, match=f"in use by process {proc.pid} on .*wait for it"),
              RunDir(tmp_path).hold()):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert not alive(proc.pid)
    with RunDir(tmp_path).hold():  # the kernel released it with the dead process
        assert f"process {os.getpid()} " in (tmp_path / OWNER).read_text()


def test_zowarmup_resume_of_a_directory_in_use_changes_nothing(tmp_path):
    (tmp_path / "config.toml").write_text("[run]\nname = 'x'\n")
    (tmp_path / "state.json").write_text(json.dumps({"phase": "warmup"}) + "\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = _holder(tmp_path / OWNER, 60)
    try:
        from orchestrator.config import parse_config, tomllib
        from orchestrator.run.job import execute
        config = parse_config(tomllib.loads("[run]\nname = 'x'\n"), "x")
        with pytest.raises(Busy, match="run directory"):
            execute(config, tmp_path, simulate=True)
    finally:
        proc.kill()
        proc.wait(10)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != OWNER}
    assert after == before


def test_an_experiment_waits_for_a_shared_cell_and_does_not_run_it_again(tmp_path):
    """Another grid holds the cell's claim and finishes it; this one then finds the
    summary and runs nothing (a config of None would fail if it ran)."""
    from orchestrator.experiment import claimed_run
    run_dir = tmp_path / "split=10-90" / "ZOWarmUp" / "seed-0"
    run_dir.mkdir(parents=True)
    proc = _holder(run_dir.parent / "seed-0.claim", 1.5, run_dir / "summary.json")
    started = time.monotonic()
    claimed_run(None, run_dir, "run 1/1")  # type: ignore[arg-type]
    assert time.monotonic() - started > 1.0  # it waited for the holder
    assert proc.wait(10) == 0
    assert json.loads((run_dir / "summary.json").read_text())["final_acc"] == 0.5


def test_held_lock_is_not_inherited_by_child_processes(tmp_path):
    """Local agents started by a run must not keep its directory locked after it ends."""
    lock = tmp_path / OWNER
    with held(lock):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with held(lock):  # free again although the child still runs
            assert alive(child.pid)
    finally:
        child.kill()
        child.wait(10)
