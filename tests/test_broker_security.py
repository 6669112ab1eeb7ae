"""`zowarmup broker-config` against a real Mosquitto: TLS, a password per agent, the ACL.

The broker runs exactly as a deployment would run it: started by the command the tool
printed, on the configuration it wrote, unmodified; as root (where the tests run as root)
it switches to the broker's user, which must then be able to read its files. Each
security check runs twice: on the fleet's own mosquitto.conf, and on Debian's packaged
configuration (moved under a scratch directory, never the real /etc) after `--install`.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.mqtt import ConnectFailed, ConnectRefused, MqttTransport, Tls
from orchestrator.fleet.mosquitto import (
    BrokerConfigError,
    FleetSettings,
    check_password,
    hash_password,
    load_credentials,
    write_broker_config,
    write_fleet,
)
from orchestrator.fleet.ownership import Access, Account, current_account
from protocols import topics
from protocols.codec import decode
from protocols.errors import ZoError
from tests.brokers import CommandBroker, free_port

pytest.importorskip("cryptography", reason="certificates need the orchestrator extra")
pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[1]
RUN = "sec"

# Debian's /etc/mosquitto/mosquitto.conf (package mosquitto 2.0, bookworm), as installed.
DEBIAN_CONF = """\
# Place your local configuration in /etc/mosquitto/conf.d/
#
# A full description of the configuration file is at
# /usr/share/doc/mosquitto/examples/mosquitto.conf.example

pid_file /run/mosquitto/mosquitto.pid

persistence true
persistence_location /var/lib/mosquitto/

log_dest file /var/log/mosquitto/mosquitto.log

include_dir /etc/mosquitto/conf.d
"""


def expected_broker() -> tuple[int, int]:
    """(uid, gid) the broker should run as: the packaged `mosquitto` user when the tests
    run as root (Mosquitto switches to it), else the user running the tests."""
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("mosquitto")
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            pass
    return os.geteuid(), os.getegid()


def owner_mode(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def cli(*args: str, cwd: Path, sudo: str | None = None) -> subprocess.CompletedProcess:
    """`zowarmup broker-config ARGS` run from ``cwd``, as its user would: not under sudo
    (the fleet's files then belong to whoever runs the tests), or as if ``sudo`` ran it."""
    env = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "SUDO_GID")}
    if sudo:
        entry = pwd.getpwnam(sudo)
        env.update(SUDO_UID=str(entry.pw_uid), SUDO_GID=str(entry.pw_gid))
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "broker-config", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def printed(output: str, role: str) -> str:
    """The command the tool printed for ``role`` (broker, orchestrator)."""
    found = [line.split(": ", 1)[1] for line in output.splitlines()
             if line.startswith(f"  {role}: ")]
    assert len(found) == 1, output
    return found[0]


def printed_device(output: str) -> str:
    """The device's command: the line after `  device ID ...: copy ... to it`."""
    lines = output.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("  device ")]
    assert len(at) == 1, output
    return lines[at[0] + 1].strip()


def snapshot(top: Path) -> dict:
    """Every path under ``top`` with its bytes, owner, mode and modification time."""
    got = {}
    for path in sorted([top, *top.rglob("*")]):
        st = path.lstat()
        data = path.read_bytes() if path.is_file() else None
        got[str(path.relative_to(top))] = (data, st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns)
    return got


def packaged_layout(root: Path) -> Path:
    """Debian's mosquitto package laid out under ``root``: its mosquitto.conf with every
    path moved under ``root``, an empty conf.d, and the directories the package and its
    service give the broker's user. Returns the configuration directory (/etc/mosquitto)."""
    for d in ("etc/mosquitto/conf.d", "var/lib/mosquitto", "var/log/mosquitto",
              "run/mosquitto"):
        (root / d).mkdir(parents=True)
    for d in root.rglob("*"):
        d.chmod(0o755)
    conf = DEBIAN_CONF
    for system in ("/etc/mosquitto", "/var/lib/mosquitto", "/var/log/mosquitto",
                   "/run/mosquitto"):
        conf = conf.replace(system, f"{root}{system}")
    (root / "etc/mosquitto/mosquitto.conf").write_text(conf)
    if os.geteuid() == 0:
        uid, gid = expected_broker()
        for d in ("var/lib/mosquitto", "var/log/mosquitto", "run/mosquitto"):
            os.chown(root / d, uid, gid)
    return root / "etc/mosquitto"


