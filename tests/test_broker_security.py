"""`zowarmup broker-config` against a real Mosquitto: TLS, a password per agent, the ACL."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.mqtt import ConnectFailed, ConnectRefused, MqttTransport, Tls
from orchestrator.broker_config import (
    BrokerConfigError,
    check_password,
    hash_password,
    write_broker_config,
)
from protocols import topics
from protocols.codec import decode
from tests.brokers import MosquittoBroker, free_port

pytest.importorskip("cryptography", reason="certificates need the orchestrator extra")
pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[1]
RUN = "sec"


class ConfiguredMosquitto(MosquittoBroker):
    """Mosquitto run on the generated mosquitto.conf, plus only a log and a user line."""

    def __init__(self, workdir: Path, conf: Path, port: int, binary: str | None) -> None:
        super().__init__(workdir, binary=binary)
        self.conf, self.port = conf, port

    def _write_config(self) -> None:
        self.config_path.write_text(self.conf.read_text() + "\n".join([
            f"log_dest file {self.log_path}", "log_type all", f"user {getpass.getuser()}", ""]))


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("secure") / "broker"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "broker-config",
                           "--agents", "3", "--out", str(out), "--port", str(port),
                           "--bind", "127.0.0.1"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return out, port


@pytest.fixture
def secure(fleet_dir, tmp_path):
    from tests.conftest import _require_mosquitto
    out, port = fleet_dir
    broker = ConfiguredMosquitto(tmp_path / "broker", out / "mosquitto.conf", port,
                                 _require_mosquitto())
    broker.start()
    yield broker, out, json.loads((out / "credentials.json").read_text())
    broker.stop()


def connect(port: int, who: dict | None, *, password: str | None = None,
            cert: bool = True, client_id: str | None = None) -> MqttTransport:
    ca = (who or {}).get("ca")
    tls = Tls(ca, who["cert"], who["key"]) if who and cert else Tls(ca)
    t = MqttTransport(f"mqtts://127.0.0.1:{port}", client_id=client_id,
                      username=who["username"] if who else None,
                      password=password if password is not None else (who or {}).get("password"),
                      tls=tls, reconnect_min_delay=0.05, reconnect_max_delay=0.5)
    t.connect(timeout=5)
    return t


def received_until(listener: MqttTransport, last: bytes, timeout: float = 5) -> list:
    """(topic, payload) received until ``last`` arrives. Each publish before it was
    acknowledged before it was sent, so the broker had routed (or dropped) them already."""
    got, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        m = listener.get(timeout=0.05)
        if m is not None:
            got.append((m.topic, m.payload))
            if m.payload == last:
                break
    return got


def test_password_hashes_are_mosquittos_format():
    hashed = hash_password("secret", salt=b"\x00" * 12)
    assert hashed.startswith("$7$101$AAAAAAAAAAAAAAAA$") and len(hashed.split("$")[-1]) == 88
    assert check_password("secret", hashed) and not check_password("Secret", hashed)
    # a line mosquitto_passwd 2.0.11 wrote for alice / secret
    line = ("$7$101$AO7+QvOhUbc6mxEY$0Dvp3+TQaraVsN7/pBi8mvG/wBtMWLKW3cNgceeqB+SwbW+HnCMPtXA6"
            "clF1T92lA1TNphDGWqAKCB3k/ZfomQ==")
    assert check_password("secret", line) and not check_password("secreT", line)


def test_files_written_and_bad_requests_refused(fleet_dir, tmp_path):
    out, port = fleet_dir
    creds = json.loads((out / "credentials.json").read_text())
    assert sorted(creds["agents"]) == ["client-000", "client-001", "client-002"]
    users = [line.split(":")[0] for line in (out / "passwd").read_text().splitlines()]
    assert users == ["orchestrator", "client-000", "client-001", "client-002"]
    for path in ("passwd", "ca.key", "server.key", "credentials.json",
                 "agents/client-001/client.key", "agents/client-001/password"):
        assert (out / path).stat().st_mode & 0o077 == 0, path
    conf = (out / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and f"listener {port} 127.0.0.1" in conf
    with pytest.raises(BrokerConfigError, match="not empty"):
        write_broker_config(out, ["a"])
    with pytest.raises(BrokerConfigError, match="distinct"):
        write_broker_config(tmp_path / "x", ["a", "a"])
    with pytest.raises(Exception, match="agent id"):
        write_broker_config(tmp_path / "y", ["a/b"])


def test_only_the_fleet_gets_in(secure):
    broker, out, creds = secure
    me = creds["orchestrator"]
    connect(broker.port, me).close()  # our own PBKDF2 hash, checked by Mosquitto
    with pytest.raises(ConnectRefused):
        connect(broker.port, me, password="wrong")
    anonymous = {**me, "username": None, "password": None}
    with pytest.raises((ConnectRefused, ConnectFailed)):
        connect(broker.port, anonymous)  # a valid certificate, no user name: refused
    with pytest.raises(ConnectFailed):
        connect(broker.port, me, cert=False)  # no client certificate: no TLS session
    with pytest.raises(ConnectFailed, match="certificate verify failed"):
        MqttTransport(f"mqtts://127.0.0.1:{broker.port}").connect(timeout=5)


def test_an_agent_publishes_only_as_itself_and_never_for_the_orchestrator(secure):
    broker, out, creds = secure
    orch = connect(broker.port, creds["orchestrator"])
    a = connect(broker.port, creds["agents"]["client-000"])
    b = connect(broker.port, creds["agents"]["client-001"])
    for f in topics.agent_filters(RUN):
        orch.subscribe(f)
    b.subscribe(topics.commit(RUN))
    b.subscribe(topics.agent(RUN, "client-001", "inbox"))
    time.sleep(0.3)
    own = topics.agent(RUN, "client-000", "result")
    other = topics.agent(RUN, "client-001", "result")
    a.publish(other, b"spoofed", wait=True)
    a.publish(own, b"mine", wait=True)
    assert received_until(orch, b"mine") == [(own, b"mine")]
    for topic in (topics.commit(RUN), topics.agent(RUN, "client-001", "inbox")):
        a.publish(topic, b"forged", wait=True)
        orch.publish(topic, b"real", wait=True)
        assert received_until(b, b"real") == [(topic, b"real")], topic
    a.subscribe(topics.agent(RUN, "client-001", "inbox"))  # reading another's inbox: nothing
    a.subscribe(topics.agent(RUN, "client-000", "inbox"))
    time.sleep(0.2)
    orch.publish(topics.agent(RUN, "client-001", "inbox"), b"private", wait=True)
    orch.publish(topics.agent(RUN, "client-000", "inbox"), b"yours", wait=True)
    assert received_until(a, b"yours") == [(topics.agent(RUN, "client-000", "inbox"), b"yours")]
    for t in (orch, a, b):
        t.close()


def test_an_agent_process_joins_with_its_own_credentials(secure, tmp_path):
    import numpy as np

    from edge_agent.shard import save_shard
    from orchestrator.broker_config import agent_identity
    broker, out, creds = secure
    orch = connect(broker.port, creds["orchestrator"])
    orch.subscribe(topics.agent(RUN, "client-002", "hello"))
    shard = tmp_path / "shard.npz"
    save_shard(shard, np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64))

    class Fleet:  # what fleet.credentials holds in a run config
        credentials = str(out)
    args, env = agent_identity(Fleet, "client-002")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--broker",
         f"mqtts://127.0.0.1:{broker.port}", "--data", str(shard), "--id", "client-002",
         "--run", RUN, "--state-dir", str(tmp_path / "state"), *args],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        m = orch.get(timeout=30)
        hellos = [m.payload] if m is not None else []
    finally:
        proc.terminate()
        err = proc.communicate(timeout=10)[1].decode(errors="replace")
    assert hellos and decode(hellos[0]).agent_id == "client-002", err[-2000:]
    orch.close()


@pytest.mark.parametrize("fleet, words", [
    ({"broker": "mqtt://h:1883", "credentials": "{out}"}, "is not TLS"),
    ({"broker": "mqtts://h:8883", "credentials": "{tmp}"}, "holds no credentials.json"),
    ({"broker": "mqtts://h:8883", "credentials": "{out}", "username": "x"},
     "leave out fleet.username"),
    ({"broker": "mqtts://h:8883", "tls_cert": "{out}/ca.crt"}, "go together"),
    ({"credentials": "{out}"}, "fleet.broker is empty"),
])
def test_config_refuses_mismatched_fleet_identity(fleet_dir, tmp_path, fleet, words):
    from orchestrator.config import ConfigError, parse_config
    out = str(fleet_dir[0])
    section = {k: v.format(out=out, tmp=tmp_path) for k, v in fleet.items()}
    with pytest.raises(ConfigError, match=words):
        parse_config({"fleet": section})
    good = parse_config({"fleet": {"broker": "mqtts://h:8883", "credentials": out}})
    from orchestrator.broker_config import orchestrator_identity
    assert orchestrator_identity(good.fleet)[0] == "orchestrator"
