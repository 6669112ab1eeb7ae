"""The MQTT transport: a thin adapter over paho-mqtt that moves bytes and nothing else.

Both the device agent and the orchestrator talk to the broker through ``MqttTransport``.
It knows no message types and no round logic (those live in ``protocols``); it connects,
keeps the connection alive, and carries ``(topic, payload, retain)`` in both directions::

    with MqttTransport("mqtt://broker.local:1883", client_id="pi-07") as mqtt:
        mqtt.connect(timeout=10)
        mqtt.subscribe("zowarmup/run1/commit", qos=1)
        mqtt.publish("zowarmup/run1/agent/pi-07/hello", b"...", qos=1, wait=True)
        msg = mqtt.get(timeout=5)          # Message(topic, payload, retain) or None

What it takes care of:

* paho runs its network loop in its own thread. Inbound messages are only put on a
  ``queue.Queue`` there; the caller's thread reads them with ``get()``, so a forward pass
  never runs on the network thread (that would stall keep-alives and acknowledgements).
* TCP_NODELAY is set on every socket it opens. paho never sets it, and without it a small
  QoS-1 exchange waits on Nagle's algorithm and delayed ACKs: ~40-90 ms instead of ~0.2 ms.
* After a lost connection paho reconnects with exponential backoff; every subscription is
  made again on each (re)connect, and QoS >= 1 publishes made meanwhile are sent then.
* Inbound messages larger than ``max_inbound_bytes`` are dropped and counted, never queued.
* Many QoS 0 messages at once (a round's starts) go to paho's network thread in batches
  (``publish_many``): one wake-up and one socket write per batch, not per message.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
PROTOCOLS = {
    "3.1.1": MQTTProtocolVersion.MQTTv311,
    "5": MQTTProtocolVersion.MQTTv5,
}
DEFAULT_MAX_INBOUND_BYTES = 4 * 1024 * 1024
BATCH_BYTES = 64 * 1024  # packets handed to paho at once by publish_many


class _QuietCleanClose(logging.Filter):
    """paho 2.2 logs "Client is not connected" at ERROR on every clean disconnect made while
    its network thread runs (the thread polls once more after the socket closed). Not an
    error: drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


paho_log = logging.getLogger(f"{__name__}.paho")
paho_log.addFilter(_QuietCleanClose())


class MqttError(Exception):
    """Anything that went wrong talking to the broker."""


class ConnectFailed(MqttError):
    """The broker could not be reached, or did not answer the CONNECT in time."""


