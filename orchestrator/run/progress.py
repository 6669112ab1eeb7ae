"""Progress of a run: a bar on a terminal, plain log lines anywhere else."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("zowarmup.progress")


class Progress:
    def __init__(self, total: int, enabled: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.last_acc: float | None = None
        self._bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="round", dynamic_ncols=True)

    def skip(self, rounds: int) -> None:
        """Rounds already done before a resume: counted, not timed."""
        self.done = max(self.done, rounds)
        self.started = time.monotonic()
        self._skipped = self.done
        if self._bar is not None:
            self._bar.n = self.done
            self._bar.refresh()

    def update(self, phase: str, round_index: int, acc: float | None) -> None:
        self.done = round_index + 1
        if acc is not None:
            self.last_acc = acc
        acc_text = "-" if self.last_acc is None else f"{self.last_acc:.4f}"
        if self._bar is not None:
            self._bar.set_description(phase)
            self._bar.set_postfix_str(f"acc {acc_text}")
            self._bar.n = self.done
            self._bar.refresh()
            return
        log.info("%s round %d/%d  test acc %s  eta %s", phase, self.done, self.total,
                 acc_text, self._eta())

    def _eta(self) -> str:
        timed = self.done - getattr(self, "_skipped", 0)
        if timed <= 0:
            return "?"
        left = (time.monotonic() - self.started) / timed * (self.total - self.done)
        return f"{int(left // 60)}m{int(left % 60):02d}s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
