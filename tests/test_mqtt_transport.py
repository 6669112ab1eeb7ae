"""The MQTT transport against a real Mosquitto: bytes in, the same bytes out, over
MQTT 3.1.1 and 5, through broker restarts, with TCP_NODELAY and an inbound size limit."""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import threading
import time

import pytest

from edge_agent.mqtt import (
    BrokerUrl,
    ConnectFailed,
    ConnectRefused,
    Message,
    MqttTransport,
    NotConnected,
    Tls,
    Will,
    parse_broker_url,
)
from tests.brokers import free_port

pytestmark = pytest.mark.broker
PROTOCOLS = ["3.1.1", "5"]


def settle(*transports: MqttTransport) -> None:
    """Let SUBSCRIBEs reach the broker: a QoS-1 publish is acknowledged only after the
    broker processed everything sent before it on the same connection."""
    for t in transports:
        t.publish("zowarmup-test/settle", b"", qos=1, wait=True, timeout=5)


def drain(t: MqttTransport, topic: str, timeout: float = 5.0) -> Message:
    """The next message on ``topic`` (skipping others), or fail."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = t.get(timeout=left)
        if msg is not None and msg.topic == topic:
            return msg
    pytest.fail(f"no message on {topic!r} within {timeout} s")


# -- URL parsing (no broker) -------------------------------------------------------------


def test_parse_broker_url_defaults_and_forms():
    assert parse_broker_url("mqtt://broker.local") == BrokerUrl("mqtt", "broker.local", 1883)
    assert parse_broker_url("mqtts://broker.local").port == 8883
    assert parse_broker_url("mqtts://broker.local").tls
    assert not parse_broker_url("mqtt://10.0.0.2:1884").tls
    assert parse_broker_url("mqtt://10.0.0.2:1884/").port == 1884
    assert parse_broker_url("MQTT://[::1]:1900") == BrokerUrl("mqtt", "::1", 1900)
    assert str(parse_broker_url("mqtt://[::1]:1900")) == "mqtt://[::1]:1900"
    with_creds = parse_broker_url("mqtt://pi%2D7:s%40cret@host:1")
    assert (with_creds.username, with_creds.password) == ("pi-7", "s@cret")


@pytest.mark.parametrize("url, words", [
    ("http://host:1883", "mqtt:// or mqtts://"),
    ("tcp://host", "mqtt:// or mqtts://"),
    ("host:1883", "mqtt:// or mqtts://"),
    ("mqtt://:1883", "no host"),
    ("mqtt://host:99999", "port"),
    ("mqtt://host:abc", "port"),
    ("mqtt://host:1883/some/path", "only scheme://host:port"),
])
def test_parse_broker_url_refuses_with_a_clear_error(url, words):
    with pytest.raises(ValueError, match=words.replace("/", r"\/").replace("+", r"\+")):
        parse_broker_url(url)


def test_unknown_protocol_version_refused():
    with pytest.raises(ValueError, match="3.1.1"):
        MqttTransport("mqtt://127.0.0.1:1", protocol="4")


# -- traffic ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_binary_round_trip(mosquitto, clients, protocol):
    sub = clients(mosquitto.url, protocol=protocol)
    pub = clients(mosquitto.url, protocol=protocol)
    assert sub.connected and pub.connected
    sub.subscribe("zowarmup-test/bin/+", qos=1)
    settle(sub)
    payloads = [
        bytes(range(256)),
        b"\x00" * 7,
        b"",
        bytes(range(256)) * 1024,  # 256 KiB, the size of a model chunk
    ]
    for i, p in enumerate(payloads):
        pub.publish(f"zowarmup-test/bin/{i}", p, qos=1, wait=True)
    got = [sub.get(timeout=5) for _ in payloads]
    assert got == [Message(f"zowarmup-test/bin/{i}", p, False) for i, p in enumerate(payloads)]
    assert sub.get(timeout=0) is None
    assert sub.received == len(payloads)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_publish_many_delivers_every_message_in_order(mosquitto, clients, protocol):
    """A batch goes to paho's queue as one write of MQTT PUBLISH packets: the subscriber
    must get every message, in order, byte for byte, as from single publishes, across
    batch boundaries (BATCH_BYTES) and around a message bigger than a batch."""
    from edge_agent.mqtt import BATCH_BYTES
    sub = clients(mosquitto.url, protocol=protocol)
    pub = clients(mosquitto.url, protocol=protocol)
    sub.subscribe("zowarmup-test/many/#", qos=0)
    settle(sub)
    sent = [(f"zowarmup-test/many/{i}/é", bytes([i % 256]) * (i * 37 % 300)) for i in range(1500)]
    sent.insert(700, ("zowarmup-test/many/big", bytes(range(256)) * (BATCH_BYTES // 128)))
    sent += [(f"zowarmup-test/many/edge/{n}", b"e" * n)  # one, two and three length bytes
             for n in [*range(80, 120), *range(16_320, 16_370)]]
    assert sum(len(t) + len(p) for t, p in sent) > 3 * BATCH_BYTES
    pub.publish_many(iter(sent))
    got, deadline = [], time.monotonic() + 10
    while len(got) < len(sent) and (msg := sub.get(max(0.0, deadline - time.monotonic()))):
        got.append(msg)
    assert got == [Message(t, p, False) for t, p in sent]
    assert sub.get(timeout=0.2) is None


def test_publish_many_refuses_what_publish_refuses(mosquitto, clients):
    t = clients(mosquitto.url)
    for topic in ("zowarmup-test/+/x", "zowarmup-test/#", ""):
        with pytest.raises(ValueError, match="topic"):
            t.publish_many([(topic, b"x")])
    with pytest.raises(TypeError, match="bytes"):
        t.publish_many([("zowarmup-test/q", "text")])


def test_qos1_publish_wait_is_acknowledged_and_payload_must_be_bytes(mosquitto, clients):
    t = clients(mosquitto.url)
    t.publish("zowarmup-test/q", bytearray(b"abc"), qos=1, wait=True, timeout=5)
    with pytest.raises(TypeError, match="bytes"):
        t.publish("zowarmup-test/q", "text", qos=1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retained_message_reaches_a_late_subscriber(mosquitto, clients, protocol):
    pub = clients(mosquitto.url, protocol=protocol)
    pub.publish("zowarmup-test/model", b"manifest-v1", qos=1, retain=True, wait=True)
    late = clients(mosquitto.url, protocol=protocol)
    late.subscribe("zowarmup-test/model", qos=1)
    assert late.get(timeout=5) == Message("zowarmup-test/model", b"manifest-v1", True)
    # a live subscriber gets later publishes with retain=False, as MQTT says
    pub.publish("zowarmup-test/model", b"manifest-v2", qos=1, retain=True, wait=True)
    assert late.get(timeout=5) == Message("zowarmup-test/model", b"manifest-v2", False)


def test_round_starts_reach_only_their_agent_and_a_compact_commit_arrives_whole(mosquitto,
                                                                               clients):
    """The wire of a round over a real broker: each participant's start on its own inbox
    and nowhere else; the retained commit, base64 and all, decodes to the same pairs."""
    from protocols import topics
    from protocols.codec import decode, encode
    from protocols.coordinator import Coordinator, RoundPolicy
    from protocols.directions import DirectionSpec
    from protocols.messages import CommitMessage, SeedSlots
    from protocols.zo import Commit
    coord = Coordinator("mq", 9, DirectionSpec(), 0, "0" * 32, RoundPolicy(directions=2))
    orch = clients(mosquitto.url)
    agents = {a: clients(mosquitto.url) for a in ("a", "b", "c")}
    for agent, t in agents.items():
        t.subscribe(topics.agent("mq", agent, "inbox"), qos=1)
    settle(*agents.values())
    for send in coord.open_round(["b", "a"], 0.0):
        orch.publish(send.topic, send.payload, qos=1, wait=True)
    plan = coord.current_round
    for agent in ("a", "b"):
        got = agents[agent].get(timeout=5)
        assert got.topic == topics.agent("mq", agent, "inbox")
        assert decode(got.payload) == plan.start_for(agent)
    slots = SeedSlots(9, 2, tuple(range(2000)))
    message = CommitMessage(Commit(0, tuple(zip(slots.seeds(0), (k / 7 for k in range(2000))))),
                            "1" * 32, slots)
    orch.publish(topics.commit("mq"), encode(message), qos=1, retain=True, wait=True)
    late = clients(mosquitto.url)
    late.subscribe(topics.commit("mq"), qos=1)
    assert decode(late.get(timeout=5).payload) == message
    assert all(t.get(timeout=0.2) is None for t in agents.values())  # c got no start at all


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tcp_nodelay_is_set_on_the_client_socket(mosquitto, clients, protocol):
    t = clients(mosquitto.url, protocol=protocol)
    sock = t.client.socket()
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_oversized_inbound_message_is_dropped_and_counted(mosquitto, clients):
    small = clients(mosquitto.url, max_inbound_bytes=1000)
    small.subscribe("zowarmup-test/size/#", qos=1)
    settle(small)
    pub = clients(mosquitto.url)
    pub.publish("zowarmup-test/size/big", b"x" * 1001, qos=1, wait=True)
    pub.publish("zowarmup-test/size/fits", b"y" * 1000, qos=1, wait=True)
    assert small.get(timeout=5) == Message("zowarmup-test/size/fits", b"y" * 1000, False)
    assert small.get(timeout=0.2) is None
    assert small.dropped_oversize == 1
    assert small.received == 1


def test_qos1_round_trip_is_fast_with_nodelay(mosquitto, clients):
    """A request and its reply between two clients, as a round does it. With Nagle's
    algorithm left on, each exchange waits on a delayed ACK: ~44-88 ms. With TCP_NODELAY
    it is well under a millisecond on loopback."""
    asker = clients(mosquitto.url)
    echo = clients(mosquitto.url)
    asker.subscribe("zowarmup-test/pong", qos=1)
    echo.subscribe("zowarmup-test/ping", qos=1)
    settle(asker, echo)
    stop = threading.Event()

    def echo_loop():
        while not stop.is_set():
            msg = echo.get(timeout=0.05)
            if msg is not None:
                echo.publish("zowarmup-test/pong", msg.payload, qos=1)

    thread = threading.Thread(target=echo_loop, daemon=True)
    thread.start()
    try:
        times = []
        for i in range(40):
            started = time.perf_counter()
            asker.publish("zowarmup-test/ping", b"%d" % i, qos=1)
            reply = asker.get(timeout=5)
            times.append(time.perf_counter() - started)
            assert reply is not None and reply.payload == b"%d" % i
    finally:
        stop.set()
        thread.join(5)
    median_ms = statistics.median(times) * 1000
    assert median_ms < 20, f"median QoS-1 round trip {median_ms:.1f} ms: is TCP_NODELAY set?"


# -- connection faults -------------------------------------------------------------------


def test_connect_to_a_closed_port_raises_a_clear_error():
    # Hold the port bound but not listening: connecting is refused, and the kernel cannot
    # hand the same port out as our own source port (a TCP self-connect would "answer").
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    t = MqttTransport(f"mqtt://127.0.0.1:{port}")
    started = time.monotonic()
    try:
        with pytest.raises(ConnectFailed,
                           match=rf"cannot reach the MQTT broker at mqtt://127\.0\.0\.1:{port}"):
            t.connect(timeout=5)
        assert time.monotonic() - started < 2
        assert not t.connected
    finally:
        t.close()
        holder.close()


def test_connect_succeeds_once_the_broker_comes_up(tmp_path):
    """A device that boots before its broker: the agent's first attempts are refused,
    and the same transport connects once the broker listens (paho would otherwise refuse
    the retry itself, and the agent would die)."""
    from tests.brokers import MosquittoBroker
    broker = MosquittoBroker(tmp_path)
    broker.port = free_port()
    t = MqttTransport(f"mqtt://127.0.0.1:{broker.port}")
    try:
        for _ in range(2):
            with pytest.raises(ConnectFailed):
                t.connect(timeout=5)
        broker.start()
        t.connect(timeout=5)
        assert t.connected
    finally:
        t.close()
        broker.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_refused_connection_says_why(mosquitto_factory, protocol):
    closed = mosquitto_factory(["allow_anonymous false"])
    t = MqttTransport(closed.url, protocol=protocol)
    with pytest.raises(ConnectRefused, match="refused the connection: Not authori") as info:
        t.connect(timeout=5)
    assert "authori" in info.value.reason.lower()
    assert not t.connected
    t.close()


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_reconnects_after_broker_restart_and_restores_subscriptions(mosquitto, clients, how):
    states: list[tuple[bool, str]] = []
    sub = clients(mosquitto.url, on_state=lambda up, why: states.append((up, why)))
    pub = clients(mosquitto.url)
    sub.subscribe("zowarmup-test/r", qos=1)
    settle(sub)
    pub.publish("zowarmup-test/r", b"before", qos=1, wait=True)
    assert sub.get(timeout=5).payload == b"before"

    getattr(mosquitto, how)()
    deadline = time.monotonic() + 5
    while (sub.connected or pub.connected) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sub.connected and not pub.connected
    with pytest.raises(NotConnected):
        pub.publish("zowarmup-test/r", b"lost", qos=1, wait=True, timeout=0.2)

    mosquitto.start()
    assert sub.wait_connected(10) and pub.wait_connected(10)
    settle(sub)  # the re-subscription made in on_connect has reached the broker
    pub.publish("zowarmup-test/r", b"after", qos=1, wait=True)
    assert drain(sub, "zowarmup-test/r").payload == b"after"
    assert sub.connects == 2
    assert [up for up, _ in states] == [True, False, True]


def test_publish_made_while_disconnected_is_sent_after_reconnect(mosquitto, clients):
    pub = clients(mosquitto.url)
    mosquitto.stop()
    assert _wait_down(pub)
    pub.publish("zowarmup-test/queued", b"sent-later", qos=1, retain=True)  # no wait: queued
    mosquitto.start()
    assert pub.wait_connected(10)
    late = clients(mosquitto.url)
    late.subscribe("zowarmup-test/queued", qos=1)
    msg = late.get(timeout=5)  # retained, or live if it reached the broker after the SUBSCRIBE
    assert msg is not None and (msg.topic, msg.payload) == ("zowarmup-test/queued", b"sent-later")


def _wait_down(t: MqttTransport, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while t.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    return not t.connected


def test_last_will_is_published_when_a_client_vanishes(mosquitto, clients):
    watcher = clients(mosquitto.url)
    watcher.subscribe("zowarmup-test/agent/pi-1/status", qos=1)
    settle(watcher)
    agent = clients(mosquitto.url, client_id="pi-1",
                    will=Will("zowarmup-test/agent/pi-1/status", b"gone", qos=1, retain=True))
    # cut the TCP connection under paho, as a power loss or a dropped link would
    agent.client.socket().shutdown(socket.SHUT_RDWR)
    assert drain(watcher, "zowarmup-test/agent/pi-1/status") == Message(
        "zowarmup-test/agent/pi-1/status", b"gone", False)


def test_clean_close_sends_no_will(mosquitto, clients):
    watcher = clients(mosquitto.url)
    watcher.subscribe("zowarmup-test/agent/pi-2/status", qos=1)
    settle(watcher)
    agent = MqttTransport(mosquitto.url, client_id="pi-2",
                          will=Will("zowarmup-test/agent/pi-2/status", b"gone"))
    agent.connect(timeout=5)
    agent.close()
    agent.close()  # idempotent
    assert watcher.get(timeout=0.3) is None
    with pytest.raises(Exception, match="closed"):
        agent.connect()


# -- TLS ------------------------------------------------------------------------------------


def make_certificates(directory) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl tool."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = str(directory)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for cmd in (
        ["req", "-x509", *ec, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt", "-days", "2",
         "-subj", "/CN=zowarmup test CA"],
        ["req", *ec, "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr",
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
         "-CAcreateserial", "-out", f"{d}/server.crt", "-days", "2", "-extfile", f"{d}/san.ext"],
    ):
        subprocess.run(["openssl", *cmd], check=True, capture_output=True)
    return {name: f"{d}/{name}" for name in ("ca.crt", "server.crt", "server.key")}


def test_tls_connection_with_a_private_ca(mosquitto_factory, clients, tmp_path):
    certs = make_certificates(tmp_path)
    tls_port = free_port()
    broker = mosquitto_factory([
        f"listener {tls_port} 127.0.0.1",
        f"cafile {certs['ca.crt']}",
        f"certfile {certs['server.crt']}",
        f"keyfile {certs['server.key']}",
    ])
    url = f"mqtts://127.0.0.1:{tls_port}"
    with pytest.raises(ConnectFailed, match="certificate verify failed"):
        MqttTransport(url).connect(timeout=5)  # the system CAs do not know this one

    t = clients(url, tls=Tls(ca_file=certs["ca.crt"]), protocol="5")
    assert t.client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    t.subscribe("zowarmup-test/tls", qos=1)
    settle(t)
    plain = clients(broker.url)  # the same broker, through its plain listener
    plain.publish("zowarmup-test/tls", b"\x01secret", qos=1, wait=True)
    assert t.get(timeout=5) == Message("zowarmup-test/tls", b"\x01secret", False)
