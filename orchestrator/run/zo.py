"""Step 2: zeroth-order rounds with every client, high or low resource.

Over MQTT the agents are real ``zowarmup-agent`` processes this orchestrator starts
(``run``) or that join from their devices (``serve``); simulated, the agent's engine runs
in worker processes. Either way the rounds are the one loop of ``rounds/loop.py``; this
module only builds what that loop needs from the config and the run directory.
"""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np

from ..config import Config
from ..rounds.loop import RoundLoop, Schedule, run_rounds, start_coordinator
from ..rounds.model import ModelState
from ..rounds.snapshots import Snapshots
from ..train.evaluate import Evaluator
from .fleets import mqtt_fleet, simulated_fleet
from .hilo import FirstOrderPart, HiLo, saved_deltas
from .progress import Progress
from .records import RoundRecorder
from .state import (
    Plan,
    RunDir,
    RunError,
    direction_spec,
    evaluation_row,
    journal_commits,
    open_journal,
    round_policy,
)


def run_zo(config: Config, plan: Plan, rd: RunDir, progress: Progress, started: float,
           local_agents: int | None, simulate: bool = False,
           workers: int | None = None) -> list[np.ndarray]:
    """The ZO phase from wherever the journal stands; returns the final weights."""
    hilo = config.run.method == "zowarmup-hi-fo"
    if hilo and not simulate:
        raise RunError("run.method = \"zowarmup-hi-fo\" runs only simulated (--simulate, or "
                       "zowarmup experiment): its high-resource clients send whole models "
                       "every round")
    if config.zo.engine == "torch" and not simulate:
        raise RunError("zo.engine = \"torch\" computes the clients in this process: run it "
                       "simulated (--simulate, or zowarmup experiment); over MQTT the agents "
                       "run their own engine")
    history = journal_commits(rd.journal)
    rd.keep_metrics(below_round=plan.warmup_rounds + len(history))
    progress.skip(plan.warmup_rounds + len(history))
    deltas = saved_deltas(rd.path) if hilo else None
    with ExitStack() as stack:
        journal = open_journal(rd.journal, config.run.name)
        stack.callback(journal.close)
        snapshots = Snapshots(rd.snapshots, config.zo.snapshot_every)
        state = ModelState.load(rd.model, direction_spec(config), history, deltas, snapshots)
        coordinator = start_coordinator(state, config.run.name, config.run.seed,
                                        round_policy(config), history, journal)
        pool = zo_pool(config, plan)
        if simulate:
            fleet = simulated_fleet(config, rd, state, coordinator, stack, pool, workers)
        else:
            count = config.fleet.local_agents if local_agents is None else local_agents
            fleet = mqtt_fleet(config, rd, state, coordinator, stack, pool,
                               len(pool) if count is None else count)
        loop = RoundLoop(state, coordinator, fleet, journal, snapshots)
        evaluator = Evaluator(rd.model, state.manifest, state.weights, plan.dataset.x_test,
                              plan.dataset.y_test, config.eval.batch_size)

        def evaluate() -> dict:
            return evaluation_row({name: evaluator.measure(x, y)
                                   for name, (x, y) in plan.evaluation_sets().items()})

        schedule = Schedule(plan.zo_rounds, config.run.seed, config.zo.clients_per_round,
                            config.eval.every)
        recorder = RoundRecorder(rd, progress, coordinator, started, "zo", plan.warmup_rounds,
                                 f"rerun with a lower zo.lr (now {config.zo.lr}) or zo.eps "
                                 f"(now {config.zo.eps})")
        recorder.recover(history, schedule, evaluate)
        play = (HiLo(loop, FirstOrderPart(config, plan, [w.shape for w in state.weights]),
                     plan, rd.path).play if hilo else None)
        run_rounds(loop, schedule, evaluate, recorder, play)
        return state.weights


def zo_pool(config: Config, plan: Plan) -> list[str]:
    """The clients that take ZO rounds: all of them, or (a ceiling: what the low-resource
    clients' data adds) only the high-resource ones."""
    if config.zo.clients == "high":
        return [a for a, high in zip(plan.agent_ids, plan.high) if high]
    return plan.agent_ids
