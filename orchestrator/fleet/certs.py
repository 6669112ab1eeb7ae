"""A private certificate authority for one fleet: CA, broker and client certificates.

Made with the ``cryptography`` package (an orchestrator extra), so it works the same on
any machine the orchestrator runs on, with no ``openssl`` command. Keys are ECDSA P-256:
small, fast to make (a thousand devices take seconds), and accepted by Mosquitto and
by every TLS stack a device has.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem: bytes


def is_ip(host: str) -> bool:
    """An IP address goes into a certificate as one, a name as a DNS name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zowarmup fleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, key, days: int) -> x509.CertificateBuilder:
    now = utc_now()
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(out: Path, days: int) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("zowarmup fleet CA")
    cert = (_builder(name, name, key, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    (out / "ca.crt").write_bytes(_pem(cert))
    _write_key(out / "ca.key", key)
    return Authority(cert, key, _pem(cert))


def _leaf(ca: Authority, common_name: str, days: int, usage, names) -> tuple:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(_name(common_name), ca.cert.subject, key, days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def make_server(out: Path, ca: Authority, hosts: Sequence[str], days: int) -> None:
    """The broker's certificate, valid for each host name or IP address in ``hosts``."""
    names = [x509.IPAddress(ipaddress.ip_address(h)) if is_ip(h) else x509.DNSName(h)
             for h in hosts]
    cert, key = _leaf(ca, hosts[0], days, ExtendedKeyUsageOID.SERVER_AUTH, names)
    (out / "server.crt").write_bytes(_pem(cert))
    _write_key(out / "server.key", key)


def make_client(directory: Path, ca: Authority, username: str, days: int) -> None:
    """A client certificate (CN = the user name) and the CA, in the directory a device gets."""
    cert, key = _leaf(ca, username, days, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "client.crt").write_bytes(_pem(cert))
    (directory / "ca.crt").write_bytes(ca.pem)
    _write_key(directory / "client.key", key)
