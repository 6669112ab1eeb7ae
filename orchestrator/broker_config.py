"""Everything a Mosquitto needs to run a secure fleet, written by ``zowarmup broker-config``.

A fleet's broker must let in only the fleet, over TLS, and must stop one device from
speaking for another or for the orchestrator. The topic layout makes that a short ACL
(``protocols/topics.py``): an agent publishes only below ``agent/<its user name>/``, and
only the orchestrator publishes rounds, commits and models. So the agent id is the MQTT
user name, and each device gets its own password and client certificate::

    OUT/mosquitto.conf        TLS listener, no anonymous access, password file, ACL
    OUT/passwd                Mosquitto's format: user:$7$<iterations>$<salt>$<PBKDF2-SHA512>
    OUT/acl                   who may publish and read what
    OUT/ca.crt  ca.key        a self-signed CA (keep ca.key to add devices later)
    OUT/server.crt server.key the broker's certificate, for the names given in --host
    OUT/orchestrator/         ca.crt, client.crt, client.key, password: the orchestrator's
    OUT/agents/<id>/          the same for one device: copy this directory to it
    OUT/credentials.json      every user name, password and file, for `fleet.credentials`

Passwords are hashed here (PBKDF2-SHA512, Mosquitto 2.0's ``$7$`` format), so no
``mosquitto_passwd`` is needed; certificates are made with the ``cryptography`` package.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from protocols import topics
from protocols.errors import ZoError
from protocols.validate import check_identifier

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

    def files(self) -> dict[str, str]:
        d = self.directory
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


def mosquitto_conf(out: Path, port: int, bind: str) -> str:
    out = out.resolve()
    return "\n".join([
        "# Mosquitto 2.0 configuration for a zowarmup fleet (written by zowarmup broker-config).",
        "# Run: mosquitto -c mosquitto.conf. The broker's user (often `mosquitto`) must be",
        "# able to read passwd, acl and server.key, and to write data/.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {out / 'passwd'}",
        f"acl_file {out / 'acl'}",
        "set_tcp_nodelay true",
        f"max_packet_size {MAX_PACKET_BYTES}",
        "max_connections -1",
        # Retained models and commits survive a broker restart.
        "persistence true",
        f"persistence_location {out / 'data'}/",
        f"listener {port} {bind}",
        f"cafile {out / 'ca.crt'}",
        f"certfile {out / 'server.crt'}",
        f"keyfile {out / 'server.key'}",
        "require_certificate true",
        "use_identity_as_username false",
        "tls_version tlsv1.2",
        "",
    ])


def default_hosts() -> list[str]:
    """Names the broker's certificate is valid for when --host is not given."""
    return sorted({"localhost", "127.0.0.1", socket.gethostname()})


def write_broker_config(out: Path, agents: Sequence[str], port: int = 8883,
                        bind: str = "0.0.0.0", hosts: Sequence[str] = (),
                        days: int = 825) -> dict:
    """Write every file into ``out`` (which must not exist yet, or be empty); returns the
    credentials, as ``credentials.json`` holds them."""
    agents = list(agents)
    for agent in agents:
        check_identifier(agent, "agent id")
    if len(set(agents)) != len(agents) or ORCHESTRATOR in agents:
        raise BrokerConfigError(f"agent ids must be distinct and not {ORCHESTRATOR!r}")
    if not agents:
        raise BrokerConfigError("--agents must be at least 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BrokerConfigError(f"{out} is not empty; pick a new directory (the files there "
                                "may hold a fleet's keys)")
    from . import certs  # the cryptography package: imported only for this command
    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir()
    ca = certs.make_ca(out, days)
    certs.make_server(out, ca, list(hosts) or default_hosts(), days)
    identities = [Identity(ORCHESTRATOR, secrets.token_urlsafe(18), out / ORCHESTRATOR)]
    identities += [Identity(a, secrets.token_urlsafe(18), out / "agents" / a) for a in agents]
    for identity in identities:
        certs.make_client(identity.directory, ca, identity.username, days)
        _private(identity.directory / "password", identity.password + "\n")
    _private(out / "passwd", password_file(identities))
    (out / "acl").write_text(acl_text())
    (out / "mosquitto.conf").write_text(mosquitto_conf(out, port, bind))
    credentials = {"broker_port": port,
                   "orchestrator": identities[0].files(),
                   "agents": {i.username: i.files() for i in identities[1:]}}
    _private(out / "credentials.json", json.dumps(credentials, indent=1) + "\n")
    return credentials


def load_credentials(directory: str | Path) -> dict:
    """``credentials.json`` of a ``broker-config`` directory, with a clear error."""
    path = Path(directory) / "credentials.json"
    try:
        data = json.loads(path.read_text())
        _ = data["orchestrator"]["username"], data["agents"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BrokerConfigError(f"{path} is not the credentials file of `zowarmup "
                                f"broker-config` ({exc})") from None
    return data


def _private(path: Path, text: str) -> None:
    """Write a secret readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


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
