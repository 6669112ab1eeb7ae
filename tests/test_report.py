"""The run report: reading run directories, derived figures, the table, the plot, the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.report import (
    ReportError,
    format_table,
    human_bytes,
    plot,
    read_metrics,
    read_summary,
    report_command,
    summarize,
)
from protocols.errors import ZoError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WARM_BYTES = 4_800_000  # a small CNN's float32 weights, each way, per client
ZO_UP, ZO_DOWN = 48, 1200  # projected gradients up; seeds and scalars down


def _row(rnd: int, phase: str, acc: float | None, participants: int, up: int, down: int) -> dict:
    return {"round": rnd, "phase": phase, "test_acc": acc,
            "test_loss": None if acc is None else round(2.3 * (1 - acc), 4),
            "participants": participants, "uplink_bytes": up * participants,
            "downlink_bytes": down * participants, "wall_s": round(3.5 * (rnd + 1), 2)}


def zowarmup_rows() -> list[dict]:
    """5 warm-up rounds on 3 high-resource clients (evaluated at rounds 1 and 3), then
    5 ZO rounds on 10 clients (evaluated at 5, 7 and 9)."""
    warm_acc = {1: 0.21, 3: 0.34}
    zo_acc = {5: 0.41, 7: 0.47, 9: 0.45}
    return ([_row(r, "warmup", warm_acc.get(r), 3, WARM_BYTES, WARM_BYTES) for r in range(5)]
            + [_row(r, "zo", zo_acc.get(r), 10, ZO_UP, ZO_DOWN) for r in range(5, 10)])


def high_res_only_rows() -> list[dict]:
    """10 warm-up rounds on 3 clients, evaluated every other round, no ZO phase."""
    acc = {1: 0.18, 3: 0.29, 5: 0.36, 7: 0.40, 9: 0.39}
    return [_row(r, "warmup", acc.get(r), 3, WARM_BYTES, WARM_BYTES) for r in range(10)]


def make_run(root: Path, name: str, rows: list[dict], summary: dict | None = None,
             tail: str = "", config: str | None = None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (run_dir / "metrics.jsonl").write_text(text)
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if config is not None:
        (run_dir / "config.toml").write_text(config)
    return run_dir


def finished_summary() -> dict:
    return {"name": "cifar-zowarmup", "method": "zowarmup", "dataset": "cifar10",
            "model": "cnn", "final_acc": 0.4512, "best_acc": 0.4731, "pivot_acc": 0.3399,
            "pivot_round": 5, "warmup_rounds": 5, "zo_rounds": 5, "agents": 10,
            "bytes_per_client_round": {"warmup": {"uplink": 4.8e6, "downlink": 4.8e6},
                                       "zo": {"uplink": 48.0, "downlink": 1200.0}},
            "final_sha256": "ab" * 32, "wall_s": 35.0}


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    """An unfinished ZOWarmUp run with a torn last line and a finished High-Res-Only run
    without summary (derived), both with a config naming the run."""
    zow = make_run(tmp_path, "zow", zowarmup_rows(), tail='{"round": 10, "phase": "zo", "te',
                   config='[run]\nname = "cifar-zowarmup"\nmethod = "zowarmup"\n')
    hro = make_run(tmp_path, "hro", high_res_only_rows(),
                   config='[run]\nname = "cifar-hro"\nmethod = "high-res-only"\n')
    return zow, hro


# --- reading ----------------------------------------------------------------------------


def test_read_metrics_skips_a_torn_last_line(runs):
    zow, _ = runs
    rows = read_metrics(zow)
    assert [r["round"] for r in rows] == list(range(10))
    assert rows[-1]["phase"] == "zo"


def test_read_metrics_keeps_a_complete_last_line_without_newline(tmp_path):
    rows = zowarmup_rows()
    run_dir = make_run(tmp_path, "r", rows[:-1], tail=json.dumps(rows[-1]))
    assert len(read_metrics(run_dir)) == 10


def test_read_metrics_refuses_missing_directory_and_file(tmp_path):
    with pytest.raises(ReportError, match="no such run directory"):
        read_metrics(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="metrics.jsonl"):
        read_metrics(tmp_path / "empty")
    assert issubclass(ReportError, ZoError)


def test_read_metrics_refuses_a_corrupt_middle_line(tmp_path):
    lines = [json.dumps(r) for r in zowarmup_rows()]
    lines[3] = lines[3][:20]
    run_dir = tmp_path / "bad"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match="line 4"):
        read_metrics(run_dir)


def test_read_metrics_refuses_a_record_without_round_in_the_middle(tmp_path):
    rows = zowarmup_rows()
    run_dir = make_run(tmp_path, "r", rows[:2], tail='{"phase": "zo"}\n' + json.dumps(rows[2]))
    with pytest.raises(ReportError, match="line 3"):
        read_metrics(run_dir)


def test_read_summary(tmp_path):
    assert read_summary(make_run(tmp_path, "a", zowarmup_rows())) is None
    s = read_summary(make_run(tmp_path, "b", zowarmup_rows(), finished_summary()))
    assert s["final_acc"] == 0.4512
    bad = make_run(tmp_path, "c", zowarmup_rows())
    (bad / "summary.json").write_text('{"name": ')
    with pytest.raises(ReportError, match="summary.json"):
        read_summary(bad)


# --- figures ----------------------------------------------------------------------------


def test_summarize_derives_figures_from_metrics(runs):
    zow, _ = runs
    s = summarize(zow)
    assert s["status"] == "unfinished"
    assert (s["name"], s["method"]) == ("cifar-zowarmup", "zowarmup")
    # Round 4 (the last warm-up round) was not evaluated: the pivot is round 3's figure.
    assert s["pivot_acc"] == pytest.approx(0.34)
    assert s["pivot_round"] == 5
    assert s["final_acc"] == pytest.approx(0.45)
    assert s["best_acc"] == pytest.approx(0.47)
    assert (s["warmup_rounds"], s["zo_rounds"]) == (5, 5)
    per = s["bytes_per_client_round"]
    assert per["warmup"] == {"uplink": WARM_BYTES, "downlink": WARM_BYTES}
    assert per["zo"] == {"uplink": ZO_UP, "downlink": ZO_DOWN}
    assert s["run_dir"] == str(zow)


def test_summarize_high_res_only_has_no_pivot(runs):
    _, hro = runs
    s = summarize(hro)
    assert s["pivot_acc"] is None and s["pivot_round"] is None
    assert (s["warmup_rounds"], s["zo_rounds"]) == (10, 0)
    assert s["final_acc"] == pytest.approx(0.39)
    assert s["best_acc"] == pytest.approx(0.40)
    assert s["method"] == "high-res-only"


def test_summarize_without_config_names_the_run_by_its_directory(tmp_path):
    s = summarize(make_run(tmp_path, "plain-run", zowarmup_rows()))
    assert s["name"] == "plain-run" and s["method"] is None


def test_summarize_prefers_the_summary(tmp_path):
    run_dir = make_run(tmp_path, "done", zowarmup_rows(), finished_summary())
    s = summarize(run_dir)
    assert s["status"] == "finished"
    assert s["final_acc"] == 0.4512 and s["pivot_acc"] == 0.3399
    assert s["final_sha256"] == "ab" * 32


def test_summarize_missing_directory(tmp_path):
    with pytest.raises(ReportError, match="no such run directory"):
        summarize(tmp_path / "nowhere")


# --- table ------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (48, "48 B"), (1023, "1023 B"), (1200, "1.2 KiB"), (1536, "1.5 KiB"),
    (4_800_000, "4.6 MiB"), (1000 * 1024, "1000.0 KiB"), (3 * 1024**3, "3.0 GiB"), (None, "-"),
])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_format_table(runs, tmp_path):
    zow, hro = runs
    done = make_run(tmp_path, "done", zowarmup_rows(), finished_summary())
    table = format_table([summarize(zow), summarize(hro), summarize(done)])
    lines = table.splitlines()
    header, zow_line, hro_line, done_line = lines[0], lines[2], lines[3], lines[4]
    for word in ("run", "method", "rounds", "pivot acc", "final acc", "best acc", "ZO up",
                 "status"):
        assert word in header
    assert "cifar-zowarmup" in zow_line and "5+5" in zow_line
    assert "34.00%" in zow_line and "45.00%" in zow_line and "47.00%" in zow_line
    assert "4.6 MiB" in zow_line and "48 B" in zow_line and "1.2 KiB" in zow_line
    assert zow_line.rstrip().endswith("unfinished")
    assert "10+0" in hro_line and "high-res-only" in hro_line and "40.00%" in hro_line
    assert "48 B" not in hro_line  # no ZO phase: its traffic columns read "-"
    assert "33.99%" in done_line and "45.12%" in done_line and "47.31%" in done_line
    assert done_line.rstrip().endswith("finished")
    # Columns line up: each value starts where its header does.
    start = header.index("method")
    assert zow_line[start:].startswith("zowarmup")
    assert hro_line[start:].startswith("high-res-only")
    end = header.index("final acc") + len("final acc")  # right-aligned
    assert zow_line[:end].endswith("45.00%") and hro_line[:end].endswith("39.00%")


# --- plot -------------------------------------------------------------------------------


def test_plot_writes_a_png(runs, tmp_path):
    import matplotlib.image

    zow, hro = runs
    one = plot([zow], tmp_path / "one.png")
    two = plot([zow, hro], tmp_path / "out" / "two.png", title="CIFAR-10")
    for png in (one, two):
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert one.read_bytes() != two.read_bytes()
    image = matplotlib.image.imread(two)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500


def test_plot_marks_each_pivot_and_evaluated_rounds_only(runs, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    zow, hro = runs
    saved = []
    original = Figure.savefig

    def capture(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    plot([zow, hro], tmp_path / "p.png")
    (ax,) = saved[0].axes
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert [list(ln.get_xdata()) for ln in dashed] == [[5, 5]]  # only the ZOWarmUp run
    curves = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    assert [list(ln.get_xdata()) for ln in curves] == [[1, 3, 5, 7, 9], [1, 3, 5, 7, 9]]
    assert list(curves[0].get_ydata()) == pytest.approx([21, 34, 41, 47, 45])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "cifar-zowarmup (zowarmup)" in labels and "cifar-hro (high-res-only)" in labels
    assert any("pivot" in t and "5" in t for t in labels)
    assert ax.get_xlabel() and ax.get_ylabel()


# --- command ----------------------------------------------------------------------------


def _runner() -> CliRunner:
    """A runner whose result.stdout holds stdout alone (click 8.1 mixes by default)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always keeps them apart
        return CliRunner()


