"""The hi+lo ablation: high-resource clients keep first-order steps beside ZO ones."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from protocols.directions import DirectionSpec
from protocols.journal import read_journal
from protocols.manifest import load_manifest, read_weights
from protocols.zo import apply_commit

pytest.importorskip("torch", reason="the orchestrator needs its extra")
ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
[run]
name = "hilo"
seed = 4
method = "zowarmup-hi-fo"
[data]
clients = 6
alpha = 1.0
split = "50/50"
[model]
width = 8
[warmup]
rounds = 2
client_lr = 0.1
local_epochs = 1
batch_size = 32
[zo]
rounds = 8
directions = 2
lr = 1e-2
[eval]
every = 4
"""


def zowarmup(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hilo") / "hilo.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def finished(config_file) -> Path:
    out = config_file.parent / "done"
    done = zowarmup("run", str(config_file), "--simulate", "--out", str(out),
                    cwd=config_file.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_the_journal_and_the_first_order_deltas_rebuild_the_final_bits(finished):
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["method"] == "zowarmup-hi-fo" and summary["final_acc"] is not None
    commits = read_journal(finished / "journal").commits
    deltas = sorted((finished / "first-order").glob("round-*.npz"))
    assert len(commits) == len(deltas) == 8
    weights = read_weights(finished / "model", load_manifest(finished / "model"))[1]
    for message, path in zip(commits, deltas):
        # only the low-resource half answers seeds: 3 clients x 2 directions
        assert len(message.commit.pairs) == 6
        apply_commit(weights, message.commit, DirectionSpec())
        with np.load(path) as data:
            for w, i in zip(weights, range(len(data.files))):
                assert np.any(data[f"arr_{i}"] != 0)
                w += data[f"arr_{i}"]
    sha = hashlib.sha256(b"".join(w.astype("<f4").tobytes() for w in weights)).hexdigest()
    assert sha == summary["final_sha256"]


def test_resume_after_sigkill_replays_both_parts(finished, config_file):
    out = config_file.parent / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(config_file),
                             "--simulate", "--out", str(out)], cwd=config_file.parent,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    end = time.time() + 180
    while time.time() < end:
        journal = out / "journal"
        if journal.exists() and len(read_journal(journal).commits) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    done = zowarmup("resume", str(out), cwd=config_file.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    final = json.loads((out / "summary.json").read_text())["final_sha256"]
    assert final == json.loads((finished / "summary.json").read_text())["final_sha256"]


def test_over_mqtt_it_is_refused_with_the_reason(config_file):
    done = zowarmup("run", str(config_file), "--out", str(config_file.parent / "mqtt"),
                    "--set", "zo.rounds=1", cwd=config_file.parent)
    assert done.returncode != 0 and "runs only simulated" in done.stderr
