"""The embedded amqtt broker: the orchestrator's zero-install broker, MQTT 3.1.1 only."""

from __future__ import annotations

import socket
import statistics
import time

import pytest

from edge_agent.mqtt import ConnectFailed, ConnectRefused, Message, MqttTransport
from orchestrator.fleet.broker import BrokerStartError, EmbeddedBroker


@pytest.fixture
def broker():
    with EmbeddedBroker(port=0) as b:
        yield b


def test_port_zero_picks_a_free_port_that_accepts_connections(broker):
    assert broker.running
    assert broker.port > 0
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    with socket.create_connection(("127.0.0.1", broker.port), timeout=2):
        pass


def test_two_clients_exchange_binary_messages(broker, clients):
    a = clients(broker.url, client_id="orchestrator")
    b = clients(broker.url, client_id="pi-1")
    b.subscribe("zowarmup/run/round", qos=1)
    a.subscribe("zowarmup/run/agent/+/result", qos=1)
    b.publish("zowarmup/run/settle", b"", qos=1, wait=True)  # SUBSCRIBE processed
    a.publish("zowarmup/run/settle", b"", qos=1, wait=True)

    chunk = bytes(range(256)) * 1024  # a 256 KiB model chunk
    a.publish("zowarmup/run/round", chunk, qos=1, wait=True)
    assert b.get(timeout=5) == Message("zowarmup/run/round", chunk, False)
    b.publish("zowarmup/run/agent/pi-1/result", b"\x00\xff" * 8, qos=1, wait=True)
    assert a.get(timeout=5) == Message("zowarmup/run/agent/pi-1/result", b"\x00\xff" * 8, False)
    assert a.get(timeout=0.1) is None and b.get(timeout=0) is None


def test_retained_message_reaches_a_late_subscriber(broker, clients):
    a = clients(broker.url)
    a.publish("zowarmup/run/model", b"manifest", qos=1, retain=True, wait=True)
    late = clients(broker.url)
    late.subscribe("zowarmup/run/model", qos=1)
    assert late.get(timeout=5) == Message("zowarmup/run/model", b"manifest", True)


def test_small_round_trips_are_fast(broker, clients):
    """asyncio sets TCP_NODELAY on accepted sockets; with Nagle on, this is ~40+ ms."""
    t = clients(broker.url)
    t.subscribe("zowarmup/run/loop", qos=1)
    t.publish("zowarmup/run/settle", b"", qos=1, wait=True)
    times = []
    for i in range(30):
        started = time.perf_counter()
        t.publish("zowarmup/run/loop", b"%d" % i, qos=1)
        assert t.get(timeout=5).payload == b"%d" % i
        times.append(time.perf_counter() - started)
    assert statistics.median(times) * 1000 < 20


def test_mqtt5_connect_is_refused_with_a_clear_error(broker):
    t = MqttTransport(broker.url, protocol="5")
    with pytest.raises(ConnectRefused, match="does not speak MQTT 5") as info:
        t.connect(timeout=5)
    assert "protocol version" in info.value.reason.lower()
    t.close()


def test_stop_closes_the_port_and_a_restart_brings_clients_back():
    b = EmbeddedBroker(port=0).start()
    t = MqttTransport(b.url, reconnect_min_delay=0.05, reconnect_max_delay=0.2)
    try:
        t.connect(timeout=5)
        t.subscribe("zowarmup/run/commit", qos=1)
        b.stop()
        assert not b.running
        deadline = time.monotonic() + 5
        while t.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not t.connected
        with pytest.raises(ConnectFailed):
            MqttTransport(b.url).connect(timeout=2)

        b.start()  # the same port as before
        assert t.wait_connected(10)
        t.publish("zowarmup/run/settle", b"", qos=1, wait=True)  # re-subscription processed
        t.publish("zowarmup/run/commit", b"c1", qos=1, wait=True)
        assert t.get(timeout=5) == Message("zowarmup/run/commit", b"c1", False)
    finally:
        t.close()
        b.stop()


def test_a_taken_port_gives_a_clear_error(broker):
    with pytest.raises(BrokerStartError, match=f"127.0.0.1:{broker.port}"):
        EmbeddedBroker(port=broker.port).start()


def test_anonymous_can_be_refused():
    with EmbeddedBroker(port=0, allow_anonymous=False) as b:
        t = MqttTransport(b.url)
        with pytest.raises(ConnectRefused):
            t.connect(timeout=5)
        t.close()


def test_simultaneous_connects_are_all_kept_and_get_only_their_own_retained(broker, clients):
    """Twenty agents connect at once while the orchestrator's filter holds retained
    statuses (amqtt 0.12 unpatched drops some of them, and sends each every retained
    message of every filter in the broker). Each must connect once and receive exactly the
    one retained message of its own subscriptions."""
    import threading

    orchestrator = clients(broker.url, client_id="orchestrator")
    orchestrator.subscribe("zowarmup/run/agent/+/status", qos=1)
    for i in range(20):
        orchestrator.publish(f"zowarmup/run/agent/a{i}/status", b"online", retain=True,
                             wait=True)
    orchestrator.publish("zowarmup/run/model", b"manifest", retain=True, wait=True)
    agents = [MqttTransport(broker.url, client_id=f"a{i}") for i in range(20)]

    def join(t: MqttTransport, i: int) -> None:
        for topic_filter in (f"zowarmup/run/agent/a{i}/inbox", "zowarmup/run/model"):
            t.subscribe(topic_filter)
        t.connect(10)
        t.subscribe(f"zowarmup/run/model/m{i}/+")  # a new filter while others connect

    threads = [threading.Thread(target=join, args=(t, i)) for i, t in enumerate(agents)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        time.sleep(1.0)
        assert [t.connects for t in agents] == [1] * 20
        for t in agents:
            assert t.get(timeout=2) == Message("zowarmup/run/model", b"manifest", True)
            assert t.get(timeout=0) is None
    finally:
        for t in agents:
            t.close()


def test_the_broker_command_stops_on_sigterm_and_says_so(tmp_path):
    """`zowarmup broker` under systemd or `kill`: SIGTERM stops it as Ctrl-C does, with its
    port closed and a last line that says so."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.brokers import free_port, wait_for_port
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "broker", "--port",
                             str(port)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_port("127.0.0.1", port, 30, alive=lambda: proc.poll() is None)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == f"broker on mqtt://127.0.0.1:{port} stopped"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
