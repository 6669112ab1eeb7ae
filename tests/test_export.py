"""torch -> ONNX export: every zoo model, weights as inputs, partial training, the CLI."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export needs the orchestrator extra")
onnx = pytest.importorskip("onnx", reason="export needs the orchestrator extra")

import onnxruntime as ort  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from onnx import TensorProto, numpy_helper  # noqa: E402

from export import (  # noqa: E402
    ExportError,
    VerifyError,
    cpu_float32,
    export_model,
    select_parameters,
    torch_reference,
    verify_model_dir,
)
from export.check import check_io, check_no_baked_weights  # noqa: E402
from export.directory import write_model_dir  # noqa: E402
from export.names import onnx_names, sanitize  # noqa: E402
from orchestrator.cli import main  # noqa: E402
from orchestrator.train.zoo import build_model  # noqa: E402
from protocols.errors import ProtocolError  # noqa: E402
from protocols.manifest import load_manifest, read_weights  # noqa: E402

# narrow versions, small images: (width, channels, image size)
ZOO = {"cnn": (4, 1, 8), "resnet18-gn": (4, 3, 8), "resnet18-bn": (4, 3, 8), "vit": (16, 3, 8)}
C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _build(name: str, seed: int = 0):
    width, channels, size = ZOO[name]
    model = build_model(name, 10, channels, size, width=width, seed=seed)
    if name == "resnet18-bn":  # non-trivial running statistics, so eval mode matters
        model.train()
        with torch.no_grad():
            model(torch.randn(32, channels, size, size) * 2 + 1)
        model.eval()
    return model, (channels, size, size)


@pytest.fixture(scope="module", params=list(ZOO))
def exported(request, tmp_path_factory):
    model, shape = _build(request.param)
    out = tmp_path_factory.mktemp(request.param)
    manifest = export_model(model, out, shape, 10, model_name=request.param)
    return request.param, model, out, manifest


def _session(out, manifest):
    return ort.InferenceSession(str(out / manifest.graph), providers=["CPUExecutionProvider"])


def test_every_zoo_model_passes_verify(exported):
    name, model, out, manifest = exported
    report = verify_model_dir(out, torch_reference(model, select_parameters(model).torch_names))
    assert report.ok and report.max_loss_diff < 1e-4
    assert {(c.batch, c.weights) for c in report.cases} == {
        (3, "exported"), (3, "perturbed"), (16, "exported"), (16, "perturbed"),
        *((3, f"tensor {p.name}") for p in manifest.parameters)}
    # the perturbed weights are really another point: the loss moved
    by_case = {(c.batch, c.weights): c.reference.loss for c in report.cases}
    assert by_case[(16, "exported")] != by_case[(16, "perturbed")]


def test_manifest_describes_the_directory(exported):
    name, model, out, manifest = exported
    loaded = load_manifest(out)  # checks every file's size and SHA-256
    assert loaded == manifest and loaded.model == name
    assert loaded.input_shape == ZOO[name][1:2] + (ZOO[name][2],) * 2
    assert loaded.num_classes == 10 and loaded.opset == 18 and loaded.frozen_parameters == 0
    assert loaded.batchnorm == ("eval" if name == "resnet18-bn" else "none")
    torch_names = [n for n, _ in model.named_parameters()]
    assert [p.name for p in loaded.parameters] == onnx_names(torch_names)
    assert all(C_IDENTIFIER.match(p.name) for p in loaded.parameters)
    _, tensors = read_weights(out, loaded)
    for tensor, (_, param) in zip(tensors, model.named_parameters(), strict=True):
        np.testing.assert_array_equal(tensor, param.detach().numpy())


def test_no_float_initializer_holds_a_trainable_parameter(exported):
    name, model, out, manifest = exported
    graph = onnx.load(str(out / manifest.graph)).graph
    params = [p.name for p in manifest.parameters]
    assert [i.name for i in graph.input] == ["x", "y", *params]
    assert [o.name for o in graph.output] == ["loss", "correct"]
    floats = [i for i in graph.initializer if i.data_type == TensorProto.FLOAT]
    assert not {i.name for i in floats} & set(params)
    # what the graph holds is the size of the buffers (BN statistics), not of the weights
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    held = sum(int(np.prod(i.dims)) for i in floats)
    assert held <= buffers + 64 and held < manifest.num_parameters // 10
    big = {p.detach().numpy().tobytes() for p in model.parameters() if p.numel() >= 16}
    assert not any(numpy_helper.to_array(i).tobytes() in big for i in floats)
    _, tensors = read_weights(out, manifest)
    check_io(onnx.load(str(out / manifest.graph)), manifest)
    check_no_baked_weights(onnx.load(str(out / manifest.graph)), manifest, tensors, buffers)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnx_runtime_runs_any_batch_with_weights_as_inputs(exported, batch):
    name, model, out, manifest = exported
    _, tensors = read_weights(out, manifest)
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, *manifest.input_shape)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    feed = {"x": x, "y": y, **{p.name: t for p, t in zip(manifest.parameters, tensors)}}
    loss, correct = _session(out, manifest).run(["loss", "correct"], feed)
    assert loss.dtype == np.float32 and loss.shape == () and correct.dtype == np.int64
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        want = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).item()
    assert abs(float(loss) - want) < 1e-4
    assert int(correct) == int((logits.argmax(1).numpy() == y).sum())


def test_the_batch_axis_is_named_and_dynamic(exported):
    _, _, out, manifest = exported
    graph = onnx.load(str(out / manifest.graph)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.input[1].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.fixture(scope="module")
def head_only(tmp_path_factory):
    model, shape = _build("resnet18-gn", seed=5)
    out = tmp_path_factory.mktemp("head")
    return model, out, export_model(model, out, shape, 10, trainable=r"^fc\.")


def test_partial_training_exports_only_the_head(head_only):
    model, out, manifest = head_only
    assert [p.name for p in manifest.parameters] == ["fc_weight", "fc_bias"]
    head = model.fc.weight.numel() + model.fc.bias.numel()
    total = sum(p.numel() for p in model.parameters())
    assert manifest.num_parameters == head and manifest.frozen_parameters == total - head
    assert (out / "weights.bin").stat().st_size == 4 * head
    graph = onnx.load(str(out / manifest.graph)).graph
    assert [i.name for i in graph.input] == ["x", "y", "fc_weight", "fc_bias"]
    held = {numpy_helper.to_array(i).tobytes() for i in graph.initializer
            if i.data_type == TensorProto.FLOAT}
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.detach().numpy().tobytes() in held for w in convs)  # the body is baked in
    report = verify_model_dir(out, torch_reference(model, ["fc.weight", "fc.bias"]))
    assert report.ok
    assert load_manifest(out) == manifest


def test_trainable_patterns_that_select_nothing_are_errors():
    model, _ = _build("cnn")
    with pytest.raises(ExportError, match="matches no parameter"):
        select_parameters(model, r"^nothing")
    with pytest.raises(ExportError, match="not a valid regex"):
        select_parameters(model, r"(")


def test_a_float64_model_is_exported_from_a_float32_copy(tmp_path):
    model, shape = _build("cnn", seed=2)
    model = model.double()
    manifest = export_model(model, tmp_path, shape, 10)
    assert next(model.parameters()).dtype == torch.float64  # the caller's model is untouched
    copy = cpu_float32(model)
    reference = torch_reference(copy, select_parameters(copy).torch_names)
    assert verify_model_dir(tmp_path, reference).ok
    assert manifest.num_parameters == sum(p.numel() for p in model.parameters())


def test_a_spurious_interpreter_error_is_retried_once_and_then_reported(tmp_path, monkeypatch):
    real, calls = torch.onnx.export, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1 or kwargs.get("opset_version") == -1:
            raise SystemError("AST constructor recursion depth mismatch (before=1, after=2)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", flaky)
    model, shape = _build("cnn")
    assert export_model(model, tmp_path, shape, 10).num_parameters > 0 and len(calls) == 2
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: flaky(opset_version=-1))
    with pytest.raises(ExportError, match="recursion depth mismatch"):
        export_model(model, tmp_path / "again", shape, 10)
    assert len(calls) == 4


def test_names_are_sanitized_deterministically():
    assert sanitize("layer1.0.conv1.weight") == "layer1_0_conv1_weight"
    assert sanitize("0.weight") == "p_0_weight"
    assert onnx_names(["a.b", "a_b", "x"]) == ["a_b", "a_b_2", "x_2"]


def test_load_manifest_refuses_a_tampered_directory(exported, tmp_path):
    _, _, out, manifest = exported
    for victim in ("weights.bin", "model.onnx"):
        copy = tmp_path / victim
        shutil.copytree(out, copy)
        data = bytearray((copy / victim).read_bytes())
        data[len(data) // 2] ^= 1
        (copy / victim).write_bytes(bytes(data))
        with pytest.raises(ProtocolError, match="SHA-256"):
            load_manifest(copy)
    (tmp_path / "weights.bin" / "manifest.json").unlink()
    with pytest.raises(ProtocolError, match="does not exist"):
        load_manifest(tmp_path / "weights.bin")


def _bake(out, manifest, param: str) -> None:
    """Simulate an exporter bug: nodes read a constant copy of ``param``, not the input."""
    model = onnx.load(str(out / manifest.graph))
    _, tensors = read_weights(out, manifest)
    index = [p.name for p in manifest.parameters].index(param)
    model.graph.initializer.append(numpy_helper.from_array(tensors[index], "baked"))
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == param:
                node.input[i] = "baked"
    write_model_dir(out, model, tensors, manifest)


def test_a_baked_in_weight_is_caught_by_the_check_and_by_verify(tmp_path):
    model, shape = _build("cnn", seed=1)
    export_model(model, tmp_path, shape, 10)
    manifest = load_manifest(tmp_path)
    _bake(tmp_path, manifest, "features_0_weight")
    baked = onnx.load(str(tmp_path / manifest.graph))
    _, tensors = read_weights(tmp_path, manifest)
    check_io(baked, manifest)  # the inputs alone look right...
    with pytest.raises(ExportError, match="features_0_weight"):
        check_no_baked_weights(baked, manifest, tensors, 0)  # ...the constants do not
    reference = torch_reference(model, select_parameters(model).torch_names)
    with pytest.raises(VerifyError, match="at features_0_weight"):
        verify_model_dir(tmp_path, reference)


def test_check_io_refuses_inputs_out_of_manifest_order(exported):
    _, _, out, manifest = exported
    model = onnx.load(str(out / manifest.graph))
    inputs = list(model.graph.input)
    inputs[2], inputs[3] = inputs[3], inputs[2]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    with pytest.raises(ExportError, match="manifest order"):
        check_io(model, manifest)


# --- the command line ---------------------------------------------------------------


def test_cli_export_with_checkpoint_and_verify(tmp_path):
    model = build_model("cnn", 4, 1, 8, width=4, seed=9)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "export", "--model", "cnn", "--num-classes", "4", "--out", str(out), "--width", "4",
        "--image-size", "8", "--in-channels", "1", "--checkpoint", str(tmp_path / "ckpt.pt"),
        "--class-names", "a,b,c,d", "--mean", "0.5", "--std", "0.25", "--verify"])
    assert result.exit_code == 0, result.output
    for text in ("exported cnn", "weights.bin", "model.onnx", "trainable: ",
                 "largest loss difference", ": ok"):
        assert text in result.output
    manifest = load_manifest(out)
    assert manifest.class_names == ("a", "b", "c", "d")
    assert manifest.normalization == {"mean": [0.5], "std": [0.25]}
    _, tensors = read_weights(out, manifest)
    np.testing.assert_array_equal(tensors[0], model.features[0].weight.detach().numpy())


@pytest.mark.parametrize("args,exit_code,message", [
    ([], 2, "--out DIR is required"),
    (["--out", "{tmp}/o", "--width", "8", "--checkpoint", "{tmp}/ckpt.pt"], 1, "--width"),
    (["--out", "{tmp}/o", "--trainable", "^nope"], 1, "matches no parameter"),
    (["--out", "{tmp}/o", "--class-names", "a,b"], 1, "class names"),
    (["--out", "{tmp}/o", "--mean", "0.5"], 2, "--mean and --std together"),
    (["--out", "{tmp}/o", "--model", "resnet50"], 2, "resnet50"),
])
def test_cli_export_errors_say_what_to_do(tmp_path, args, exit_code, message):
    torch.save(build_model("cnn", 10, 1, 8, width=4).state_dict(), tmp_path / "ckpt.pt")
    base = ["export", "--model", "cnn", "--width", "4", "--image-size", "8", "--in-channels", "1"]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == exit_code, result.output
    assert message in result.output


def test_the_torch_engine_computes_what_the_graph_computes(exported):
    """zo.engine = "torch" runs the zoo model behind the export: mapped by the export's names,
    BatchNorm's running statistics read from the graph (the fixture made them non-trivial),
    its shard loss within 1e-5 of ONNX Runtime's, micro-batch by micro-batch as an agent
    sums it, at the exported weights and at perturbed ones."""
    import dataclasses

    from orchestrator.rounds.torch_engine import TorchEngine
    from orchestrator.train.exported import NotRunnable, zoo_module
    from protocols.directions import DirectionSpec, axpy
    name, _, out, manifest = exported
    width = ZOO[name][0]
    engine = TorchEngine(zoo_module(out, manifest, width), DirectionSpec(), "cpu", micro_batch=16)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((40, *manifest.input_shape)) * 2 + 0.5).astype(np.float32)
    y = rng.integers(0, 10, 40)
    engine.set_data(x, y)
    session = _session(out, manifest)
    _, weights = read_weights(out, manifest)
    for seed in (None, 7):
        w = [t.copy() for t in weights]
        if seed is not None:
            axpy(w, 0.05, DirectionSpec(), seed)
        engine.load(w)
        ours = engine.shard_loss(engine.losses(torch.arange(40)).numpy())
        feeds = {p.name: t for p, t in zip(manifest.parameters, w)}
        theirs = sum(float(session.run(["loss"], {**feeds, "x": x[i:i + 16],
                                                  "y": y[i:i + 16]})[0]) * len(y[i:i + 16])
                     for i in range(0, 40, 16)) / 40
        assert abs(ours - theirs) <= 1e-5, (name, seed, ours, theirs)
    with pytest.raises(NotRunnable, match="model.width"):
        zoo_module(out, manifest, width * 2)
    with pytest.raises(NotRunnable, match="not in the model zoo"):
        zoo_module(out, dataclasses.replace(manifest, model="lifted"), width)
