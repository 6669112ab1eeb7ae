"""The ``zowarmup`` command line: the workstation side of the project.

Heavy libraries (torch, onnx) are imported inside commands, so ``zowarmup --help``
answers at once.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from protocols.errors import ZoError
from protocols.manifest import MANIFEST, Manifest

MODEL_NAMES = ("cnn", "resnet18-gn", "resnet18-bn", "vit")  # orchestrator.zoo.MODELS, unloaded


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """zowarmup: federated zeroth-order training for devices too small to backpropagate."""


# --- option parsing helpers -------------------------------------------------------------


def _numbers(kind: Callable[[str], float | int]) -> Callable:
    """A click callback parsing "1,2,3" into a tuple of numbers (None stays None)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            return tuple(kind(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of "
                                     f"{kind.__name__}s, e.g. 3,32,32") from None

    return parse


def _names(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",")) if value else ()


def _normalization(mean: tuple | None, std: tuple | None) -> dict | None:
    if (mean is None) != (std is None):
        raise click.UsageError("give --mean and --std together (or neither)")
    return None if mean is None else {"mean": list(mean), "std": list(std)}


def metadata_options(f: Callable) -> Callable:
    """Options shared by both export commands: what the manifest tells devices about data."""
    f = click.option("--std", callback=_numbers(float), metavar="S1,S2,...",
                     help="Per-channel std of input normalization, e.g. 0.247,0.243,0.261 "
                          "(recorded in the manifest; the graph does not normalize).")(f)
    f = click.option("--mean", callback=_numbers(float), metavar="M1,M2,...",
                     help="Per-channel mean of input normalization, e.g. 0.491,0.482,0.447.")(f)
    f = click.option("--class-names", callback=_names, metavar="A,B,...",
                     help="Comma-separated class names, one per class.")(f)
    f = click.option("--verify", is_flag=True,
                     help="Check ONNX Runtime against the reference on random batches of two "
                          "sizes, at the exported and at perturbed weights (fails above "
                          "1e-4 loss difference).")(f)
    return click.option("--trainable", default="all", show_default=True, metavar="REGEX",
                        help="Which weights train: 'all' or a regex searched in their names "
                             "(e.g. '^fc\\.' for the head only); the rest is baked into the "
                             "graph as constants.")(f)


# --- reporting ------------------------------------------------------------------------


def report(manifest: Manifest, out: Path, seconds: float) -> None:
    """What was written: time, file sizes and parameter counts."""
    click.echo(f"exported {manifest.model} to {out} in {seconds:.1f} s")
    click.echo(f"  trainable: {manifest.num_parameters:,} parameters in "
               f"{len(manifest.parameters)} tensors; frozen: {manifest.frozen_parameters:,}")
    click.echo(f"  input x: [batch, {', '.join(map(str, manifest.input_shape))}] float32, "
               f"{manifest.num_classes} classes, opset {manifest.opset}, "
               f"batchnorm {manifest.batchnorm}")
    for name in (manifest.graph, manifest.weights, MANIFEST):
        size = (out / name).stat().st_size
        click.echo(f"  {name:<14} {size:>14,} bytes ({size / 2**20:.2f} MiB)")


def run_verify(model_dir: Path, reference) -> None:
    from export import VerifyError, verify_model_dir

    started = time.perf_counter()
    try:
        result = verify_model_dir(model_dir, reference)
    except VerifyError as exc:
        raise click.ClickException(f"verify failed: {exc}\nThe graph does not compute what the "
                                   "model computes; do not use this export.") from None
    click.echo(result.summary())
    click.echo(f"verified in {time.perf_counter() - started:.1f} s")


# --- zowarmup export ------------------------------------------------------------------


@main.group(invoke_without_command=True, short_help="Export a zoo model (or lift an ONNX one).")
@click.option("--model", "model_name", type=click.Choice(MODEL_NAMES), default="resnet18-gn",
              show_default=True, help="Zoo model to export.")
