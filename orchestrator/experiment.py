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

Learning rates can be searched, as the paper does, on a validation split carved out of the
training data (never on the test split)::

    [search]
    validation = 0.2                  # data.validation_fraction of the search runs
    seeds = [100]                     # the search runs' seeds
    [search.space]                    # per method, "*" for the rest: axes to try
    "*" = { "zo.lr" = [3e-3, 1e-2, 3e-2] }
    "High-Res-Only" = { "warmup.client_lr" = [0.03, 0.1, 0.3] }

For every setting and method, each combination runs on the search seeds with the
validation split held out; the one with the best mean final validation accuracy (a
diverged run counts as the worst) is used for the table's runs, on all the training data.
A method may take a value from another method's choice at the same setting instead of
searching it again, so that two methods train the same part the same way (ZOWarmUp's
warm-up is High-Res-Only's training, cut at the pivot)::

    [search.shared]
    "ZOWarmUp" = { "warmup.client_lr" = "High-Res-Only" }

Those methods are searched once the others have chosen.

Every run is an ordinary run directory (simulated ZO phase, same bits as over MQTT), so
``zowarmup report`` reads any of them, and a stopped experiment picks up where it stopped:
finished runs are kept. The table gives the final test accuracy as mean (std) over seeds.
Runs go one after another, ``jobs`` at once in processes of this machine, or with ``ray``
as tasks on a Ray cluster (``cluster.py``); a run's bits do not depend on which.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edge_agent.lifeline import exit_with_parent
from protocols.errors import ZoError

from .cluster import LOCAL, RayCluster, ray_cluster
from .config import Config, load_config
from .run.job import execute
from .run.state import METRICS, SUMMARY, Diverged, held, read_metrics

log = logging.getLogger("zowarmup.experiment")


class ExperimentError(ZoError):
    """A grid file that cannot be run, and what is wrong with it."""


Overrides = tuple[tuple[str, object], ...]


@dataclass(frozen=True)
class Cell:
    setting: Overrides  # the grid axes' values
    method: str
    seed: int
    tuned: Overrides = ()  # values the search chose (or, for a search run, is trying)

    def directory(self, root: Path) -> Path:
        parts = [f"{k.split('.')[-1]}={_slug(v)}" for k, v in self.setting]
        tuned = [f"{k.split('.')[-1]}={_slug(v)}" for k, v in self.tuned]
        return root.joinpath(*parts, _slug(self.method), *tuned, f"seed-{self.seed}")


@dataclass(frozen=True)
class Search:
    """Learning-rate (or any) search on a validation split, per setting and method."""

    validation: float
    seeds: tuple[int, ...]
    spaces: dict[str, dict[str, list]]  # method name or "*" -> {config key: values}
    # method -> {config key: the method whose choice, at the same setting, it takes}
    shared: dict[str, dict[str, str]] = field(default_factory=dict)

    def candidates(self, method: str) -> list[Overrides]:
        space = self.own_space(method)
        keys = list(space)
        return [tuple(zip(keys, values)) for values in itertools.product(*space.values())]

    def own_space(self, method: str) -> dict[str, list]:
        """What ``method`` searches itself (``{}``: nothing; it runs no search)."""
        return self.spaces.get(method, self.spaces.get("*", {}))

    def stages(self, methods: list[str]) -> list[list[str]]:
        """The methods in the order their searches can run: each after every method it
        takes a value from (a cycle is refused when the grid is read)."""
        stages, placed = [], set()
        while len(placed) < len(methods):
            ready = [m for m in methods if m not in placed
                     and set(self.shared.get(m, {}).values()) <= placed]
            if not ready:
                raise ExperimentError("[search.shared] takes values in a circle: "
                                      f"{', '.join(m for m in methods if m not in placed)}")
            stages.append(ready)
            placed |= set(ready)
        return stages

    def inherited(self, setting: Overrides, method: str,
                  chosen: dict[tuple[Overrides, str], Overrides]) -> Overrides:
        """The values ``method`` takes from other methods' choices at ``setting``."""
        return tuple((key, dict(chosen.get((setting, source), ())).get(key))
                     for key, source in self.shared.get(method, {}).items())


@dataclass(frozen=True)
class Grid:
    name: str
    base: Path
    seeds: tuple[int, ...]
    out: Path
    axes: dict[str, list]
    methods: dict[str, dict[str, object]]
    overrides: tuple[str, ...] = ()
    search: Search | None = None

    def settings(self) -> list[Overrides]:
        keys = list(self.axes)
        return [tuple(zip(keys, values))
                for values in itertools.product(*(self.axes[k] for k in keys))]

    def cells(self, chosen: dict[tuple[Overrides, str], Overrides] | None = None
              ) -> list[Cell]:
        """The table's runs; with a search, each (setting, method) uses its chosen values."""
        chosen = chosen or {}
        return [Cell(setting, method, seed, chosen.get((setting, method), ()))
                for setting in self.settings() for method in self.methods
                for seed in self.seeds]

    def search_cells(self, setting: Overrides, method: str, inherited: Overrides = ()
                     ) -> list[Cell]:
        """The search runs of one setting and method; ``inherited``: the values it takes
        from another method's choice, the same in every candidate."""
        assert self.search is not None
        return [Cell(setting, method, seed, inherited + candidate)
                for candidate in self.search.candidates(method) for seed in self.search.seeds]

    def search_root(self) -> Path:
        return self.out / "search"

    def config(self, cell: Cell, validation: float = 0.0, root: Path | None = None
               ) -> Config:
        sets = [f"{k}={_toml(v)}" for k, v in cell.setting]
        sets += [f"{k}={_toml(v)}" for k, v in self.methods[cell.method].items()]
        sets += [f"{k}={_toml(v)}" for k, v in cell.tuned]
        if validation:
            sets.append(f"data.validation_fraction={validation!r}")
        sets += [f"run.seed={cell.seed}", f"run.out={cell.directory(root or self.out)}",
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
    unknown = set(data) - {"experiment", "grid", "methods", "search"}
    if unknown:
        raise ExperimentError(f"{path}: unknown table(s) {sorted(unknown)}; a grid file has "
                              "[experiment], [grid], [methods] and [search]")
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
    search = _search(data["search"], methods, path) if "search" in data else None
    grid = Grid(str(e.get("name", path.stem)), (path.parent / e["base"]).resolve(),
                tuple(seeds), Path(e.get("out", f"runs/{path.stem}")).resolve(), axes,
                methods, tuple(overrides), search)
    first = {cell.method: cell for cell in reversed(grid.cells())}
    for cell in first.values():  # every method's config is valid before any run starts
        grid.config(cell)
        if search:
            for candidate in grid.search_cells(cell.setting, cell.method)[:1]:
                grid.config(candidate, search.validation, grid.search_root())
    return grid


def _search(table: object, methods: dict, path: Path) -> Search:
    where = f"{path}: [search]"
    if not isinstance(table, dict):
        raise ExperimentError(f"{where} must be a table")
    unknown = set(table) - {"validation", "seeds", "space", "shared"}
    if unknown:
        raise ExperimentError(f"{where} has unknown key(s) {sorted(unknown)}; it takes "
                              "validation, seeds, space and shared")
    validation = table.get("validation", 0.2)
    if not (isinstance(validation, float) and 0 < validation < 1):
        raise ExperimentError(f"{where}: validation must be a fraction in (0, 1), "
                              f"got {validation!r}")
    seeds = table.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)):
        raise ExperimentError(f"{where}: seeds must be a non-empty list of integers")
    spaces = table.get("space", {})
    if not (isinstance(spaces, dict) and spaces):
        raise ExperimentError(f"{where}: space must name, per method (or \"*\"), the values "
                              "to try, e.g. \"*\" = {{ \"zo.lr\" = [1e-3, 1e-2] }}")
    for method, space in spaces.items():
        if method != "*" and method not in methods:
            raise ExperimentError(f"{where}: space names {method!r}, which is not a method "
                                  f"({', '.join(methods)})")
        if not (isinstance(space, dict)
                and all(isinstance(v, list) and v for v in space.values())):
            raise ExperimentError(f"{where}: space.{method} must map config keys to "
                                  "non-empty lists of values ({} for a method that searches "
                                  "nothing of its own)")
    found = Search(validation, tuple(seeds), spaces,
                   _shared(table.get("shared", {}), spaces, methods, where))
    found.stages(list(methods))  # refuses a circle now, before any run
    return found


