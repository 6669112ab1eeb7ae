"""``run.method = "bbpt"``: federated black-box prompt tuning (Fed-BBPT) as a whole run.

The same run directory, journal, round server, simulation and agents as a ZOWarmUp run;
what differs is what the rounds train and where the loss comes from::

    prepare   the owner's black box (blackbox/: pre-trained, exported frozen), the devices'
              prompt (model/: a generator or discrete-prompt logits), the shards, and the
              frozen model's zero-shot accuracy on the test split
    serve     the black box behind `serve-model` (remote) or as a directory (local)
    rounds    seeded SPSA (continuous) or policy-gradient (discrete) rounds over MQTT with
              real agent processes, or simulated; each result carries its query count
    summary   tuned vs zero-shot accuracy, the queries each device made

Evaluation runs here, on the owner's copy of the frozen model (the orchestrator is the
owner in this setting); devices only ever query it.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np

from edge_agent.blackbox import API_KEY_ENV, LocalBlackBox, open_blackbox
from edge_agent.daemon import BLACKBOX_ENV
from edge_agent.prompt_engine import DiscretePromptEngine, PromptEngine
from edge_agent.shard import Shard
from protocols.directions import CATEGORICAL, DirectionSpec
from protocols.zo import weights_sha256

from .bbpt_prepare import Prepared, prepare
from .config import Config
from .fleet import LocalFleet
from .progress import Progress
from .run import SUMMARY, Diverged, RunDir, journal_commits, open_journal, round_policy

log = logging.getLogger("zowarmup.bbpt")


def execute_bbpt(config: Config, rd: RunDir, local_agents: int | None = None,
                 simulate: bool = False) -> dict:
    """Run (or continue) a prompt-tuning job in ``rd``; returns the summary."""
    started = time.time() - float(rd.state().get("wall_s", 0.0))
    prepared = prepare(config, rd)
    history = journal_commits(rd.path / "journal")
    rounds = config.zo.rounds
    rd.keep_metrics(below_round=len(history))
    progress = Progress(rounds)
    progress.skip(len(history))
    with ExitStack() as stack:
        address, key, endpoint = _blackbox_address(config, rd, stack)
        server = (_simulation(config, rd, prepared, address, key, history, stack) if simulate
                  else _mqtt(config, rd, prepared, address, key, history, local_agents, stack))
        evaluate = _evaluator(config, rd, prepared)
        for version in range(server.coordinator.version, rounds):
            _round(config, rd, prepared, server, evaluate, version, progress, started)
        weights = [w.copy() for w in server.weights]
        served = endpoint.service.queries() if endpoint else None
    progress.close()
    summary = summarize(config, rd, prepared, weights, time.time() - started, served)
    (rd.path / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    rd.set_state(phase="done", wall_s=summary["wall_s"])
    return summary


def _spec(config: Config) -> DirectionSpec:
    if config.bbpt.prompt == "discrete":
        return DirectionSpec(CATEGORICAL)
    return DirectionSpec(config.zo.distribution, config.zo.scale)


def _blackbox_address(config: Config, rd: RunDir, stack: ExitStack):
    """Where devices find the black box, its API key, and the endpoint we serve (if any):
    our `serve-model` endpoint on a free loopback port, or the black-box directory."""
    directory = rd.path / "blackbox"
    if config.bbpt.blackbox == "local":
        return str(directory), "", None
    from .serve_model import Limits, ModelServer, ScoringService
    key = secrets.token_urlsafe(24)
    limits = Limits(rate=config.bbpt.rate, burst=max(50, int(config.bbpt.rate)),
                    budget=config.bbpt.budget)
    endpoint = ModelServer(ScoringService(directory, key, limits, threads=2)).start()
    stack.callback(endpoint.stop)
    key_file = rd.path / "blackbox.key"  # for devices started by hand (`zowarmup serve`)
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")
    log.info("black box served at %s (its API key in %s)", endpoint.url, key_file)
    return endpoint.url, key, endpoint


def _pool(config: Config, prepared: Prepared) -> list[str]:
    k = config.bbpt.train_clients
    return prepared.agent_ids[:k] if k else list(prepared.agent_ids)


def _simulation(config: Config, rd: RunDir, prepared: Prepared, address: str, key: str,
                history: list, stack: ExitStack):
    from .simulate import Simulation
    policy, _ = round_policy(config)
    journal = open_journal(rd.path / "journal", config.run.name)
    stack.callback(journal.close)
    shards = {a: rd.path / "shards" / f"{a}.npz" for a in _pool(config, prepared)}
    factory = partial(simulated_engine, address, key)
    sim = Simulation(rd.path / "model", shards, config.run.name, config.run.seed, policy,
                     _spec(config), config.zo.micro_batch, engine_factory=factory,
                     history=history, journal=journal)
    stack.callback(sim.close)
    sim.pool = list(shards)  # type: ignore[attr-defined]
    return sim


def simulated_engine(address: str, api_key: str, model_dir: Path, shard: Shard,
                     spec: DirectionSpec, micro_batch: int = 64, threads: int | None = 1,
                     manifest=None, strategy: str = "inputs"):
    """A simulation worker's engine: each client it runs queries as itself."""
    kind = DiscretePromptEngine if spec.distribution == CATEGORICAL else PromptEngine
    engine = kind(model_dir, shard, None, spec=spec, micro_batch=micro_batch, threads=threads,
                  manifest=manifest)
    engine.open_box = partial(open_blackbox, address, api_key=api_key, threads=threads)
    return engine


