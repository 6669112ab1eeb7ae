"""Who may read a fleet's broker files: the broker's user for its own, the fleet's owner
for the rest, and no one else.

Mosquitto started as root switches to its own user (``mosquitto`` on Debian and Raspberry
Pi OS) *before* it opens the password file, the ACL, the TLS key and the persistence
directory; files only root may read stop it ("Unable to open pwfile") and every client is
refused. So each file of a fleet has one intended reader and gets the owner and mode for
it:

- the broker's own files (``passwd``, ``acl``, ``server.key``: 0600; ``data/``: 0700)
  belong to the broker's user;
- the fleet's secrets (``ca.key``, ``credentials.json``, ``orchestrator/``, ``agents/``)
  belong to whoever made the fleet (under ``sudo``, the user who ran sudo, so the
  orchestrator can use them without root), directories 0700, keys and passwords 0600;
- certificates and ``mosquitto.conf`` are 0644: nothing secret, and the broker reads them;
- the directory itself lets the broker's user through to its files and no further: group
  the broker's (0750) where the tool may change ownership, else 0711.

Without root the tool cannot give files away; it then says the one command that does.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

from protocols.errors import ZoError

PACKAGED_USER = "mosquitto"  # the user Debian's mosquitto package runs the broker as
BROKER_FILES = ("passwd", "acl", "server.key")  # read by the broker's user only
BROKER_DIRS = ("data",)  # Mosquitto's persistence directory: written by the broker
PUBLIC_SUFFIXES = (".crt", ".conf")  # certificates and the config: world-readable


class BrokerAccessError(ZoError):
    """The broker's user cannot be given its files as asked; nothing was written."""


@dataclass(frozen=True)
class Account:
    """A local user, as much of it as file permissions look at."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]

    def can_enter(self, st: os.stat_result) -> bool:
        """Whether this user may traverse a directory with this status (no ACLs)."""
        if self.uid == 0:
            return True
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid in self.groups:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)

    @property
    def group_name(self) -> str:
        try:
            return grp.getgrgid(self.gid).gr_name
        except KeyError:
            return str(self.gid)


def account(name: str) -> Account:
    """The local user ``name``, or a clear error when there is none."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise BrokerAccessError(
            f"there is no user {name!r} on this machine: give --broker-user the user the "
            f"broker runs as (Debian's mosquitto package makes {PACKAGED_USER!r})") from None
    return Account(name, entry.pw_uid, entry.pw_gid,
                   frozenset(os.getgrouplist(name, entry.pw_gid)))


def account_of(uid: int, gid: int) -> Account:
    """The user with this id (a container's user may have no name: then its number)."""
    try:
        return account(pwd.getpwuid(uid).pw_name)
    except (KeyError, BrokerAccessError):
        return Account(str(uid), uid, gid, frozenset({gid}))


def current_account() -> Account:
    return account_of(os.geteuid(), os.getegid())


def fleet_owner() -> Account:
    """Who the fleet's own secrets belong to: the user who ran ``sudo`` when the tool
    runs under it (so the orchestrator, run as that user, can read them), else the
    current user."""
    uid, gid = os.environ.get("SUDO_UID", ""), os.environ.get("SUDO_GID", "")
    if os.geteuid() == 0 and uid.isdigit() and gid.isdigit():
        return account_of(int(uid), int(gid))
    return current_account()


def broker_account(name: str | None) -> Account:
    """The user the broker will run as: ``name``; else ``mosquitto`` where it exists and
    the tool runs as root (Mosquitto started as root switches to it); else the current
    user (a broker started without root keeps its user)."""
    if name:
        return account(name)
    if os.geteuid() == 0:
        with contextlib.suppress(BrokerAccessError):
            return account(PACKAGED_USER)
    return current_account()


