"""The torch ZO engine (``zo.engine = "torch"``): a simulated run on it, checked against the
numpy path and the agent's engine, on CPU torch (a GPU runs the same code on another device).

The loss of every zoo model against ONNX Runtime's is checked in ``tests/test_export.py``
(``test_the_torch_engine_computes_what_the_graph_computes``), on the exports made there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the orchestrator needs its extra")

from edge_agent.engine import ZoEngine  # noqa: E402
from edge_agent.shard import load_shard  # noqa: E402
from orchestrator.config import ConfigError, parse_config  # noqa: E402
from orchestrator.rounds.model import ModelState  # noqa: E402
from orchestrator.rounds.torch_engine import Job, TorchEngine  # noqa: E402
from orchestrator.run.job import execute  # noqa: E402
from orchestrator.train.exported import zoo_module  # noqa: E402
from protocols.directions import DirectionSpec, axpy  # noqa: E402
from protocols.journal import read_journal  # noqa: E402
from protocols.zo import Commit, weights_sha256  # noqa: E402

WIDTH = 4
CONFIG = {
    "run": {"name": "torch-engine", "seed": 5},
    "data": {"dataset": "digits", "clients": 3, "alpha": 1.0, "split": "34/66"},
    "model": {"name": "cnn", "width": WIDTH},
    "warmup": {"rounds": 1, "local_epochs": 1, "client_lr": 0.1},
    # two local steps of two directions: grouped first steps, then each client's own
    "zo": {"rounds": 3, "directions": 2, "local_steps": 2, "local_lr": 0.02, "lr": 0.01,
           "engine": "torch", "micro_batch": 32},
    "eval": {"every": 3},
}


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "torch"
    config = parse_config({**CONFIG, "run": {**CONFIG["run"], "out": str(out)}})
    execute(config, out, simulate=True)
    return out


def _bits(arrays) -> list[bytes]:
    return [np.ascontiguousarray(a, dtype=np.float32).tobytes() for a in arrays]


def test_a_torch_run_replays_to_its_final_bits_on_the_numpy_path(torch_run):
    """The journal the torch engine's run wrote, replayed by ModelState (numpy), ends on the
    SHA-256 the run reported; every round committed every client's pairs."""
    summary = json.loads((torch_run / "summary.json").read_text())
    commits = read_journal(torch_run / "journal").commits
    assert [c.commit.round for c in commits] == [0, 1, 2]
    assert all(len(c.commit.pairs) == 3 * 4 for c in commits)
    state = ModelState.load(torch_run / "model", DirectionSpec(), commits)
    assert weights_sha256(state.weights) == summary["final_sha256"]
    assert state.fingerprint() == commits[-1].fingerprint


def test_a_round_is_the_agent_engines_round(torch_run):
    """Two clients sharing a seed (as with a direction pool) and each with one of its own,
    two local steps: the torch engine's losses are the agent's within 1e-5, its scalars
    within what that allows, and its base weights end on their exact bits."""
    model, spec = torch_run / "model", DirectionSpec()
    state = ModelState.load(model, spec)
    shards = [load_shard(torch_run / "shards" / f"client-00{i}.npz", state.manifest)
              for i in (0, 1)]
    engine = TorchEngine(zoo_module(model, state.manifest, WIDTH), spec, "cpu", micro_batch=32,
                         batch=100)
    engine.load(state.weights)
    engine.set_data(np.concatenate([s.x for s in shards]), np.concatenate([s.y for s in shards]))
    seeds = [(11, 12, 13, 14), (11, 22, 13, 24)]
    jobs = [Job(0, len(shards[0]), seeds[0]), Job(len(shards[0]), len(shards[1]), seeds[1])]
    eps, lr = 1e-2, 0.05
    ours = engine.rounds(jobs, eps, local_steps=2, local_lr=lr)
    assert _bits(engine.host_weights()) == _bits(state.weights)
    for shard, mine, out in zip(shards, seeds, ours):
        agent = ZoEngine(model, shard, spec, micro_batch=32, threads=1, manifest=state.manifest)
        theirs = agent.round(mine, eps, local_steps=2, local_lr=lr)
        assert out.samples == theirs.samples
        assert abs(out.loss - theirs.loss) <= 1e-5
        np.testing.assert_allclose(out.scalars, theirs.scalars, rtol=0, atol=2e-5 / eps)
    inplace = TorchEngine(zoo_module(model, state.manifest, WIDTH), spec, "cpu",
                          micro_batch=32, exact=False)  # MeZO's way: restored by subtraction
    inplace.set_data(np.asarray(shards[0].x), shards[0].y)
    out = inplace.rounds([Job(0, len(shards[0]), seeds[0])], eps, 2, lr)[0]
    assert abs(out.loss - ours[0].loss) <= 1e-5
    np.testing.assert_allclose(np.concatenate([w.ravel() for w in inplace.host_weights()]),
                               np.concatenate([w.ravel() for w in state.weights]), rtol=1e-6,
                               atol=1e-8)


