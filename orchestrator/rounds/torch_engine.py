"""The ZO step in torch, for many clients at once, on a GPU when there is one.

It computes what ``edge_agent/engine.py`` ``ZoEngine.round`` computes, for several clients:
for each seed, the loss over a client's whole shard at ``w + eps z`` and ``w - eps z`` (the
mean cross-entropy of the exported graph, micro-batch by micro-batch as an agent sums it),
the SPSA scalar, and FedKSeed-style local steps. The perturbed weights have the agent's
bits: ``fl32(w + fl32(fl32(alpha) * z))`` element by element (``protocols/directions.py``),
as a separate multiply and add, so no fused multiply-add changes them. The forward passes
are torch's, so losses (and the scalars) may differ from ONNX Runtime's in the last bits;
the state never does, since only the orchestrator's ``ModelState`` applies commits.

What makes it fast:

* One evaluation per (seed, sign) serves every client that holds the seed: their shards
  go through together, in batches of ``batch`` samples. With a direction pool several
  clients share a seed and the batches grow; with distinct seeds each client's shard is
  one group.
* Directions come from the protocol's own generator on the host, as packed bits (an
  eighth of a byte per parameter, the Philox stream itself), uploaded once per step for
  many seeds and expanded on the device; Gaussian directions are made on the host as
  values.
* The device is a parameter: CPU and CUDA run this same code.

``exact=True`` (the simulation) keeps the weights once more as the base every evaluation
starts from, so every client sees the bits the state holds. ``exact=False`` perturbs in
place and restores by subtraction, as MeZO's and FedKSeed's torch clients do (one copy of
the weights; a restored element may be an ulp off): the torch client ``bench/
agent_round.py`` compares the agent with.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protocols.directions import RADEMACHER, DirectionSpec, direction, raw_words
from protocols.zo import fingerprint, projected_gradient

UPLOAD_BYTES = 256 << 20  # directions uploaded at once, at most (one at least)
SPSA, EXACT = "spsa", "exact"  # the scalar: SPSA's two losses, or the exact derivative


def default_batch(device: torch.device) -> int:
    """Samples per forward pass: a GPU is kept busy by large batches; a CPU gains nothing
    past a few hundred and would pay for them in activation memory."""
    return 1024 if device.type == "cuda" else 256


@dataclass(frozen=True)
class ClientOutput:
    """What one client's round gives, as the agent's ``RoundOutput`` does."""

    scalars: tuple[float, ...]
    loss: float  # mean of every L+ and L- measured
    samples: int
    seconds: float  # the client's share of the engine's time


@dataclass(frozen=True)
class Job:
    """One client's round: its rows ``[start, start + count)`` of the engine's data."""

    start: int
    count: int
    seeds: tuple[int, ...]


class Directions:
    """Several seeds' directions on the device: packed sign bits, or Gaussian values."""

    def __init__(self, seeds: Sequence[int], shapes: Sequence[torch.Size],
                 spec: DirectionSpec, device: torch.device) -> None:
        self.spec, self.shapes = spec, list(shapes)
        self.rademacher = spec.distribution == RADEMACHER
        pieces = [self._host(seed, i, shape) for seed in seeds
                  for i, shape in enumerate(shapes)]
        flat = torch.from_numpy(np.concatenate(pieces)).to(device)
        self.seeds = set(seeds)
        self._parts: dict[tuple[int, int], torch.Tensor] = {}
        offset = 0
        for k, piece in enumerate(pieces):
            seed, index = seeds[k // len(shapes)], k % len(shapes)
            self._parts[(seed, index)] = flat[offset:offset + piece.size]
            offset += piece.size
        self._shifts = torch.arange(8, dtype=torch.uint8, device=device)
        self._scale = np.float32(spec.scale)

    def _host(self, seed: int, index: int, shape: torch.Size) -> np.ndarray:
        size = int(np.prod(shape, dtype=np.int64))
        if self.rademacher:  # the stream's words as bytes: parameter p is bit p % 8 of byte p // 8
            return raw_words(seed, index, 0, -(-size // 64)).astype("<u8").view(np.uint8)
        return direction(self.spec, seed, index, 0, size)  # float32 values, scale included

    @staticmethod
    def host_bytes(spec: DirectionSpec, sizes: Sequence[int]) -> int:
        """What one seed's direction costs to upload."""
        if spec.distribution == RADEMACHER:
            return sum(-(-n // 64) * 8 for n in sizes)
        return 4 * sum(sizes)

    def step(self, seed: int, index: int, alpha: float) -> torch.Tensor:
        """``fl32(fl32(alpha) * z)`` for tensor ``index``: the exact addend of the spec."""
        shape, part = self.shapes[index], self._parts[(seed, index)]
        a = np.float32(alpha)
        if self.rademacher:  # the two values +-fl32(a * scale), as the spec's sign table
            size = int(np.prod(shape, dtype=np.int64))
            bits = ((part.unsqueeze(1) >> self._shifts) & 1).reshape(-1)[:size].view(shape)
            value = float(a * self._scale)
            out = torch.full(shape, -value, dtype=torch.float32, device=part.device)
            return out.masked_fill_(bits.bool(), value)
        return part.view(shape) * float(a)  # float32 product: a is a float32 value


class TorchEngine:
    """A zoo module on a device, its base weights, the clients' data, and their ZO rounds."""

    def __init__(self, module: nn.Module, spec: DirectionSpec, device: torch.device | str,
                 micro_batch: int = 64, batch: int | None = None, exact: bool = True) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval().requires_grad_(False)
        self.params = [p.data for p in self.module.parameters()]  # the export's order
        self.base = [p.clone() for p in self.params] if exact else self.params
        self.spec, self.exact = spec, exact
        self.micro_batch = max(1, int(micro_batch))
        self.batch = batch or default_batch(self.device)
        self._host: Sequence[np.ndarray] = [p.cpu().numpy().copy() for p in self.base]
        self.x = torch.empty(0, device=self.device)
        self.y = torch.empty(0, dtype=torch.int64, device=self.device)

    # --- state and data -------------------------------------------------------------------

    def load(self, weights: Sequence[np.ndarray]) -> None:
        """Make ``weights`` (manifest order, float32) the base, and the parameters a forward
        pass reads until the next perturbation: a copy to the device."""
        with torch.no_grad():
            for base, param, w in zip(self.base, self.params, weights, strict=True):
                base.copy_(torch.from_numpy(np.ascontiguousarray(w)))
                if self.exact:
                    param.copy_(base)
        self._host = weights

    def host_weights(self) -> list[np.ndarray]:
        return [b.cpu().numpy() for b in self.base]

    def fingerprint(self) -> str:
        """The protocol's fingerprint of the base weights, read back from the device."""
        return fingerprint(self.host_weights())

    def set_data(self, x: np.ndarray, y: np.ndarray) -> None:
        """Every client's samples, one after another; a :class:`Job` names its rows."""
        x, y = np.ascontiguousarray(x, np.float32), np.asarray(y, np.int64)
        self.x = torch.from_numpy(x if x.flags.writeable else x.copy()).to(self.device)
        self.y = torch.from_numpy(y if y.flags.writeable else y.copy()).to(self.device)

    # --- forward passes -------------------------------------------------------------------

    def losses(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-sample cross-entropy at the current parameters, in batches (on the device)."""
        out = torch.empty(rows.numel(), device=self.device)
        # float32 throughout: TF32 convolutions would move a loss by ~1e-3, more than the
        # differences SPSA measures.
        with torch.inference_mode(), torch.backends.cudnn.flags(
                enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True,
                allow_tf32=False):
            for i in range(0, rows.numel(), self.batch):
                idx = rows[i:i + self.batch]
                logits = self.module(self.x.index_select(0, idx))
                out[i:i + idx.numel()] = F.cross_entropy(logits, self.y.index_select(0, idx),
                                                         reduction="none")
        return out

    def shard_loss(self, per_sample: np.ndarray) -> float:
        """A shard's loss as an agent sums it: float32 mean per micro-batch, weighted by its
        size in float64, over the whole shard."""
        total, n = 0.0, len(per_sample)
        for start in range(0, n, self.micro_batch):
            chunk = per_sample[start:start + self.micro_batch]
            total += float(np.mean(chunk, dtype=np.float32)) * len(chunk)
        return total / n

    # --- perturbations --------------------------------------------------------------------

    def perturb(self, dirs: Directions, seed: int, alpha: float) -> None:
        """The module's parameters to ``w + alpha z(seed)`` (``exact``: from the base)."""
        for i, (param, base) in enumerate(zip(self.params, self.base)):
            if self.exact:
                torch.add(base, dirs.step(seed, i, alpha), out=param)
            else:
                param.add_(dirs.step(seed, i, alpha))

    def evaluated_weights(self, seed: int, alpha: float) -> list[np.ndarray]:
        """The weights a loss at ``w + alpha z(seed)`` is measured on, back on the host."""
        dirs = self.directions([seed])[0]
        self.perturb(dirs, seed, alpha)
        weights = [p.cpu().numpy().copy() for p in self.params]
        self._restore(dirs, seed, alpha)
        return weights

    def _restore(self, dirs: Directions, seed: int, alpha: float) -> None:
        if not self.exact:  # exact: the next perturbation starts from the base again
            for i, param in enumerate(self.params):
                param.sub_(dirs.step(seed, i, alpha))

    def directions(self, seeds: Sequence[int]) -> list[Directions]:
        """The seeds' directions in uploads of at most ``UPLOAD_BYTES``."""
        shapes = [b.shape for b in self.base]
        per = Directions.host_bytes(self.spec, [b.numel() for b in self.base])
        n = max(1, UPLOAD_BYTES // max(1, per))
        return [Directions(seeds[i:i + n], shapes, self.spec, self.device)
                for i in range(0, len(seeds), n)]

    # --- rounds -------------------------------------------------------------------------

    def rounds(self, jobs: Sequence[Job], eps: float, local_steps: int = 1,
               local_lr: float = 0.0, estimator: str = SPSA) -> list[ClientOutput]:
        """``ZoEngine.round`` for every job; the base weights end where they began.

        The first step of every job starts from the same weights, so a seed is evaluated
        once over all the jobs holding it; later local steps start from each job's own
        local weights and run job by job.
        """
        started = time.perf_counter()
        if estimator == EXACT:
            return self._exact_rounds(jobs, local_steps, started)
        steps = [len(job.seeds) // local_steps for job in jobs]
        pairs = self._evaluate(jobs, [job.seeds[:k] for job, k in zip(jobs, steps)], eps)
        if local_steps > 1:
            for j, job in enumerate(jobs):
                pairs[j] += self._local_steps(job, steps[j], pairs[j], eps, local_steps,
                                              local_lr)
        seconds = time.perf_counter() - started
        work = [job.count * len(job.seeds) for job in jobs]
        return [ClientOutput(tuple(projected_gradient(lp, lm, eps) for lp, lm in pairs[j]),
                             float(np.mean([v for pair in pairs[j] for v in pair])), job.count,
                             seconds * work[j] / sum(work))
                for j, job in enumerate(jobs)]

    def _exact_rounds(self, jobs: Sequence[Job], local_steps: int, started: float
                      ) -> list[ClientOutput]:
        """The exact directional derivative ``grad L(w) . z`` for each job's seeds, where
        SPSA measures ``(L(w + eps z) - L(w - eps z)) / 2 eps``: a ceiling that tells what
        the estimate costs. One backward pass per job over its whole shard, the gradient
        dotted with every direction in float64."""
        if local_steps != 1:
            raise ValueError("the exact directional derivative is measured for one local "
                             "step; set zo.local_steps = 1")
        out = []
        for job in jobs:
            t0 = time.perf_counter()
            loss, grads = self.gradient(torch.arange(job.start, job.start + job.count,
                                                     device=self.device))
            scalars = []
            for dirs in self.directions(list(job.seeds)):
                for seed in (s for s in job.seeds if s in dirs.seeds):
                    scalars.append(sum(float(torch.dot(g.reshape(-1).double(),
                                                       dirs.step(seed, i, 1.0).reshape(-1)
                                                       .double()))
                                       for i, g in enumerate(grads)))
            out.append(ClientOutput(tuple(scalars), loss, job.count,
                                    time.perf_counter() - t0))
        return out

    def gradient(self, rows: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        """The mean cross-entropy over ``rows`` at the base weights, and its gradient with
        respect to every parameter (batch by batch, summed, then divided by the count)."""
        self.load(self._host)
        for p in self.module.parameters():
            p.requires_grad_(True)
            p.grad = None
        total = 0.0
        try:
            for i in range(0, rows.numel(), self.batch):
                idx = rows[i:i + self.batch]
                loss = F.cross_entropy(self.module(self.x.index_select(0, idx)),
                                       self.y.index_select(0, idx), reduction="sum")
                loss.backward()
                total += float(loss.detach())
            n = rows.numel()
            grads = [p.grad.detach() / n for p in self.module.parameters()]
        finally:
            for p in self.module.parameters():
                p.requires_grad_(False)
                p.grad = None
        return total / n, grads

    def _local_steps(self, job: Job, k: int, first: list[tuple[float, float]], eps: float,
                     local_steps: int, local_lr: float) -> list[tuple[float, float]]:
        """Steps 2.. of one job (FedKSeed style): each moves the base by the previous
        step's estimate, as an agent moves its weights; the base is restored after."""
        pairs, moves = list(first), []
        for step in range(1, local_steps):
            prev = job.seeds[(step - 1) * k:step * k]
            moves += [(seed, -local_lr * projected_gradient(lp, lm, eps) / k)
                      for seed, (lp, lm) in zip(prev, pairs[-k:])]
            self._move_base(moves[-k:], sign=1)
            pairs += self._evaluate([job], [job.seeds[step * k:(step + 1) * k]], eps)[0]
        if self.exact:
            self.load(self._host)
        else:  # MeZO's way back: subtract what was added, in reverse
            self._move_base(moves[::-1], sign=-1)
        return pairs[len(first):]

    def _move_base(self, moves: Sequence[tuple[int, float]], sign: int) -> None:
        """``w <- fl32(w + fl32(alpha z))`` on the base for each move in order (``sign=-1``:
        subtract instead)."""
        for dirs in self.directions(list(dict.fromkeys(seed for seed, _ in moves))):
            for seed, alpha in moves:
                if seed in dirs.seeds:
                    for i, base in enumerate(self.base):
                        base.add_(dirs.step(seed, i, alpha), alpha=sign)

    def _evaluate(self, jobs: Sequence[Job], seeds: Sequence[Sequence[int]], eps: float
                  ) -> list[list[tuple[float, float]]]:
        """``(L+, L-)`` for each job's ``seeds``: one evaluation per distinct seed, over
        every job holding it."""
        holders: dict[int, list[int]] = {}
        for j, mine in enumerate(seeds):
            for seed in mine:
                group = holders.setdefault(seed, [])
                if j not in group:
                    group.append(j)
        rows: dict[tuple[int, ...], torch.Tensor] = {}
        measured: list[torch.Tensor] = []
        order = list(holders)
        for dirs in self.directions(order):
            for seed in (s for s in order if s in dirs.seeds):
                group = tuple(holders[seed])
                if group not in rows:
                    rows[group] = torch.cat([torch.arange(jobs[j].start, jobs[j].start
                                                          + jobs[j].count, device=self.device)
                                             for j in group])
                for alpha in (eps, -eps):
                    self.perturb(dirs, seed, alpha)
                    measured.append(self.losses(rows[group]))
                    self._restore(dirs, seed, alpha)
        host = torch.cat(measured).cpu().numpy() if measured else np.empty(0, np.float32)
        found: dict[tuple[int, int], list[float]] = {}
        offset = 0
        for seed in order:
            for _ in (eps, -eps):
                for j in holders[seed]:
                    chunk = host[offset:offset + jobs[j].count]
                    found.setdefault((j, seed), []).append(self.shard_loss(chunk))
                    offset += jobs[j].count
        return [[tuple(found[(j, seed)]) for seed in mine] for j, mine in enumerate(seeds)]
