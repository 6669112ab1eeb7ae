"""``zowarmup-agent``: the device-side command. It never imports torch."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import click
import numpy as np

from protocols.selftest import run_selftest


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
                     default="auto", show_default=True, help="How forward passes run: native "
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


@main.command()
@click.option("--broker", required=True, metavar="URL",
              help="mqtt://host:port or mqtts://host:port of the fleet's broker.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="This device's shard: a .npz with x and y (see docs/protocol.md).")
@click.option("--id", "agent_id", default=None,
              help="Agent id, unique in the fleet (default: the host name).")
@click.option("--run", "run_id", default="default", show_default=True, help="Run id to join.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("zowarmup-agent-state"), show_default=True,
              help="Where downloaded models are kept between restarts.")
@click.option("--username", default=None, help="Broker user name.")
@click.option("--password", default=None, envvar="ZOWARMUP_PASSWORD",
              help="Broker password (or set ZOWARMUP_PASSWORD).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--mqtt", "protocol", type=click.Choice(["3.1.1", "5"]), default="3.1.1",
              show_default=True, help="MQTT protocol version.")
@engine_options
def run(broker, data, agent_id, run_id, state_dir, username, password, tls_ca, tls_cert,
        tls_key, protocol, micro_batch, memory_budget, threads, strategy) -> None:
    """Join a fleet: fetch the model, take part in rounds, stay in sync.

    Runs until SIGTERM or Ctrl-C; reconnects by itself after a lost connection.
    """
    import logging
    import signal
    import socket

    from protocols.errors import ZoError

    from .daemon import AgentConfig, AgentDaemon
    from .mqtt import Tls

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tls = Tls(tls_ca, tls_cert, tls_key) if (tls_ca or tls_cert or tls_key) else None
    try:
        daemon = AgentDaemon(AgentConfig(
            broker, data, agent_id or socket.gethostname().split(".")[0], run_id, state_dir,
            username, password, tls, protocol, micro_batch, threads, strategy=strategy,
            memory_budget_mb=memory_budget))
    except (ZoError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
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
def bench(model_dir, data, directions, micro_batch, memory_budget, threads, strategy) -> None:
    """Time one ZO round on this device and report its peak memory, as JSON.

    Run it before a device joins a fleet: if `round_s` is longer than the fleet's
    round deadline, or `peak_rss_mb` near the device's memory, lower --micro-batch or
    keep the device out.
    """
    import json

    from protocols.errors import ZoError

    from . import memory
    from .engine import ZoEngine
    from .shard import load_shard

    try:
        from protocols.manifest import load_manifest
        manifest = load_manifest(model_dir)
        engine = ZoEngine(model_dir, load_shard(data, manifest), micro_batch=micro_batch,
                          threads=threads, manifest=manifest, strategy=strategy,
                          memory_budget_mb=memory_budget)
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
        "memory_budget_mb": memory_budget,
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
