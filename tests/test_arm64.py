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


def _print_mirror(tmp_path, sources: dict[str, str], **env) -> subprocess.CompletedProcess:
    """`arm64-check --print-mirror` against an apt directory holding these files."""
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    for name, text in sources.items():
        (apt / name).write_text(text)
    return subprocess.run([str(ROOT / "scripts" / "arm64-check"), "--print-mirror"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "ZOWARMUP_APT_SOURCES_DIR": str(apt),
                               "ZOWARMUP_ARM64_ROOT": str(tmp_path / "root"), **env})


DEB822 = """\
Types: deb
URIs: http://apt-proxy.invalid:3142/debian-security
Suites: bookworm-security
Components: main

# a mirror the host stopped using
Enabled: no
Types: deb
URIs: file:///srv/old/debian
Suites: bookworm
Components: main

Types: deb-src
URIs: file:///srv/src/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://apt-proxy.invalid:3142/debian/
Suites: bookworm
 bookworm-updates
Components: contrib
 main
"""


@pytest.mark.parametrize("sources, mirror", [
    ({"sources.list.d/debian.sources": DEB822}, "http://apt-proxy.invalid:3142/debian"),
    ({"sources.list": "# deb file:///srv/commented bookworm main\n"
                      "deb-src file:///srv/src bookworm main\n"
                      "deb [arch=amd64 signed-by=/k.gpg] file:///srv/mirror/debian/ bookworm"
                      " main contrib # local\n"}, "file:///srv/mirror/debian"),
    # a release with main, for the suite first; other files and components do not count
    ({"sources.list": "deb file:///srv/a/debian trixie main\n",
      "sources.list.d/extra.list": "deb file:///srv/b/debian bookworm contrib\n",
      "sources.list.d/zz.sources": "Types: deb\nURIs: file:///srv/c/debian\n"
                                   "Suites: bookworm\nComponents: main\n",
      "sources.list.d/old.list.disabled": "deb file:///srv/d/debian bookworm main\n"},
     "file:///srv/c/debian"),
    ({"sources.list": "deb file:///srv/a/debian trixie main\n"}, "file:///srv/a/debian"),
])
def test_the_mirror_is_the_one_the_hosts_apt_uses(sources, mirror, tmp_path):
    done = _print_mirror(tmp_path, sources)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{mirror}\n"
    assert not (tmp_path / "root").exists()


def test_the_mirror_setting_overrides_the_hosts_apt(tmp_path):
    done = _print_mirror(tmp_path, {"sources.list": "deb file:///srv/a/debian bookworm main\n"},
                         ZOWARMUP_ARM64_MIRROR="file:///srv/chosen/debian")
    assert (done.returncode, done.stdout) == (0, "file:///srv/chosen/debian\n"), done.stderr


@pytest.mark.parametrize("sources", [
    {},
    {"sources.list": "deb file:///srv/a/debian-security bookworm-security main\n"
                     "deb file:///srv/a/debian bookworm/updates main\n"
                     "deb file:///srv/a/debian bookworm non-free\n"
                     "deb cdrom:[Debian 12]/ bookworm main\n"},
])
def test_without_a_mirror_it_says_what_to_set(sources, tmp_path):
    done = _print_mirror(tmp_path, sources)
    assert done.returncode == 1 and done.stdout == ""
    assert "no Debian mirror in the host's apt sources" in done.stderr
    assert "set ZOWARMUP_ARM64_MIRROR" in done.stderr
