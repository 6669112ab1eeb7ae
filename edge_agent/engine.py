"""The agent's ZO engine: forward passes only, weights held once and perturbed in place.

The hot path is MeZO's three steps, with directions regenerated from their seeds:

    perturb(+eps) -> loss over the shard -> restore
    perturb(-eps) -> loss over the shard -> restore
    g = (L+ - L-) / 2 eps

Float32 addition is not exactly reversible (``(w + d) - d`` can differ from ``w`` in the
last bit), yet the agent must end every round on the orchestrator's exact bits. So
``perturb`` keeps an *undo log*: the original value of each element whose round trip
would not restore it. That is a few percent of the elements at most, instead of a second
copy of the model; ``restore`` subtracts the same direction and patches those elements.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from protocols.directions import DirectionSpec, axpy, scaled_chunks
from protocols.manifest import Manifest, load_manifest, read_weights
from protocols.messages import CommitMessage
from protocols.zo import apply_commit, fingerprint, projected_gradient

from . import memory
from .shard import Shard, check_shard

Undo = list[tuple[int, np.ndarray, np.ndarray]]  # (tensor index, flat indices, original values)


@dataclass(frozen=True)
class RoundOutput:
    scalars: tuple[float, ...]
    loss: float  # mean of every L+ and L- measured
    samples: int
    seconds: float
    undo_elements: int  # the largest undo log of the round, in elements


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No arena: it keeps the largest activations of any batch reserved for good, ~70 MB
    # on ResNet-18 at batch 64, for no measurable speed on these graphs.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    return options


STRATEGIES = ("auto", "inputs", "constants")


class ZoEngine:
    """Forward passes run one of two ways, chosen per shard size (``strategy="auto"``):

    * ``inputs``: one session whose graph takes the weights as inputs, bound once to our
      buffers; perturbing in place needs no rebinding. No setup cost per pass.
    * ``constants``: per pass, a session over the constant-weights graph, given our
      current (perturbed) buffers as its initializers. ONNX Runtime then optimises the
      weights as constants, ~1.5x faster per batch, for one session build per pass.

    Only the session the chosen strategy needs stays alive. With ``memory_budget_mb`` the
    engine measures what a forward pass costs here and picks the largest micro-batch
    (and the strategy) that fits, or refuses with the least budget that would work.
    """

    def __init__(self, model_dir: Path, shard: Shard, spec: DirectionSpec | None = None,
                 micro_batch: int | None = 64, threads: int | None = None,
                 verify: bool = True, manifest: Manifest | None = None,
                 strategy: str = "auto", memory_budget_mb: float | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.manifest = manifest or load_manifest(self.model_dir, verify=verify)
        self.shard = check_shard(shard, self.manifest)
        self.spec = spec or DirectionSpec()
        self.threads = threads or os.cpu_count() or 1
        self.flat, self.weights = read_weights(self.model_dir, self.manifest)
        self._values = [ort.OrtValue.ortvalue_from_numpy(t) for t in self.weights]
        self._session: ort.InferenceSession | None = None
        self._index_type = np.int32 if self.flat.size < 2**31 else np.int64
        self._check_strategy(strategy)
        if memory_budget_mb is not None:
            self.micro_batch = 1
            self.strategy, self.micro_batch = self._plan(strategy, memory_budget_mb,
                                                         micro_batch)
        else:
            self.micro_batch = max(1, int(micro_batch or 64))
            self.strategy = self._choose(strategy)
        if self.strategy == "constants":
            self._drop_session()

    def _check_strategy(self, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
        if strategy == "constants" and not self.manifest.graph_const:
            raise ValueError("this model was exported without a constant-weights graph; "
                             "re-export it or use strategy 'inputs'")

    def _choose(self, strategy: str) -> str:
        if strategy != "auto":
            return strategy
        if not self.manifest.graph_const:
            return "inputs"
        # Time one micro-batch each way (after a warm-up), and a session build: constants
        # win when the per-batch saving over the whole shard pays for the build.
        x, y = next(self.shard.batches(self.micro_batch))
        self._forward(x, y)
        t0 = time.perf_counter()
        self._forward(x, y)
        t_inputs = time.perf_counter() - t0
        t0 = time.perf_counter()
        session = self._const_session()
        t_build = time.perf_counter() - t0
        feeds = {self.manifest.input_name: x, self.manifest.label_name: y}
        session.run(None, feeds)
        t0 = time.perf_counter()
        session.run(None, feeds)
        t_const = time.perf_counter() - t0
        del session
        batches = -(-len(self.shard) // self.micro_batch)
        return "constants" if batches * (t_inputs - t_const) > t_build else "inputs"

    def _plan(self, strategy: str, budget_mb: float, cap: int | None) -> tuple[str, int]:
        """The fastest strategy and largest micro-batch whose measured peak fits the budget."""
        limit = min(cap or len(self.shard), len(self.shard), memory.MAX_MICRO_BATCH)
        names = [strategy] if strategy != "auto" else (
            ["constants", "inputs"] if self.manifest.graph_const else ["inputs"])
        fits: dict[str, int] = {}
        refusal: memory.MemoryBudgetError | None = None
        for name in names:  # constants first, before the inputs session exists
            try:
                fits[name] = self._fit(name, budget_mb, limit)
            except memory.MemoryBudgetError as exc:
                refusal = exc
        if not fits:
            raise refusal  # type: ignore[misc]
        if len(fits) == 1:
            return next(iter(fits.items()))
        if fits["constants"] >= min(fits["inputs"], 32):
            self.micro_batch = fits["constants"]
            if self._choose("auto") == "constants":
                return "constants", fits["constants"]
        return "inputs", fits["inputs"]

    def _fit(self, strategy: str, budget_mb: float, limit: int) -> int:
        """Measure one forward's peak at two sizes, fit a line, then check the pick itself:
        small batches can reuse freed heap and make a line through them too flat."""
        x, y = self.shard.x, self.shard.y

        def peak(size: int) -> float:
            def run() -> None:
                for _ in range(3):  # later passes land on earlier ones' freed heap
                    if strategy == "inputs":
                        self._forward(x[:size], y[:size])
                    else:
                        self._const_session().run(None, {self.manifest.input_name: x[:size],
                                                         self.manifest.label_name: y[:size]})
            return memory.measure_peak(run) + undo_mb

        undo_mb = self.flat.size * 0.15 * 8 / 2**20  # the undo log's worst case seen
        what = f"{self.manifest.model} with weights as {strategy}"
        a, b = (1, len(self.shard)) if len(self.shard) < 16 else (4, 16)
        points = [(a, peak(a)), (b, peak(b))]
        for _ in range(4):
            batch = memory.fit(budget_mb, memory.MemoryModel.through(*points), limit, what)
            measured = peak(batch)
            if measured * memory.MARGIN <= budget_mb:
                return batch
            points = [points[0], (batch, measured)] if batch > points[0][0] else points
            limit = max(1, batch - 1)
        raise memory.MemoryBudgetError(f"a memory budget of {budget_mb:.0f} MB is too small "
                                       f"for {what}: a micro-batch of {batch} peaked at "
                                       f"{measured:.0f} MB. Raise --memory-budget.")

    @property
    def session(self) -> ort.InferenceSession:
        """The weights-as-inputs session, built on first use, bound once to our buffers."""
        if self._session is None:
            self._session = ort.InferenceSession(
                str(self.model_dir / self.manifest.graph), session_options(self.threads),
                providers=["CPUExecutionProvider"])
            self._binding = self._session.io_binding()
            for p, value in zip(self.manifest.parameters, self._values):
                self._binding.bind_ortvalue_input(p.name, value)
            for name in self.manifest.outputs:
                self._binding.bind_output(name)
        return self._session

    def _drop_session(self) -> None:
        self._session = self._binding = None
        memory.trim()

    def _const_session(self) -> ort.InferenceSession:
        options = session_options(self.threads)
        # add_external_initializers copies the weights into the session, read at build
        # time. (add_initializer would lend our buffers without a copy, but on ORT 1.31 a
        # fresh session over it does not see every in-place change: wrong losses.)
        options.add_external_initializers([p.name for p in self.manifest.parameters],
                                          self._values)
        return ort.InferenceSession(str(self.model_dir / self.manifest.graph_const), options,
                                    providers=["CPUExecutionProvider"])

    # --- forward passes ----------------------------------------------------------------

    def evaluate(self, shard: Shard | None = None) -> tuple[float, int]:
        """Mean loss and correct count over a shard (the local one by default)."""
        shard = shard or self.shard
        forward = self._const_forward() if self.strategy == "constants" else self._forward
        total_loss, correct = 0.0, 0
        for x, y in shard.batches(self.micro_batch):
            loss, right = forward(x, y)
            total_loss += loss * len(y)
            correct += right
        del forward
        memory.trim()  # freed activations (and a pass's session) go back before the next pass
        return total_loss / len(shard), correct

    def _const_forward(self):
        """A forward function over the weights as they are now, compiled as constants."""
        session, m = self._const_session(), self.manifest

        def forward(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
            loss, right = session.run(list(m.outputs), {m.input_name: x, m.label_name: y})
            return float(loss), int(right)
        return forward

    def _forward(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        self.session  # noqa: B018 - built on first use
        self._binding.bind_cpu_input(self.manifest.input_name, x)
        self._binding.bind_cpu_input(self.manifest.label_name, y)
        self.session.run_with_iobinding(self._binding)
        loss, correct = self._binding.copy_outputs_to_cpu()
        return float(loss), int(correct)

    # --- the ZO step -------------------------------------------------------------------

    def perturb(self, seed: int, alpha: float) -> Undo:
        """``w <- w + alpha z(seed)`` in place, remembering what the way back would lose."""
        undo: Undo = []
        for index, tensor in enumerate(self.weights):
            flat = tensor.reshape(-1)
            for start, delta in scaled_chunks(flat.size, alpha, self.spec, seed, index):
                part = flat[start:start + delta.size]
                before = part.copy()
                part += delta
                lost = np.flatnonzero((part - delta).view(np.uint32) != before.view(np.uint32))
                if lost.size:
                    undo.append((index, (start + lost).astype(self._index_type), before[lost]))
        return undo

    def restore(self, seed: int, alpha: float, undo: Undo) -> None:
        """Exactly undo ``perturb(seed, alpha)``."""
        axpy(self.weights, -alpha, self.spec, seed)
        for index, where, values in undo:
            self.weights[index].reshape(-1)[where] = values

    def round(self, seeds: Sequence[int], eps: float, local_steps: int = 1,
              local_lr: float = 0.0) -> RoundOutput:
        """One projected gradient per seed over the whole shard; weights end unchanged.

        With ``local_steps > 1`` (FedKSeed style) the seeds split into steps; after each
        step the local update is applied, and all local updates are undone at the end,
        since only the commit may change the shared state.
        """
        started = time.perf_counter()
        per_step = len(seeds) // local_steps
        scalars: list[float] = []
        losses: list[float] = []
        local_undo: list[tuple[int, float, Undo]] = []
        largest = 0
        for step in range(local_steps):
            step_seeds = seeds[step * per_step:(step + 1) * per_step]
            for seed in step_seeds:
                pair = []
                for alpha in (eps, -eps):
                    undo = self.perturb(seed, alpha)
                    largest = max(largest, sum(u[1].size for u in undo))
                    pair.append(self.evaluate()[0])
                    self.restore(seed, alpha, undo)
                scalars.append(projected_gradient(pair[0], pair[1], eps))
                losses += pair
            if step + 1 < local_steps:
                for seed, g in zip(step_seeds, scalars[-per_step:]):
                    alpha = -local_lr * g / per_step
                    local_undo.append((seed, alpha, self.perturb(seed, alpha)))
        for seed, alpha, undo in reversed(local_undo):
            self.restore(seed, alpha, undo)
        return RoundOutput(tuple(scalars), float(np.mean(losses)), len(self.shard),
                           time.perf_counter() - started, largest)

    def apply(self, commits: Sequence[CommitMessage]) -> str:
        for message in commits:
            apply_commit(self.weights, message.commit, self.spec)
        return self.fingerprint()

    def fingerprint(self) -> str:
        return fingerprint(self.weights)

    def load_weights(self, path: Path) -> None:
        """Replace the weights with a snapshot file (same layout as weights.bin), in place."""
        data = np.fromfile(path, dtype="<f4")
        if data.size != self.flat.size:
            raise ValueError(f"snapshot {path} holds {data.size} values, the model has "
                             f"{self.flat.size}")
        self.flat[:] = data
