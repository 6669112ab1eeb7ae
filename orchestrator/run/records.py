"""Each round's line in ``metrics.jsonl``, once its commit is durable, and the line a stop lost.

A row is written after its commit is journaled, so a stop between the two loses the row,
never the round: on resume :meth:`RoundRecorder.recover` writes it again from the replayed
weights, and the metrics hold every journaled round exactly once. A row names the agents
left out of its round's draw and why (``skipped``: offline, catching up); with it, and the
run seed, the draw can be checked. After each row ``fleet.json`` is replaced with every
agent's state, for ``zowarmup status``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from protocols.coordinator import Coordinator
from protocols.messages import CommitMessage

from ..rounds.loop import NOT_EVALUATED, RoundReport, Schedule
from .progress import Progress
from .state import Diverged, RunDir
from .status import fleet_view, write_fleet

log = logging.getLogger("zowarmup.run")


@dataclass
class RoundRecorder:
    rd: RunDir
    progress: Progress
    coordinator: Coordinator
    started: float  # wall-clock start of the run (earlier sessions included)
    phase: str  # "zo" or "bbpt": the rows' phase and the progress label
    offset: int = 0  # rounds before this phase (the warm-up's), for the rows' round index
    hint: str = "rerun with a lower zo.lr"  # what to do when the loss blows up
    extra: Callable[[RoundReport], dict] | None = None  # a phase's own fields

    def __call__(self, report: RoundReport) -> None:
        global_round = self.offset + report.version
        loss = report.scores.get("test_loss")
        if loss is not None and (not math.isfinite(loss) or loss > 1e6):
            raise Diverged(f"the {self.phase} phase diverged at round {global_round} (test "
                           f"loss {loss:.3g}); resume cannot help: {self.hint}")
        if not report.commit.pairs:
            log.warning("round %d closed with no result; nothing changed", global_round)
        c = self.coordinator
        participants = len(report.participants)
        self.rd.log_metrics({
            "round": global_round, "phase": self.phase, **report.scores,
            "participants": participants, "answered": len(report.results),
            "skipped": report.skipped, "uplink_bytes": report.uplink_bytes,
            "downlink_bytes": report.downlink_bytes * participants,
            **(self.extra(report) if self.extra else {}),
            "refused": sum(c.refused.values()), "late": c.late, "clipped": c.clipped,
            "trimmed": c.trimmed, "wall_s": time.time() - self.started})
        write_fleet(self.rd, fleet_view(c, report.skipped, self.progress.total))
        self.progress.update(self.phase, global_round, report.scores.get("test_acc"))

    def recover(self, history: Sequence[CommitMessage], schedule: Schedule,
                evaluate: Callable[[], dict]) -> None:
        """Write again the row of the last journaled round if a stop lost it (evaluated if
        that round was an evaluation round: the replayed weights are its result)."""
        if not history:
            return
        version = len(history) - 1
        global_round = self.offset + version
        if any(r["round"] == global_round for r in self.rd.metrics()):
            return
        scores = evaluate() if schedule.evaluates(version) else dict(NOT_EVALUATED)
        per_client = self.coordinator.policy.directions * self.coordinator.policy.local_steps
        # the participants whose slots the commit names (a pool that wrapped: at least these)
        slots, pairs = history[-1].slots, history[-1].commit.pairs
        answered = (len({t // per_client for t in slots.slots}) if slots is not None
                    else len({seed for seed, _ in pairs}) // max(1, per_client))
        log.info("round %d: its metrics were lost in the stop; written again", global_round)
        self.rd.log_metrics({"round": global_round, "phase": self.phase, **scores,
                             "participants": 0, "answered": answered, "recovered": True,
                             "wall_s": time.time() - self.started})
