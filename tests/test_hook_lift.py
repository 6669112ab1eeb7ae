"""``export hook`` on the ONNX classifiers users have: fixed batch sizes, other logits, old opsets.

Each source is built with the tool a user would have used: torch's two exporters at
batch 1 without dynamic axes, and ``onnx.helper`` graphs the way model zoos wrote them.
Each must lift and pass ``--verify``: against the source run by ONNX Runtime at its own
batch size, and at batch sizes 1, 7 and 64 against its own single-sample losses.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hook tests need the orchestrator extra")
onnx = pytest.importorskip("onnx", reason="the hook tests need the orchestrator extra")

import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export import ExportError, lift_onnx, verify_model_dir  # noqa: E402
from protocols.errors import ProtocolError  # noqa: E402
from protocols.manifest import Manifest, load_manifest, read_weights  # noqa: E402

C = 5  # classes of the hand-built graphs
RNG = np.random.default_rng(0)


class SmallCnn(torch.nn.Module):
    """Conv, BatchNorm, conv, ``x.view(x.size(0), -1)``, linear: a tutorial's classifier."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(x.view(x.size(0), -1))


def _export(model, path, dynamo: bool) -> None:
    """As a tutorial does it: one example of batch 1, no dynamic axes."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 1, 8, 8),), str(path), dynamo=dynamo)


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallCnn().eval()
    with torch.no_grad():  # running statistics that are not the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    tmp = tmp_path_factory.mktemp("cnn")
    for name, dynamo in (("legacy", False), ("dynamo", True)):
        _export(model, tmp / f"{name}.onnx", dynamo)
    return tmp


def _tensor(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _model(nodes, inits, input_dims, output: str, output_dims, opset: int = 13,
           inits_as_inputs: bool = False) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, input_dims)]
    if inits_as_inputs:  # IR < 4: every initializer is also declared a graph input
        inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                   for i in inits]
    graph = helper.make_graph(nodes, "classifier", inputs,
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT,
                                                             output_dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if inits_as_inputs else 8
    onnx.checker.check_model(model)
    return model


def _conv_body(batch: int, shape_node: bool = False) -> tuple[list, list]:
    """Conv, Relu, then a Reshape to ``[batch, 32]`` and a Gemm: the folded-batch flatten."""
    inits = [_tensor("conv.w", 2, 3, 3, 3), _tensor("conv.b", 2), _tensor("fc.w", C, 32),
             _tensor("fc.b", C)]
    nodes = [helper.make_node("Conv", ["image", "conv.w", "conv.b"], ["c"], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"])]
    if shape_node:
        nodes.append(helper.make_node("Constant", [], ["target"],
                                      value=_ints("target", [batch, 32])))
    else:
        inits.append(_ints("target", [batch, 32]))
    nodes += [helper.make_node("Reshape", ["r", "target"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1)]
    return nodes, inits


def _lifts_and_verifies(source, out, **kwargs) -> Manifest:
    lifted = lift_onnx(source, out, **kwargs)
    assert load_manifest(out) == lifted.manifest
    report = verify_model_dir(out, lifted.reference())
    assert report.ok and report.max_loss_diff < 1e-4
    per_sample = {(c.batch, c.weights) for c in report.cases if c.against == "per-sample"}
    assert per_sample == {(b, w) for b in (1, 7, 64) for w in ("exported", "perturbed")}
    declared = lifted.source.fixed_batch
    against_source = {c.batch for c in report.cases if c.against == "reference"}
    assert declared is None or declared in against_source
    assert all(b % (declared or 1) == 0 for b in against_source)
    return lifted.manifest


def _ort_loss(out, manifest: Manifest, x: np.ndarray, y: np.ndarray) -> float:
    _, tensors = read_weights(out, manifest)
    session = ort.InferenceSession(str(out / manifest.graph), providers=["CPUExecutionProvider"])
    feed = {"x": x, "y": y, **{p.name: t for p, t in zip(manifest.parameters, tensors)}}
    return float(session.run(["loss"], feed)[0])


def _cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    return float(-(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(len(y)), y].mean())


# --- torch's exporters at batch 1, no dynamic axes ----------------------------------------


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_cnn_exported_at_batch_1_is_lifted_with_its_flatten_rewritten(cnn_files, tmp_path,
                                                                        exporter):
    manifest = _lifts_and_verifies(cnn_files / f"{exporter}.onnx", tmp_path)
    assert manifest.input_shape == (1, 8, 8) and manifest.num_classes == 10
    assert [(r.op, r.old[0], r.new[0]) for r in manifest.rewrites] == [("Reshape", 1, 0)]
    assert manifest.rewrites[0].old[1:] == manifest.rewrites[0].new[1:]
    graph = onnx.load(str(tmp_path / manifest.graph)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


class TinyTokens(torch.nn.Module):
    """Patch embedding, a class token ``expand``-ed to the batch, mean over tokens, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(1, 6, 4, stride=4)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 6))
        self.fc = torch.nn.Linear(6, 10)

    def forward(self, x):
        tokens = self.patch(x).view(x.size(0), 6, -1).transpose(1, 2)
        cls = self.cls.expand(x.size(0), -1, -1)
        return self.fc(torch.tanh(torch.cat([cls, tokens], dim=1)).mean(1))


