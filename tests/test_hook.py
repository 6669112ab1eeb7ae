"""``export hook``: lifting ONNX classifiers made by other tools, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hook tests need the orchestrator extra")
onnx = pytest.importorskip("onnx", reason="the hook tests need the orchestrator extra")

import onnxruntime as ort  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export import ExportError, lift_onnx, verify_model_dir  # noqa: E402
from export.check import check_io, check_no_baked_weights  # noqa: E402
from orchestrator.cli import main  # noqa: E402
from orchestrator.train.zoo import build_model  # noqa: E402
from protocols.manifest import load_manifest, read_weights  # noqa: E402

F, D, C = 6, 8, 4  # features, hidden units, classes of the hand-built model


def _quiet_export(*args, **kwargs) -> None:
    import contextlib
    import io
    import warnings
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(*args, **kwargs)


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    """A BN ResNet exported by plain torch.onnx.export, without this project's wrapper."""
    tmp = tmp_path_factory.mktemp("plain")
    model = build_model("resnet18-bn", 5, 3, 8, width=4, seed=0)
    x = torch.randn(2, 3, 8, 8)
    _quiet_export(model, (x,), str(tmp / "dynamo.onnx"), dynamo=True, external_data=False,
                  dynamic_shapes=({0: torch.export.Dim("n")},), input_names=["image"],
                  output_names=["logits"])
    _quiet_export(model, (x,), str(tmp / "legacy.onnx"), dynamo=False, opset_version=11,
                  input_names=["image"], output_names=["logits"],
                  dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}},
                  keep_initializers_as_inputs=True)
    _quiet_export(model, (x,), str(tmp / "fixed.onnx"), dynamo=True, external_data=False)
    return tmp


