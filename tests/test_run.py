"""`zowarmup run` end to end: warm-up, pivot, ZO rounds over MQTT with real agent processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocols.journal import read_journal
from tests.runs import alive, children

pytest.importorskip("torch", reason="the orchestrator needs its extra")
pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
[run]
name = "tiny"
seed = 3

[data]
dataset = "digits"
clients = 4
alpha = 1.0
split = "50/50"

[model]
name = "cnn"
width = 8

[warmup]
rounds = 3
client_lr = 0.1
local_epochs = 1
batch_size = 32

[zo]
rounds = 12
directions = 2
eps = 1e-3
lr = 1e-2
deadline_s = 60
snapshot_every = 4

[eval]
every = 3
"""


def zowarmup(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def embedded_run(config_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "embedded"
    done = zowarmup("run", str(config_file), "--out", str(out), cwd=config_file.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_a_run_warms_up_pivots_and_trains_with_zo(embedded_run):
    s = summary_of(embedded_run)
    assert s["warmup_rounds"] == 3 and s["zo_rounds"] == 12 and s["agents"] == 4
    rows = [json.loads(line) for line in (embedded_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["warmup"] * 3 + ["zo"] * 12
    assert [r["round"] for r in rows] == list(range(15))
    assert all(r["answered"] == 4 and r["refused"] == 0 for r in rows[3:])
    assert s["pivot_acc"] == rows[2]["test_acc"] and s["final_acc"] == rows[-1]["test_acc"]
    # the ZO uplink is a few scalars; the warm-up ships the model each way
    zo, warm = s["bytes_per_client_round"]["zo"], s["bytes_per_client_round"]["warmup"]
    assert 0 < zo["uplink"] < 1000 < warm["uplink"]
    assert len(read_journal(embedded_run / "journal").commits) == 12
    assert (embedded_run / "model" / "manifest.json").exists()
    assert len(list((embedded_run / "shards").glob("client-*.npz"))) == 4


def test_an_external_mosquitto_gives_the_same_bits(embedded_run, config_file, mosquitto,
                                                   tmp_path):
    out = tmp_path / "mosquitto"
    done = zowarmup("run", str(config_file), "--out", str(out), "--broker", mosquitto.url,
                    cwd=config_file.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    assert summary_of(out)["final_sha256"] == summary_of(embedded_run)["final_sha256"]


def test_resume_after_sigkill_in_the_zo_phase_gives_the_same_bits(embedded_run, config_file,
                                                                  mosquitto, tmp_path):
    """The orchestrator and its agents are killed mid-phase, leaving a torn last journal
    record; resume ends on the bits of the run that never stopped."""
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(config_file),
                             "--out", str(out), "--broker", mosquitto.url],
                            cwd=config_file.parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    end = time.time() + 120
    while time.time() < end:
        journal = out / "journal"
        if journal.exists() and len(read_journal(journal).commits) >= 4:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the orchestrator and its agents, mid-phase
    proc.wait()
    assert not (out / "summary.json").exists()
    killed_at = len(read_journal(out / "journal").commits)
    assert 4 <= killed_at < 12
    with open(out / "journal", "ab") as f:  # a commit record cut short by the crash
        f.write(struct.pack("<II", 400, 0) + b'{"type":"commit","round":')
    assert read_journal(out / "journal").torn_bytes >= 33
    again = zowarmup("run", str(config_file), "--out", str(out), cwd=config_file.parent)
    assert again.returncode != 0 and "zowarmup resume" in again.stderr
    snapshots = out / "snapshots"  # every 4 versions, each written just after its commit
    newest = max((int(p.name[9:17]) for p in snapshots.glob("snapshot-*.bin")), default=0)
    assert newest in (killed_at // 4 * 4, killed_at // 4 * 4 - 4)
    done = zowarmup("resume", str(out), cwd=config_file.parent)  # from that snapshot
    assert done.returncode == 0, done.stderr[-4000:]
    assert summary_of(out)["final_sha256"] == summary_of(embedded_run)["final_sha256"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rounds = [json.loads(line)["round"] for line in lines]
    assert rounds == list(range(15))  # nothing lost, nothing twice


def test_baselines_run_in_the_same_format(config_file, tmp_path):
    for method, warm, zo in (("high-res-only", 6, 0), ("zo-scratch", 0, 3)):
        out = tmp_path / method
        done = zowarmup("run", str(config_file), "--out", str(out), "--set",
                        f"run.method={method}", "--set", "zo.rounds=3", "--set",
                        "warmup.rounds=3", cwd=config_file.parent)
        assert done.returncode == 0, done.stderr[-4000:]
        s = summary_of(out)
        assert (s["method"], s["warmup_rounds"], s["zo_rounds"]) == (method, warm, zo)
        assert s["final_acc"] is not None and len(s["final_sha256"]) == 64


def test_report_reads_runs(embedded_run, tmp_path):
    done = zowarmup("report", str(embedded_run), "--plot", str(tmp_path / "acc.png"),
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "zowarmup" in done.stdout and (tmp_path / "acc.png").stat().st_size > 1000


def test_bad_config_is_refused_with_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[zo]\ndirectionz = 2\n")
    done = zowarmup("run", str(bad), "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert done.returncode != 0 and "directionz" in done.stderr
    assert not (tmp_path / "x").exists()


def test_serve_waits_for_remote_agents(config_file, mosquitto, tmp_path):
    out = tmp_path / "served"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve",
                               str(config_file), "--out", str(out), "--broker", mosquitto.url,
                               "--set", "zo.rounds=3", "--set", "zo.local_steps=2"],
                              cwd=config_file.parent, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    agents = []
    try:
        end = time.time() + 120
        while time.time() < end and not (out / "shards" / "partition.json").exists():
            time.sleep(0.1)
        for i in range(4):  # devices elsewhere, started by hand with their shards
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "run", "--broker", mosquitto.url,
                 "--run", "tiny", "--id", f"device-{i}", "--threads", "1",
                 "--data", str(out / "shards" / f"client-{i:03d}.npz"),
                 "--state-dir", str(tmp_path / f"device-{i}")],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _, err = server.communicate(timeout=180)
    finally:
        for agent in agents:
            agent.terminate()
            agent.wait(10)
        server.kill()
    assert server.returncode == 0, err[-4000:]
    s = summary_of(out)
    assert s["zo_rounds"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # two local steps of two directions each: four (seed, coefficient) pairs per agent
    assert [r["answered"] for r in rows if r["phase"] == "zo"] == [4, 4, 4]
    assert len(read_journal(out / "journal").commits[0].commit.pairs) == 16


def test_a_simulated_run_ends_on_the_bits_of_the_mqtt_run(embedded_run, config_file, tmp_path):
    out = tmp_path / "simulated"
    done = zowarmup("run", str(config_file), "--out", str(out), "--simulate",
                    cwd=config_file.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    assert summary_of(out)["final_sha256"] == summary_of(embedded_run)["final_sha256"]
    sim = (out / "metrics.jsonl").read_text().splitlines()
    mqtt = (embedded_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["test_acc"] for line in sim] == [
        json.loads(line)["test_acc"] for line in mqtt]


def test_a_stop_between_the_journal_and_the_metrics_loses_no_round(config_file, tmp_path):
    """The last commit is journaled but its metrics row was never written (a kill in
    between): resume writes the row again, evaluated on the replayed weights."""
    out = tmp_path / "stopped"
    done = zowarmup("run", str(config_file), "--out", str(out), "--simulate",
                    cwd=config_file.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["test_acc"] is not None  # the last round is evaluated
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:-1]))
    (out / "summary.json").unlink()
    again = zowarmup("resume", str(out), cwd=config_file.parent)
    assert again.returncode == 0, again.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [json.loads(line)["round"] for line in lines]
    assert rows[-1]["recovered"] and rows[-1]["test_acc"] == last["test_acc"]
    assert summary_of(out)["final_acc"] == last["test_acc"]


def scrape(port: int) -> dict[tuple, float]:
    """Every sample of a Prometheus endpoint, parsed by the client library's own parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_sigterm_mid_round_stops_every_process_and_resume_gives_the_same_bits(
        embedded_run, config_file, tmp_path):
    """SIGTERM to `zowarmup run` (only to it, as `kill` and systemd send it) during the ZO
    rounds: it exits 143 with a line saying how to resume, no agent process is left and the
    embedded broker's port is closed, the journal has no torn record, and resume ends on
    the bits of the run that never stopped. `status` and the metrics endpoint tell the
    live run, the stopped one and the finished one apart."""
    from tests.brokers import free_port
    out, port = tmp_path / "terminated", free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(config_file),
                             "--out", str(out), "--metrics-port", str(port)],
                            cwd=config_file.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        end = time.time() + 120
        while time.time() < end and not ((out / "journal").exists() and
                                         len(read_journal(out / "journal").commits) >= 3):
            time.sleep(0.05)
        agents = children(proc.pid)
        for pid in agents:  # frozen: the next round stays open while we look at the run
            os.kill(pid, signal.SIGSTOP)
        cmdline = Path(f"/proc/{agents[0]}/cmdline").read_text().split("\0")
        broker_url = next(a for a in cmdline if a.startswith("mqtt://"))
        live = json.loads(zowarmup("status", str(out), "--json", "--broker", broker_url,
                                   cwd=tmp_path).stdout)
        metrics = scrape(port)
        proc.send_signal(signal.SIGTERM)  # mid-round
        for pid in agents:  # so that they hear the SIGTERM the orchestrator sends them
            os.kill(pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert live["phase"] == "zo" and live["orchestrator"]["state"] == "running", live
    assert sorted(live["agents"]) == [f"client-{i:03d}" for i in range(4)]
    assert {a["state"] for a in live["agents"].values()} == {"online"}
    assert {a["broker"] for a in live["agents"].values()} == {"online"}  # retained statuses
    assert metrics[("zowarmup_agents", (("state", "online"),))] == 4
    assert metrics[("zowarmup_rounds_done", ())] >= 3 + 3  # warm-up, then ZO rounds
    assert metrics[("zowarmup_orchestrator_up", ())] == 1
    assert metrics[("zowarmup_agent_rounds_answered_total", (("agent", "client-002"),))] >= 3

    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert f"zowarmup resume {out}" in err
    assert len(agents) == 4 and not [p for p in agents if alive(p)]
    host, broker_port = broker_url.rsplit("/", 1)[1].split(":")
    with pytest.raises(OSError):  # the embedded broker (a thread of the run) is gone
        socket.create_connection((host, int(broker_port)), timeout=2).close()
    journal = read_journal(out / "journal")
    assert journal.torn_bytes == 0 and 3 <= len(journal.commits) < 12
    stopped = zowarmup("status", str(out), cwd=tmp_path)
    assert "orchestrator stopped" in stopped.stdout and "zowarmup resume" in stopped.stdout

    done = zowarmup("resume", str(out), cwd=config_file.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    assert summary_of(out)["final_sha256"] == summary_of(embedded_run)["final_sha256"]
    finished = json.loads(zowarmup("status", str(out), "--json", cwd=tmp_path).stdout)
    assert (finished["phase"], finished["round"], finished["rounds"]) == ("done", 15, 15)
    assert finished["orchestrator"]["state"] == "finished" and finished["eta_s"] == 0
    assert finished["test_acc"] == summary_of(out)["final_acc"]
    assert all(a["answered"] >= 1 and a["behind"] == 0 for a in finished["agents"].values())
    text = zowarmup("status", str(out), cwd=tmp_path).stdout
    assert "phase done, round 15 of 15" in text and "client-003  online" in text
