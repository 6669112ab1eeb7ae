"""The worker fleet: the agent's own engine in worker processes, no broker.

Experiments run hundreds of configurations; starting a broker and one agent process per
client for each would spend most of the time on plumbing. Here the messages the
coordinator makes go through the codec exactly as over MQTT, and the results come from
``ZoEngine``, the agent's own engine, in worker processes. Every agent holds the same bits,
so one engine per worker serves all of its clients by switching shards. With the same
micro-batch, forward strategy and thread count as the agents, a run over this fleet ends on
the same bits as one over MQTT (``tests/test_run.py`` checks it).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edge_agent.engine import ZoEngine
from edge_agent.lifeline import exit_with_parent
from edge_agent.shard import Shard, load_shard
from protocols import topics
from protocols.codec import decode, encode
from protocols.coordinator import Coordinator
from protocols.directions import DirectionSpec
from protocols.manifest import load_manifest
from protocols.messages import CommitMessage, Result, sendable
from protocols.topics import Send

from ..fleet.agents import strategy_for
from .inprocess import greet, require_answers
from .loop import Choose
from .model import Delta, ModelState

EngineFactory = Callable[..., ZoEngine]  # ZoEngine's signature: (model_dir, shard, spec, ...)


def use_shard(engine: ZoEngine, agent: str, shard: Shard, model_dir: Path) -> None:
    """Make the engine compute as client ``agent``: its shard, and the forward strategy a
    local agent with that shard would use (the strategy decides the last bits)."""
    engine.shard = shard
    engine.strategy = strategy_for(model_dir, len(shard))


Switch = Callable[[ZoEngine, str, Shard, Path], None]  # as use_shard


def _worker(conn, model_dir: str, shards: dict[str, str], spec: DirectionSpec,
            micro_batch: int, engine_factory: EngineFactory | None = None,
            switch: Switch = use_shard) -> None:
    """One process: an engine, its clients' shards, and a loop of round -> results."""
    exit_with_parent(os.getppid())  # a killed orchestrator leaves no worker behind
    manifest = load_manifest(Path(model_dir))
    loaded = {a: load_shard(Path(p), manifest) for a, p in shards.items()}
    first = next(iter(loaded.values()))
    native = strategy_for(Path(model_dir), len(first)) == "native"
    options = dict(micro_batch=micro_batch, threads=1, manifest=manifest,
                   strategy="native" if native else "inputs")
    if engine_factory is None:  # the agent's engine; a copy of the weights is cheap here
        engine = ZoEngine(Path(model_dir), first, spec, restore="copy", **options)
    else:
        engine = engine_factory(Path(model_dir), first, spec, **options)
    while True:
        kind, payload = conn.recv()
        if kind == "stop":
            return
        if kind == "commit":
            message, delta = payload
            engine.apply([decode(message)])
            if delta is not None:
                engine.weights.add(delta)
            conn.send(engine.fingerprint())
            continue
        if kind == "state":  # a resumed run: the orchestrator's weights, canonical
            engine.weights.assign(payload)
            conn.send(engine.fingerprint())
            continue
        conn.send(_answer(engine, loaded, Path(model_dir), payload, switch))


def _answer(engine: ZoEngine, loaded: dict[str, Shard], model_dir: Path, starts: list[bytes],
            switch: Switch) -> tuple[list[bytes], list[str]]:
    """Each start's encoded result, and the clients whose loss diverged (they send none)."""
    results, diverged = [], []
    for start in sorted(map(decode, starts), key=lambda s: s.agent_id):
        agent = start.agent_id  # every start sent here is for one of this worker's clients
        switch(engine, agent, loaded[agent], model_dir)
        out = engine.round(start.seeds, start.eps, start.local_steps, start.local_lr)
        if not sendable(out.loss, out.scalars):
            diverged.append(agent)  # as an agent does: nothing is sent
            continue
        results.append(encode(Result(agent, start.round, out.scalars, out.samples,
                                     engine.fingerprint(), out.loss, out.seconds,
                                     out.queries)))
    return results, diverged


class WorkerFleet:
    """The clients of ``shards`` in ``workers`` processes (default: one per core)."""

    def __init__(self, state: ModelState, coordinator: Coordinator, shards: dict[str, Path],
                 micro_batch: int = 64, engine_factory: EngineFactory | None = None,
                 switch: Switch = use_shard, workers: int | None = None) -> None:
        self.coordinator = coordinator
        self.result_bytes = 0
        self.pool = sorted(shards)
        count = max(1, min(workers or mp.cpu_count() or 1, len(self.pool)))
        ctx = mp.get_context("spawn")  # no inherited torch threads or locks
        self._pipes, self._procs = [], []
        self._worker_of = {a: i % count for i, a in enumerate(self.pool)}
        for w in range(count):
            mine = {a: str(shards[a]) for a in self.pool[w::count]}
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, str(state.model_dir), mine,
                                                     state.spec, micro_batch, engine_factory,
                                                     switch),
                               daemon=True)
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)
        if coordinator.version > 0:  # resumed: the workers take the orchestrator's state,
            self._share(state)  # which replayed at most snapshot_every rounds to get there
        greet(coordinator, self.pool, state.model_sha256)

    def _share(self, state: ModelState) -> None:
        """Every worker's weights set to the state's (the same bits in its own layout)."""
        for pipe in self._pipes:
            pipe.send(("state", state.weights))
        for pipe in self._pipes:
            if pipe.recv() != self.coordinator.fingerprint:
                raise RuntimeError("a simulated agent did not take the orchestrator's state")

    def participants(self, version: int, choose: Choose) -> list[str]:
        return choose(self.pool, version)

    def start(self, starts: Sequence[Send]) -> None:
        mine: list[list[bytes]] = [[] for _ in self._pipes]
        for send in starts:
            agent = decode(send.payload).agent_id
            if agent in self._worker_of:  # a participant without a shard never answers
                mine[self._worker_of[agent]].append(send.payload)
        for pipe, payloads in zip(self._pipes, mine):
            pipe.send(("round", payloads))

    def collect(self, coordinator: Coordinator) -> list[str]:
        diverged: list[str] = []
        for pipe in self._pipes:
            results, lost = pipe.recv()
            diverged += lost
            for payload in results:
                self.result_bytes += len(payload)
                agent = decode(payload).agent_id
                coordinator.receive(topics.agent(coordinator.run_id, agent, "result"), payload,
                                    time.time())
        require_answers(coordinator, diverged)
        return diverged

    def commit(self, broadcast: Send | None, message: CommitMessage,
               delta: Delta | None) -> None:
        payload = broadcast.payload if broadcast is not None else encode(message)
        for pipe in self._pipes:
            pipe.send(("commit", (payload, delta)))
        for pipe in self._pipes:
            if pipe.recv() != message.fingerprint:
                raise RuntimeError("a simulated agent diverged from the coordinator")

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(BrokenPipeError, OSError):
                pipe.send(("stop", b""))
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