def _shared(table: object, spaces: dict, methods: dict, where: str) -> dict[str, dict[str, str]]:
    """``[search.shared]``: per method, the keys whose value it takes from another method's
    search (e.g. the warm-up's learning rate High-Res-Only chose, for ZOWarmUp's warm-up)."""
    if not isinstance(table, dict):
        raise ExperimentError(f"{where}: shared must be a table of methods")
    out: dict[str, dict[str, str]] = {}
    for method, keys in table.items():
        if method not in methods or not isinstance(keys, dict) or not keys:
            raise ExperimentError(f"{where}: shared.{method} must be a method of [methods] "
                                  "mapping config keys to the method whose choice it takes")
        own = spaces.get(method, spaces.get("*", {}))
        for key, source in keys.items():
            chooses = (set(spaces.get(source, spaces.get("*", {})))
                       | set(table.get(source, {}))) if source in methods else set()
            if key not in chooses or key in own:
                raise ExperimentError(
                    f"{where}: shared.{method}: {key!r} from {source!r} needs a method that "
                    f"chooses {key!r} (searches it, or takes it from another), and a key "
                    f"{method!r} does not search itself")
        out[method] = dict(keys)
    return out


def run_grid(grid: Grid, jobs: int = 1, ray: str | None = None) -> list[dict]:
    """Run the search (if any) and every cell not finished yet; one row per setting/method.

    ``jobs`` runs that many cells at once, each in its own process; ``ray`` (an address, or
    ``"local"`` for an instance started here with ``jobs`` CPUs, all if 1) runs each cell
    as a Ray task instead. Every run trains with one torch thread however it is run, so
    its bits do not depend on how the grid ran.
    """
    logging.getLogger("zowarmup.progress").setLevel(logging.WARNING)  # a line per run instead
    if ray is not None:
        with ray_cluster(ray, jobs if ray == LOCAL and jobs > 1 else None) as cluster:
            return _run_grid(grid, jobs, cluster)
    return _run_grid(grid, jobs, None)


