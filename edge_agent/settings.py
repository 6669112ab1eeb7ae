"""The agent's settings from three places: flags, the environment, a TOML file.

A board runs the agent from its service manager with a file kept under configuration
management (``/etc/zowarmup/agent.toml``); a person at a shell overrides one setting with
a flag or an environment variable. The order is flag > environment > file > default.
Every value passes the same checks wherever it came from, and an error names where the
bad value came from, so a typo on a board is found at start, not hours into a run.

The broker password never has to be on a command line (where ``ps`` shows it): it comes
from a file of its own (``password_file``, ``--password-file``, ZOWARMUP_PASSWORD_FILE),
or from ZOWARMUP_PASSWORD. The TOML file takes no password itself: it is the file people
paste into tickets.
"""

from __future__ import annotations

import difflib
import math
import os
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from protocols.errors import ZoError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (Jetson's Ubuntu 22.04)
    import tomli as tomllib

STRATEGIES = ("auto", "native", "inputs", "constants")
PROTOCOLS = ("3.1.1", "5")
MAX_CONFIG_BYTES = 64 * 1024
MAX_SECRET_BYTES = 4096
CONFIG_ENV = "ZOWARMUP_AGENT_CONFIG"
PASSWORD_ENV = "ZOWARMUP_PASSWORD"
PASSWORD_FILE_ENV = "ZOWARMUP_PASSWORD_FILE"
DEFAULT_STATE_DIR = "zowarmup-agent-state"


class ConfigError(ZoError):
    """A setting that cannot be used; the message names its source and what is wrong."""


@dataclass(frozen=True)
class Setting:
    """One setting: its key in the file (the flag is ``--key`` with dashes), its
    environment variable, its kind and bounds, and its built-in default."""

    key: str
    kind: str  # text | url | file | dir | int | float | choice
    default: object = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return "ZOWARMUP_AGENT_ID" if self.key == "id" else f"ZOWARMUP_{self.key.upper()}"

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


SETTINGS: dict[str, Setting] = {s.key: s for s in (
    Setting("broker", "url"),
    Setting("data", "file"),
    Setting("id", "text"),
    Setting("run", "text", default="default"),
    Setting("state_dir", "dir"),
    Setting("username", "text"),
    Setting("password_file", "file"),
    Setting("tls_ca", "file"),
    Setting("tls_cert", "file"),
    Setting("tls_key", "file"),
    Setting("mqtt", "choice", default="3.1.1", choices=PROTOCOLS),
    Setting("micro_batch", "int", low=1, high=1 << 20),
    Setting("memory_budget", "float", low=16),
    Setting("threads", "int", low=1, high=1024),
    Setting("strategy", "choice", default="auto", choices=STRATEGIES),
)}
ENGINE_KEYS = ("micro_batch", "memory_budget", "threads", "strategy")


@dataclass
class Resolved:
    """The settings one command uses, where each came from, and warnings for the user."""

    values: dict[str, object]
    sources: dict[str, str]
    config: Path | None = None
    file_values: dict[str, object] = field(default_factory=dict)
    password: str | None = None
    password_source: str = "none"
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> object:
        return self.values[key]


# --- reading each source -------------------------------------------------------------------


def load_file(path: Path) -> dict[str, object]:
    """The settings of a TOML file, checked: unknown keys and wrong types are errors, and
    relative paths are taken from the file's directory."""
    path = Path(path).absolute()
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not an agent "
                              "configuration file")
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    values = {}
    for key, value in data.items():
        where = f"{path}: {key}"
        if key not in SETTINGS:
            raise ConfigError(_unknown_key(where, key))
        values[key] = _check(SETTINGS[key], _typed(SETTINGS[key], value, where), where,
                             path.parent)
    return values