@pytest.mark.parametrize("spec", [DirectionSpec(), DirectionSpec("rademacher", 0.25),
                                  DirectionSpec("gaussian", 1.5)],
                         ids=["rademacher", "rademacher-scaled", "gaussian"])
def test_the_weights_it_evaluates_are_the_states_bits(torch_run, spec):
    """After a commit applied to ModelState (the one place commits are applied), the engine's
    weights are the state's bits, and the weights a loss is measured on are exactly the
    protocol's perturbation of them: numpy's axpy on the state, bit for bit."""
    model = torch_run / "model"
    state = ModelState.load(model, spec)
    state.apply(Commit(0, tuple((100 + i, 1e-3 * (i - 2)) for i in range(5))))
    engine = TorchEngine(zoo_module(model, state.manifest, WIDTH), spec, "cpu")
    engine.load(state.weights)
    assert engine.fingerprint() == state.fingerprint()
    for seed, alpha in ((7, 1e-3), (2**64 - 1, -0.3)):
        expected = [w.copy() for w in state.weights]
        axpy(expected, alpha, spec, seed)
        assert _bits(engine.evaluated_weights(seed, alpha)) == _bits(expected)
    assert _bits(engine.host_weights()) == _bits(state.weights)


def test_the_torch_engine_is_refused_where_it_cannot_run(tmp_path):
    """Prompt tuning has no zoo model to run; an MQTT run's clients are the agents."""
    with pytest.raises(ConfigError, match="zo.engine") as refused:
        parse_config({"run": {"method": "bbpt"}, "zo": {"engine": "torch", "directions": 2}})
    assert refused.value.field == "zo.engine"
    with pytest.raises(ConfigError, match="onnxruntime"):
        parse_config({"zo": {"engine": "cuda"}})
    from click.testing import CliRunner

    from orchestrator.cli import main
    (tmp_path / "c.toml").write_text("[zo]\nengine = \"torch\"\n")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "c.toml"), "--out",
                                       str(tmp_path / "run")])
    assert result.exit_code == 2 and "--simulate" in result.output
    assert not (tmp_path / "run").exists()


def test_the_exact_estimator_is_the_derivative_spsa_estimates(torch_run):
    """``zo.estimator = "exact"``: grad L . z on the client's shard, which SPSA's two-point
    scalar approaches as eps shrinks; the base weights are untouched."""
    model, spec = torch_run / "model", DirectionSpec(scale=0.5)
    state = ModelState.load(model, spec)
    shard = load_shard(torch_run / "shards" / "client-000.npz", state.manifest)
    engine = TorchEngine(zoo_module(model, state.manifest, WIDTH), spec, "cpu", micro_batch=32)
    engine.load(state.weights)
    engine.set_data(np.asarray(shard.x), np.asarray(shard.y))
    job = [Job(0, len(shard), (31, 32, 33))]
    exact = engine.rounds(job, 1e-3, estimator="exact")[0]
    spsa = engine.rounds(job, 1e-3)[0]
    assert exact.scalars == pytest.approx(spsa.scalars, rel=2e-2, abs=1e-3)
    assert max(abs(g) for g in exact.scalars) > 1e-2  # not trivially zero
    assert exact.loss == pytest.approx(float(np.mean(spsa.loss)), rel=1e-3)
    assert _bits(engine.host_weights()) == _bits(state.weights)
    with pytest.raises(ValueError, match="one local"):
        engine.rounds([Job(0, len(shard), (31, 32))], 1e-3, local_steps=2, estimator="exact")


def test_the_exact_estimator_needs_the_torch_engine_and_one_step():
    for zo in ({"estimator": "exact"}, {"estimator": "exact", "engine": "torch",
                                        "local_steps": 2}):
        with pytest.raises(ConfigError, match="zo.estimator"):
            parse_config({"zo": zo})
    assert parse_config({"zo": {"estimator": "exact", "engine": "torch"}}).zo.estimator == \
        "exact"