def test_command_prints_table_and_plot_path(runs):
    zow, hro = runs
    result = _runner().invoke(report_command, [str(zow), str(hro)])
    assert result.exit_code == 0, result.output
    assert "cifar-zowarmup" in result.stdout and "cifar-hro" in result.stdout
    assert "34.00%" in result.stdout
    default_png = zow / "accuracy.png"
    assert f"plot: {default_png}" in result.stdout
    assert default_png.read_bytes().startswith(PNG_SIGNATURE)


def test_command_json_and_plot_option(runs, tmp_path):
    zow, hro = runs
    png = tmp_path / "figs" / "acc.png"
    result = _runner().invoke(report_command, [str(zow), str(hro), "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["cifar-zowarmup", "cifar-hro"]
    assert rows[0]["pivot_acc"] == pytest.approx(0.34)
    assert png.is_file() and not (zow / "accuracy.png").exists()


def test_command_no_plot(runs):
    zow, _ = runs
    result = _runner().invoke(report_command, [str(zow), "--no-plot"])
    assert result.exit_code == 0, result.output
    assert "plot:" not in result.output
    assert not (zow / "accuracy.png").exists()


def test_command_missing_dir(tmp_path):
    result = _runner().invoke(report_command, [str(tmp_path / "nowhere")])
    assert result.exit_code != 0
    assert "nowhere" in result.output and "does not exist" in result.output


def test_command_needs_a_run_dir():
    result = _runner().invoke(report_command, [])
    assert result.exit_code != 0


def test_command_corrupt_middle_line(tmp_path):
    lines = [json.dumps(r) for r in zowarmup_rows()]
    lines[2] = "not json"
    run_dir = tmp_path / "bad"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = _runner().invoke(report_command, [str(run_dir), "--no-plot"])
    assert result.exit_code == 1
    assert "line 3" in result.output and "metrics.jsonl" in result.output
    assert "Traceback" not in result.output


def test_command_directory_without_metrics(tmp_path):
    result = _runner().invoke(report_command, [str(tmp_path), "--no-plot"])
    assert result.exit_code == 1
    assert "metrics.jsonl" in result.output


def test_command_help_teaches_usage():
    result = CliRunner().invoke(report_command, ["--help"])
    assert result.exit_code == 0
    assert "zowarmup report" in result.output and "--no-plot" in result.output
