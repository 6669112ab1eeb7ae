"""The device daemon: MQTT in, the agent state machine in the middle, the ZO engine out.

One thread does all the work: it takes messages from the transport's queue (paho's
network thread only fills it), feeds them to ``AgentSession``, and carries out what the
session asks: download and load a model, compute a round, apply commits, publish. So a
forward pass never runs on the network thread, and everything a round touches happens
in one place, in order.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

from protocols.agent_session import AgentSession, Apply, Compute, LoadModel, Refused
from protocols.errors import ProtocolError, ZoError
from protocols.messages import Capabilities, sendable
from protocols.topics import Send

from . import memory
from .blackbox import open_blackbox
from .download import ModelDownload, parse_announced_manifest
from .engine import ZoEngine
from .mqtt import ConnectFailed, MqttTransport, Tls, Will
from .prompt_engine import build_engine
from .shard import load_shard

log = logging.getLogger("zowarmup.agent")
BLACKBOX_ENV = "ZOWARMUP_BLACKBOX"
# MQTT keep-alive: with nothing else to send, the agent pings every 15 s, and the broker
# closes a connection silent for 1.5 keep-alives, then publishes the agent's last will
# (status offline). So a device that loses power or its network is known offline within
# 22.5 s; a process that dies is known at once (its socket closes).
KEEPALIVE_S = 15


@dataclass(frozen=True)
class AgentConfig:
    broker: str
    data: Path
    agent_id: str
    run_id: str = "default"
    state_dir: Path = Path("zowarmup-agent-state")
    username: str | None = None
    password: str | None = None
    tls: Tls | None = None
    protocol: str = "3.1.1"
    micro_batch: int | None = None
    threads: int | None = None
    connect_timeout: float = 10.0
    strategy: str = "auto"
    memory_budget_mb: float | None = None


def capabilities(samples: int, threads: int | None) -> Capabilities:
    try:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        memory_mb = 0
    from importlib.metadata import PackageNotFoundError, version
    try:
        agent_version = version("zowarmup")
    except PackageNotFoundError:
        agent_version = "dev"
    return Capabilities(int(memory_mb), threads or memory.usable_cores(), samples,
                        f"{platform.machine()}-{platform.system()}".lower()[:128], agent_version)


class AgentDaemon:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.samples = _count_samples(config.data)
        self.session = AgentSession(config.run_id, config.agent_id,
                                    capabilities(self.samples, config.threads))
        self.engine: ZoEngine | None = None
        self.download: ModelDownload | None = None
        self.stop_event = threading.Event()
        will = self.session.last_will()
        self.transport = MqttTransport(
            config.broker, client_id=f"zowarmup-{config.run_id}-{config.agent_id}",
            protocol=config.protocol, username=config.username, password=config.password,
            tls=config.tls, will=Will(will.topic, will.payload, retain=will.retain),
            keepalive=KEEPALIVE_S)
        self._connects_seen = 0

    # --- lifecycle ---------------------------------------------------------------------

    def run(self) -> None:
        self._connect_with_backoff()
        for topic_filter in self.session.subscriptions():
            self.transport.subscribe(topic_filter)
        try:
            while not self.stop_event.is_set():
                if self.transport.connects != self._connects_seen and self.transport.connected:
                    self._connects_seen = self.transport.connects
                    log.info("connected to %s as %s", self.config.broker, self.config.agent_id)
                    self._publish(self.session.connected())
                message = self.transport.get(timeout=0.2)
                if message is not None:
                    self._on_message(message.topic, message.payload)
        finally:
            log.info("stopping: sending offline status and closing the connection")
            self._publish([self.session.last_will()])
            self.transport.close()

    def stop(self) -> None:
        self.stop_event.set()

    def _connect_with_backoff(self) -> None:
        delay = 0.5
        while not self.stop_event.is_set():
            try:
                self.transport.connect(self.config.connect_timeout)
                return
            except ConnectFailed as exc:
                log.warning("cannot reach %s (%s); retrying in %.1f s", self.config.broker, exc,
                            delay)
                self.stop_event.wait(delay)
                delay = min(delay * 2, 30.0)

    # --- messages -------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self.download is not None:
            try:
                if self.download.offer(topic, payload):
                    if self.download.complete:
                        self._finish_download()
                    return
            except ProtocolError as exc:
                log.warning("model download: %s", exc)
                return
        self._handle(self.session.receive(topic, payload))

    def _handle(self, events: list) -> None:
        queue = list(events)
        while queue:
            event = queue.pop(0)
            if isinstance(event, Send):
                self._publish([event])
            elif isinstance(event, LoadModel):
                self._start_download(event)
            elif isinstance(event, Compute):
                queue += self._compute(event)
            elif isinstance(event, Apply):
                fp = self.engine.apply(event.commits)
                log.info("applied commit(s) %s, fingerprint %s",
                         ", ".join(str(c.commit.round) for c in event.commits), fp)
                queue += self.session.applied(event.commits, fp)
            elif isinstance(event, Refused):
                log.warning("orchestrator refused our message: %s (%s)", event.error.detail,
                            event.error.code)

    def _publish(self, sends: list[Send]) -> None:
        for send in sends:
            try:
                self.transport.publish(send.topic, send.payload, qos=send.qos, retain=send.retain)
            except Exception as exc:  # noqa: BLE001 - a lost publish is retried by the protocol
                log.warning("publish to %s failed: %s", send.topic, exc)

    # --- work -------------------------------------------------------------------------

    def _compute(self, event: Compute) -> list:
        start = event.start
        log.info("round %d: %d direction(s) over %d samples", start.round, len(event.seeds),
                 self.samples)
        try:
            out = self.engine.round(event.seeds, start.eps, start.local_steps, start.local_lr)
        except ZoError as exc:  # a black box that refused (budget) or cannot be reached
            log.error("round %d: %s; no result sent", start.round, exc)
            return self.session.skipped()
        if not sendable(out.loss, out.scalars):
            log.error("round %d: the loss is not usable on this shard (loss %s): the model has "
                      "diverged; no result sent. Lower the run's ZO learning rate.",
                      start.round, out.loss)
            return self.session.skipped()
        log.info("round %d: done in %.2f s, loss %.4f", start.round, out.seconds, out.loss)
        return self.session.computed(start, out.scalars, out.samples, out.loss, out.seconds,
                                     out.queries)

    def _start_download(self, event: LoadModel) -> None:
        announce = event.announce
        try:
            manifest = parse_announced_manifest(announce)
        except ProtocolError as exc:
            log.error("announced model refused: %s", exc)
            return
        directory = self.config.state_dir / "models" / announce.model_sha256[:16]
        self.download = ModelDownload(self.config.run_id, announce, manifest, directory)
        log.info("loading model %s (state version %d): %d file(s) to fetch",
                 announce.model_sha256[:12], announce.version, len(self.download.files))
        if self.download.complete:
            self._finish_download()
            return
        for topic_filter in self.download.filters():
            self.transport.subscribe(topic_filter)

    def _finish_download(self) -> None:
        download, self.download = self.download, None
        for topic_filter in download.filters():
            self.transport.unsubscribe(topic_filter)
        announce = download.announce
        try:
            download.finish()
            shard = load_shard(self.config.data, download.manifest)
            engine = build_engine(download.directory, shard, announce.spec, self._blackbox(),
                                  micro_batch=self.config.micro_batch,
                                  threads=self.config.threads, manifest=download.manifest,
                                  strategy=self.config.strategy,
                                  memory_budget_mb=self.config.memory_budget_mb)
            if announce.snapshot:
                engine.load_weights(download.directory / announce.snapshot)
        except Exception as exc:  # noqa: BLE001 - a model we cannot load must not stop us
            log.error("model %s cannot be used: %s", announce.model_sha256[:12], exc)
            return
        self.engine = engine
        fp = engine.fingerprint()
        log.info("model ready: %d parameters, state version %d, fingerprint %s, forward "
                 "strategy %s", download.manifest.num_parameters, announce.version, fp[:12],
                 getattr(engine, "strategy", "-"))
        self._handle(self.session.model_loaded(announce.model_sha256, announce.version, fp))

    def _blackbox(self):
        """How to open the black box a prompt-tuning run queries: ZOWARMUP_BLACKBOX (an
        endpoint URL, with the key in ZOWARMUP_API_KEY, or a black-box directory); None
        when it is not set, which only a prompt model minds."""
        address = os.environ.get(BLACKBOX_ENV, "")
        if not address:
            return None
        return lambda: open_blackbox(address, self.config.agent_id,
                                     threads=self.config.threads)


def _count_samples(path: Path) -> int:
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as data:
            return int(data["y"].shape[0])
    except (OSError, KeyError, ValueError) as exc:
        raise ProtocolError(f"shard {path} cannot be read: {exc}", "bad_shard") from None