def _run_grid(grid: Grid, jobs: int, cluster: RayCluster | None) -> list[dict]:
    chosen = search(grid, jobs, cluster) if grid.search else {}
    _run_all(grid, grid.cells(chosen), jobs, search=False, cluster=cluster)
    return table_rows(grid, chosen)


def search(grid: Grid, jobs: int = 1, cluster: RayCluster | None = None
           ) -> dict[tuple[Overrides, str], Overrides]:
    """Run every search cell; the chosen values per (setting, method)."""
    assert grid.search is not None
    chosen: dict[tuple[Overrides, str], Overrides] = {}
    for stage in grid.search.stages(list(grid.methods)):
        cells = _search_cells(grid, stage, chosen)
        _run_all(grid, [c for group in cells.values() for c in group], jobs, search=True,
                 cluster=cluster)
        for (setting, method), group in cells.items():
            chosen[(setting, method)] = _choice(grid, setting, method, group, chosen)
            log.info("search %s %s: chose %s", method, dict(setting),
                     dict(chosen[(setting, method)]))
    return chosen


def _choice(grid: Grid, setting: Overrides, method: str, group: list[Cell],
            chosen: dict[tuple[Overrides, str], Overrides]) -> Overrides:
    """The best of a method's search runs; with nothing of its own to search, the values it
    takes from the others."""
    assert grid.search is not None
    if not group:
        return grid.search.inherited(setting, method, chosen)
    return best_candidate(grid, group)


def _search_cells(grid: Grid, methods: list[str],
                  chosen: dict[tuple[Overrides, str], Overrides]
                  ) -> dict[tuple[Overrides, str], list[Cell]]:
    assert grid.search is not None
    return {(setting, method): grid.search_cells(
                setting, method, grid.search.inherited(setting, method, chosen))
            if grid.search.own_space(method) else []
            for setting in grid.settings() for method in methods}


