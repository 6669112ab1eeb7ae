"""The agent on 64-bit ARM, from the test command on demand: `scripts/test --arm64 -m arm64`.

scripts/arm64-check builds (or reuses) an emulated arm64 Debian, installs the agent's wheel
there with the device dependencies, runs the selftest, a fleet of an x86 orchestrator, an
x86 agent and an arm64 agent, and the native-layout check of the zoo's models. It takes
minutes, so the default run does not start it and reports it as skipped, never as passed.
"""

from __future__ import annotations

import re
import subprocess
import sys
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


def _print_pip(tmp_path, cwd=None, **env) -> subprocess.CompletedProcess:
    """`arm64-check --print-pip-config` with these variables and no other pip setting (pip's
    variables only, unless PIP_CONFIG_FILE names a file)."""
    return subprocess.run([str(ROOT / "scripts" / "arm64-check"), "--print-pip-config"],
                          capture_output=True, text=True, timeout=60, cwd=cwd or tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                               "HOME": str(tmp_path / "home"), "PIP_CONFIG_FILE": "/dev/null",
                               "ZOWARMUP_ARM64_ROOT": str(tmp_path / "root"), **env})


def _local_index(top: Path) -> Path:
    """A file:// index in pip's layout: project pages under simple/, files beside it."""
    (top / "simple" / "pkg").mkdir(parents=True)
    (top / "files").mkdir()
    (top / "files" / "pkg-1.0-py3-none-any.whl").write_bytes(b"")
    (top / "simple" / "pkg" / "index.html").write_text(
        '<a href="../../files/pkg-1.0-py3-none-any.whl#sha256=00">pkg-1.0</a>\n')
    return top / "simple"


def test_pip_in_the_root_follows_the_hosts_pip_variables(tmp_path):
    index = _local_index(tmp_path / "index")
    (tmp_path / "wheels").mkdir()
    (tmp_path / "constraints.txt").write_text("-c more.txt\nnumpy<3\n")
    (tmp_path / "more.txt").write_text("click<9\n")
    (tmp_path / "ca.pem").write_text("a CA\n")
    done = _print_pip(tmp_path, PIP_INDEX_URL="https://index.invalid/simple",
                      PIP_EXTRA_INDEX_URL=f"{index.as_uri()} https://extra.invalid/simple",
                      PIP_FIND_LINKS="wheels https://links.invalid/wheels/",
                      PIP_TRUSTED_HOST="index.invalid extra.invalid", PIP_DEFAULT_TIMEOUT="7",
                      PIP_RETRIES="2", PIP_CONSTRAINT="constraints.txt",
                      PIP_CERT=str(tmp_path / "ca.pem"), PIP_NO_COLOR="1",
                      PIP_PROGRESS_BAR="off")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "env PIP_INDEX_URL=https://index.invalid/simple",
        f"env PIP_EXTRA_INDEX_URL={index.as_uri()} https://extra.invalid/simple",
        # relative paths are the host's, from where the check was started
        f"env PIP_FIND_LINKS={tmp_path}/wheels https://links.invalid/wheels/",
        "env PIP_TRUSTED_HOST=index.invalid extra.invalid",
        "env PIP_TIMEOUT=7",
        "env PIP_RETRIES=2",
        f"env PIP_CONSTRAINT={tmp_path}/constraints.txt",
        "env PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt",
        f"cert {tmp_path}/ca.pem",
        # the constraint file and the one it names; the index with the files its pages
        # link to; the find-links directory
        f"mount {tmp_path}/constraints.txt",
        f"mount {tmp_path}/index",
        f"mount {tmp_path}/more.txt",
        f"mount {tmp_path}/wheels",
    ]
    assert done.stderr == ""
    assert not (tmp_path / "root").exists()


def test_without_pip_settings_only_the_hosts_ca_goes_in(tmp_path):
    (tmp_path / "ca.pem").write_text("a CA\n")
    done = _print_pip(tmp_path, SSL_CERT_FILE=str(tmp_path / "ca.pem"))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == ("env PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt\n"
                           f"cert {tmp_path}/ca.pem\n")


def test_pips_config_files_count_in_pips_order(tmp_path):
    """PIP_* over [install] over [global]; another command's section does not count."""
    (tmp_path / "ca.pem").write_text("a CA\n")
    config = tmp_path / "pip.conf"
    config.write_text(f"""\
[global]
index-url = https://global.invalid/simple
find-links = https://global.invalid/links
trusted-host =
    global.invalid
    install.invalid
timeout = 5
cert = {tmp_path}/ca.pem
constraint =
[install]
index-url = https://install.invalid/simple
no-index = false
[download]
index-url = https://download.invalid/simple
extra-index-url = https://download.invalid/extra
""")
    done = _print_pip(tmp_path, PIP_CONFIG_FILE=str(config),
                      PIP_FIND_LINKS="https://env.invalid/links")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for line in ("env PIP_INDEX_URL=https://install.invalid/simple",
                 "env PIP_FIND_LINKS=https://env.invalid/links",
                 "env PIP_TRUSTED_HOST=global.invalid install.invalid",
                 "env PIP_NO_INDEX=false", "env PIP_TIMEOUT=5",
                 "env PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt",
                 f"cert {tmp_path}/ca.pem"):
        assert line in lines, done.stdout
    assert "download.invalid" not in done.stdout and "global.invalid/" not in done.stdout
    assert not any(line.startswith(("env PIP_EXTRA_INDEX_URL=", "env PIP_CONSTRAINT="))
                   for line in lines), done.stdout


