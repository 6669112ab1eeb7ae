"""Step 1 and the pivot: first-order warm-up on the high-resource clients, then export.

Each round's checkpoint is written before its metrics line; on resume the checkpoint says
where the run stands and later metrics lines are dropped and redone.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from export import export_model

from .config import Config
from .data import write_partition
from .progress import Progress
from .run import CHECKPOINT, Plan, RunDir, evaluation_row
from .warmup import Warmup, WarmupConfig, evaluate, resolve_device
from .zoo import build_model

log = logging.getLogger("zowarmup.warmup")


def build(config: Config, plan: Plan) -> torch.nn.Module:
    c, _, size = plan.dataset.input_shape
    return build_model(config.model.name, plan.dataset.num_classes, c, size,
                       config.model.width, seed=config.run.seed)


def warmup_config(config: Config) -> WarmupConfig:
    w = config.warmup
    return WarmupConfig(w.strategy, w.client_lr, w.client_momentum, w.weight_decay,
                        w.local_epochs, w.batch_size, w.server_lr, w.beta1, w.beta2, w.tau,
                        w.clients_per_round, config.run.device)


def run_warmup(config: Config, plan: Plan, rd: RunDir, progress: Progress,
               started: float) -> torch.nn.Module:
    """Train (or finish training) the warm-up; export and write the shards at the pivot."""
    model = build(config, plan)
    state = rd.state()
    if plan.warmup_rounds:
        model = _train(config, plan, rd, model, progress, started, state)
    if plan.zo_rounds and state.get("phase") not in ("zo", "done"):
        pivot(config, plan, rd, model)
    return model


def _train(config: Config, plan: Plan, rd: RunDir, model: torch.nn.Module,
           progress: Progress, started: float, state: dict) -> torch.nn.Module:
    ds = plan.dataset
    clients = [(ds.x_train[idx], ds.y_train[idx]) for idx in plan.parts]
    trainer = Warmup(model, clients, np.flatnonzero(plan.high).tolist(), warmup_config(config),
                     seed=config.run.seed)
    checkpoint = rd.path / CHECKPOINT
    if checkpoint.exists():
        trainer.load_checkpoint(checkpoint)
    if state.get("phase") in ("zo", "done"):
        return trainer.model
    rd.keep_metrics(below_round=trainer.next_round)
    rd.set_state(phase="warmup")
    progress.skip(trainer.next_round)
    device = resolve_device(config.run.device)
    for r in range(trainer.next_round, plan.warmup_rounds):
        stats = trainer.run_round(r)
        trainer.save_checkpoint(checkpoint)
        scores: dict = {"test_acc": None, "test_loss": None}
        if (r + 1) % config.eval.every == 0 or r + 1 == plan.warmup_rounds:
            scores = evaluation_row({
                name: evaluate(trainer.model, x, y, config.eval.batch_size, device)
                for name, (x, y) in plan.evaluation_sets().items()})
        acc = scores["test_acc"]
        n = len(stats.participants)
        rd.log_metrics({"round": r, "phase": "warmup", **scores,
                        "participants": n, "uplink_bytes": stats.uplink_bytes * n,
                        "downlink_bytes": stats.downlink_bytes * n,
                        "train_loss": stats.train_loss, "wall_s": time.time() - started})
        progress.update("warm-up", r, acc)
    return trainer.model


def pivot(config: Config, plan: Plan, rd: RunDir, model: torch.nn.Module) -> None:
    """Export the forward-only graph and write every client's shard for the agents."""
    ds = plan.dataset
    log.info("pivot: exporting %s after %d warm-up round(s)", config.model.name,
             plan.warmup_rounds)
    export_model(model, rd.path / "model", ds.input_shape, ds.num_classes,
                 normalization={"mean": list(ds.mean), "std": list(ds.std)},
                 class_names=list(ds.class_names), model_name=config.model.name)
    alpha = float("inf") if str(config.data.alpha) == "iid" else float(config.data.alpha)
    write_partition(ds, plan.parts, plan.high, rd.path / "shards", config.run.seed, alpha)
    rd.set_state(phase="zo")
