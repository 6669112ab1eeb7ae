"""Everything a Mosquitto needs to run a secure fleet, written by ``zowarmup broker-config``.

A fleet's broker must let in only the fleet, over TLS, and must stop one device from
speaking for another or for the orchestrator. The topic layout makes that a short ACL
(``protocols/topics.py``): an agent publishes only below ``agent/<its user name>/``, and
only the orchestrator publishes rounds, commits and models. So the agent id is the MQTT
user name, and each device gets its own password and client certificate::

    OUT/mosquitto.conf        TLS listener, no anonymous access, password file, ACL, and
                              the user a broker started as root switches to
    OUT/passwd                Mosquitto's format: user:$7$<iterations>$<salt>$<PBKDF2-SHA512>
    OUT/acl                   who may publish and read what
    OUT/data/                 the broker's persistence (retained models and commits)
    OUT/ca.crt  ca.key        a self-signed CA (keep ca.key to add devices later)
    OUT/server.crt server.key the broker's certificate, for the names given in --host
    OUT/orchestrator/         ca.crt, client.crt, client.key, password: the orchestrator's
    OUT/agents/<id>/          the same for one device: copy this directory to it
    OUT/credentials.json      every user name, password and file, for `fleet.credentials`

``passwd``, ``acl``, ``server.key`` and ``data/`` belong to the broker's user, everything
else to the fleet's owner (``ownership.py``); ``install.py`` puts the broker's
part into the packaged Mosquitto's ``/etc/mosquitto``.

Passwords are hashed here (PBKDF2-SHA512, Mosquitto 2.0's ``$7$`` format), so no
``mosquitto_passwd`` is needed; certificates are made with the ``cryptography`` package.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from protocols import topics
from protocols.errors import ZoError
from protocols.validate import check_identifier

from .ownership import Access, make_dirs

ORCHESTRATOR = "orchestrator"
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd writes in Mosquitto 2.0
MAX_PACKET_BYTES = 16 << 20  # the largest model chunk or round message, with room to spare


class BrokerConfigError(ZoError):
    """The broker files cannot be written as asked; nothing was written."""


@dataclass(frozen=True)
class Identity:
    """One user of the broker: its name, password and the directory of its TLS files."""

    username: str
    password: str
    directory: Path

    def files(self, out: Path) -> dict[str, str]:
        """Its entry in credentials.json. Paths are relative to the fleet's directory, so
        they hold wherever the directory is used from, or moved to."""
        d = self.directory.relative_to(out)
        return {"username": self.username, "password": self.password,
                "ca": str(d / "ca.crt"), "cert": str(d / "client.crt"),
                "key": str(d / "client.key")}


def hash_password(password: str, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto 2.0's ``$7$`` password hash: PBKDF2-HMAC-SHA512, 12-byte salt, 64 bytes."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def check_password(password: str, hashed: str) -> bool:
    """True when ``password`` matches a ``$7$`` hash (as Mosquitto would decide)."""
    try:
        _, seven, iterations, salt, digest = hashed.split("$")
        want = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt),
                                  int(iterations), len(want))
    except ValueError:
        return False
    return seven == "7" and secrets.compare_digest(got, want)


def password_file(identities: Sequence[Identity]) -> str:
    return "".join(f"{i.username}:{hash_password(i.password)}\n" for i in identities)


def acl_text(orchestrator: str = ORCHESTRATOR) -> str:
    """The ACL: patterns (``%u`` = the user name) hold for every user, agents included."""
    run = f"{topics.ROOT}/+"
    lines = ["# zowarmup fleet ACL: an agent publishes only below agent/<its user name>/,",
             "# and only the orchestrator publishes rounds, commits and the model.",
             f"user {orchestrator}", f"topic readwrite {topics.ROOT}/#", ""]
    lines += [f"pattern write {run}/agent/%u/{kind}" for kind in topics.AGENT_KINDS]
    lines += [f"pattern read {run}/model", f"pattern read {run}/model/#",
              f"pattern read {run}/commit", f"pattern read {run}/agent/%u/inbox"]
    return "\n".join(lines) + "\n"


CONF_HEADER = "# Mosquitto 2.0 settings for a zowarmup fleet (written by zowarmup broker-config)."


def broker_settings(files: Path, port: int, bind: str) -> list[str]:
    """The listener, authentication and ACL: what a fleet needs from any Mosquitto, its
    own (``mosquitto.conf`` here) or the packaged one (a ``conf.d`` file)."""
    return [
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {files / 'passwd'}",
        f"acl_file {files / 'acl'}",
        "set_tcp_nodelay true",
        f"max_packet_size {MAX_PACKET_BYTES}",
        "max_connections -1",
        f"listener {port} {bind}",
        f"cafile {files / 'ca.crt'}",
        f"certfile {files / 'server.crt'}",
        f"keyfile {files / 'server.key'}",
        "require_certificate true",
        "use_identity_as_username false",
        "tls_version tlsv1.2",
    ]


def mosquitto_conf(out: Path, port: int, bind: str, user: str) -> str:
    """A whole broker's configuration: the fleet's settings, the user a broker started
    as root switches to before it opens any of these files, and persistence, so retained
    models and commits survive a restart."""
    out = Path(os.path.abspath(out))
    return "\n".join([
        CONF_HEADER,
        f"# Run: mosquitto -c {out / 'mosquitto.conf'}. Started as root, Mosquitto switches to",
        "# the user below, which owns passwd, acl, server.key and data/.",
        f"user {user}",
        "persistence true",
        f"persistence_location {out / 'data'}/",
        *broker_settings(out, port, bind),
        "",
    ])


def default_hosts() -> list[str]:
    """Names the broker's certificate is valid for when --host is not given."""
    return sorted({"localhost", "127.0.0.1", socket.gethostname()})


