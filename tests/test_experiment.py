"""`zowarmup experiment`: a grid of simulated runs as one table, resumable."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="the orchestrator needs its extra")

BASE = """
[run]
name = "grid"
[data]
clients = 4
alpha = 1.0
split = "50/50"
[model]
width = 4
[warmup]
rounds = 2
local_epochs = 1
[zo]
rounds = 2
directions = 1
[eval]
every = 2
"""

GRID = """
[experiment]
name = "tiny-grid"
base = "base.toml"
seeds = [0, 1]
out = "{out}"

[grid]
"data.split" = ["25/75", "75/25"]

[methods]
"High-Res-Only" = {{ "run.method" = "high-res-only" }}
"ZOWarmUp" = {{ "run.method" = "zowarmup" }}
"""


def test_a_grid_runs_every_cell_and_tabulates_mean_and_std(tmp_path, monkeypatch):
    from orchestrator.experiment import load_grid, markdown, run_grid, write_results
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "grid.toml").write_text(GRID.format(out=tmp_path / "runs"))
    grid = load_grid(tmp_path / "grid.toml")
    assert len(grid.cells()) == 8
    rows = run_grid(grid)
    assert len(rows) == 4 and all(r["seeds"] == [0, 1] for r in rows)
    for r in rows:
        accs = r["accuracies"]
        assert r["mean"] == pytest.approx(sum(accs) / 2)
        assert r["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2)
    assert {(r["split"], r["method"]) for r in rows} == {
        (s, m) for s in ("25/75", "75/25") for m in ("High-Res-Only", "ZOWarmUp")}
    table = markdown(grid, rows)
    assert table.splitlines()[0] == "| split | High-Res-Only | ZOWarmUp |"
    files = write_results(grid, rows, tmp_path / "results", "zowarmup experiment grid.toml")
    data = json.loads(files[1].read_text())
    assert {"dataset", "model", "split", "method", "seeds", "mean", "std"} <= set(data[0])
    assert "zowarmup experiment grid.toml" in files[0].read_text()
    by_method = {r["method"]: r for r in data}
    assert by_method["High-Res-Only"]["pivot_mean"] is None  # no pivot: it never switches
    assert 0.0 <= by_method["ZOWarmUp"]["pivot_mean"] <= 1.0
    assert "at the pivot" in files[0].read_text()
    pivot_round = by_method["ZOWarmUp"]["pivot_rounds"][0]
    assert by_method["ZOWarmUp"]["pivot_rounds"] == [pivot_round] * 2  # a fixed pivot
    assert f"(round {pivot_round})" in files[0].read_text()
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files[3].name == "tiny-grid-curves.png" and files[3].read_bytes()[:4] == b"\x89PNG"
    for r in data:  # the curve ends at the final accuracies the table averages
        rnd, mean, std = r["curve"][-1]
        assert mean == pytest.approx(r["mean"]) and std == pytest.approx(r["std"])
    # finished runs are kept: a second call runs nothing and gives the same table
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("summary.json")}
    assert markdown(grid, run_grid(grid)) == table
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("summary.json")}


def test_a_grid_with_a_bad_field_is_refused_before_any_run(tmp_path):
    from orchestrator.experiment import ExperimentError, load_grid
    from protocols.errors import ZoError
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "grid.toml").write_text(GRID.format(out=tmp_path / "runs").replace(
        '"run.method" = "zowarmup"', '"zo.directionz" = 2'))
    with pytest.raises(ZoError, match="directionz"):
        load_grid(tmp_path / "grid.toml")
    (tmp_path / "g2.toml").write_text("[experiment]\nbase = 'base.toml'\n")
    with pytest.raises(ExperimentError, match="seeds"):
        load_grid(tmp_path / "g2.toml")
    assert not (tmp_path / "runs").exists()


SEARCH = """
[search]
validation = 0.25
seeds = [5]
[search.space]
"ZOWarmUp" = {{ "zo.lr" = [1e-3, 1e6] }}
"High-Res-Only" = {{ "warmup.client_lr" = [0.05, 0.2] }}
"""


def test_a_search_chooses_on_the_validation_split_and_never_a_diverged_value(tmp_path,
                                                                              monkeypatch):
    from orchestrator.experiment import DIVERGED, load_grid, markdown, run_grid
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.toml").write_text(BASE)
    grid_text = GRID.format(out=tmp_path / "runs").replace('"25/75", "75/25"', '"50/50"')
    (tmp_path / "grid.toml").write_text(grid_text.replace("seeds = [0, 1]", "seeds = [0]")
                                        + SEARCH.format())
    grid = load_grid(tmp_path / "grid.toml")
    rows = run_grid(grid)
    by_method = {r["method"]: r for r in rows}
    assert by_method["ZOWarmUp"]["chosen"] == {"zo.lr": 1e-3}  # 1e6 diverged
    assert set(by_method["High-Res-Only"]["chosen"]) == {"warmup.client_lr"}
    search_root = tmp_path / "runs" / "search"
    assert len(list(search_root.rglob(DIVERGED))) == 1
    searched = [json.loads(p.read_text()) for p in search_root.rglob("summary.json")]
    assert len(searched) == 3 and all(s["final_val_acc"] is not None for s in searched)
    finals = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("summary.json")
              if search_root not in p.parents]
    assert len(finals) == 2 and all(s["final_val_acc"] is None for s in finals)
    assert "lr 0.001*" in markdown(grid, rows, chosen=True)  # the first of its grid
    assert by_method["ZOWarmUp"]["at_edge"] == ["zo.lr"]
    scores = {s["values"]["zo.lr"]: s["val_acc"] for s in by_method["ZOWarmUp"]["search"]}
    assert scores[1e6] is None and 0.0 <= scores[1e-3] <= 1.0  # diverged: no score
    hro = by_method["High-Res-Only"]["search"]
    assert [s["values"]["warmup.client_lr"] for s in hro] == [0.05, 0.2]
    best = max(hro, key=lambda s: (s["val_acc"], -s["val_loss"]))["values"]["warmup.client_lr"]
    assert by_method["High-Res-Only"]["chosen"] == {"warmup.client_lr": best}


def test_a_tie_on_validation_accuracy_goes_to_the_lower_validation_loss(tmp_path,
                                                                         monkeypatch):
    """~150 validation images tie often; the first listed candidate (the grid's smallest
    step) must not win a tie by its place in the list."""
    from orchestrator.experiment import best_candidate, load_grid
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.toml").write_text(BASE)
    grid_text = GRID.format(out=tmp_path / "runs").replace('"25/75", "75/25"', '"50/50"')
    (tmp_path / "grid.toml").write_text(grid_text.replace("seeds = [0, 1]", "seeds = [0]")
                                        + SEARCH.replace("1e6", "1e-2").format())
    grid = load_grid(tmp_path / "grid.toml")
    setting = grid.settings()[0]
    cells = grid.search_cells(setting, "ZOWarmUp")
    for cell, (acc, loss) in zip(cells, [(0.9, 0.40), (0.9, 0.30)]):
        run_dir = cell.directory(grid.search_root())
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps({"final_val_acc": acc}))
        (run_dir / "metrics.jsonl").write_text(json.dumps(
            {"round": 3, "phase": "zo", "test_acc": 0.5, "val_acc": acc, "val_loss": loss})
            + "\n")
    assert dict(best_candidate(grid, cells)) == {"zo.lr": 1e-2}  # listed second
    (cells[0].directory(grid.search_root()) / "summary.json").write_text(
        json.dumps({"final_val_acc": 0.95}))
    assert dict(best_candidate(grid, cells)) == {"zo.lr": 1e-3}  # accuracy comes first


def test_the_validation_split_comes_from_training_data_only():
    from orchestrator.config import parse_config, tomllib
    from orchestrator.run.state import plan_run
    plain = plan_run(parse_config(tomllib.loads(BASE), "base"))
    held = plan_run(parse_config(tomllib.loads(
        BASE.replace("[data]", "[data]\nvalidation_fraction = 0.2")), "held"))
    x_val, y_val = held.validation
    assert len(held.dataset.y_train) + len(y_val) == len(plain.dataset.y_train)
    assert abs(len(y_val) / len(plain.dataset.y_train) - 0.2) < 0.02
    assert held.dataset.x_test.tobytes() == plain.dataset.x_test.tobytes()
    test_rows = {r.tobytes() for r in plain.dataset.x_test}
    assert not any(r.tobytes() in test_rows for r in x_val)
    assert set(held.evaluation_sets()) == {"test", "val"}


def test_parallel_jobs_give_the_bits_of_one_job(tmp_path, monkeypatch):
    from orchestrator.experiment import load_grid, run_grid
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.toml").write_text(BASE)
    sha = {}
    for jobs in (1, 2):
        out = tmp_path / f"runs-{jobs}"
        (tmp_path / "grid.toml").write_text(GRID.format(out=out).replace(
            '"25/75", "75/25"', '"50/50"'))
        run_grid(load_grid(tmp_path / "grid.toml"), jobs=jobs)
        sha[jobs] = {p.relative_to(out): json.loads(p.read_text())["final_sha256"]
                     for p in out.rglob("summary.json")}
    assert len(sha[1]) == 4 and sha[1] == sha[2]


def test_a_run_the_split_does_not_change_is_run_once(tmp_path, monkeypatch):
    from orchestrator.experiment import load_grid, run_grid
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "grid.toml").write_text(GRID.format(out=tmp_path / "runs").replace(
        "seeds = [0, 1]", "seeds = [0]").replace(
        '"ZOWarmUp" = {{ "run.method" = "zowarmup" }}'.replace("{{", "{").replace("}}", "}"),
        '"ZO from scratch" = { "run.method" = "zo-scratch" }'))
    rows = run_grid(load_grid(tmp_path / "grid.toml"))
    scratch = [r for r in rows if r["method"] == "ZO from scratch"]
    assert len(scratch) == 2 and scratch[0]["accuracies"] == scratch[1]["accuracies"]
    dirs = sorted((tmp_path / "runs").glob("split=*/ZO-from-scratch/seed-0"))
    assert len(dirs) == 2 and sum(d.is_symlink() for d in dirs) == 1
    hro = sorted((tmp_path / "runs").glob("split=*/High-Res-Only/seed-0"))
    assert len(hro) == 2 and not any(d.is_symlink() for d in hro)


def test_a_table_run_that_diverges_is_reported_not_fatal(tmp_path, monkeypatch):
    from orchestrator.experiment import DIVERGED, load_grid, markdown, run_grid, write_results
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.toml").write_text(BASE)
    grid_text = GRID.format(out=tmp_path / "runs").replace('"25/75", "75/25"', '"50/50"')
    grid_text = grid_text.replace('"ZOWarmUp" = {{ "run.method" = "zowarmup" }}'.format(),
                                  '"ZOWarmUp" = { "run.method" = "zowarmup", "zo.lr" = 1e6 }')
    (tmp_path / "grid.toml").write_text(grid_text.replace("seeds = [0, 1]", "seeds = [0]"))
    rows = run_grid(load_grid(tmp_path / "grid.toml"))
    by_method = {r["method"]: r for r in rows}
    assert by_method["ZOWarmUp"]["diverged_seeds"] == [0]
    assert by_method["ZOWarmUp"]["mean"] is None
    assert by_method["High-Res-Only"]["mean"] is not None
    assert len(list((tmp_path / "runs").rglob(DIVERGED))) == 1
    grid = load_grid(tmp_path / "grid.toml")
    assert "diverged (1/1)" in markdown(grid, rows)
    files = write_results(grid, rows, tmp_path / "results", "zowarmup experiment grid.toml")
    assert json.loads(files[1].read_text())[1]["diverged_seeds"] == [0]


def test_ray_without_its_extra_is_a_clear_error_before_any_run(tmp_path, monkeypatch):
    """--ray needs Ray, an extra of its own; without it nothing runs and the message says
    what to install."""
    import sys

    from orchestrator.cluster import ClusterError
    from orchestrator.experiment import load_grid, run_grid
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where it is absent
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "grid.toml").write_text(GRID.format(out=tmp_path / "runs"))
    with pytest.raises(ClusterError, match=r"zowarmup\[ray\]"):
        run_grid(load_grid(tmp_path / "grid.toml"), jobs=2, ray="local")
    assert not (tmp_path / "runs").exists()


SHARED = """
[search]
validation = 0.25
seeds = [100]
[search.space]
"High-Res-Only" = {{ "warmup.client_lr" = [0.05, 0.2] }}
"ZOWarmUp" = {{ "zo.lr" = [1e-3, 1e-2] }}
[search.shared]
"ZOWarmUp" = {{ "warmup.client_lr" = "High-Res-Only" }}
"""


def test_a_shared_value_is_the_other_methods_choice_at_the_same_setting(tmp_path):
    """ZOWarmUp's search runs with the warm-up learning rate High-Res-Only chose at the
    same split, and keeps it in its own choice; only its own key is searched."""
    from orchestrator.experiment import ExperimentError, chosen_so_far, load_grid
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "grid.toml").write_text(GRID.format(out=tmp_path / "runs") + SHARED.format())
    grid = load_grid(tmp_path / "grid.toml")
    best = {"25/75": 0.2, "75/25": 0.05}  # what High-Res-Only's (pretend) search runs found
    for setting in grid.settings():
        for cell in grid.search_cells(setting, "High-Res-Only"):
            lr = dict(cell.tuned)["warmup.client_lr"]
            run = cell.directory(grid.search_root())
            run.mkdir(parents=True)
            score = 0.9 if lr == best[dict(setting)["data.split"]] else 0.5
            (run / "summary.json").write_text(json.dumps({"final_val_acc": score}))
    chosen = chosen_so_far(grid)
    for setting in grid.settings():
        lr = best[dict(setting)["data.split"]]
        assert chosen[(setting, "High-Res-Only")] == (("warmup.client_lr", lr),)
        zo = grid.search_cells(setting, "ZOWarmUp", grid.search.inherited(
            setting, "ZOWarmUp", chosen))
        assert [dict(c.tuned) for c in zo] == [{"warmup.client_lr": lr, "zo.lr": v}
                                               for v in (1e-3, 1e-2)]
        assert dict(chosen[(setting, "ZOWarmUp")])["warmup.client_lr"] == lr
    bad = SHARED.format().replace('"warmup.client_lr" = "High-Res-Only"',
                                  '"zo.lr" = "High-Res-Only"')
    (tmp_path / "bad.toml").write_text(GRID.format(out=tmp_path / "runs") + bad)
    with pytest.raises(ExperimentError, match="shared.ZOWarmUp"):
        load_grid(tmp_path / "bad.toml")


def test_a_method_that_searches_nothing_takes_its_values_along_a_chain(tmp_path):
    """A method with an empty space runs no search: it takes ZOWarmUp's learning rate, which
    takes its warm-up's from High-Res-Only; a circle is refused when the grid is read."""
    from orchestrator.experiment import ExperimentError, chosen_so_far, load_grid
    grid_text = GRID.format(out=tmp_path / "runs").replace(
        '"ZOWarmUp" = {{ "run.method" = "zowarmup" }}'.replace("{{", "{").replace("}}", "}"),
        '"ZOWarmUp" = { "run.method" = "zowarmup" }\n'
        '"Copy" = { "run.method" = "zowarmup", "zo.directions" = 2 }')
    chain = SHARED.format() + ('"Copy" = { "warmup.client_lr" = "ZOWarmUp", '
                               '"zo.lr" = "ZOWarmUp" }\n'
                               '[search.space.Copy]\n')
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "grid.toml").write_text(grid_text + chain)
    grid = load_grid(tmp_path / "grid.toml")
    assert grid.search.stages(list(grid.methods)) == [["High-Res-Only"], ["ZOWarmUp"], ["Copy"]]
    for setting in grid.settings():  # ZOWarmUp's (pretend) search: 1e-2 won
        for cell in grid.search_cells(setting, "ZOWarmUp",
                                      (("warmup.client_lr", 0.05),)):
            run = cell.directory(grid.search_root())
            run.mkdir(parents=True)
            score = 0.9 if dict(cell.tuned)["zo.lr"] == 1e-2 else 0.5
            (run / "summary.json").write_text(json.dumps({"final_val_acc": score}))
    chosen = chosen_so_far(grid)  # High-Res-Only ran nothing: its first candidate, 0.05
    for setting in grid.settings():
        assert dict(chosen[(setting, "Copy")]) == {"warmup.client_lr": 0.05, "zo.lr": 1e-2}
    circle = chain.replace('"ZOWarmUp" = { "warmup.client_lr" = "High-Res-Only" }',
                           '"ZOWarmUp" = { "warmup.client_lr" = "Copy" }')
    (tmp_path / "circle.toml").write_text(grid_text + circle)
    with pytest.raises(ExperimentError, match="circle"):
        load_grid(tmp_path / "circle.toml")


