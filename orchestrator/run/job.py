"""The whole job: partition -> warm-up -> pivot -> ZO rounds -> summary.

The only module that imports the phases; each phase picks up from what the run directory
holds (``run/state.py``), so ``zowarmup resume`` is this same function on an existing
directory and ends on the bits of a run that never stopped.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from protocols.zo import weights_sha256

from ..bbpt.job import execute_bbpt
from ..config import AUTO, Config
from .ceilings import FIRST_ORDER_AFTER_PIVOT, run_first_order
from .progress import Progress
from .state import Plan, RunDir, plan_run
from .summary import phase_figures
from .warmup import run_warmup
from .zo import run_zo


def execute(config: Config, run_dir: Path, progress: Progress | None = None,
            local_agents: int | None = None, simulate: bool = False,
            workers: int | None = None) -> dict:
    """Run (or continue) the whole job in ``run_dir``; returns the summary.

    ``workers``: processes of a simulated ZO phase (default: one per core); the bits do
    not depend on it.
    """
    rd = RunDir(run_dir)
    with rd.hold():
        return _execute(config, rd, progress, local_agents, simulate, workers)


def _execute(config: Config, rd: RunDir, progress: Progress | None, local_agents: int | None,
             simulate: bool, workers: int | None) -> dict:
    (rd.path / "config.toml").write_text(config.to_toml())
    if rd.state()["phase"] == "new":
        rd.set_state(simulate=simulate)
    simulate = bool(rd.state().get("simulate", simulate))  # a resume keeps the run's mode
    rd.mark_running()
    if config.run.method == "bbpt":  # black-box prompt tuning: no warm-up, no pivot
        return execute_bbpt(config, rd, local_agents, simulate)
    plan = plan_run(config)
    progress = progress or Progress(plan.warmup_rounds + plan.zo_rounds)
    rd.set_state(rounds=progress.total)
    started = rd.started()
    first_order = config.run.method in FIRST_ORDER_AFTER_PIVOT
    model, plan = run_warmup(config, plan, rd, progress, started, export=not first_order)
    if first_order:
        sha = torch_sha256(run_first_order(config, plan, rd, model, progress, started))
    elif plan.zo_rounds:
        weights = run_zo(config, plan, rd, progress, started, local_agents, simulate, workers)
        sha = weights_sha256(weights)
    else:
        sha = torch_sha256(model)
    progress.close()
    summary = summarize(config, plan, rd, sha, time.time() - started)
    rd.write_summary(summary)
    return summary


def torch_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the weights in the exported layout (trainable parameters, float32 LE)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


def summarize(config: Config, plan: Plan, rd: RunDir, sha: str, wall_s: float) -> dict:
    figures = phase_figures(rd.metrics())
    first_order = config.run.method in FIRST_ORDER_AFTER_PIVOT
    return {
        "name": config.run.name, "method": config.run.method,
        "dataset": config.data.dataset, "model": config.model.name,
        "final_acc": figures["final_acc"], "final_val_acc": figures["final_val_acc"],
        "best_acc": figures["best_acc"],
        "pivot_acc": figures["pivot_acc"] if plan.zo_rounds else None,
        "pivot_round": plan.warmup_rounds if plan.zo_rounds else None,
        "pivot": "auto" if config.warmup.rounds == AUTO and plan.zo_rounds else "fixed",
        "warmup_rounds": plan.warmup_rounds,
        "zo_rounds": 0 if first_order else plan.zo_rounds,
        "first_order_rounds_after_pivot": plan.zo_rounds if first_order else 0,
        "clients": len(plan.parts), "high_resource_clients": int(np.sum(plan.high)),
        "agents": len(plan.parts) if plan.zo_rounds and not first_order else 0,
        "bytes_per_client_round": figures["bytes_per_client_round"],
        "final_sha256": sha, "wall_s": round(wall_s, 2),
    }
