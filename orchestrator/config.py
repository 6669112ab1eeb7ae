"""The run configuration: one TOML file that describes a whole ZOWarmUp run.

A file has up to seven tables, ``[run]``, ``[data]``, ``[model]``, ``[warmup]``, ``[zo]``,
``[eval]`` and ``[fleet]``; every field has a default, so an empty file is a valid (small)
run. :func:`load_config` reads a file, applies ``section.field=value`` overrides (the
``--set`` flag of ``zowarmup run``), checks every field and returns a frozen
:class:`Config`. Anything it cannot use is a :class:`ConfigError` that names the file, the
dotted field, what is wrong and what is allowed, so a typo never silently falls back to a
default. :meth:`Config.to_toml` writes the configuration back as TOML that loads to an
equal :class:`Config`; the run directory keeps that copy.

Relative paths (``run.out``, ``data.path``, ``fleet.tls_ca``) are relative to the current
directory, not to the config file's directory; :func:`load_config` turns them into
absolute paths, so the copy in the run directory works from anywhere.

See ``docs/config.md`` for every field, its default and the paper's value.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from protocols.errors import ZoError
from protocols.messages import MAX_AGENTS_PER_ROUND, MAX_POOL, MAX_SEEDS_PER_AGENT

from .train.data import CIFAR10_URL, assign_resources
from .train.settings import STRATEGIES, TrainerSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

METHODS = ("zowarmup", "high-res-only", "zo-scratch", "zowarmup-hi-fo",
           "fedavg-all", "fedsgd-all",  # first-order ceilings from the pivot (run/ceilings.py)
           "bbpt")  # bbpt: black-box prompt tuning, the [bbpt] table
PIVOTING = ("zowarmup", "zowarmup-hi-fo", "fedavg-all", "fedsgd-all")  # warm-up, then more
ZO_CLIENTS = ("all", "high")
DATASETS = ("digits", "cifar10", "npz", "bbc-news")
PROMPTS = ("continuous", "discrete")
BLACKBOXES = ("remote", "local")
DISTRIBUTIONS = ("rademacher", "gaussian")
ENGINES = ("onnxruntime", "torch")  # zo.engine: what computes a simulated run's clients
ESTIMATORS = ("spsa", "exact")  # zo.estimator: SPSA, or the exact derivative (a ceiling)
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_DEVICE = re.compile(r"auto|cpu|cuda|cuda:[0-9]+")
_SPLIT = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
AUTO = "auto"  # warmup.rounds: the pivot found by the plateau rule (run/pivot.py)
_BROKER_FORMS = '"" for the embedded broker, or mqtt://HOST:PORT or mqtts://HOST:PORT'


class ConfigError(ZoError):
    """A config file, field or override that cannot be used; ``field`` is the dotted name."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RunSection:
    """What the run is called, where it goes and which method it runs."""

    name: str = "zowarmup"
    out: str = "runs/zowarmup"
    seed: int = 0
    method: str = "zowarmup"
    device: str = "auto"
    total_rounds: int = 0  # > 0: the whole budget; the ZO phase gets what the warm-up left


@dataclass(frozen=True)
class DataSection:
    """The data set and how it is split across clients."""

    dataset: str = "digits"
    path: str = ""
    clients: int = 10
    alpha: float = 0.5  # inf = IID
    split: str = "30/70"
    test_fraction: float = 0.2
    validation_fraction: float = 0.0  # of the training data, held out from every client


@dataclass(frozen=True)
class ModelSection:
    """The zoo model trained by the run."""

    name: str = "cnn"
    width: int | None = None  # None = the zoo's default width


@dataclass(frozen=True)
class WarmupSection(TrainerSettings):
    """First-order training on the high-resource clients, up to the pivot round."""

    rounds: int | str = 20  # or "auto": pivot once validation accuracy stops improving
    min_rounds: int = 5  # "auto" never pivots before this round
    max_rounds: int = 100  # nor after it
    patience: int = 3  # evaluations without an improvement of min_delta before it pivots
    min_delta: float = 0.002  # validation accuracy that counts as an improvement
    ceiling_lr: float = 0.0  # the first-order ceilings' client lr after the pivot; 0: client_lr


