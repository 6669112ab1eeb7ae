"""Does the exported graph compute what the model computes, with the weights fed as inputs?

ONNX Runtime runs the model directory the way an agent does (weights as inputs) on
random batches of two sizes, for the exported weights and for perturbed ones
(``w + scale * sign``, the kind of point a ZO step evaluates). A reference computes
the same losses: the torch model for ``zowarmup export``, the original ONNX graph
for ``zowarmup export hook``. Perturbed weights are what catch a weight that was
baked in as a constant: the graph would ignore the change, the reference would not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn
from torch.func import functional_call

from protocols.manifest import Manifest, load_manifest, read_weights

from .errors import VerifyError

TIE = 1e-5  # logits this close may rank differently in two runtimes
TENSOR_SCALE = 0.05  # how far one tensor moves in the per-tensor sweep


@dataclass(frozen=True)
class Outcome:
    loss: float
    correct: int
    ties: int = 0  # samples whose two top logits are within TIE: their count may differ


Reference = Callable[[Sequence[np.ndarray], np.ndarray, np.ndarray], Outcome]


@dataclass(frozen=True)
class Case:
    batch: int
    weights: str  # "exported" or "perturbed"
    ort: Outcome
    reference: Outcome
    against: str = "reference"  # or "per-sample": the same graph, one sample at a time

    @property
    def loss_diff(self) -> float:
        return abs(self.ort.loss - self.reference.loss)

    @property
    def count_ok(self) -> bool:
        return abs(self.ort.correct - self.reference.correct) <= self.reference.ties


@dataclass(frozen=True)
class VerifyReport:
    cases: tuple[Case, ...]
    tolerance: float

    @property
    def max_loss_diff(self) -> float:
        return max(c.loss_diff for c in self.cases)

    @property
    def ok(self) -> bool:
        return self.max_loss_diff <= self.tolerance and all(c.count_ok for c in self.cases)

    def summary(self) -> str:
        """One line per batch and weight set, one for the per-tensor sweep, and the verdict."""
        sweep = [c for c in self.cases if c.weights.startswith("tensor ")]
        lines = [f"batch {c.batch:>3} {c.weights:<9} loss ort {c.ort.loss:.7f} {c.against} "
                 f"{c.reference.loss:.7f} (diff {c.loss_diff:.2e}), correct ort "
                 f"{c.ort.correct} {c.against} {c.reference.correct}"
                 for c in self.cases if c not in sweep]
        if sweep:
            worst = max(sweep, key=lambda c: (not c.count_ok, c.loss_diff))
            lines.append(f"each of {len(sweep)} tensors moved alone (batch {worst.batch}): "
                         f"largest diff {worst.loss_diff:.2e} at {worst.weights[7:]}")
        verdict = "ok" if self.ok else "FAILED"
        lines.append(f"largest loss difference {self.max_loss_diff:.2e} (tolerance "
                     f"{self.tolerance:.0e}): {verdict}")
        return "\n".join(lines)


def outcome_from_logits(logits: np.ndarray, y: np.ndarray) -> Outcome:
    """Mean cross-entropy (in float64), correct count and near-ties, from logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(y)), y].mean())
    top2 = np.sort(z, axis=1)[:, -2:]
    ties = int((top2[:, 1] - top2[:, 0] < TIE).sum())
    return Outcome(loss, int((z.argmax(axis=1) == y).sum()), ties)


