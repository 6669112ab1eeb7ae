"""Shared fixtures: a real Mosquitto broker per test.

``mosquitto`` is a running broker (``.host``, ``.port``, ``.url``, ``.stop()``, ``.kill()``,
``.start()``, ``.restart()``, ``.log()``); ``mosquitto_factory(extra_config=[...])`` makes
more, with extra config lines. Without Mosquitto installed these fixtures fail with a hint to
run ``scripts/test``; ZOWARMUP_ALLOW_NO_BROKER=1 turns that into a skip.
"""

from __future__ import annotations

import os

import pytest

from tests.brokers import INSTALL_HINT, MosquittoBroker, find_mosquitto


def pytest_addoption(parser):
    parser.addoption("--arm64", action="store_true", default=False,
                     help="Also run the arm64 emulation check (scripts/arm64-check, minutes): "
                     "scripts/test --arm64 -m arm64")


def _require_mosquitto() -> str:
    binary = find_mosquitto()
    if binary is None:
        if os.environ.get("ZOWARMUP_ALLOW_NO_BROKER") == "1":
            pytest.skip("Mosquitto is not installed (ZOWARMUP_ALLOW_NO_BROKER=1)")
        pytest.fail(INSTALL_HINT, pytrace=False)
    return binary


@pytest.fixture
def mosquitto_factory(tmp_path_factory):
    """Call it to get a started broker; every broker it made is stopped after the test."""
    binary = _require_mosquitto()
    made: list[MosquittoBroker] = []

    def make(extra_config: list[str] | None = None) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"), extra_config, binary)
        made.append(broker)
        broker.start()
        return broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory) -> MosquittoBroker:
    """A Mosquitto broker on a free loopback port, anonymous access, TCP_NODELAY on."""
    return mosquitto_factory()


@pytest.fixture
def clients():
    """Make connected transports (quick to reconnect); all are closed after the test."""
    from edge_agent.mqtt import MqttTransport
    made: list[MqttTransport] = []

    def make(url: str, **kwargs) -> MqttTransport:
        kwargs.setdefault("reconnect_min_delay", 0.05)
        kwargs.setdefault("reconnect_max_delay", 0.5)
        t = MqttTransport(url, **kwargs)
        made.append(t)
        t.connect(timeout=5)
        return t

    yield make
    for t in made:
        t.close()