@pytest.mark.parametrize("exporter", ["legacy-opset-13", "dynamo"])
def test_a_class_token_expanded_at_batch_1_is_expanded_to_the_batch(tmp_path, exporter):
    """The legacy exporter computes expand's shape from constants; at opset 13 its
    Reshape hides the batch from inference unless the model is upgraded to 14. The
    default exporter drops the no-op expand and leaves a [1, 1, 6] constant for Concat."""
    torch.manual_seed(0)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyTokens().eval(), (torch.randn(1, 1, 8, 8),),
                          str(tmp_path / "tokens.onnx"), dynamo=exporter == "dynamo",
                          **({} if exporter == "dynamo" else {"opset_version": 13,
                                                              "do_constant_folding": False}))
    manifest = _lifts_and_verifies(tmp_path / "tokens.onnx", tmp_path / "out")
    assert [r.new[0] for r in manifest.rewrites if r.op in ("Expand", "Concat")] == ["batch"]
    assert manifest.opset >= 14


# --- onnx.helper graphs as model zoos wrote them ------------------------------------------


@pytest.mark.parametrize("shape_node", [False, True], ids=["initializer", "constant-node"])
def test_a_fixed_batch_reshape_is_rewritten(tmp_path, shape_node):
    nodes, inits = _conv_body(2, shape_node)
    source = _model(nodes, inits, [2, 3, 4, 4], "logits", [2, C])
    manifest = _lifts_and_verifies(source, tmp_path)
    [rewrite] = manifest.rewrites
    assert (rewrite.node, rewrite.op, rewrite.old, rewrite.new) == ("flatten", "Reshape",
                                                                    (2, 32), (0, 32))
    assert manifest.logits_from == ""


def test_a_reshape_with_allowzero_gets_a_copying_zero(tmp_path):
    nodes, inits = _conv_body(1)
    nodes[2].attribute.append(helper.make_attribute("allowzero", 1))
    manifest = _lifts_and_verifies(_model(nodes, inits, [1, 3, 4, 4], "logits", [1, C],
                                          opset=14), tmp_path)
    assert manifest.rewrites[0].new == (0, 32)
    reshape = next(n for n in onnx.load(str(tmp_path / "model.onnx")).graph.node
                   if n.name == "flatten")
    assert [a.i for a in reshape.attribute if a.name == "allowzero"] == [0]


def test_logits_n_c_1_1_from_a_1x1_conv_head_are_squeezed(tmp_path):
    inits = [_tensor("conv.w", 4, 3, 3, 3), _tensor("head.w", C, 4, 1, 1),
             _tensor("head.b", C)]
    nodes = [helper.make_node("Conv", ["image", "conv.w"], ["c"], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "head.w", "head.b"], ["h"]),
             helper.make_node("GlobalAveragePool", ["h"], ["scores"])]
    source = _model(nodes, inits, [1, 3, 4, 4], "scores", [1, C, 1, 1])
    manifest = _lifts_and_verifies(source, tmp_path)
    assert manifest.logits_from == "squeezed" and manifest.num_classes == C
    x = RNG.standard_normal((3, 3, 4, 4)).astype(np.float32)
    y = np.array([0, 3, 4])
    logits = ort.InferenceSession(source.SerializeToString()).run(None, {"image": x[:1]})[0]
    assert logits.shape == (1, C, 1, 1)
    loss = _ort_loss(tmp_path, manifest, x[:1], y[:1])
    assert loss == pytest.approx(_cross_entropy(logits.reshape(1, C), y[:1]), abs=1e-5)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_a_final_softmax_is_recognised_and_the_loss_reads_its_input(tmp_path, op):
    nodes, inits = _conv_body(1)
    nodes.append(helper.make_node(op, ["logits"], ["probabilities"], axis=1))
    source = _model(nodes, inits, [1, 3, 4, 4], "probabilities", [1, C])
    manifest = _lifts_and_verifies(source, tmp_path)
    assert manifest.logits_from == "softmax-input"
    graph = onnx.load(str(tmp_path / manifest.graph)).graph
    assert op not in {n.op_type for n in graph.node}
    # the loss is cross-entropy on the logits, not on the probabilities
    x, y = RNG.standard_normal((1, 3, 4, 4)).astype(np.float32), np.array([2])
    with_logits = _model(nodes[:-1], inits, [1, 3, 4, 4], "logits", [1, C])
    logits = ort.InferenceSession(with_logits.SerializeToString()).run(None, {"image": x})[0]
    assert _ort_loss(tmp_path, manifest, x, y) == pytest.approx(_cross_entropy(logits, y),
                                                                abs=1e-5)


