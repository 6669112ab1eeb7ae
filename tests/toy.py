"""A toy ZO engine for protocol tests: a least-squares model held as numpy arrays.

It keeps a copy of the weights while perturbing (the real agent engine does not); what
the tests check here is the protocol, not the engine's memory.
"""

from __future__ import annotations

import numpy as np

from protocols.agent_session import AgentSession, Apply, Compute, LoadModel, Refused
from protocols.directions import DirectionSpec, axpy
from protocols.messages import Capabilities
from protocols.topics import Send
from protocols.zo import apply_commit, fingerprint, projected_gradient

SHAPES = [(4, 3), (3,)]


def initial_weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def make_shard(agent_index: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + agent_index)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    y = (x @ np.array([[1, 0, 0], [0, 2, 0], [0, 0, 1], [1, 1, 1]], np.float32)).astype(np.float32)
    return x, y


def loss(weights: list[np.ndarray], shard: tuple[np.ndarray, np.ndarray]) -> float:
    x, y = shard
    pred = x @ weights[0] + weights[1]
    return float(np.mean((pred - y) ** 2, dtype=np.float64))


class ToyAgent:
    """An AgentSession plus the toy engine; ``handle`` runs the events the session returns."""

    def __init__(self, run_id: str, agent_id: str, index: int, spec: DirectionSpec,
                 base: list[np.ndarray]) -> None:
        self.shard = make_shard(index)
        self.session = AgentSession(run_id, agent_id, Capabilities(512, 2, len(self.shard[0])))
        self.spec = spec
        self.base = base  # what "downloading the model" gives: the exported weights
        self.weights: list[np.ndarray] | None = None
        self.base_version = 0
        self.sent: list[Send] = []
        self.refusals: list[Refused] = []

    def handle(self, events: list) -> list[Send]:
        out: list[Send] = []
        queue = list(events)
        while queue:
            event = queue.pop(0)
            if isinstance(event, Send):
                out.append(event)
            elif isinstance(event, LoadModel):
                self.weights = [w.copy() for w in self.base]
                queue += self.session.model_loaded(event.announce.model_sha256,
                                                   event.announce.version,
                                                   fingerprint(self.weights))
            elif isinstance(event, Compute):
                queue += self._compute(event)
            elif isinstance(event, Apply):
                for c in event.commits:
                    apply_commit(self.weights, c.commit, self.spec)
                queue += self.session.applied(event.commits, fingerprint(self.weights))
            elif isinstance(event, Refused):
                self.refusals.append(event)
        self.sent += out
        return out

    def _compute(self, event: Compute) -> list:
        eps = event.start.eps
        scalars, losses = [], []
        for seed in event.seeds:
            saved = [w.copy() for w in self.weights]
            axpy(self.weights, eps, self.spec, seed)
            plus = loss(self.weights, self.shard)
            self.weights = [w.copy() for w in saved]
            axpy(self.weights, -eps, self.spec, seed)
            minus = loss(self.weights, self.shard)
            self.weights = saved
            scalars.append(projected_gradient(plus, minus, eps))
            losses += [plus, minus]
        return self.session.computed(event.start, tuple(scalars), len(self.shard[0]),
                                     float(np.mean(losses)), 0.0)
