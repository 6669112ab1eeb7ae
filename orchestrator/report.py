"""Reports on run directories: a table of the figures that matter and the accuracy curves.

A run directory written by ``zowarmup run`` holds ``metrics.jsonl`` (one line per round)
and, once the run has finished, ``summary.json``. This module reads both, derives the
summary of an unfinished run from its metrics, prints one table row per run and plots
test accuracy against round with the pivot (the first ZO round) marked, as in the
ZOWarmUp paper's training curves.

Matplotlib is imported only by :func:`plot`, so the table works on a base install.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from protocols.errors import ZoError

from .run.state import CONFIG, METRICS, SUMMARY, MetricsError
from .run.state import read_metrics as run_metrics
from .run.summary import phase_figures


class ReportError(ZoError):
    """A run directory that cannot be reported on, with what is wrong with it."""


# --- reading ----------------------------------------------------------------------------


def read_metrics(run_dir: Path | str) -> list[dict]:
    """The rounds logged in ``run_dir/metrics.jsonl``, in file order.

    A torn or invalid last line (a run stopped mid-write) is skipped; blank lines are
    ignored. A corrupt line anywhere else raises :class:`ReportError`, as does a missing
    directory or metrics file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    file = run_dir / METRICS
    if not file.is_file():
        raise ReportError(f"{run_dir} holds no {METRICS}: not a run directory, or the run "
                          "has not logged a round yet")
    try:
        return run_metrics(file)
    except MetricsError as exc:
        raise ReportError(str(exc)) from None


def read_summary(run_dir: Path | str) -> dict | None:
    """The run's ``summary.json``, or None when there is none (an unfinished run)."""
    file = Path(run_dir) / SUMMARY
    if not file.is_file():
        return None
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{file} is not readable JSON: {exc}") from None
    if not isinstance(summary, dict):
        raise ReportError(f"{file} does not hold a JSON object")
    return summary


def _read_config(run_dir: Path) -> dict:
    """The run's config.toml as a dict, or {} when it is absent or cannot be parsed."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: names then come from the directory
        return {}
    try:
        config = tomllib.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


# --- figures ----------------------------------------------------------------------------


def derive_summary(run_dir: Path | str, rows: list[dict]) -> dict:
    """The figures of a run computed from its metrics rows alone.

    The pivot is the switch to ZO: ``pivot_round`` is the first ZO round and
    ``pivot_acc`` the last warm-up evaluation before it; both are None while (or when)
    no ZO round has been logged.
    """
    run_dir = Path(run_dir)
    config = _read_config(run_dir)

    def section(name: str) -> dict:
        value = config.get(name)
        return value if isinstance(value, dict) else {}

    figures = phase_figures(rows)
    return {
        "name": section("run").get("name") or run_dir.resolve().name,
        "method": section("run").get("method"),
        "dataset": section("data").get("dataset"),
        "model": section("model").get("name"),
        **{key: figures[key] for key in ("final_acc", "best_acc", "pivot_acc", "pivot_round",
                                         "warmup_rounds", "zo_rounds",
                                         "bytes_per_client_round", "wall_s")},
    }


def summarize(run_dir: Path | str) -> dict:
    """One report row for ``run_dir``: its summary.json if present, else figures derived
    from its metrics; ``status`` is "finished" (a summary exists) or "unfinished", and
    ``run_dir`` is the directory as given."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    summary = read_summary(run_dir)
    if summary is None:
        return {**derive_summary(run_dir, read_metrics(run_dir)),
                "status": "unfinished", "run_dir": str(run_dir)}
    derived = {}
    if (run_dir / METRICS).is_file():  # fills in what an older summary may lack
        derived = derive_summary(run_dir, read_metrics(run_dir))
    return {**derived, **summary, "status": "finished", "run_dir": str(run_dir)}


# --- table ------------------------------------------------------------------------------