def _mlp(weight_dtype: int = TensorProto.FLOAT, outputs: str = "logits",
         input_dims: list | None = None, extra_input: bool = False) -> onnx.ModelProto:
    """A classifier written with onnx.helper: Gemm, BatchNorm, Relu, MatMul, a scaled Add.

    Names are TensorFlow-like (``dense/kernel:0``); the second layer's weight is a
    Constant node; ``0.5`` is a scalar initializer that must stay a constant.
    """
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((D, F)).astype(np.float32),
                                 "dense/kernel:0")
    if weight_dtype != TensorProto.FLOAT:
        w1 = helper.make_tensor("dense/kernel:0", weight_dtype, (D, F),
                                rng.standard_normal(D * F).astype(np.float64).tolist())
    inits = [
        w1, numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "dense/bias:0"),
        numpy_helper.from_array(np.ones(D, np.float32) * 1.5, "bn/gamma"),
        numpy_helper.from_array(np.zeros(D, np.float32) + 0.1, "bn/beta"),
        numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "bn/mean"),
        numpy_helper.from_array(rng.random(D).astype(np.float32) + 0.5, "bn/var"),
        numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "out/bias"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    w2 = numpy_helper.from_array(rng.standard_normal((D, C)).astype(np.float32), "w2")
    first = "h0"
    nodes = []
    if weight_dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["dense/kernel:0"], ["w1f"], to=TensorProto.FLOAT))
    nodes += [
        helper.make_node("Gemm", ["input", "w1f" if weight_dtype != TensorProto.FLOAT
                                  else "dense/kernel:0", "dense/bias:0"], [first], transB=1),
        helper.make_node("BatchNormalization", [first, "bn/gamma", "bn/beta", "bn/mean",
                                                "bn/var"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Constant", [], ["out/kernel"], value=w2),
        helper.make_node("MatMul", ["h2", "out/kernel"], ["h3"]),
        helper.make_node("Mul", ["h3", "half"], ["h4"]),
        helper.make_node("Add", ["h4", "out/bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("ReduceMax", ["logits"], ["top"], keepdims=0),
    ]
    dims = input_dims if input_dims is not None else ["N", F]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", F]))
    outs = {"logits": helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", C]),
            "probs": helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", C]),
            "top": helper.make_tensor_value_info("top", TensorProto.FLOAT, ["N"])}
    graph = helper.make_graph(nodes, "mlp", inputs, [outs[o] for o in outputs.split(",")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _ort_matches_source(out, manifest, source: onnx.ModelProto, input_name: str, batch: int):
    """ORT on the lifted graph vs the source graph's own logits, at one batch size."""
    _, tensors = read_weights(out, manifest)
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, *manifest.input_shape)).astype(np.float32)
    y = rng.integers(0, manifest.num_classes, batch).astype(np.int64)
    lifted = ort.InferenceSession(str(out / manifest.graph), providers=["CPUExecutionProvider"])
    feed = {"x": x, "y": y, **{p.name: t for p, t in zip(manifest.parameters, tensors)}}
    loss, correct = lifted.run(["loss", "correct"], feed)
    original = ort.InferenceSession(source.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    logits = original.run(["logits"], {input_name: x})[0].astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert abs(float(loss) + logp[np.arange(batch), y].mean()) < 1e-5
    assert int(correct) == int((logits.argmax(1) == y).sum())


# --- (a) models exported from torch without the project's wrapper ------------------------


@pytest.mark.parametrize("file", ["dynamo.onnx", "legacy.onnx"])
def test_torch_exported_model_is_lifted_and_verifies(torch_files, tmp_path, file):
    source = onnx.load(str(torch_files / file))
    float_inits = [i for i in source.graph.initializer if i.data_type == TensorProto.FLOAT
                   and np.prod(i.dims) >= 2]
    lifted = lift_onnx(torch_files / file, tmp_path)
    manifest = lifted.manifest
    assert load_manifest(tmp_path) == manifest
    assert manifest.input_shape == (3, 8, 8) and manifest.num_classes == 5
    assert manifest.model == file[:-5] and manifest.frozen_parameters == 0
    assert 0 < len(manifest.parameters) <= len(float_inits)
    graph = onnx.load(str(tmp_path / manifest.graph))
    check_io(graph, manifest)
    _, tensors = read_weights(tmp_path, manifest)
    check_no_baked_weights(graph, manifest, tensors, 4096)
    assert not {i.name for i in graph.graph.initializer} & {p.name for p in manifest.parameters}
    report = verify_model_dir(tmp_path, lifted.reference())
    assert report.ok and report.max_loss_diff < 1e-4
    for batch in (1, 7, 64):
        _ort_matches_source(tmp_path, manifest, source, "image", batch)


def test_weights_bin_holds_the_source_initializers_in_first_use_order(torch_files, tmp_path):
    source = onnx.load(str(torch_files / "dynamo.onnx"))
    lifted = lift_onnx(source, tmp_path)
    inits = {i.name: numpy_helper.to_array(i) for i in source.graph.initializer}
    _, tensors = read_weights(tmp_path, lifted.manifest)
    for name, tensor in zip(lifted.source_names, tensors, strict=True):
        np.testing.assert_array_equal(tensor, inits[name])
    uses = [i for node in source.graph.node for i in node.input if i in lifted.source_names]
    assert list(lifted.source_names) == list(dict.fromkeys(uses))


def test_a_graph_exported_at_a_fixed_batch_has_its_flatten_rewritten(torch_files, tmp_path):
    """Once refused ("re-export it with a dynamic batch axis"), now lifted: the Reshape
    that flattened to ``[2, C]`` reads ``[0, C]`` and the graph runs at any batch size."""
    lifted = lift_onnx(torch_files / "fixed.onnx", tmp_path)
    [rewrite] = lifted.manifest.rewrites
    assert rewrite.op == "Reshape" and rewrite.old[0] == 2
    assert rewrite.new == (0, *rewrite.old[1:])
    report = verify_model_dir(tmp_path, lifted.reference())
    assert report.ok and {c.batch for c in report.cases if c.against == "per-sample"} == {
        1, 7, 64}
    source = ort.InferenceSession(str(torch_files / "fixed.onnx"),
                                  providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="Expected: 2"):  # the source runs at its size only
        source.run(None, {source.get_inputs()[0].name: np.zeros((7, 3, 8, 8), np.float32)})


# --- (b) a model written with onnx.helper ------------------------------------------------


def test_helper_built_model_is_lifted(tmp_path):
    source = _mlp()
    lifted = lift_onnx(source, tmp_path, class_names=["a", "b", "c", "d"])
    manifest = lifted.manifest
    assert lifted.source_names == ("dense/kernel:0", "dense/bias:0", "bn/gamma", "bn/beta",
                                   "out/kernel", "out/bias")
    assert [p.name for p in manifest.parameters] == [
        "dense_kernel_0", "dense_bias_0", "bn_gamma", "bn_beta", "out_kernel", "out_bias"]
    assert manifest.input_shape == (F,) and manifest.num_classes == C
    assert manifest.batchnorm == "eval" and manifest.frozen_parameters == 0
    graph = onnx.load(str(tmp_path / manifest.graph)).graph
    kept = {i.name for i in graph.initializer}
    assert {"bn/mean", "bn/var", "half"} <= kept  # statistics and scalars stay constants
    assert [o.name for o in graph.output] == ["loss", "correct"]
    assert verify_model_dir(tmp_path, lifted.reference()).ok
    for batch in (1, 7, 64):
        _ort_matches_source(tmp_path, manifest, source, "input", batch)


def test_a_regex_chooses_what_trains_and_the_rest_is_counted_frozen(tmp_path):
    lifted = lift_onnx(_mlp(), tmp_path, trainable=r"^out/")
    manifest = lifted.manifest
    assert [p.name for p in manifest.parameters] == ["out_kernel", "out_bias"]
    assert manifest.frozen_parameters == D * F + D + 2 * D
    assert verify_model_dir(tmp_path, lifted.reference()).ok
    with pytest.raises(ExportError, match="matches no weight"):  # statistics never train
        lift_onnx(_mlp(), tmp_path, trainable="bn/mean")


def test_input_shape_is_taken_from_the_flag_when_the_model_leaves_it_open(tmp_path):
    with pytest.raises(ExportError, match="--input-shape"):
        lift_onnx(_mlp(input_dims=["N", "F"]), tmp_path)
    lifted = lift_onnx(_mlp(input_dims=["N", "F"]), tmp_path, input_shape=(F,))
    assert lifted.manifest.input_shape == (F,)
    with pytest.raises(ExportError, match="does not fit"):
        lift_onnx(_mlp(), tmp_path, input_shape=(F + 1,))


# --- refusals ------------------------------------------------------------------------------


def test_several_logits_candidates_need_output(tmp_path):
    with pytest.raises(ExportError, match="--output NAME") as caught:
        lift_onnx(_mlp(outputs="logits,probs"), tmp_path)
    assert "several" in str(caught.value) and "probs" in str(caught.value)
    lifted = lift_onnx(_mlp(outputs="logits,probs"), tmp_path, output="logits")
    assert lifted.source.logits_name == "logits"
    assert verify_model_dir(tmp_path, lifted.reference()).ok


def test_no_logits_shaped_output_is_an_error(tmp_path):
    with pytest.raises(ExportError, match="no output looks like"):
        lift_onnx(_mlp(outputs="top"), tmp_path)
    with pytest.raises(ExportError, match="not an output of the model"):
        lift_onnx(_mlp(), tmp_path, output="scores")
    with pytest.raises(ExportError, match="not float32 logits"):
        lift_onnx(_mlp(outputs="logits,top"), tmp_path, output="top")


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.DOUBLE])
def test_trainable_initializers_must_be_float32(tmp_path, dtype):
    with pytest.raises(ExportError, match="must be float32") as caught:
        lift_onnx(_mlp(weight_dtype=dtype), tmp_path)
    assert "dense/kernel:0" in str(caught.value) and "--trainable" in str(caught.value)
    assert caught.value.code == "bad_dtype"
    lifted = lift_onnx(_mlp(weight_dtype=dtype), tmp_path, trainable="^(out|bn)/")
    assert [p.name for p in lifted.manifest.parameters][-1] == "out_bias"


def test_a_model_without_float_initializers_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])], "bare",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    with pytest.raises(ExportError, match="no float initializers"):
        lift_onnx(model, tmp_path)