@dataclass(frozen=True)
class FleetSettings:
    """What a fleet was made with. Kept in ``credentials.json``, so that the same command
    run again (as ``--install`` allows) can tell the same fleet from a different request.
    Empty ``hosts`` or zero ``days`` mean unknown (a fleet made before they were kept)."""

    agents: tuple[str, ...]
    port: int = 8883
    bind: str = "0.0.0.0"
    hosts: tuple[str, ...] = ()
    days: int = 825

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, out: Path, credentials: dict) -> FleetSettings:
        """The settings ``out`` was made with, from its ``credentials.json``."""
        kept = credentials.get("settings")
        try:
            if kept is None:  # made before settings were kept: what the files still say
                return cls(tuple(credentials["agents"]), int(credentials["broker_port"]),
                           _listener_bind(out / "mosquitto.conf"), (), 0)
            return cls(tuple(kept["agents"]), int(kept["port"]), str(kept["bind"]),
                       tuple(kept["hosts"]), int(kept["days"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BrokerConfigError(f"{out / 'credentials.json'} does not say how the fleet "
                                    f"was made ({exc}); make a new one with --out NEW") from None


def _listener_bind(conf: Path) -> str:
    for line in conf.read_text().splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "listener":
            return words[2]
    raise ValueError(f"no `listener PORT ADDRESS` line in {conf}")


def check_agents(agents: Sequence[str]) -> None:
    for agent in agents:
        check_identifier(agent, "agent id")
    if len(set(agents)) != len(agents) or ORCHESTRATOR in agents:
        raise BrokerConfigError(f"agent ids must be distinct and not {ORCHESTRATOR!r}")
    if not agents:
        raise BrokerConfigError("--agents must be at least 1")


def check_empty(out: Path) -> None:
    """``out`` must be new: the files of a fleet hold its keys, never overwritten."""
    if not (out.exists() and any(out.iterdir())):
        return
    if (out / "credentials.json").exists():
        raise BrokerConfigError(f"{out} already holds a fleet: pick a new directory, or add "
                                "--install to install that fleet into the packaged broker")
    raise BrokerConfigError(f"{out} is not empty; pick a new directory (the files there "
                            "may hold a fleet's keys)")


def write_broker_config(out: Path, agents: Sequence[str], port: int = 8883,
                        bind: str = "0.0.0.0", hosts: Sequence[str] = (),
                        days: int = 825, broker_user: str | None = None) -> dict:
    """Write every file into ``out`` (which must not exist yet, or be empty), readable by
    the broker's user where it must be; returns the credentials, as ``credentials.json``
    holds them."""
    check_agents(list(agents))
    settings = FleetSettings(tuple(agents), port, bind, tuple(hosts) or tuple(default_hosts()),
                             days)
    return write_fleet(Path(out), settings, Access.plan(broker_user))


def write_fleet(out: Path, settings: FleetSettings, access: Access, *,
                reach: bool = True) -> dict:
    """Write a new fleet into ``out``. With ``reach``, refuse (before writing) a place the
    broker's user could not reach: the broker will read its files from here."""
    check_agents(settings.agents)
    check_empty(out)
    barrier = access.barrier(out) if reach else None
    if barrier:
        raise BrokerConfigError(barrier)
    from . import certs  # the cryptography package: imported only for this command
    make_dirs(out)
    (out / "data").mkdir()
    ca = certs.make_ca(out, settings.days)
    certs.make_server(out, ca, list(settings.hosts), settings.days)
    identities = [Identity(ORCHESTRATOR, secrets.token_urlsafe(18), out / ORCHESTRATOR)]
    identities += [Identity(a, secrets.token_urlsafe(18), out / "agents" / a)
                   for a in settings.agents]
    for identity in identities:
        certs.make_client(identity.directory, ca, identity.username, settings.days)
        _private(identity.directory / "password", identity.password + "\n")
    _private(out / "passwd", password_file(identities))
    _private(out / "acl", acl_text())
    (out / "mosquitto.conf").write_text(
        mosquitto_conf(out, settings.port, settings.bind, access.broker.name))
    credentials = {"broker_port": settings.port,
                   "orchestrator": identities[0].files(out),
                   "agents": {i.username: i.files(out) for i in identities[1:]},
                   "settings": settings.to_json()}
    _private(out / "credentials.json", json.dumps(credentials, indent=1) + "\n")
    access.apply(out)
    return credentials


def load_credentials(directory: str | Path) -> dict:
    """``credentials.json`` of a ``broker-config`` directory, with a clear error."""
    path = Path(directory) / "credentials.json"
    try:
        data = json.loads(path.read_text())
        base = Path(os.path.abspath(directory))
        for me in [data["orchestrator"], *data["agents"].values()]:
            _ = me["username"]
            me.update({k: _resolve(base, me[k]) for k in ("ca", "cert", "key")})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BrokerConfigError(f"{path} is not the credentials file of `zowarmup "
                                f"broker-config` ({exc})") from None
    return data


def _resolve(base: Path, value: str) -> str:
    """A path of credentials.json, taken from the fleet's directory. A fleet made before
    paths were kept that way holds them relative to where it was made."""
    path = Path(value)
    if path.is_absolute() or (not (base / path).exists() and path.exists()):
        return os.path.abspath(path)
    return str(base / path)


def _private(path: Path, text: str) -> None:
    """Write a secret readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def orchestrator_identity(fleet) -> tuple[str | None, str | None, tuple[str, ...] | None]:
    """(username, password, (ca, cert, key) or None) for the orchestrator's connection,
    from ``fleet.credentials`` when set, else from the single-identity fields."""
    if fleet.credentials:
        me = load_credentials(fleet.credentials)["orchestrator"]
        return me["username"], me["password"], (me["ca"], me["cert"], me["key"])
    tls = ((fleet.tls_ca or None, fleet.tls_cert or None, fleet.tls_key or None)
           if (fleet.tls_ca or fleet.tls_cert) else None)
    return fleet.username or None, fleet.password or None, tls


def agent_identity(fleet, agent_id: str) -> tuple[list[str], dict[str, str]]:
    """The flags and environment (the password stays off the command line) that make a
    local agent connect as itself."""
    if fleet.credentials:
        agents = load_credentials(fleet.credentials)["agents"]
        if agent_id not in agents:
            raise BrokerConfigError(f"{fleet.credentials} holds no credentials for agent "
                                    f"{agent_id!r}; run broker-config with enough --agents")
        me = agents[agent_id]
        return (["--username", me["username"], "--tls-ca", me["ca"], "--tls-cert", me["cert"],
                 "--tls-key", me["key"]], {"ZOWARMUP_PASSWORD": me["password"]})
    args = ["--username", fleet.username] if fleet.username else []
    args += ["--tls-ca", fleet.tls_ca] if fleet.tls_ca else []
    return args, ({"ZOWARMUP_PASSWORD": fleet.password} if fleet.password else {})