@dataclass(frozen=True)
class ZoSection:
    """The zeroth-order rounds every client takes part in after the pivot."""

    rounds: int = 30
    directions: int = 1
    direction_pool: int = 1024  # directions a round draws from, whatever its clients; 0: each
    eps: float = 1e-3
    lr: float = 1e-3
    local_steps: int = 1
    local_lr: float = 0.0
    distribution: str = "rademacher"
    scale: float = 1.0
    clients_per_round: int | None = None  # None = every client
    clients: str = "all"  # "high": only the high-resource clients take ZO rounds (a ceiling)
    quorum: float = 1.0
    deadline_s: float = 120.0
    micro_batch: int = 64
    agent_threads: int = 1
    snapshot_every: int = 100
    clip_factor: float = 10.0  # scalar bound = factor x running median |g|; 0 = none
    clip_bound: float = 0.0  # > 0: a fixed bound on every scalar instead
    clip_window: int = 20  # rounds in that running median
    trim: float = 0.0  # trimmed mean: share of each round's scalars dropped at each end
    engine: str = "onnxruntime"  # simulated clients: the agent's engine, or torch (GPU)
    estimator: str = "spsa"  # "exact": grad L . z instead of SPSA (torch engine; a ceiling)


@dataclass(frozen=True)
class EvalSection:
    """How often and in what batches the global model is evaluated on the test split."""

    every: int = 1
    batch_size: int = 512


@dataclass(frozen=True)
class FleetSection:
    """The agents started here, and the MQTT broker everyone talks through."""

    local_agents: int | None = None  # None = one per client, 0 = none
    broker: str = ""  # "" = the embedded broker
    username: str = ""
    password: str = ""
    tls_ca: str = ""
    join_timeout_s: float = 120.0  # the first ZO round's wait for the fleet to join
    max_missed_rounds: int = 2  # rounds in a row an agent may not answer before it is offline
    tls_cert: str = ""  # the orchestrator's client certificate, for brokers that ask for one
    tls_key: str = ""
    credentials: str = ""  # a `zowarmup broker-config` directory: every identity, from there


@dataclass(frozen=True)
class BbptSection:
    """Black-box prompt tuning (``run.method = "bbpt"``): what is tuned, against what."""

    prompt: str = "continuous"  # SPSA on a prompt generator, or policy gradient on tokens
    blackbox: str = "remote"  # devices query `serve-model` over HTTP, or run the frozen graph
    train_clients: int = 0  # the first k clients tune; 0 = all (1: a single device alone)
    shots: int = 0  # training samples a client keeps at most; 0 = all it holds
    pretrain_epochs: int = 15  # the owner's pre-training of the image black box
    tokens: int = 4  # discrete prompt length
    candidates: int = 48  # tokens each prompt position chooses from
    max_tokens: int = 32  # the text the black box reads, prompt included
    budget: int = 0  # API queries per device; 0 = no budget
    rate: float = 200.0  # API queries per second per device


SECTIONS: dict[str, type] = {
    "run": RunSection, "data": DataSection, "model": ModelSection, "warmup": WarmupSection,
    "zo": ZoSection, "eval": EvalSection, "fleet": FleetSection, "bbpt": BbptSection,
}


