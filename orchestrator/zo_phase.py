"""Step 2: zeroth-order rounds over MQTT with every client, high or low resource.

The broker is the embedded one unless the config names another; the agents are real
``zowarmup-agent`` processes this orchestrator starts (``run``) or that join from their
devices (``serve``). Each round: choose participants, send their seeds, wait for a quorum
or the deadline, aggregate, journal, broadcast; evaluate every ``eval.every`` rounds.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack

import numpy as np

from edge_agent.mqtt import MqttTransport, Tls

from .broker import EmbeddedBroker
from .broker_config import agent_identity, orchestrator_identity
from .config import Config
from .evaluate import Evaluator
from .fleet import LocalFleet
from .progress import Progress
from .rounds import RoundServer
from .run import (
    Diverged,
    Plan,
    RunDir,
    RunError,
    evaluation_row,
    journal_commits,
    open_journal,
    round_policy,
)

log = logging.getLogger("zowarmup.zo")


def run_zo(config: Config, plan: Plan, rd: RunDir, model, progress: Progress,
           started: float, local_agents: int | None, simulate: bool = False,
           workers: int | None = None) -> list[np.ndarray]:
    history = journal_commits(rd.path / "journal")
    rd.keep_metrics(below_round=plan.warmup_rounds + len(history))
    progress.skip(plan.warmup_rounds + len(history))
    if simulate:
        return _simulated(config, plan, rd, progress, started, history, workers)
    with ExitStack() as stack:
        url = config.fleet.broker
        if not url:
            broker = EmbeddedBroker(port=0).start()
            stack.callback(broker.stop)
            url = broker.url
            log.info("embedded broker on %s", url)
        transport = _transport(config, url)
        stack.callback(transport.close)
        journal = open_journal(rd.path / "journal", config.run.name)
        stack.callback(journal.close)
        policy, spec = round_policy(config)
        server = RoundServer(transport, rd.path / "model", config.run.name, config.run.seed,
                             policy, spec, journal, snapshot_every=config.zo.snapshot_every,
                             history=history)
        server.publish_model()
        count = config.fleet.local_agents if local_agents is None else local_agents
        count = len(plan.agent_ids) if count is None else count
        if count:
            fleet = _fleet(config, plan, rd, url, count)
            fleet.start()
            stack.callback(fleet.stop)
        evaluator = Evaluator(rd.path / "model", server.manifest, server.weights,
                              plan.dataset.x_test, plan.dataset.y_test, config.eval.batch_size)
        _recover_metrics(config, plan, rd, evaluator, history, started)
        pool = plan.agent_ids[:count] if count else None
        for version in range(server.coordinator.version, plan.zo_rounds):
            _round(config, plan, rd, server, evaluator, pool, version, progress, started)
        return server.weights


def _simulated(config: Config, plan: Plan, rd: RunDir, progress: Progress, started: float,
               history: list, workers: int | None = None) -> list[np.ndarray]:
    """The same rounds without a broker: coordinator in process, engines in workers."""
    from .simulate import Simulation
    policy, spec = round_policy(config)
    shards = {a: rd.path / "shards" / f"{a}.npz" for a in plan.agent_ids}
    hilo = config.run.method == "zowarmup-hi-fo"
    if hilo:
        from .hilo import saved_deltas
    deltas = saved_deltas(rd.path) if hilo else None
    with ExitStack() as stack:
        journal = open_journal(rd.path / "journal", config.run.name)
        stack.callback(journal.close)
        sim = Simulation(rd.path / "model", shards, config.run.name, config.run.seed, policy,
                         spec, config.zo.micro_batch, workers=workers, history=history,
                         journal=journal, deltas=deltas)
        stack.callback(sim.close)
        if hilo:
            from .hilo import FirstOrderPart, HiLoRounds
            part = FirstOrderPart(config, plan, [w.shape for w in sim.weights])
            sim = HiLoRounds(sim, part, plan, rd.path, plan.warmup_rounds)
        evaluator = Evaluator(rd.path / "model", sim.manifest, sim.weights,
                              plan.dataset.x_test, plan.dataset.y_test, config.eval.batch_size)
        _recover_metrics(config, plan, rd, evaluator, history, started)
        for version in range(sim.coordinator.version, plan.zo_rounds):
            participants = choose(config, plan.agent_ids, version)
            _record(config, plan, rd, sim, evaluator, participants, version, progress, started)
        return sim.weights


def _transport(config: Config, url: str) -> MqttTransport:
    username, password, tls = orchestrator_identity(config.fleet)
    transport = MqttTransport(url, client_id=f"zowarmup-{config.run.name}-orchestrator",
                              username=username, password=password,
                              tls=Tls(*tls) if tls else None)
    transport.connect(30)
    return transport


def _fleet(config: Config, plan: Plan, rd: RunDir, url: str, count: int) -> LocalFleet:
    shards = {a: rd.path / "shards" / f"{a}.npz" for a in plan.agent_ids[:count]}
    return LocalFleet(url, config.run.name, shards, rd.path / "agents", rd.path / "model",
                      config.zo.agent_threads, config.zo.micro_batch,
                      identity=lambda agent: agent_identity(config.fleet, agent))


def choose(config: Config, pool: list[str], version: int) -> list[str]:
    """This round's participants: a seeded sample of the pool, the same on every rerun."""
    k = config.zo.clients_per_round
    if not k or k >= len(pool):
        return list(pool)
    rng = np.random.default_rng([config.run.seed, version, 0x5A0])
    return sorted(rng.choice(pool, size=k, replace=False).tolist())


