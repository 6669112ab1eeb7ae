"""Prompt tuning against a black box: the agent's ZO engine with the loss asked of a frozen model.

The model directory a prompt-tuning run announces holds only the *prompt*: a small graph
whose output is what the black box is asked about (``outputs = ["prompted"]`` in the
manifest), and its weights. The frozen model is elsewhere (:mod:`edge_agent.blackbox`).

* :class:`PromptEngine` (continuous prompts, BlackVIP-style): the prompt generator's
  weights are the trainable tensors of :class:`~edge_agent.engine.ZoEngine`, moved in place
  along seeded directions as in any ZO round; only the forward pass differs: generator
  here, then ``blackbox.score``. Commits, fingerprints and snapshots are the ZO engine's.
* :class:`DiscretePromptEngine` (discrete prompts, BDPL-style): the weights are the
  logits of one categorical distribution per prompt token; a round draws one prompt per
  seed, scores it, and reports the draws' advantages (:mod:`protocols.prompts`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from protocols.directions import CATEGORICAL, DirectionSpec
from protocols.errors import ProtocolError
from protocols.manifest import Manifest, load_manifest
from protocols.messages import CommitMessage
from protocols.prompts import advantages, apply_policy_commit, best, probabilities, sample

from .blackbox import BlackBox
from .engine import RoundOutput, ZoEngine, session_options
from .shard import Shard, check_shard
from .weights import Weights

PROMPTED = "prompted"  # the prompt graph's one output
CHOICE = "choice"  # a discrete prompt graph's input: the drawn candidate per token


def is_prompt_model(manifest: Manifest) -> bool:
    return tuple(manifest.outputs) == (PROMPTED,)


class _PerDevice:
    """Several clients in one engine (the simulation): each queries as itself."""

    blackbox: BlackBox | None
    open_box: Callable[[str], BlackBox] | None = None
    _boxes: dict[str, BlackBox]

    def select_device(self, device: str) -> None:
        """Query as ``device`` from now on, through its own connection and counters."""
        if self.open_box is None:
            return
        boxes = self.__dict__.setdefault("_boxes", {})
        if device not in boxes:
            boxes[device] = self.open_box(device)
        self.blackbox = boxes[device]


class PromptEngine(_PerDevice, ZoEngine):
    """ZO rounds on a prompt generator; each forward pass is one black-box query."""

    def __init__(self, model_dir: Path, shard: Shard, blackbox: BlackBox | None,
                 spec: DirectionSpec | None = None, micro_batch: int | None = 64,
                 threads: int | None = None, manifest: Manifest | None = None) -> None:
        self.blackbox = blackbox
        super().__init__(model_dir, shard, spec, micro_batch, threads, manifest=manifest,
                         strategy="inputs")

    @property
    def strategy(self) -> str:
        return "inputs"  # the generator is tiny; the black box is the forward pass's cost

    @strategy.setter
    def strategy(self, value: str) -> None:
        """Ignored: a prompt engine runs its generator with the weights as inputs."""

    def prompted(self, x: np.ndarray) -> np.ndarray:
        """What the black box is asked about for these inputs, at the current weights."""
        self.session  # noqa: B018 - built on first use
        self._binding.bind_cpu_input(self.manifest.input_name, x)
        self._binding.bind_output(PROMPTED)  # anew: its shape follows the batch
        self.session.run_with_iobinding(self._binding)
        return self._binding.copy_outputs_to_cpu()[0]

    def _forward(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        score = self.blackbox.score(self.prompted(x), y)
        return score.loss, score.correct

    def round(self, seeds: Sequence[int], eps: float, local_steps: int = 1,
              local_lr: float = 0.0) -> RoundOutput:
        before = self.blackbox.queries
        out = super().round(seeds, eps, local_steps, local_lr)
        return replace(out, queries=self.blackbox.queries - before)


class DiscretePromptEngine(_PerDevice):
    """Policy-gradient rounds on categorical prompt distributions, scored by the black box."""

    def __init__(self, model_dir: Path, shard: Shard, blackbox: BlackBox | None,
                 spec: DirectionSpec, micro_batch: int | None = 64, threads: int | None = None,
                 manifest: Manifest | None = None) -> None:
        if spec.distribution != CATEGORICAL:
            raise ProtocolError("a discrete prompt trains with categorical draws, the run "
                                f"announced {spec.distribution!r}", "bad_spec")
        self.model_dir = Path(model_dir)
        self.manifest = manifest or load_manifest(self.model_dir)
        if len(self.manifest.parameters) != 1 or len(self.manifest.parameters[0].shape) != 2:
            raise ProtocolError("a discrete prompt's weights are one (tokens, candidates) "
                                "tensor of logits", "bad_layout")
        self.shard = check_shard(shard, self.manifest)
        self.spec, self.blackbox = spec, blackbox
        self.micro_batch = max(1, int(micro_batch or 64))
        self.strategy = "inputs"
        self.weights = Weights.load(self.model_dir / self.manifest.weights, self.manifest)
        self._session = ort.InferenceSession(str(self.model_dir / self.manifest.graph),
                                             session_options(threads, shared_arena=False),
                                             providers=["CPUExecutionProvider"])

    @property
    def logits(self) -> np.ndarray:
        return self.weights.tensors[0]

    def prompted(self, x: np.ndarray, choice: np.ndarray) -> np.ndarray:
        return self._session.run([PROMPTED], {self.manifest.input_name: x,
                                              CHOICE: choice.astype(np.int64)})[0]

    def evaluate(self, shard: Shard | None = None, choice: np.ndarray | None = None
                 ) -> tuple[float, int]:
        """Mean loss and correct count with one prompt (the most likely one by default)."""
        shard = shard or self.shard
        choice = best(self.logits) if choice is None else choice
        total, correct = 0.0, 0
        for x, y in shard.batches(self.micro_batch):
            score = self.blackbox.score(self.prompted(x, choice), y)
            total += score.loss * len(y)
            correct += score.correct
        return total / len(shard), correct

    def round(self, seeds: Sequence[int], eps: float = 0.0, local_steps: int = 1,
              local_lr: float = 0.0) -> RoundOutput:
        """One draw per seed, each scored over the whole shard; the state is not moved."""
        if local_steps != 1:
            raise ProtocolError("discrete prompts take one policy step per round",
                                "bad_policy")
        started, before = time.perf_counter(), self.blackbox.queries
        probs = probabilities(self.logits)
        losses = [self.evaluate(choice=sample(seed, probs))[0] for seed in seeds]
        return RoundOutput(advantages(losses), float(np.mean(losses)), len(self.shard),
                           time.perf_counter() - started, 0, self.blackbox.queries - before)

    def apply(self, commits: Sequence[CommitMessage]) -> str:
        for message in commits:
            apply_policy_commit([self.logits], message.commit)
        return self.fingerprint()

    def fingerprint(self) -> str:
        return self.weights.fingerprint()

    def load_weights(self, path: Path) -> None:
        self.weights.read(path)


def build_engine(model_dir: Path, shard: Shard, spec: DirectionSpec,
                 blackbox: Callable[[], BlackBox] | None, **options):
    """The engine a model needs: the ZO engine, or a prompt engine with its black box.

    ``blackbox`` opens the black box (only prompt models need one); ``options`` are the
    ZO engine's keyword arguments, of which a prompt engine takes the ones that apply.
    """
    manifest = options.get("manifest") or load_manifest(Path(model_dir))
    if not is_prompt_model(manifest):
        return ZoEngine(model_dir, shard, spec, **options)
    if blackbox is None:
        raise ProtocolError("this run tunes a prompt against a black box, and no black box "
                            "is configured: set ZOWARMUP_BLACKBOX to the endpoint's URL "
                            "(and ZOWARMUP_API_KEY to the key) or to a black-box directory",
                            "no_blackbox")
    kind = DiscretePromptEngine if spec.distribution == CATEGORICAL else PromptEngine
    return kind(model_dir, shard, blackbox(), spec=spec,
                micro_batch=options.get("micro_batch"), threads=options.get("threads"),
                manifest=manifest)