def _unknown_key(where: str, key: str) -> str:
    if key == "password":
        return (f"{where}: a password does not go in the configuration file; put it in a "
                "file of its own (mode 0600) and name that with password_file")
    close = difflib.get_close_matches(key, SETTINGS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{where}: unknown setting; {hint}known: {', '.join(SETTINGS)}"


def _typed(setting: Setting, value: object, where: str) -> object:
    """A TOML value of the setting's type: strings for text and paths, integers for
    counts (not booleans, not 4.0), numbers for the memory budget."""
    if setting.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif setting.kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        want = "a number"
    else:
        ok = isinstance(value, str)
        want = "a string (in quotes)"
    if not ok:
        raise ConfigError(f"{where} must be {want}, not {_toml_type(value)} ({value!r})")
    return float(value) if setting.kind == "float" else value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    return next((n for t, n in names.items() if isinstance(value, t)), type(value).__name__)


def from_env(setting: Setting, text: str) -> object:
    """An environment variable's text as the setting's value, checked."""
    where = setting.env
    if setting.kind == "int":
        try:
            value: object = int(text.strip())
        except ValueError:
            raise ConfigError(f"{where}={text!r} is not an integer") from None
    elif setting.kind == "float":
        try:
            value = float(text.strip())
        except ValueError:
            raise ConfigError(f"{where}={text!r} is not a number") from None
    else:
        value = text
    return _check(setting, value, where, Path.cwd())


def _check(setting: Setting, value: object, where: str, base: Path) -> object:
    """Bounds, choices, URLs and paths: the same checks for every source."""
    kind = setting.kind
    if kind in ("int", "float"):
        if setting.low is not None and value < setting.low or \
                setting.high is not None and value > setting.high:
            top = f"..{_number(setting.high)}" if setting.high is not None else " or more"
            raise ConfigError(f"{where} is {_number(value)}; it must be "
                              f"{_number(setting.low)}{top}")
        if kind == "float" and not math.isfinite(value):  # NaN passes both comparisons
            raise ConfigError(f"{where} is {value}, not a finite number")
        return value
    if not value.strip():
        raise ConfigError(f"{where} is empty")
    if kind == "choice" and value not in setting.choices:
        raise ConfigError(f"{where} is {value!r}; it must be one of "
                          f"{', '.join(repr(c) for c in setting.choices)}")
    if kind == "url":
        from .mqtt import parse_broker_url
        try:
            parse_broker_url(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if kind in ("file", "dir"):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if kind == "file" and not path.is_file():
            raise ConfigError(f"{where}: {path} does not exist or is not a file")
        if kind == "dir" and path.exists() and not path.is_dir():
            raise ConfigError(f"{where}: {path} exists and is not a directory")
        return path
    return value


# --- precedence --------------------------------------------------------------------------


def resolve(keys: Iterable[str], flags: Mapping[str, object], config: Path | None,
            environ: Mapping[str, str] | None = None) -> Resolved:
    """Each setting from the first place that gives it: flag, environment, file, default.

    ``flags`` holds what the command line gave (None: not given), already checked by the
    command-line parser; ``config`` is the TOML file, if any. The whole file is checked
    even where a flag wins over one of its settings: a bad file fails now, not on the day
    the flag is dropped.
    """
    environ = os.environ if environ is None else environ
    config = config or (Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None)
    config = Path(config).absolute() if config is not None else None
    from_file = load_file(config) if config is not None else {}
    resolved = Resolved({}, {}, config, from_file)
    for key in keys:
        setting = SETTINGS[key]
        if flags.get(key) is not None:
            value, source = flags[key], setting.flag
        elif environ.get(setting.env, "") != "":
            value, source = from_env(setting, environ[setting.env]), setting.env
        elif key in from_file:
            value, source = from_file[key], str(config)
        else:
            value, source = _default(setting, environ), "default"
        resolved.values[key], resolved.sources[key] = value, source
    return resolved


def _default(setting: Setting, environ: Mapping[str, str]) -> object:
    if setting.key == "state_dir":  # systemd's StateDirectory= names it for the service
        given = environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(given or DEFAULT_STATE_DIR)
    return setting.default


def resolve_password(resolved: Resolved, flag_password: str | None,
                     flag_file: Path | None, environ: Mapping[str, str] | None = None) -> None:
    """The broker password, from the highest place that gives one in either form (the
    password itself, or a file holding it); both forms at one place is an error."""
    environ = os.environ if environ is None else environ
    env_file = environ.get(PASSWORD_FILE_ENV) or None
    in_file = resolved.file_values.get("password_file")
    places = [
        ("--password", flag_password, "--password-file", flag_file),
        (PASSWORD_ENV, environ.get(PASSWORD_ENV) or None, PASSWORD_FILE_ENV,
         from_env(SETTINGS["password_file"], env_file) if env_file else None),
        (None, None, f"{resolved.config}: password_file", in_file),
    ]
    for plain_name, plain, file_name, path in places:
        if plain is not None and path is not None:
            raise ConfigError(f"give {plain_name} or {file_name}, not both")
        if plain is not None:
            resolved.password, resolved.password_source = plain, plain_name
            return
        if path is not None:
            resolved.password = read_secret(Path(path), file_name, resolved.warnings)
            resolved.password_source = f"{file_name} {path}"
            return


def read_secret(path: Path, where: str, warnings: list[str]) -> str:
    """The secret a file holds (one trailing newline dropped); a warning when other users
    may read it."""
    try:
        info = path.stat()
        if info.st_size > MAX_SECRET_BYTES:
            raise ConfigError(f"{where}: {path} is larger than {MAX_SECRET_BYTES} bytes; "
                              "it should hold the password only")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc}") from None
    secret = text[:-1] if text.endswith("\n") else text
    secret = secret[:-1] if secret.endswith("\r") else secret
    if not secret or "\n" in secret:
        raise ConfigError(f"{where}: {path} must hold the password on one line"
                          f"{'' if secret else ', and it is empty'}")
    if info.st_mode & stat.S_IROTH:
        warnings.append(f"{path} (the broker password) is readable by every user; "
                        f"chmod 600 {path}, or 640 with the agent's group")
    return secret