def test_probabilities_without_their_logits_are_read_as_log_probabilities(tmp_path):
    """A Softmax over ``[N, 1, C]`` then reshaped: its input is not ``[N, C]`` logits."""
    nodes, inits = _conv_body(1)
    inits.append(_ints("row", [0, 1, C]))
    inits.append(_ints("flat_c", [0, C]))
    nodes += [helper.make_node("Reshape", ["logits", "row"], ["rows"]),
              helper.make_node("Softmax", ["rows"], ["p3"], axis=-1),
              helper.make_node("Reshape", ["p3", "flat_c"], ["probabilities"])]
    source = _model(nodes, inits, [1, 3, 4, 4], "probabilities", [1, C])
    manifest = _lifts_and_verifies(source, tmp_path)
    assert manifest.logits_from == "log-probabilities"
    assert "Log" in {n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node}


def test_weights_in_constant_nodes_are_lifted(tmp_path):
    nodes, inits = _conv_body(1, shape_node=True)
    weights = [helper.make_node("Constant", [], [t.name], value=t) for t in inits]
    source = _model(weights + nodes, [], [1, 3, 4, 4], "logits", [1, C])
    given = source.SerializeToString()
    lifted = lift_onnx(source, tmp_path)
    assert source.SerializeToString() == given  # the caller's model is left as it was
    assert lifted.source_names == ("conv.w", "conv.b", "fc.w", "fc.b")
    assert verify_model_dir(tmp_path, lifted.reference()).ok
    _, tensors = read_weights(tmp_path, lifted.manifest)
    for t, init in zip(tensors, inits, strict=True):
        np.testing.assert_array_equal(t, numpy_helper.to_array(init))


def test_opset_9_with_initializers_listed_as_inputs_is_upgraded_and_lifted(tmp_path):
    """A classic zoo model: IR 3, BatchNormalization, a fixed [1, -1] Reshape, Softmax."""
    inits = [_tensor("conv_w", 4, 3, 3, 3), _tensor("conv_b", 4),
             numpy_helper.from_array(np.full(4, 1.2, np.float32), "bn_scale"),
             _tensor("bn_bias", 4), _tensor("bn_mean", 4),
             numpy_helper.from_array(np.full(4, 0.8, np.float32), "bn_var"),
             _ints("shape", [1, -1]), _tensor("fc_w", C, 16), _tensor("fc_b", C)]
    nodes = [helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["c"], pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean",
                                                     "bn_var"], ["b"]),
             helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p", "shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["z"], transB=1),
             helper.make_node("Softmax", ["z"], ["prob"], axis=1)]
    source = _model(nodes, inits, [1, 3, 4, 4], "prob", [1, C], opset=9, inits_as_inputs=True)
    lifted = lift_onnx(source, tmp_path)
    manifest = lifted.manifest
    assert manifest.opset == 14 and manifest.batchnorm == "eval"
    assert manifest.logits_from == "softmax-input"
    assert [r.describe() for r in manifest.rewrites] == ["Reshape 'flatten': [1, -1] -> [0, -1]"]
    assert lifted.source_names == ("conv_w", "conv_b", "bn_scale", "bn_bias", "fc_w", "fc_b")
    assert verify_model_dir(tmp_path, lifted.reference()).ok
    assert lifted.reference().batch_sizes == (1, 16)


