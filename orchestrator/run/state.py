"""What every part of a run shares, and nothing that runs it: the leaf the phases stand on.

A run directory holds everything a run does, so ``zowarmup resume`` can pick it up at any
point and end on the bits of a run that never stopped::

    config.toml     the configuration as run (flags applied)
    state.json      which phase the run is in
    metrics.jsonl   one line per round: phase, accuracy, loss, participants, bytes, time
    warmup.pt       the latest warm-up checkpoint (written atomically every round)
    model/          the forward-only ONNX export made at the pivot
    shards/         every client's shard, the test split and partition.json
    journal         the ZO commits, each fsync'ed before it is broadcast
    snapshots/      the weights every zo.snapshot_every rounds: resume replays at most that
    agents/<id>/    each local agent's log and state directory
    summary.json    the figures of a finished run
    fleet.json      every agent's state as the coordinator last knew it (zowarmup status)
    blackbox/       prompt tuning only: the frozen model the devices query

The order of writes is what makes resume exact: a warm-up round's checkpoint is written
before its metrics line, a ZO commit is journaled before it is broadcast or logged; on
resume, metrics lines past the durable state are dropped and redone.

This module imports no phase: the phases (``run/warmup.py``, ``run/zo.py``,
``bbpt/job.py``) and the round loop import it, and only ``run/job.py`` imports the phases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols.coordinator import RoundPolicy
from protocols.directions import DirectionSpec
from protocols.errors import ZoError
from protocols.journal import Journal, read_journal
from protocols.robust import Robustness

from ..config import AUTO, Config
from ..train.data import (
    Dataset,
    assign_resources,
    dirichlet_partition,
    load_dataset,
    parse_split,
    stratified_test_mask,
)

# The run directory's names: declared here once, read by the phases and the reports.
CONFIG, STATE, METRICS, SUMMARY = "config.toml", "state.json", "metrics.jsonl", "summary.json"
OWNER = "owner.lock"  # held by the process that runs the directory (RunDir.hold)
CHECKPOINT, JOURNAL, MODEL, SHARDS, AGENTS = "warmup.pt", "journal", "model", "shards", "agents"
BLACKBOX = "blackbox"  # prompt tuning: the frozen model its owner serves
FLEET = "fleet.json"  # replaced after every round of a phase with a fleet
SNAPSHOTS = "snapshots"
PHASES = ("warmup", "zo", "fo", "bbpt")  # a metrics row's "phase"; fo: first-order ceilings


class RunError(ZoError):
    """A run that cannot start or continue, with what to do about it."""


class Diverged(RunError):
    """The training itself blew up (a loss no longer usable): the settings' fault, not the
    machine's, so a grid records it as the run's result instead of stopping."""


class Busy(RunError):
    """Another process holds the lock: a second run in one directory would interleave its
    journal, metrics and checkpoints with the first's."""


@contextlib.contextmanager
def held(lock: Path, wait: bool = False, what: str = "this") -> Iterator[None]:
    """An exclusive lock on the file ``lock`` for the block. The kernel releases it when
    the holder exits however it exits, so no lock outlives a crash. Without ``wait``, a
    held lock raises :class:`Busy` naming the holder."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise Busy(f"{what} is in use by {holder}: wait for it to end, or stop it, "
                       "before starting another run here") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MetricsError(RunError):
    """A metrics file damaged before its last line: rows would be lost, so nothing is read."""


def agent_ids(count: int) -> list[str]:
    """The clients' agent ids, as `zowarmup run`, `partition` and `broker-config` name them."""
    return [f"client-{i:03d}" for i in range(count)]