@click.option("--num-classes", type=click.IntRange(2), default=10, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write model.onnx, weights.bin and manifest.json into.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Weights to export: a torch.save'd state_dict of the same model, width and "
                   "class count. Without it the model is freshly initialized (--seed).")
@click.option("--width", type=click.IntRange(1), default=None,
              help="Base channels (cnn, resnet) or embedding size (vit); default: the "
                   "model's own (32, 64, 192).")
@click.option("--image-size", type=click.IntRange(4), default=32, show_default=True)
@click.option("--in-channels", type=click.IntRange(1), default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Initialization seed when no --checkpoint is given.")
@metadata_options
@click.pass_context
def export(ctx: click.Context, model_name: str, num_classes: int, out: Path | None,
           checkpoint: Path | None, width: int | None, image_size: int, in_channels: int,
           seed: int, trainable: str, verify: bool, class_names: tuple[str, ...],
           mean: tuple | None, std: tuple | None) -> None:
    """Export a zoo model as a forward-only ONNX graph with its weights as inputs.

    \b
    zowarmup export --model resnet18-gn --num-classes 10 --out DIR [--verify]
    zowarmup export hook MODEL.onnx --out DIR      (lift a third-party ONNX model)

    The directory holds model.onnx (inputs x, y and the trainable weights; outputs
    loss and correct), weights.bin (float32, manifest order) and manifest.json.
    """
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise click.UsageError("--out DIR is required: where to write the exported model")
    from export import export_model, select_parameters, torch_reference
    from orchestrator.train.zoo import build_model, input_shape, load_checkpoint

    normalization = _normalization(mean, std)
    try:
        model = build_model(model_name, num_classes, in_channels, image_size, width, seed)
        if checkpoint is not None:
            load_checkpoint(model, checkpoint)
        started = time.perf_counter()
        manifest = export_model(model, out, input_shape(in_channels, image_size), num_classes,
                                trainable, normalization, class_names, model_name)
        report(manifest, out, time.perf_counter() - started)
        if verify:
            names = select_parameters(model, trainable).torch_names
            run_verify(out, torch_reference(model, names))
    except ZoError as exc:
        raise click.ClickException(str(exc)) from None


@export.command("hook")
@click.argument("onnx_model", metavar="MODEL.onnx",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write model.onnx, weights.bin and manifest.json into.")
@click.option("--output", "output", metavar="NAME",
              help="The logits output [batch, classes], when the model has several "
                   "candidates or none is recognized.")
@click.option("--input-shape", callback=_numbers(int), metavar="C,H,W",
              help="Sample shape without the batch, when the model's input does not fix it.")
@click.option("--name", "model_name", help="Model name for the manifest (default: file stem).")
@metadata_options
def export_hook(onnx_model: Path, out: Path, output: str | None, input_shape: tuple | None,
                model_name: str | None, trainable: str, verify: bool,
                class_names: tuple[str, ...], mean: tuple | None, std: tuple | None) -> None:
    """Lift a third-party ONNX classifier into the exported form.

    MODEL.onnx needs one float32 input and a [batch, classes] logits output (or
    [batch, classes, 1, 1], or a final Softmax), with its weights as float32
    initializers or Constant nodes. The chosen weights (default: every float tensor of
    2+ elements except BatchNorm statistics) become graph inputs, in the order the graph
    first reads them; a loss head (input y, outputs loss and correct) is appended and
    the batch size freed, rewriting the nodes that fixed it (printed, and listed in the
    manifest).
    """
    from export import lift_onnx

    normalization = _normalization(mean, std)
    try:
        started = time.perf_counter()
        lifted = lift_onnx(onnx_model, out, trainable=trainable, output=output,
                           input_shape=input_shape, model_name=model_name,
                           class_names=class_names, normalization=normalization)
        report(lifted.manifest, out, time.perf_counter() - started)
        for line in lifted.changes():
            click.echo(line)
        if verify:
            run_verify(out, lifted.reference())
    except ZoError as exc:
        raise click.ClickException(str(exc)) from None


# --- the run ------------------------------------------------------------------------------


def _setup_logging(verbose: bool) -> None:
    import logging
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # the embedded broker logs every connection, the exporter every pass
        for noisy in ("amqtt", "onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def run_options(f: Callable) -> Callable:
    f = click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
                     help="Override one config field; repeat for more "
                     "(e.g. --set zo.rounds=50 --set data.alpha=0.1).")(f)
    f = click.option("--broker", default=None, metavar="URL",
                     help="An external broker (mqtt://host:1883, mqtts://...) instead of the "
                     "embedded one.")(f)
    f = click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Run directory (default: run.out from the config).")(f)
    f = click.option("-v", "--verbose", is_flag=True, help="Debug logging.")(f)
    return click.argument("config_file", metavar="CONFIG",
                          type=click.Path(exists=True, dir_okay=False, path_type=Path))(f)


def _load(config_file: Path, overrides: tuple[str, ...], broker: str | None,
          out: Path | None):
    from .config import load_config
    extra = list(overrides)
    if broker:
        extra.append(f"fleet.broker={broker}")
    if out:
        extra.append(f"run.out={out}")
    return load_config(config_file, extra)


def metrics_options(f: Callable) -> Callable:
    """--metrics-port/--metrics-host, handed to ``_start`` through the click context (the
    commands' own signatures stay as they are)."""

    @functools.wraps(f)
    def command(*args, metrics_port: int | None, metrics_host: str, **kwargs):
        click.get_current_context().meta["zowarmup.metrics"] = (metrics_port, metrics_host)
        return f(*args, **kwargs)

    command = click.option("--metrics-host", default="127.0.0.1", show_default=True,
                           metavar="ADDR", help="Address of --metrics-port (0.0.0.0: every "
                           "interface, for a Prometheus on another machine).")(command)
    return click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
                        metavar="PORT", help="Serve the run's figures (those of `zowarmup "
                        "status`) for Prometheus at http://ADDR:PORT/metrics while it "
                        "runs (0: a free port, logged).")(command)


def _metrics_server(run_dir: Path):
    """The --metrics-port endpoint, if asked for; a port that cannot be had stops the
    command before anything runs."""
    port, host = click.get_current_context().meta.get("zowarmup.metrics", (None, None))
    if port is None:
        return None
    from .run.exporter import MetricsServer
    try:
        server = MetricsServer(run_dir, port, host)
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {host}:{port}: {exc}") from None
    click.echo(f"metrics for Prometheus at {server.url}", err=True)
    return server


def _start(config, local_agents: int | None, fresh: bool, simulate: bool = False) -> None:
    """Run or resume the job. Ctrl-C and SIGTERM stop it the same way: the round in
    progress abandoned (never a torn journal record), the local agents and the embedded
    broker stopped, and a line that says how to go on."""
    import json
    import signal

    from .run.job import execute
    from .run.state import SUMMARY, RunDir
    from .run.stopping import Stopped, stop_on_signals
    run_dir = Path(config.run.out)
    state = RunDir(run_dir).state()
    if fresh and state.get("phase") != "new":
        raise click.ClickException(
            f"{run_dir} already holds a run ({state.get('phase')}); continue it with "
            f"`zowarmup resume {run_dir}`, or pick another directory with --out")
    metrics = _metrics_server(run_dir)
    restore = stop_on_signals()
    try:
        summary = execute(config, run_dir, local_agents=local_agents, simulate=simulate)
    except ZoError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        click.echo(f"stopped by {signal.Signals(signum).name}; every committed round is kept "
                   f"in {run_dir}: continue with `zowarmup resume {run_dir}`", err=True)
        sys.exit(128 + signum)
    finally:
        restore()
        if metrics is not None:
            metrics.stop()
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"run directory: {run_dir} (summary in {run_dir / SUMMARY})")