@dataclass(frozen=True)
class Config:
    """A whole run, section by section; sections absent from the file hold their defaults."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    warmup: WarmupSection = field(default_factory=WarmupSection)
    zo: ZoSection = field(default_factory=ZoSection)
    eval: EvalSection = field(default_factory=EvalSection)
    fleet: FleetSection = field(default_factory=FleetSection)
    bbpt: BbptSection = field(default_factory=BbptSection)

    def to_dict(self) -> dict:
        """A plain nested dict of every field; fields that are None are left out."""
        return {name: {f.name: getattr(getattr(self, name), f.name)
                       for f in fields(SECTIONS[name])
                       if getattr(getattr(self, name), f.name) is not None}
                for name in SECTIONS}

    def to_toml(self) -> str:
        """The configuration as TOML that :func:`parse_config` reads back to an equal one."""
        lines = ["# zowarmup run configuration"]
        for name, values in self.to_dict().items():
            lines += ["", f"[{name}]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- TOML writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)  # shortest text that reads back to the same float
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(value, str):
        return _toml_string(value)
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


# ---------------------------------------------------------------------------- field rules


@dataclass(frozen=True)
class _Rule:
    """How one field is read: its kind, whether None is allowed, and its constraint.

    ``check`` says whether an already type-checked value is allowed; ``allowed`` says
    the same in words, for error messages. ``words`` are strings that stand for a value
    (``"iid"`` for an infinite alpha).
    """

    kind: type  # str, int or float
    allowed: str
    check: Callable[[Any], bool] = lambda _: True
    optional: bool = False
    finite: bool = True
    words: Mapping[str, Any] = field(default_factory=dict)


def _ints(lo: int, hi: int | None = None, optional: bool = False, extra: str = "") -> _Rule:
    allowed = (f"an integer from {lo} to {hi}" if hi is not None
               else f"an integer >= {lo}") + extra
    return _Rule(int, allowed, lambda v: v >= lo and (hi is None or v <= hi), optional)


def _floats(lo: float, hi: float | None = None, lo_open: bool = True, hi_open: bool = False,
            optional: bool = False, extra: str = "") -> _Rule:
    low = f"{'>' if lo_open else '>='} {lo:g}"
    if hi is None:
        allowed = f"a finite number {low}"
    else:
        allowed = f"a number {low} and {'<' if hi_open else '<='} {hi:g}"

    def check(v: float) -> bool:
        above = v > lo if lo_open else v >= lo
        below = hi is None or (v < hi if hi_open else v <= hi)
        return above and below

    return _Rule(float, allowed + extra, check, optional)


def _choice(options: Sequence[str]) -> _Rule:
    return _Rule(str, "one of " + ", ".join(f'"{o}"' for o in options), lambda v: v in options)


def _text(allowed: str = "a string", check: Callable[[str], bool] = lambda _: True) -> _Rule:
    return _Rule(str, allowed, check)


RULES: dict[str, dict[str, _Rule]] = {
    "run": {
        "name": _text("1 to 64 letters, digits, '_' or '-', starting with a letter or digit",
                      lambda v: _RUN_NAME.fullmatch(v) is not None),
        "out": _text("a non-empty directory path", lambda v: v.strip() != ""),
        "seed": _ints(0),
        "method": _choice(METHODS),
        "device": _text('"auto", "cpu", "cuda" or "cuda:N"',
                        lambda v: _DEVICE.fullmatch(v) is not None),
        "total_rounds": _ints(0, extra=" (0 = warmup.rounds then zo.rounds)"),
    },
    "data": {
        "dataset": _choice(DATASETS),
        "path": _text(),
        "clients": _ints(1, MAX_AGENTS_PER_ROUND),
        "alpha": _Rule(float, 'a number > 0, or inf or "iid" for an IID split',
                       lambda v: v > 0, finite=False, words={"iid": math.inf}),
        "split": _text('"HIGH/LOW": two whole percentages summing to 100, e.g. "30/70"',
                       lambda v: _split_or_none(v) is not None),
        "test_fraction": _floats(0.0, 1.0, hi_open=True),
        "validation_fraction": _floats(0.0, 1.0, lo_open=False, hi_open=True),
    },
    "model": {
        "name": _text(),  # checked against the zoo in _check_model
        "width": _ints(1, optional=True, extra=" (leave it out for the zoo's default)"),
    },
    "warmup": {
        "rounds": _Rule(int, 'an integer >= 0, or "auto" to pivot on a validation plateau',
                        lambda v: v >= 0, words={"auto": AUTO}),
        "min_rounds": _ints(1),
        "max_rounds": _ints(1),
        "patience": _ints(1),
        "min_delta": _floats(0.0, 1.0, lo_open=False),
        "ceiling_lr": _floats(0.0, lo_open=False, extra=" (0 = warmup.client_lr)"),
        "strategy": _choice(STRATEGIES),
        "client_lr": _floats(0.0),
        "client_momentum": _floats(0.0, 1.0, lo_open=False, hi_open=True),
        "weight_decay": _floats(0.0, lo_open=False),
        "local_epochs": _ints(1),
        "batch_size": _ints(1),
        "server_lr": _floats(0.0, optional=True,
                             extra=" (leave it out for 1.0 with fedavg, 0.01 with fedadam)"),
        "beta1": _floats(0.0, 1.0, lo_open=False, hi_open=True),
        "beta2": _floats(0.0, 1.0, lo_open=False, hi_open=True),
        "tau": _floats(0.0),
        "clients_per_round": _ints(1, optional=True,
                                   extra=" (leave it out for every high-resource client)"),
    },
    "zo": {
        "rounds": _ints(0),
        "directions": _ints(1, MAX_SEEDS_PER_AGENT),
        "direction_pool": _ints(0, MAX_POOL, extra=" (0 = distinct seeds for every client)"),
        "eps": _floats(0.0, 1e3),
        "lr": _floats(0.0),
        "local_steps": _ints(1, 10_000),
        "local_lr": _floats(0.0, 1e6, lo_open=False, extra=" (0 = use zo.lr)"),
        "distribution": _choice(DISTRIBUTIONS),
        "scale": _floats(0.0, 1e3),
        "clients_per_round": _ints(1, optional=True, extra=" (leave it out for every client)"),
        "clients": _choice(ZO_CLIENTS),
        "quorum": _floats(0.0, 1.0),
        "deadline_s": _floats(1e-3, 7 * 86400.0, lo_open=False),
        "micro_batch": _ints(1),
        "agent_threads": _ints(1),
        "snapshot_every": _ints(1),
        "clip_factor": _floats(0.0, 1e6, lo_open=False, extra=" (0 = no derived bound)"),
        "clip_bound": _floats(0.0, 1e12, lo_open=False,
                              extra=" (0 = derived: clip_factor x running median |g|)"),
        "clip_window": _ints(1, 10_000),
        "trim": _floats(0.0, 0.5, lo_open=False, hi_open=True),
        "engine": _choice(ENGINES),
        "estimator": _choice(ESTIMATORS),
    },
    "eval": {
        "every": _ints(1),
        "batch_size": _ints(1),
    },
    "fleet": {
        "local_agents": _ints(0, optional=True,
                              extra=" (0 = no local agent; leave it out for one per client)"),
        "broker": _text(_BROKER_FORMS),  # checked in _check_fleet, which says what is wrong
        "username": _text(),
        "password": _text(),
        "tls_ca": _text("the path of a CA certificate file, or \"\""),
        "tls_cert": _text("the path of a client certificate file, or \"\""),
        "tls_key": _text("the path of the client certificate's key file, or \"\""),
        "credentials": _text("the directory `zowarmup broker-config` wrote, or \"\""),
        "join_timeout_s": _floats(0.0),
        "max_missed_rounds": _ints(1, 1000),
    },
    "bbpt": {
        "prompt": _choice(PROMPTS),
        "blackbox": _choice(BLACKBOXES),
        "train_clients": _ints(0, MAX_AGENTS_PER_ROUND, extra=" (0 = every client)"),
        "shots": _ints(0, extra=" (0 = all of a client's samples)"),
        "pretrain_epochs": _ints(1, 1000),
        "tokens": _ints(1, 64),
        "candidates": _ints(2, 4096),
        "max_tokens": _ints(8, 512),
        "budget": _ints(0, extra=" (0 = no budget)"),
        "rate": _floats(0.0, 1e6),
    },
}


def _split_or_none(text: str) -> tuple[int, int] | None:
    match = _SPLIT.fullmatch(text)
    if not match:
        return None
    high, low = int(match.group(1)), int(match.group(2))
    return (high, low) if high + low == 100 else None


def _broker_problem(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        return f"the scheme must be mqtt:// or mqtts://, not {parts.scheme or 'none'!r}"
    try:
        port = parts.port
    except ValueError:
        return "the port is not a number in 1..65535"
    if not parts.hostname:
        return "it has no host"
    if port == 0:
        return "port 0 is not a broker's port"
    if parts.username or parts.password:
        return "credentials belong in fleet.username and fleet.password, not in the URL"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "only scheme://host:port is understood"
    return None


# ---------------------------------------------------------------------------- reading


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML run configuration, apply ``section.field=value`` overrides, check it.

    Relative ``run.out``, ``data.path`` and ``fleet.tls_ca`` are taken relative to the
    current directory and returned as absolute paths.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; a config is TOML text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = parse_config(data, str(path), overrides)
    return replace(
        config,
        run=replace(config.run, out=_absolute(config.run.out)),
        data=replace(config.data, path=_absolute(config.data.path)),
        fleet=replace(config.fleet, **{k: _absolute(getattr(config.fleet, k))
                                       for k in ("tls_ca", "tls_cert", "tls_key",
                                                 "credentials")}),
    )


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute()) if path else path


def parse_config(data: Mapping[str, Any], where: str = "config",
                 overrides: Sequence[str] = ()) -> Config:
    """Check ``data`` (a parsed TOML document) with ``overrides`` applied; return the Config.

    ``where`` names the source in error messages (the file's path).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: a config must be a table of sections, "
                          f"got {type(data).__name__}")
    merged = {}
    for name, section in data.items():
        _check_section_name(name, where)
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where}: [{name}] must be a table of fields, got "
                              f"{_describe(section)}; write it as a [{name}] header with "
                              "`field = value` lines under it", name)
        merged[name] = dict(section)
    origins: dict[str, str] = {}
    for text in overrides:
        section, key, value = _parse_override(text, where)
        merged.setdefault(section, {})[key] = _override_value(value, RULES[section][key])
        origins[f"{section}.{key}"] = text
    sections = {}
    for name, cls in SECTIONS.items():
        values = merged.get(name, {})
        for key in values:
            _check_field_name(name, key, where)
        read = {}
        for key, value in values.items():
            dotted = f"{name}.{key}"
            src = f"{where}: {dotted}" + (f" (from the override {origins[dotted]!r})"
                                          if dotted in origins else "")
            read[key] = _read_value(value, RULES[name][key], src, dotted)
        sections[name] = cls(**read)
    config = Config(**sections)
    _cross_checks(config, where)
    return config


