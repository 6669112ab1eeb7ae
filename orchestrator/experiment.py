"""``zowarmup experiment GRID.toml``: a grid of runs x seeds, as one table.

A grid file names a base run config, the seeds, the axes to sweep (any config field) and
the methods (each a set of config overrides), for example::

    [experiment]
    name = "table2-digits"
    base = "../../examples/digits-50.toml"   # relative to this file
    seeds = [0, 1, 2]
    out = "runs/table2"                       # run directories (relative to the cwd)

    [grid]
    "data.split" = ["10/90", "30/70", "50/50", "70/30", "90/10"]

    [methods]
    "High-Res-Only" = { "run.method" = "high-res-only" }
    "ZOWarmUp" = { "run.method" = "zowarmup" }

Every run is an ordinary run directory (simulated ZO phase, same bits as over MQTT), so
``zowarmup report`` reads any of them, and a stopped experiment picks up where it stopped:
finished runs are kept. The table gives the final test accuracy as mean (std) over seeds.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from protocols.errors import ZoError

from .config import Config, load_config

log = logging.getLogger("zowarmup.experiment")


class ExperimentError(ZoError):
    """A grid file that cannot be run, and what is wrong with it."""


@dataclass(frozen=True)
class Cell:
    setting: tuple[tuple[str, object], ...]  # the grid axes' values
    method: str
    seed: int

    def directory(self, root: Path) -> Path:
        parts = [f"{k.split('.')[-1]}={_slug(v)}" for k, v in self.setting]
        return root.joinpath(*parts, _slug(self.method), f"seed-{self.seed}")


@dataclass(frozen=True)
class Grid:
    name: str
    base: Path
    seeds: tuple[int, ...]
    out: Path
    axes: dict[str, list]
    methods: dict[str, dict[str, object]]
    overrides: tuple[str, ...] = ()

    def cells(self) -> list[Cell]:
        keys = list(self.axes)
        return [Cell(tuple(zip(keys, values)), method, seed)
                for values in itertools.product(*(self.axes[k] for k in keys))
                for method in self.methods for seed in self.seeds]

    def config(self, cell: Cell) -> Config:
        sets = [f"{k}={_toml(v)}" for k, v in cell.setting]
        sets += [f"{k}={_toml(v)}" for k, v in self.methods[cell.method].items()]
        sets += [f"run.seed={cell.seed}", f"run.out={cell.directory(self.out)}",
                 f"run.name={_slug(self.name)}-{cell.seed}", *self.overrides]
        return load_config(self.base, sets)


def load_grid(path: Path, overrides: tuple[str, ...] = ()) -> Grid:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExperimentError(f"{path}: cannot read the grid file: {exc}") from None
    unknown = set(data) - {"experiment", "grid", "methods"}
    if unknown:
        raise ExperimentError(f"{path}: unknown table(s) {sorted(unknown)}; a grid file has "
                              "[experiment], [grid] and [methods]")
    e = data.get("experiment", {})
    for key in ("base", "seeds"):
        if key not in e:
            raise ExperimentError(f"{path}: [experiment] needs {key!r}")
    seeds = e["seeds"]
    if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)):
        raise ExperimentError(f"{path}: experiment.seeds must be a list of integers")
    axes = data.get("grid", {})
    if not all(isinstance(v, list) and v for v in axes.values()):
        raise ExperimentError(f"{path}: each [grid] entry must be a non-empty list of values")
    methods = data.get("methods", {"default": {}})
    if not all(isinstance(v, dict) for v in methods.values()):
        raise ExperimentError(f"{path}: each [methods] entry must be a table of overrides")
    grid = Grid(str(e.get("name", path.stem)), (path.parent / e["base"]).resolve(),
                tuple(seeds), Path(e.get("out", f"runs/{path.stem}")).resolve(), axes,
                methods, tuple(overrides))
    first = {cell.method: cell for cell in reversed(grid.cells())}
    for cell in first.values():  # every method's config is valid before any run starts
        grid.config(cell)
    return grid


def run_grid(grid: Grid) -> list[dict]:
    """Run every cell not finished yet; return one row per (setting, method)."""
    from .run import SUMMARY, execute
    logging.getLogger("zowarmup.progress").setLevel(logging.WARNING)  # a line per run instead
    cells = grid.cells()
    for i, cell in enumerate(cells, 1):
        run_dir = cell.directory(grid.out)
        if (run_dir / SUMMARY).exists():
            continue
        config = grid.config(cell)
        log.info("run %d/%d: %s", i, len(cells), run_dir)
        summary = execute(config, run_dir, simulate=True)
        log.info("run %d/%d: final accuracy %.4f (%.0f s)", i, len(cells), summary["final_acc"],
                 summary["wall_s"])
    return table_rows(grid)


def table_rows(grid: Grid) -> list[dict]:
    from .run import SUMMARY
    rows: dict[tuple, dict] = {}
    for cell in grid.cells():
        summary_file = cell.directory(grid.out) / SUMMARY
        if not summary_file.exists():
            continue
        summary = json.loads(summary_file.read_text())
        config = grid.config(cell)
        key = (cell.setting, cell.method)
        row = rows.setdefault(key, {
            "dataset": summary["dataset"], "model": summary["model"],
            "split": config.data.split, "method": cell.method,
            "setting": {k: v for k, v in cell.setting}, "seeds": [], "accuracies": []})
        row["seeds"].append(cell.seed)
        row["accuracies"].append(summary["final_acc"])
    for row in rows.values():
        accs = row["accuracies"]
        row["mean"] = sum(accs) / len(accs)
        row["std"] = math.sqrt(sum((a - row["mean"]) ** 2 for a in accs) / len(accs))
    return list(rows.values())


def markdown(grid: Grid, rows: list[dict]) -> str:
    """Settings down, methods across, ``mean (std)`` in percent, as the paper's tables."""
    settings = list(dict.fromkeys(tuple(r["setting"].items()) for r in rows))
    methods = list(grid.methods)
    head = [", ".join(k.split(".")[-1] for k in grid.axes) or "setting", *methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting in settings:
        cells = [", ".join(str(v) for _, v in setting) or "-"]
        for method in methods:
            match = [r for r in rows if tuple(r["setting"].items()) == setting
                     and r["method"] == method]
            cells.append(f"{100 * match[0]['mean']:.2f} ({100 * match[0]['std']:.2f})"
                         if match else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(grid: Grid, rows: list[dict], out_dir: Path, command: str) -> list[Path]:
    """The table as Markdown and JSON, a plot, and the command that made them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js, png = (out_dir / f"{grid.name}.{ext}" for ext in ("md", "json", "png"))
    seeds = len(grid.seeds)
    md.write_text(f"# {grid.name}\n\nFinal test accuracy, mean (std) over {seeds} seed(s), "
                  f"in percent.\n\n{markdown(grid, rows)}\nMade by:\n\n```sh\n{command}\n"
                  "```\n")
    keys = ("dataset", "model", "split", "method", "setting", "seeds", "mean", "std",
            "accuracies")
    js.write_text(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2) + "\n")
    plot(grid, rows, png)
    return [md, js, png]


def plot(grid: Grid, rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = list(dict.fromkeys(tuple(r["setting"].items()) for r in rows))
    labels = [", ".join(str(v) for _, v in s) or "-" for s in settings]
    methods = list(grid.methods)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(settings) * max(1, len(methods)) / 2),
                                    4))
    for m, method in enumerate(methods):
        means, stds = [], []
        for s in settings:
            match = [r for r in rows if tuple(r["setting"].items()) == s
                     and r["method"] == method]
            means.append(100 * match[0]["mean"] if match else float("nan"))
            stds.append(100 * match[0]["std"] if match else 0.0)
        xs = [i + (m - (len(methods) - 1) / 2) * width for i in range(len(settings))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=method)
    ax.set_xticks(range(len(settings)), labels)
    ax.set_xlabel(", ".join(k for k in grid.axes) or "setting")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(grid.name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _slug(value: object) -> str:
    text = str(value).replace("/", "-").replace(" ", "-").replace("+", "plus")
    return "".join(ch for ch in text if ch.isalnum() or ch in "-_.=").strip("-") or "x"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def command_line() -> str:
    return "zowarmup experiment " + " ".join(sys.argv[2:])