def test_no_run_process_outlives_a_killed_experiment(tmp_path):
    """SIGKILL to `zowarmup experiment --jobs 2` while its runs are going: its job processes
    (and their workers) end on their own, none is left (checked by PID)."""
    import os
    import signal
    import time

    from tests.runs import alive, descendants, spawn_zowarmup
    (tmp_path / "base.toml").write_text(BASE.replace("rounds = 2\ndirections", "rounds = 40\n"
                                                     "directions"))
    (tmp_path / "grid.toml").write_text(GRID.format(out=tmp_path / "runs"))
    proc = spawn_zowarmup("experiment", str(tmp_path / "grid.toml"), "--jobs", "2",
                          cwd=tmp_path)
    end, below = time.time() + 120, []
    while time.time() < end and not list((tmp_path / "runs").rglob("journal")):
        below = sorted(set(below) | set(descendants(proc.pid)))
        time.sleep(0.1)
    below = sorted(set(below) | set(descendants(proc.pid)))
    assert list((tmp_path / "runs").rglob("journal")) and len(below) >= 2  # runs under way
    os.kill(proc.pid, signal.SIGKILL)  # the experiment only: no chance to clean up
    proc.wait()
    end = time.time() + 30
    while time.time() < end and any(alive(p) for p in below):
        time.sleep(0.2)
    left = [p for p in below if alive(p)]
    for p in left:  # not to leave them to the next test when this one fails
        os.kill(p, signal.SIGKILL)
    assert not left
