"""``zowarmup broker-config`` as one request: make a fleet (or, to install it, take the one
made before), install it into the packaged broker if asked, and say exactly what to run
next on the broker, the orchestrator and each device.

Every check runs before the first file is written, so a refused request changes nothing.
The printed commands are the ones the tests run: the broker line is started as printed,
and a device's line from a copy of its directory.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from .install import PACKAGED_PREFIX, Install, install, plan_install
from .mosquitto import (
    BrokerConfigError,
    FleetSettings,
    check_agents,
    check_empty,
    default_hosts,
    load_credentials,
    write_fleet,
)
from .ownership import Access

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SBIN_MOSQUITTO = "/usr/sbin/mosquitto"


@dataclass(frozen=True)
class BrokerRequest:
    """The command's flags; None (or empty) where a flag was not given."""

    out: Path
    agents: tuple[str, ...] = ()
    port: int | None = None
    bind: str | None = None
    hosts: tuple[str, ...] = ()
    days: int | None = None
    broker_user: str | None = None
    install: bool = False
    prefix: Path | None = None
    force: bool = False

    def new_settings(self) -> FleetSettings:
        """The settings of a fleet to make, defaults filled in."""
        if not self.agents:
            raise BrokerConfigError(f"{self.out} holds no fleet yet: give --agents N to make "
                                    "one")
        check_agents(self.agents)
        d = FleetSettings(())
        return FleetSettings(self.agents, self.port or d.port, self.bind or d.bind,
                             self.hosts or tuple(default_hosts()), self.days or d.days)

    def differences(self, made: FleetSettings) -> list[str]:
        """The flags given that disagree with how the fleet was made (unknown: no check)."""
        pairs = {"--agents/--ids": (self.agents, made.agents), "--port": (self.port, made.port),
                 "--bind": (self.bind, made.bind), "--host": (self.hosts, made.hosts),
                 "--days": (self.days, made.days)}
        return [f"{flag} {_show(asked)} (it was made with {_show(have)})"
                for flag, (asked, have) in pairs.items() if asked and have and asked != have]


def _show(value: object) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


@dataclass(frozen=True)
class Setup:
    """What the request did: the fleet, whether it was made now, where it went."""

    out: Path
    settings: FleetSettings
    made: bool
    access: Access
    installed: Install | None = None
    changed: tuple[Path, ...] = ()


def setup_broker(req: BrokerRequest) -> Setup:
    """Make the fleet and install it as asked; raises, having written nothing, when the
    request cannot be carried out."""
    if (req.force or req.prefix) and not req.install:
        raise BrokerConfigError("--force and --prefix go with --install")
    made = _fleet_in(req.out) if req.install else None
    if made is not None and (wrong := req.differences(made)):
        raise BrokerConfigError(f"{req.out} holds a fleet made otherwise: " + "; ".join(wrong)
                                + ". Give the flags it was made with (or none), or make a new "
                                  "fleet with another --out")
    settings = made or req.new_settings()
    access = Access.plan(req.broker_user)
    plan = None
    if req.install:
        ca = (req.out / "ca.crt").read_bytes() if made else None
        plan = plan_install(req.prefix or PACKAGED_PREFIX, access, settings.port, ca,
                            req.force)
    if made is None:
        write_fleet(req.out, settings, access, reach=not req.install)
    changed = install(plan, req.out, settings.bind) if plan else []
    return Setup(req.out, settings, made is None, access, plan, tuple(changed))


def _fleet_in(out: Path) -> FleetSettings | None:
    """The settings of the fleet already in ``out``; None where ``out`` is new or empty."""
    if not (out / "credentials.json").exists():
        check_empty(out)
        return None
    return FleetSettings.of(out, load_credentials(out))


# --- what to run next --------------------------------------------------------------------


