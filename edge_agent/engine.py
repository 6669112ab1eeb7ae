"""The agent's ZO engine: forward passes only, weights held once and perturbed in place.

The hot path is MeZO's three steps, with directions regenerated from their seeds:

    perturb(+eps) -> loss over the shard -> restore
    perturb(-eps) -> loss over the shard -> restore
    g = (L+ - L-) / 2 eps

The weights and their exact-undo log live in ``weights.py``; how a forward pass runs is
the *strategy*:

* ``native`` (the default wherever it compiles): ONNX Runtime's own optimised graph for
  this CPU, with the weights as inputs in the layout its kernels read (``native.py``).
  Constant-weight speed, one session for the engine's life, no copy of the weights.
* ``inputs``: the exported graph, weights as inputs in their plain layout. No setup.
* ``constants``: per pass, a session over the constant-weights graph built from the
  current weights: the speed of ``native`` plus a build per pass and a second copy.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from protocols.directions import DirectionSpec
from protocols.manifest import Manifest, load_manifest
from protocols.messages import CommitMessage
from protocols.zo import projected_gradient

from . import memory
from .native import NativeGraph, NativeUnsupported, compile_native
from .shard import Shard, check_shard
from .weights import Undo, Weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundOutput:
    scalars: tuple[float, ...]
    loss: float  # mean of every L+ and L- measured
    samples: int
    seconds: float
    undo_elements: int  # the largest undo log of the round, in elements
    queries: int = 0  # black-box API calls of the round (prompt tuning)


# Address space, not memory: only pages in use become resident, plus the arena's index of
# the region (~3% of it). Enough for ResNet-18's activations at batch 64 (~85 MB); a model
# that needs more gets further regions of doubling size.
ARENA_RESERVE = 128 << 20
_arena_registered = False


def _shared_arena() -> None:
    """One arena for the process's forward sessions, reserved as one region up front.

    ONNX Runtime's default arena starts small and adds regions of doubling size; freed
    activations then scatter across regions and a pass over a shard keeps touching new
    pages (ResNet-18 at batch 64: 92 MB after one forward, 100 after a pass). One region
    that holds a whole forward is reused best-fit from its start: 85 MB, flat.
    """
    global _arena_registered
    if _arena_registered:
        return
    config = ort.OrtArenaCfg({"arena_extend_strategy": 0,
                              "initial_chunk_size_bytes": ARENA_RESERVE})
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                             ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, config)
    _arena_registered = True


def session_options(threads: int | None, shared_arena: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or memory.usable_cores()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The arena reuses freed activations in place; without it glibc's heap fragments and
    # a pass over a shard peaked 1.5x higher, and ran up to 1.5x slower (page faults).
    # The memory pattern would plan one block per batch shape and keep each: off.
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = False
    if shared_arena:
        _shared_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    # Weights are graph inputs the agent moves in place; a kernel must read them at run
    # time, never pre-pack a private copy.
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.log_severity_level = 3
    return options


STRATEGIES = ("auto", "native", "inputs", "constants")
# How a round returns to the weights it started from after each probe: "undo" regenerates
# z and patches what float32 rounding lost (no second copy of the weights: the device's
# way); "copy" keeps a copy for the round and copies it back (a host with memory to spare,
# e.g. the simulation's workers: half the direction draws). The bits are the same.
RESTORES = ("undo", "copy")


class ZoEngine:
    """A model, a shard and the weights; the ZO round, commits and fingerprints over them.

    ``strategy="auto"`` compiles the native graph and uses it; where ONNX Runtime moves
    weights in a way the agent cannot follow (``NativeUnsupported``), it falls back to
    ``inputs`` or ``constants``, whichever the shard size favours. With
    ``memory_budget_mb`` the engine measures what a forward pass costs here and picks the
    largest micro-batch that fits, or refuses with the least budget that would work.
    """

    def __init__(self, model_dir: Path, shard: Shard, spec: DirectionSpec | None = None,
                 micro_batch: int | None = 64, threads: int | None = None,
                 verify: bool = True, manifest: Manifest | None = None,
                 strategy: str = "auto", memory_budget_mb: float | None = None,
                 restore: str = "undo") -> None:
        if restore not in RESTORES:
            raise ValueError(f"restore must be one of {', '.join(RESTORES)}, got {restore!r}")
        self.restore_by = restore
        self.model_dir = Path(model_dir)
        self.manifest = manifest or load_manifest(self.model_dir, verify=verify)
        self.shard = check_shard(shard, self.manifest)
        self.spec = spec or DirectionSpec()
        self.threads = threads or memory.usable_cores()
        self._check_strategy(strategy)
        self._work = tempfile.TemporaryDirectory(prefix="zowarmup-native-")
        self.native = self._compile(strategy)
        self.weights = Weights.load(self.model_dir / self.manifest.weights, self.manifest,
                                    self.native.layouts if self.native else None)
        self._session: ort.InferenceSession | None = None
        if self.native:
            strategy = "native"
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
        if strategy in ("constants", "native") and not self.manifest.graph_const:
            raise ValueError(f"strategy {strategy!r} needs the constant-weights graph, which "
                             "this model was exported without; re-export it or use 'inputs'")

    def _compile(self, strategy: str) -> NativeGraph | None:
        if strategy not in ("auto", "native") or not self.manifest.graph_const:
            return None
        try:
            native = compile_native(self.model_dir, self.manifest, Path(self._work.name))
        except NativeUnsupported as exc:
            if strategy == "native":
                raise
            log.info("no native graph for %s (%s); using the plain ones",
                     self.manifest.model, exc)
            return None
        finally:
            memory.trim()  # the optimiser's heap goes back before the weights come in
        return native

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
        if strategy in ("native", "inputs", "constants"):
            return strategy, self._fit(strategy, budget_mb, limit)
        names = ["constants", "inputs"] if self.manifest.graph_const else ["inputs"]
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
                    if strategy == "constants":
                        self._const_session().run(None, {self.manifest.input_name: x[:size],
                                                         self.manifest.label_name: y[:size]})
                    else:
                        self._forward(x[:size], y[:size])
            return memory.measure_peak(run) + undo_mb

        undo_mb = self.manifest.num_parameters * 0.15 * 8 / 2**20  # the undo log's worst seen
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
        """The weights-as-inputs session (native or plain graph), built on first use and
        bound once to the weight buffers: moving them in place needs no rebinding."""
        if self._session is None:
            graph = self.native.path if self.native else self.model_dir / self.manifest.graph
            options = session_options(self.threads)
            if self.native:  # already optimised for this CPU: run it as it is
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self._session = ort.InferenceSession(str(graph), options,
                                                 providers=["CPUExecutionProvider"])
            self._binding = self._session.io_binding()
            names = self.native.inputs if self.native else [(p.name,)
                                                            for p in self.manifest.parameters]
            self._values = [ort.OrtValue.ortvalue_from_numpy(t) for t in self.weights.tensors]
            for inputs, value in zip(names, self._values):
                for name in inputs:
                    self._binding.bind_ortvalue_input(name, value)
            for name in self.manifest.outputs:
                self._binding.bind_output(name)
        return self._session

    def _drop_session(self) -> None:
        self._session = self._binding = None
        memory.trim()

    def _const_session(self) -> ort.InferenceSession:
        options = session_options(self.threads, shared_arena=False)  # its weights go with it
        # add_external_initializers copies the weights into the session, read at build
        # time. (add_initializer lends buffers, but ONNX Runtime optimises the graph with
        # the file's values first and only then swaps in the lent ones: stale weights.)
        options.add_external_initializers(
            [p.name for p in self.manifest.parameters],
            [ort.OrtValue.ortvalue_from_numpy(t) for t in self.weights.tensors])
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
        if self.strategy == "constants":
            del forward
            memory.trim()  # a pass's session goes back before the next pass
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
        undo = self.weights.perturb(seed, alpha, self.spec)
        memory.trim()  # the chunks' temporaries go back before the forward pass needs room
        return undo

    def restore(self, seed: int, alpha: float, undo: Undo) -> None:
        """Exactly undo ``perturb(seed, alpha)``."""
        self.weights.restore(seed, alpha, self.spec, undo)

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
        start = self.weights.buffer.copy() if self.restore_by == "copy" else None
        base = start
        for step in range(local_steps):
            step_seeds = seeds[step * per_step:(step + 1) * per_step]
            for seed in step_seeds:
                pair = []
                for alpha in (eps, -eps):
                    loss, undone = self._probe(seed, alpha, base)
                    largest = max(largest, undone)
                    pair.append(loss)
                scalars.append(projected_gradient(pair[0], pair[1], eps))
                losses += pair
            if step + 1 < local_steps:
                for seed, g in zip(step_seeds, scalars[-per_step:]):
                    alpha = -local_lr * g / per_step
                    if start is None:
                        local_undo.append((seed, alpha, self.perturb(seed, alpha)))
                    else:
                        self.weights.axpy(seed, alpha, self.spec)
                base = None if start is None else self.weights.buffer.copy()
        for seed, alpha, undo in reversed(local_undo):
            self.restore(seed, alpha, undo)
        if start is not None:
            np.copyto(self.weights.buffer, start)
        return RoundOutput(tuple(scalars), float(np.mean(losses)), len(self.shard),
                           time.perf_counter() - started, largest)

    def _probe(self, seed: int, alpha: float, base: np.ndarray | None) -> tuple[float, int]:
        """The loss at ``w + alpha z(seed)``, the weights left as they were: by ``base``, a
        copy of them, where there is one, else by undoing; and the undo log's size."""
        if base is None:
            undo = self.perturb(seed, alpha)
            loss = self.evaluate()[0]
            self.restore(seed, alpha, undo)
            return loss, undo.size
        self.weights.axpy(seed, alpha, self.spec)  # the same ``part += delta`` as perturb
        loss = self.evaluate()[0]
        np.copyto(self.weights.buffer, base)
        return loss, 0

    def apply(self, commits: Sequence[CommitMessage]) -> str:
        """Apply commits in order (``w <- w - sum_j c_j z(seed_j)``); the new fingerprint."""
        for message in commits:
            self.weights.apply(message.commit, self.spec)
        return self.fingerprint()

    def fingerprint(self) -> str:
        return self.weights.fingerprint()

    def load_weights(self, path: Path) -> None:
        """Replace the weights with a snapshot file (same layout as weights.bin), in place."""
        self.weights.read(path)
