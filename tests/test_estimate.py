"""`zowarmup run CONFIG --estimate`: measures here, predicts each phase, runs nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the orchestrator needs its extra")

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}


def test_the_quickstart_estimate_gives_every_phase_and_writes_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from orchestrator.cli import main
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(ROOT / "examples" / "quickstart.toml"),
                                       "--estimate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written anywhere here
    phases = {}
    for line in result.output.splitlines():
        match = re.fullmatch(r"  (\S.*?)\s+([0-9.]+) (s|min|h)", line)
        if match:
            phases[match.group(1)] = float(match.group(2)) * UNITS[match.group(3)]
    total = phases.pop("total")
    assert list(phases)[:3] == ["warm-up", "warm-up evaluation", "pivot (export)"]
    assert any(p.startswith("ZO (10 local agent(s)") for p in phases)
    assert "ZO evaluation" in phases
    assert all(v >= 0 for v in phases.values())  # printed to 0.1 s: a short one shows 0.0
    assert all(v > 0 for p, v in phases.items() if p in ("warm-up", "pivot (export)")
               or p.startswith("ZO (")), phases
    assert total == pytest.approx(sum(phases.values()), rel=0.05, abs=0.2)  # printed rounded
    measured = re.findall(r"  (\S.*?)\s+([0-9.]+) ms", result.output)
    names = {name for name, _ in measured}
    assert {"warm-up SGD step", "ZO forward, a sample", "commit, one direction"} <= names
    assert all(float(value) > 0 for _, value in measured)