@main.command()
@run_options
@metrics_options
@click.option("--simulate", is_flag=True, help="ZO rounds in process, without a broker or "
              "agent processes: the same coordinator and agent engine, the same bits, faster.")
@click.option("--estimate", is_flag=True, help="Run nothing: time a few forward passes and a "
              "warm-up step here (the config's model, engine and device) and print the "
              "predicted time of each phase.")
def run(config_file: Path, overrides: tuple[str, ...], broker: str | None, out: Path | None,
        verbose: bool, simulate: bool, estimate: bool) -> None:
    """Run a whole ZOWarmUp job from one config file, on this machine.

    Partitions the data, warms the model up with FedAvg/FedAdam on the high-resource
    clients, exports it at the pivot, starts one `zowarmup-agent` process per client and
    runs the zeroth-order rounds over MQTT (an embedded broker unless --broker), then
    prints the summary. Everything lands in the run directory; if the run stops, continue
    it with `zowarmup resume DIR`.

    \b
    Example:
      zowarmup run examples/quickstart.toml
      zowarmup run examples/quickstart.toml --set zo.rounds=100 --out runs/longer
      zowarmup run examples/cifar10-resnet18.toml --simulate --set zo.engine=torch --estimate
    """
    _setup_logging(verbose)
    try:
        config = _load(config_file, overrides, broker, out)
    except ZoError as exc:
        raise click.ClickException(str(exc)) from None
    if config.zo.engine == "torch" and not simulate:
        raise click.UsageError("zo.engine = \"torch\" computes the clients in this process: "
                               "add --simulate (over MQTT the agents run their own engine)")
    if estimate:
        _estimate(config, simulate)
        return
    _start(config, None, fresh=True, simulate=simulate)


