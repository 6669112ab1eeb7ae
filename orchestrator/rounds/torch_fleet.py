"""The torch fleet: every client of a simulated run in one torch engine, on a GPU if any.

A third implementation of the round loop's ``Fleet`` (beside MQTT agents and worker
processes). The coordinator's messages go through the codec as over MQTT; the answers come
from ``TorchEngine`` (``rounds/torch_engine.py``), which evaluates the round's clients
together, every shard resident on the device. The weights it evaluates are the state's:
after each commit the loop has applied to ``ModelState`` (the one place commits are
applied), the fleet copies the state to the device and checks the device's fingerprint
against the commit's. So the journal and every fingerprint are those of any other fleet;
only the scalars may differ in their last bits (torch's forward pass, not ONNX Runtime's),
and with them the run's later bits: the journal, which records them, is the truth.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from edge_agent.shard import load_shard
from protocols import topics
from protocols.codec import decode, encode
from protocols.coordinator import Coordinator
from protocols.messages import CommitMessage, Result, RoundStart, sendable
from protocols.topics import Send

from ..train.evaluate import Evaluator
from ..train.exported import NotRunnable, zoo_module
from .inprocess import greet, require_answers
from .loop import Choose
from .model import Delta, ModelState
from .torch_engine import SPSA, Job, TorchEngine

log = logging.getLogger("zowarmup.rounds")

CHECK_TOLERANCE = 1e-4  # torch against ONNX Runtime on one micro-batch, at the start


class TorchFleet:
    """The clients of ``shards``, simulated by one :class:`TorchEngine` on ``device``."""

    def __init__(self, state: ModelState, coordinator: Coordinator, shards: dict[str, Path],
                 device: torch.device | str, width: int | None = None, micro_batch: int = 64,
                 batch: int | None = None, estimator: str = SPSA) -> None:
        self.coordinator, self.state, self.estimator = coordinator, state, estimator
        self.result_bytes = 0
        self.pool = sorted(shards)
        module = zoo_module(state.model_dir, state.manifest, width)
        self.engine = TorchEngine(module, state.spec, device, micro_batch, batch)
        xs, ys, self.rows = [], [], {}
        for agent in self.pool:
            shard = load_shard(shards[agent], state.manifest)
            self.rows[agent] = (sum(len(y) for y in ys), len(shard))
            xs.append(np.asarray(shard.x))
            ys.append(np.asarray(shard.y, np.int64))
        self.engine.set_data(np.concatenate(xs), np.concatenate(ys))
        self._load(state.fingerprint())
        self._check_against_onnx(xs[0][:micro_batch], ys[0][:micro_batch])
        self._starts: list[RoundStart] = []
        log.info("torch fleet: %d clients, %d samples on %s", len(self.pool),
                 sum(c for _, c in self.rows.values()), self.engine.device)
        greet(coordinator, self.pool, state.model_sha256)

    def _load(self, expected: str) -> None:
        """The state's weights onto the device, checked there by fingerprint."""
        self.engine.load(self.state.weights)
        self.fingerprint = self.engine.fingerprint()
        if self.fingerprint != expected:
            raise RuntimeError(f"the torch engine holds weights {self.fingerprint}, the state "
                               f"is {expected}: the copy to {self.engine.device} changed them")

    def _check_against_onnx(self, x: np.ndarray, y: np.ndarray) -> None:
        """One micro-batch through both: a model that maps wrongly is refused at once."""
        ours = self.engine.shard_loss(self.engine.losses(
            torch.arange(len(y), device=self.engine.device)).cpu().numpy())
        theirs, _ = Evaluator(self.state.model_dir, self.state.manifest, self.state.weights,
                              x, y, len(y)).measure(x, y)
        if not abs(ours - theirs) <= CHECK_TOLERANCE * max(1.0, abs(theirs)):
            raise NotRunnable(f"{self.state.model_dir}: the torch model's loss {ours:.6f} is "
                              f"not the exported graph's {theirs:.6f} on the same batch; use "
                              "zo.engine = \"onnxruntime\"")

    def participants(self, version: int, choose: Choose) -> list[str]:
        return choose(self.pool, version)

    def start(self, starts: Sequence[Send]) -> None:
        decoded = (decode(send.payload) for send in starts)
        self._starts = [s for s in decoded if s.agent_id in self.rows]

    def collect(self, coordinator: Coordinator) -> list[str]:
        """Every start's result, computed together; clients whose loss diverged send none."""
        by_settings: dict[tuple, list[RoundStart]] = defaultdict(list)
        for start in self._starts:
            by_settings[(start.eps, start.local_steps, start.local_lr)].append(start)
        diverged: list[str] = []
        for (eps, steps, lr), starts in by_settings.items():
            jobs = [Job(*self.rows[s.agent_id], tuple(s.seeds)) for s in starts]
            outputs = self.engine.rounds(jobs, eps, steps, lr, self.estimator)
            for start, out in zip(starts, outputs):
                if not sendable(out.loss, out.scalars):
                    diverged.append(start.agent_id)
                    continue
                payload = encode(Result(start.agent_id, start.round, out.scalars, out.samples,
                                        self.fingerprint, out.loss, out.seconds))
                self.result_bytes += len(payload)
                coordinator.receive(topics.agent(coordinator.run_id, start.agent_id, "result"),
                                    payload, time.time())
        self._starts = []
        require_answers(coordinator, diverged)
        return diverged

    def commit(self, broadcast: Send | None, message: CommitMessage,
               delta: Delta | None) -> None:
        """The loop has applied the commit (and delta) to the state: copy it over."""
        self._load(message.fingerprint)

    def close(self) -> None:
        """Let the device's memory go (the data set and two copies of the weights)."""
        self.engine = None  # type: ignore[assignment]