def human_bytes(n: float | None) -> str:
    """A byte count in B, KiB, MiB or GiB, e.g. ``1536`` -> ``"1.5 KiB"``."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _pct(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.2f}%"


def _phase_bytes(row: dict, phase: str, way: str) -> str:
    if not row.get(f"{phase}_rounds"):
        return "-"
    per = (row.get("bytes_per_client_round") or {}).get(phase) or {}
    return human_bytes(per.get(way))


COLUMNS = (  # header, right-aligned, cell
    ("run", False, lambda r: str(r.get("name") or "-")),
    ("dir", False, lambda r: str(r.get("run_dir") or "-")),
    ("method", False, lambda r: str(r.get("method") or "-")),
    ("rounds", True, lambda r: f"{r.get('warmup_rounds') or 0}+{r.get('zo_rounds') or 0}"),
    ("pivot acc", True, lambda r: _pct(r.get("pivot_acc"))),
    ("final acc", True, lambda r: _pct(r.get("final_acc"))),
    ("best acc", True, lambda r: _pct(r.get("best_acc"))),
    ("warm-up up", True, lambda r: _phase_bytes(r, "warmup", "uplink")),
    ("warm-up down", True, lambda r: _phase_bytes(r, "warmup", "downlink")),
    ("ZO up", True, lambda r: _phase_bytes(r, "zo", "uplink")),
    ("ZO down", True, lambda r: _phase_bytes(r, "zo", "downlink")),
    ("status", False, lambda r: str(r.get("status") or "-")),
)


def format_table(rows: list[dict]) -> str:
    """A plain-text table, one line per run (rows as :func:`summarize` returns them).

    Rounds read warm-up+ZO; accuracies are percentages; traffic is bytes per
    participating client per round in each phase ("-" where the phase had no rounds).
    """
    cells = [[cell(r) for _, _, cell in COLUMNS] for r in rows]
    headers = [h for h, _, _ in COLUMNS]
    widths = [max(len(x) for x in col) for col in zip(headers, *cells)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if right else v.ljust(w)
                         for v, w, (_, right, _) in zip(values, widths, COLUMNS)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    out.append("traffic: bytes per participating client per round (up = client to server)")
    return "\n".join(out)


# --- plot -------------------------------------------------------------------------------


def plot(run_dirs: list[Path | str], out_png: Path, title: str | None = None) -> Path:
    """Test accuracy against round for each run (evaluated rounds only), a dashed vertical
    line at each run's pivot (first ZO round), saved as a 150 dpi PNG at ``out_png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise ReportError("nothing to plot: no run directories given")
    out_png = Path(out_png)
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for i, run_dir in enumerate(run_dirs):
            row = summarize(run_dir)
            points = sorted((r["round"], r["test_acc"]) for r in read_metrics(run_dir)
                            if r.get("test_acc") is not None)
            color = f"C{i % 10}"
            label = f"{row.get('name') or Path(run_dir).name} ({row.get('method') or '?'})"
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], color=color,
                    marker="." if len(points) < 50 else None, label=label)
            pivot = row.get("pivot_round")
            if pivot:  # round 0 is ZO from scratch: no warm-up to switch from
                ax.axvline(pivot, color=color, linestyle="--", linewidth=1,
                           label=f"pivot of {row.get('name') or Path(run_dir).name} "
                                 f"(round {pivot})")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title or "Test accuracy by round (dashed: pivot to ZO)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=150, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out_png


# --- command ----------------------------------------------------------------------------


@click.command("report")
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="PATH",
              help="Where to write the accuracy plot [default: FIRST_RUN_DIR/accuracy.png].")
@click.option("--no-plot", is_flag=True, help="Print the table only; draw nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the rows as JSON instead of the table (the plot path goes to "
                   "stderr).")
@click.option("--title", default=None, help="Title of the plot.")
def report_command(run_dirs: tuple[Path, ...], plot_path: Path | None, no_plot: bool,
                   as_json: bool, title: str | None) -> None:
    """Compare runs: a table of their figures and a plot of accuracy by round.

    For each RUN_DIR (written by `zowarmup run`) prints the method, rounds
    (warm-up+ZO), accuracy at the pivot, final and best accuracy, bytes per client per
    round in each phase and whether the run finished; an unfinished run is reported
    from its metrics so far. The plot shows test accuracy against round for every run,
    with a dashed line at each pivot (the switch from warm-up to ZO).

    \b
    Example:
      zowarmup report runs/zowarmup runs/high-res-only
      zowarmup report runs/zowarmup --plot figures/curve.png
      zowarmup report runs/* --no-plot --json
    """
    try:
        rows = [summarize(d) for d in run_dirs]
        click.echo(json.dumps(rows, indent=2) if as_json else format_table(rows))
        if no_plot:
            return
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.ClickException(
                "plotting needs matplotlib: pip install 'zowarmup[orchestrator]', "
                "or pass --no-plot") from None
        out = plot(list(run_dirs), plot_path or run_dirs[0] / "accuracy.png", title)
        click.echo(f"plot: {out}", err=as_json)
    except ZoError as exc:
        raise click.ClickException(str(exc)) from None
