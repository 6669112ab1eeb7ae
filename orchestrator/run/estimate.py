"""``zowarmup run CONFIG --estimate``: how long the run would take here, before it starts.

A run's time is a few costs measured on this machine, multiplied by counts that follow from
the config alone (``plan_run``: the clients' shard sizes, who is high-resource, the phases'
rounds):

* warm-up: one SGD step of ``warmup.batch_size`` samples on ``run.device`` (after a step
  that warms the device up), times the steps of a round (``local_epochs`` passes over each
  participant's shard, one participant after another), times the rounds;
* pivot: the export, timed by doing it (into a temporary directory);
* ZO: the forward cost per sample of the engine that computes the clients (the agent's
  ONNX Runtime engine with its threads and strategy, or the torch engine on its device),
  times ``2 s x local_steps`` passes over every participant's shard, shared by the
  processes that run at once; plus applying each round's commit (every holder, pair by
  pair at the measured cost of one direction);
* evaluation: a forward pass over the evaluated sets, every ``eval.every`` rounds.

Nothing is written to the run directory. The figures are predictions from a few timings on
a machine whose load may change; a real round's overheads (messages, journal) are small
next to the forward passes on any model worth estimating.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_agent.engine import ZoEngine
from edge_agent.memory import usable_cores
from edge_agent.shard import Shard
from export import export_model
from protocols.manifest import load_manifest
from protocols.zo import Commit

from ..config import Config
from ..fleet.agents import strategy_for
from ..rounds.model import ModelState
from ..rounds.torch_engine import Job, TorchEngine
from ..train.evaluate import Evaluator
from ..train.exported import zoo_module
from ..train.fedavg import resolve_device
from .state import CHECKPOINT, Plan, direction_spec, plan_run
from .training import build, trainer


def typical(fn: Callable[[], object], repeats: int = 3, budget_s: float = 0.3) -> float:
    """The median time of ``fn``, after an untimed call (warm-up): at least ``repeats``
    calls, more while they take less than ``budget_s`` in all (at most 50). The median, not
    the fastest: the run will meet this machine's load as the calls did."""
    fn()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < budget_s and len(times) < 50):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


@dataclass
class Estimate:
    """Measured costs (``units``, seconds) and each phase's predicted seconds."""

    units: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(self.phases.values())

    def lines(self) -> list[str]:
        out = [f"  {name:<28} {_duration(seconds):>12}" for name, seconds in self.phases.items()]
        out.append(f"  {'total':<28} {_duration(self.total_s):>12}")
        out.append("measured here:")
        out += [f"  {name:<28} {value * 1e3:>12.3f} ms" for name, value in self.units.items()]
        return out + [f"note: {note}" for note in self.notes]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(config: Config, simulate: bool, workers: int | None = None) -> Estimate:
    """Measure here and predict every phase of ``config``'s run (see the module's doc)."""
    plan = plan_run(config)
    device = resolve_device(config.run.device)
    est = Estimate()
    with tempfile.TemporaryDirectory(prefix="zowarmup-estimate-") as tmp:
        work = Path(tmp)
        model = build(config, plan).to(device)
        if plan.warmup_rounds:
            _warmup(config, plan, model, device, work, est)
        if plan.zo_rounds:
            started = time.perf_counter()
            ds = plan.dataset
            export_model(model, work / "model", ds.input_shape, ds.num_classes,
                         model_name=config.model.name)
            est.phases["pivot (export)"] = time.perf_counter() - started
            _zo(config, plan, work / "model", device, simulate, workers, est)
    return est