def _estimate(config, simulate: bool) -> None:
    from .run.estimate import estimate
    try:
        result = estimate(config, simulate)
    except ZoError as exc:
        raise click.ClickException(str(exc)) from None
    mode = f"simulated, zo.engine = {config.zo.engine}" if simulate else "agents over MQTT"
    click.echo(f"estimate for {config.run.name}: {config.model.name}, run.device = "
               f"{config.run.device}, {mode}")
    for line in result.lines():
        click.echo(line)


@main.command()
@run_options
@metrics_options
def serve(config_file: Path, overrides: tuple[str, ...], broker: str | None, out: Path | None,
          verbose: bool) -> None:
    """Like `run`, but the agents are remote devices: none is started here.

    After the warm-up, the model and every client's shard are in the run directory
    (model/, shards/client-NNN.npz): copy a shard to each device and start
    `zowarmup-agent run --broker URL --run NAME --data SHARD` there. The ZO rounds begin
    once data.clients agents have joined.
    """
    _setup_logging(verbose)
    try:
        config = _load(config_file, overrides, broker, out)
    except ZoError as exc:
        raise click.ClickException(str(exc)) from None
    _start(config, 0, fresh=True)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--broker", default=None, metavar="URL", help="Use this broker from now on.")
@click.option("-v", "--verbose", is_flag=True)
@metrics_options
def resume(run_dir: Path, broker: str | None, verbose: bool) -> None:
    """Continue a stopped run from its directory, to the bits of a run that never stopped.

    The warm-up restarts from its last checkpoint; the ZO phase replays the journal and
    goes on from the last durable commit. Agents rejoin and catch up by themselves.
    """
    _setup_logging(verbose)
    if not (run_dir / "config.toml").exists():
        raise click.ClickException(f"{run_dir} holds no config.toml: not a run directory")
    try:
        config = _load(run_dir / "config.toml", (), broker, run_dir)
    except ZoError as exc:
        raise click.ClickException(str(exc)) from None
    _start(config, None, fresh=False)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=1883, show_default=True)