def _check_section_name(name: str, where: str) -> None:
    if name not in SECTIONS:
        raise ConfigError(f"{where}: unknown section [{name}]{_did_you_mean(name, SECTIONS)}; "
                          f"valid sections: {', '.join(SECTIONS)}", str(name))


def _check_field_name(section: str, key: str, where: str) -> None:
    if key not in RULES[section]:
        valid = RULES[section]
        raise ConfigError(f"{where}: unknown field {section}.{key}{_did_you_mean(key, valid)}; "
                          f"valid fields of [{section}]: {', '.join(valid)}",
                          f"{section}.{key}")


def _did_you_mean(name: object, valid: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)
    try:
        return f"{kind} ({_toml_value(value)})"
    except TypeError:
        return kind


def _kind_name(rule: _Rule) -> str:
    return {str: "a string", int: "an integer", float: "a number"}[rule.kind]


def _read_value(value: Any, rule: _Rule, src: str, dotted: str) -> Any:
    """Type-check and convert one value; ``src`` starts every message."""
    if rule.optional and isinstance(value, str) and value.strip().lower() == "none":
        return None
    if isinstance(value, str) and value.strip().lower() in rule.words:
        return rule.words[value.strip().lower()]
    if rule.kind is str:
        ok = isinstance(value, str)
    elif rule.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        none = " (or \"none\")" if rule.optional else ""
        raise ConfigError(f"{src} must be {_kind_name(rule)}{none}, got {_describe(value)}; "
                          f"allowed: {rule.allowed}", dotted)
    if rule.kind is float:
        value = float(value)
        if math.isnan(value) or (rule.finite and math.isinf(value)):
            raise ConfigError(f"{src} = {value} is not a finite number; allowed: "
                              f"{rule.allowed}", dotted)
    if not rule.check(value):
        problem = "is not allowed" if rule.kind is str else "is out of range"
        raise ConfigError(f"{src} = {_toml_value(value)} {problem}; allowed: {rule.allowed}",
                          dotted)
    return value