class ConnectRefused(MqttError):
    """The broker answered the CONNECT with a refusal; ``reason`` says why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotConnected(MqttError):
    """An operation that needs a live connection found none."""


class BrokerUrl(NamedTuple):
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerUrl:
    """``mqtt://host[:port]`` (plain, default 1883) or ``mqtts://host[:port]`` (TLS, 8883).

    ``user:password@`` in the URL is accepted; explicit credentials take precedence.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        given = parts.scheme or "none"
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://, not {given!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"broker URL {url!r}: the port is not a number in 1..65535") from None
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL {url!r}: only scheme://host:port is understood")
    return BrokerUrl(
        scheme, parts.hostname, port or DEFAULT_PORTS[scheme],
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


@dataclass(frozen=True)
class Tls:
    """TLS settings. ``ca_file`` None means the system's trusted CAs; ``cert_file`` and
    ``key_file`` are the client certificate for brokers that require one."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class Will:
    """The last will: published by the broker if this client vanishes without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class Message(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


StateCallback = Callable[[bool, str], None]


class MqttTransport:
    """One connection to one broker. Thread-safe for publish/subscribe/get from any thread.

    ``on_state(connected, reason)`` is called on paho's network thread at each connect
    and disconnect: keep it short (set a flag, log), never compute there.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        protocol: str = "3.1.1",
        username: str | None = None,
        password: str | None = None,
        tls: Tls | None = None,
        will: Will | None = None,
        keepalive: int = 30,
        max_inbound_bytes: int = DEFAULT_MAX_INBOUND_BYTES,
        reconnect_min_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        on_state: StateCallback | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"MQTT protocol must be one of {sorted(PROTOCOLS)}, not {protocol!r}")
        self.broker = parse_broker_url(url)
        self.client_id = client_id or f"zowarmup-{uuid.uuid4().hex[:12]}"
        self.protocol = protocol
        self.keepalive = keepalive
        self.max_inbound_bytes = max_inbound_bytes
        self.on_state = on_state

        self.received = 0
        self.dropped_oversize = 0
        self.dropped_bad_topic = 0
        self.connects = 0
        # SimpleQueue: a C queue, ~3 us a message cheaper across both threads than Queue
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._connack = threading.Event()
        self._refusal: str | None = None
        self._early_close: str | None = None
        self._started = False
        self._closed = False

        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id,
            protocol=PROTOCOLS[protocol], reconnect_on_failure=True,
        )
        username = username if username is not None else self.broker.username
        password = password if password is not None else self.broker.password
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None or self.broker.tls:
            tls = tls or Tls()
            self.client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file,
                                keyfile=tls.key_file, cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            self.client.will_set(will.topic, will.payload, will.qos, will.retain)
        self.client.reconnect_delay_set(reconnect_min_delay, reconnect_max_delay)
        self.client.on_socket_open = self._on_socket_open
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        # An exception in a callback must be logged, not end the network thread.
        self.client.suppress_exceptions = True
        self.client.enable_logger(paho_log)

    # -- connection ------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and block until the broker accepts (CONNACK) or ``timeout`` passes.

        Raises ``ConnectFailed`` (unreachable, no answer) or ``ConnectRefused`` (bad
        credentials, not authorised, protocol version not spoken). After it returns, lost
        connections are re-established in the background.
        """
        if self._closed:
            raise MqttError("this transport was closed; make a new one")
        if self._started:
            raise MqttError("connect() was already called")
        deadline = time.monotonic() + timeout
        if self.client.connect_timeout != max(timeout, 0.1):  # paho refuses any change once
            self.client.connect_timeout = max(timeout, 0.1)  # an attempt failed: retry as is
        log.info("connecting to %s as %s (MQTT %s)", self.broker, self.client_id, self.protocol)
        try:
            self.client.connect(self.broker.host, self.broker.port, self.keepalive)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(
                f"cannot reach the MQTT broker at {self.broker}: {exc}"
                " (is the broker running and the address right?)"
            ) from exc
        self._started = True
        self.client.loop_start()
        if not self._connack.wait(max(0.0, deadline - time.monotonic())):
            self._shutdown()
            raise ConnectFailed(f"the MQTT broker at {self.broker} did not accept the connection "
                                f"within {timeout:g} s")
        if self._early_close is not None:
            self._shutdown()
            raise ConnectFailed(f"the MQTT broker at {self.broker} closed the connection before "
                                f"answering the CONNECT ({self._early_close}); is it an MQTT "
                                f"broker that speaks MQTT {self.protocol}?")
        if self._refusal is not None:
            self._shutdown()
            hint = ""
            if "protocol version" in self._refusal.lower() and self.protocol == "5":
                hint = " (this broker does not speak MQTT 5; the embedded broker speaks 3.1.1 only)"
            raise ConnectRefused(
                f"the MQTT broker at {self.broker} refused the connection: {self._refusal}{hint}",
                self._refusal,
            )

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (True) or ``timeout`` passes (False)."""
        return self._connected.wait(timeout)

    def close(self) -> None:
        """Disconnect cleanly (no last will is sent) and stop the network thread."""
        if self._closed:
            return
        self._closed = True
        self._shutdown()
        log.info("closed connection to %s", self.broker)

    def _shutdown(self) -> None:
        self.client.disconnect()
        if self._started:
            # paho's network thread clears its own handle when it ends after the DISCONNECT;
            # loop_stop may find the handle, then lose it before joining (AttributeError).
            # Either way the thread has ended.
            with contextlib.suppress(AttributeError):
                self.client.loop_stop()
            self._started = False
        self._connected.clear()

    def __enter__(self) -> MqttTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- traffic ---------------------------------------------------------------------

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        with self._lock:
            self._subscriptions[topic_filter] = qos
        if self.connected:
            result, _ = self.client.subscribe(topic_filter, qos)
            # NO_CONN: the connection just dropped; on_connect subscribes on reconnect.
            if result not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                why = paho.error_string(result)
                raise MqttError(f"subscribe to {topic_filter!r} failed: {why}")

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        if self.connected:
            self.client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                wait: bool = False, timeout: float = 10.0) -> None:
        """Publish ``payload``. With ``wait`` (QoS >= 1), block until the broker acknowledged
        it, raising ``NotConnected`` / ``MqttError`` if that does not happen in ``timeout``.
        Without ``wait``, QoS >= 1 publishes made while disconnected are sent on reconnect.
        A QoS >= 1 publish that raised ``NotConnected`` may still be sent after reconnecting
        (paho keeps it queued): receivers must tolerate duplicates.
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        deadline = time.monotonic() + timeout
        if wait and not self._connected.wait(timeout):
            raise NotConnected(f"not connected to {self.broker}: cannot publish to {topic!r}")
        info = self.client.publish(topic, bytes(payload), qos, retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise MqttError(f"publish to {topic!r}: the outgoing queue is full")
        if not wait:
            return
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise NotConnected(f"connection to {self.broker} lost while publishing to {topic!r}")
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except RuntimeError as exc:
            raise NotConnected(f"publish to {topic!r} failed: {exc}") from exc
        if not info.is_published():
            raise MqttError(f"publish to {topic!r}: no acknowledgement within {timeout:g} s")

    def publish_many(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """``publish(topic, payload, qos=0)`` for each message, in order, handed to paho's
        network thread in batches of about ``BATCH_BYTES`` of packets instead of one by one.

        paho wakes its network thread and writes the socket once per publish: a round's
        thousand starts then cost ~11 ms of CPU here (and a thousand small reads in the
        broker) where one batch costs ~1 ms. The packets are MQTT's own PUBLISH packets at
        QoS 0 (no packet id, no acknowledgement), so the broker sees exactly what single
        publishes would send. Like any QoS 0 publish, nothing goes out while disconnected.
        """
        queue_batch = getattr(self.client, "_packet_queue", None)  # paho's own queue
        batch: list[bytes] = []
        size = 0
        for topic, payload in messages:
            if not self.connected:
                return
            if queue_batch is None:  # a paho without it: one by one
                self.publish(topic, payload, qos=0)
                continue
            packet = self._publish_packet(topic, payload)
            batch.append(packet)
            size += len(packet)
            if size >= BATCH_BYTES:
                queue_batch(paho.PUBLISH, b"".join(batch), 0, 0, paho.MQTTMessageInfo(0))
                batch, size = [], 0
        if batch and self.connected:
            queue_batch(paho.PUBLISH, b"".join(batch), 0, 0, paho.MQTTMessageInfo(0))

    def _publish_packet(self, topic: str, payload: bytes) -> bytes:
        """A QoS 0 PUBLISH packet (MQTT 3.1.1 section 3.3; MQTT 5 adds an empty property
        list), with the checks paho makes before it sends one."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        name = topic.encode("utf-8")
        if not name or b"+" in name or b"#" in name or len(name) > 0xFFFF:
            raise ValueError(f"cannot publish to topic {topic!r}")
        properties = b"\x00" if self.protocol == "5" else b""
        length = 2 + len(name) + len(properties) + len(payload)
        if length > 268_435_455:
            raise ValueError(f"a {len(payload)}-byte payload is over MQTT's limit")
        if length < 16384:  # a round start's: one or two bytes of length
            header = bytes((0x30, length) if length < 128 else
                           (0x30, 0x80 | (length & 0x7F), length >> 7))
        else:
            header = bytearray(b"\x30")
            while True:  # the remaining length, 7 bits a byte, least significant first
                length, digit = divmod(length, 128)
                header.append(digit | (0x80 if length else 0))
                if not length:
                    break
        return b"".join((header, len(name).to_bytes(2, "big"), name, properties, payload))

    def get(self, timeout: float | None = None) -> Message | None:
        """The next inbound message, or None if none arrives within ``timeout`` seconds
        (``timeout=None`` waits forever, ``0`` does not wait)."""
        try:
            if timeout is not None and timeout <= 0:
                return self._inbox.get_nowait()
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def pending(self) -> int:
        """How many inbound messages wait in the queue."""
        return self._inbox.qsize()

    # -- paho callbacks: network thread, keep them short --------------------------------

    def _on_socket_open(self, client, userdata, sock) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError) as exc:  # not a TCP socket (e.g. a proxy wrapper)
            log.warning("could not set TCP_NODELAY on the connection to %s: %s", self.broker, exc)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refusal = str(reason_code)
            log.error("the MQTT broker at %s refused the connection: %s", self.broker, reason_code)
            self._connack.set()
            if self.connects == 0:  # the first connect: connect() raises, no retries
                client.disconnect()
            self._notify(False, str(reason_code))
            return
        self._refusal = None
        self.connects += 1
        # Mark connected before reading the subscriptions: a subscribe() racing with this
        # either lands in the list read below or sees `connected` and subscribes itself.
        self._connected.set()
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        if subscriptions:
            client.subscribe(subscriptions)
        log.info("connected to %s%s", self.broker, " (again)" if self.connects > 1 else "")
        self._connack.set()
        self._notify(True, "connected")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._closed:
            return
        if not self._connack.is_set():  # closed before any CONNACK: connect() must not hang
            self._early_close = str(reason_code)
            self._connack.set()
            return
        if was_connected:
            log.warning("lost the connection to %s (%s); reconnecting", self.broker, reason_code)
            self._notify(False, str(reason_code))

    def _on_message(self, client, userdata, msg) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # MQTT topics are UTF-8; a broker should never pass this
            self.dropped_bad_topic += 1
            log.warning("dropped a message whose topic is not UTF-8: %r", msg._topic[:80])
            return
        size = len(msg.payload)
        if size > self.max_inbound_bytes:
            self.dropped_oversize += 1
            log.warning("dropped a %d-byte message on %r: over the %d-byte limit",
                        size, topic, self.max_inbound_bytes)
            return
        self.received += 1
        self._inbox.put(Message(topic, msg.payload, bool(msg.retain)))

    def _notify(self, connected: bool, reason: str) -> None:
        if self.on_state is None:
            return
        try:
            self.on_state(connected, reason)
        except Exception:
            log.exception("the connection-state callback failed")