def _run_all(grid: Grid, cells: list[Cell], jobs: int, search: bool,
             cluster: RayCluster | None = None) -> None:
    """Run the cells not finished yet; a cell whose run would be the same as an earlier
    one's (ZO from scratch ignores the split) links to that run instead of repeating it."""
    kind = "search" if search else "run"
    first: dict[str, Cell] = {}
    copies: list[tuple[Cell, Cell]] = []
    todo = []
    for i, cell in enumerate(cells, 1):
        key = _same_run_key(grid, cell, search)
        if key in first:
            copies.append((cell, first[key]))
        else:
            first[key] = cell
            if not _finished(grid, cell, search):
                todo.append((i, cell))
    if cluster is not None:
        cluster.run(_task, [_task_args(grid, cell, f"{kind} {i}/{len(cells)}", search)
                            for i, cell in todo])
        _check_visible(grid, [cell for _, cell in todo], search)
    elif jobs <= 1:
        for i, cell in todo:
            _run(grid, cell, f"{kind} {i}/{len(cells)}", search)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"),
                                    initializer=_job_process, initargs=(os.getpid(),)
                                    ) as pool:
            futures = [pool.submit(_run, grid, cell, f"{kind} {i}/{len(cells)}", search, 1)
                       for i, cell in todo]
            for future in cf.as_completed(futures):
                future.result()  # an error in any run stops the grid, with its message
    root = grid.search_root() if search else grid.out
    for cell, same in copies:
        link, target = cell.directory(root), same.directory(root)
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def _same_run_key(grid: Grid, cell: Cell, search: bool) -> str:
    """What decides a run's bits: its config without its name and directory, and without
    what its method ignores (ZO from scratch: the split and the warm-up)."""
    root = grid.search_root() if search else grid.out
    data = grid.config(cell, grid.search.validation if search else 0.0, root).to_dict()
    data["run"].pop("out", None)
    data["run"].pop("name", None)
    if data["run"].get("method") == "zo-scratch":
        data.pop("warmup", None)
        data["data"].pop("split", None)
    return json.dumps(data, sort_keys=True, default=str)


def _job_process(parent: int) -> None:
    """A ``--jobs`` process: it logs a line per run, and ends with the experiment's process
    however that one ends (a pool's workers outlive a killed parent otherwise)."""
    exit_with_parent(parent)
    _job_logging()