def torch_reference(model: nn.Module, torch_names: Sequence[str]) -> Reference:
    """The torch model in eval mode, run with the given tensors as its trainable weights.

    The model must be the float32 CPU model that was exported (``cpu_float32`` makes one).
    """
    model.eval()

    def run(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> Outcome:
        params = {n: torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
                  for n, w in zip(torch_names, weights, strict=True)}
        with torch.no_grad():
            logits = functional_call(model, params, (torch.from_numpy(x),))
            loss = float(F.cross_entropy(logits, torch.from_numpy(y)))
        outcome = outcome_from_logits(logits.numpy(), y)
        return Outcome(loss, outcome.correct, outcome.ties)

    return run


PER_SAMPLE = (1, 7, 64)  # batch sizes a lifted graph is checked at against its own samples


class OnnxReference:
    """An ONNX classifier run as it was, with its weights replaced: a ``Reference``.

    The weights are initializers or Constant nodes, found by name. A graph with a fixed
    batch size runs in chunks of that size, and compares at multiples of it
    (``batch_sizes``); ``per_sample`` asks ``verify_model_dir`` to check the exported
    graph at other sizes against itself, one sample at a time, since the source cannot
    run them. ``log`` reads probabilities as their log (clamped at float32's tiny).
    """

    per_sample = PER_SAMPLE

    def __init__(self, model: onnx.ModelProto, weight_names: Sequence[str], input_name: str,
                 logits_name: str, log: bool = False) -> None:
        self.model, self.weight_names = _with_output(model, logits_name), tuple(weight_names)
        self.input_name, self.logits_name, self.log = input_name, logits_name, log
        data = next(i for i in model.graph.input if i.name == input_name)
        dims = data.type.tensor_type.shape.dim
        first = dims[0] if dims else None
        self.chunk = first.dim_value if first is not None and first.HasField("dim_value") else 0
        self._cache: dict = {}  # the last weights and their session: batches reuse one

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The source's own batch size and a multiple of it near 16, or 3 and 16."""
        if not self.chunk:
            return (3, 16)
        return tuple(dict.fromkeys((self.chunk, self.chunk * -(-16 // self.chunk))))

    def _session(self, weights: Sequence[np.ndarray]) -> ort.InferenceSession:
        held = self._cache.get("weights")
        if held is not None and len(held) == len(weights) and all(
                a is b for a, b in zip(held, weights)):
            return self._cache["session"]
        edited = copy.deepcopy(self.model)
        values = dict(zip(self.weight_names, weights, strict=True))
        for init in edited.graph.initializer:
            if init.name in values:
                init.CopyFrom(numpy_helper.from_array(np.asarray(values[init.name], np.float32),
                                                      init.name))
        for node in edited.graph.node:
            if node.op_type == "Constant" and node.output[0] in values:
                node.attribute[0].t.CopyFrom(numpy_helper.from_array(
                    np.asarray(values[node.output[0]], np.float32)))
        self._cache.update(weights=list(weights),
                           session=ort_session(edited.SerializeToString()))
        return self._cache["session"]

    def __call__(self, weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> Outcome:
        session = self._session(weights)
        step = self.chunk or len(x)
        out = np.concatenate([session.run([self.logits_name], {self.input_name: x[i:i + step]})[0]
                              for i in range(0, len(x), step)])
        logits = out.reshape(len(x), -1).astype(np.float64)
        if self.log:
            logits = np.log(np.maximum(logits, np.finfo(np.float32).tiny))
        return outcome_from_logits(logits, y)


def onnx_reference(model: onnx.ModelProto, initializer_names: Sequence[str], input_name: str,
                   logits_name: str, log: bool = False) -> OnnxReference:
    """An ONNX classifier run as it was, with its weights replaced (``OnnxReference``)."""
    return OnnxReference(model, initializer_names, input_name, logits_name, log)


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The model, with ``name`` made an output when it is an intermediate value."""
    if any(o.name == name for o in model.graph.output):
        return model
    model = copy.deepcopy(model)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                 None))
    return model


def ort_session(graph: bytes | str) -> ort.InferenceSession:
    """A CPU session that keeps quiet: failures come back as exceptions, not log lines."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def quiet_run() -> ort.RunOptions:
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def ort_outcome(session: ort.InferenceSession, manifest: Manifest,
                weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> Outcome:
    """The exported graph's loss and count, weights fed as inputs as an agent feeds them."""
    feed = {manifest.input_name: x, manifest.label_name: y}
    feed.update({p.name: w for p, w in zip(manifest.parameters, weights, strict=True)})
    loss, correct = session.run(list(manifest.outputs), feed)
    return Outcome(float(loss), int(correct))


def perturb(weights: Sequence[np.ndarray], scale: float,
            rng: np.random.Generator) -> list[np.ndarray]:
    """``w + scale * z`` with Rademacher ``z``: a point like those a ZO round evaluates."""
    return [(w + scale * rng.choice(np.array([-1, 1], np.float32), w.shape)).astype(np.float32)
            for w in weights]


def verify_model_dir(model_dir: str | Path, reference: Reference,
                     batch_sizes: Sequence[int] | None = None, scale: float = 1e-3,
                     tolerance: float = 1e-4, seed: int = 0,
                     per_sample: Sequence[int] | None = None) -> VerifyReport:
    """Compare ORT with ``reference``; raise ``VerifyError`` (with the report) on a mismatch.

    Besides the exported and the perturbed weights, each tensor alone is moved by
    ``TENSOR_SCALE``: a perturbation of all weights at ZO scale can move the loss by less
    than the tolerance when only a small tensor is ignored, one tensor moved far cannot.
    ``batch_sizes`` and ``per_sample`` default to the reference's own (an
    ``OnnxReference`` has both), else to 3 and 16 and no per-sample check.
    """
    batch_sizes = batch_sizes or getattr(reference, "batch_sizes", (3, 16))
    per_sample = getattr(reference, "per_sample", ()) if per_sample is None else per_sample
    manifest = load_manifest(Path(model_dir))
    _, weights = read_weights(Path(model_dir), manifest)
    session = ort_session(str(Path(model_dir) / manifest.graph))
    rng = np.random.default_rng(seed)
    sets = {"exported": weights, "perturbed": perturb(weights, scale, rng)}
    batches = [(rng.standard_normal((b, *manifest.input_shape)).astype(np.float32),
                rng.integers(0, manifest.num_classes, b).astype(np.int64)) for b in batch_sizes]
    cases = [Case(len(x), kind, ort_outcome(session, manifest, w, x, y), reference(w, x, y))
             for kind, w in sets.items() for x, y in batches]
    if per_sample:
        cases += per_sample_cases(session, manifest, sets, per_sample, rng)
    x, y = batches[0]
    for i, param in enumerate(manifest.parameters):
        moved = list(weights)
        moved[i] = perturb([weights[i]], TENSOR_SCALE, rng)[0]
        cases.append(Case(len(x), f"tensor {param.name}",
                          ort_outcome(session, manifest, moved, x, y), reference(moved, x, y)))
    report = VerifyReport(tuple(cases), tolerance)
    if not report.ok:
        raise VerifyError(f"ONNX Runtime and the reference disagree:\n{report.summary()}",
                          "verify_failed")
    return report


def per_sample_cases(session: ort.InferenceSession, manifest: Manifest,
                     sets: dict[str, list[np.ndarray]], sizes: Sequence[int],
                     rng: np.random.Generator) -> list[Case]:
    """The graph at each batch size against itself run one sample at a time.

    A batch of 7 must give the mean of the 7 single-sample losses and the sum of their
    counts: this is what proves that a graph whose batch size was rewritten keeps its
    samples apart at sizes the source could not run.
    """
    n = max(sizes)
    x = rng.standard_normal((n, *manifest.input_shape)).astype(np.float32)
    y = rng.integers(0, manifest.num_classes, n).astype(np.int64)
    cases = []
    for kind, w in sets.items():
        singles = [ort_outcome(session, manifest, w, x[i:i + 1], y[i:i + 1]) for i in range(n)]
        for b in sizes:
            alone = Outcome(float(np.mean([s.loss for s in singles[:b]])),
                            sum(s.correct for s in singles[:b]))
            cases.append(Case(b, kind, ort_outcome(session, manifest, w, x[:b], y[:b]), alone,
                              against="per-sample"))
    return cases
