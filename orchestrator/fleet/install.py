"""A fleet's broker side installed into the packaged Mosquitto (``broker-config --install``).

On Debian and Raspberry Pi OS the broker is ``mosquitto.service``: it reads
``/etc/mosquitto/mosquitto.conf``, which ends with ``include_dir /etc/mosquitto/conf.d``,
and runs as the ``mosquitto`` user. So a fleet goes in as two things, and nothing else of
the package is touched:

    PREFIX/conf.d/zowarmup.conf   the listener, authentication and ACL settings
    PREFIX/zowarmup/              passwd, acl, server.key (the broker's user's, 0600),
                                  ca.crt, server.crt (0644); root:mosquitto, 0750

Persistence, logging, the pid file and the broker's user stay the package's: Mosquitto
refuses a second ``persistence_location``, ``user`` or ``password_file`` anywhere in its
configuration, so the conf.d file names none of them but the password file, and the
install refuses when another file already names a password file, an ACL or the port.

Installing is idempotent: files that already hold what they should are left alone (a
second run changes nothing and says so). Files of another fleet (another CA) are never
replaced without ``force``: that would lock the other fleet's devices out. Every check
runs before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .mosquitto import CONF_HEADER, BrokerConfigError, broker_settings
from .ownership import Access, BrokerAccessError, current_account, write_owned

PACKAGED_PREFIX = Path("/etc/mosquitto")
CONF_NAME = "zowarmup.conf"
FILES_DIR = "zowarmup"
BROKER_READS = ("passwd", "acl", "server.key")  # the broker's user's, 0600
PUBLIC = ("ca.crt", "server.crt")  # 0644
CONFLICTING = ("password_file", "acl_file")  # Mosquitto takes one of each, in all its files


@dataclass(frozen=True)
class Install:
    """Where a fleet goes, checked: the packaged layout is there, nothing conflicts, and
    what is there already is this fleet's (or ``force`` was given)."""

    prefix: Path
    access: Access
    port: int

    @property
    def conf_path(self) -> Path:
        return self.prefix / "conf.d" / CONF_NAME

    @property
    def files(self) -> Path:
        return self.prefix / FILES_DIR

    @property
    def main_conf(self) -> Path:
        return self.prefix / "mosquitto.conf"

    def targets(self) -> list[Path]:
        return [self.files / name for name in BROKER_READS + PUBLIC] + [self.conf_path]


def plan_install(prefix: Path, access: Access, port: int, fleet_ca: bytes | None,
                 force: bool) -> Install:
    """Check everything an install needs; ``fleet_ca`` is the fleet's CA certificate, None
    for a fleet not made yet. Raises with what to do; writes nothing. The installed files
    belong to whoever installs (root), not to the fleet's owner."""
    access = Access(access.broker, current_account(), access.root)
    plan = Install(Path(os.path.abspath(prefix)), access, port)
    if access.shared and not access.root:
        raise BrokerAccessError(
            f"--install gives {plan.files}'s files to the broker's user "
            f"{access.broker.name}, which needs root: run it with sudo")
    _check_layout(plan)
    _check_conflicts(plan)
    _check_other_fleet(plan, fleet_ca, force)
    _check_writable(plan)
    return plan


def _check_layout(plan: Install) -> None:
    """The prefix must be a packaged broker's configuration that reads its conf.d."""
    conf_d = plan.prefix / "conf.d"
    if not (plan.main_conf.is_file() and conf_d.is_dir()):
        raise BrokerConfigError(
            f"{plan.prefix} is not a packaged Mosquitto's configuration (no mosquitto.conf "
            f"and conf.d/ there): install the broker (apt install mosquitto) or give --prefix "
            f"its configuration directory")
    included = [Path(os.path.abspath(value)) for key, value, _ in _settings(plan.main_conf)
                if key == "include_dir"]
    if conf_d not in included:
        raise BrokerConfigError(
            f"{plan.main_conf} does not read {conf_d}: add the line `include_dir {conf_d}` "
            f"to it, or run a broker of its own on broker-config's mosquitto.conf (without "
            f"--install)")


def _check_conflicts(plan: Install) -> None:
    """Another file of the broker's configuration must not set what the fleet sets."""
    others = [plan.main_conf] + sorted(p for p in (plan.prefix / "conf.d").glob("*.conf")
                                       if p.name != CONF_NAME)
    for path in others:
        for key, value, number in _settings(path):
            if _conflicts(key, value, plan.port):
                raise BrokerConfigError(
                    f"{path}:{number} already sets `{key} {value}`, which the fleet's "
                    f"{CONF_NAME} sets too (Mosquitto would not start): remove that line, or "
                    f"choose another --port")


def _conflicts(key: str, value: str, port: int) -> bool:
    if key in CONFLICTING:
        return True
    return key in ("listener", "port") and value.split()[:1] == [str(port)]


def _check_other_fleet(plan: Install, fleet_ca: bytes | None, force: bool) -> None:
    present = [p for p in plan.targets() if p.exists() or p.is_symlink()]
    if not present or force:
        return
    installed = plan.files / "ca.crt"
    same_ca = fleet_ca is not None and installed.is_file() and installed.read_bytes() == fleet_ca
    ours = not plan.conf_path.exists() or plan.conf_path.read_text().startswith(CONF_HEADER)
    if same_ca and ours:
        return
    raise BrokerConfigError(
        f"{plan.prefix} already holds another fleet's broker files "
        f"({', '.join(str(p) for p in present)}); replacing them would lock that fleet's "
        f"devices out. Add --force to replace them, or give --prefix another broker's "
        f"configuration")


def _check_writable(plan: Install) -> None:
    for place in (plan.prefix / "conf.d", plan.files if plan.files.exists() else plan.prefix):
        if not os.access(place, os.W_OK):
            raise BrokerAccessError(f"cannot write into {place}: run --install as root (sudo)")


def _settings(path: Path) -> list[tuple[str, str, int]]:
    """(key, value, line number) of each setting in a Mosquitto configuration file."""
    found = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        words = line.strip().split(None, 1)
        if words and not words[0].startswith("#"):
            found.append((words[0], words[1].strip() if len(words) > 1 else "", number))
    return found


def conf_d_text(files: Path, port: int, bind: str) -> str:
    """The conf.d file: the fleet's settings and nothing the package sets itself."""
    return "\n".join([
        CONF_HEADER,
        "# Installed by `zowarmup broker-config --install`; persistence, logging and the",
        "# broker's user are the packaged mosquitto.conf's.",
        *broker_settings(files, port, bind),
        "",
    ])


def install(plan: Install, out: Path, bind: str) -> list[Path]:
    """Copy the broker's files from the fleet directory ``out`` and write the conf.d
    file; returns what changed (nothing, when the fleet is installed already)."""
    access = plan.access
    uid, gid, mode = access.top()
    changed = [] if plan.files.is_dir() else [plan.files]
    plan.files.mkdir(mode=0o700, exist_ok=True)
    if access.root:
        os.chown(plan.files, uid, gid)
    os.chmod(plan.files, mode)
    me, broker = access.owner, access.broker
    for name in BROKER_READS + PUBLIC:
        who, file_mode = (broker, 0o600) if name in BROKER_READS else (me, 0o644)
        if write_owned(plan.files / name, (out / name).read_bytes(), who.uid, who.gid,
                       file_mode, access.root):
            changed.append(plan.files / name)
    text = conf_d_text(plan.files, plan.port, bind).encode()
    if write_owned(plan.conf_path, text, me.uid, me.gid, 0o644, access.root):
        changed.append(plan.conf_path)
    return changed