def broker(host: str, port: int) -> None:
    """Run the embedded MQTT broker (MQTT 3.1.1, anonymous) on its own, until Ctrl-C.

    For a fleet that outlives one orchestrator, or to try agents by hand. For TLS,
    passwords and MQTT 5, run Mosquitto or EMQX instead.
    """
    from .fleet.broker import EmbeddedBroker
    from .run.stopping import stop_on_signals
    stop_on_signals()  # a SIGTERM while it starts stops it too, not only one once it listens
    try:
        embedded = EmbeddedBroker(host, port).start()
    except KeyboardInterrupt:
        return
    except Exception as exc:  # noqa: BLE001 - a port in use, a bad host: say so
        raise click.ClickException(f"cannot start the broker on {host}:{port}: {exc}") from None
    click.echo(f"broker listening on {embedded.url}; Ctrl-C or SIGTERM stops it")
    try:
        _wait_for_stop()
    finally:
        embedded.stop()
        click.echo(f"broker on {embedded.url} stopped")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--broker", default=None, metavar="URL",
              help="Also read from this broker which agents are connected now (their "
                   "retained status), as the run's orchestrator identity.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def status(run_dir: Path, broker: str | None, as_json: bool) -> None:
    """How a run stands, live or finished.

    The run's phase, round, test accuracy and ETA, whether its process is still there, and
    each agent's state (online, catching up, offline, and why), when it was last heard
    from, how many commits it is behind, the rounds it answered and missed, and its
    messages refused by reason. A live run's fleet is as of its last round (the
    orchestrator replaces RUN_DIR/fleet.json after each); --broker adds who is connected
    right now.
    """
    import json

    from .run.status import add_broker_view, broker_statuses, read_status, table
    try:
        view = read_status(run_dir)
        if broker:
            add_broker_view(view, broker_statuses(broker, view["run"], _identity(run_dir)))
    except (FileNotFoundError, ZoError) as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a broker unreachable, a bad URL: say so
        raise click.ClickException(f"cannot read the agents' status from {broker}: "
                                   f"{exc}") from None
    if as_json:
        click.echo(json.dumps(view, indent=2, sort_keys=True))
        return
    for line in table(view):
        click.echo(line)


def _identity(run_dir: Path) -> tuple:
    """The run's orchestrator identity on its broker (user, password, TLS files), or an
    anonymous one when the run's configuration no longer loads here."""
    from .config import load_config
    from .fleet.mosquitto import orchestrator_identity
    try:
        return orchestrator_identity(load_config(run_dir / "config.toml").fleet)
    except (ZoError, OSError, KeyError):
        return None, None, None


def _wait_for_stop() -> None:
    """Sleep until Ctrl-C or SIGTERM (what systemd and `kill` send). A server started from
    a script's background job inherits SIGINT ignored, so SIGTERM is the stop it still
    hears; either way the caller's cleanup runs."""
    import signal

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return


@main.command("broker-config")
@click.option("--agents", type=click.IntRange(1, 1_000_000), default=None,
              help="How many agents: ids client-000, client-001, ... as `zowarmup run` names "
                   "its clients (or give --ids).")
@click.option("--ids", callback=_names, metavar="A,B,...",
              help="The agent ids instead of client-NNN (as many as --agents).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="A new directory for the files (with --install: or the fleet made there "
                   "before).")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="TLS port  [default: 8883]")
@click.option("--bind", default=None, help="Address to listen on  [default: 0.0.0.0]")
@click.option("--host", "hosts", multiple=True, metavar="NAME",
              help="A name or IP address agents reach the broker by; repeat for more "
                   "(default: localhost, 127.0.0.1 and this machine's host name).")
@click.option("--days", type=click.IntRange(1, 36500), default=None,
              help="How long the certificates are valid  [default: 825]")