def _wait(config: Config, server: RoundServer, pool: list[str] | None,
          version: int) -> list[str]:
    f = config.fleet
    if pool is None:  # serve: whoever joined, once enough have
        ready = server.wait_for_agents(config.data.clients, f.join_timeout_s)
        if not ready:
            raise RunError(f"no agent joined run {config.run.name!r} within "
                           f"{f.join_timeout_s:.0f} s; start agents with `zowarmup-agent run "
                           f"--run {config.run.name} --broker URL --data SHARD`")
        return choose(config, ready, version)
    wanted = choose(config, pool, version)
    end = time.monotonic() + f.join_timeout_s
    while time.monotonic() < end and not set(wanted) <= set(server.ready_agents()):
        server.pump(0.1)
    ready = [a for a in wanted if a in server.ready_agents()]
    if not ready:
        raise RunError(f"none of the {len(wanted)} agent(s) chosen for round {version} was "
                       f"ready within {f.join_timeout_s:.0f} s; see their logs under agents/")
    if len(ready) < len(wanted):
        log.warning("round %d: %d of %d chosen agents not in sync; going on without %s",
                    version, len(wanted) - len(ready), len(wanted),
                    ", ".join(sorted(set(wanted) - set(ready))))
    return ready


def _round(config: Config, plan: Plan, rd: RunDir, server: RoundServer, evaluator: Evaluator,
           pool: list[str] | None, version: int, progress: Progress, started: float) -> None:
    participants = _wait(config, server, pool, version)
    _record(config, plan, rd, server, evaluator, participants, version, progress, started)


def _answered(config: Config, commit) -> int:
    return len({seed for seed, _ in commit.pairs}) // max(1, config.zo.directions
                                                          * config.zo.local_steps)


def _scores(config: Config, plan: Plan, evaluator: Evaluator, version: int) -> dict:
    """The evaluation after round ``version``, on the rounds ``eval.every`` picks."""
    if (version + 1) % config.eval.every and version + 1 != plan.zo_rounds:
        return {"test_acc": None, "test_loss": None}
    return evaluation_row({name: evaluator.measure(x, y)
                           for name, (x, y) in plan.evaluation_sets().items()})


def _recover_metrics(config: Config, plan: Plan, rd: RunDir, evaluator: Evaluator,
                     history: list, started: float) -> None:
    """A stop between a commit's journal record and its metrics row loses the row. The
    replayed weights are that round's result, so the row is written again (evaluated if
    the round was an evaluation round), and the metrics hold every journaled round once."""
    if not history:
        return
    version = len(history) - 1
    global_round = plan.warmup_rounds + version
    if any(r["round"] == global_round for r in rd.metrics()):
        return
    scores = _scores(config, plan, evaluator, version)
    log.info("round %d: its metrics were lost in the stop; written again", global_round)
    rd.log_metrics({"round": global_round, "phase": "zo", **scores, "participants": 0,
                    "answered": _answered(config, history[-1].commit), "recovered": True,
                    "wall_s": time.time() - started})


def _record(config: Config, plan: Plan, rd: RunDir, server, evaluator: Evaluator,
            participants: list[str], version: int, progress: Progress, started: float) -> None:
    """Run one round on ``server`` (MQTT or simulated), evaluate, and log its metrics."""
    up, down = server.result_bytes, server.downlink_bytes
    commit = server.run_round(participants)
    answered = _answered(config, commit)
    global_round = plan.warmup_rounds + version
    scores = _scores(config, plan, evaluator, version)
    loss = scores["test_loss"]
    if loss is not None and (not math.isfinite(loss) or loss > 1e6):
        raise Diverged(f"the ZO phase diverged at round {global_round} (test loss "
                       f"{loss:.3g}); resume cannot help: rerun with a lower zo.lr "
                       f"(now {config.zo.lr}) or zo.eps (now {config.zo.eps})")
    if not commit.pairs:
        log.warning("round %d closed with no result (deadline %.0f s); nothing changed",
                    global_round, config.zo.deadline_s)
    rd.log_metrics({"round": global_round, "phase": "zo", **scores,
                    "participants": len(participants), "answered": answered,
                    "uplink_bytes": server.result_bytes - up,
                    "downlink_bytes": (server.downlink_bytes - down) * len(participants),
                    "refused": sum(server.coordinator.refused.values()),
                    "late": server.coordinator.late, "clipped": server.coordinator.clipped,
                    "trimmed": server.coordinator.trimmed, "wall_s": time.time() - started})
    progress.update("zo", global_round, scores["test_acc"])

