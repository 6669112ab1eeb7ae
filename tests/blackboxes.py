"""Small black-box directories for tests, built with onnx.helper (no torch).

* ``linear_blackbox``: float inputs ``[batch, features]`` -> a fixed linear classifier.
* ``token_blackbox``: token ids ``[batch, length]`` -> the mean of fixed token embeddings
  (padding 0 left out of the mean) -> a fixed linear classifier: a bag-of-words model whose
  accuracy depends on which tokens a prompt adds.

Both run in ONNX Runtime exactly as an exported black box does (``x``, ``y`` -> ``loss``,
``correct``, every weight a constant).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.surgery import append_loss_head
from protocols.manifest import file_sha256
from protocols.scoring import SPEC_FILE, BlackBoxSpec


def _write(out: Path, nodes: list, inputs: list, inits: list, logits: str, spec: dict) -> Path:
    graph = helper.make_graph(nodes, "blackbox", inputs, [], inits)
    graph.input.append(helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"]))
    counter = iter(range(1000))
    append_loss_head(graph, logits, "y", lambda stem: f"{stem}_{next(counter)}",
                     ("loss", "correct"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(model.SerializeToString())
    files = {"model.onnx": {"sha256": file_sha256(out / "model.onnx"),
                            "bytes": (out / "model.onnx").stat().st_size}}
    (out / SPEC_FILE).write_text(BlackBoxSpec(**spec, files=files).to_json())
    return out


def linear_blackbox(out: Path, features: int = 6, classes: int = 3, seed: int = 0) -> Path:
    w = np.random.default_rng(seed).standard_normal((features, classes)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])]
    return _write(out, nodes, inputs, [numpy_helper.from_array(w, "w")], "logits",
                  dict(name="linear", input_dtype="float32", input_shape=(features,),
                       num_classes=classes))


def token_blackbox(out: Path, vocabulary: int, length: int, embeddings: np.ndarray,
                   head: np.ndarray) -> Path:
    """``embeddings`` ``[vocabulary, d]`` (row 0, padding, ignored), ``head`` ``[d, classes]``."""
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("Gather", ["emb", "x"], ["vectors"], axis=0),
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Sign", ["xf"], ["mask"]),
        helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
        helper.make_node("Mul", ["vectors", "mask3"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "one"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["mask", "one"], ["count"], keepdims=1),
        helper.make_node("Div", ["total", "count"], ["mean"]),
        helper.make_node("MatMul", ["mean", "head"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(embeddings.astype(np.float32), "emb"),
             numpy_helper.from_array(head.astype(np.float32), "head"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    inputs = [helper.make_tensor_value_info("x", i64, ["batch", length])]
    return _write(out, nodes, inputs, inits, "logits",
                  dict(name="bag-of-words", input_dtype="int64", input_shape=(length,),
                       num_classes=head.shape[1], input_range=(0, vocabulary)))