def _job_logging() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("zowarmup.progress", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def best_candidate(grid: Grid, cells: list[Cell]) -> Overrides:
    """The values with the best mean final validation accuracy, ties broken by the lower
    mean final validation loss (diverged: worst; still tied: the first listed).

    A validation split of ~150 images moves in steps of ~0.7 points, so candidates often
    tie on accuracy; taking the first would favour whichever end of a grid is listed
    first (the smallest step), where the loss still tells them apart."""
    scores = _candidate_scores(grid, cells)

    def rank(candidate: Overrides) -> tuple[float, float]:
        accs, losses = zip(*(figures or (-1.0, math.inf) for figures in scores[candidate]))
        return sum(accs) / len(accs), -sum(losses) / len(losses)
    return max(scores, key=rank)


def _candidate_scores(grid: Grid, cells: list[Cell], skip: int = 0
                      ) -> dict[Overrides, list[tuple[float, float] | None]]:
    """Per candidate (its values past the first ``skip``, the inherited ones), the final
    validation accuracy and loss of each of its search runs, in the grid's order."""
    scores: dict[Overrides, list[tuple[float, float] | None]] = {}
    for cell in cells:
        scores.setdefault(cell.tuned[skip:], []).append(
            validation_figures(cell.directory(grid.search_root())))
    return scores


def validation_figures(run_dir: Path) -> tuple[float, float] | None:
    """The finished run's final validation accuracy and loss (None: unfinished, diverged
    or without a validation split)."""
    summary = _summary(run_dir)
    if not summary or summary.get("final_val_acc") is None:
        return None
    evaluated = [r for r in read_metrics(run_dir / METRICS) if r.get("val_loss") is not None]
    loss = float(evaluated[-1]["val_loss"]) if evaluated else math.inf
    return float(summary["final_val_acc"]), loss if math.isfinite(loss) else math.inf


DIVERGED = "diverged.json"


def _finished(grid: Grid, cell: Cell, search: bool) -> bool:
    return _done(cell.directory(grid.search_root() if search else grid.out))


def _done(run_dir: Path) -> bool:
    """A run with a result: its summary, or the record that it diverged."""
    return (run_dir / SUMMARY).exists() or (run_dir / DIVERGED).exists()


def _run(grid: Grid, cell: Cell, label: str, search: bool = False,
         workers: int | None = None) -> None:
    if not _finished(grid, cell, search):
        claimed_run(*_task_args(grid, cell, label, search), workers)


def _task_args(grid: Grid, cell: Cell, label: str, search: bool
               ) -> tuple[Config, Path, str, bool]:
    """What a run needs wherever it runs: its resolved config and its directory."""
    root = grid.search_root() if search else grid.out
    config = grid.config(cell, grid.search.validation if search else 0.0, root)
    return config, cell.directory(root), label, search


def _task(config: Config, run_dir: Path, label: str, search: bool) -> None:
    """One run as a Ray task: in a worker process of any node, as a ``--jobs`` process."""
    _job_logging()
    claimed_run(config, run_dir, label, search, 1)


def claimed_run(config: Config, run_dir: Path, label: str, search: bool = False,
                workers: int | None = None) -> None:
    """The run, unless another experiment finished it meanwhile: grids that share a run
    directory (docs/results' ceilings and Table 2) may run at once, and one waits for the
    other's run of a cell they share instead of running it a second time beside it."""
    with held(run_dir.parent / f"{run_dir.name}.claim", wait=True):
        if not _done(run_dir):
            run_config(config, run_dir, label, search, workers)


def _check_visible(grid: Grid, cells: list[Cell], search: bool) -> None:
    for cell in cells:
        if not _finished(grid, cell, search):
            where = cell.directory(grid.search_root() if search else grid.out)
            raise ExperimentError(f"{where}: the run finished on the Ray cluster, but its "
                                  "directory is not here; on several machines "
                                  "experiment.out must be on a file system every node "
                                  "mounts at the same path")


def run_config(config: Config, run_dir: Path, label: str, search: bool = False,
               workers: int | None = None) -> None:
    """One run of a grid; a diverged run is recorded as its cell's result."""
    torch.set_num_threads(1)
    log.info("%s: %s", label, run_dir)
    try:
        summary = execute(config, run_dir, simulate=True, workers=workers)
    except Diverged as exc:
        # A search candidate that diverges loses; a table run that diverges is a result
        # (an ablation's setting may be unstable) and its cell says so.
        log.warning("%s: diverged (%s)", label, exc)
        (run_dir / DIVERGED).write_text(json.dumps({"error": str(exc)}) + "\n")
        return
    figure = summary["final_val_acc"] if search else summary["final_acc"]
    log.info("%s: final %s accuracy %.4f (%.0f s)", label, "validation" if search else "test",
             figure, summary["wall_s"])


def _summary(run_dir: Path) -> dict | None:
    file = run_dir / SUMMARY
    return json.loads(file.read_text()) if file.exists() else None


def chosen_so_far(grid: Grid) -> dict[tuple[Overrides, str], Overrides]:
    """The search's choices from the runs on disk (for a table of a partial experiment)."""
    if grid.search is None:
        return {}
    chosen: dict[tuple[Overrides, str], Overrides] = {}
    for stage in grid.search.stages(list(grid.methods)):
        for (setting, method), group in _search_cells(grid, stage, chosen).items():
            chosen[(setting, method)] = _choice(grid, setting, method, group, chosen)
    return chosen


def edges(grid: Grid, method: str, chosen: Overrides) -> list[str]:
    """The fields of ``method``'s own search whose chosen value is the first or last of its
    candidates: a best at the edge of a grid may lie beyond it, so a table says so."""
    space = grid.search.own_space(method) if grid.search else {}
    return [key for key, value in chosen
            if len(space.get(key, ())) > 1 and value in (space[key][0], space[key][-1])]


def search_scores(grid: Grid, setting: Overrides, method: str,
                  chosen: dict[tuple[Overrides, str], Overrides]) -> list[dict]:
    """Every candidate of ``method``'s own search at ``setting`` with its mean final
    validation accuracy (None: not run or diverged), so a reader sees how flat it was."""
    if grid.search is None or not grid.search.own_space(method):
        return []
    inherited = grid.search.inherited(setting, method, chosen)
    scores = _candidate_scores(grid, grid.search_cells(setting, method, inherited),
                               skip=len(inherited))
    return [{"values": dict(candidate),
             "val_acc": None if None in vals else sum(v[0] for v in vals) / len(vals),
             "val_loss": None if None in vals or not all(math.isfinite(v[1]) for v in vals)
             else sum(v[1] for v in vals) / len(vals)}  # JSON has no infinity
            for candidate, vals in scores.items()]


def table_rows(grid: Grid, chosen: dict[tuple[Overrides, str], Overrides] | None = None
               ) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for cell in grid.cells(chosen):
        run_dir = cell.directory(grid.out)
        diverged = (run_dir / DIVERGED).exists()
        if not diverged and not (run_dir / SUMMARY).exists():
            continue
        config = grid.config(cell)
        row = rows.setdefault((cell.setting, cell.method), {
            "dataset": config.data.dataset, "model": config.model.name,
            "split": config.data.split, "method": cell.method,
            "setting": {k: v for k, v in cell.setting}, "chosen": dict(cell.tuned),
            "at_edge": edges(grid, cell.method, cell.tuned),
            "search": search_scores(grid, cell.setting, cell.method, chosen or {}),
            "seeds": [], "accuracies": [], "diverged_seeds": [], "pivot_accuracies": [],
            "pivot_rounds": [], "curves": []})
        if diverged:
            row["diverged_seeds"].append(cell.seed)
            continue
        summary = json.loads((run_dir / SUMMARY).read_text())
        row["seeds"].append(cell.seed)
        row["accuracies"].append(summary["final_acc"])
        if summary.get("pivot_acc") is not None:  # ZOWarmUp: the warm-up's model at the pivot
            row["pivot_accuracies"].append(summary["pivot_acc"])
            row["pivot_rounds"].append(summary.get("pivot_round"))
        row["curves"].append({r["round"]: r["test_acc"] for r in read_metrics(run_dir / METRICS)
                              if r.get("test_acc") is not None})
    for row in rows.values():
        row["curve"] = _mean_curve(row.pop("curves"))
        pivots = row["pivot_accuracies"]
        row["pivot_mean"] = sum(pivots) / len(pivots) if pivots else None
        accs = row["accuracies"]
        row["mean"] = sum(accs) / len(accs) if accs else None
        row["std"] = (math.sqrt(sum((a - row["mean"]) ** 2 for a in accs) / len(accs))
                      if accs else None)
    return list(rows.values())


def _mean_curve(curves: list[dict[int, float]]) -> list[list[float]]:
    """``[round, mean, std]`` of test accuracy over the seeds, at the rounds every seed's run
    evaluated (a seed that diverged has no curve and is left out, as from the table)."""
    if not curves:
        return []
    rounds = sorted(set.intersection(*(set(c) for c in curves)))
    points = []
    for r in rounds:
        accs = [c[r] for c in curves]
        mean = sum(accs) / len(accs)
        points.append([r, mean, math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))])
    return points