def test_a_token_expanded_tiled_and_zero_padded_at_batch_1_is_rewritten(tmp_path):
    """Expand, Tile and ConstantOfShape that make a batch of 1 from a tensor without one."""
    d = 4
    inits = [_tensor("embed.w", d, 6), _tensor("cls", 1, 1, d), _tensor("pos", 1, 1, d),
             _tensor("fc.w", C, d), _ints("axis1", [1]), _ints("cls_shape", [1, 1, d]),
             _ints("pad_shape", [1, 1, d]), _ints("tiles", [1, 3, 1])]
    nodes = [helper.make_node("Gemm", ["image", "embed.w"], ["h"], transB=1),
             helper.make_node("Unsqueeze", ["h", "axis1"], ["tokens"]),
             helper.make_node("Expand", ["cls", "cls_shape"], ["cls_b"], name="expand_cls"),
             helper.make_node("ConstantOfShape", ["pad_shape"], ["pad"], name="zeros",
                              value=numpy_helper.from_array(np.zeros(1, np.float32))),
             helper.make_node("Concat", ["cls_b", "tokens", "pad"], ["seq"], axis=1),
             helper.make_node("Tile", ["pos", "tiles"], ["pos_b"], name="tile_pos"),
             helper.make_node("Add", ["seq", "pos_b"], ["s"]),
             helper.make_node("Tanh", ["s"], ["t"]),
             helper.make_node("ReduceMean", ["t"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("Gemm", ["pooled", "fc.w"], ["logits"], transB=1)]
    source = _model(nodes, inits, [1, 6], "logits", [1, C])
    manifest = _lifts_and_verifies(source, tmp_path)
    assert {(r.node, r.op, r.old, r.new) for r in manifest.rewrites} == {
        ("expand_cls", "Expand", (1, 1, d), ("batch", 1, d)),
        ("zeros", "ConstantOfShape", (1, 1, d), ("batch", 1, d)),
        ("tile_pos", "Tile", (1, 3, 1), ("batch", 3, 1))}


def test_a_class_token_folded_into_a_constant_is_expanded_to_the_batch(tmp_path):
    """``cls.expand(1, -1, -1)`` at batch 1 is a no-op an exporter drops: Concat pins the batch."""
    d = 4
    inits = [_tensor("embed.w", d, 6), _tensor("cls", 1, 1, d), _tensor("fc.w", C, d),
             _ints("axis1", [1])]
    nodes = [helper.make_node("Gemm", ["image", "embed.w"], ["h"], transB=1),
             helper.make_node("Unsqueeze", ["h", "axis1"], ["tokens"]),
             helper.make_node("Concat", ["cls", "tokens"], ["seq"], axis=1, name="cat"),
             helper.make_node("ReduceMax", ["seq"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("Gemm", ["pooled", "fc.w"], ["logits"], transB=1)]
    manifest = _lifts_and_verifies(_model(nodes, inits, [1, 6], "logits", [1, C]), tmp_path)
    assert [r.describe() for r in manifest.rewrites] == ["Concat 'cat': [1, 1, 4] -> "
                                                         "['batch', 1, 4]"]


# --- what cannot be proven is refused, naming the node -------------------------------------


def test_a_reshape_that_mixes_the_batch_into_rows_is_refused_naming_it(tmp_path):
    """``[2, 3, 4] -> [6, 4]``: the batch is folded into rows, nothing proves where it went."""
    inits = [_ints("rows", [6, 4]), _tensor("w", 4, 2), _ints("back", [2, 6]),
             _tensor("fc.w", C, 6)]
    nodes = [helper.make_node("Reshape", ["image", "rows"], ["r"], name="merge_rows"),
             helper.make_node("MatMul", ["r", "w"], ["m"]),
             helper.make_node("Reshape", ["m", "back"], ["f"], name="split_rows"),
             helper.make_node("Gemm", ["f", "fc.w"], ["logits"], transB=1)]
    source = _model(nodes, inits, [2, 3, 4], "logits", [2, C])
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="dynamic batch axis") as caught:
        lift_onnx(source, out)
    message = str(caught.value)
    assert "'merge_rows' (Reshape)" in message and "[6, 4]" in message
    assert "batch size 2" in message and caught.value.code == "fixed_batch"
    assert not out.exists()


# --- the manifest -------------------------------------------------------------------------


def test_rewrites_round_trip_and_bad_ones_are_refused(tmp_path):
    nodes, inits = _conv_body(1)
    manifest = lift_onnx(_model(nodes, inits, [1, 3, 4, 4], "logits", [1, C]), tmp_path).manifest
    data = __import__("json").loads(manifest.to_json())
    assert data["rewrites"] == [{"node": "flatten", "op": "Reshape", "old": [1, 32],
                                 "new": [0, 32]}]
    assert Manifest.from_dict(data) == manifest
    old = {k: v for k, v in data.items() if k not in ("rewrites", "logits_from")}
    assert Manifest.from_dict(old).rewrites == ()  # manifests from before still load
    for bad in ([{"node": "n", "op": "Reshape", "old": [1.5], "new": [0]}],
                [{"node": "n", "op": "Reshape", "old": [1], "new": ["N"]}],
                [{"node": "n", "op": "Reshape", "old": [1], "new": [0], "extra": 1}],
                [{"node": "n", "old": [1], "new": [0]}], "flatten"):
        with pytest.raises(ProtocolError):
            Manifest.from_dict({**data, "rewrites": bad})
    with pytest.raises(ProtocolError, match="logits_from"):
        Manifest.from_dict({**data, "logits_from": "probabilities"})
    assert "rewrites" not in Manifest.from_dict(old).to_json()  # unchanged bytes for others


# --- a lifted model trains -----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), y.astype(np.int64)


def test_zo_rounds_over_a_lifted_model_lower_its_loss(tmp_path, digits):
    """Warm up in torch, export at batch 1 as a tutorial does, lift, then ZO on two agents."""
    from edge_agent.engine import ZoEngine
    from edge_agent.shard import Shard
    from protocols.directions import DirectionSpec
    from protocols.messages import CommitMessage
    from protocols.zo import ClientResult, aggregate, apply_commit, derive_seed, fingerprint

    x, y = digits
    torch.manual_seed(0)
    model = SmallCnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):  # a short first-order warm-up, as before the pivot
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x[:600])),
                                          torch.from_numpy(y[:600])).backward()
        optimizer.step()
    _export(model.eval(), tmp_path / "tutorial.onnx", dynamo=False)
    manifest = lift_onnx(tmp_path / "tutorial.onnx", tmp_path / "model").manifest
    assert manifest.rewrites  # the batch-1 flatten had to be rewritten to train on shards
    engines = [ZoEngine(tmp_path / "model", Shard(x[i:i + 300], y[i:i + 300]), micro_batch=300)
               for i in (0, 300)]
    held_out = Shard(x[1200:], y[1200:])
    reference = read_weights(tmp_path / "model", manifest)[1]
    before = [e.evaluate()[0] for e in engines] + [engines[0].evaluate(held_out)[0]]
    for r in range(8):
        results = []
        for k, engine in enumerate(engines):
            seeds = tuple(derive_seed(7, r, k, j) for j in range(4))
            out = engine.round(seeds, 1e-3)
            results.append(ClientResult(seeds, out.scalars, out.samples))
        commit = aggregate(r, results, lr=0.02)
        apply_commit(reference, commit, DirectionSpec())
        message = CommitMessage(commit, fingerprint(reference))
        assert {e.apply([message]) for e in engines} == {fingerprint(reference)}
    after = [e.evaluate()[0] for e in engines] + [engines[0].evaluate(held_out)[0]]
    assert all(a < b - 0.05 for a, b in zip(after, before)), (before, after)


def test_the_command_prints_the_rewrites_and_what_the_loss_reads(cnn_files, tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import main
    result = CliRunner().invoke(main, ["export", "hook", str(cnn_files / "legacy.onnx"),
                                       "--out", str(tmp_path / "out"), "--verify"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "out")
    assert "rewritten to free the batch size (the source declares 1):" in result.output
    assert manifest.rewrites[0].describe() in result.output
    assert "per-sample" in result.output and "largest loss difference" in result.output
    nodes, inits = _conv_body(1)
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    onnx.save(_model(nodes, inits, [1, 3, 4, 4], "probabilities", [1, C]),
              str(tmp_path / "softmax.onnx"))
    result = CliRunner().invoke(main, ["export", "hook", str(tmp_path / "softmax.onnx"),
                                       "--out", str(tmp_path / "out2")])
    assert result.exit_code == 0, result.output
    assert "loss on: the logits fed to the model's final Softmax" in result.output
