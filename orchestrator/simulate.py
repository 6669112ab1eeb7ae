"""Step 2 in one machine, fast: the same coordinator and the same agent engine, no broker.

Experiments run hundreds of configurations; starting a broker and one agent process per
client for each would spend most of the time on plumbing. Here the ``Coordinator`` state
machine runs exactly as it does over MQTT (seeds, validation, aggregation in participant
order), its messages go through the codec, and the results come from ``ZoEngine``, the
agent's own engine, in worker processes. Every agent holds the same bits, so one engine
per worker serves all of its clients by switching shards. With the same micro-batch,
forward strategy and thread count as the agents, a simulated run ends on the same bits as
one over MQTT (``tests/test_simulate.py`` checks it).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edge_agent.engine import ZoEngine
from edge_agent.shard import load_shard
from protocols import topics
from protocols.codec import decode, encode
from protocols.coordinator import Coordinator
from protocols.directions import DirectionSpec
from protocols.manifest import MANIFEST, load_manifest, read_weights
from protocols.messages import Capabilities, CommitMessage, Hello, Result, sendable
from protocols.zo import apply_commit, fingerprint

from .fleet import strategy_for


def _worker(conn, model_dir: str, shards: dict[str, str], spec: DirectionSpec,
            micro_batch: int, engine_factory=None) -> None:
    """One process: an engine, its clients' shards, and a loop of round -> results."""
    manifest = load_manifest(Path(model_dir))
    loaded = {a: load_shard(Path(p), manifest) for a, p in shards.items()}
    first = next(iter(loaded.values()))
    native = strategy_for(Path(model_dir), len(first)) == "native"
    engine = (engine_factory or ZoEngine)(Path(model_dir), first, spec,
                                          micro_batch=micro_batch, threads=1,
                                          manifest=manifest,
                                          strategy="native" if native else "inputs")
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
        results, diverged = [], []
        for start in sorted(map(decode, payload), key=lambda s: s.agent_id):
            agent = start.agent_id  # every start sent here is for one of this worker's clients
            shard = loaded[agent]
            engine.shard = shard
            if hasattr(engine, "select_device"):  # a prompt engine: this client's black box
                engine.select_device(agent)
            engine.strategy = strategy_for(Path(model_dir), len(shard))  # as local agents
            out = engine.round(start.seeds, start.eps, start.local_steps, start.local_lr)
            if not sendable(out.loss, out.scalars):
                diverged.append(agent)  # as an agent does: nothing is sent
                continue
            results.append(encode(Result(agent, start.round, start.seeds, out.scalars,
                                         out.samples, engine.fingerprint(), out.loss,
                                         out.seconds, out.queries)))
        conn.send((results, diverged))


def _add(weights: list[np.ndarray], delta: list[np.ndarray] | None) -> None:
    for w, d in zip(weights, delta or ()):
        w += d


class Simulation:
    """The ZO phase over the coordinator and worker engines; mirrors ``RoundServer``."""

    def __init__(self, model_dir: Path, shards: dict[str, Path], run_id: str, seed: int,
                 coordinator_policy, spec: DirectionSpec, micro_batch: int = 64,
                 engine_factory=None,
                 workers: int | None = None, history: Sequence[CommitMessage] = (),
                 journal=None, deltas: dict[int, list[np.ndarray]] | None = None) -> None:
        self.journal = journal
        self.model_dir = Path(model_dir)
        self.manifest = load_manifest(self.model_dir)
        self.flat, self.weights = read_weights(self.model_dir, self.manifest)
        self.spec = spec
        self.deltas = dict(deltas or {})  # round -> an update beside its commit (hi+lo)
        for message in history:
            apply_commit(self.weights, message.commit, spec)
            _add(self.weights, self.deltas.get(message.commit.round))
        self.coordinator = Coordinator(run_id, seed, spec, len(history),
                                       fingerprint(self.weights), coordinator_policy,
                                       history=history,
                                       scales=journal.scales if journal is not None else None)
        self.result_bytes = self.downlink_bytes = 0  # downlink: what one participant receives
        ids = sorted(shards)
        count = max(1, min(workers or mp.cpu_count() or 1, len(ids)))
        ctx = mp.get_context("spawn")  # no inherited torch threads or locks
        self._pipes = []
        self._procs = []
        self._worker_of = {a: i % count for i, a in enumerate(ids)}
        for w in range(count):
            mine = {a: str(shards[a]) for a in ids[w::count]}
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, str(self.model_dir), mine, spec,
                                                     micro_batch, engine_factory), daemon=True)
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)
        for message in history:  # the workers start from weights.bin, like a new agent
            self._broadcast_commit(message, self.deltas.get(message.commit.round))
        model_sha256 = hashlib.sha256((self.model_dir / MANIFEST).read_bytes()).hexdigest()
        for agent in ids:
            hello = Hello(agent, Capabilities(0, 1, 0), model_sha256, self.coordinator.version,
                          self.coordinator.fingerprint)
            self.coordinator.receive(topics.agent(run_id, agent, "hello"), encode(hello),
                                     time.time())

    def run_round(self, participants: Sequence[str], delta: list[np.ndarray] | None = None,
                  keep: Callable[[int, list[np.ndarray]], None] | None = None):
        """One round; ``delta``, an update added after the commit, is handed to ``keep``
        (made durable) before the commit is journaled, and sent to every worker with it."""
        c = self.coordinator
        starts = c.open_round(participants, time.time())  # one per participant, in order
        self.downlink_bytes += sum(len(s.payload) for s in starts) // len(starts)
        mine: list[list[bytes]] = [[] for _ in self._pipes]
        for agent, send in zip(participants, starts):
            if agent in self._worker_of:  # a participant without a shard never answers
                mine[self._worker_of[agent]].append(send.payload)
        for pipe, payloads in zip(self._pipes, mine):
            pipe.send(("round", payloads))
        diverged: list[str] = []
        for pipe in self._pipes:
            results, lost = pipe.recv()
            diverged += lost
            for payload in results:
                self.result_bytes += len(payload)
                agent = decode(payload).agent_id
                c.receive(topics.agent(c.run_id, agent, "result"), payload, time.time())
        if not c.round_results() and diverged:
            from .run import Diverged
            raise Diverged(f"the ZO phase diverged in round {c.version}: no client's loss "
                           "is usable (non-finite or past the wire's bounds); rerun with a "
                           "lower zo.lr")
        if not c.round_results():
            raise RuntimeError(f"simulated round {c.version}: every result was refused "
                               f"({c.refusals[-1] if c.refusals else 'none arrived'})")
        self.last_results = c.round_results()  # what each client reported (queries)
        commit = c.close_round()
        apply_commit(self.weights, commit, self.spec)
        _add(self.weights, delta)
        if delta is not None and keep is not None:
            keep(commit.round, delta)
        fp = fingerprint(self.weights)
        message = c.commit_message(commit, fp)
        if self.journal is not None:
            self.journal.append_commit(message, c.closing_scale)
        sent = c.committed(commit, fp)
        self.downlink_bytes += len(sent.payload)
        self._broadcast_commit(message, delta, sent.payload)
        return commit

    def _broadcast_commit(self, message: CommitMessage, delta: list[np.ndarray] | None = None,
                          payload: bytes | None = None) -> None:
        payload = payload or encode(message)
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