@click.option("--broker-user", metavar="NAME", default=None,
              help="The user the broker runs as, who alone may read its password file, ACL "
                   "and key (default: mosquitto where it exists and this runs as root, else "
                   "you).")
@click.option("--install", is_flag=True,
              help="Also install the fleet into the packaged Mosquitto (as root): "
                   "PREFIX/conf.d/zowarmup.conf and PREFIX/zowarmup/. Run again, it changes "
                   "nothing.")
@click.option("--prefix", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The packaged broker's configuration directory, for --install  "
                   "[default: /etc/mosquitto]")
@click.option("--force", is_flag=True,
              help="With --install: replace another fleet's files there.")
def broker_config(agents: int | None, ids: tuple[str, ...], out: Path, port: int | None,
                  bind: str | None, hosts: tuple[str, ...], days: int | None,
                  broker_user: str | None, install: bool, prefix: Path | None,
                  force: bool) -> None:
    """Write a Mosquitto setup for a secure fleet: TLS, one password per agent, an ACL.

    Each agent's user name is its id, and the ACL lets it publish only its own topics;
    only the orchestrator may publish rounds, commits and the model. The broker's files
    belong to the user it runs as (Mosquitto started as root switches to `mosquitto`);
    the orchestrator's and the devices' to you. Prints what to run next: the broker
    (`mosquitto -c OUT/mosquitto.conf`, or with --install a restart of the packaged
    service), the orchestrator, and each device (copy OUT/agents/ID/ to it).
    """
    from .fleet.broker_config import BrokerRequest, instructions, setup_broker
    if ids and agents and len(ids) != agents:
        raise click.BadParameter(f"{len(ids)} ids for --agents {agents}", param_hint="--ids")
    names = ids or tuple(f"client-{i:03d}" for i in range(agents or 0))
    request = BrokerRequest(out, names, port, bind, hosts, days, broker_user, install,
                            prefix, force)
    try:
        setup = setup_broker(request)
    except (ZoError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    for line in instructions(setup):
        click.echo(line)


@main.command()
@click.argument("config_file", metavar="CONFIG",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for client-NNN.npz, test.npz and partition.json.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE")
def partition(config_file: Path, out: Path, overrides: tuple[str, ...]) -> None:
    """Write each client's shard, as the config partitions the data, for real devices.

    Uses the config's data section and run.seed (Dirichlet over data.clients, the
    high/low split), exactly as `zowarmup run` does, so shard N here is client N there.
    """
    from .run.state import plan_run
    from .train.data import write_partition
    try:
        config = _load(config_file, overrides, None, None)
        plan = plan_run(config)
        files = write_partition(plan.dataset, plan.parts, plan.high, out, config.run.seed,
                                config.data.alpha)
    except ZoError as exc:
        raise click.ClickException(str(exc)) from None
    high = int(plan.high.sum())
    click.echo(f"wrote {len(files)} shard(s) to {out} ({high} high-resource, "
               f"{len(files) - high} low-resource) with test.npz and partition.json")


@main.command()
@click.argument("grid_file", metavar="GRID",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the table (Markdown; JSON with the curves and every search "
                   "candidate's score), a bar plot, the accuracy curves (NAME-curves.png) "
                   "and the command here.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override a field in every run (e.g. --set zo.rounds=20 for a quick look).")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Runs at once, each in its own process (on a machine with many cores). "
                   "The results do not depend on it.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              metavar="[ADDRESS]",
              help="Run each run of the grid as a task on a Ray cluster (one GPU per run where "
                   "it has GPUs): --ray alone starts a local Ray (with --jobs N CPUs, else "
                   "all) and stops it after; --ray=ADDRESS joins a running cluster. Needs "
                   "pip install 'zowarmup[ray]'.")
@click.option("-v", "--verbose", is_flag=True)
def experiment(grid_file: Path, results: Path | None, overrides: tuple[str, ...],
               jobs: int, ray_address: str | None, verbose: bool) -> None:
    """Run a grid of configurations x seeds and print one table.

    GRID names a base config, the seeds, the axes to sweep and the methods; see
    docs/results/ for the grids behind the published tables. The ZO phase runs in process
    (`run --simulate`: same bits as over MQTT). Finished runs are kept, so running the
    same command again after a stop continues the grid.

    \b
    Example:
      zowarmup experiment docs/results/table2-digits.toml --results docs/results
      zowarmup experiment GRID --ray              (a local Ray, every core)
      zowarmup experiment GRID --ray=HOST:6379    (a Ray cluster; experiment.out shared)
    """
    from .experiment import command_line, load_grid, markdown, run_grid, write_results
    _setup_logging(verbose)
    try:
        grid = load_grid(grid_file, overrides)
        rows = run_grid(grid, jobs, ray_address)
    except ZoError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(markdown(grid, rows))
    if results:
        for path in write_results(grid, rows, results, command_line()):
            click.echo(f"wrote {path}")


@main.command("serve-model")
@click.argument("model_dir", metavar="BLACKBOX_DIR",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8600, show_default=True,
              help="Port to listen on (0: a free one, printed).")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File holding the API key devices must send (or set ZOWARMUP_API_KEY).")
@click.option("--max-request-mb", type=click.FloatRange(0.001, 1024), default=4.0,
              show_default=True, help="Largest request body, checked before it is read.")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=1024, show_default=True,
              help="Most inputs scored by one query.")
@click.option("--rate", type=click.FloatRange(0.001, 1e6), default=100.0, show_default=True,
              help="Queries per second each device may make (refused with 429 above it).")
@click.option("--burst", type=click.IntRange(1, 1_000_000), default=50, show_default=True,
              help="Queries a device may send at once before the rate applies.")
@click.option("--budget", type=click.IntRange(0), default=0, show_default=True,
              help="Queries each device may make in all (403 after); 0 = no budget.")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="ONNX Runtime threads per query (default: 1).")