def test_what_pip_here_skips_is_forwarded_with_a_note(tmp_path):
    done = _print_pip(tmp_path, PIP_FIND_LINKS=f"{tmp_path}/gone",
                      PIP_EXTRA_INDEX_URL=f"file://{tmp_path}/no-index/simple",
                      PIP_KEYRING_PROVIDER="subprocess")
    assert done.returncode == 0, done.stderr
    assert f"env PIP_FIND_LINKS={tmp_path}/gone" in done.stdout.splitlines()
    assert "mount" not in done.stdout and "KEYRING" not in done.stdout
    assert f"find-links {tmp_path}/gone does not exist on this machine" in done.stderr
    assert f"extra-index-url file://{tmp_path}/no-index/simple does not exist" in done.stderr
    assert "keyring-provider=subprocess is left out" in done.stderr


@pytest.mark.parametrize("variable, message", [
    ("PIP_CONSTRAINT", "pip's constraint file {tmp}/missing.txt does not exist"),
    ("PIP_CERT", "pip's cert {tmp}/missing.txt does not exist"),
    ("PIP_CLIENT_CERT", "pip's client-cert {tmp}/missing.txt is not a file"),
])
def test_a_file_pip_needs_and_cannot_find_stops_the_check(variable, message, tmp_path):
    done = _print_pip(tmp_path, **{variable: str(tmp_path / "missing.txt")})
    assert done.returncode == 1
    assert message.format(tmp=tmp_path) in done.stderr


def _fake_root(tmp_path) -> Path:
    """An arm64 root that already holds files of its own where tmp_path lies on the host."""
    root = tmp_path / "root"
    inside = root / str(tmp_path).lstrip("/")
    inside.mkdir(parents=True)
    (inside / "own-file").write_text("the root's\n")
    return inside


def test_scattered_files_are_mounted_where_they_lie_not_over_the_roots_own(tmp_path):
    """The index's pages link to files elsewhere (an absolute link), the find-links
    directory holds a link to a wheel elsewhere: each directory is mounted, not the
    directory they share, which holds files of the root's own."""
    _fake_root(tmp_path)
    (tmp_path / "index" / "simple" / "pkg").mkdir(parents=True)
    (tmp_path / "store" / "files").mkdir(parents=True)
    wheel = tmp_path / "store" / "files" / "pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    (tmp_path / "index" / "simple" / "pkg" / "index.html").write_text(
        f'<a href="{wheel.as_uri()}">pkg-1.0</a>\n')
    (tmp_path / "wheels").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "other-1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "wheels" / "other-1.0-py3-none-any.whl").symlink_to(
        tmp_path / "cache" / "other-1.0-py3-none-any.whl")
    done = _print_pip(tmp_path, PIP_EXTRA_INDEX_URL=(tmp_path / "index" / "simple").as_uri(),
                      PIP_FIND_LINKS=str(tmp_path / "wheels"))
    assert done.returncode == 0, done.stderr
    mounts = [line for line in done.stdout.splitlines() if line.startswith("mount ")]
    assert mounts == [f"mount {tmp_path}/cache", f"mount {tmp_path}/index/simple",
                      f"mount {tmp_path}/store/files", f"mount {tmp_path}/wheels"]


def test_a_path_the_root_cannot_show_at_the_same_place_stops_the_check(tmp_path):
    inside = _fake_root(tmp_path)
    (inside / "wheels").mkdir()
    (inside / "wheels" / "a-1.0-py3-none-any.whl").write_bytes(b"")  # the root's own
    (inside / "links").symlink_to("/srv")
    for name in ("wheels", "links"):
        (tmp_path / name).mkdir()
    done = _print_pip(tmp_path, PIP_FIND_LINKS=f"{tmp_path}/wheels {tmp_path}/links")
    assert done.returncode == 1
    assert (f"the arm64 root cannot see {tmp_path}/wheels at the same path: it would hide "
            f"the root's own {tmp_path}/wheels") in done.stderr
    assert f"{tmp_path}/links is a symbolic link in the arm64 root" in done.stderr


def test_the_agents_environment_in_the_root_is_never_hidden(tmp_path):
    """A find-links directory at an ancestor of the root's virtual environment (/opt)."""
    if not Path("/opt").is_dir():
        pytest.skip("no /opt on this machine")
    done = _print_pip(tmp_path, PIP_FIND_LINKS="/opt")
    assert done.returncode == 1
    assert "it would hide the root's own /opt" in done.stderr