def _mqtt(config: Config, rd: RunDir, prepared: Prepared, address: str, key: str,
          history: list, local_agents: int | None, stack: ExitStack):
    from .broker import EmbeddedBroker
    from .rounds import RoundServer
    from .zo_phase import _transport
    url = config.fleet.broker
    if not url:
        broker = EmbeddedBroker(port=0).start()
        stack.callback(broker.stop)
        url = broker.url
    transport = _transport(config, url)
    stack.callback(transport.close)
    journal = open_journal(rd.path / "journal", config.run.name)
    stack.callback(journal.close)
    policy, _ = round_policy(config)
    server = RoundServer(transport, rd.path / "model", config.run.name, config.run.seed, policy,
                         _spec(config), journal, snapshot_every=config.zo.snapshot_every,
                         history=history)
    server.publish_model()
    pool = _pool(config, prepared)
    count = len(pool) if local_agents is None else min(local_agents, len(pool))
    server.pool = pool[:count] if count else None  # type: ignore[attr-defined]
    if count:
        env = {BLACKBOX_ENV: address, API_KEY_ENV: key} if key else {BLACKBOX_ENV: address}
        fleet = LocalFleet(url, config.run.name,
                           {a: rd.path / "shards" / f"{a}.npz" for a in pool[:count]},
                           rd.path / "agents", rd.path / "model", config.zo.agent_threads,
                           config.zo.micro_batch, env=env)
        fleet.start()
        stack.callback(fleet.stop)
    return server


def _evaluator(config: Config, rd: RunDir, prepared: Prepared):
    """Test-set (loss, accuracy) of a state: the devices' engine on the owner's model."""
    test = Shard(prepared.x_test, prepared.y_test)
    box = LocalBlackBox(rd.path / "blackbox", threads=2)
    spec = _spec(config)
    kind = DiscretePromptEngine if spec.distribution == CATEGORICAL else PromptEngine
    engine = kind(rd.path / "model", test, box, spec=spec,
                  micro_batch=config.eval.batch_size, threads=2)

    def evaluate(weights: list[np.ndarray]) -> tuple[float, float]:
        engine.weights.assign(weights)
        loss, correct = engine.evaluate()
        return loss, correct / len(test)
    evaluate.engine = engine  # type: ignore[attr-defined]
    return evaluate


def _run_round(server, participants: list[str]):
    """One round on the MQTT server or the simulation; the commit and what clients sent."""
    if hasattr(server, "open_round"):
        server.open_round(participants)
        server.wait_ready()
        results = server.coordinator.round_results()
        return server.finish_round(), results
    commit = server.run_round(participants)
    return commit, server.last_results


def _participants(config: Config, server, version: int) -> list[str]:
    from .zo_phase import _wait, choose
    if hasattr(server, "open_round"):
        return _wait(config, server, server.pool, version)
    return choose(config, server.pool, version)


def _round(config: Config, rd: RunDir, prepared: Prepared, server, evaluate, version: int,
           progress: Progress, started: float) -> None:
    participants = _participants(config, server, version)
    up, down = server.result_bytes, server.downlink_bytes
    commit, results = _run_round(server, participants)
    acc = loss = None
    if (version + 1) % config.eval.every == 0 or version + 1 == config.zo.rounds:
        loss, acc = evaluate(server.weights)
        if not math.isfinite(loss):
            raise Diverged(f"prompt tuning diverged at round {version}; lower zo.lr")
    queries = {agent: result.queries for agent, result in sorted(results.items())}
    rd.log_metrics({"round": version, "phase": "bbpt", "test_acc": acc, "test_loss": loss,
                    "participants": len(participants), "answered": len(results),
                    "uplink_bytes": server.result_bytes - up,
                    "downlink_bytes": (server.downlink_bytes - down) * len(participants),
                    "queries": sum(queries.values()), "queries_by_device": queries,
                    "train_loss": float(np.mean([r.loss for r in results.values()]))
                    if results else None,
                    "refused": sum(server.coordinator.refused.values()),
                    "wall_s": time.time() - started})
    progress.update("bbpt", version, acc)


def summarize(config: Config, rd: RunDir, prepared: Prepared, weights: list[np.ndarray],
              wall_s: float, served: dict[str, int] | None) -> dict:
    rows = rd.metrics()
    evaluated = [r for r in rows if r.get("test_acc") is not None]
    per_device: dict[str, int] = {}
    for row in rows:
        for agent, count in row.get("queries_by_device", {}).items():
            per_device[agent] = per_device.get(agent, 0) + count
    final = evaluated[-1]["test_acc"] if evaluated else prepared.zero_shot_acc
    participants = [r["participants"] for r in rows if r["participants"]]
    summary = {
        "name": config.run.name, "method": "bbpt", "prompt": config.bbpt.prompt,
        "blackbox": config.bbpt.blackbox, "dataset": config.data.dataset,
        "model": prepared.blackbox_name, "split": f"alpha={config.data.alpha:g}",
        "clients": config.data.clients, "train_clients": len(prepared.agent_ids)
        if not config.bbpt.train_clients else config.bbpt.train_clients,
        "zero_shot_acc": prepared.zero_shot_acc, "final_acc": final,
        "best_acc": max([r["test_acc"] for r in evaluated], default=final),
        "rounds": config.zo.rounds, "trainable_parameters": prepared.trainable,
        "queries_per_device": per_device, "queries_total": sum(per_device.values()),
        "bytes_per_client_round": {
            "uplink": _mean([r["uplink_bytes"] / max(1, r["answered"]) for r in rows]),
            "downlink": _mean([r["downlink_bytes"] / p for r, p in zip(rows, participants)])},
        "final_sha256": weights_sha256(weights), "wall_s": round(wall_s, 2),
    }
    if served is not None:
        summary["endpoint_queries_per_device"] = served
    if config.bbpt.prompt == "discrete" and config.zo.rounds:
        summary["tuned_prompt"] = prepared.describe_prompt(weights)
    return summary


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0
