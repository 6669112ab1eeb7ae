"""The hi+lo ablation (the paper's Table 7): high-resource clients keep first-order steps.

ZOWarmUp switches every client to ZO updates at the pivot. The paper's A.4 asks what
happens if the high-resource clients keep training first-order instead: each round they
run local SGD from the current weights (the warm-up's client settings) while the
low-resource clients answer seeds, and the round's update is the sample-weighted sum of
both parts, as FedAvg weights its clients:

    w <- w + (N_hi / N) * FedAvg step of the high-resource clients
           - (N_lo / N) * lr * sum_j (n_j / N_lo) g_j z_j

The ZO part is an ordinary commit, with the coordinator's learning rate scaled by the
low-resource share. The first-order part is a full weight delta, so this runs only in
simulation: over MQTT every agent would need the whole model every round, the cost
ZOWarmUp exists to avoid. Each round's delta is written (fsync'ed) before its commit is
journaled, so a resumed run replays both and ends on the bits of one that never stopped.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from protocols.zo import Commit

from ..config import Config
from ..rounds.loop import RoundLoop
from ..rounds.model import Delta
from .state import Plan
from .training import trainer, warmup_config

DELTAS = "first-order"  # in the run directory: one file per round


class FirstOrderPart:
    """The high-resource clients' local SGD, run on the workstation from given weights."""

    def __init__(self, config: Config, plan: Plan, shapes: list[tuple[int, ...]]) -> None:
        settings = dataclasses.replace(warmup_config(config), clients_per_round=None)
        self.trainer = trainer(config, plan, settings)
        self.params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        if [tuple(p.shape) for p in self.params] != [tuple(s) for s in shapes]:
            raise ValueError("the torch model's parameters do not match the exported weights")
        self.sizes = [len(part) for part in plan.parts]

    def delta(self, weights: list[np.ndarray], round_index: int, clients: list[int],
              share: float) -> Delta:
        """``share`` times the FedAvg step of ``clients`` from ``weights`` (float32)."""
        with torch.no_grad():
            for p, w in zip(self.params, weights):
                p.copy_(torch.from_numpy(w))
        self.trainer.high_resource = tuple(clients)
        self.trainer.next_round = round_index
        self.trainer.run_round(round_index)
        factor = np.float32(share)
        return [(p.detach().cpu().numpy().astype(np.float32) - w) * factor
                for p, w in zip(self.params, weights)]


class HiLo:
    """A round split in two: ZO for the low-resource participants, first-order for the high.

    :meth:`play` stands in for the loop's ``run_round``: it takes all the round's
    participants, and plays a ZO round of the low-resource ones with the first-order
    delta beside the commit.
    """

    def __init__(self, loop: RoundLoop, part: FirstOrderPart, plan: Plan, run_dir: Path) -> None:
        self.loop, self.part, self.plan = loop, part, plan
        self.dir = run_dir / DELTAS
        self.dir.mkdir(exist_ok=True)
        self.lr = loop.coordinator.policy.lr

    def play(self, participants: list[str]) -> Commit:
        index = {a: i for i, a in enumerate(self.plan.agent_ids)}
        high = [a for a in participants if self.plan.high[index[a]]]
        low = [a for a in participants if not self.plan.high[index[a]]]
        n_high = sum(self.part.sizes[index[a]] for a in high)
        n_low = sum(self.part.sizes[index[a]] for a in low)
        if not low:
            raise ValueError("a hi+lo round needs at least one low-resource participant")
        total = n_high + n_low
        c = self.loop.coordinator
        delta = (self.part.delta(self.loop.weights, self.plan.warmup_rounds + c.version,
                                 [index[a] for a in high], n_high / total) if high else None)
        c.policy = dataclasses.replace(c.policy, lr=self.lr * n_low / total)
        return self.loop.run_round(low, delta, self.keep)

    def keep(self, round_id: int, delta: Delta) -> None:
        path = self.dir / f"round-{round_id:06d}.npz"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, *delta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def saved_deltas(run_dir: Path) -> dict[int, Delta]:
    """The first-order deltas of a run so far, by round (for resume)."""
    out = {}
    for path in sorted((run_dir / DELTAS).glob("round-*.npz")):
        with np.load(path) as data:
            out[int(path.stem.split("-")[1])] = [data[f"arr_{i}"] for i in range(len(data.files))]
    return out
