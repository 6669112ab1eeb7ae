"""torch model -> forward-only ONNX graph whose trainable weights are inputs.

The recipe is the one that works with the dynamo exporter (see DESIGN.md): a wrapper
whose ``forward(x, y, params)`` takes all trainable tensors as ONE list and runs the
model through ``torch.func.functional_call``. Parameters left out of the list stay
module attributes, so the exporter bakes them in as constants: that is how a partial
(e.g. head-only) model is exported. BatchNorm runs in eval mode, so its running
statistics are constants too.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from protocols.manifest import Manifest

from .check import check_io, check_no_baked_weights
from .directory import make_manifest, write_model_dir
from .errors import ExportError
from .names import BATCH, INPUT, LABEL, OUTPUTS, onnx_names

EXPORT_BATCH = 2  # the dynamo exporter specializes a batch of 1; 2 keeps it symbolic
OPSET = 18  # onnxruntime >= 1.14 runs it: old wheels on small boards included


class LossWrapper(nn.Module):
    """``(x, y, params) -> (mean cross-entropy, correct count)`` for a classifier."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(self.model, dict(zip(self.names, params)), (x,))
        loss = F.cross_entropy(logits, y)
        correct = (logits.argmax(dim=1) == y).sum()
        return loss, correct


@dataclass(frozen=True)
class Selection:
    """Which parameters train: torch names, their ONNX names, and the frozen remainder."""

    torch_names: tuple[str, ...]
    onnx_names: tuple[str, ...]
    frozen_elements: int


def select_parameters(model: nn.Module, trainable: str = "all") -> Selection:
    """Parameters whose torch name matches ``trainable`` (``re.search``), or all of them."""
    named = list(model.named_parameters())
    if not named:
        raise ExportError("the model has no parameters to train")
    if trainable == "all":
        chosen = [n for n, _ in named]
    else:
        try:
            pattern = re.compile(trainable)
        except re.error as exc:
            raise ExportError(f"--trainable {trainable!r} is not a valid regex: {exc}") from None
        chosen = [n for n, _ in named if pattern.search(n)]
        if not chosen:
            raise ExportError(f"--trainable {trainable!r} matches no parameter; names look "
                              f"like {', '.join(n for n, _ in named[:6])}, ...")
    frozen = sum(p.numel() for n, p in named if n not in set(chosen))
    return Selection(tuple(chosen), tuple(onnx_names(chosen)), frozen)


def constant_budget(model: nn.Module, selection: Selection) -> int:
    """Float elements the graph may hold: frozen parameters plus float buffers."""
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return selection.frozen_elements + buffers


def trainable_tensors(model: nn.Module, selection: Selection) -> list[np.ndarray]:
    params = dict(model.named_parameters())
    return [params[n].detach().cpu().float().numpy().copy() for n in selection.torch_names]


def cpu_float32(model: nn.Module) -> nn.Module:
    """The model itself if it is a float32 CPU model, else a converted copy (GPU warm-up)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point())
           for t in tensors):
        return model
    return copy.deepcopy(model).cpu().float()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def to_onnx(model: nn.Module, selection: Selection, input_shape: Sequence[int],
            num_classes: int) -> onnx.ModelProto:
    """Run the dynamo exporter on the wrapper; returns the graph with a named batch axis."""
    wrapper = LossWrapper(model, selection.torch_names).eval()
    params = dict(model.named_parameters())
    args = (torch.randn(EXPORT_BATCH, *input_shape),
            torch.randint(0, num_classes, (EXPORT_BATCH,)),
            [params[n].detach().clone() for n in selection.torch_names])
    batch = torch.export.Dim(BATCH)
    options = dict(dynamo=True, external_data=False, opset_version=OPSET,
                   dynamic_shapes=({0: batch}, {0: batch}, [None] * len(args[2])),
                   input_names=[INPUT, LABEL, *selection.onnx_names],
                   output_names=list(OUTPUTS))
    graph = run_exporter(wrapper, args, options)
    rename_batch_dim(graph, graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param)
    return graph


def run_exporter(wrapper: nn.Module, args: tuple, options: dict) -> onnx.ModelProto:
    """``torch.onnx.export``, quietly, with its many exception types made an ExportError."""
    for attempt in (1, 2):
        gc.collect()  # run pending finalizers now, not in the middle of the exporter's compiles
        try:
            with quiet_exporter():
                return torch.onnx.export(wrapper, args, **options).model_proto
        except Exception as exc:  # the exporter raises many types; all mean the same here
            if attempt == 1 and _spurious_ast_error(exc):
                continue
            raise ExportError(f"torch.onnx.export failed: {str(exc)[:1500]}") from exc
    raise AssertionError("unreachable")


def _spurious_ast_error(exc: BaseException | None) -> bool:
    """Is this CPython's spurious "AST constructor recursion depth mismatch" (gh-106905)?

    Python 3.11 before 3.11.8 can fail compile() with it when a finalizer runs mid-way
    (seen when an export follows code that leaks event loops); the same export succeeds
    when tried again.
    """
    while exc is not None:
        if isinstance(exc, SystemError) and "recursion depth mismatch" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints, warnings and logs: the CLI reports instead."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def rename_batch_dim(model: onnx.ModelProto, old: str) -> None:
    """Give the exporter's symbolic batch size (``s17``…) the stable name ``batch``."""
    g = model.graph
    for value in (*g.input, *g.output, *g.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if old and dim.dim_param == old:
                dim.dim_param = BATCH


def export_model(model: nn.Module, out_dir: str | Path, input_shape: Sequence[int],
                 num_classes: int, trainable: str = "all", normalization: dict | None = None,
                 class_names: Sequence[str] = (), model_name: str = "model") -> Manifest:
    """Export ``model`` to ``out_dir`` (graph, weights.bin, manifest.json); return the manifest.

    ``trainable`` is ``"all"`` or a regex searched in torch parameter names; the rest
    is baked into the graph and counted in ``manifest.frozen_parameters``. A model on a
    GPU or in another float dtype is exported from a float32 CPU copy.
    """
    model = cpu_float32(model)
    was_training = model.training
    model.eval()
    try:
        selection = select_parameters(model, trainable)
        graph = to_onnx(model, selection, input_shape, num_classes)
        tensors = trainable_tensors(model, selection)
    finally:
        model.train(was_training)
    manifest = make_manifest(
        graph, selection.onnx_names, tensors, model_name=model_name, input_shape=input_shape,
        num_classes=num_classes, batchnorm="eval" if has_batchnorm(model) else "none",
        frozen_parameters=selection.frozen_elements, normalization=normalization,
        class_names=class_names)
    check_io(graph, manifest)
    check_no_baked_weights(graph, manifest, tensors, constant_budget(model, selection))
    return write_model_dir(out_dir, graph, tensors, manifest)
