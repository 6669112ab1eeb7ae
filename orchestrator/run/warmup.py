"""Step 1 and the pivot: first-order warm-up on the high-resource clients, then export.

Each round's checkpoint is written before its metrics line; on resume the checkpoint says
where the run stands and later metrics lines are dropped and redone.
"""

from __future__ import annotations

import logging
import time

import torch

from export import export_model

from ..config import Config
from ..train.data import write_partition
from ..train.fedavg import evaluate, resolve_device
from .progress import Progress
from .state import CHECKPOINT, SHARDS, Plan, RunDir, evaluation_row
from .training import build, trainer

log = logging.getLogger("zowarmup.warmup")


def run_warmup(config: Config, plan: Plan, rd: RunDir, progress: Progress,
               started: float) -> torch.nn.Module:
    """Train (or finish training) the warm-up; export and write the shards at the pivot."""
    state = rd.state()
    if plan.warmup_rounds:
        model = _train(config, plan, rd, progress, started, state)
    else:
        model = build(config, plan)
    if plan.zo_rounds and state.get("phase") not in ("zo", "done"):
        pivot(config, plan, rd, model)
    return model


def _train(config: Config, plan: Plan, rd: RunDir, progress: Progress, started: float,
           state: dict) -> torch.nn.Module:
    fedavg = trainer(config, plan)
    checkpoint = rd.path / CHECKPOINT
    if checkpoint.exists():
        fedavg.load_checkpoint(checkpoint)
    if state.get("phase") in ("zo", "done"):
        return fedavg.model
    rd.keep_metrics(below_round=fedavg.next_round)
    rd.set_state(phase="warmup")
    progress.skip(fedavg.next_round)
    device = resolve_device(config.run.device)
    for r in range(fedavg.next_round, plan.warmup_rounds):
        stats = fedavg.run_round(r)
        fedavg.save_checkpoint(checkpoint)
        scores: dict = {"test_acc": None, "test_loss": None}
        if (r + 1) % config.eval.every == 0 or r + 1 == plan.warmup_rounds:
            scores = evaluation_row({
                name: evaluate(fedavg.model, x, y, config.eval.batch_size, device)
                for name, (x, y) in plan.evaluation_sets().items()})
        n = len(stats.participants)
        rd.log_metrics({"round": r, "phase": "warmup", **scores,
                        "participants": n, "uplink_bytes": stats.uplink_bytes * n,
                        "downlink_bytes": stats.downlink_bytes * n,
                        "train_loss": stats.train_loss, "wall_s": time.time() - started})
        progress.update("warm-up", r, scores["test_acc"])
    return fedavg.model


def pivot(config: Config, plan: Plan, rd: RunDir, model: torch.nn.Module) -> None:
    """Export the forward-only graph and write every client's shard for the agents."""
    ds = plan.dataset
    log.info("pivot: exporting %s after %d warm-up round(s)", config.model.name,
             plan.warmup_rounds)
    export_model(model, rd.model, ds.input_shape, ds.num_classes,
                 normalization={"mean": list(ds.mean), "std": list(ds.std)},
                 class_names=list(ds.class_names), model_name=config.model.name)
    write_partition(ds, plan.parts, plan.high, rd.path / SHARDS, config.run.seed,
                    config.data.alpha)
    rd.set_state(phase="zo")