def _cell_text(row: dict) -> str:
    """``mean (std)`` in percent, and how many seeds diverged, if any did."""
    lost = len(row["diverged_seeds"])
    if row["mean"] is None:
        return f"diverged ({lost}/{lost})"
    text = f"{100 * row['mean']:.2f} ({100 * row['std']:.2f})"
    return text + (f", {lost} of {lost + len(row['seeds'])} seeds diverged" if lost else "")


def _chosen_text(row: dict) -> str:
    """The chosen values, a value at the edge of its own search's grid marked with ``*``."""
    return ", ".join(f"{k.split('.')[-1]} {v}{'*' if k in row['at_edge'] else ''}"
                     for k, v in row["chosen"].items()) or "-"


def _pivot_text(row: dict) -> str:
    """The mean accuracy at the pivot, and the mean pivot round when it varies by seed."""
    if row["pivot_mean"] is None:
        return "-"
    rounds = [r for r in row["pivot_rounds"] if r is not None]
    text = f"{100 * row['pivot_mean']:.2f}"
    if rounds and len(set(rounds)) > 1:
        return text + f" (round {sum(rounds) / len(rounds):.0f}, {min(rounds)}–{max(rounds)})"
    return text + (f" (round {rounds[0]})" if rounds else "")


def markdown(grid: Grid, rows: list[dict], chosen: bool = False, pivot: bool = False) -> str:
    """Settings down, methods across, ``mean (std)`` in percent, as the paper's tables
    (or, with ``chosen``, the values the search picked for each cell; with ``pivot``, the
    mean accuracy of the warm-up's model at the pivot, where a method has one)."""
    settings = list(dict.fromkeys(tuple(r["setting"].items()) for r in rows))
    methods = list(grid.methods)
    head = [", ".join(k.split(".")[-1] for k in grid.axes) or "setting", *methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting in settings:
        cells = [", ".join(str(v) for _, v in setting) or "-"]
        for method in methods:
            match = [r for r in rows if tuple(r["setting"].items()) == setting
                     and r["method"] == method]
            if chosen:
                cells.append(_chosen_text(match[0]) if match else "-")
                continue
            if pivot:
                cells.append(_pivot_text(match[0]) if match else "-")
                continue
            cells.append(_cell_text(match[0]) if match else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(grid: Grid, rows: list[dict], out_dir: Path, command: str) -> list[Path]:
    """The table as Markdown and JSON, a plot, and the command that made them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js, png = (out_dir / f"{grid.name}.{ext}" for ext in ("md", "json", "png"))
    curves_png = out_dir / f"{grid.name}-curves.png"
    seeds = len(grid.seeds)
    tuned = ""
    if grid.search:
        tuned = (f"\nValues chosen on a validation split ({grid.search.validation:.0%} of the "
                 f"training data, seeds {list(grid.search.seeds)}; * the first or last value "
                 "of its search's grid; every candidate's validation accuracy is in the "
                 f"JSON):\n\n{markdown(grid, rows, chosen=True)}")
    pivots = ""
    if any(r["pivot_mean"] is not None for r in rows):
        pivots = ("\nTest accuracy at the pivot (the warm-up's model, before any ZO round), "
                  "mean over the same seeds, and the pivot round (mean, range):\n\n"
                  f"{markdown(grid, rows, pivot=True)}")
    md.write_text(f"# {grid.name}\n\nFinal test accuracy, mean (std) over {seeds} seed(s), "
                  f"in percent.\n\n{markdown(grid, rows)}{pivots}{tuned}\nMade by:\n\n"
                  f"```sh\n{command}\n```\n")
    keys = ("dataset", "model", "split", "method", "setting", "chosen", "seeds", "mean", "std",
            "accuracies", "diverged_seeds", "pivot_mean", "pivot_accuracies", "pivot_rounds",
            "at_edge", "search", "curve")
    js.write_text(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2) + "\n")
    plot(grid, rows, png)
    plot_curves(grid, rows, curves_png)
    return [md, js, png, curves_png]


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
            done = match and match[0]["mean"] is not None  # all seeds diverged: no bar
            means.append(100 * match[0]["mean"] if done else float("nan"))
            stds.append(100 * match[0]["std"] if done else 0.0)
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


def plot_curves(grid: Grid, rows: list[dict], path: Path) -> None:
    """Test accuracy against round, one panel per setting: each method's mean over the
    seeds with a band of one standard deviation, and a dotted line at its mean pivot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = list(dict.fromkeys(tuple(r["setting"].items()) for r in rows))
    fig, axes = plt.subplots(1, max(1, len(settings)), squeeze=False, sharey=True,
                             figsize=(max(6, 3.2 * len(settings)), 3.6))
    for ax, setting in zip(axes[0], settings):
        for m, method in enumerate(grid.methods):
            match = [r for r in rows if tuple(r["setting"].items()) == setting
                     and r["method"] == method and r["curve"]]
            if not match:
                continue
            rounds, means, stds = zip(*match[0]["curve"])
            lo = [100 * (a - d) for a, d in zip(means, stds)]
            hi = [100 * (a + d) for a, d in zip(means, stds)]
            ax.plot(rounds, [100 * a for a in means], color=f"C{m % 10}", label=method)
            ax.fill_between(rounds, lo, hi, color=f"C{m % 10}", alpha=0.2, linewidth=0)
            pivots = [p for p in match[0]["pivot_rounds"] if p]
            if pivots:
                ax.axvline(sum(pivots) / len(pivots), color=f"C{m % 10}", linestyle=":",
                           linewidth=1)
        ax.set_title(", ".join(f"{k.split('.')[-1]} {v}" for k, v in setting) or grid.name,
                     fontsize=9)
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{grid.name}: mean over seeds, band ±1 std, dotted: mean pivot",
                 fontsize=9)
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