def _warmup(config: Config, plan: Plan, model: torch.nn.Module, device: torch.device,
            work: Path, est: Estimate) -> None:
    w = config.warmup
    x = torch.from_numpy(plan.dataset.x_train[:w.batch_size]).to(device)
    y = torch.from_numpy(plan.dataset.y_train[:w.batch_size].astype(np.int64)).to(device)
    # lr 0: the steps cost what the warm-up's cost and leave the weights as they are
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=w.client_momentum,
                                weight_decay=w.weight_decay)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model.train()(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    est.units["warm-up SGD step"] = typical(step)
    model.eval()
    fedavg = trainer(config, plan)
    est.units["warm-up checkpoint"] = typical(
        lambda: fedavg.save_checkpoint(work / CHECKPOINT), repeats=2, budget_s=0)
    sizes = [len(plan.parts[i]) for i in np.flatnonzero(plan.high)]
    steps = np.mean([w.local_epochs * math.ceil(n / w.batch_size) for n in sizes])
    clients = w.clients_per_round or len(sizes)
    est.phases["warm-up"] = plan.warmup_rounds * (clients * steps * est.units[
        "warm-up SGD step"] + est.units["warm-up checkpoint"])
    eval_x = torch.from_numpy(plan.dataset.x_test[:config.eval.batch_size]).to(device)

    def forward() -> None:
        with torch.inference_mode():
            model(eval_x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    per_sample = typical(forward) / len(eval_x)
    est.units["warm-up evaluation, a sample"] = per_sample
    est.phases["warm-up evaluation"] = _evaluations(config, plan.warmup_rounds) \
        * _evaluated(plan) * per_sample


def _evaluations(config: Config, rounds: int) -> int:
    every = config.eval.every
    return rounds // every + (1 if rounds % every else 0)


def _evaluated(plan: Plan) -> int:
    return sum(len(y) for _, y in plan.evaluation_sets().values())


def _zo(config: Config, plan: Plan, model_dir: Path, device: torch.device, simulate: bool,
        workers: int | None, est: Estimate) -> None:
    """A client's round measured on ``m`` samples, extended to each shard by the forward
    cost per sample; the clients' rounds shared by the processes that run at once."""
    zo, spec = config.zo, direction_spec(config)
    manifest = load_manifest(model_dir)
    sizes = [len(p) for p in plan.parts]
    clients = zo.clients_per_round or len(sizes)
    seeds = list(range(1, zo.directions * zo.local_steps + 1))
    passes = 2 * len(seeds)
    m = min(2 * zo.micro_batch, len(plan.dataset.y_train))
    x = np.ascontiguousarray(plan.dataset.x_train[:m], np.float32)
    y = plan.dataset.y_train[:m].astype(np.int64)
    torch_engine = simulate and zo.engine == "torch"
    if torch_engine:
        engine = TorchEngine(zoo_module(model_dir, manifest, config.model.width), spec, device,
                             zo.micro_batch)
        engine.set_data(x, y)
        rows = torch.arange(m, device=device)
        per_sample = typical(lambda: engine.losses(rows).cpu()) / m
        job = [Job(0, m, tuple(seeds))]
        client_round = typical(lambda: engine.rounds(job, zo.eps, zo.local_steps, zo.lr),
                               budget_s=0)
        parallel, where = 1, f"the torch engine on {device}"
    else:
        threads = 1 if simulate else zo.agent_threads
        engine = ZoEngine(model_dir, Shard(x, y), spec, zo.micro_batch, threads,
                          manifest=manifest, strategy=strategy_for(model_dir, max(sizes)))
        per_sample = typical(engine.evaluate) / m
        client_round = typical(lambda: engine.round(seeds, zo.eps, zo.local_steps, zo.lr),
                               budget_s=0)
        cores = usable_cores()
        parallel = min(clients, workers or cores) if simulate \
            else max(1, min(clients, cores // threads))
        where = (f"{parallel} worker process(es)" if simulate
                 else f"{clients} local agent(s), {parallel} at once")
    est.units["ZO forward, a sample"] = per_sample
    est.units[f"ZO client round, {m} samples"] = client_round
    est.units["commit, one direction"] = _apply_cost(model_dir, config)
    est.units["journal record (fsync)"] = _fsync_cost(Path(config.run.out))
    mean = float(np.mean(sizes))
    compute = clients * (client_round + passes * max(0.0, mean - m) * per_sample) / parallel
    holders = 1 if torch_engine else 2  # the state, then every worker or agent (in parallel)
    apply = holders * len(seeds) * clients * est.units["commit, one direction"]
    est.phases[f"ZO ({where})"] = plan.zo_rounds * (compute + apply
                                                    + est.units["journal record (fsync)"])
    state = ModelState.load(model_dir, spec)
    evaluator = Evaluator(model_dir, manifest, state.weights, x, y, config.eval.batch_size)
    eval_sample = typical(lambda: evaluator.measure(x, y)) / m
    est.units["ZO evaluation, a sample"] = eval_sample
    est.phases["ZO evaluation"] = _evaluations(config, plan.zo_rounds) * _evaluated(plan) \
        * eval_sample
    if not simulate:
        est.notes.append("over MQTT each round also waits for its messages and for the "
                         "agents' processes to wake, which is not measured here: on a small "
                         "model that can take longer than the compute")
    if not simulate and config.fleet.local_agents == 0:
        est.notes.append("fleet.local_agents = 0: remote devices compute the ZO rounds; "
                         "time `zowarmup-agent bench` on one of them instead")


def _apply_cost(model_dir: Path, config: Config) -> float:
    """One direction of a commit applied to the weights on the host (per pair)."""
    state = ModelState.load(model_dir, direction_spec(config))
    pairs = 8
    commit = Commit(0, tuple((1000 + i, 1e-6) for i in range(pairs)))
    return typical(lambda: state.apply(commit)) / pairs


def _fsync_cost(run_dir: Path) -> float:
    """A small durable write where the run directory will be: each round's journal record."""
    where = next(p for p in (run_dir, *run_dir.parents) if p.is_dir())
    with tempfile.NamedTemporaryFile(dir=where, prefix=".zowarmup-estimate-") as f:
        def write() -> None:
            f.write(b"x" * 512)
            f.flush()
            os.fsync(f.fileno())
        return typical(write, repeats=5, budget_s=0)
