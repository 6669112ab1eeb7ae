"""Ceilings for the reproduction: the rounds after the pivot done first-order, by everyone.

Table 2 compares ZOWarmUp with High-Res-Only. To tell "the data leaves no headroom" from
"one step per round is the limit" from "SPSA is the limit", the same pivot is continued
in ways ZOWarmUp's devices cannot afford:

``fedavg-all``
    FedAvg over every client, low-resource ones included, with the warm-up's client
    settings: the data ceiling.
``fedsgd-all``
    One exact full-batch gradient step per round over every client (each client one step
    on its whole shard at ``warmup.client_lr``, averaged by samples: the gradient of the
    union), the one-step ceiling against which ZO's one estimated step per round compares.

Rows are logged with phase ``"fo"``; a checkpoint every round (``after-pivot.pt``) makes a
resumed run end on the bits of one that never stopped, as in the warm-up.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..config import Config
from ..train.fedavg import Warmup, WarmupConfig, evaluate, resolve_device
from .progress import Progress
from .state import Plan, RunDir, evaluation_row
from .training import warmup_config

FIRST_ORDER_AFTER_PIVOT = ("fedavg-all", "fedsgd-all")
CHECKPOINT = "after-pivot.pt"


def settings(config: Config, plan: Plan) -> WarmupConfig:
    """The warm-up's client settings over every client (at ``warmup.ceiling_lr`` if set);
    FedSGD: one step on the whole shard."""
    base = dataclasses.replace(warmup_config(config), clients_per_round=None,
                               client_lr=config.warmup.ceiling_lr or config.warmup.client_lr)
    if config.run.method == "fedavg-all":
        return base
    largest = max(len(part) for part in plan.parts)
    return dataclasses.replace(base, local_epochs=1, batch_size=largest, client_momentum=0.0,
                               strategy="fedavg", server_lr=1.0)


def run_first_order(config: Config, plan: Plan, rd: RunDir, model: torch.nn.Module,
                    progress: Progress, started: float) -> torch.nn.Module:
    """Rounds ``warmup_rounds .. warmup_rounds + zo_rounds`` first-order over every client."""
    ds = plan.dataset
    clients = [(ds.x_train[idx], ds.y_train[idx]) for idx in plan.parts]
    trainer = Warmup(model, clients, list(range(len(plan.parts))), settings(config, plan),
                     seed=config.run.seed)
    trainer.next_round = plan.warmup_rounds
    checkpoint = rd.path / CHECKPOINT
    if checkpoint.exists():
        trainer.load_checkpoint(checkpoint)
    rd.keep_metrics(below_round=trainer.next_round)
    rd.set_state(phase="fo")
    progress.skip(trainer.next_round)
    device = resolve_device(config.run.device)
    last = plan.warmup_rounds + plan.zo_rounds
    for r in range(trainer.next_round, last):
        stats = trainer.run_round(r)
        trainer.save_checkpoint(checkpoint)
        scores: dict = {"test_acc": None, "test_loss": None}
        if (r + 1 - plan.warmup_rounds) % config.eval.every == 0 or r + 1 == last:
            scores = evaluation_row({
                name: evaluate(trainer.model, x, y, config.eval.batch_size, device)
                for name, (x, y) in plan.evaluation_sets().items()})
        n = len(stats.participants)
        rd.log_metrics({"round": r, "phase": "fo", **scores, "participants": n,
                        "uplink_bytes": stats.uplink_bytes * n,
                        "downlink_bytes": stats.downlink_bytes * n,
                        "train_loss": stats.train_loss, "wall_s": time.time() - started})
        progress.update("first-order", r, scores["test_acc"])
    return trainer.model
