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

import logging
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

from ..config import Config
from ..rounds.loop import RoundLoop, RoundReport, Schedule, run_rounds, start_coordinator
from ..rounds.model import ModelState
from ..rounds.snapshots import Snapshots
from ..rounds.workers import use_shard
from ..run.fleets import mqtt_fleet, worker_fleet
from ..run.progress import Progress
from ..run.records import RoundRecorder
from ..run.state import (
    BLACKBOX,
    RunDir,
    journal_commits,
    open_journal,
    round_policy,
)
from .endpoint import Limits, ModelServer, ScoringService
from .prepare import Prepared, prepare

log = logging.getLogger("zowarmup.bbpt")


def execute_bbpt(config: Config, rd: RunDir, local_agents: int | None = None,
                 simulate: bool = False) -> dict:
    """Run (or continue) a prompt-tuning job in ``rd``; returns the summary."""
    started = rd.started()
    prepared = prepare(config, rd)
    history = journal_commits(rd.journal)
    rd.keep_metrics(below_round=len(history))
    progress = Progress(config.zo.rounds)
    progress.skip(len(history))
    with ExitStack() as stack:
        address, key, endpoint = _blackbox_address(config, rd, stack)
        journal = open_journal(rd.journal, config.run.name)
        stack.callback(journal.close)
        snapshots = Snapshots(rd.snapshots, config.zo.snapshot_every)
        state = ModelState.load(rd.model, _spec(config), history, snapshots=snapshots)
        coordinator = start_coordinator(state, config.run.name, config.run.seed,
                                        round_policy(config), history, journal)
        pool = _pool(config, prepared)
        if simulate:
            fleet = worker_fleet(config, rd, state, coordinator, stack, pool,
                                 engine_factory=partial(simulated_engine, address, key),
                                 switch=use_device)
        else:
            env = {BLACKBOX_ENV: address, **({API_KEY_ENV: key} if key else {})}
            local = len(pool) if local_agents is None else min(local_agents, len(pool))
            fleet = mqtt_fleet(config, rd, state, coordinator, stack, pool, local, env)
        loop = RoundLoop(state, coordinator, fleet, journal, snapshots)
        schedule = Schedule(config.zo.rounds, config.run.seed, config.zo.clients_per_round,
                            config.eval.every)
        recorder = RoundRecorder(rd, progress, coordinator, started, "bbpt",
                                 hint="rerun with a lower zo.lr", extra=queries_row)
        evaluate = _evaluator(config, rd, prepared, state.weights)
        recorder.recover(history, schedule, evaluate)
        run_rounds(loop, schedule, evaluate, recorder)
        weights = [w.copy() for w in state.weights]
        served = endpoint.service.queries() if endpoint else None
    progress.close()
    summary = summarize(config, rd, prepared, weights, time.time() - started, served)
    rd.write_summary(summary)
    return summary


def _spec(config: Config) -> DirectionSpec:
    if config.bbpt.prompt == "discrete":
        return DirectionSpec(CATEGORICAL)
    return DirectionSpec(config.zo.distribution, config.zo.scale)


def _blackbox_address(config: Config, rd: RunDir, stack: ExitStack
                      ) -> tuple[str, str, ModelServer | None]:
    """Where devices find the black box, its API key, and the endpoint we serve (if any):
    our `serve-model` endpoint on a free loopback port, or the black-box directory."""
    directory = rd.path / BLACKBOX
    if config.bbpt.blackbox == "local":
        return str(directory), "", None
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


def simulated_engine(address: str, api_key: str, model_dir: Path, shard: Shard,
                     spec: DirectionSpec, micro_batch: int = 64, threads: int | None = 1,
                     manifest=None, strategy: str = "inputs"):
    """A simulation worker's engine: each client it runs queries as itself."""
    kind = DiscretePromptEngine if spec.distribution == CATEGORICAL else PromptEngine
    engine = kind(model_dir, shard, None, spec=spec, micro_batch=micro_batch, threads=threads,
                  manifest=manifest)
    engine.open_box = partial(open_blackbox, address, api_key=api_key, threads=threads)
    return engine


def use_device(engine, agent: str, shard: Shard, model_dir: Path) -> None:
    """A simulation worker's switch to client ``agent``: its shard, and its own black-box
    connection, so the endpoint counts each device's queries as a real fleet's."""
    use_shard(engine, agent, shard, model_dir)
    engine.select_device(agent)


def _evaluator(config: Config, rd: RunDir, prepared: Prepared, weights: list[np.ndarray]):
    """Test-set scores of the current prompt: the devices' engine on the owner's model."""
    test = Shard(prepared.x_test, prepared.y_test)
    box = LocalBlackBox(rd.path / BLACKBOX, threads=2)
    spec = _spec(config)
    kind = DiscretePromptEngine if spec.distribution == CATEGORICAL else PromptEngine
    engine = kind(rd.model, test, box, spec=spec, micro_batch=config.eval.batch_size,
                  threads=2)

    def evaluate() -> dict:
        engine.weights.assign(weights)
        loss, correct = engine.evaluate()
        return {"test_acc": correct / len(test), "test_loss": loss}
    return evaluate


def queries_row(report: RoundReport) -> dict:
    """What Fed-BBPT is billed by, per round: each device's black-box queries."""
    results = report.results
    queries = {agent: result.queries for agent, result in sorted(results.items())}
    return {"queries": sum(queries.values()), "queries_by_device": queries,
            "train_loss": float(np.mean([r.loss for r in results.values()]))
            if results else None}


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