@dataclass(frozen=True)
class Plan:
    """What follows from the config alone: the data, who holds what, who is high-resource,
    and how many rounds each phase has (with an automatic pivot, ``warmup_rounds`` is the
    most it may take until :meth:`settle` fixes it)."""

    dataset: Dataset
    parts: list[np.ndarray]
    high: np.ndarray
    warmup_rounds: int  # the pivot round (0 = ZO from scratch)
    zo_rounds: int
    validation: tuple[np.ndarray, np.ndarray] | None = None  # held out from every client
    auto_pivot: bool = False  # the pivot is found by the plateau rule (run/pivot.py)
    total_rounds: int = 0  # > 0: the ZO phase runs what the warm-up leaves of this budget

    @property
    def agent_ids(self) -> list[str]:
        return agent_ids(len(self.parts))

    def evaluation_sets(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """What each evaluation measures: the test split, and the validation split if any."""
        sets = {"test": (self.dataset.x_test, self.dataset.y_test)}
        if self.validation is not None:
            sets["val"] = self.validation
        return sets

    def settle(self, pivot: int) -> Plan:
        """The plan once the warm-up has ended at ``pivot`` (a ZO phase follows)."""
        zo = self.total_rounds - pivot if self.total_rounds else self.zo_rounds
        return dataclasses.replace(self, warmup_rounds=pivot, zo_rounds=zo, auto_pivot=False)


def plan_run(config: Config) -> Plan:
    d = config.data
    dataset = load_dataset(d.dataset, d.path or None, config.run.seed, d.test_fraction)
    validation = None
    if d.validation_fraction > 0:
        dataset, validation = hold_out(dataset, d.validation_fraction, config.run.seed)
    parts = dirichlet_partition(dataset.y_train, d.clients, d.alpha, config.run.seed)
    high = assign_resources(d.clients, parse_split(d.split), config.run.seed)
    warmup, zo, auto = phase_rounds(config)
    return Plan(dataset, parts, high, warmup, zo, validation, auto, config.run.total_rounds)


def phase_rounds(config: Config) -> tuple[int, int, bool]:
    """(warm-up rounds, ZO rounds, automatic pivot) of the run's method.

    With ``run.total_rounds`` the methods share one budget: High-Res-Only trains first-order
    for all of it, ZO from scratch runs it all as ZO, and ZOWarmUp's ZO phase gets what its
    warm-up leaves. With an automatic pivot the warm-up rounds are the most it may take.
    """
    w, total, method = config.warmup, config.run.total_rounds, config.run.method
    auto = w.rounds == AUTO
    warm = w.max_rounds if auto else int(w.rounds)
    if method == "zo-scratch":
        return 0, total or config.zo.rounds, False
    if method == "high-res-only":
        return total or warm + config.zo.rounds, 0, False
    return warm, (total - warm) if total else config.zo.rounds, auto


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


def valid_row(row: object) -> bool:
    """A metrics row: a JSON object with an integer round and a known phase."""
    return (isinstance(row, dict) and isinstance(row.get("round"), int)
            and not isinstance(row.get("round"), bool) and row.get("phase") in PHASES)


def read_metrics(file: Path) -> list[dict]:
    """The rounds logged in a metrics file, in file order ([] when there is none).

    A torn or invalid last line (a run stopped mid-write) is skipped; blank lines are
    ignored. A damaged line anywhere else raises :class:`MetricsError`: dropping it would
    silently lose the rounds after it.
    """
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise MetricsError(f"cannot read {file}: {exc}") from None
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if valid_row(row):
            rows.append(row)
        elif i == len(numbered) - 1:
            break  # a torn last line: the run stopped while writing it
        else:
            raise MetricsError(f"{file}, line {n}: not a metrics record (a JSON object with an "
                               f"integer 'round' and a 'phase' of {', '.join(PHASES)}): "
                               f"{line[:80]!r}")
    return rows


class RunDir:
    """The run directory: its small files (state, metrics, summary) and where the rest is."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def journal(self) -> Path:
        return self.path / JOURNAL

    @property
    def agents(self) -> Path:
        return self.path / AGENTS

    @property
    def snapshots(self) -> Path:
        return self.path / SNAPSHOTS

    def shard(self, agent_id: str) -> Path:
        return self.path / SHARDS / f"{agent_id}.npz"

    def started(self) -> float:
        """The run's wall-clock start, counting the time spent before a stop and resume."""
        return time.time() - float(self.state().get("wall_s", 0.0))

    def state(self) -> dict:
        file = self.path / STATE
        return json.loads(file.read_text()) if file.exists() else {"phase": "new"}

    def hold(self) -> contextlib.AbstractContextManager[None]:
        """The directory for this process alone while the block runs (:class:`Busy` if
        another process runs or resumes it now)."""
        return held(self.path / OWNER, what=f"run directory {self.path}")

    def mark_running(self, **state: object) -> None:
        """Say which process runs the run now (``zowarmup status`` tells a stopped run from
        a running one by it), with any other ``state``."""
        self.set_state(pid=os.getpid(), host=socket.gethostname(), **state)

    def set_state(self, **state: object) -> None:
        tmp = self.path / (STATE + ".tmp")
        tmp.write_text(json.dumps({**self.state(), **state}, indent=2) + "\n")
        os.replace(tmp, self.path / STATE)

    def metrics(self) -> list[dict]:
        return read_metrics(self.path / METRICS)

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

    def write_summary(self, summary: dict) -> None:
        (self.path / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        self.set_state(phase="done", wall_s=summary["wall_s"])


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


def round_policy(config: Config) -> RoundPolicy:
    z = config.zo
    return RoundPolicy(eps=z.eps, lr=z.lr, directions=z.directions, local_steps=z.local_steps,
                       local_lr=z.local_lr, quorum=z.quorum, deadline_s=z.deadline_s,
                       pool=z.direction_pool,
                       robust=Robustness(z.clip_factor, z.clip_bound, z.clip_window, z.trim),
                       max_missed_rounds=config.fleet.max_missed_rounds)


def direction_spec(config: Config) -> DirectionSpec:
    return DirectionSpec(config.zo.distribution, config.zo.scale)
