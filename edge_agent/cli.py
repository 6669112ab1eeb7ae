"""``zowarmup-agent``: the device-side command. It never imports torch."""

from __future__ import annotations

import platform
import sys
import time

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


if __name__ == "__main__":
    main()
