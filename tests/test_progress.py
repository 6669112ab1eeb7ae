"""Progress: a bar on a terminal, plain lines a headless log can keep."""

from __future__ import annotations

import logging

from orchestrator.run.progress import Progress


def test_plain_lines_carry_phase_round_accuracy_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="zowarmup.progress")
    progress = Progress(10, enabled=False)
    progress.skip(3)  # a resumed run: rounds already done are counted, not timed
    progress.update("zo", 3, 0.5)
    progress.update("zo", 4, None)
    lines = [r.getMessage() for r in caplog.records]
    assert "zo round 4/10" in lines[0] and "0.5000" in lines[0] and "eta" in lines[0]
    assert "zo round 5/10" in lines[1] and "0.5000" in lines[1]  # the last accuracy stays


def test_the_bar_counts_rounds(capsys):
    progress = Progress(4, enabled=True)
    for r in range(4):
        progress.update("warm-up", r, 0.25 * r)
    assert progress._bar.n == 4
    progress.close()
    assert "warm-up" in capsys.readouterr().err
