"""The device install works on a 64-bit ARM board: every dependency comes as a binary wheel
for manylinux_2_28_aarch64 (Raspberry Pi OS 12, Jetson's Ubuntu 22.04), so a Pi installs
in a minute and never compiles numpy or ONNX Runtime, and the agent's own wheel is pure
Python, one wheel for every board.

pip resolves the install for the board's platform and Python without installing anything
(``--dry-run --report``); it reads the dependencies' metadata from the index, so these
tests need PyPI. Unreachable, they fail and say so; ZOWARMUP_OFFLINE=1 turns that into a
skip that says the check did not run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INDEX = os.environ.get("ZOWARMUP_DEVICE_INDEX", "https://pypi.org/simple")
PLATFORM = "manylinux_2_28_aarch64"
DEVICE_DEPENDENCIES = {"numpy", "onnxruntime", "paho-mqtt", "click"}
WORKSTATION_ONLY = {"torch", "onnx", "onnxscript", "amqtt", "scikit-learn", "matplotlib"}
PACKAGES = ("protocols", "edge_agent", "export", "orchestrator")


def _index_reachable() -> None:
    """Fail (or, offline by choice, skip loudly) before pip's long retries when the index
    cannot be reached."""
    try:
        with urllib.request.urlopen(f"{INDEX}/click/", timeout=20) as response:
            response.read(1)
    except OSError as exc:
        message = (f"the package index {INDEX} is unreachable ({exc}); this check resolves "
                   "the device install there and needs network")
        if os.environ.get("ZOWARMUP_OFFLINE") == "1":
            pytest.skip(f"NOT CHECKED (ZOWARMUP_OFFLINE=1): {message}")
        pytest.fail(f"{message}. Set ZOWARMUP_OFFLINE=1 to skip it, reported as not checked.",
                    pytrace=False)


@pytest.fixture(scope="module")
def agent_wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built from a clean copy of its sources (an in-tree build
    would also pack whatever stale files build/ holds)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-build-isolation", "-w", str(out), str(src)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = out.glob("zowarmup-*.whl")
    return wheel


def test_the_agents_wheel_is_pure_python(agent_wheel):
    assert agent_wheel.name.endswith("-py3-none-any.whl"), agent_wheel.name
    with zipfile.ZipFile(agent_wheel) as wheel:
        names = wheel.namelist()
        (info,) = [n for n in names if n.endswith(".dist-info/WHEEL")]
        assert "Root-Is-Purelib: true" in wheel.read(info).decode()
    compiled = [n for n in names if n.endswith((".so", ".pyd", ".dylib", ".c"))]
    assert not compiled, f"compiled files in the agent's wheel: {compiled}"
    for needed in ("edge_agent/cli.py", "edge_agent/config.py", "protocols/vectors.json"):
        assert needed in names, f"{needed} is missing from the wheel"


def _resolve(wheel: Path, python: str, report: Path) -> dict:
    """pip's resolution of the device install for an aarch64 board with this Python."""
    _index_reachable()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX")}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip settings are not the board's
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
           "--target", str(report.parent / "target"), "--only-binary=:all:",
           "--platform", PLATFORM, "--python-version", python, "--implementation", "cp",
           "--abi", f"cp{python.replace('.', '')}", "--index-url", INDEX,
           "--timeout", "30", "--retries", "2", "--report", str(report), str(wheel)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, (
        f"the device install does not resolve to binary wheels for {PLATFORM}, Python "
        f"{python}:\n{done.stderr[-3000:]}")
    return json.loads(report.read_text())


def _fits_the_board(filename: str) -> bool:
    """A wheel whose platform tag is 'any' or a manylinux aarch64 tag no newer than 2.28."""
    platforms = filename[:-len(".whl")].split("-")[-1].split(".")
    for tag in platforms:
        glibc = re.fullmatch(r"manylinux_(\d+)_(\d+)_aarch64", tag)
        if tag in ("any", "manylinux2014_aarch64") or glibc and \
                (int(glibc[1]), int(glibc[2])) <= (2, 28):
            return True
    return False


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_every_device_dependency_is_a_binary_wheel_for_64_bit_arm(agent_wheel, python, tmp_path):
    report = _resolve(agent_wheel, python, tmp_path / "report.json")
    items = {i["metadata"]["name"].lower(): i for i in report["install"]}
    missing = DEVICE_DEPENDENCIES - set(items)
    assert not missing, f"missing from the device install: {sorted(missing)}"
    assert not WORKSTATION_ONLY & set(items), \
        f"workstation packages in the device install: {sorted(WORKSTATION_ONLY & set(items))}"
    for name, item in items.items():
        if item.get("is_direct"):
            continue  # the agent's own wheel, checked above
        filename = item["download_info"]["url"].rsplit("/", 1)[-1]
        assert filename.endswith(".whl"), f"{name} would be built from source: {filename}"
        assert _fits_the_board(filename), f"{name}: {filename} does not fit {PLATFORM}"
    # ONNX Runtime is the one that must be native code for the board
    assert "aarch64" in items["onnxruntime"]["download_info"]["url"]


@pytest.mark.parametrize("filename, fits", [
    ("numpy-2.4.6-cp312-cp312-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl", True),
    ("click-8.5.1-py3-none-any.whl", True),
    ("x-1-cp311-cp311-manylinux2014_aarch64.whl", True),
    ("x-1-cp311-cp311-manylinux_2_34_aarch64.whl", False),
    ("x-1-cp311-cp311-manylinux_2_28_x86_64.whl", False),
    ("x-1-cp311-cp311-linux_armv7l.whl", False),
])
def test_the_platform_check_tells_board_wheels_from_others(filename, fits):
    assert _fits_the_board(filename) is fits
