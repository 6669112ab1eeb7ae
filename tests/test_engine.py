"""The agent's ZO engine on a real exported model through ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.engine import ZoEngine
from edge_agent.shard import Shard, load_shard, save_shard
from protocols.directions import DirectionSpec, axpy
from protocols.errors import ProtocolError
from protocols.manifest import load_manifest, read_weights
from protocols.messages import CommitMessage
from protocols.zo import Commit, apply_commit, derive_seed, fingerprint

torch = pytest.importorskip("torch", reason="exporting the test model needs the orchestrator extra")


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), y.astype(np.int64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from export import export_model
    from orchestrator.train.zoo import build_model
    torch.manual_seed(0)
    model = build_model("cnn", 10, in_channels=1, image_size=8, width=8)
    out = tmp_path_factory.mktemp("cnn")
    export_model(model, out, (1, 8, 8), 10, model_name="cnn")
    return out, model


@pytest.fixture
def engine(model_dir, digits):
    x, y = digits
    return ZoEngine(model_dir[0], Shard(x[:200], y[:200]), micro_batch=32)


def test_loss_matches_torch_on_the_same_weights(engine, model_dir, digits):
    x, y = digits
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model_dir[1](torch.from_numpy(x[:200])),
                                                 torch.from_numpy(y[:200])).item()
    loss, correct = engine.evaluate()
    assert abs(loss - want) < 1e-5 and 0 <= correct <= 200


@pytest.mark.parametrize("spec", [DirectionSpec(), DirectionSpec("gaussian", 0.5)])
def test_round_restores_the_exact_bits_and_measures_the_spsa_scalar(engine, spec):
    engine.spec = spec
    before = engine.weights.to_canonical()
    seeds = [derive_seed(3, 0, 0, j) for j in range(3)]
    out = engine.round(seeds, eps=1e-2)
    assert engine.fingerprint() == fingerprint(before)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(engine.weights.to_canonical(), before))
    # the first scalar, recomputed through weights that are copies, not perturbed in place
    losses = []
    for alpha in (1e-2, -1e-2):
        copy = [w.copy() for w in before]
        axpy(copy, alpha, spec, seeds[0])
        engine.weights.assign(copy)
        losses.append(engine.evaluate()[0])
    assert out.scalars[0] == pytest.approx((losses[0] - losses[1]) / 2e-2, rel=1e-9, abs=1e-12)
    assert out.samples == 200 and out.undo_elements < 0.25 * engine.weights.num_parameters


def test_local_steps_are_undone_and_change_later_scalars(engine):
    fp = engine.fingerprint()
    seeds = [derive_seed(4, 0, 0, j) for j in range(4)]
    single = engine.round(seeds, 1e-2)
    steps = engine.round(seeds, 1e-2, local_steps=2, local_lr=0.5)
    assert engine.fingerprint() == fp
    assert steps.scalars[:2] == single.scalars[:2] and steps.scalars[2:] != single.scalars[2:]


@pytest.mark.parametrize("local_steps", [1, 3])
def test_restoring_by_copy_gives_the_bits_and_scalars_of_restoring_by_undo(
        model_dir, digits, local_steps):
    """The simulation's workers keep a copy of the weights instead of undoing each probe;
    every scalar, and the weights after the round and after its commit, are the same bits."""
    x, y = digits
    engines = [ZoEngine(model_dir[0], Shard(x[:120], y[:120]), micro_batch=32, restore=way)
               for way in ("undo", "copy")]
    seeds = [derive_seed(7, 0, 0, j) for j in range(6)]
    before = engines[0].fingerprint()
    # eps large enough that float32 rounding loses bits the undo log must patch
    outs = [e.round(seeds, 0.3, local_steps=local_steps, local_lr=0.2) for e in engines]
    assert outs[0].scalars == outs[1].scalars and outs[0].loss == outs[1].loss
    assert outs[0].undo_elements > 0 and outs[1].undo_elements == 0
    assert [e.fingerprint() for e in engines] == [before, before]
    commit = Commit(0, tuple(zip(seeds, (1e-3 * g for g in outs[0].scalars))))
    for e in engines:
        e.apply([CommitMessage(commit, before)])
    assert engines[0].fingerprint() == engines[1].fingerprint() != before
    with pytest.raises(ValueError, match="restore must be one of"):
        ZoEngine(model_dir[0], Shard(x[:8], y[:8]), restore="later")


def test_applying_commits_matches_the_protocol_and_lowers_the_loss(engine, model_dir):
    reference = read_weights(model_dir[0], load_manifest(model_dir[0]))[1]
    start_loss = engine.evaluate()[0]
    for r in range(15):
        seeds = [derive_seed(5, r, 0, j) for j in range(4)]
        out = engine.round(seeds, 1e-2)
        commit = Commit(r, tuple((s, 0.05 * g / 4) for s, g in zip(seeds, out.scalars)))
        apply_commit(reference, commit, engine.spec)
        assert engine.apply([CommitMessage(commit, fingerprint(reference))]) == \
            fingerprint(reference)
    assert engine.evaluate()[0] < start_loss


def test_perturbation_is_seen_by_onnx_runtime_without_rebinding(engine):
    base = engine.evaluate()[0]
    undo = engine.perturb(7, 0.5)
    assert engine.evaluate()[0] != base
    engine.restore(7, 0.5, undo)
    assert engine.evaluate()[0] == base


@pytest.mark.parametrize("change, message", [
    (lambda x, y: (x.astype(np.float64), y), "float32"),
    (lambda x, y: (x.reshape(len(x), 8, 8), y), "shape"),
    (lambda x, y: (x, y + 5), "labels span"),
    (lambda x, y: (x, y[:-1]), "one label per sample"),
    (lambda x, y: (np.where(x > 0.5, np.nan, x).astype(np.float32), y), "NaN"),
    (lambda x, y: (x[:0], y[:0]), "no samples"),
])
def test_bad_shards_are_refused_with_a_reason(model_dir, digits, tmp_path, change, message):
    x, y = change(*digits)
    save_shard(tmp_path / "s.npz", x, y) if x.dtype == np.float32 else \
        np.savez(tmp_path / "s.npz", x=x, y=y)
    with pytest.raises(ProtocolError, match=message):
        load_shard(tmp_path / "s.npz", load_manifest(model_dir[0]))


def test_a_good_shard_loads_with_its_metadata(model_dir, digits, tmp_path):
    save_shard(tmp_path / "s.npz", digits[0][:10], digits[1][:10], {"client": 3})
    shard = load_shard(tmp_path / "s.npz", load_manifest(model_dir[0]))
    assert len(shard) == 10 and shard.meta == {"client": 3}
    with pytest.raises(ProtocolError, match="no 'y'"):
        np.savez(tmp_path / "t.npz", x=digits[0][:10])
        load_shard(tmp_path / "t.npz", load_manifest(model_dir[0]))


def test_agent_bench_reports_round_time_and_memory(model_dir, digits, tmp_path):
    import json
    import subprocess
    import sys
    save_shard(tmp_path / "s.npz", digits[0][:300], digits[1][:300])
    cmd = [sys.executable, "-m", "edge_agent.cli", "bench", "--model", str(model_dir[0]),
           "--data", str(tmp_path / "s.npz"), "-s", "2", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["samples"] == 300 and report["directions"] == 2 and report["threads"] == 1
    assert report["round_s"] > 0 and report["forward_s"] > 0
    # a few MB of weights: the agent's whole process stays far below a torch client's
    assert 10 < report["peak_rss_mb"] < 300
    np.savez(tmp_path / "bad.npz", x=digits[0][:5], y=digits[1][:5] + 20)
    bad = subprocess.run(cmd[:7] + [str(tmp_path / "bad.npz")], capture_output=True, text=True)
    assert bad.returncode == 1 and "labels span" in bad.stderr


def test_constant_weight_sessions_see_the_current_weights_and_restore_exactly(model_dir, digits):
    x, y = digits
    shard = Shard(x[:200], y[:200])
    fast = ZoEngine(model_dir[0], shard, micro_batch=32, strategy="constants")
    plain = ZoEngine(model_dir[0], shard, micro_batch=32, strategy="inputs")
    assert abs(fast.evaluate()[0] - plain.evaluate()[0]) < 1e-6
    seeds = [derive_seed(8, 0, 0, j) for j in range(2)]
    a, b = fast.round(seeds, 1e-2), plain.round(seeds, 1e-2)
    assert np.allclose(a.scalars, b.scalars, rtol=1e-3, atol=1e-4)  # perturbations are seen
    assert fast.fingerprint() == plain.fingerprint()
    undo = fast.perturb(3, 0.5)
    assert abs(fast.evaluate()[0] - plain.evaluate()[0]) > 1e-4
    fast.restore(3, 0.5, undo)
    assert fast.evaluate()[0] == pytest.approx(plain.evaluate()[0], abs=1e-6)
    assert ZoEngine(model_dir[0], shard, micro_batch=32).strategy == "native"
    with pytest.raises(ValueError, match="strategy"):
        ZoEngine(model_dir[0], shard, strategy="fastest")


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A CNN on 32x32 colour images: activations, not weights, dominate its memory."""
    from export import export_model
    from orchestrator.train.zoo import build_model
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("wide")
    export_model(build_model("cnn", 10, in_channels=3, image_size=32, width=32), out / "model",
                 (3, 32, 32), 10, model_name="cnn")
    rng = np.random.default_rng(0)
    save_shard(out / "s.npz", rng.standard_normal((512, 3, 32, 32), dtype=np.float32),
               rng.integers(0, 10, 512))
    return out / "model", out / "s.npz"


