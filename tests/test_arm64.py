"""The agent on 64-bit ARM, from the test command on demand: `scripts/test --arm64 -m arm64`.

scripts/arm64-check builds (or reuses) an emulated arm64 Debian, installs the agent's wheel
there with the device dependencies, runs the selftest, a fleet of an x86 orchestrator, an
x86 agent and an arm64 agent, and the native-layout check of the zoo's models. It takes
minutes, so the default run does not start it and reports it as skipped, never as passed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.arm64
def test_the_agent_installs_on_arm64_and_holds_the_orchestrators_bits(request):
    if not request.config.getoption("--arm64"):
        pytest.skip("NOT RUN: the arm64 emulation check takes minutes; run it with "
                    "`scripts/test --arm64 -m arm64` or `scripts/arm64-check`")
    done = subprocess.run([str(ROOT / "scripts" / "arm64-check")], capture_output=True,
                          text=True, timeout=3600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert re.search(r"selftest ok \(aarch64 Linux", output), output[-6000:]
    assert "fingerprints equal on x86 and arm64 after every round" in output, output[-6000:]
    for model in ("cnn", "vit", "resnet18-gn"):  # the native layouts, model by model
        assert re.search(rf"^{model}: equal$", output, re.M), output[-6000:]
    assert "DIFFERENT" not in output


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "--rounds must be a positive integer"),
    (["--rounds", "x"], "--rounds must be a positive integer"),
    (["--bogus"], "unknown argument: --bogus"),
])
def test_the_check_refuses_bad_arguments_before_it_touches_anything(args, message, tmp_path):
    root = tmp_path / "root"
    done = subprocess.run([str(ROOT / "scripts" / "arm64-check"), *args], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                      "ZOWARMUP_ARM64_ROOT": str(root)})
    assert done.returncode == 2 and message in done.stderr
    assert not root.exists()
