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
from .pivot import PlateauRule, validation_curve
from .progress import Progress
from .state import CHECKPOINT, SHARDS, Plan, RunDir, evaluation_row
from .training import build, trainer

log = logging.getLogger("zowarmup.warmup")
AFTER_PIVOT = ("zo", "fo", "done")  # state.json phases that follow the warm-up


def run_warmup(config: Config, plan: Plan, rd: RunDir, progress: Progress,
               started: float, export: bool = True) -> tuple[torch.nn.Module, Plan]:
    """Train (or finish training) the warm-up; export and write the shards at the pivot.

    Returns the model and the plan with its pivot settled (an automatic pivot is known
    only once the warm-up's validation accuracy has stopped improving). ``export=False``:
    what follows the pivot is not ZO (a first-order ceiling), so nothing is exported.
    """
    state = rd.state()
    if plan.warmup_rounds:
        model, plan = _train(config, plan, rd, progress, started, state)
    else:
        model = build(config, plan)
    if export and plan.zo_rounds and state.get("phase") not in AFTER_PIVOT:
        pivot(config, plan, rd, model)
    return model, plan


def _train(config: Config, plan: Plan, rd: RunDir, progress: Progress, started: float,
           state: dict) -> tuple[torch.nn.Module, Plan]:
    fedavg = trainer(config, plan)
    checkpoint = rd.path / CHECKPOINT
    if checkpoint.exists():
        fedavg.load_checkpoint(checkpoint)
    rule = _plateau(config) if plan.auto_pivot else None
    if state.get("phase") in AFTER_PIVOT:  # the warm-up is over: its pivot is on record
        return fedavg.model, (plan.settle(int(state["pivot_round"])) if plan.auto_pivot
                              else plan)
    rd.keep_metrics(below_round=fedavg.next_round)
    rd.set_state(phase="warmup")
    progress.skip(fedavg.next_round)
    device = resolve_device(config.run.device)
    settled = _settled(rule, rd, fedavg.next_round) if rule else None
    for r in range(fedavg.next_round, plan.warmup_rounds):
        if settled is not None:
            break
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
        settled = _settled(rule, rd, r + 1) if rule else None
    if not plan.auto_pivot:
        return fedavg.model, plan
    pivot_round = settled or plan.warmup_rounds
    log.info("automatic pivot after %d warm-up round(s): validation accuracy stopped "
             "improving", pivot_round)
    rd.set_state(pivot_round=pivot_round)
    return fedavg.model, plan.settle(pivot_round)


def _plateau(config: Config) -> PlateauRule:
    w = config.warmup
    return PlateauRule(w.min_rounds, w.max_rounds, w.patience, w.min_delta)


def _settled(rule: PlateauRule, rd: RunDir, done: int) -> int | None:
    """The automatic pivot, if the rounds written so far already decide it."""
    return rule.pivot(validation_curve(rd.metrics()), done)


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
