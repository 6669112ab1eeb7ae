"""Before the first prompt-tuning round: the owner's black box, the devices' prompt, the shards.

Everything here follows from the config and its seed, and is written once into the run
directory (``blackbox/``, ``model/``, ``shards/``); a resumed run reads it back. The
zero-shot accuracy, the frozen model on the test split with no prompt, is measured here
and kept in ``state.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_agent.blackbox import LocalBlackBox
from export.prompt import export_blackbox, export_discrete_prompt, export_prompt_generator
from protocols.manifest import load_manifest
from protocols.prompts import best
from protocols.scoring import SPEC_FILE

from ..config import Config
from ..run.state import BLACKBOX, SHARDS, RunDir, agent_ids
from ..train.data import dirichlet_partition, write_partition
from .data import Task, bbc_task, digits_task
from .encoder import load_tokenizer
from .models import PROMPT_TRAINABLE, VisualPrompt, ZeroShotText, candidate_tokens, pretrain_cnn

log = logging.getLogger("zowarmup.bbpt")


@dataclass(frozen=True, eq=False)
class Prepared:
    agent_ids: list[str]
    x_test: np.ndarray  # as the devices see it (shifted images, or text ids without prompt)
    y_test: np.ndarray
    zero_shot_acc: float
    zero_shot_loss: float
    blackbox_name: str
    trainable: int  # the prompt's trainable parameters
    candidates: tuple[int, ...] = ()  # discrete prompts: the token ids to choose from

    def describe_prompt(self, weights: Sequence[np.ndarray]) -> list[str]:
        """The tuned discrete prompt, as tokens (the most likely candidate per position)."""
        ids = [self.candidates[i] for i in best(weights[0])]
        return load_tokenizer().convert_ids_to_tokens(ids)


def load_task(config: Config) -> Task:
    d = config.data
    if d.dataset == "digits":
        return digits_task(config.run.seed, d.test_fraction)
    return bbc_task(config.run.seed, d.test_fraction,
                    config.bbpt.max_tokens - config.bbpt.tokens)


def client_parts(config: Config, labels: np.ndarray) -> list[np.ndarray]:
    """The Dirichlet label split, each client then keeping ``bbpt.shots`` samples at most."""
    d = config.data
    parts = dirichlet_partition(labels, d.clients, d.alpha, config.run.seed)
    shots = config.bbpt.shots
    if not shots:
        return parts
    rng = np.random.default_rng([config.run.seed, 0xB877])
    return [np.sort(rng.permutation(p)[:shots]) for p in parts]


def prepare(config: Config, rd: RunDir) -> Prepared:
    task = load_task(config)
    parts = client_parts(config, task.dataset.y_train)
    state = rd.state()
    if "zero_shot_acc" not in state or not (rd.path / BLACKBOX / SPEC_FILE).exists():
        _write(config, rd, task, parts)
        state = rd.state()
    manifest = load_manifest(rd.model)
    return Prepared(agent_ids(len(parts)), task.dataset.x_test,
                    task.dataset.y_test, state["zero_shot_acc"], state["zero_shot_loss"],
                    state["blackbox"], manifest.num_parameters, tuple(state.get("candidates", ())))


def _write(config: Config, rd: RunDir, task: Task, parts: list[np.ndarray]) -> None:
    write_partition(task.dataset, parts, np.zeros(len(parts), bool), rd.path / SHARDS,
                    config.run.seed, config.data.alpha)
    if config.bbpt.prompt == "continuous":
        name, candidates = _image(config, rd, task), ()
    else:
        name, candidates = _text(config, rd, task)
    loss, acc = zero_shot(rd.path / BLACKBOX, task, config.bbpt.tokens
                          if config.bbpt.prompt == "discrete" else 0)
    log.info("black box %s: zero-shot test accuracy %.4f", name, acc)
    rd.set_state(phase="bbpt", blackbox=name, zero_shot_acc=acc, zero_shot_loss=loss,
                 candidates=[int(c) for c in candidates])


def _image(config: Config, rd: RunDir, task: Task) -> str:
    x, y = task.pretrain
    d = task.dataset
    model = pretrain_cnn(x, y, config.bbpt.pretrain_epochs, config.run.seed)
    name = "digits-cnn"
    export_blackbox(model, rd.path / BLACKBOX, torch.from_numpy(x[:2]), d.num_classes, name,
                    d.class_names)
    norm = {"mean": list(d.mean), "std": list(d.std)}
    export_prompt_generator(VisualPrompt(*d.input_shape), rd.model, d.input_shape,
                            d.num_classes, PROMPT_TRAINABLE, "visual-prompt", norm)
    return name


def _text(config: Config, rd: RunDir, task: Task) -> tuple[str, np.ndarray]:
    d, b = task.dataset, config.bbpt
    model = ZeroShotText(d.class_names)
    vocabulary = model.encoder.config.vocab_size
    example = torch.ones(2, b.max_tokens, dtype=torch.int64) * 1996
    name = "all-MiniLM-L6-v2-zero-shot"
    export_blackbox(model, rd.path / BLACKBOX, example, d.num_classes, name, d.class_names,
                    (0, vocabulary))
    candidates = candidate_tokens(d.x_train, b.candidates)
    export_discrete_prompt(rd.model, candidates, b.tokens, d.input_shape[0],
                           d.num_classes)
    return name, candidates


def zero_shot(blackbox: Path, task: Task, pad: int, batch: int = 256) -> tuple[float, float]:
    """The frozen model on the test split with no prompt: (mean loss, accuracy)."""
    box = LocalBlackBox(blackbox, threads=2)
    x, y = task.dataset.x_test, task.dataset.y_test
    if pad:  # text: no prompt tokens, the padding keeps the black box's input length
        x = np.concatenate([x, np.zeros((len(x), pad), x.dtype)], axis=1)
    total, correct = 0.0, 0
    for start in range(0, len(y), batch):
        score = box.score(x[start:start + batch], y[start:start + batch])
        total += score.loss * score.count
        correct += score.correct
    return total / len(y), correct / len(y)