# ---------------------------------------------------------------------------- overrides


def _parse_override(text: str, where: str) -> tuple[str, str, str]:
    form = ("an override has the form SECTION.FIELD=VALUE, e.g. zo.rounds=50, data.alpha=0.1 "
            "or fleet.broker=mqtt://host:1883")
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"{where}: override {text!r} has no '='; {form}")
    key, value = text.split("=", 1)
    pieces = key.strip().split(".")
    if len(pieces) != 2 or not all(_BARE_KEY.fullmatch(p) for p in pieces):
        raise ConfigError(f"{where}: override {text!r}: {key.strip()!r} is not SECTION.FIELD; "
                          f"{form}")
    section, name = pieces
    _check_section_name(section, f"{where}: override {text!r}")
    _check_field_name(section, name, f"{where}: override {text!r}")
    return section, name, value.strip()


def _override_value(text: str, rule: _Rule) -> Any:
    """A TOML value if ``text`` is one, else the bare text.

    String fields take the text as it is unless it is a quoted TOML string, so
    ``run.name=2024`` or ``run.out=/tmp/x`` mean the strings they look like.
    """
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if rule.kind is str and not isinstance(value, str):
        return text
    return value


# ---------------------------------------------------------------------------- cross checks


def _cross_checks(config: Config, where: str) -> None:
    run, data, fleet = config.run, config.data, config.fleet
    high = _split_or_none(data.split)[0]  # the field rule has checked the form
    if high == 0 and run.method != "zo-scratch":
        need = ("high-res-only trains only the high-resource clients, so it needs some"
                if run.method == "high-res-only"
                else "the warm-up needs at least one high-resource client")
        split, method = _toml_string(data.split), _toml_string(run.method)
        raise ConfigError(f"{where}: data.split = {split} has no high-resource clients, but "
                          f"run.method = {method}: {need}; give "
                          "data.split a HIGH above 0, or use run.method = \"zo-scratch\"",
                          "data.split")
    _check_data_path(data, where)
    _check_model(config.model, where)
    _check_pivot(config, where)
    _check_zo_clients(config, where)
    high_count = _high_resource_count(data.clients, high)
    wanted = config.warmup.clients_per_round
    if run.method != "zo-scratch" and wanted is not None and wanted > high_count:
        raise ConfigError(f"{where}: warmup.clients_per_round = {wanted} exceeds the "
                          f"{high_count} high-resource client(s) that {data.clients} clients "
                          f"at split {data.split} give; allowed: 1 to {high_count}",
                          "warmup.clients_per_round")
    zo = config.zo
    if zo.clients_per_round is not None and zo.clients_per_round > data.clients:
        raise ConfigError(f"{where}: zo.clients_per_round = {zo.clients_per_round} exceeds "
                          f"data.clients = {data.clients}; allowed: 1 to {data.clients}",
                          "zo.clients_per_round")
    if zo.directions * zo.local_steps > MAX_SEEDS_PER_AGENT:
        raise ConfigError(f"{where}: zo.directions x zo.local_steps = "
                          f"{zo.directions * zo.local_steps} seeds per client and round; "
                          f"allowed: at most {MAX_SEEDS_PER_AGENT}", "zo.directions")
    if 0 < zo.direction_pool < zo.directions * zo.local_steps:
        raise ConfigError(f"{where}: zo.direction_pool = {zo.direction_pool} cannot give each "
                          f"client its {zo.directions * zo.local_steps} distinct seeds "
                          "(zo.directions x zo.local_steps); allowed: 0 or at least that",
                          "zo.direction_pool")
    if fleet.local_agents is not None and fleet.local_agents > data.clients:
        raise ConfigError(f"{where}: fleet.local_agents = {fleet.local_agents} exceeds "
                          f"data.clients = {data.clients}; allowed: 0 to {data.clients} "
                          "(leave it out for one per client)", "fleet.local_agents")
    _check_fleet(fleet, where)
    _check_bbpt(config, where)
    if zo.estimator == "exact" and (zo.engine != "torch" or zo.local_steps != 1):
        raise ConfigError(f"{where}: zo.estimator = \"exact\" (the exact directional "
                          "derivative, a ceiling for SPSA) is measured by the torch engine for "
                          "one local step: set zo.engine = \"torch\" and zo.local_steps = 1",
                          "zo.estimator")
    if zo.engine == "torch" and run.method == "bbpt":
        raise ConfigError(f"{where}: zo.engine = \"torch\" runs the zoo model's clients; "
                          "prompt tuning (run.method = \"bbpt\") queries a black box, so its "
                          "clients run the agent's engine: leave zo.engine out",
                          "zo.engine")


