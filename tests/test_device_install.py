"""The device install works on a 64-bit ARM board: every dependency comes as a binary wheel
for manylinux_2_28_aarch64 (Raspberry Pi OS 12, Jetson's Ubuntu 22.04), so a Pi installs
in a minute and never compiles numpy or ONNX Runtime, and the agent's own wheel is pure
Python, one wheel for every board.

pip resolves the install for the board's platform and Python without installing anything
(``--dry-run --report``), from the indexes pip is configured with on this machine (its
index, extra indexes and find-links, from pip.conf or PIP_* variables), the way a
``pip download`` would; ZOWARMUP_DEVICE_INDEX names one index to use instead. It reads the
dependencies' metadata there, so these tests need that index. When pip can get nothing from
it, they fail and say so; ZOWARMUP_OFFLINE=1 turns that into a skip that says the check did
not run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = "manylinux_2_28_aarch64"
DEVICE_DEPENDENCIES = {"numpy", "onnxruntime", "paho-mqtt", "click"}
WORKSTATION_ONLY = {"torch", "onnx", "onnxscript", "amqtt", "scikit-learn", "matplotlib"}
PACKAGES = ("protocols", "edge_agent", "export", "orchestrator")
PIP_INDEX_VARIABLES = ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX")
PROBE = "click"  # a small pure-Python wheel every index that serves the agent holds


def _pip_settings() -> tuple[list[str], dict[str, str]]:
    """pip's index options and environment: pip's own configuration, which every install on
    this machine follows (a site's mirror, an offline index), unless ZOWARMUP_DEVICE_INDEX
    names the one index to check against instead."""
    index = os.environ.get("ZOWARMUP_DEVICE_INDEX")
    if not index:
        return [], dict(os.environ)
    env = {k: v for k, v in os.environ.items() if k not in PIP_INDEX_VARIABLES}
    env["PIP_CONFIG_FILE"] = os.devnull  # that index alone
    return ["--index-url", index], env


def _index_reachable(scratch: Path) -> None:
    """Fail (or, offline by choice, skip loudly) before pip's long retries when pip gets
    nothing from its indexes; pip itself fetches one small wheel, so proxies, certificates
    and file:// indexes count as they do for the resolution."""
    options, env = _pip_settings()
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--only-binary=:all:", "--dest", str(scratch), "--timeout", "15",
                           "--retries", "1", *options, PROBE],
                          capture_output=True, text=True, env=env)
    if done.returncode == 0:
        return
    message = (f"pip could not get {PROBE} from the indexes it is configured with, and this "
               "check resolves the device install there:\n"
               f"{(done.stdout + done.stderr)[-2000:]}")
    if os.environ.get("ZOWARMUP_OFFLINE") == "1":
        pytest.skip(f"NOT CHECKED (ZOWARMUP_OFFLINE=1): {message}")
    pytest.fail(f"{message}\nSet ZOWARMUP_OFFLINE=1 to skip it, reported as not checked.",
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
    for needed in ("edge_agent/cli.py", "edge_agent/settings.py", "protocols/vectors.json"):
        assert needed in names, f"{needed} is missing from the wheel"


def _resolve(wheel: Path, python: str, report: Path) -> dict:
    """pip's resolution of the device install for an aarch64 board with this Python."""
    _index_reachable(report.parent / "probe")
    options, env = _pip_settings()
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
           "--target", str(report.parent / "target"), "--only-binary=:all:",
           "--platform", PLATFORM, "--python-version", python, "--implementation", "cp",
           "--abi", f"cp{python.replace('.', '')}", *options,
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


def _check_the_board_install(report: dict) -> dict:
    """The device install of pip's report holds the device dependencies, no workstation
    package, and binary wheels for the board only; returns its downloads by name."""
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
    return {name: item["download_info"]["url"] for name, item in items.items()
            if not item.get("is_direct")}


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_every_device_dependency_is_a_binary_wheel_for_64_bit_arm(agent_wheel, python, tmp_path):
    _check_the_board_install(_resolve(agent_wheel, python, tmp_path / "report.json"))


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


ARM = "cp312-cp312-manylinux_2_28_aarch64"
BOARD = {"numpy": [ARM], "onnxruntime": [ARM], "paho-mqtt": ["py3-none-any"],
         "click": ["py3-none-any"]}


def _stand_in_wheel(files: Path, name: str, tag: str, requires: list[str]) -> str:
    """A wheel holding only the metadata pip resolves with; returns its file name."""
    dist, version = name.replace("-", "_"), "99.0"
    info = f"{dist}-{version}.dist-info"
    filename = f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(files / filename, "w") as wheel:
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\n"
                       f"Version: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\n"
                       f"Tag: {tag}\n")
        wheel.writestr(f"{info}/RECORD", "")
    return filename