def test_other_inputs_and_files_are_refused(tmp_path, torch_files):
    with pytest.raises(ExportError, match="exactly one data input"):
        lift_onnx(_mlp(extra_input=True), tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="cannot read"):
        lift_onnx(tmp_path / "junk.onnx", tmp_path / "out")
    lifted = lift_onnx(torch_files / "dynamo.onnx", tmp_path / "once")
    with pytest.raises(ExportError, match="exactly one data input"):  # already lifted
        lift_onnx(tmp_path / "once" / "model.onnx", tmp_path / "twice")
    assert lifted.manifest.num_parameters > 0


# --- the command line ---------------------------------------------------------------------


def test_cli_export_hook_with_verify(torch_files, tmp_path):
    out = tmp_path / "lifted"
    result = CliRunner().invoke(main, ["export", "hook", str(torch_files / "legacy.onnx"),
                                       "--out", str(out), "--verify", "--name", "r18bn"])
    assert result.exit_code == 0, result.output
    assert "exported r18bn" in result.output and "largest loss difference" in result.output
    assert load_manifest(out).model == "r18bn"


def test_cli_export_hook_errors_name_the_flag(tmp_path):
    onnx.save(_mlp(outputs="logits,probs"), str(tmp_path / "two.onnx"))
    runner = CliRunner()
    result = runner.invoke(main, ["export", "hook", str(tmp_path / "two.onnx"),
                                  "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--output NAME" in result.output
    result = runner.invoke(main, ["export", "hook", str(tmp_path / "two.onnx"), "--out",
                                  str(tmp_path / "o"), "--output", "logits", "--input-shape", "6"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["export", "hook", str(tmp_path / "missing.onnx"),
                                  "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not exist" in result.output