def _check_zo_clients(config: Config, where: str) -> None:
    if config.zo.clients == "high" and config.run.method != "zowarmup":
        raise ConfigError(f"{where}: zo.clients = \"high\" (ZO over the high-resource clients "
                          f"only) is a variant of run.method = \"zowarmup\", not of "
                          f"{_toml_string(config.run.method)}", "zo.clients")


def _check_pivot(config: Config, where: str) -> None:
    """The automatic pivot decides on a validation split, never on the test split; a total
    budget must leave the ZO phase at least one round after the latest possible pivot."""
    w, run = config.warmup, config.run
    if w.rounds == AUTO and config.data.validation_fraction == 0:
        raise ConfigError(f"{where}: warmup.rounds = \"auto\" pivots on validation accuracy, "
                          "and there is no validation split; set data.validation_fraction "
                          "(e.g. 0.1)", "warmup.rounds")
    if w.min_rounds > w.max_rounds:
        raise ConfigError(f"{where}: warmup.min_rounds = {w.min_rounds} exceeds "
                          f"warmup.max_rounds = {w.max_rounds}", "warmup.min_rounds")
    latest = w.max_rounds if w.rounds == AUTO else w.rounds
    if run.total_rounds and run.method in PIVOTING \
            and run.total_rounds <= latest:
        raise ConfigError(f"{where}: run.total_rounds = {run.total_rounds} leaves no ZO round "
                          f"after a pivot at round {latest}; allowed: more than {latest}",
                          "run.total_rounds")


