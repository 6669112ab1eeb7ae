"""The automatic pivot: the warm-up hands over once its validation accuracy stops improving."""

from __future__ import annotations

import os
import signal
import time

import pytest

from orchestrator.config import ConfigError, parse_config, tomllib
from orchestrator.run.pivot import PlateauRule, validation_curve
from tests.runs import metrics_of, spawn_zowarmup, summary_of, zowarmup

pytest.importorskip("torch", reason="the orchestrator needs its extra")


# --- the rule -------------------------------------------------------------------------


def test_it_pivots_after_patience_evaluations_without_a_gain():
    rule = PlateauRule(min_rounds=1, max_rounds=100, patience=2, min_delta=0.01)
    curve = [(0, 0.50), (1, 0.70), (2, 0.80), (3, 0.805), (4, 0.79), (5, 0.95)]
    assert rule.pivot(curve[:4], done=4) is None  # one stale evaluation so far
    assert rule.pivot(curve[:5], done=5) == 5  # 0.805 and 0.79 are not 0.01 above 0.80


def test_it_never_pivots_before_min_rounds_and_always_by_max_rounds():
    flat = [(r, 0.5) for r in range(10)]
    early = PlateauRule(min_rounds=1, max_rounds=100, patience=2, min_delta=0.0)
    assert early.pivot(flat, done=10) == 3
    late = PlateauRule(min_rounds=7, max_rounds=100, patience=2, min_delta=0.0)
    assert late.pivot(flat[:6], done=6) is None
    assert late.pivot(flat, done=10) == 7
    rising = [(r, 0.1 * r) for r in range(8)]
    capped = PlateauRule(min_rounds=1, max_rounds=8, patience=2, min_delta=0.0)
    assert capped.pivot(rising[:7], done=7) is None
    assert capped.pivot(rising, done=8) == 8


def test_it_reads_validation_accuracy_of_warmup_rows_only():
    rows = [{"round": 0, "phase": "warmup", "val_acc": 0.4},
            {"round": 1, "phase": "warmup", "val_acc": None},
            {"round": 2, "phase": "warmup", "test_acc": 0.9},
            {"round": 3, "phase": "zo", "val_acc": 0.8}]
    assert validation_curve(rows) == [(0, 0.4)]


# --- the config -----------------------------------------------------------------------


def test_auto_needs_a_validation_split_and_room_for_zo_rounds():
    with pytest.raises(ConfigError, match="validation_fraction"):
        parse_config({"warmup": {"rounds": "auto"}})
    with pytest.raises(ConfigError, match="run.total_rounds"):
        parse_config({"run": {"total_rounds": 40}, "data": {"validation_fraction": 0.1},
                      "warmup": {"rounds": "auto", "max_rounds": 40}})
    with pytest.raises(ConfigError, match="min_rounds"):
        parse_config({"warmup": {"min_rounds": 9, "max_rounds": 8}})
    config = parse_config({"data": {"validation_fraction": 0.1}, "run": {"total_rounds": 20},
                           "warmup": {"rounds": "auto", "max_rounds": 10}})
    assert config.warmup.rounds == "auto"
    assert parse_config(tomllib.loads(config.to_toml())) == config


# --- a run ------------------------------------------------------------------------------

CONFIG = """
[run]
name = "auto"
seed = 5
total_rounds = 14

[data]
dataset = "digits"
clients = 4
alpha = 1.0
split = "50/50"
validation_fraction = 0.15

[model]
name = "cnn"
width = 8

[warmup]
rounds = "auto"
client_lr = 1e-7          # the warm-up barely moves: a plateau from the start
local_epochs = 1
batch_size = 32
min_rounds = 4
max_rounds = 10
patience = 1
min_delta = 0.01

[zo]
directions = 1
lr = 1e-2

[eval]
every = 1
"""


def test_a_run_pivots_on_the_plateau_and_a_resumed_run_pivots_at_the_same_round(tmp_path):
    config = tmp_path / "auto.toml"
    config.write_text(CONFIG)
    whole = tmp_path / "whole"
    done = zowarmup("run", str(config), "--simulate", "--out", str(whole), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = summary_of(whole)
    # flat from the first evaluation: stale at once, but never before min_rounds
    assert summary["pivot"] == "auto" and summary["pivot_round"] == 4
    assert (summary["warmup_rounds"], summary["zo_rounds"]) == (4, 10)  # the 14-round budget
    assert [r["phase"] for r in metrics_of(whole)] == ["warmup"] * 4 + ["zo"] * 10

    stopped = tmp_path / "stopped"
    proc = spawn_zowarmup("run", str(config), "--simulate", "--out", str(stopped), cwd=tmp_path)
    end = time.time() + 120
    while time.time() < end and len(metrics_of(stopped)) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-warm-up, before the pivot is decided
    proc.wait()
    assert 2 <= len(metrics_of(stopped)) < 4
    done = zowarmup("resume", str(stopped), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    again = summary_of(stopped)
    assert again["pivot_round"] == 4
    assert again["final_sha256"] == summary["final_sha256"]