def instructions(s: Setup) -> list[str]:
    """The lines the command prints: each command on its own line, as it is to be run."""
    n = len(s.settings.agents)
    head = (f"wrote a Mosquitto setup for {n} agent(s) and the orchestrator to {s.out}"
            if s.made else f"{s.out} holds a fleet of {n} agent(s) and the orchestrator")
    broker = _installed(s) if s.installed else _standalone(s)
    return [head, *broker, *_orchestrator(s), *_device(s)]


def _standalone(s: Setup) -> list[str]:
    conf, port, who = _q(s.out / "mosquitto.conf"), s.settings.port, s.access.broker.name
    hint = s.access.hint(s.out)
    if hint:
        return [f"  broker: {hint} && sudo {mosquitto_command()} -c {conf}",
                f"    (TLS on port {port}; without root this command could not give {who} "
                "passwd, acl, server.key and data/: the chown does)"]
    note = (f"started as root it runs as {who}, which alone may read passwd, acl and "
            "server.key" if s.access.shared else f"it runs as {who}, who owns every file")
    return [f"  broker: {mosquitto_command()} -c {conf}", f"    (TLS on port {port}; {note})"]


def _installed(s: Setup) -> list[str]:
    plan = s.installed
    state = ("installed" if s.changed else "already installed, nothing changed:")
    lines = [f"  {state} {plan.conf_path} and {plan.files}/ (passwd, acl and server.key "
             f"readable by {plan.access.broker.name} only)"]
    if plan.prefix == PACKAGED_PREFIX:
        sudo = "" if os.geteuid() == 0 else "sudo "
        return lines + [f"  broker: {sudo}systemctl restart mosquitto",
                        f"    (TLS on port {s.settings.port}; `systemctl status mosquitto` "
                        "shows it running)"]
    return lines + [f"  broker: {mosquitto_command()} -c {_q(plan.main_conf)}",
                    f"    (TLS on port {s.settings.port}; the broker whose configuration "
                    f"{plan.prefix} is)"]


def _orchestrator(s: Setup) -> list[str]:
    owner = s.access.owner.name
    return [f"  orchestrator: zowarmup serve CONFIG --broker {broker_url(s.settings)} "
            f"--set fleet.credentials={_q(s.out)}",
            f"    (as {owner}, who owns orchestrator/ and credentials.json there; `zowarmup "
            "run` takes the same flags and starts local agents)"]


def _device(s: Setup) -> list[str]:
    first = s.settings.agents[0]
    d = shlex.quote(first)
    return [f"  device {first} (every agent alike): copy {_q(s.out / 'agents' / first)}/ to "
            f"it as {d}/, then run there",
            f"    zowarmup-agent run --broker {broker_url(s.settings)} --id {d} --username {d} "
            f"--password-file {d}/password --tls-ca {d}/ca.crt --tls-cert {d}/client.crt "
            f"--tls-key {d}/client.key --run RUN --data SHARD",
            "    (RUN: run.name in CONFIG; SHARD: the device's shard; as a service: "
            "docs/devices.md)"]


def broker_url(settings: FleetSettings) -> str:
    """mqtts://HOST:PORT by a name the broker's certificate holds: a loopback one when the
    broker listens on loopback only, else the first other name (the machine's by
    default)."""
    hosts = list(settings.hosts) or [socket.gethostname()]
    remote = [h for h in hosts if h not in LOOPBACK]
    if settings.bind in LOOPBACK or not remote:
        host = next((h for h in hosts if h in LOOPBACK), hosts[0])
    else:
        host = remote[0]
    host = f"[{host}]" if ":" in host else host
    return f"mqtts://{host}:{settings.port}"


def mosquitto_command() -> str:
    """``mosquitto`` where it is on PATH; Debian puts it in /usr/sbin, often not there."""
    if shutil.which("mosquitto") or not os.path.exists(SBIN_MOSQUITTO):
        return "mosquitto"
    return SBIN_MOSQUITTO


def _q(path: Path) -> str:
    return shlex.quote(str(path))