def _bench(model: Path, shard: Path, *extra: str):
    import json
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "edge_agent.cli", "bench", "--model", str(model), "--data",
           str(shard), "--threads", "1", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return out.returncode, (json.loads(out.stdout) if out.returncode == 0 else out.stderr)


def test_a_memory_budget_picks_the_micro_batch_and_holds(wide_model):
    import re
    code, err = _bench(*wide_model, "--memory-budget", "40")
    assert code == 1 and "too small" in err, err
    least = float(re.search(r"least that works is about (\d+) MB", err).group(1))
    assert 40 < least < 400
    code, large = _bench(*wide_model, "--memory-budget", str(least + 400))
    assert code == 0 and large["micro_batch"] == 256 and large["peak_rss_mb"] <= least + 400
    budget = (least + large["peak_rss_mb"]) / 2  # room for some samples, not for 256
    code, small = _bench(*wide_model, "--memory-budget", str(budget))
    assert code == 0, small
    assert small["peak_rss_mb"] <= budget, (budget, small)
    assert 1 <= small["micro_batch"] < 256
    code, capped = _bench(*wide_model, "--memory-budget", str(least + 400), "--micro-batch", "8")
    assert code == 0 and capped["micro_batch"] == 8


def test_a_multi_step_commit_moves_the_weights_along_the_trajectory_the_steps_took(engine):
    """One client, two local steps of two directions at local_lr while zo.lr is three times
    larger: the coordinator's commit must land where the client's own local steps went."""
    from protocols import topics
    from protocols.codec import encode
    from protocols.coordinator import Coordinator, RoundPolicy
    from protocols.messages import Capabilities, Hello, Result
    start = engine.weights.to_canonical()
    fp, local_lr = fingerprint(start), 0.2
    policy = RoundPolicy(eps=1e-2, lr=3 * local_lr, directions=2, local_steps=2,
                         local_lr=local_lr)
    c = Coordinator("steps", 6, engine.spec, 0, fp, policy)
    c.receive(topics.agent("steps", "a", "hello"),
              encode(Hello("a", Capabilities(0, 1, 0), "0" * 64, 0, fp)), 0.0)
    c.open_round(["a"], 0.0)
    seeds = c.current_round.assignments["a"]
    out = engine.round(seeds, 1e-2, local_steps=2, local_lr=c.current_round.local_lr)
    c.receive(topics.agent("steps", "a", "result"),
              encode(Result("a", 0, out.scalars, out.samples, fp)), 0.0)
    commit = c.close_round()
    assert not c.refused, c.refusals
    trajectory = [w.copy() for w in start]
    for step in range(2):  # the client's own steps: w -= local_lr * g / s * z, s = 2
        for seed, g in zip(seeds[2 * step:2 * step + 2], out.scalars[2 * step:2 * step + 2]):
            axpy(trajectory, -local_lr * g / 2, engine.spec, seed)
    committed = [w.copy() for w in start]
    apply_commit(committed, commit, engine.spec)
    moved = sum(float(np.abs(t - w).sum()) for t, w in zip(trajectory, start))
    missed = sum(float(np.abs(m - t).sum()) for m, t in zip(committed, trajectory))
    assert moved > 0 and missed < 1e-3 * moved
