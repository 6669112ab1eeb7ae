"""Which fleet a run's rounds go over, built from its config: the one place that reads the
``[fleet]`` table and the agents' ``[zo]`` settings.

Over MQTT: the embedded broker unless ``fleet.broker`` names one, the orchestrator's own
identity, the model published, and one local ``zowarmup-agent`` process per client unless
the devices are remote. In process (``--simulate``, experiments): the agent's engine in
worker processes, or with ``zo.engine = "torch"`` one torch engine on the run's device.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

from protocols.coordinator import Coordinator

from ..config import Config
from ..fleet.agents import LocalAgents
from ..fleet.broker import EmbeddedBroker
from ..fleet.mosquitto import agent_identity, orchestrator_identity
from ..rounds.model import ModelState
from ..rounds.mqtt import MqttFleet, connect
from ..rounds.torch_fleet import TorchFleet
from ..rounds.workers import EngineFactory, Switch, WorkerFleet, use_shard
from ..train.fedavg import resolve_device
from .state import RunDir

log = logging.getLogger("zowarmup.run")


def mqtt_fleet(config: Config, rd: RunDir, state: ModelState, coordinator: Coordinator,
               stack: ExitStack, pool: list[str], local: int,
               agent_env: dict[str, str] | None = None) -> MqttFleet:
    """Agents over MQTT: ``local`` of the ``pool`` started here (0: remote devices join)."""
    url = config.fleet.broker
    if not url:
        broker = EmbeddedBroker(port=0).start()
        stack.callback(broker.stop)
        url = broker.url
        log.info("embedded broker on %s", url)
    username, password, tls = orchestrator_identity(config.fleet)
    transport = connect(url, f"zowarmup-{config.run.name}-orchestrator", username, password,
                        tls)
    stack.callback(transport.close)
    fleet = MqttFleet(transport, state, coordinator, pool[:local] if local else None,
                      wanted=config.data.clients, join_timeout_s=config.fleet.join_timeout_s,
                      snapshot_every=config.zo.snapshot_every)
    fleet.publish_model()
    if local:
        agents = LocalAgents(url, config.run.name, {a: rd.shard(a) for a in pool[:local]},
                             rd.agents, state.model_dir, config.zo.agent_threads,
                             config.zo.micro_batch, env=dict(agent_env or {}),
                             identity=lambda agent: agent_identity(config.fleet, agent))
        agents.start()
        stack.callback(agents.stop)
    return fleet


def worker_fleet(config: Config, rd: RunDir, state: ModelState, coordinator: Coordinator,
                 stack: ExitStack, pool: list[str], workers: int | None = None,
                 engine_factory: EngineFactory | None = None,
                 switch: Switch = use_shard) -> WorkerFleet:
    """The pool's clients in worker processes, each with its shard from the run directory."""
    shards: dict[str, Path] = {a: rd.shard(a) for a in pool}
    fleet = WorkerFleet(state, coordinator, shards, config.zo.micro_batch, engine_factory,
                        switch, workers)
    stack.callback(fleet.close)
    return fleet


def simulated_fleet(config: Config, rd: RunDir, state: ModelState, coordinator: Coordinator,
                    stack: ExitStack, pool: list[str],
                    workers: int | None = None) -> WorkerFleet | TorchFleet:
    """The fleet of a simulated run: ``zo.engine`` chooses the agent's own engine in worker
    processes, or the torch engine on ``run.device`` (CUDA when present with "auto")."""
    if config.zo.engine != "torch":
        return worker_fleet(config, rd, state, coordinator, stack, pool, workers)
    fleet = TorchFleet(state, coordinator, {a: rd.shard(a) for a in pool},
                       resolve_device(config.run.device), config.model.width,
                       config.zo.micro_batch, estimator=config.zo.estimator)
    stack.callback(fleet.close)
    return fleet
