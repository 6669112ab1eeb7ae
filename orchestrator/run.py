"""The whole ZOWarmUp run: partition -> warm-up -> pivot -> ZO rounds -> summary.

Everything a run does is written under its run directory, so ``zowarmup resume`` can
pick it up at any point and end on the bits of a run that never stopped::

    config.toml     the configuration as run (flags applied)
    state.json      which phase the run is in
    metrics.jsonl   one line per round: phase, accuracy, loss, participants, bytes, time
    warmup.pt       the latest warm-up checkpoint (written atomically every round)
    model/          the forward-only ONNX export made at the pivot
    shards/         every client's shard, the test split and partition.json
    journal         the ZO commits, each fsync'ed before it is broadcast
    agents/<id>/    each local agent's log and state directory
    summary.json    the figures of a finished run

The order of writes is what makes resume exact: a warm-up round's checkpoint is written
before its metrics line, a ZO commit is journaled before it is broadcast or logged; on
resume, metrics lines past the durable state are dropped and redone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols.coordinator import RoundPolicy
from protocols.directions import DirectionSpec
from protocols.errors import ZoError
from protocols.journal import Journal, read_journal
from protocols.robust import Robustness
from protocols.zo import weights_sha256

from .config import Config
from .data import (
    Dataset,
    assign_resources,
    dirichlet_partition,
    load_dataset,
    parse_split,
    stratified_test_mask,
)
from .progress import Progress

log = logging.getLogger("zowarmup.run")
STATE, METRICS, SUMMARY, CHECKPOINT = "state.json", "metrics.jsonl", "summary.json", "warmup.pt"


class RunError(ZoError):
    """A run that cannot start or continue, with what to do about it."""


class Diverged(RunError):
    """The training itself blew up (a loss no longer usable): the settings' fault, not the
    machine's, so a grid records it as the run's result instead of stopping."""


@dataclass
class Plan:
    """What follows from the config alone: the data, who holds what, who is high-resource."""

    dataset: Dataset
    parts: list[np.ndarray]
    high: np.ndarray
    warmup_rounds: int  # the pivot round (0 = ZO from scratch)
    zo_rounds: int
    validation: tuple[np.ndarray, np.ndarray] | None = None  # held out from every client

    @property
    def agent_ids(self) -> list[str]:
        return [f"client-{i:03d}" for i in range(len(self.parts))]

    def evaluation_sets(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """What each evaluation measures: the test split, and the validation split if any."""
        sets = {"test": (self.dataset.x_test, self.dataset.y_test)}
        if self.validation is not None:
            sets["val"] = self.validation
        return sets


def plan_run(config: Config) -> Plan:
    d = config.data
    dataset = load_dataset(d.dataset, d.path or None, config.run.seed, d.test_fraction)
    validation = None
    if d.validation_fraction > 0:
        dataset, validation = hold_out(dataset, d.validation_fraction, config.run.seed)
    alpha = float("inf") if str(d.alpha) == "iid" else float(d.alpha)
    parts = dirichlet_partition(dataset.y_train, d.clients, alpha, config.run.seed)
    high = assign_resources(d.clients, parse_split(d.split), config.run.seed)
    method = config.run.method
    warmup = {"zowarmup": config.warmup.rounds, "zowarmup-hi-fo": config.warmup.rounds,
              "zo-scratch": 0, "high-res-only": config.warmup.rounds + config.zo.rounds}[method]
    zo = 0 if method == "high-res-only" else config.zo.rounds
    return Plan(dataset, parts, high, warmup, zo, validation)


def hold_out(dataset: Dataset, fraction: float, seed: int
             ) -> tuple[Dataset, tuple[np.ndarray, np.ndarray]]:
    """The data set without a stratified validation split, and that split.

    The split is drawn from the training data only, with its own stream (not the test
    split's), so tuning on it never sees a test sample.
    """
    mask = stratified_test_mask(dataset.y_train, fraction, seed + 7919)
    kept = dataclasses.replace(dataset, x_train=dataset.x_train[~mask],
                               y_train=dataset.y_train[~mask])
    return kept, (dataset.x_train[mask], dataset.y_train[mask])


class RunDir:
    """The run directory's small files: state, metrics, summary."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def state(self) -> dict:
        file = self.path / STATE
        return json.loads(file.read_text()) if file.exists() else {"phase": "new"}

    def set_state(self, **state: object) -> None:
        tmp = self.path / (STATE + ".tmp")
        tmp.write_text(json.dumps({**self.state(), **state}, indent=2) + "\n")
        os.replace(tmp, self.path / STATE)

    def metrics(self) -> list[dict]:
        file = self.path / METRICS
        if not file.exists():
            return []
        rows = []
        for line in file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # a torn last line
        return rows

    def keep_metrics(self, below_round: int) -> None:
        """Drop metrics of rounds the durable state does not hold (they are redone)."""
        rows = [r for r in self.metrics() if r["round"] < below_round]
        tmp = self.path / (METRICS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path / METRICS)

    def log_metrics(self, row: dict) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def execute(config: Config, run_dir: Path, progress: Progress | None = None,
            local_agents: int | None = None, simulate: bool = False,
            workers: int | None = None) -> dict:
    """Run (or continue) the whole job in ``run_dir``; returns the summary.

    ``workers``: processes of a simulated ZO phase (default: one per core); the bits do
    not depend on it.
    """
    from .warmup_phase import run_warmup
    from .zo_phase import run_zo
    rd = RunDir(run_dir)
    rd.path.mkdir(parents=True, exist_ok=True)
    (rd.path / "config.toml").write_text(config.to_toml())
    if rd.state()["phase"] == "new":
        rd.set_state(simulate=simulate)
    simulate = bool(rd.state().get("simulate", simulate))  # a resume keeps the run's mode
    if config.run.method == "bbpt":  # black-box prompt tuning: no warm-up, no pivot
        from .bbpt_phase import execute_bbpt
        return execute_bbpt(config, rd, local_agents, simulate)
    if config.run.method == "zowarmup-hi-fo" and not simulate:
        raise RunError("run.method = \"zowarmup-hi-fo\" runs only simulated (--simulate, or "
                       "zowarmup experiment): its high-resource clients send whole models "
                       "every round")
    plan = plan_run(config)
    progress = progress or Progress(plan.warmup_rounds + plan.zo_rounds)
    started = time.time() - float(rd.state().get("wall_s", 0.0))
    model = run_warmup(config, plan, rd, progress, started)
    if plan.zo_rounds:
        weights = run_zo(config, plan, rd, model, progress, started, local_agents, simulate,
                         workers)
        sha = weights_sha256(weights)
    else:
        sha = _torch_sha256(model)
    progress.close()
    summary = summarize(config, plan, rd, sha, time.time() - started)
    (rd.path / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    rd.set_state(phase="done", wall_s=summary["wall_s"])
    return summary


def _torch_sha256(model) -> str:
    """SHA-256 of the weights in the exported layout (trainable parameters, float32 LE)."""
    import hashlib
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


def summarize(config: Config, plan: Plan, rd: RunDir, sha: str, wall_s: float) -> dict:
    rows = rd.metrics()
    evaluated = [r for r in rows if r.get("test_acc") is not None]
    warm = [r for r in evaluated if r["phase"] == "warmup"]
    pivot = warm[-1]["test_acc"] if warm and plan.zo_rounds else None

    def per_client(phase: str, key: str) -> float:
        phase_rows = [r for r in rows if r["phase"] == phase and r["participants"]]
        if not phase_rows:
            return 0.0
        return float(np.mean([r[key] / r["participants"] for r in phase_rows]))
    return {
        "name": config.run.name, "method": config.run.method,
        "dataset": config.data.dataset, "model": config.model.name,
        "final_acc": evaluated[-1]["test_acc"] if evaluated else None,
        "final_val_acc": evaluated[-1].get("val_acc") if evaluated else None,
        "best_acc": max((r["test_acc"] for r in evaluated), default=None),
        "pivot_acc": pivot, "pivot_round": plan.warmup_rounds if plan.zo_rounds else None,
        "warmup_rounds": plan.warmup_rounds, "zo_rounds": plan.zo_rounds,
        "clients": len(plan.parts), "high_resource_clients": int(plan.high.sum()),
        "agents": len(plan.parts) if plan.zo_rounds else 0,
        "bytes_per_client_round": {
            phase: {"uplink": per_client(phase, "uplink_bytes"),
                    "downlink": per_client(phase, "downlink_bytes")}
            for phase in ("warmup", "zo")},
        "final_sha256": sha, "wall_s": round(wall_s, 2),
    }


def evaluation_row(scores: dict[str, tuple[float, float]]) -> dict:
    """``{"test_acc": .., "test_loss": .., "val_acc": ..}`` from ``{set: (loss, acc)}``."""
    row: dict = {}
    for name, (loss, acc) in scores.items():
        row[f"{name}_acc"], row[f"{name}_loss"] = acc, loss
    return row


def journal_commits(path: Path) -> list:
    return read_journal(path).commits if path.exists() else []


def open_journal(path: Path, run_id: str) -> Journal:
    if path.exists():
        return Journal.open(path)
    return Journal.create(path, {"run_id": run_id, "base_version": 0})


def round_policy(config: Config) -> tuple[RoundPolicy, DirectionSpec]:
    z = config.zo
    return (RoundPolicy(eps=z.eps, lr=z.lr, directions=z.directions, local_steps=z.local_steps,
                        local_lr=z.local_lr, quorum=z.quorum, deadline_s=z.deadline_s,
                        robust=Robustness(z.clip_factor, z.clip_bound, z.clip_window, z.trim)),
            DirectionSpec(z.distribution, z.scale))
