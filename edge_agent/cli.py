"""``zowarmup-agent``: the device-side command. It never imports torch."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import click
import numpy as np

from protocols.selftest import run_selftest

from .settings import ENGINE_KEYS, SETTINGS, ConfigError, Resolved, resolve, resolve_password


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zowarmup")
def main() -> None:
    """The zowarmup edge agent: trains with forward passes only, on small devices.

    Run `zowarmup-agent selftest` once on a new device: it checks that this machine
    regenerates perturbation directions and applies commits to the exact bits of every
    other machine in the fleet.
    """


def engine_options(f):
    """How the engine runs forward passes: shared by `run` and `bench`."""
    options = [
        click.option("--micro-batch", type=click.IntRange(1, 1 << 20), default=None,
                     help="Samples per forward pass (default 64; with --memory-budget, the "
                     "most that fits, up to this)."),
        click.option("--memory-budget", "memory_budget", type=click.FloatRange(16),
                     default=None, metavar="MB", help="Peak memory this agent may use: it "
                     "measures a forward pass here and picks the micro-batch (and forward "
                     "strategy) that fits, or says what budget would work."),
        click.option("--threads", type=click.IntRange(1, 1024), default=None,
                     help="ONNX Runtime threads (default: the cores this process may "
                     "use, its CPU affinity)."),
        click.option("--strategy", type=click.Choice(["auto", "native", "inputs",
                                                      "constants"]),
                     default=None, help="How forward passes run (default auto): native "
                     "(ONNX Runtime's graph optimised for this CPU, the weights held once in "
                     "its layout: fastest, least memory), inputs (the plain graph), or "
                     "constants (a session compiled per pass). auto: native where the model "
                     "compiles so, else whichever of the others times faster here."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command()
def selftest() -> None:
    """Check this machine's direction stream, commit application and fingerprint.

    Compares against the test vectors pinned in the package. Prints `selftest ok`,
    or each difference and exits with status 1: such a device would drift from the
    fleet, so do not let it join until the numpy build or platform is fixed.
    """
    started = time.perf_counter()
    problems = run_selftest()
    where = f"{platform.machine()} {platform.system()}, Python {platform.python_version()}, " \
            f"numpy {np.__version__}"
    if problems:
        for line in problems:
            click.echo(f"differs: {line}", err=True)
        click.echo(f"selftest FAILED on {where}: {len(problems)} difference(s)", err=True)
        sys.exit(1)
    click.echo(f"selftest ok ({where}; {time.perf_counter() - started:.2f} s)")


def config_option(f):
    """--config: the TOML file of settings (the environment's ZOWARMUP_AGENT_CONFIG)."""
    return click.option(
        "--config", "config_file", default=None, metavar="FILE",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="A TOML file of settings, e.g. /etc/zowarmup/agent.toml (or set "
        "ZOWARMUP_AGENT_CONFIG). Flags win over environment variables (ZOWARMUP_<SETTING>), "
        "which win over the file.")(f)


class BadSetting(click.ClickException):
    """A setting that cannot be used: exit status 2, which the systemd unit does not
    restart on, since a restart cannot fix a configuration."""

    exit_code = 2


def resolve_settings(keys, flags: dict, config_file: Path | None, password: str | None = None,
                     password_file: Path | None = None) -> Resolved:
    """Flags, environment and file merged; every problem a clear error, and nothing started."""
    try:
        settings = resolve(keys, flags, config_file)
        if password is not None or password_file is not None or "broker" in keys:
            resolve_password(settings, password, password_file)
    except ConfigError as exc:
        raise BadSetting(str(exc)) from None
    for warning in settings.warnings:
        click.echo(f"warning: {warning}", err=True)
    return settings


RUN_KEYS = tuple(key for key in SETTINGS if key != "password_file")


@main.command()
@config_option
@click.option("--broker", default=None, metavar="URL",
              help="mqtt://host:port or mqtts://host:port of the fleet's broker.")
@click.option("--data", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="This device's shard: a .npz with x and y (see docs/protocol.md).")
@click.option("--id", "id", default=None,
              help="Agent id, unique in the fleet (default: the host name).")
@click.option("--run", "run", default=None, help="Run id to join (default: default).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where downloaded models are kept between restarts (default: systemd's "
              "$STATE_DIRECTORY, else ./zowarmup-agent-state).")
@click.option("--username", default=None, help="Broker user name.")
@click.option("--password", default=None, help="Broker password. Visible to every user in "
              "the process list: prefer --password-file or ZOWARMUP_PASSWORD.")
@click.option("--password-file", default=None, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file holding the broker password (or ZOWARMUP_PASSWORD_FILE, or "
              "password_file in the config file).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="CA certificate that signed the broker's certificate.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="This agent's client certificate.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="This agent's private key.")
@click.option("--mqtt", "mqtt", type=click.Choice(["3.1.1", "5"]), default=None,
              help="MQTT protocol version (default: 3.1.1).")
@engine_options
@click.option("--check-config", is_flag=True, help="Print each setting and where it came "
              "from (the password masked), then exit without connecting.")
def run(config_file, password, password_file, check_config, **flags) -> None:
    """Join a fleet: fetch the model, take part in rounds, stay in sync.

    Settings come from flags, environment variables (ZOWARMUP_BROKER, ZOWARMUP_DATA,
    ZOWARMUP_AGENT_ID, ...: ZOWARMUP_ and the setting's name in capitals) and --config FILE,
    in that order. Runs until SIGTERM or Ctrl-C; reconnects by itself after a lost
    connection.
    """
    settings = resolve_settings(RUN_KEYS, flags, config_file, password, password_file)
    if check_config:
        _print_settings(settings)
        return
    for key in ("broker", "data"):
        if settings[key] is None:
            setting = SETTINGS[key]
            raise BadSetting(f"no {key}: give {setting.flag}, set {setting.env}, or set {key} "
                             "in the configuration file (--config)")
    _run_daemon(settings)


def _print_settings(settings: Resolved) -> None:
    for key, value in settings.values.items():
        shown = "(not set)" if value is None else json.dumps(
            value if isinstance(value, (int, float)) else str(value))
        click.echo(f"{key} = {shown}    # {settings.sources[key]}")
    password = "(not set)" if settings.password is None else "(set)"
    click.echo(f"password = {password}    # {settings.password_source}")


def _run_daemon(settings: Resolved) -> None:
    import logging
    import signal
    import socket

    from protocols.errors import ZoError

    from .daemon import AgentConfig, AgentDaemon
    from .lifeline import exit_with_parent
    from .mqtt import Tls

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    s = settings.values
    files = [str(s[k]) if s[k] else None for k in ("tls_ca", "tls_cert", "tls_key")]
    tls = Tls(*files) if any(files) else None
    try:
        daemon = AgentDaemon(AgentConfig(
            s["broker"], s["data"], s["id"] or socket.gethostname().split(".")[0], s["run"],
            s["state_dir"], s["username"], settings.password, tls, s["mqtt"], s["micro_batch"],
            s["threads"], strategy=s["strategy"], memory_budget_mb=s["memory_budget"]))
    except (ZoError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    exit_with_parent()  # only where an orchestrator started us (ZOWARMUP_PARENT_PID)
    try:
        daemon.run()
    except KeyboardInterrupt:
        daemon.stop()


@main.command()
@click.option("--model", "model_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An exported model directory (zowarmup export).")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The shard this device will train on.")
@click.option("--directions", "-s", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Directions per round (the fleet's s).")
@engine_options
@config_option
def bench(model_dir, data, directions, config_file, **flags) -> None:
    """Time one ZO round on this device and report its peak memory, as JSON.

    Run it before a device joins a fleet: if `round_s` is longer than the fleet's
    round deadline, or `peak_rss_mb` near the device's memory, lower --micro-batch or
    keep the device out. With --config (or the ZOWARMUP_ variables) it runs the engine
    settings the agent would.
    """
    from protocols.errors import ZoError

    from . import memory
    from .engine import ZoEngine
    from .shard import load_shard

    s = resolve_settings(ENGINE_KEYS, flags, config_file).values
    try:
        from protocols.manifest import load_manifest
        manifest = load_manifest(model_dir)
        engine = ZoEngine(model_dir, load_shard(data, manifest), micro_batch=s["micro_batch"],
                          threads=s["threads"], manifest=manifest, strategy=s["strategy"],
                          memory_budget_mb=s["memory_budget"])
    except (ZoError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    memory.trim()
    memory.reset_peak()  # the figure is the round's, not the one-off calibration's
    started = time.perf_counter()
    engine.evaluate()
    forward_s = time.perf_counter() - started
    out = engine.round(list(range(1, directions + 1)), eps=1e-3)
    peak_mb = memory.peak_rss_mb()
    click.echo(json.dumps({
        "model": manifest.model, "parameters": manifest.num_parameters,
        "samples": out.samples, "directions": directions, "micro_batch": engine.micro_batch,
        "memory_budget_mb": s["memory_budget"],
        "strategy": engine.strategy,
        "threads": engine.threads,
        "forward_s": round(forward_s, 4), "round_s": round(out.seconds, 4),
        "overhead": round(out.seconds / (2 * directions * forward_s), 3),
        "undo_log_mb": round(out.undo_elements * 8 / 2**20, 2),
        "peak_rss_mb": round(peak_mb, 1),
        "platform": f"{platform.machine()} {platform.system()}",
    }))


if __name__ == "__main__":
    main()
