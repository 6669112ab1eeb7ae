"""The embedded MQTT broker: amqtt running inside the orchestrator's process.

It lets a run start with nothing installed but this package: ``EmbeddedBroker`` runs an
amqtt broker on its own asyncio loop in a background thread. amqtt 0.12 speaks MQTT 3.1.1
only (a v5 CONNECT is refused with "unacceptable protocol version"), so agents talking to it
must use MQTT 3.1.1. For a fleet, or for MQTT 5, run Mosquitto or EMQX instead.

    with EmbeddedBroker(port=0) as broker:     # port 0: any free port
        print(broker.url)                      # mqtt://127.0.0.1:41234

TCP_NODELAY: asyncio sets it on every TCP connection it accepts (``asyncio.start_server``
does this since Python 3.7), so small messages are not held back by Nagle's algorithm.
Message size: amqtt has no limit of its own beyond MQTT's 256 MB; model files travel in
chunks of a few hundred KB.

Simultaneous connects: amqtt 0.12 walks its table of subscriptions with ``await`` inside
the walk, in two places: when a client connects (to send it the retained messages of
*every* filter in the table, its own or not) and when it delivers a message. Another
connection that subscribes to a new filter meanwhile changes the table's size, and the
walk fails: the connecting client is dropped, or a message reaches only some of its
subscribers. :class:`_Subscriptions` walks a copy instead, and a connecting client gets the
retained messages of its own subscriptions only (a clean session has none yet: its
SUBSCRIBE brings them).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class BrokerStartError(RuntimeError):
    """The embedded broker could not start (port taken, bad address, amqtt missing)."""


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` in a background thread. ``start()`` returns once it
    accepts connections; ``stop()`` closes every client connection and the listener."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883,
                 allow_anonymous: bool = True) -> None:
        self.host = host
        self.port = port
        self.allow_anonymous = allow_anonymous
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._broker is not None

    def config(self) -> dict[str, Any]:
        """The amqtt 0.12 configuration: one TCP listener, anonymous access if allowed, and
        none of the default packet logging or $SYS publishing."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {
                    "allow_anonymous": self.allow_anonymous,
                },
            },
        }

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        if self.running:
            return self
        self._ready.clear()
        self._error = None
        # amqtt's state machines (the `transitions` package) log every state change at INFO.
        noisy = logging.getLogger("transitions")
        if noisy.level == logging.NOTSET:
            noisy.setLevel(logging.WARNING)
        self._thread = threading.Thread(target=self._run, name="embedded-mqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise BrokerStartError(f"the embedded MQTT broker did not start within {timeout:g} s")
        if self._error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise BrokerStartError(
                f"the embedded MQTT broker could not listen on {self.host}:{self.port}: "
                f"{self._error}"
            ) from self._error
        log.info("embedded MQTT broker (amqtt, MQTT 3.1.1) listening on %s", self.url)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start_broker())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._broker = None
            self._ready.set()
            loop.close()
            self._loop = None
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None

    async def _start_broker(self) -> None:
        broker = _broker_class()(self.config())
        await broker.start()
        self._broker = broker
        if self.port == 0:
            # amqtt does not report the bound port; its listener's asyncio server does.
            server = broker._servers["default"].instance
            self.port = server.sockets[0].getsockname()[1]

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread, broker = self._loop, self._thread, self._broker
        if loop is not None and broker is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(_shutdown(broker), loop)
            try:
                future.result(timeout)
            except Exception as exc:
                log.warning("embedded MQTT broker shutdown: %s", exc)
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout)
        self._broker = None
        self._thread = None
        log.info("embedded MQTT broker on %s stopped", self.url)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EmbeddedBroker {self.url} {'running' if self.running else 'stopped'}>"


async def _shutdown(broker) -> None:
    """Stop amqtt with its port closed and every client connection dropped, at once.

    amqtt's own shutdown closes its listener only after stopping each session, which can
    stall on a session mid-handshake, and on Python < 3.12 it never closes connections
    already accepted: clients would stay "connected" to a stopped broker until garbage
    collection closed their sockets. So: close the listening sockets, abort the client
    connections, then let amqtt tidy up for a bounded time and cancel what is left.
    """
    for server in getattr(broker, "_servers", {}).values():
        if getattr(server, "instance", None) is not None:
            server.instance.close()
    _abort_connections()
    try:
        await asyncio.wait_for(broker.shutdown(), 3.0)
    except Exception as exc:  # noqa: BLE001 - whatever amqtt raised, the broker is stopped
        log.warning("embedded MQTT broker shutdown did not finish cleanly (%r)", exc)
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    _abort_connections()


def _abort_connections() -> None:
    transports = getattr(asyncio.get_running_loop(), "_transports", {})
    for transport in list(transports.values()):
        if transport is not None and not transport.is_closing():
            transport.abort()


class _Subscriptions(dict):
    """amqtt's table of subscriptions (filter -> [(session, qos)]) whose walks see a copy.

    amqtt awaits inside its walks of the table and of each filter's subscribers; a
    subscribe or a disconnect on another connection meanwhile must neither fail the walk
    nor make it skip a subscriber.
    """

    def __setitem__(self, key: str, value: list) -> None:
        super().__setitem__(key, _Subscribers(value))

    def __iter__(self):
        return iter(list(dict.keys(self)))

    def items(self):
        return list(dict.items(self))


class _Subscribers(list):
    def __iter__(self):
        return iter(list.copy(self))


@functools.cache
def _broker_class() -> type:
    """amqtt's broker with :class:`_Subscriptions`, and retained messages sent to a client
    for the filters it subscribed to only."""
    from amqtt.broker import Broker  # orchestrator extra; imported only when used

    class FleetBroker(Broker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._subscriptions = _Subscriptions()

        async def _publish_retained_messages_for_subscription(self, subscription, session):
            subscribers = dict.get(self._subscriptions, subscription[0], ())
            if any(s.client_id == session.client_id for s, _ in subscribers):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return FleetBroker
