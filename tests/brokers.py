"""A real Mosquitto broker for tests: started on a free loopback port, stoppable, restartable.

Each broker gets its own directory with a config file and a log file, so a failing test
can show what the broker saw. Mosquitto is found on PATH or at /usr/sbin/mosquitto
(where the Debian package puts it, often outside a normal user's PATH).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SBIN_MOSQUITTO = "/usr/sbin/mosquitto"
INSTALL_HINT = (
    "Mosquitto is not installed, and the broker tests need a real MQTT broker. "
    "Run `scripts/test`, which installs it (as root: apt-get install mosquitto), "
    "or install the `mosquitto` package yourself. "
    "Set ZOWARMUP_ALLOW_NO_BROKER=1 to skip these tests instead."
)


def find_mosquitto() -> str | None:
    """The path of the mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.path.isfile(SBIN_MOSQUITTO) and os.access(SBIN_MOSQUITTO, os.X_OK):
        return SBIN_MOSQUITTO
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, alive=lambda: True) -> bool:
    """Poll until ``host:port`` accepts a TCP connection; False on timeout or if ``alive()``
    turns False (the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.01)
    return False


class MosquittoBroker:
    """One Mosquitto process with its own config, on ``host:port``.

    ``extra_config`` lines are appended to the config (e.g. ``allow_anonymous false``
    replaces the default, since Mosquitto takes the last value). ``restart()`` brings it
    back on the same port, as a broker that crashed and came back would.
    """

    def __init__(self, workdir: Path, extra_config: list[str] | None = None,
                 binary: str | None = None, host: str = "127.0.0.1") -> None:
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = 0
        self.extra_config = list(extra_config or [])
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "set_tcp_nodelay true",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            # As root, Mosquitto would otherwise switch to the `mosquitto` user, which
            # cannot write the log in a private temporary directory.
            f"user {getpass.getuser()}",
            *self.extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        """Start (on a new free port the first time, the same port afterwards) and return
        once the port accepts connections."""
        if self.running:
            return
        attempts = 3 if self.port == 0 else 1
        for attempt in range(attempts):
            if attempts > 1:
                self.port = free_port(self.host)
            self._write_config()
            self.proc = self._spawn()
            if wait_for_port(self.host, self.port, timeout, alive=lambda: self.proc.poll() is None):
                return
            err = self._reap()
            if attempt == attempts - 1:
                raise RuntimeError(
                    f"Mosquitto did not start on {self.host}:{self.port}: {err.strip()}\n"
                    f"log ({self.log_path}):\n{self.log()}"
                )

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def _reap(self) -> str:
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=10)
        self.proc = None
        return (err or b"").decode(errors="replace")

    def stop(self, timeout: float = 5.0) -> None:
        """A clean shutdown (SIGTERM): clients see their connection closed."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self._reap()

    def kill(self) -> None:
        """An abrupt death (SIGKILL), as in a crash or power loss of the broker host."""
        if self.proc is None:
            return
        self._reap()

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self.start(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MosquittoBroker {self.url} {state}>"


class CommandBroker(MosquittoBroker):
    """Mosquitto started by a command line exactly as given (say, the one a tool printed),
    from ``cwd``, on a configuration this class never writes or changes. Its standard error
    (Mosquitto's log unless the configuration sends it elsewhere) goes to a file, and
    ``logs`` are further files to show when it fails."""

    def __init__(self, argv: list[str], port: int, cwd: Path, workdir: Path,
                 logs: tuple[Path, ...] = ()) -> None:
        super().__init__(workdir)
        self.argv, self.port, self.cwd, self.logs = list(argv), port, Path(cwd), logs
        self.log_path = self.workdir / "stderr.log"

    def _write_config(self) -> None:
        """The configuration is the one the command names, unmodified."""

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as err:
            return subprocess.Popen(self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)

    def log(self) -> str:
        texts = [super().log()]
        texts += [p.read_text(errors="replace") for p in self.logs if p.is_file()]
        return "\n".join(texts)
