"""The base install is what a device needs: a fresh environment gets a working agent, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plain_pip_install_gives_a_working_agent_without_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py, bin_dir = venv / "bin" / "python", venv / "bin"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    helped = subprocess.run([str(bin_dir / "zowarmup-agent"), "--help"], capture_output=True,
                            text=True)
    assert helped.returncode == 0 and "selftest" in helped.stdout
    selftest = subprocess.run([str(bin_dir / "zowarmup-agent"), "selftest"], capture_output=True,
                              text=True)
    assert selftest.returncode == 0 and selftest.stdout.startswith("selftest ok"), selftest.stderr
    probe = ("import sys, importlib.util, edge_agent.cli, protocols.coordinator; "
             "print(importlib.util.find_spec('torch') is None, 'torch' in sys.modules)")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.split() == ["True", "False"], out.stderr
