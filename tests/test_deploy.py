"""The deployment kit: the systemd unit is valid and tight, and the unit, the example
settings and the agent agree on one command line."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.settings import load_file

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "zowarmup-agent.service"
AGENT = "/opt/zowarmup/bin/zowarmup-agent"


def unit_settings() -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value given (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, value = line.split("=", 1)
            current.setdefault(key, []).append(value)
    return sections


def test_the_unit_restarts_a_failed_agent_as_its_own_user_within_limits():
    service = unit_settings()["Service"]
    assert service["ExecStart"] == [f"{AGENT} run --config /etc/zowarmup/agent.toml"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]  # a bad setting: BadSetting's status
    assert service["User"] == ["zowarmup"] and service["Group"] == ["zowarmup"]
    assert service["StateDirectory"] == ["zowarmup"]
    memory_max = int(service["MemoryMax"][0].rstrip("M"))
    assert int(service["MemoryHigh"][0].rstrip("M")) < memory_max <= 1024
    assert re.fullmatch(r"\d+%", service["CPUQuota"][0])
    sysusers = (DEPLOY / "zowarmup-agent.sysusers").read_text()
    assert re.search(r"^u zowarmup - .* /var/lib/zowarmup$", sysusers, re.M)


def test_the_exit_status_the_unit_does_not_restart_on_is_the_agents_for_a_bad_setting(tmp_path):
    bad = tmp_path / "agent.toml"
    bad.write_text("threads = 0\n")
    done = subprocess.run([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(bad)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == int(unit_settings()["Service"]["RestartPreventExitStatus"][0])


def _verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True)


@pytest.fixture
def runnable_unit(tmp_path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here (verify checks)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("NOT CHECKED: systemd-analyze is not installed here (Debian: systemd)")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(AGENT, shutil.which("true")))
    return unit


def test_systemd_analyze_verifies_the_unit(runnable_unit):
    done = _verify(runnable_unit)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if runnable_unit.name in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_systemd_analyze_catches_a_broken_unit(runnable_unit):
    """The check above can fail: a misspelt key is reported."""
    runnable_unit.write_text(runnable_unit.read_text().replace("Restart=on-failure",
                                                               "Restrat=on-failure"))
    done = _verify(runnable_unit)
    assert "Unknown key 'Restrat'" in done.stdout + done.stderr


def test_the_unit_exposes_little_of_the_board(runnable_unit):
    """systemd's own exposure score (0 safest, 10 unsafe) stays under 2."""
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20",
                           str(runnable_unit)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_the_example_settings_are_what_the_agent_accepts(tmp_path):
    """deploy/agent.toml, its paths moved under a scratch root, passes the agent's checks."""
    text = (DEPLOY / "agent.toml").read_text()
    for directory in ("/etc/zowarmup", "/var/lib/zowarmup"):
        text = text.replace(directory, str(tmp_path / directory.strip("/")))
        (tmp_path / directory.strip("/")).mkdir(parents=True)
    files = re.findall(r'^\w+ = "(/[^"]+|[\w.]+\.(?:crt|key)|password)"', text, re.M)
    assert {"password", "ca.crt", "client.crt", "client.key"} <= set(files)
    for name in files:  # relative paths are taken from the file's directory
        (tmp_path / name if not name.startswith("/") else Path(name)).write_text("secret\n")
    np.savez(tmp_path / "var/lib/zowarmup/shard.npz", x=np.zeros((1, 1), np.float32),
             y=np.zeros(1, np.int64))
    config = tmp_path / "agent.toml"
    config.write_text(text)
    settings = load_file(config)
    assert settings["memory_budget"] < int(unit_settings()["Service"]["MemoryHigh"][0][:-1])
    done = subprocess.run([sys.executable, "-m", "edge_agent.cli", "run", "--config",
                           str(config), "--check-config"], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "password = (set)" in done.stdout
