"""What a prompt-tuning experiment cost in black-box queries, per device, from its run directories.

``zowarmup experiment`` tabulates accuracy; this adds what Fed-BBPT is billed by: the API
queries each device made (its agents' own count, which the endpoint's count matches in
every summary). Run it on the same grid file after the experiment::

    python -m orchestrator.bbpt.queries docs/results/bbpt-image.toml --results docs/results

It writes ``NAME-queries.md`` and ``NAME-queries.json`` beside the accuracy table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..experiment import Grid, load_grid
from ..run.state import SUMMARY


def query_rows(grid: Grid) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for cell in grid.cells():
        file = cell.directory(grid.out) / SUMMARY
        if not file.exists():
            continue
        s = json.loads(file.read_text())
        if s.get("endpoint_queries_per_device", s["queries_per_device"]) != s["queries_per_device"]:
            raise ValueError(f"{file}: the agents' and the endpoint's query counts differ")
        row = rows.setdefault((cell.setting, cell.method), {
            "dataset": s["dataset"], "model": s["model"], "split": s["split"],
            "method": cell.method, "seeds": [], "queries_per_device": [], "zero_shot_acc": [],
            "final_acc": []})
        row["seeds"].append(cell.seed)
        row["queries_per_device"].append(s["queries_per_device"])
        row["zero_shot_acc"].append(s["zero_shot_acc"])
        row["final_acc"].append(s["final_acc"])
    for row in rows.values():
        counts = [c for run in row["queries_per_device"] for c in run.values()]
        row["devices"] = max((len(run) for run in row["queries_per_device"]), default=0)
        row["mean_queries_per_device"] = float(np.mean(counts)) if counts else 0.0
        row["mean_queries_per_run"] = float(np.mean([sum(run.values())
                                                     for run in row["queries_per_device"]]))
    return list(rows.values())


def markdown(rows: list[dict]) -> str:
    lines = ["| split | method | devices tuning | queries per device (mean) | queries per run "
             "(mean) | zero-shot acc. | final acc. |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['split']} | {r['method']} | {r['devices']} | "
                     f"{r['mean_queries_per_device']:.0f} | {r['mean_queries_per_run']:.0f} | "
                     f"{100 * np.mean(r['zero_shot_acc']):.2f} | "
                     f"{100 * np.mean(r['final_acc']):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    grid = load_grid(args.grid)
    rows = query_rows(grid)
    table = markdown(rows)
    print(table)
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{grid.name}-queries.md").write_text(
            f"# {grid.name}: black-box queries\n\nAPI queries (one per scored batch) each "
            f"device made, over {len(grid.seeds)} seed(s); the endpoint's count matched the "
            f"devices' own in every run.\n\n{table}\nMade by:\n\n```sh\npython -m "
            f"orchestrator.bbpt.queries {args.grid} --results {args.results}\n```\n")
        (args.results / f"{grid.name}-queries.json").write_text(json.dumps(rows, indent=2)
                                                                 + "\n")


if __name__ == "__main__":
    main()