def _check_bbpt(config: Config, where: str) -> None:
    """Prompt tuning fits its tasks: images with continuous prompts, text with discrete ones."""
    b, dataset = config.bbpt, config.data.dataset
    if config.run.method != "bbpt":
        if dataset == "bbc-news":
            raise ConfigError(f"{where}: data.dataset = \"bbc-news\" is a text set for "
                              "black-box prompt tuning; use run.method = \"bbpt\"",
                              "data.dataset")
        return
    want = {"digits": "continuous", "bbc-news": "discrete"}.get(dataset)
    if want != b.prompt:
        raise ConfigError(f"{where}: bbpt.prompt = {_toml_string(b.prompt)} with data.dataset "
                          f"= {_toml_string(dataset)}; prompt tuning runs continuous prompts "
                          "on \"digits\" and discrete prompts on \"bbc-news\"", "bbpt.prompt")
    if b.train_clients > config.data.clients:
        raise ConfigError(f"{where}: bbpt.train_clients = {b.train_clients} exceeds "
                          f"data.clients = {config.data.clients}", "bbpt.train_clients")
    if b.prompt == "discrete":
        if config.zo.local_steps != 1 or config.zo.directions < 2:
            raise ConfigError(f"{where}: discrete prompts take one policy step per round from "
                              "2 or more draws: zo.local_steps = 1 and zo.directions >= 2",
                              "zo.directions")
        if b.tokens + 2 > b.max_tokens:
            raise ConfigError(f"{where}: bbpt.tokens = {b.tokens} leaves no text in "
                              f"bbpt.max_tokens = {b.max_tokens}", "bbpt.tokens")


def _high_resource_count(clients: int, high_percent: int) -> int:
    """How many clients the split marks high-resource (as the data partition assigns them)."""
    return int(assign_resources(clients, high_percent / 100.0, 0).sum())


