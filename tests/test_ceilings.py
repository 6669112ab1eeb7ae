"""Ceilings from the same pivot: first-order over every client, and ZO over the high-resource
clients only; what they run, that FedSGD is one exact gradient step, and that they resume."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the orchestrator needs its extra")

from orchestrator.config import parse_config  # noqa: E402
from orchestrator.run.ceilings import settings  # noqa: E402
from orchestrator.run.state import plan_run  # noqa: E402
from orchestrator.train.fedavg import Warmup  # noqa: E402
from orchestrator.train.zoo import build_model  # noqa: E402
from tests.runs import metrics_of, spawn_zowarmup, summary_of, zowarmup  # noqa: E402

CONFIG = """
[run]
name = "ceiling"
seed = 2
method = "{method}"

[data]
dataset = "digits"
clients = 4
alpha = 1.0
split = "50/50"

[model]
name = "cnn"
width = 8

[warmup]
rounds = 3
client_lr = 0.1
local_epochs = 1
batch_size = 32

[zo]
rounds = 6
directions = 1
lr = 1e-2
{zo}

[eval]
every = 2
"""


def _config(tmp_path, method: str, zo: str = "") -> object:
    path = tmp_path / f"{method}.toml"
    path.write_text(CONFIG.format(method=method, zo=zo))
    return path


def test_fedsgd_is_one_exact_gradient_step_of_the_union_of_the_shards():
    config = parse_config({"run": {"method": "fedsgd-all", "seed": 1},
                           "data": {"clients": 4, "alpha": 1.0, "split": "50/50"},
                           "model": {"name": "cnn", "width": 4},
                           "warmup": {"client_lr": 0.05, "local_epochs": 3, "batch_size": 8,
                                      "client_momentum": 0.9}})
    plan = plan_run(config)
    chosen = settings(config, plan)  # the warm-up's epochs, batches and momentum are replaced
    assert (chosen.local_epochs, chosen.client_momentum) == (1, 0.0)
    apart = parse_config({**config.to_dict(), "warmup": {**config.to_dict()["warmup"],
                                                         "ceiling_lr": 0.5}})
    assert settings(apart, plan).client_lr == 0.5  # the step size, apart from the warm-up's
    model = build_model("cnn", 10, 1, 8, 4, seed=1)
    start = [p.detach().clone() for p in model.parameters()]
    ds = plan.dataset
    clients = [(ds.x_train[idx], ds.y_train[idx]) for idx in plan.parts]
    Warmup(model, clients, list(range(4)), chosen, seed=1).run_round(0)
    union = np.concatenate(plan.parts)
    reference = build_model("cnn", 10, 1, 8, 4, seed=1)
    loss = torch.nn.functional.cross_entropy(
        reference(torch.from_numpy(ds.x_train[union])), torch.from_numpy(ds.y_train[union]))
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    for p, w, g in zip(model.parameters(), start, grads):
        torch.testing.assert_close(p.detach(), w - 0.05 * g, atol=2e-6, rtol=1e-4)
    assert any(float((p.detach() - w).abs().max()) > 1e-4
               for p, w in zip(model.parameters(), start))  # it did move


@pytest.fixture(scope="module")
def zo_high(tmp_path_factory):
    """A ZOWarmUp run whose ZO rounds take only the high-resource clients."""
    tmp_path = tmp_path_factory.mktemp("high")
    out = tmp_path / "run"
    done = zowarmup("run", str(_config(tmp_path, "zowarmup", 'clients = "high"')),
                    "--simulate", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_zo_over_the_high_resource_clients_only(zo_high):
    config = parse_config({"data": {"clients": 4, "alpha": 1.0, "split": "50/50"},
                           "run": {"seed": 2}})
    high = int(plan_run(config).high.sum())
    zo_rows = [r for r in metrics_of(zo_high) if r["phase"] == "zo"]
    assert len(zo_rows) == 6 and all(r["participants"] == high == 2 for r in zo_rows)


def test_fedavg_all_continues_the_same_warmup_over_every_client_and_resumes(tmp_path,
                                                                           zo_high):
    whole = tmp_path / "whole"
    done = zowarmup("run", str(_config(tmp_path, "fedavg-all")), "--out", str(whole),
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    rows, summary = metrics_of(whole), summary_of(whole)
    assert [r["phase"] for r in rows] == ["warmup"] * 3 + ["fo"] * 6
    assert all(r["participants"] == 4 for r in rows if r["phase"] == "fo")  # every client
    assert summary["pivot_acc"] == summary_of(zo_high)["pivot_acc"]  # the same pivot
    assert (summary["zo_rounds"], summary["first_order_rounds_after_pivot"]) == (0, 6)
    assert not (whole / "model").exists()  # nothing to export: no device takes part

    stopped = tmp_path / "stopped"
    proc = spawn_zowarmup("run", str(_config(tmp_path, "fedavg-all")), "--out", str(stopped),
                          cwd=tmp_path)
    end = time.time() + 120
    while time.time() < end and len(metrics_of(stopped)) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # after the pivot, in the first-order rounds
    proc.wait()
    assert 5 <= len(metrics_of(stopped)) < 9
    done = zowarmup("resume", str(stopped), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert summary_of(stopped)["final_sha256"] == summary["final_sha256"]
    assert [r["round"] for r in metrics_of(stopped)] == list(range(9))

