"""The native strategy: ONNX Runtime's graph for this CPU, weights held once in its layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent import onnx_proto
from edge_agent.engine import ZoEngine
from edge_agent.layout import Layout
from edge_agent.native import NativeUnsupported, compile_native
from edge_agent.shard import Shard, load_shard, save_shard
from edge_agent.weights import Weights
from protocols.directions import DirectionSpec
from protocols.manifest import load_manifest, read_weights
from protocols.messages import CommitMessage
from protocols.zo import Commit, apply_commit, derive_seed, fingerprint

onnx = pytest.importorskip("onnx", reason="building test graphs needs the orchestrator extra")


# --- the ONNX reader/writer -------------------------------------------------------------

def _gemm_model(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    from onnx import TensorProto, helper, numpy_helper
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    b = np.array([0.5, -1.0, 2.0, 0.25], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "gemm.onnx"
    onnx.save(model, path)
    return path, w, b


def test_initializers_are_read_and_lifted_to_inputs(tmp_path):
    path, w, b = _gemm_model(tmp_path)
    data = path.read_bytes()
    found = {t.name: t for t in onnx_proto.initializers(data)}
    assert {n: t.dims for n, t in found.items()} == {"w": (3, 4), "b": (4,)}
    raw = found["w"].raw
    assert np.array_equal(np.frombuffer(data[raw[0]:raw[1]], np.float32).reshape(3, 4), w)
    lifted = tmp_path / "lifted.onnx"
    lifted.write_bytes(onnx_proto.lift(data, {"w": (3, 4)}, {}))
    session = ort.InferenceSession(str(lifted), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "w"]
    x = np.ones((2, 3), np.float32)
    other = w * 3
    (y,) = session.run(None, {"x": x, "w": other})
    assert np.allclose(y, x @ other + b)
    assert [t.name for t in onnx_proto.initializers(lifted.read_bytes())] == ["b"]
    onnx.checker.check_model(onnx.load(lifted))


def test_a_broken_file_is_refused_clearly():
    with pytest.raises(onnx_proto.OnnxFileError):
        onnx_proto.initializers(b"\x3a\xff\xff\xff")  # graph field running past the end


# --- layouts ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape, block, block_inputs", [
    ((32, 16, 3, 3), 8, True), ((12, 20, 3, 3), 8, True),    # padded outputs and inputs
    ((24, 3, 3, 3), 16, False), ((20, 5, 1, 1), 4, False),
])
def test_blocked_layouts_map_both_ways_and_are_recognised(shape, block, block_inputs):
    n = int(np.prod(shape))
    probe = Layout(shape, shape, block, block_inputs)
    where = probe.to_stored(np.arange(n, dtype=np.int64), pad=-1)
    found = Layout.find(shape, shape, where)
    assert found == probe
    values = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    stored = found.to_stored(values)
    assert stored.size >= n and np.count_nonzero(stored) == np.count_nonzero(values)
    assert np.array_equal(found.to_canonical(stored, n), values)
    # chunks of whole rows map to their own spans
    rows = found.chunk
    lo, hi = found.span(0, min(rows, n))
    assert np.array_equal(stored[lo:hi], found.to_stored(values[:min(rows, n)]))


def test_unknown_orders_are_not_guessed():
    shape = (16, 8, 3, 3)
    scrambled = np.random.default_rng(1).permutation(int(np.prod(shape)))
    assert Layout.find(shape, shape, scrambled) is None
    assert Layout.find((4, 6), (6, 4), np.arange(24).reshape(4, 6).T.reshape(-1)).transposed


# --- the native engine on zoo models ----------------------------------------------------

def _export(tmp_path_factory, name: str, channels: int, size: int, width: int) -> Path:
    import torch

    from export import export_model
    from orchestrator.train.zoo import build_model
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp(name)
    export_model(build_model(name, 10, in_channels=channels, image_size=size, width=width),
                 out, (channels, size, size), 10, model_name=name)
    return out


ZOO = [("cnn", 1, 8, 8), ("resnet18-gn", 3, 16, 12), ("vit", 3, 16, 32)]


@pytest.fixture(scope="module", params=ZOO, ids=[z[0] for z in ZOO])
def zoo_model(request, tmp_path_factory):
    name, channels, size, width = request.param
    model_dir = _export(tmp_path_factory, name, channels, size, width)
    rng = np.random.default_rng(0)
    shard = Shard(rng.standard_normal((70, channels, size, size), dtype=np.float32),
                  rng.integers(0, 10, 70))
    return model_dir, shard


def test_native_runs_the_constant_weight_kernels_on_the_agents_own_buffers(zoo_model):
    model_dir, shard = zoo_model
    native = ZoEngine(model_dir, shard, micro_batch=32, strategy="native")
    constants = ZoEngine(model_dir, shard, micro_batch=32, strategy="constants")
    assert native.strategy == "native"
    assert native.evaluate() == constants.evaluate()  # the same kernels: the same bits
    # moved in place, seen by the next pass with no rebuild and no rebinding
    undo_n, undo_c = native.perturb(11, 0.05), constants.perturb(11, 0.05)
    assert native.evaluate() == constants.evaluate()
    assert native.fingerprint() == constants.fingerprint()
    native.restore(11, 0.05, undo_n)
    constants.restore(11, 0.05, undo_c)
    manifest = load_manifest(model_dir)
    canonical = read_weights(model_dir, manifest)[1]
    assert native.fingerprint() == fingerprint(canonical)
    assert all(a.tobytes() == b.tobytes()
               for a, b in zip(native.weights.to_canonical(), canonical))


def test_native_rounds_and_commits_keep_the_protocols_bits(zoo_model):
    model_dir, shard = zoo_model
    engine = ZoEngine(model_dir, shard, micro_batch=32, strategy="native")
    reference = read_weights(model_dir, load_manifest(model_dir))[1]
    for r in range(3):
        seeds = [derive_seed(9, r, 0, j) for j in range(2)]
        out = engine.round(seeds, 1e-2, local_steps=2, local_lr=0.1)
        assert engine.fingerprint() == fingerprint(reference)  # the round left no trace
        commit = Commit(r, tuple((s, 0.01 * g) for s, g in zip(seeds, out.scalars)))
        apply_commit(reference, commit, engine.spec)
        assert engine.apply([CommitMessage(commit, "")]) == fingerprint(reference)


def test_a_snapshot_loads_into_the_native_layout(zoo_model, tmp_path):
    model_dir, shard = zoo_model
    engine = ZoEngine(model_dir, shard, micro_batch=32, strategy="native")
    rng = np.random.default_rng(2)
    tensors = [rng.standard_normal(w.shape).astype(np.float32)
               for w in engine.weights.to_canonical()]
    (tmp_path / "snap.bin").write_bytes(b"".join(t.astype("<f4").tobytes() for t in tensors))
    engine.load_weights(tmp_path / "snap.bin")
    assert engine.fingerprint() == fingerprint(tensors)
    with pytest.raises(ValueError, match="values"):
        (tmp_path / "short.bin").write_bytes(b"\0" * 8)
        engine.load_weights(tmp_path / "short.bin")


def test_folded_weights_refuse_native_and_auto_falls_back(tmp_path_factory):
    model_dir = _export(tmp_path_factory, "resnet18-bn", 3, 8, 4)  # BatchNorm folds into conv
    manifest = load_manifest(model_dir)
    with pytest.raises(NativeUnsupported, match="folded"):
        compile_native(model_dir, manifest, tmp_path_factory.mktemp("work"))
    rng = np.random.default_rng(0)
    shard = Shard(rng.standard_normal((20, 3, 8, 8), dtype=np.float32), rng.integers(0, 10, 20))
    assert ZoEngine(model_dir, shard, micro_batch=8).strategy in ("inputs", "constants")
    with pytest.raises(NativeUnsupported):
        ZoEngine(model_dir, shard, micro_batch=8, strategy="native")


def test_weights_in_a_blocked_layout_move_like_canonical_ones():
    from protocols.manifest import Manifest, Parameter
    shapes = [(12, 5, 3, 3), (12,), (7, 12)]
    params, offset = [], 0
    for i, shape in enumerate(shapes):
        params.append(Parameter(f"p{i}", shape, offset))
        offset += int(np.prod(shape))
    manifest = Manifest("m", "g.onnx", "w.bin", tuple(params), "x", (1,), "y", 10)
    layouts = [Layout(shapes[0], (16, 8, 3, 3), 8, True), Layout(shapes[1], (16,)),
               Layout(shapes[2], (12, 7), transposed=True)]
    rng = np.random.default_rng(3)
    canonical = [rng.standard_normal(s).astype(np.float32) * 1e-3 for s in shapes]
    blocked = Weights(manifest, layouts)
    blocked.assign(canonical)
    spec = DirectionSpec()
    undo = blocked.perturb(5, 1e-3, spec)
    assert undo.size > 0  # small weights: the round trip loses bits somewhere
    blocked.restore(5, 1e-3, spec, undo)
    assert blocked.fingerprint() == fingerprint(canonical)
    blocked.axpy(6, 0.5, spec)
    from protocols.directions import axpy
    axpy(canonical, 0.5, spec, 6)
    assert blocked.fingerprint() == fingerprint(canonical)
    assert np.count_nonzero(blocked.tensors[0]) == canonical[0].size  # padding stays zero


# --- the shard streams from its file ----------------------------------------------------

def test_an_uncompressed_shard_is_mapped_and_a_compressed_one_read(tmp_path):
    from protocols.manifest import Manifest
    manifest = Manifest("m", "g.onnx", "w.bin", (), "x", (2, 4, 4), "y", 5)
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((50, 2, 4, 4), dtype=np.float32), rng.integers(0, 5, 50)
    save_shard(tmp_path / "s.npz", x, y)
    np.savez_compressed(tmp_path / "c.npz", x=x, y=y)
    mapped, read = load_shard(tmp_path / "s.npz", manifest), load_shard(tmp_path / "c.npz",
                                                                        manifest)
    assert mapped.mapping is not None and read.mapping is None
    for (xa, ya), (xb, yb) in zip(mapped.batches(16), read.batches(16)):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert np.array_equal(mapped.x, x)  # pages given back are read again on demand