def _check_data_path(data: DataSection, where: str) -> None:
    if data.dataset in ("digits", "bbc-news"):
        return  # built in or shipped by a package; data.path is not used
    hint = (f"; CIFAR-10 is the python-format archive cifar-10-python.tar.gz (or its "
            f"extracted cifar-10-batches-py directory), from {CIFAR10_URL}"
            if data.dataset == "cifar10"
            else "; an npz file holds x (N, C, H, W) and y (N,) arrays")
    if not data.path:
        raise ConfigError(f"{where}: data.path is required for data.dataset = "
                          f"{_toml_string(data.dataset)}{hint}", "data.path")
    path, shown = Path(data.path).expanduser(), _toml_string(data.path)
    if not path.exists():
        raise ConfigError(f"{where}: data.path = {shown} does not exist (relative paths are "
                          f"taken from the current directory, {Path.cwd()}){hint}", "data.path")
    if data.dataset == "npz" and not path.is_file():
        raise ConfigError(f"{where}: data.path = {shown} is not a file{hint}", "data.path")


def _check_model(model: ModelSection, where: str) -> None:
    try:
        from .train.zoo import model_names  # torch: loaded only to check a config
    except ImportError as exc:
        raise ConfigError(f"{where}: model.name cannot be checked: the model zoo needs the "
                          f"orchestrator extras (pip install 'zowarmup[orchestrator]'): {exc}",
                          "model.name") from None
    names = model_names()
    if model.name not in names:
        raise ConfigError(f"{where}: model.name = {_toml_string(model.name)} is not in the "
                          f"model zoo{_did_you_mean(model.name, dict.fromkeys(names))}; allowed: "
                          f"{', '.join(names)}", "model.name")


def _check_fleet(fleet: FleetSection, where: str) -> None:
    if fleet.broker:
        problem = _broker_problem(fleet.broker)
        if problem:
            raise ConfigError(f"{where}: fleet.broker = {_toml_string(fleet.broker)}: {problem}; "
                              f"allowed: {_BROKER_FORMS}", "fleet.broker")
    else:
        for name in ("username", "password", "tls_ca", "tls_cert", "tls_key", "credentials"):
            if getattr(fleet, name):
                raise ConfigError(f"{where}: fleet.{name} is set but fleet.broker is empty: "
                                  "the embedded broker is anonymous and plain; set "
                                  "fleet.broker to mqtt://HOST:PORT or mqtts://HOST:PORT of "
                                  f"your own broker, or leave fleet.{name} out", f"fleet.{name}")
    if fleet.password and not fleet.username:
        raise ConfigError(f"{where}: fleet.password is set without fleet.username; MQTT "
                          "sends a password only with a user name", "fleet.password")
    for name in ("tls_ca", "tls_cert", "tls_key", "credentials"):
        value = getattr(fleet, name)
        if not value:
            continue
        if not fleet.broker.startswith("mqtts://"):
            raise ConfigError(f"{where}: fleet.{name} is set but fleet.broker = "
                              f"{_toml_string(fleet.broker)} is not TLS; use mqtts://HOST:PORT",
                              f"fleet.{name}")
        exists = Path(value).expanduser().is_dir() if name == "credentials" else \
            Path(value).expanduser().is_file()
        if not exists:
            kind = "a directory" if name == "credentials" else "a file"
            raise ConfigError(f"{where}: fleet.{name} = {_toml_string(value)} is not {kind} "
                              "(relative paths are taken from the current directory)",
                              f"fleet.{name}")
    _check_fleet_identity(fleet, where)


def _check_fleet_identity(fleet: FleetSection, where: str) -> None:
    """A client certificate comes with its key; credentials replace the single identity."""
    if bool(fleet.tls_cert) != bool(fleet.tls_key):
        raise ConfigError(f"{where}: fleet.tls_cert and fleet.tls_key go together (a client "
                          "certificate and its key); set both or neither", "fleet.tls_cert")
    if fleet.credentials:
        clash = [n for n in ("username", "password", "tls_ca", "tls_cert", "tls_key")
                 if getattr(fleet, n)]
        if clash:
            raise ConfigError(f"{where}: fleet.credentials gives every identity (the "
                              f"orchestrator's and each agent's); leave out fleet.{clash[0]}",
                              f"fleet.{clash[0]}")
        if not (Path(fleet.credentials).expanduser() / "credentials.json").is_file():
            raise ConfigError(f"{where}: fleet.credentials = {_toml_string(fleet.credentials)} "
                              "holds no credentials.json; give the directory that `zowarmup "
                              "broker-config` wrote", "fleet.credentials")