@dataclass(frozen=True)
class Fleet:
    root: Path  # the directory the commands run from
    out: Path
    port: int
    output: str  # what broker-config printed
    creds: dict


@pytest.fixture(scope="module")
def deploy_root():
    """Where the fleet's files live, as a deployment keeps them.

    Started as root, the generated configuration makes Mosquitto switch to the `mosquitto`
    user before it opens its files, so every directory above them must let that user
    through. pytest's tmp_path does not (/tmp/pytest-of-root is 0700, and broker-config
    refuses it), so the files go where a deployment's go: a root-owned directory open to
    traversal (0755), as /etc and /srv are; here a fresh one in the system's temp
    directory, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="zowarmup-broker-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def fleet(deploy_root) -> Fleet:
    port = free_port()
    done = cli("--agents", "3", "--out", "fleet", "--port", str(port), "--bind", "127.0.0.1",
               cwd=deploy_root)
    assert done.returncode == 0, done.stderr
    out = deploy_root / "fleet"
    return Fleet(deploy_root, out, port, done.stdout, load_credentials(out))


@pytest.fixture(scope="module")
def packaged(fleet) -> tuple[Path, str]:
    """The same fleet installed into a scratch copy of the packaged broker's layout."""
    prefix = packaged_layout(fleet.root / "pkg")
    done = cli("--out", "fleet", "--install", "--prefix", str(prefix), cwd=fleet.root)
    assert done.returncode == 0, done.stderr
    return prefix, done.stdout


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for process {pid}")


@pytest.fixture(params=["own config", "packaged"])
def secure(request, fleet, tmp_path):
    """Mosquitto started by the command broker-config printed, from where it was run."""
    from tests.conftest import _require_mosquitto
    _require_mosquitto()
    output, logs = fleet.output, ()
    if request.param == "packaged":
        prefix, output = request.getfixturevalue("packaged")
        logs = (prefix.parents[1] / "var/log/mosquitto/mosquitto.log",)
    broker = CommandBroker(shlex.split(printed(output, "broker")), fleet.port, fleet.root,
                           tmp_path / "broker", logs)
    broker.start()
    pid = broker.proc.pid
    try:
        assert process_uid(pid) == expected_broker()[0], broker.log()
        yield broker, fleet.out, fleet.creds
    finally:
        broker.stop()
        assert not Path(f"/proc/{pid}").exists(), f"Mosquitto {pid} outlived its test"


def connect(port: int, who: dict | None, *, password: str | None = None,
            cert: bool = True, client_id: str | None = None) -> MqttTransport:
    ca = (who or {}).get("ca")
    tls = Tls(ca, who["cert"], who["key"]) if who and cert else Tls(ca)
    t = MqttTransport(f"mqtts://127.0.0.1:{port}", client_id=client_id,
                      username=who["username"] if who else None,
                      password=password if password is not None else (who or {}).get("password"),
                      tls=tls, reconnect_min_delay=0.05, reconnect_max_delay=0.5)
    t.connect(timeout=5)
    return t


def received_until(listener: MqttTransport, last: bytes, timeout: float = 5) -> list:
    """(topic, payload) received until ``last`` arrives. Each publish before it was
    acknowledged before it was sent, so the broker had routed (or dropped) them already."""
    got, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        m = listener.get(timeout=0.05)
        if m is not None:
            got.append((m.topic, m.payload))
            if m.payload == last:
                break
    return got


def test_password_hashes_are_mosquittos_format():
    hashed = hash_password("secret", salt=b"\x00" * 12)
    assert hashed.startswith("$7$101$AAAAAAAAAAAAAAAA$") and len(hashed.split("$")[-1]) == 88
    assert check_password("secret", hashed) and not check_password("Secret", hashed)
    # a line mosquitto_passwd 2.0.11 wrote for alice / secret
    line = ("$7$101$AO7+QvOhUbc6mxEY$0Dvp3+TQaraVsN7/pBi8mvG/wBtMWLKW3cNgceeqB+SwbW+HnCMPtXA6"
            "clF1T92lA1TNphDGWqAKCB3k/ZfomQ==")
    assert check_password("secret", line) and not check_password("secreT", line)