def serve_model(model_dir: Path, host: str, port: int, api_key_file: Path | None,
                max_request_mb: float, max_batch: int, rate: float, burst: int, budget: int,
                threads: int | None) -> None:
    """Serve a frozen model behind the black-box scoring API, until Ctrl-C.

    BLACKBOX_DIR holds blackbox.json and the frozen graph (a prompt-tuning run writes
    one as blackbox/). Devices POST inputs and labels to /v1/score with
    'Authorization: Bearer KEY' and 'X-Zowarmup-Device: ID' and get back the loss and
    the correct count, never the weights; see protocols/scoring.py.
    """
    import os

    from .bbpt.endpoint import Limits, ModelServer, ScoringService
    key = (api_key_file.read_text().strip() if api_key_file
           else os.environ.get("ZOWARMUP_API_KEY", ""))
    if not key:
        raise click.UsageError("no API key: give --api-key-file FILE or set ZOWARMUP_API_KEY")
    limits = Limits(int(max_request_mb * 2**20), max_batch, rate, burst, budget)
    try:
        server = ModelServer(ScoringService(model_dir, key, limits, threads), host, port)
    except (ZoError, ValueError, OSError) as exc:
        raise click.ClickException(f"cannot serve {model_dir}: {exc}") from None
    server.start()
    spec = server.service.spec
    click.echo(f"serving {spec.name} ({spec.input_dtype} [batch, "
               f"{', '.join(map(str, spec.input_shape))}], {spec.num_classes} classes) at "
               f"{server.url}; Ctrl-C or SIGTERM stops it", nl=True)
    try:
        _wait_for_stop()
    finally:
        server.stop()
        for device, count in server.service.queries().items():
            click.echo(f"{device}: {count} queries")


def _register_report() -> None:
    try:
        from .report import report_command
    except ImportError:  # the report needs matplotlib, an orchestrator extra
        return
    main.add_command(report_command)


_register_report()


if __name__ == "__main__":
    main()