def _simple_index(root: Path, projects: dict[str, list[str]],
                  requires: dict[str, list[str]] | None = None) -> str:
    """A local simple index (PEP 503) of stand-in wheels, one per tag; its file:// URL."""
    files = root / "files"
    files.mkdir(parents=True)
    for name, tags in projects.items():
        links = "".join(f'<a href="../../files/{f}">{f}</a>\n' for f in
                        (_stand_in_wheel(files, name, tag, (requires or {}).get(name, []))
                         for tag in tags))
        (root / "simple" / name).mkdir(parents=True)
        (root / "simple" / name / "index.html").write_text(f"<html><body>\n{links}</body></html>")
    (root / "simple").mkdir(exist_ok=True)
    return (root / "simple").as_uri()


def _configure_pip(monkeypatch, **variables: str) -> None:
    """pip's configuration for this test: these PIP_* variables, no config file, and a proxy
    that refuses, so whatever pip gets comes from the test's own local indexes."""
    for name in (*PIP_INDEX_VARIABLES, "ZOWARMUP_DEVICE_INDEX", "ZOWARMUP_OFFLINE",
                 "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("variable", ["PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"])
def test_the_check_resolves_from_the_index_pip_is_configured_with(agent_wheel, variable,
                                                                  tmp_path, monkeypatch):
    board = _simple_index(tmp_path / "board", BOARD)
    empty = _simple_index(tmp_path / "empty", {})  # pip's index when the board's is an extra
    _configure_pip(monkeypatch, **{"PIP_INDEX_URL": empty, variable: board})
    urls = _check_the_board_install(_resolve(agent_wheel, "3.12", tmp_path / "report.json"))
    assert set(urls) == DEVICE_DEPENDENCIES
    for url in urls.values():
        assert url.startswith((tmp_path / "board" / "files").as_uri()), url


def test_the_device_index_setting_overrides_pips_configuration(agent_wheel, tmp_path,
                                                              monkeypatch):
    _configure_pip(monkeypatch, PIP_INDEX_URL=_simple_index(tmp_path / "empty", {}))
    monkeypatch.setenv("ZOWARMUP_DEVICE_INDEX", _simple_index(tmp_path / "board", BOARD))
    urls = _check_the_board_install(_resolve(agent_wheel, "3.12", tmp_path / "report.json"))
    assert urls["onnxruntime"].startswith((tmp_path / "board" / "files").as_uri())


def test_an_index_without_the_boards_onnxruntime_fails_the_check(agent_wheel, tmp_path,
                                                                  monkeypatch):
    projects = {**BOARD, "onnxruntime": ["cp312-cp312-manylinux_2_28_x86_64"]}
    _configure_pip(monkeypatch, PIP_INDEX_URL=_simple_index(tmp_path / "x86", projects))
    with pytest.raises(AssertionError, match="does not resolve to binary wheels"):
        _resolve(agent_wheel, "3.12", tmp_path / "report.json")


def test_a_workstation_package_in_the_device_install_fails_the_check(agent_wheel, tmp_path,
                                                                     monkeypatch):
    index = _simple_index(tmp_path / "torch", {**BOARD, "torch": [ARM]},
                          requires={"numpy": ["torch"]})
    _configure_pip(monkeypatch, PIP_INDEX_URL=index)
    report = _resolve(agent_wheel, "3.12", tmp_path / "report.json")
    with pytest.raises(AssertionError, match=r"workstation packages .*torch"):
        _check_the_board_install(report)


@pytest.mark.parametrize("offline, outcome", [
    ("", pytest.fail.Exception), ("1", pytest.skip.Exception)])
def test_an_index_pip_cannot_reach_is_never_a_pass(offline, outcome, tmp_path, monkeypatch):
    _configure_pip(monkeypatch, PIP_INDEX_URL=(tmp_path / "absent" / "simple").as_uri(),
                   ZOWARMUP_OFFLINE=offline)
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception),
                       match=f"pip could not get {PROBE}") as raised:
        _index_reachable(tmp_path / "probe")
    assert raised.type is outcome
    assert ("NOT CHECKED" in str(raised.value)) == bool(offline)