def test_files_written_and_bad_requests_refused(fleet, tmp_path):
    out, port = fleet.out, fleet.port
    assert sorted(fleet.creds["agents"]) == ["client-000", "client-001", "client-002"]
    users = [line.split(":")[0] for line in (out / "passwd").read_text().splitlines()]
    assert users == ["orchestrator", "client-000", "client-001", "client-002"]
    uid, gid = expected_broker()
    me = os.geteuid()
    for name in ("passwd", "acl", "server.key"):  # the broker's, and no one else's
        assert owner_mode(out / name) == (uid, gid, 0o600), name
    assert owner_mode(out / "data") == (uid, gid, 0o700)
    for path in ("ca.key", "credentials.json", "orchestrator/client.key",
                 "orchestrator/password", "agents/client-001/client.key",
                 "agents/client-001/password"):  # the fleet's own secrets: its owner's
        assert owner_mode(out / path)[0::2] == (me, 0o600), path
    for path in ("orchestrator", "agents", "agents/client-001"):
        assert owner_mode(out / path)[0::2] == (me, 0o700), path
    for path in ("ca.crt", "server.crt", "mosquitto.conf"):
        assert owner_mode(out / path)[0::2] == (me, 0o644), path
    shared = uid != me  # the broker's user passes through the directory, others do not
    assert owner_mode(out) == ((me, gid, 0o750) if shared else (me, os.getegid(), 0o700))
    conf = (out / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and f"listener {port} 127.0.0.1" in conf
    assert f"\nuser {pwd.getpwuid(uid).pw_name}\n" in conf
    with pytest.raises(BrokerConfigError, match="already holds a fleet.*--install"):
        write_broker_config(out, ["a"])
    with pytest.raises(BrokerConfigError, match="distinct"):
        write_broker_config(tmp_path / "x", ["a", "a"])
    with pytest.raises(Exception, match="agent id"):
        write_broker_config(tmp_path / "y", ["a/b"])
    with pytest.raises(ZoError, match="no user 'no-such-user'"):
        write_broker_config(tmp_path / "z", ["a"], broker_user="no-such-user")
    assert not any((tmp_path / n).exists() for n in "xyz")


def stranger() -> Account:
    """A broker's user that is not the user running the tests and is in none of its
    groups (it need not exist: only its ids are compared with files' owners)."""
    me = current_account()
    return Account("fleet-broker", me.uid + 4242, me.gid + 4242, frozenset({me.gid + 4242}))


def test_a_place_the_brokers_user_cannot_reach_is_refused(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    access = Access(stranger(), current_account(), root=False)
    with pytest.raises(BrokerConfigError, match="fleet-broker cannot enter .*--install"):
        write_fleet(closed / "fleet", FleetSettings(("a",), hosts=("localhost",)), access)
    assert list(closed.iterdir()) == []


def test_without_root_the_one_command_that_hands_the_files_over_is_printed(deploy_root):
    from orchestrator.fleet.broker_config import Setup, instructions, mosquitto_command
    access = Access(stranger(), current_account(), root=False)
    out = deploy_root / "handed over"
    settings = FleetSettings(("a",), hosts=("localhost",))
    write_fleet(out, settings, access)
    me, group = os.geteuid(), str(stranger().gid)
    for name in ("passwd", "acl", "server.key"):  # not the tool's to give away
        assert owner_mode(out / name)[0::2] == (me, 0o600)
    assert owner_mode(out)[0::2] == (me, 0o711)  # the broker passes through, lists nothing
    assert "\nuser fleet-broker\n" in (out / "mosquitto.conf").read_text()
    q = shlex.quote
    chown = (f"sudo chown -R fleet-broker:{group} {q(f'{out}/passwd')} {q(f'{out}/acl')} "
             f"{q(f'{out}/server.key')} {q(f'{out}/data')}")
    assert access.hint(out) == chown
    lines = instructions(Setup(out, settings, True, access))
    assert printed("\n".join(lines), "broker") == (
        f"{chown} && sudo {mosquitto_command()} -c {q(f'{out}/mosquitto.conf')}")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives files to another user")
def test_under_sudo_the_fleets_own_files_belong_to_who_ran_sudo(deploy_root):
    """`sudo zowarmup broker-config`: the orchestrator, run as that user, reads its files."""
    user = pwd.getpwnam("nobody")
    done = cli("--agents", "1", "--out", "by-sudo", cwd=deploy_root, sudo="nobody")
    assert done.returncode == 0, done.stderr
    out = deploy_root / "by-sudo"
    for path in ("credentials.json", "ca.key", "orchestrator", "orchestrator/client.key",
                 "agents/client-000/password"):
        assert owner_mode(out / path)[:2] == (user.pw_uid, user.pw_gid), path
    assert owner_mode(out / "passwd")[:2] == expected_broker()
    assert "(as nobody, who owns orchestrator/ and credentials.json" in done.stdout


def test_only_the_fleet_gets_in(secure):
    broker, out, creds = secure
    me = creds["orchestrator"]
    connect(broker.port, me).close()  # our own PBKDF2 hash, checked by Mosquitto
    with pytest.raises(ConnectRefused):
        connect(broker.port, me, password="wrong")
    anonymous = {**me, "username": None, "password": None}
    with pytest.raises((ConnectRefused, ConnectFailed)):
        connect(broker.port, anonymous)  # a valid certificate, no user name: refused
    with pytest.raises(ConnectFailed):
        connect(broker.port, me, cert=False)  # no client certificate: no TLS session
    with pytest.raises(ConnectFailed, match="certificate verify failed"):
        MqttTransport(f"mqtts://127.0.0.1:{broker.port}").connect(timeout=5)


def test_an_agent_publishes_only_as_itself_and_never_for_the_orchestrator(secure):
    broker, out, creds = secure
    orch = connect(broker.port, creds["orchestrator"])
    a = connect(broker.port, creds["agents"]["client-000"])
    b = connect(broker.port, creds["agents"]["client-001"])
    for f in topics.agent_filters(RUN):
        orch.subscribe(f)
    b.subscribe(topics.commit(RUN))
    b.subscribe(topics.model(RUN))
    b.subscribe(topics.agent(RUN, "client-001", "inbox"))
    time.sleep(0.3)
    own = topics.agent(RUN, "client-000", "result")
    other = topics.agent(RUN, "client-001", "result")
    a.publish(other, b"spoofed", wait=True)
    a.publish(own, b"mine", wait=True)
    assert received_until(orch, b"mine") == [(own, b"mine")]
    for topic in (topics.commit(RUN), topics.model(RUN),
                  topics.agent(RUN, "client-001", "inbox")):
        a.publish(topic, b"forged", wait=True)
        orch.publish(topic, b"real", wait=True)
        assert received_until(b, b"real") == [(topic, b"real")], topic
    a.subscribe(topics.agent(RUN, "client-001", "inbox"))  # reading another's inbox: nothing
    a.subscribe(topics.agent(RUN, "client-001", "result"))  # nor another's results
    a.subscribe(topics.agent(RUN, "client-000", "inbox"))
    time.sleep(0.2)
    orch.publish(topics.agent(RUN, "client-001", "inbox"), b"private", wait=True)
    b.publish(topics.agent(RUN, "client-001", "result"), b"b's result", wait=True)
    orch.publish(topics.agent(RUN, "client-000", "inbox"), b"yours", wait=True)
    assert received_until(a, b"yours") == [(topics.agent(RUN, "client-000", "inbox"), b"yours")]
    for t in (orch, a, b):
        t.close()


def save_toy_shard(path: Path) -> None:
    import numpy as np

    from edge_agent.shard import save_shard
    save_shard(path, np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64))


def hello_from(orch: MqttTransport, argv: list[str], cwd: Path, env: dict[str, str],
               agent: str) -> None:
    """Run an agent process until the orchestrator's connection hears its hello."""
    orch.subscribe(topics.agent(RUN, agent, "hello"))
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        m = orch.get(timeout=30)
    finally:
        proc.terminate()
        err = proc.communicate(timeout=10)[1].decode(errors="replace")
        orch.close()
    assert m is not None and decode(m.payload).agent_id == agent, err[-2000:]


def test_the_printed_orchestrator_and_device_commands_join(secure, fleet, tmp_path):
    """The orchestrator's flags and a device's command line, as printed; the device's
    from a copy of its directory, as a device gets it."""
    from orchestrator.config import parse_config
    from orchestrator.fleet.mosquitto import orchestrator_identity
    broker, out, creds = secure
    words = shlex.split(printed(fleet.output, "orchestrator"))
    url = words[words.index("--broker") + 1]
    credentials = words[words.index("--set") + 1].removeprefix("fleet.credentials=")
    config = parse_config({"fleet": {"broker": url, "credentials": str(fleet.root / credentials)}})
    name, password, (ca, cert, key) = orchestrator_identity(config.fleet)
    orch = connect(broker.port, {"username": name, "password": password, "ca": ca,
                                 "cert": cert, "key": key})
    device = tmp_path / "device"
    shutil.copytree(out / "agents" / "client-000", device / "client-000")
    save_toy_shard(device / "shard.npz")
    argv = shlex.split(printed_device(fleet.output))
    assert argv[:2] == ["zowarmup-agent", "run"] and url in argv
    argv = [{"RUN": RUN, "SHARD": "shard.npz"}.get(w, w) for w in argv[1:]]
    hello_from(orch, [sys.executable, "-m", "edge_agent.cli", *argv], device, {}, "client-000")


def test_an_agent_process_joins_with_its_own_credentials(secure, tmp_path):
    """A local agent of `zowarmup run`, with what fleet.credentials gives it."""
    from orchestrator.fleet.mosquitto import agent_identity
    broker, out, creds = secure
    save_toy_shard(tmp_path / "shard.npz")

    class Fleet:  # what fleet.credentials holds in a run config
        credentials = str(out)
    args, env = agent_identity(Fleet, "client-002")
    argv = [sys.executable, "-m", "edge_agent.cli", "run", "--broker",
            f"mqtts://127.0.0.1:{broker.port}", "--data", "shard.npz", "--id", "client-002",
            "--run", RUN, "--state-dir", "state", *args]
    hello_from(connect(broker.port, creds["orchestrator"]), argv, tmp_path, env, "client-002")


# --- --install into the packaged layout ---------------------------------------------------


def test_install_places_the_brokers_files_and_a_second_run_changes_nothing(fleet):
    prefix = packaged_layout(fleet.root / "pkg-twice")
    command = ("--out", "fleet", "--install", "--prefix", str(prefix))
    first = cli(*command, cwd=fleet.root)
    assert first.returncode == 0, first.stderr
    assert f"installed {prefix}/conf.d/zowarmup.conf" in first.stdout
    assert printed(first.stdout, "broker").endswith(f" -c {prefix}/mosquitto.conf")
    uid, gid = expected_broker()
    me = os.geteuid()
    files = prefix / "zowarmup"
    for name in ("passwd", "acl", "server.key"):
        assert owner_mode(files / name) == (uid, gid, 0o600), name
        assert (files / name).read_bytes() == (fleet.out / name).read_bytes()
    for name in ("ca.crt", "server.crt"):
        assert owner_mode(files / name)[0::2] == (me, 0o644), name
    assert owner_mode(files) == ((me, gid, 0o750) if uid != me else (me, os.getegid(), 0o700))
    conf = (prefix / "conf.d/zowarmup.conf").read_text()
    assert owner_mode(prefix / "conf.d/zowarmup.conf")[0::2] == (me, 0o644)
    assert f"password_file {files}/passwd" in conf and f"listener {fleet.port} 127.0.0.1" in conf
    keys = {line.split()[0] for line in conf.splitlines() if line and line[0] != "#"}
    # the package sets these, and Mosquitto refuses a second persistence_location or user
    assert not keys & {"persistence", "persistence_location", "user", "pid_file", "log_dest"}
    before = snapshot(prefix)
    for again in (command, (*command, "--agents", "3", "--port", str(fleet.port))):
        done = cli(*again, cwd=fleet.root)
        assert done.returncode == 0, done.stderr
        assert "already installed, nothing changed" in done.stdout
        assert snapshot(prefix) == before
    wrong = cli(*command, "--port", str(fleet.port + 1), cwd=fleet.root)
    assert wrong.returncode != 0 and "made otherwise: --port" in wrong.stderr
    assert snapshot(prefix) == before


def test_install_never_replaces_another_fleets_files_without_force(fleet):
    prefix = packaged_layout(fleet.root / "pkg-other")
    assert cli("--out", "fleet", "--install", "--prefix", str(prefix),
               cwd=fleet.root).returncode == 0
    before = snapshot(prefix)
    other = ("--agents", "1", "--out", "other", "--install", "--prefix", str(prefix))
    refused = cli(*other, cwd=fleet.root)
    assert refused.returncode != 0
    assert "another fleet's broker files" in refused.stderr and "--force" in refused.stderr
    assert snapshot(prefix) == before and not (fleet.root / "other").exists()
    forced = cli(*other, "--force", cwd=fleet.root)
    assert forced.returncode == 0, forced.stderr
    installed = (prefix / "zowarmup/ca.crt").read_bytes()
    assert installed == (fleet.root / "other/ca.crt").read_bytes() != (
        fleet.out / "ca.crt").read_bytes()


@pytest.mark.parametrize("damage, words", [
    (lambda p: shutil.rmtree(p / "conf.d"), "not a packaged Mosquitto"),
    (lambda p: (p / "mosquitto.conf").write_text("persistence true\n"), "does not read"),
    (lambda p: (p / "conf.d/local.conf").write_text("# mine\npassword_file /x\n"),
     "local.conf:2 already sets `password_file /x`"),
])
def test_install_refuses_a_broker_it_would_break(deploy_root, tmp_path, damage, words):
    prefix = packaged_layout(Path(tempfile.mkdtemp(dir=deploy_root)))
    damage(prefix)
    before = snapshot(prefix)
    done = cli("--agents", "1", "--out", str(tmp_path / "new"), "--install", "--prefix",
               str(prefix), cwd=deploy_root)
    assert done.returncode != 0 and words in done.stderr, done.stderr
    assert snapshot(prefix) == before and not (tmp_path / "new").exists()


def test_install_without_root_refuses_files_it_cannot_hand_over(deploy_root):
    from orchestrator.fleet.install import plan_install
    from orchestrator.fleet.ownership import BrokerAccessError
    prefix = packaged_layout(Path(tempfile.mkdtemp(dir=deploy_root)))
    access = Access(stranger(), current_account(), root=False)
    with pytest.raises(BrokerAccessError, match="needs root: run it with sudo"):
        plan_install(prefix, access, 8883, None, force=False)


@pytest.mark.parametrize("fleet_section, words", [
    ({"broker": "mqtt://h:1883", "credentials": "{out}"}, "is not TLS"),
    ({"broker": "mqtts://h:8883", "credentials": "{tmp}"}, "holds no credentials.json"),
    ({"broker": "mqtts://h:8883", "credentials": "{out}", "username": "x"},
     "leave out fleet.username"),
    ({"broker": "mqtts://h:8883", "tls_cert": "{out}/ca.crt"}, "go together"),
    ({"credentials": "{out}"}, "fleet.broker is empty"),
])
def test_config_refuses_mismatched_fleet_identity(fleet, tmp_path, fleet_section, words):
    from orchestrator.config import ConfigError, parse_config
    out = str(fleet.out)
    section = {k: v.format(out=out, tmp=tmp_path) for k, v in fleet_section.items()}
    with pytest.raises(ConfigError, match=words):
        parse_config({"fleet": section})
    good = parse_config({"fleet": {"broker": "mqtts://h:8883", "credentials": out}})
    from orchestrator.fleet.mosquitto import orchestrator_identity
    assert orchestrator_identity(good.fleet)[0] == "orchestrator"
