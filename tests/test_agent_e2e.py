"""Real `zowarmup-agent run` processes against a real Mosquitto, driven by the round loop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.mqtt import MqttTransport
from edge_agent.shard import save_shard
from protocols.coordinator import RoundPolicy
from protocols.journal import Journal, read_journal
from protocols.manifest import load_manifest, read_weights
from protocols.zo import fingerprint, replay

torch = pytest.importorskip("torch", reason="exporting the test model needs the orchestrator extra")
pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[1]


def digits_fleet(out: Path, count: int, size: int) -> tuple[Path, list[Path]]:
    """A small CNN for the digits exported to ``out/model``, and ``count`` shards of
    ``size`` digits each."""
    from sklearn.datasets import load_digits

    from export import export_model
    from orchestrator.train.zoo import build_model
    torch.manual_seed(1)
    export_model(build_model("cnn", 10, in_channels=1, image_size=8, width=4), out / "model",
                 (1, 8, 8), 10, model_name="cnn")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    shards = []
    for i in range(count):
        path = out / f"shard{i}.npz"
        save_shard(path, x[i * size:(i + 1) * size], y[i * size:(i + 1) * size], {"client": i})
        shards.append(path)
    return out / "model", shards


@pytest.fixture(scope="module")
def model_and_shards(tmp_path_factory):
    return digits_fleet(tmp_path_factory.mktemp("fleet"), 3, 120)


def start_agent(url: str, agent_id: str, shard: Path, state: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edge_agent.cli", "run", "--broker", url, "--data", str(shard),
           "--id", agent_id, "--run", "e2e", "--state-dir", str(state), "--threads", "1",
           "--micro-batch", "32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT)


@pytest.fixture
def fleet(mosquitto, model_and_shards, tmp_path, request):
    from orchestrator.rounds.mqtt import mqtt_rounds
    model_dir, shards = model_and_shards
    keep = getattr(request, "param", {})
    transport = MqttTransport(mosquitto.url, client_id="orchestrator")
    transport.connect(10)
    journal = Journal.create(tmp_path / "journal", {"run_id": "e2e", "base_version": 0})
    loop, mqtt = mqtt_rounds(transport, model_dir, "e2e", 11,
                             RoundPolicy(eps=1e-2, lr=0.05, directions=2, deadline_s=60),
                             journal=journal, **keep)
    mqtt.publish_model(chunk_bytes=4096)
    procs = {}

    def spawn(i: int) -> None:
        procs[f"pi{i}"] = start_agent(mosquitto.url, f"pi{i}", shards[i], tmp_path / f"state{i}",
                                      tmp_path / f"agent{i}.log")

    for i in range(len(shards)):
        spawn(i)
    yield loop, mqtt, procs, spawn, tmp_path
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
    journal.close()
    transport.close()


def _logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("agent*.log"))


def test_agents_hold_the_coordinators_bits_after_every_round(fleet):
    loop, mqtt, procs, _, tmp_path = fleet
    c = loop.coordinator
    agents = mqtt.wait_for_agents(3, timeout=60)
    assert agents == ["pi0", "pi1", "pi2"], _logs(tmp_path)
    for _ in range(5):
        # each result carries the fingerprint of the bits it was computed on: after the
        # commits applied so far, every agent's must be the coordinator's
        want = fingerprint(loop.weights)
        loop.open_round(agents)
        loop.collect()
        got = {a: r.fingerprint for a, r in c.round_results().items()}
        assert got == {a: want for a in agents}, _logs(tmp_path)
        assert not c.refused, (c.refusals, _logs(tmp_path))
        assert len(loop.finish_round().pairs) == 6
    # the journal holds compact commits (seeds by slot) and replays to the same bits
    contents = read_journal(tmp_path / "journal")
    assert contents.format == 3 and all(m.slots is not None for m in contents.commits)
    weights = read_weights(loop.state.model_dir, load_manifest(loop.state.model_dir))[1]
    replay(weights, [m.commit for m in contents.commits], loop.state.spec)
    assert fingerprint(weights) == fingerprint(loop.weights)
    # and a SIGTERM'd agent says it left
    procs["pi2"].send_signal(signal.SIGTERM)
    assert procs["pi2"].wait(15) == 0
    mqtt.pump(1.0)
    assert not loop.coordinator.agents["pi2"].online


def test_an_agent_killed_mid_round_rejoins_in_sync(fleet):
    loop, mqtt, procs, spawn, tmp_path = fleet
    c = loop.coordinator
    agents = mqtt.wait_for_agents(3, timeout=60)
    assert len(agents) == 3, _logs(tmp_path)
    loop.run_round(agents)
    procs["pi1"].kill()  # SIGKILL while assigned to the next round: no result, no goodbye
    procs["pi1"].wait(10)
    c.policy = RoundPolicy(eps=1e-2, lr=0.05, directions=2, deadline_s=3.0)
    commit = loop.run_round(agents)  # closes at its deadline with the two that answered
    assert len(commit.pairs) == 4
    c.policy = RoundPolicy(eps=1e-2, lr=0.05, directions=2, deadline_s=60)
    loop.run_round(["pi0", "pi2"])
    spawn(1)  # restarted: loads the model from its state directory, replays missed commits
    end = time.time() + 60
    while time.time() < end and c.agents["pi1"].version != c.version:
        mqtt.pump(0.2)
    commit = loop.run_round(agents)  # pi1 is counted only if it computed on our exact bits
    assert not c.refused, (c.refusals, _logs(tmp_path))
    assert len(commit.pairs) == 6, _logs(tmp_path)
    assert c.agents["pi1"].fingerprint == c.history[-2].fingerprint


@pytest.mark.parametrize("fleet", [{"keep_commits": 4, "snapshot_every": 3}], indirect=True)
def test_an_agent_behind_the_kept_commits_catches_up_from_a_snapshot(fleet):
    loop, mqtt, procs, spawn, tmp_path = fleet
    c = loop.coordinator
    agents = mqtt.wait_for_agents(3, timeout=60)
    assert len(agents) == 3, _logs(tmp_path)
    loop.run_round(agents)
    procs["pi1"].kill()
    procs["pi1"].wait(10)
    procs["pi2"].send_signal(signal.SIGSTOP)  # frozen, not gone: its commits queue up
    try:
        for _ in range(6):  # commits 1..6; only 3..6 are kept, snapshots at 3 and 6
            loop.run_round(["pi0"])
    finally:
        procs["pi2"].send_signal(signal.SIGCONT)
    assert c.version == 7 and mqtt.snapshot[0] == "snapshot-00000006.bin"
    spawn(1)  # its state on disk is at version 1, six commits behind, two of them gone
    end = time.time() + 60
    # pi1 says hello once it holds version 7; pi2, connected all along, says nothing after
    # applying its queued commits, and the coordinator counts it in sync (state_of)
    while time.time() < end and not (c.agents["pi1"].version == 7
                                     and set(agents) <= set(mqtt.ready_agents())):
        mqtt.pump(0.2)
    log = (tmp_path / "agent1.log").read_text(errors="replace")
    assert "state version 6" in log.split("connecting")[-1], log[-3000:]  # snapshot, replay
    commit = loop.run_round(agents)
    assert not c.refused, (c.refusals, _logs(tmp_path))
    assert len(commit.pairs) == 6, _logs(tmp_path)
    assert {a: c.agents[a].fingerprint for a in agents} == {a: c.history[-2].fingerprint
                                                            for a in agents}


def test_the_broker_killed_and_restarted_mid_round_loses_no_commit(fleet, mosquitto):
    """SIGKILL the broker while a round is open; it comes back on the same port without
    its retained messages. Everyone reconnects, the run goes on, every commit is applied
    exactly once everywhere, and an agent that starts afresh can still load the model."""
    loop, mqtt, procs, spawn, tmp_path = fleet
    c = loop.coordinator
    agents = mqtt.wait_for_agents(3, timeout=60)
    assert len(agents) == 3, _logs(tmp_path)
    loop.run_round(agents)
    procs["pi2"].kill()  # gone, and it forgets everything: it must fetch the model again
    procs["pi2"].wait(10)
    shutil.rmtree(tmp_path / "state2")
    c.policy = RoundPolicy(eps=1e-2, lr=0.05, directions=2, deadline_s=4.0)
    loop.open_round(["pi0", "pi1"])
    mosquitto.kill()
    time.sleep(1.0)
    mosquitto.start()  # the same port, persistence off: no retained model, no commit
    loop.collect()  # closes at its deadline with whatever got through
    loop.finish_round()
    c.policy = RoundPolicy(eps=1e-2, lr=0.05, directions=2, deadline_s=60)
    spawn(2)
    end = time.time() + 90
    while time.time() < end and not set(agents) <= set(mqtt.ready_agents()):
        mqtt.pump(0.2)
    assert set(agents) <= set(mqtt.ready_agents()), _logs(tmp_path)
    for _ in range(2):
        assert len(loop.run_round(agents).pairs) == 6, _logs(tmp_path)
    assert [m.commit.round for m in read_journal(tmp_path / "journal").commits] == \
        list(range(c.version)) == [m.commit.round for m in c.history]
    want = fingerprint(loop.weights)
    loop.open_round(agents)
    loop.collect()
    got = {a: r.fingerprint for a, r in c.round_results().items()}
    assert got == {a: want for a in agents}, _logs(tmp_path)
    assert "fingerprint_mismatch" not in c.refused, c.refusals
    assert mqtt.transport.connects >= 2