@dataclass(frozen=True)
class Access:
    """The owners and modes one fleet directory gets."""

    broker: Account
    owner: Account
    root: bool  # the tool may change ownership

    @classmethod
    def plan(cls, broker_user: str | None) -> Access:
        return cls(broker_account(broker_user), fleet_owner(), os.geteuid() == 0)

    @property
    def shared(self) -> bool:
        """The broker runs as someone else than the fleet's owner."""
        return self.broker.uid != self.owner.uid

    def top(self) -> tuple[int, int, int]:
        """(uid, gid, mode) of a directory holding broker files: the broker passes
        through (its group, or everyone's execute bit without root), nobody else lists."""
        if not self.shared:
            return self.owner.uid, self.owner.gid, 0o700
        if self.root:
            return self.owner.uid, self.broker.gid, 0o750
        return self.owner.uid, self.owner.gid, 0o711

    def barrier(self, out: Path) -> str | None:
        """Why the broker's user could not reach ``out``'s files, or None. Only the
        directories that exist are looked at; the tool makes the rest passable."""
        if not self.shared:
            return None
        for parent in reversed(Path(os.path.abspath(out)).parents):
            try:
                st = parent.stat()
            except FileNotFoundError:
                return None
            if not self.broker.can_enter(st):
                return (f"the broker's user {self.broker.name} cannot enter {parent} (mode "
                        f"{stat.S_IMODE(st.st_mode):04o}), so it could not read the files in "
                        f"{out}: pick --out in a directory it may pass through (such as "
                        f"/etc/mosquitto or /srv), or install into the packaged broker with "
                        f"--install")
        return None

    def apply(self, out: Path) -> None:
        """Give every file and directory under ``out`` its owner and mode."""
        uid, gid, mode = self.top()
        _place(out, uid, gid, mode, self.root)
        for path in sorted(out.rglob("*")):
            broker = path.relative_to(out).parts[0] in BROKER_FILES + BROKER_DIRS
            who = self.broker if broker else self.owner
            _place(path, who.uid, who.gid, _mode(path, broker), self.root)

    def hint(self, out: Path) -> str | None:
        """The one command that gives the broker its files, where the tool could not."""
        if not self.shared or self.root:
            return None
        paths = " ".join(shlex.quote(str(out / n)) for n in BROKER_FILES + BROKER_DIRS)
        return f"sudo chown -R {self.broker.name}:{self.broker.group_name} {paths}"


def _mode(path: Path, broker: bool) -> int:
    if path.is_dir():
        return 0o700
    if path.suffix in PUBLIC_SUFFIXES and not broker:
        return 0o644
    return 0o600


def _place(path: Path, uid: int, gid: int, mode: int, root: bool) -> None:
    """Set the owner (as root) and the mode of one path; never follows a link."""
    if path.is_symlink():
        return
    if root:
        os.chown(path, uid, gid)
    os.chmod(path, mode)


def unchanged(path: Path, data: bytes, uid: int, gid: int, mode: int, root: bool) -> bool:
    """Whether ``path`` already holds ``data`` with this mode (and, as root, owner)."""
    if not path.is_file() or path.is_symlink() or path.read_bytes() != data:
        return False
    st = path.lstat()
    owner = not root or (st.st_uid, st.st_gid) == (uid, gid)
    return owner and stat.S_IMODE(st.st_mode) == mode


def write_owned(path: Path, data: bytes, uid: int, gid: int, mode: int, root: bool) -> bool:
    """Write ``path`` with this owner and mode unless it already holds exactly that; True
    when it changed. Written beside and renamed, so a broker reloading on SIGHUP never
    reads half a file, and created 0600, so a secret is never readable on the way."""
    if unchanged(path, data, uid, gid, mode, root):
        return False
    tmp = path.with_name(f".{path.name}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _place(tmp, uid, gid, mode, root)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def make_dirs(path: Path) -> None:
    """Make ``path`` and its missing parents. The parents made here get 0755, as
    ``install -d`` gives them, so the broker's user may pass through whatever the umask."""
    missing = [p for p in Path(os.path.abspath(path)).parents if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for parent in missing:
        os.chmod(parent, 0o755)
