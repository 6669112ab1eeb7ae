"""An in-memory stand-in for an MQTT broker: the transport of tests and fast simulations.

It keeps the parts of MQTT the protocol relies on (topic filters with ``+``/``#``,
retained messages, per-client ordered delivery) and nothing else, and it is
deterministic: the same publishes give the same deliveries, in the same order.
"""

from __future__ import annotations

from collections import deque

from .topics import matches


class MemoryBus:
    def __init__(self) -> None:
        self._clients: list[MemoryClient] = []
        self._retained: dict[str, bytes] = {}
        self.published = 0
        self.bytes = 0

    def connect(self, name: str) -> MemoryClient:
        client = MemoryClient(self, name)
        self._clients.append(client)
        return client

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.published += 1
        self.bytes += len(payload)
        if retain:
            if payload:
                self._retained[topic] = payload
            else:
                self._retained.pop(topic, None)
        for client in self._clients:
            if any(matches(f, topic) for f in client.filters):
                client.inbox.append((topic, payload))

    def _subscribe(self, client: MemoryClient, topic_filter: str) -> None:
        for topic, payload in self._retained.items():
            if matches(topic_filter, topic):
                client.inbox.append((topic, payload))

    def _disconnect(self, client: MemoryClient) -> None:
        if client in self._clients:
            self._clients.remove(client)


class MemoryClient:
    """One connection to a ``MemoryBus``: publish, subscribe, and an ordered inbox."""

    def __init__(self, bus: MemoryBus, name: str) -> None:
        self.bus = bus
        self.name = name
        self.filters: list[str] = []
        self.inbox: deque[tuple[str, bytes]] = deque()

    def subscribe(self, topic_filter: str) -> None:
        self.filters.append(topic_filter)
        self.bus._subscribe(self, topic_filter)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.bus._publish(topic, payload, retain)

    def get(self) -> tuple[str, bytes] | None:
        return self.inbox.popleft() if self.inbox else None

    def close(self) -> None:
        self.bus._disconnect(self)
